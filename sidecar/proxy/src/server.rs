//! Listeners: the proxy (HTTP/1.1 and h2c, connection limit, graceful drain) and the admin
//! server (`/healthz`, `/ready`, `/metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
use crate::throttle::Throttle;

/// How often an h2c connection that has been quiet is pinged, and how long the answer may
/// take: a client gone without closing (its node lost) frees its connection slot within
/// their sum. (Connections with no request open are closed past `--header-read-timeout`:
/// HTTP/1.1 ones by hyper, h2c ones by their [`StallWatch`].)
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What an h2c client may send before the proxy reads it, on the whole connection and on one
/// stream (hyper's defaults are 5 MiB and 2 MiB: with `--max-concurrent-streams` 256 streams a
/// client could make a connection hold megabytes). A request body is read as it arrives (up to
/// `--request-buffer-bytes` before the app is called), so a smaller window only paces it.
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// Response bytes queued per h2c stream for a client that has not granted the window yet
/// (hyper's default 400 KiB).
const H2_MAX_SEND_BUF: usize = 64 * 1024;
/// Concurrent streams an h2c client may open on one connection.
const H2_MAX_STREAMS: u32 = 256;

/// Most admin connections open at once (kubelet probes and a Prometheus or two need a
/// handful); more are closed at once and counted as `limit="admin_connections"`.
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Most admin connections one peer address may hold at once; more are closed at once and
/// counted as `limit="admin_connections_per_peer"`. A pod that reaches the admin port (no
/// NetworkPolicy, or Audit mode) could otherwise hold all [`ADMIN_MAX_CONNECTIONS`] slots,
/// fail the kubelet's probes and have the sidecar restarted, its local quotas with it.
/// Connections from the pod's own address and from the mesh proxies' loopback addresses are
/// not capped so ([`capped_peer`]): a mesh that intercepts the admin port brings the kubelet's
/// probes, the scrapes and everyone else from there.
pub(crate) const ADMIN_MAX_PER_PEER: usize = 8;

/// The address whose admin connections count against [`ADMIN_MAX_PER_PEER`]: none for the
/// pod's own address (`local`, which Linkerd's proxy connects from) and for 127.0.0.1, ::1 and
/// Istio's 127.0.0.6, whose connections a mesh proxy makes for every caller.
fn capped_peer(peer: std::net::IpAddr, local: Option<std::net::IpAddr>) -> Option<std::net::IpAddr> {
    let peer = peer.to_canonical();
    let mesh_loopback = [std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from([127, 0, 0, 6])];
    if Some(peer) == local.map(|l| l.to_canonical())
        || mesh_loopback.contains(&peer)
        || peer == std::net::Ipv6Addr::LOCALHOST
    {
        None
    } else {
        Some(peer)
    }
}

/// The admin connections each peer address holds ([`ADMIN_MAX_PER_PEER`]).
#[derive(Default)]
struct PeerSlots(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PeerSlots {
    /// One more connection of `peer`, unless it holds [`ADMIN_MAX_PER_PEER`] already.
    fn take(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = held.entry(peer).or_default();
        if *count >= ADMIN_MAX_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot { slots: Arc::clone(self), peer })
    }
}

