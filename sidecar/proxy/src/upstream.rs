//! The connections of one proxy thread to the app: HTTP/1.1 keep-alive connections on
//! hyper's connection API, at most [`UpstreamSettings::max_connections`] of them.
//!
//! It replaces hyper-util's general-purpose pool, whose per-request cost (a keyed hash map
//! looked up three times, a waiter queue, and a task spawned per response to hand the
//! connection back once it is idle) was about 8% of the sidecar's instructions per request.
//! Here a request holds its connection through [`UpstreamBody`], the app's response body,
//! which puts the connection back in a short list of idle ones when it has been read to its
//! end; a request takes the most recently used idle connection. There is one upstream, so
//! there is nothing to key by but its address, which only changes when a reloaded config
//! names another `appPort`.
//!
//! # At most so many connections
//!
//! A request in flight to the app holds one of `max_connections` slots until its response
//! body ends (or is dropped). With every slot taken, a request waits for one to be free, for
//! at most the connect time-out, and then fails with [`UpstreamError::Saturated`] (the
//! sidecar answers 503). So a burst of thousands of concurrent requests (h2c multiplexes
//! hundreds on one client connection) reaches the app over a bounded number of connections
//! that are reused, rather than one new connection per request in flight, which exhausts an
//! app's connection limit and leaves the host's ports in `TIME_WAIT`.
//!
//! # When the app closes a connection
//!
//! The app may close an idle keep-alive connection at any time. A connection seen closed is
//! dropped from the list, and a request that fails on a reused connection because the app
//! closed it is sent again, once, on a new connection, when that is safe:
//! - a request hyper hands back unsent (the close arrived first), whatever its method;
//! - a request written in the instant the app closed (the connection ends, or is reset,
//!   before any byte of a response), if its method is idempotent (`GET`, `HEAD`, `OPTIONS`,
//!   `TRACE`, `PUT`, `DELETE`; RFC 9110 section 9.2.2), its body, if it has one, is whole in
//!   memory ([`Replay`]: the sidecar reads bodies up to `--request-buffer-bytes` before it
//!   calls the app), and the connection had been idle for at least
//!   [`UpstreamSettings::replay_after_idle`]. The app may have received it, so it may see it
//!   twice, which an idempotent request allows; nginx retries the same requests on its cached
//!   connections (it buffers request bodies too). Others fail with 502.
//!
//!   The idle condition keeps the copy such a retry needs (the request head) off the busy
//!   path: an app's keep-alive time-out closes only a connection that has been idle for that
//!   long, and the sidecar, which stops counting when it sent the last request, has counted
//!   at least as long. A connection reused within the threshold is closed under a request
//!   only when the app stops or fails, when a new connection would fail too.
//!
//! A failure on a new connection is never retried: that is the app's answer.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, TryAcquireError};
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
    /// Every connection allowed was busy with another request for the whole connect
    /// time-out.
    #[error("all {max} connections to the app stayed busy for {timeout:?}")]
    Saturated {
        /// [`UpstreamSettings::max_connections`].
        max: usize,
        /// How long the request waited.
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

    /// No connection was free within the connect time-out.
    pub fn is_saturated(&self) -> bool {
        matches!(self, UpstreamError::Saturated { .. })
    }
}

/// Settings of an [`Upstream`].
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Time allowed to obtain a connection: to wait for a free one when all
    /// [`Self::max_connections`] are busy, and then to open one.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed by [`Upstream::close_idle`].
    pub idle_timeout: Duration,
    /// Connections to the app at most (each carries one request at a time).
    pub max_connections: usize,
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
            max_connections: 1024,
            replay_after_idle: Duration::from_millis(250),
        }
    }
}

/// Counters of an [`Upstream`] (the sidecar registers them as
/// `custos_sidecar_upstream_{connections,retries,waits}_total`).
#[derive(Clone, Debug, Default)]
pub struct UpstreamCounters {
    /// Connections opened to the app.
    pub connections: Counter,
    /// Requests sent again on a new connection because the app had closed the reused one.
    pub retries: Counter,
    /// Requests that found every allowed connection busy and waited for one.
    pub waits: Counter,
}

/// An idle connection in the list.
struct Pooled<B> {
    addr: SocketAddr,
    sender: SendRequest<B>,
    /// When it was last handed a request.
    used: Instant,
}

/// The app connections of one proxy thread, sending request bodies of type `B`.
pub struct Upstream<B> {
    /// Idle connections, least recently used first.
    idle: Mutex<Vec<Pooled<B>>>,
    /// One permit per connection allowed and not carrying a request.
    slots: Semaphore,
    settings: UpstreamSettings,
    counters: UpstreamCounters,
}

