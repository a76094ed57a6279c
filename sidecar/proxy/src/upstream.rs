//! The connections of one proxy thread to the app: HTTP/1.1 keep-alive connections on
//! hyper's connection API, kept in a short list per thread.
//!
//! It replaces hyper-util's general-purpose pool, whose per-request cost (a keyed hash map
//! looked up three times, a waiter queue, and a task spawned per response to hand the
//! connection back once it is idle) was about 8% of the sidecar's instructions per request.
//! Here a connection goes back to the list as soon as the response head has arrived, and a
//! request takes the most recently used connection that is idle again
//! ([`SendRequest::is_ready`]): there is one upstream, so there is nothing to key by but its
//! address, which only changes when a reloaded config names another `appPort`.
//!
//! The app may close an idle keep-alive connection at any time. A connection seen closed is
//! dropped from the list, and a request that fails on a reused connection because the app
//! closed it is sent again, once, on a new connection, when that is safe:
//! - a request hyper hands back unsent (the close arrived first), whatever its method;
//! - a request written in the instant the app closed (the connection ends, or is reset,
//!   before any byte of a response), if its method is idempotent (`GET`, `HEAD`, `OPTIONS`,
//!   `TRACE`, `PUT`, `DELETE`; RFC 9110 section 9.2.2), it has no body, and the connection
//!   had been idle for at least [`UpstreamSettings::replay_after_idle`]. The app may have
//!   received it, so it may see it twice, which an idempotent request allows; nginx retries
//!   the same requests on its cached connections. Others fail with 502.
//!
//!   The idle condition keeps the copy such a retry needs (the request head) off the busy
//!   path: an app's keep-alive time-out closes only a connection that has been idle for that
//!   long, and the sidecar, which stops counting when it sent the last request, has counted
//!   at least as long. A connection reused within the threshold is closed under a request
//!   only when the app stops or fails, when a new connection would fail too.
//!
//! A failure on a new connection is never retried: that is the app's answer.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a request did not get a response from the app.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be made.
    #[error("cannot connect to the app at {addr}: {source}")]
    Connect {
        /// The app's address.
        addr: SocketAddr,
        /// What the connect call returned.
        #[source]
        source: std::io::Error,
    },
    /// The connection was not made within the connect time-out.
    #[error("connecting to the app at {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The app's address.
        addr: SocketAddr,
        /// The time-out.
        timeout: Duration,
    },
    /// HTTP/1.1 failed on the connection (handshake, request or response head).
    #[error("upstream HTTP/1.1: {0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// No connection could be made (the app is down or not listening yet).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. })
    }
}

/// Settings of an [`Upstream`].
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed by [`Upstream::close_idle`].
    pub idle_timeout: Duration,
    /// Connections kept in the list; beyond it the least recently used are closed.
    pub max_idle: usize,
    /// An idempotent request without a body is sent again when the app closes the reused
    /// connection under it, if the connection had been idle for this long (see the module
    /// documentation); well below any app's keep-alive time-out.
    pub replay_after_idle: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_idle: 1024,
            replay_after_idle: Duration::from_millis(250),
        }
    }
}

/// Counters of an [`Upstream`] (the sidecar registers them as
/// `custos_sidecar_upstream_{connections,retries}_total`).
#[derive(Clone, Debug, Default)]
pub struct UpstreamCounters {
    /// Connections opened to the app.
    pub connections: Counter,
    /// Requests sent again on a new connection because the app had closed the reused one.
    pub retries: Counter,
}

/// A connection in the list.
struct Pooled<B> {
    addr: SocketAddr,
    sender: SendRequest<B>,
    /// When it was last handed a request.
    used: Instant,
}

/// The app connections of one proxy thread, sending request bodies of type `B`.
pub struct Upstream<B> {
    /// Least recently used first. A connection whose response is still being read stays in
    /// the list and is passed over until it is idle again.
    pooled: Mutex<Vec<Pooled<B>>>,
    settings: UpstreamSettings,
    counters: UpstreamCounters,
}

