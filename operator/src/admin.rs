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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::metrics::OperatorMetrics;

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
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            app.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "admin connection ended with an error");
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