/// A request body that can be sent again when the app closes the connection under it.
pub trait Replay: Body + Sized {
    /// A copy to send again: only of a body held whole in memory (or of no body).
    fn replay(&self) -> Option<Self>;
}

impl<B> Upstream<B>
where
    B: Replay + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// No connections yet; they are opened as requests need them.
    pub fn new(settings: UpstreamSettings, counters: UpstreamCounters) -> Self {
        let max = settings.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Upstream {
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(max),
            settings: UpstreamSettings { max_connections: max, ..settings },
            counters,
        }
    }

    /// Sends `req` (origin-form target, `Host` set) to the app at `addr` and waits for the
    /// response head. The connection stays with the response body until it ends.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, UpstreamError> {
        if !self.try_slot() {
            // Boxed: the wait's state stays out of every request's future.
            Box::pin(self.wait_for_slot()).await?;
        }
        let slot = Slot(self);
        let now = Instant::now();
        while let Some(mut idle) = self.pop_idle(addr) {
            // A connection whose response body has just ended may not have taken up the next
            // request yet (its connection task has not run since).
            if !idle.sender.is_ready() && poll_fn(|cx| idle.sender.poll_ready(cx)).await.is_err() {
                continue;
            }
            let replay = if now.duration_since(idle.used) >= self.settings.replay_after_idle {
                replayable(&req)
            } else {
                None
            };
            match idle.sender.try_send_request(req).await {
                Ok(response) => return Ok(slot.lease(addr, idle.sender, now, response)),
                Err(mut e) => match (e.take_message(), replay) {
                    // Not sent: the app closed the connection first. Once more, on a new one.
                    (Some(unsent), _) => req = unsent,
                    // Sent as the app closed: again if it may be.
                    (None, Some(copy)) if closed_by_app(e.error()) => req = copy,
                    (None, _) => return Err(UpstreamError::Http(e.into_error())),
                },
            }
            self.counters.retries.inc();
            break;
        }
        let mut sender = self.connect(addr).await?;
        let response = sender.send_request(req).await?;
        Ok(slot.lease(addr, sender, now, response))
    }

    /// Takes one of the slots if one is free. The caller gives it back ([`Slot`]).
    fn try_slot(&self) -> bool {
        match self.slots.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => false,
        }
    }

    /// Waits for a slot for at most the connect time-out.
    async fn wait_for_slot(&self) -> Result<(), UpstreamError> {
        self.counters.waits.inc();
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(())
            }
            _ => Err(UpstreamError::Saturated { max: self.settings.max_connections, timeout }),
        }
    }

    /// The most recently used idle connection to `addr` that is still open; drops closed
    /// connections and those to another address on the way.
    fn pop_idle(&self, addr: SocketAddr) -> Option<Pooled<B>> {
        let mut idle = self.lock();
        loop {
            let p = idle.pop()?;
            if p.addr == addr && !p.sender.is_closed() {
                return Some(p);
            }
        }
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

impl<B> Upstream<B> {
    /// Returns a connection whose response has ended to the list.
    fn put_idle(&self, p: Pooled<B>) {
        if p.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= self.settings.max_connections {
            idle.remove(0);
        }
        idle.push(p);
    }

    /// Closes the connections idle for longer than the idle time-out, and those closed by
    /// the app. Run periodically by each proxy thread.
    pub fn close_idle(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.lock().retain(|p| !p.sender.is_closed() && now.duration_since(p.used) < timeout);
    }

    /// Idle connections in the list.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pooled<B>>> {
        // A panic while holding the lock leaves a valid list.
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A slot taken by a request that has no response yet: given back on drop (the request
/// failed) or turned into the [`Lease`] its response body holds.
struct Slot<'a, B>(&'a Arc<Upstream<B>>);

impl<B> Slot<'_, B> {
    fn lease(
        self,
        addr: SocketAddr,
        sender: SendRequest<B>,
        used: Instant,
        response: Response<Incoming>,
    ) -> Response<UpstreamBody<B>> {
        // The slot passes to the lease, which gives it back.
        let lease = Lease { upstream: self.0.clone(), conn: Some(Pooled { addr, sender, used }) };
        std::mem::forget(self);
        response.map(|body| UpstreamBody { body, lease: Some(lease) })
    }
}

impl<B> Drop for Slot<'_, B> {
    fn drop(&mut self) {
        self.0.slots.add_permits(1);
    }
}