/// A connection's share of its peer's [`PeerSlots`], given back when dropped.
struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: std::net::IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// The longest an admin connection may go without starting a request (from connecting, and
/// between requests), when `--header-read-timeout` is longer: kubelet probes and Prometheus
/// send theirs at once, and connections held open without a request free their
/// [`ADMIN_MAX_CONNECTIONS`] slots quickly, so that the probes keep finding one.
pub(crate) const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

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
        // h2 counts each field's name, value and 32 bytes: --max-header-bytes as documented.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    // Turned to on shutdown: every connection shuts down gracefully; the drain is over when
    // all have ended (dropped their receivers).
    let (drain, _) = watch::channel(());
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
                    metrics.accept_errors.inc();
                    static LOG: Throttle = Throttle::every_secs(10);
                    if LOG.due() {
                        tracing::warn!(error = %e, "accept failed (counted in custos_sidecar_accept_errors_total; logged at most every 10 s)");
                    }
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
        // h2c streams the client grants no window lose their bodies after the send time-out;
        // h2c connections with no stream open for the header read time-out are shut down.
        let stalls =
            StallWatch::new(limits.response_send_timeout, send_timed_out.clone(), header_read_timeout);
        let watch = stalls.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            marker.mark();
            // Counted open until its response body is done or dropped.
            let stream = (req.version() == http::Version::HTTP_2).then(|| watch.stream_started());
            let mut enforcer = enforcer.clone();
            let response = enforcer.call(req);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(match stream {
                    Some(stream) => response.map(|body| stream.watch(body)),
                    None => response.map(Watched::plain),
                })
            }
        });
        let io = SendTimeout::new(stream, limits.response_send_timeout, send_timed_out.clone());
        let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
        let drained = drain.subscribe();
        let open = OpenConnection::new(metrics.clone(), permit);
        connections.spawn(async move {
            let conn = until_shut_down(conn, |c| c.graceful_shutdown(), drained, stalls);
            let ended = first_request_within(conn, started.clone(), header_read_timeout).await;
            if let Some(reason) = connection_end(&ended, &started) {
                open.metrics.limit(reason);
            }
        });
    }
    drop(listener);
    let _ = drain.send(());
    tokio::select! {
        () = drain.closed() => tracing::info!("in-flight requests drained"),
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

/// How a connection served by [`until_shut_down`] ended: its own result, and the limit that
/// shut it down, if one did.
type Ended = (Result<(), Box<dyn std::error::Error + Send + Sync>>, Option<&'static str>);

/// Drives `conn` (a client connection) to its end, shutting it down gracefully (`shutdown`:
/// GOAWAY for h2c, close after the response in flight for HTTP/1.1) when `drain` changes or
/// when its h2c streams have been idle for the header read time-out (`idle`, whose watchdog
/// wakes this task); and dropping it (closing the socket) if, idle so, it is still there
/// another time-out later (ended by `header_read_timeout`). An h2c connection whose client
/// reset more than [`crate::stall::MAX_RESETS`] streams within a second
/// ([`StallWatch::reset_flood`]) is shut down and dropped at once (ended by `h2_reset_flood`):
/// the GOAWAY goes out if the socket takes it, the connection is not waited for. Each poll
/// costs the drain check (as hyper-util's `GracefulShutdown`'s) and two atomic loads; the
/// task's waker is handed to the watchdog once, when it starts.
async fn until_shut_down<C, E>(
    conn: C,
    shutdown: impl Fn(Pin<&mut C>),
    mut drain: watch::Receiver<()>,
    idle: Arc<StallWatch>,
) -> (Result<(), E>, Option<&'static str>)
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = pin!(conn);
    // Held until the connection ends (the drain waits for every receiver to go).
    let mut drained = pin!(async move {
        let _ = drain.changed().await;
        drain
    });
    let mut drain_guard = None;
    let mut shut = false;
    let mut idle_closed = false;
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(|cx| {
        if drain_guard.is_none()
            && let Poll::Ready(guard) = drained.as_mut().poll(cx)
        {
            drain_guard = Some(guard);
            if !shut {
                shut = true;
                shutdown(conn.as_mut());
            }
        }
        if idle.reset_flood() {
            if !shut {
                shutdown(conn.as_mut());
            }
            // Once more, for the GOAWAY to be written; then closed, whatever its streams.
            let _ = conn.as_mut().poll(cx);
            return Poll::Ready((Ok(()), Some("h2_reset_flood")));
        }
        if !shut && idle.idle_shutdown() {
            shut = true;
            idle_closed = true;
            // The watchdog took the waker to wake this task: handed again for the close.
            registered = None;
            shutdown(conn.as_mut());
        } else if idle_closed && idle.idle_abandon() {
            return Poll::Ready((Ok(()), Some("header_read_timeout")));
        }
        let polled = conn.as_mut().poll(cx);
        if polled.is_pending()
            && (!shut || idle_closed)
            && idle.watching()
            && registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()))
        {
            registered = Some(cx.waker().clone());
            idle.register(cx.waker().clone());
            // Signalled before the waker was there: come back at once.
            let signalled = if idle_closed { idle.idle_abandon() } else { idle.idle_shutdown() };
            if signalled || idle.reset_flood() {
                cx.waker().wake_by_ref();
            }
        }
        polled.map(|ended| (ended, idle_closed.then_some("header_read_timeout")))
    })
    .await
}

/// Logs how a client connection ended, and names the limit that ended it, if any: no request
/// started within the header read time-out (hyper-util's protocol detection has no timer, so
/// [`first_request_within`] closes the connection; or hyper's own HTTP/1.1 timer fired
/// first), or an h2c connection had no stream open for that time, or its client reset too
/// many streams ([`until_shut_down`]).
/// Idle kept-alive HTTP/1.1 connections closed later are not counted.
fn connection_end(ended: &Result<Ended, NoRequestInTime>, started: &RequestStarted) -> Option<&'static str> {
    match ended {
        Ok((_, Some(limit))) => Some(limit),
        Ok((Ok(()), None)) => None,
        Ok((Err(e), None)) => {
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
    /// The proxy's `--header-read-timeout`, applied to admin connections too, but at most
    /// [`ADMIN_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
}

/// Serves the admin endpoints until `shutdown` turns true.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(admin.header_read_timeout.min(ADMIN_HEADER_READ_TIMEOUT));
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let peer_slots = Arc::new(PeerSlots::default());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, peer)) => (s, peer),
                Err(e) => {
                    admin.metrics.accept_errors.inc();
                    static LOG: Throttle = Throttle::every_secs(10);
                    if LOG.due() {
                        tracing::warn!(error = %e, "admin accept failed (counted in custos_sidecar_accept_errors_total; logged at most every 10 s)");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let local = stream.local_addr().ok().map(|a| a.ip());
        let peer_slot = match capped_peer(peer.ip(), local) {
            Some(capped) => match peer_slots.take(capped) {
                Some(slot) => Some(slot),
                None => {
                    admin.metrics.limit("admin_connections_per_peer");
                    tokio::spawn(refuse_connection(stream));
                    continue;
                }
            },
            None => None,
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
            drop((permit, peer_slot));
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
