//! Listeners: the proxy (HTTP/1.1 and h2c, connection limit, graceful drain) and the admin
//! server (`/healthz`, `/ready`, `/metrics`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::Service;

use custos_serve::{NoRequestInTime, RequestStarted, first_request_within};

use crate::metrics::LimitLabels;
use crate::proxy::{Enforcer, Shared};
use crate::send_timeout::SendTimeout;
use crate::stall::{StallWatch, Watched};
use crate::state::ConfigCell;

/// How often an h2c connection that has been quiet is pinged, and how long the answer may
/// take: a client gone without closing (its node lost) frees its connection slot within
/// their sum. (HTTP/1.1 connections are closed when idle past `--header-read-timeout`.)
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Most admin connections open at once (kubelet probes and a Prometheus or two need a
/// handful); more are closed at once and counted as `limit="admin_connections"`.
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Accepts proxy connections until `shutdown` turns true, then drains in-flight requests for
/// at most `drain_timeout`.
pub(crate) async fn serve_proxy(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let limits = shared.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(16 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let idle_sweep = tokio::spawn(close_idle_upstreams(shared.clone()));
    let slots = shared.connection_slots.clone();
    let metrics = shared.metrics.clone();
    let header_read_timeout = limits.header_read_timeout;
    let send_timed_out =
        metrics.limit_rejections.get_or_create(&LimitLabels { limit: "response_send_timeout" }).clone();
    // The connections' tasks: at the drain time-out, those still running are ended (their
    // requests' events are emitted as their futures drop), whatever runtime they run on.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.limit("connections");
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        // Whether the connection is the mesh's proxy's, found once for its requests.
        let origin = match &shared.mesh {
            Some(mesh) => mesh.origin_check(peer, stream.local_addr().ok()),
            None => crate::mesh::OriginCheck::Known(crate::mesh::Origin::Peer),
        };
        let enforcer = Enforcer::new(shared.clone(), peer, origin);
        let started = RequestStarted::new();
        let marker = started.clone();
        // h2c streams the client grants no window lose their bodies after the send time-out.
        let stalls = StallWatch::new(limits.response_send_timeout, send_timed_out.clone());
        let watch = stalls.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            marker.mark();
            let watch = (req.version() == http::Version::HTTP_2).then(|| watch.clone());
            let mut enforcer = enforcer.clone();
            let response = enforcer.call(req);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(match watch {
                    Some(watch) => response.map(|body| watch.watch(body)),
                    None => response.map(Watched::plain),
                })
            }
        });
        let io = SendTimeout::new(stream, limits.response_send_timeout, send_timed_out.clone());
        let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
        let conn = graceful.watch(conn);
        let open = OpenConnection::new(metrics.clone(), permit);
        connections.spawn(async move {
            let ended = first_request_within(conn, started.clone(), header_read_timeout).await;
            if let Some(reason) = connection_end(&ended, &started) {
                open.metrics.limit(reason);
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("in-flight requests drained"),
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(connections = connections.len(), "drain time-out: closing the remaining connections");
            connections.abort_all();
            let _ = tokio::time::timeout(Duration::from_secs(1), async { while connections.join_next().await.is_some() {} }).await;
        }
    }
    idle_sweep.abort();
}

/// A client connection while its task holds it, however the task ends (aborted too): counted
/// in `custos_sidecar_connections`, and one of `--max-connections`.
struct OpenConnection {
    metrics: Arc<crate::metrics::Metrics>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(metrics: Arc<crate::metrics::Metrics>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections.inc();
        OpenConnection { metrics, _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// Logs how a client connection ended, and names the limit that ended it, if any: no request
/// started within the header read time-out (hyper-util's protocol detection has no timer, so
/// [`first_request_within`] closes the connection; or hyper's own HTTP/1.1 timer fired
/// first). Idle kept-alive connections closed later are not counted.
fn connection_end(
    ended: &Result<Result<(), Box<dyn std::error::Error + Send + Sync>>, NoRequestInTime>,
    started: &RequestStarted,
) -> Option<&'static str> {
    match ended {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "client connection ended with an error");
            let error = e.downcast_ref::<hyper::Error>();
            if error.is_some_and(hyper::Error::is_parse_too_large) {
                // A head past hyper's read buffer (twice --max-header-bytes): its own 431.
                return Some("header_bytes");
            }
            let timed_out = error.is_some_and(hyper::Error::is_timeout);
            (timed_out && !started.is_marked()).then_some("header_read_timeout")
        }
        Err(e) => {
            tracing::debug!(error = %e, "client connection closed");
            Some("header_read_timeout")
        }
    }
}

/// How often a proxy thread closes its app connections idle for longer than the idle
/// time-out.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(15);

async fn close_idle_upstreams(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.upstream.close_idle();
    }
}

/// Over the connection limit: a 503 and close, without reading the request.
async fn refuse_connection(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":"too many connections","reason":"connection_limit"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// What the admin server reads.
pub(crate) struct Admin {
    pub registry: Registry,
    pub config: Arc<ConfigCell>,
    /// Counts admin connections refused over [`ADMIN_MAX_CONNECTIONS`].
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The proxy's `--header-read-timeout`, applied to admin connections too.
    pub header_read_timeout: Duration,
}

/// Serves the admin endpoints until `shutdown` turns true.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(admin.header_read_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            admin.metrics.limit("admin_connections");
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin_route(&admin, &req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn admin_route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => {
            let report = admin.config.report();
            let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = serde_json::to_string(&report).unwrap_or_default();
            text(status, "application/json", body)
        }
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &admin.registry) {
                Ok(()) => {
                    text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", out)
                }
                Err(_) => {
                    text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "cannot encode metrics\n".into())
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