/// The slot and connection of a request whose response body is being read; the connection
/// is taken out when it goes back to the idle list, the slot is given back on drop.
struct Lease<B> {
    upstream: Arc<Upstream<B>>,
    conn: Option<Pooled<B>>,
}

impl<B> Drop for Lease<B> {
    fn drop(&mut self) {
        self.upstream.slots.add_permits(1);
    }
}

/// The app's response body. When it has been read to its end, its connection goes back to
/// the idle list for the next request; dropped or failed before its end, the connection is
/// closed (a response half read cannot be followed by another on it). Either way its slot is
/// free again.
pub struct UpstreamBody<B> {
    body: Incoming,
    lease: Option<Lease<B>>,
}

impl<B> std::fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("body", &self.body)
            .field("leased", &self.lease.is_some())
            .finish()
    }
}

impl<B> UpstreamBody<B> {
    /// The body has ended: the connection is idle again.
    fn release(&mut self) {
        if let Some(mut lease) = self.lease.take()
            && let Some(conn) = lease.conn.take()
        {
            lease.upstream.put_idle(conn);
        }
    }
}

impl<B> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for UpstreamBody<B> {
    fn drop(&mut self) {
        // An empty body (a HEAD response, 204, 304) may be dropped unread.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// A copy of `req` to send again if the app closes the connection under it: only for an
/// idempotent method whose body, if any, is whole in memory.
fn replayable<B: Replay>(req: &Request<B>) -> Option<Request<B>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent {
        return None;
    }
    let mut copy = Request::new(req.body().replay()?);
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
    use crate::request_body::RequestBody;

    /// An app speaking raw HTTP/1.1: answers each request on a connection with `200 OK` and
    /// the body `#<n>`, `n` the connection's request count, then closes the connection after
    /// `per_connection` requests (`usize::MAX`: never). Each body's `#` is sent with the head
    /// and the rest only once `gate` is open, so that until then the response is in flight.
    /// Counts the connections it accepted.
    async fn mk_gated_app(
        per_connection: usize,
        gate: watch::Receiver<bool>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        mk_counting_app(move |mut stream| {
            let mut gate = gate.clone();
            async move {
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
            }
        })
        .await
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

    /// How a test request's body is held: whole in memory, or (as far as [`Replay`] is
    /// concerned) still arriving from the client.
    #[derive(Clone, Copy, Debug)]
    enum Held {
        Whole,
        Arriving,
    }

    struct TestBody(Full<Bytes>, Held);

    impl Body for TestBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            Pin::new(&mut self.get_mut().0).poll_frame(cx)
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_end_stream()
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            self.0.size_hint()
        }
    }

    impl Replay for TestBody {
        fn replay(&self) -> Option<Self> {
            matches!(self.1, Held::Whole).then(|| TestBody(self.0.clone(), self.1))
        }
    }