impl<B> Upstream<B>
where
    B: Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// No connections yet; they are opened as requests need them.
    pub fn new(settings: UpstreamSettings, counters: UpstreamCounters) -> Self {
        Upstream { pooled: Mutex::new(Vec::new()), settings, counters }
    }

    /// Sends `req` (origin-form target, `Host` set) to the app at `addr` and waits for the
    /// response head.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<B>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let now = Instant::now();
        if let Some((mut sender, used)) = self.take_idle(addr) {
            let replay = if now.duration_since(used) >= self.settings.replay_after_idle {
                replayable(&req)
            } else {
                None
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.put_back(addr, sender, now);
                    return Ok(response);
                }
                Err(mut e) => match (e.take_message(), replay) {
                    // Not sent: the app closed the connection first. Once more, on a new one.
                    (Some(unsent), _) => req = unsent,
                    // Sent as the app closed: again if it may be.
                    (None, Some(copy)) if closed_by_app(e.error()) => req = copy,
                    (None, _) => return Err(UpstreamError::Http(e.into_error())),
                },
            }
            self.counters.retries.inc();
        }
        let mut sender = self.connect(addr).await?;
        let response = sender.send_request(req).await?;
        self.put_back(addr, sender, now);
        Ok(response)
    }

    /// The most recently used connection to `addr` that is idle, and when it was last
    /// handed a request; drops closed connections and those to another address on the way.
    fn take_idle(&self, addr: SocketAddr) -> Option<(SendRequest<B>, Instant)> {
        let mut pooled = self.lock();
        let mut i = pooled.len();
        while i > 0 {
            i -= 1;
            let p = &pooled[i];
            if p.addr != addr || p.sender.is_closed() {
                pooled.remove(i);
            } else if p.sender.is_ready() {
                let p = pooled.remove(i);
                return Some((p.sender, p.used));
            }
        }
        None
    }

    /// Returns a connection to the list (its response may still be in flight), as handed a
    /// request at `used`.
    fn put_back(&self, addr: SocketAddr, sender: SendRequest<B>, used: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut pooled = self.lock();
        if pooled.len() >= self.settings.max_idle.max(1) {
            pooled.remove(0);
        }
        pooled.push(Pooled { addr, sender, used });
    }

    /// Closes the connections idle for longer than the idle time-out, and those closed by
    /// the app. Run periodically by each proxy thread.
    pub fn close_idle(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.lock().retain(|p| {
            let expired = p.sender.is_ready() && now.duration_since(p.used) >= timeout;
            !(p.sender.is_closed() || expired)
        });
    }

    /// Connections in the list (idle or busy).
    pub fn pooled(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pooled<B>>> {
        // A panic while holding the lock leaves a valid list.
        self.pooled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a connection and starts driving it on the current runtime.
    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<B>, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        self.counters.connections.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A copy of `req` to send again if the app closes the connection under it: only for an
/// idempotent method without a body.
fn replayable<B: Body + Default>(req: &Request<B>) -> Option<Request<B>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(B::default());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether `e` says the app closed (or reset) the connection before a response began, as
/// opposed to an answer hyper could not parse or a time-out.
fn closed_by_app(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof);
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use super::*;
    use crate::body::RequestBody;

    /// An app speaking raw HTTP/1.1: answers each request on a connection with `200 OK` and
    /// the body `#<n>`, `n` the connection's request count, then closes the connection after
    /// `per_connection` requests (`usize::MAX`: never). Each body's `#` is sent with the head
    /// and the rest only once `gate` is open, so that until then the response is in flight.
    /// Counts the connections it accepted.
    async fn mk_gated_app(
        per_connection: usize,
        gate: watch::Receiver<bool>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    while served < per_connection && next_request_head(&mut stream, &mut buf).await {
                        served += 1;
                        let count = served.to_string();
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n#", count.len() + 1);
                        if stream.write_all(head.as_bytes()).await.is_err()
                            || gate.wait_for(|open| *open).await.is_err()
                            || stream.write_all(count.as_bytes()).await.is_err()
                        {
                            return;
                        }
                    }
                    // Closes without `Connection: close`, as an app's idle time-out does.
                });
            }
        });
        (addr, accepted)
    }

    /// Reads from `stream` until `buf` holds a whole request head, and takes it out; false
    /// when the connection ends or fails first (the test apps read heads only).
    async fn next_request_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                return true;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// [`mk_gated_app`] with the gate open.
    async fn mk_app(per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let (open, gate) = watch::channel(true);
        // The app's connections hold the receiver; the sender may go.
        drop(open);
        mk_gated_app(per_connection, gate).await
    }

    fn mk_request() -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::default());
        *req.uri_mut() = http::Uri::from_static("/x");
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("app"));
        req
    }

    fn mk_upstream(settings: UpstreamSettings) -> (Upstream<RequestBody>, UpstreamCounters) {
        let counters = UpstreamCounters::default();
        (Upstream::new(settings, counters.clone()), counters)
    }

    async fn body_of(response: Response<Incoming>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = mk_app(usize::MAX).await;
        let (upstream, counters) = mk_upstream(UpstreamSettings::default());
        for i in 1..=20 {
            let response = upstream.send(addr, mk_request()).await.unwrap();
            assert_eq!(body_of(response).await, format!("#{i}"), "request {i} on the same connection");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(counters.connections.get(), 1);
        assert_eq!(upstream.pooled(), 1);
    }

    #[tokio::test]
    async fn a_busy_connection_is_passed_over() {
        let (open, gate) = watch::channel(false);
        let (addr, accepted) = mk_gated_app(usize::MAX, gate).await;
        let (upstream, _) = mk_upstream(UpstreamSettings::default());
        // The first response's body is still arriving: its connection is not idle.
        let first = upstream.send(addr, mk_request()).await.unwrap();
        let second = upstream.send(addr, mk_request()).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        open.send_replace(true);
        assert_eq!((body_of(first).await, body_of(second).await), ("#1".into(), "#1".into()));
        // Both idle now: the next two requests need no new connection.
        let (a, b) = (
            upstream.send(addr, mk_request()).await.unwrap(),
            upstream.send(addr, mk_request()).await.unwrap(),
        );
        assert_eq!((body_of(a).await, body_of(b).await), ("#2".into(), "#2".into()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_app_closes_are_replaced_without_failing_a_request() {
        // Every connection serves one request and is then closed by the app, with no
        // `Connection: close`: the next request either sees it closed, or finds out when it
        // cannot be sent and goes again on a new connection. None may fail.
        let (addr, accepted) = mk_app(1).await;
        let (upstream, counters) = mk_upstream(UpstreamSettings::default());
        for i in 0..200 {
            let response =
                upstream.send(addr, mk_request()).await.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(body_of(response).await, "#1");
            if i % 2 == 0 {
                // Half of them after the close has had time to arrive.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 200);
        assert_eq!(counters.connections.get(), 200);
    }

    #[tokio::test]
    async fn another_address_is_never_sent_a_request_meant_for_the_old_one() {
        let (old, old_accepted) = mk_app(usize::MAX).await;
        let (new, new_accepted) = mk_app(usize::MAX).await;
        let (upstream, _) = mk_upstream(UpstreamSettings::default());
        body_of(upstream.send(old, mk_request()).await.unwrap()).await;
        assert_eq!(body_of(upstream.send(new, mk_request()).await.unwrap()).await, "#1");
        // The old connection was dropped on the way: only the new one is kept.
        assert_eq!(upstream.pooled(), 1);
        assert_eq!((old_accepted.load(Ordering::SeqCst), new_accepted.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(body_of(upstream.send(new, mk_request()).await.unwrap()).await, "#2");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_and_beyond_the_maximum() {
        let (open, gate) = watch::channel(false);
        let (addr, accepted) = mk_gated_app(usize::MAX, gate).await;
        let settings = UpstreamSettings {
            idle_timeout: Duration::from_millis(50),
            max_idle: 2,
            ..UpstreamSettings::default()
        };
        let (upstream, _) = mk_upstream(settings);
        // Three in flight at once: three connections; the list keeps the last two, and the
        // response on the one it lets go still arrives whole.
        let responses = [
            upstream.send(addr, mk_request()).await.unwrap(),
            upstream.send(addr, mk_request()).await.unwrap(),
            upstream.send(addr, mk_request()).await.unwrap(),
        ];
        assert_eq!((accepted.load(Ordering::SeqCst), upstream.pooled()), (3, 2));
        open.send_replace(true);
        for r in responses {
            assert_eq!(body_of(r).await, "#1");
        }
        upstream.close_idle();
        assert_eq!(upstream.pooled(), 2, "not idle for long enough yet");
        tokio::time::sleep(Duration::from_millis(80)).await;
        upstream.close_idle();
        assert_eq!(upstream.pooled(), 0);
        assert_eq!(body_of(upstream.send(addr, mk_request()).await.unwrap()).await, "#1");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connect_failures_say_so() {
        // A port nothing listens on.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (upstream, counters) = mk_upstream(UpstreamSettings::default());
        let err = upstream.send(addr, mk_request()).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert_eq!(counters.connections.get(), 0);
    }

    /// How the app of [`mk_closing_app`] ends a connection.
    #[derive(Clone, Copy, Debug)]
    enum Close {
        /// A plain close (FIN): the client reads the end of the stream.
        Fin,
        /// A reset (RST, `SO_LINGER` 0): the client's read fails.
        Reset,
    }

    /// An app that answers the first `answered` requests of each connection and closes it
    /// after reading the next one, without answering, as an app whose keep-alive time-out
    /// fires as a request arrives does. Counts the requests it read.
    async fn mk_closing_app(answered: usize, close: Close) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut read = 0;
                    while next_request_head(&mut stream, &mut buf).await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        read += 1;
                        if read > answered {
                            if let Close::Reset = close {
                                stream.set_zero_linger().unwrap();
                            }
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, requests)
    }

    #[tokio::test]
    async fn a_request_sent_as_the_app_closed_goes_again_only_if_idempotent_and_without_body() {
        // (method, body, close, sent again)
        let cases = [
            (Method::GET, "", Close::Fin, true),
            (Method::GET, "", Close::Reset, true),
            (Method::HEAD, "", Close::Fin, true),
            (Method::OPTIONS, "", Close::Reset, true),
            (Method::TRACE, "", Close::Fin, true),
            (Method::PUT, "", Close::Fin, true),
            (Method::DELETE, "", Close::Reset, true),
            (Method::POST, "", Close::Fin, false),
            (Method::POST, "", Close::Reset, false),
            (Method::PATCH, "", Close::Fin, false),
            (Method::GET, "{}", Close::Fin, false),
            (Method::PUT, "{\"a\":1}", Close::Reset, false),
            (Method::DELETE, "x", Close::Fin, false),
        ];
        for (method, body, close, again) in cases {
            let case = format!("{method} with {} body, {close:?}", body.len());
            let (addr, requests) = mk_closing_app(1, close).await;
            let counters = UpstreamCounters::default();
            let settings =
                UpstreamSettings { replay_after_idle: Duration::ZERO, ..UpstreamSettings::default() };
            let upstream = Upstream::<Full<Bytes>>::new(settings, counters.clone());
            let mk = |method: &Method, body: &'static str| {
                let mut req = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
                *req.method_mut() = method.clone();
                *req.uri_mut() = http::Uri::from_static("/x");
                req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("app"));
                if !body.is_empty() {
                    req.headers_mut().insert(http::header::CONTENT_LENGTH, body.len().into());
                }
                req
            };
            // A first GET opens the connection; the second request reuses it and meets the close.
            let first = upstream.send(addr, mk(&Method::GET, "")).await.unwrap();
            assert_eq!(first.status(), 200, "{case}");
            first.into_body().collect().await.unwrap();
            let second = upstream.send(addr, mk(&method, body)).await;
            if again {
                let response = second.unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!(response.status(), 200, "{case}");
                // The first connection's two requests, then the one sent again.
                assert_eq!(requests.load(Ordering::SeqCst), 3, "{case}");
                assert_eq!((counters.retries.get(), counters.connections.get()), (1, 2), "{case}");
            } else {
                let err = second.expect_err(&case);
                assert!(!err.is_connect(), "{case}: {err}");
                assert_eq!(requests.load(Ordering::SeqCst), 2, "{case}");
                assert_eq!((counters.retries.get(), counters.connections.get()), (0, 1), "{case}");
            }
        }
    }

    #[tokio::test]
    async fn only_a_connection_idle_for_the_threshold_has_its_request_sent_again() {
        // A connection reused at once is not closed by a keep-alive time-out: no copy is
        // kept and the GET fails; the same after the threshold goes again.
        for (pause, again) in [(Duration::ZERO, false), (Duration::from_millis(150), true)] {
            let (addr, requests) = mk_closing_app(1, Close::Fin).await;
            let settings = UpstreamSettings {
                replay_after_idle: Duration::from_millis(100),
                ..UpstreamSettings::default()
            };
            let (upstream, counters) = mk_upstream(settings);
            body_of(upstream.send(addr, mk_request()).await.unwrap()).await;
            tokio::time::sleep(pause).await;
            let second = upstream.send(addr, mk_request()).await;
            assert_eq!(second.is_ok(), again, "after {pause:?}");
            assert_eq!(requests.load(Ordering::SeqCst), if again { 3 } else { 2 }, "after {pause:?}");
            assert_eq!(counters.retries.get(), u64::from(again), "after {pause:?}");
        }
    }

    #[tokio::test]
    async fn a_failure_on_a_new_connection_is_not_retried() {
        // The app reads every request and closes without answering: that is its answer to a
        // request on a new connection, even an idempotent one.
        for close in [Close::Fin, Close::Reset] {
            let (addr, requests) = mk_closing_app(0, close).await;
            let (upstream, counters) = mk_upstream(UpstreamSettings::default());
            let err = upstream.send(addr, mk_request()).await.unwrap_err();
            assert!(!err.is_connect(), "{close:?}: {err}");
            assert_eq!(requests.load(Ordering::SeqCst), 1, "{close:?}");
            assert_eq!(counters.retries.get(), 0, "{close:?}");
        }
    }

    #[test]
    fn a_copy_for_replay_keeps_the_head() {
        let mut req = mk_request();
        *req.method_mut() = Method::DELETE;
        *req.uri_mut() = http::Uri::from_static("/customers/7?reason=gdpr");
        *req.version_mut() = http::Version::HTTP_10;
        req.headers_mut().append("x-trace", http::HeaderValue::from_static("a"));
        req.headers_mut().append("x-trace", http::HeaderValue::from_static("b"));
        let copy = replayable(&req).unwrap();
        assert_eq!(copy.method(), Method::DELETE);
        assert_eq!(copy.uri(), "/customers/7?reason=gdpr");
        assert_eq!(copy.version(), http::Version::HTTP_10);
        assert_eq!(copy.headers(), req.headers());
        assert!(copy.body().is_end_stream());
        *req.method_mut() = Method::POST;
        assert!(replayable(&req).is_none());
    }
}
