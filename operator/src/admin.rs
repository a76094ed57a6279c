//! The admin server (plain HTTP, for the kubelet and Prometheus):
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 once the caches the webhooks read have synced and the webhook server
//!   is serving (or is disabled); 503 naming what is missing otherwise.
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use custos_serve::{RequestStarted, first_request_within};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::metrics::OperatorMetrics;

/// Time a client has to start a request, from connecting and between requests.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What `/readyz` waits for.
#[derive(Debug, Default)]
pub struct Readiness {
    caches_synced: AtomicBool,
    webhooks_serving: AtomicBool,
}

impl Readiness {
    /// Marks the webhook caches (policies, namespaces) as synced.
    pub fn set_caches_synced(&self) {
        self.caches_synced.store(true, Ordering::Release);
    }

    /// Marks the webhook server as serving (or disabled).
    pub fn set_webhooks_serving(&self) {
        self.webhooks_serving.store(true, Ordering::Release);
    }

    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.caches_synced.load(Ordering::Acquire) {
            return Err("caches not synced yet");
        }
        if !self.webhooks_serving.load(Ordering::Acquire) {
            return Err("webhook server not serving yet");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: OperatorMetrics,
    readiness: Arc<Readiness>,
}

/// The admin routes.
pub fn router(metrics: OperatorMetrics, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { metrics, readiness })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(missing) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {missing}\n")),
    }
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
}

/// Serves `router` over plain HTTP/1.1 and h2c on `listener` until `shutdown` resolves, then
/// drains open connections for at most `drain`.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = router.clone();
        let started = RequestStarted::new();
        let marker = started.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            marker.mark();
            app.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        // hyper-util's protocol detection has no timer of its own.
        let connection = first_request_within(graceful.watch(connection), started, HEADER_READ_TIMEOUT);
        tokio::spawn(async move {
            match connection.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, %peer, "admin connection ended with an error"),
                Err(error) => tracing::debug!(%error, %peer, "admin connection closed"),
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("admin connections still open after the drain time-out");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;

    async fn get_path(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_waits_for_caches_and_webhooks() {
        let readiness = Arc::new(Readiness::default());
        let router = router(OperatorMetrics::new(), readiness.clone());
        assert_eq!(get_path(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get_path(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("caches"), "{body}");
        readiness.set_caches_synced();
        let (status, body) = get_path(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("webhook"), "{body}");
        readiness.set_webhooks_serving();
        assert_eq!(get_path(&router, "/readyz").await.0, StatusCode::OK);
    }

    /// A client that connects and sends nothing, or a few bytes of the h2c preface, is closed
    /// after the header read time-out (hyper-util's protocol detection has no timer of its
    /// own); the clock is paused, so the 30 s pass at once.
    #[tokio::test(start_paused = true)]
    async fn silent_connections_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = router(OperatorMetrics::new(), Arc::new(Readiness::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_plain(
            listener,
            router,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        for head in ["", "PRI * HTTP/2.0\r\n"] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(head.as_bytes()).await.unwrap();
            let begun = tokio::time::Instant::now();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(600), c.read_to_end(&mut rest)).await.unwrap();
            assert_eq!(begun.elapsed().as_secs(), HEADER_READ_TIMEOUT.as_secs(), "{head:?}");
        }
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn metrics_are_served() {
        let metrics = OperatorMetrics::new();
        metrics.set_leader(true);
        let router = router(metrics, Arc::new(Readiness::default()));
        let (status, body) = get_path(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("custos_operator_leader 1"), "{body}");
    }
}