    fn mk_request() -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::default());
        *req.uri_mut() = http::Uri::from_static("/x");
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("app"));
        req
    }

    fn mk_upstream(settings: UpstreamSettings) -> (Arc<Upstream<RequestBody>>, UpstreamCounters) {
        let counters = UpstreamCounters::default();
        (Arc::new(Upstream::new(settings, counters.clone())), counters)
    }

    async fn body_of<B>(response: Response<UpstreamBody<B>>) -> String {
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
        assert_eq!(upstream.idle(), 1);
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
        assert_eq!(upstream.idle(), 1);
        assert_eq!((old_accepted.load(Ordering::SeqCst), new_accepted.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(body_of(upstream.send(new, mk_request()).await.unwrap()).await, "#2");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, accepted) = mk_app(usize::MAX).await;
        let settings =
            UpstreamSettings { idle_timeout: Duration::from_millis(50), ..UpstreamSettings::default() };
        let (upstream, _) = mk_upstream(settings);
        let (a, b) = (
            upstream.send(addr, mk_request()).await.unwrap(),
            upstream.send(addr, mk_request()).await.unwrap(),
        );
        assert_eq!((body_of(a).await, body_of(b).await), ("#1".into(), "#1".into()));
        upstream.close_idle();
        assert_eq!(upstream.idle(), 2, "not idle for long enough yet");
        tokio::time::sleep(Duration::from_millis(80)).await;
        upstream.close_idle();
        assert_eq!(upstream.idle(), 0);
        assert_eq!(body_of(upstream.send(addr, mk_request()).await.unwrap()).await, "#1");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn no_more_than_the_maximum_connections_carry_requests_and_the_rest_wait() {
        let (open, gate) = watch::channel(false);
        let (addr, accepted) = mk_gated_app(usize::MAX, gate).await;
        let settings = UpstreamSettings { max_connections: 2, ..UpstreamSettings::default() };
        let (upstream, counters) = mk_upstream(settings);
        // Six requests at once; the app holds every response body until the gate opens.
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let upstream = upstream.clone();
                tokio::spawn(async move { body_of(upstream.send(addr, mk_request()).await.unwrap()).await })
            })
            .collect();
        // Two connections carry the first two; the other four wait.
        let settled = async {
            while counters.waits.get() < 4 || accepted.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), settled).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((accepted.load(Ordering::SeqCst), counters.waits.get()), (2, 4));
        open.send_replace(true);
        let mut bodies = Vec::new();
        for t in tasks {
            bodies.push(t.await.unwrap());
        }
        // Every request was answered, on one of the two connections: each has a first.
        assert_eq!(bodies.len(), 6);
        assert_eq!(bodies.iter().filter(|b| *b == "#1").count(), 2, "{bodies:?}");
        assert_eq!((accepted.load(Ordering::SeqCst), counters.connections.get()), (2, 2));
        assert_eq!((counters.waits.get(), upstream.idle()), (4, 2));
    }

    #[tokio::test]
    async fn a_request_waits_for_a_free_connection_no_longer_than_the_connect_timeout() {
        let (_open, gate) = watch::channel(false);
        let (addr, accepted) = mk_gated_app(usize::MAX, gate).await;
        let settings = UpstreamSettings {
            max_connections: 1,
            connect_timeout: Duration::from_millis(100),
            ..UpstreamSettings::default()
        };
        let (upstream, counters) = mk_upstream(settings);
        let in_flight = upstream.send(addr, mk_request()).await.unwrap();
        let err = upstream.send(addr, mk_request()).await.unwrap_err();
        assert!(err.is_saturated() && !err.is_connect(), "{err}");
        assert_eq!(err.to_string(), "all 1 connections to the app stayed busy for 100ms");
        assert_eq!((accepted.load(Ordering::SeqCst), counters.waits.get()), (1, 1));
        drop(in_flight);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_frees_its_slot_and_its_connection_is_not_reused() {
        let (open, gate) = watch::channel(false);
        let (addr, accepted) = mk_gated_app(usize::MAX, gate).await;
        let settings = UpstreamSettings { max_connections: 1, ..UpstreamSettings::default() };
        let (upstream, counters) = mk_upstream(settings);
        // Half read: the rest of its body would come before any next response.
        drop(upstream.send(addr, mk_request()).await.unwrap());
        assert_eq!(upstream.idle(), 0);
        open.send_replace(true);
        assert_eq!(body_of(upstream.send(addr, mk_request()).await.unwrap()).await, "#1");
        assert_eq!((accepted.load(Ordering::SeqCst), counters.waits.get()), (2, 0));
    }

    /// What a request of [`the_bound_holds_whatever_requests_do_with_their_bodies`] does
    /// with its response body.
    #[derive(Clone, Copy, Debug)]
    enum Reader {
        /// Reads it to its end.
        Whole,
        /// Drops it unread.
        Drop,
        /// Reads the first frame, then drops it.
        FirstFrame,
    }

    fn reader() -> impl proptest::strategy::Strategy<Value = Reader> {
        use proptest::prelude::*;
        prop_oneof![3 => Just(Reader::Whole), 1 => Just(Reader::Drop), 1 => Just(Reader::FirstFrame)]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Any mix of requests at once, reading their bodies whole, partly or not at all:
        /// every request is answered; connections are opened only for the bound or to replace
        /// one closed under a body left unfinished; whole bodies arrive intact; and at the end
        /// every slot is free again.
        #[test]
        fn the_bound_holds_whatever_requests_do_with_their_bodies(
            max in 1usize..4,
            readers in proptest::collection::vec(reader(), 1..12),
            chunk in 1usize..3000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (addr, accepted) = mk_sized_app(chunk).await;
                let settings = UpstreamSettings { max_connections: max, ..UpstreamSettings::default() };
                let (upstream, counters) = mk_upstream(settings);
                let tasks: Vec<_> = readers
                    .iter()
                    .map(|&reader| {
                        let upstream = upstream.clone();
                        tokio::spawn(async move {
                            let response = upstream.send(addr, mk_request()).await.unwrap();
                            match reader {
                                Reader::Whole => {
                                    let body = response.into_body().collect().await.unwrap().to_bytes();
                                    assert_eq!(body.len(), 4 * chunk, "{reader:?}");
                                    assert!(body.iter().all(|b| *b == b'x'), "{reader:?}");
                                }
                                Reader::Drop => drop(response),
                                Reader::FirstFrame => {
                                    let mut body = response.into_body();
                                    body.frame().await.unwrap().unwrap();
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                let unfinished = readers.iter().filter(|r| !matches!(r, Reader::Whole)).count();
                let opened = counters.connections.get() as usize;
                assert!(opened <= max + unfinished, "{opened} opened, max {max}, {unfinished} unfinished");
                assert_eq!(accepted.load(Ordering::SeqCst), opened);
                assert!(upstream.idle() <= max);
                // Every slot is free: `max` requests at once need no wait.
                let all: Vec<_> = (0..max).map(|_| upstream.try_slot()).collect();
                assert!(all.iter().all(|taken| *taken), "slots left taken: {all:?}");
            });
        }
    }

    /// An app on 127.0.0.1 that counts the connections it accepts and serves each with
    /// `serve`.
    async fn mk_counting_app<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, accepted)
    }

    /// An app answering every request with 200 and a body of `4 * chunk` bytes `x`, written in
    /// four pieces, counting its connections.
    async fn mk_sized_app(chunk: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        mk_counting_app(move |mut stream| async move {
            let mut buf = Vec::new();
            let piece = vec![b'x'; chunk];
            while next_request_head(&mut stream, &mut buf).await {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 4 * chunk);
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..4 {
                    if stream.write_all(&piece).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }
        })
        .await
    }

    /// An app answering every request with `response` (a whole HTTP/1.1 response), counting
    /// its connections.
    async fn mk_fixed_app(response: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
        mk_counting_app(move |mut stream| async move {
            let mut buf = Vec::new();
            while next_request_head(&mut stream, &mut buf).await {
                if stream.write_all(response).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn an_empty_body_dropped_unread_gives_its_connection_back() {
        // 204 and an empty content-length body: nothing to read, so a proxy may drop them
        // unread (hyper does for a HEAD response).
        for response in
            [&b"HTTP/1.1 204 No Content\r\n\r\n"[..], b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]
        {
            let (addr, accepted) = mk_fixed_app(response).await;
            let settings = UpstreamSettings { max_connections: 1, ..UpstreamSettings::default() };
            let (upstream, counters) = mk_upstream(settings);
            for _ in 0..10 {
                let response = upstream.send(addr, mk_request()).await.unwrap();
                assert!(response.body().is_end_stream());
                drop(response);
            }
            assert_eq!((accepted.load(Ordering::SeqCst), counters.waits.get()), (1, 0));
        }
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
    async fn a_request_sent_as_the_app_closed_goes_again_only_if_idempotent_with_its_body_in_memory() {
        use Held::{Arriving, Whole};
        // (method, body, how it is held, close, sent again)
        let cases = [
            (Method::GET, "", Whole, Close::Fin, true),
            (Method::GET, "", Whole, Close::Reset, true),
            (Method::HEAD, "", Whole, Close::Fin, true),
            (Method::OPTIONS, "", Whole, Close::Reset, true),
            (Method::TRACE, "", Whole, Close::Fin, true),
            (Method::PUT, "", Whole, Close::Fin, true),
            (Method::DELETE, "", Whole, Close::Reset, true),
            (Method::POST, "", Whole, Close::Fin, false),
            (Method::POST, "", Whole, Close::Reset, false),
            (Method::PATCH, "", Whole, Close::Fin, false),
            (Method::GET, "{}", Whole, Close::Fin, true),
            (Method::PUT, "{\"a\":1}", Whole, Close::Reset, true),
            (Method::DELETE, "x", Whole, Close::Fin, true),
            (Method::POST, "{\"a\":1}", Whole, Close::Fin, false),
            (Method::GET, "{}", Arriving, Close::Fin, false),
            (Method::PUT, "{\"a\":1}", Arriving, Close::Reset, false),
            (Method::DELETE, "x", Arriving, Close::Fin, false),
        ];
        for (method, body, held, close, again) in cases {
            let case = format!("{method} with {} body {held:?}, {close:?}", body.len());
            let (addr, requests) = mk_closing_app(1, close).await;
            let counters = UpstreamCounters::default();
            let settings =
                UpstreamSettings { replay_after_idle: Duration::ZERO, ..UpstreamSettings::default() };
            let upstream = Arc::new(Upstream::<TestBody>::new(settings, counters.clone()));
            let mk = |method: &Method, body: &'static str| {
                let mut req = Request::new(TestBody(Full::new(Bytes::from_static(body.as_bytes())), held));
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
