//! The request body on its way to the app: read into memory first when it is small, so that
//! a client sending it slowly holds none of the app's connections, then forwarded within the
//! request body limit.
//!
//! A request with a body is read into a buffer of at most
//! [`ProxyLimits::request_buffer_bytes`] before a connection to the app is taken. A body that
//! fits is sent whole with a `Content-Length` (a chunked one too), without `Expect` (the
//! sidecar has answered `100-continue` itself). A body declared larger is forwarded as it
//! arrives from the start; one of unknown length (chunked, HTTP/2) that outgrows the buffer
//! is sent as the buffered part followed by the rest as it arrives.
//!
//! What all requests hold in such buffers is bounded by
//! [`ProxyLimits::request_buffer_total_bytes`]: past it, bodies are forwarded as they arrive
//! (counted in `custos_sidecar_request_buffer_exhausted_total`), as if the buffer were off;
//! never a refusal. The buffered part's memory is given back once hyper has written it to
//! the app.
//!
//! A client that pauses longer than [`ProxyLimits::request_body_timeout`] while its body is
//! buffered gets 408 and the app never sees the request. Once the body is forwarded as it
//! arrives, the upstream time-out counts from its last bytes (see
//! [`BodyProgress::later_deadline`]), so an upload that keeps moving is never cut off however
//! long it takes; when it expires while the sidecar waits for the client's next bytes, the
//! answer is 408 too, rather than the app's 504.
//!
//! A pause limit alone lets a client keep a request going for ever by sending a byte just
//! before each time-out. So a body must also keep arriving at an average rate,
//! [`ProxyLimits::request_body_min_rate`] (see [`MinRate`]): once the body time-out has passed
//! since the body started, each byte earns its sender `1 / rate` seconds more, and a client
//! that falls behind gets 408 `request_body_too_slow`, as Apache's `mod_reqtimeout` does
//! with `MinRate`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::body::{buffered_then, concat};
use crate::budget::{BufferBudget, Reservation};
use crate::method_override::{OverrideScan, Scanned};
use crate::settings::ProxyLimits;
use crate::upstream::Replay;

/// How the forwarding of one request body went, read during and after the exchange with the
/// app.
#[derive(Debug)]
pub(crate) struct BodyProgress {
    /// More than the request body limit arrived.
    exceeded: AtomicBool,
    /// The app's side waits for the client's next bytes.
    waiting: AtomicBool,
    /// When the body was read or created.
    since: Instant,
    /// When bytes of the body last went on to the app, or it ended, in microseconds after
    /// `since`.
    moved_micros: AtomicU64,
    /// Bytes of the body received from the client so far.
    received: AtomicU64,
    /// The average rate the body must keep up; none when the limit is off.
    min_rate: Option<MinRate>,
    /// What the check of the body on its way found when it stopped the body
    /// ([`RequestBody::check_on_the_way`]).
    stopped_by_scan: std::sync::OnceLock<Scanned>,
}

/// The average rate at which a request body must arrive once `grace` has passed since it
/// started: each byte received earns `1 / bytes_per_second` seconds more (the
/// [`ProxyLimits::request_body_min_rate`] limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MinRate {
    /// Time every body has before the rate counts (the request body time-out).
    grace: Duration,
    /// Bytes per second, never 0.
    bytes_per_second: u64,
}

impl MinRate {
    /// The limits' minimum rate; none when it is off (0).
    pub(crate) fn of(limits: &ProxyLimits) -> Option<MinRate> {
        (limits.request_body_min_rate > 0).then_some(MinRate {
            grace: limits.request_body_timeout,
            bytes_per_second: limits.request_body_min_rate,
        })
    }

    /// The time by which a body that started at `since` and has brought `received` bytes
    /// must bring more; none when that is beyond any clock (no limit in practice).
    fn allowance(&self, since: Instant, received: u64) -> Option<Instant> {
        let nanos = u128::from(received) * 1_000_000_000 / u128::from(self.bytes_per_second);
        let earned = Duration::from_nanos(u64::try_from(nanos).ok()?);
        since.checked_add(self.grace)?.checked_add(earned)
    }
}

impl BodyProgress {
    fn new(min_rate: Option<MinRate>) -> Arc<Self> {
        Arc::new(BodyProgress {
            exceeded: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            since: Instant::now(),
            moved_micros: AtomicU64::new(0),
            received: AtomicU64::new(0),
            min_rate,
            stopped_by_scan: std::sync::OnceLock::new(),
        })
    }

    /// Why the check of the body on its way stopped it: [`Scanned::NamesAMethod`] or
    /// [`Scanned::Unreadable`]; none when it did not.
    pub(crate) fn stopped_by_scan(&self) -> Option<Scanned> {
        self.stopped_by_scan.get().copied()
    }

    /// Records `len` more bytes received from the client.
    fn arrived(&self, len: u64) {
        self.received.fetch_add(len, Ordering::Relaxed);
    }

    /// The time by which the client must send more to keep up the minimum rate; none when
    /// the limit is off.
    fn allowance(&self) -> Option<Instant> {
        self.min_rate?.allowance(self.since, self.received.load(Ordering::Relaxed))
    }

    /// Records that bytes of the body went on to the app, or that it ended.
    fn moved(&self) {
        let micros = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.moved_micros.store(micros, Ordering::Relaxed);
    }

    /// The upstream time-out `timeout` counts from the body's last bytes, not from the
    /// request: when it has expired at `deadline`, returns the later deadline the body's
    /// progress has earned since (its last bytes plus `timeout`), or `None` when the
    /// exchange has really timed out. A body in memory moved when it was read, before the
    /// first deadline was set, so it never earns one. While the sidecar waits for the
    /// client, the deadline is also no later than the minimum rate allows (see
    /// [`Self::too_slow`]); a slow app is not the client's fault.
    pub(crate) fn later_deadline(&self, deadline: Instant, timeout: Duration) -> Option<Instant> {
        let moved = self.since + Duration::from_micros(self.moved_micros.load(Ordering::Relaxed));
        let mut later = moved + timeout;
        if let Some(allowance) = self.allowance().filter(|_| self.waiting_for_client()) {
            later = later.min(allowance);
        }
        Some(later).filter(|&later| later > deadline)
    }

    /// The sidecar is waiting for a client that has fallen behind the minimum rate (408
    /// `request_body_too_slow` rather than `request_body_timeout`).
    pub(crate) fn too_slow(&self) -> bool {
        self.waiting_for_client() && self.allowance().is_some_and(|a| a <= Instant::now())
    }

    /// The body went over the request body limit (413).
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// The sidecar was waiting for the client's next bytes (a time-out now is the client's).
    pub(crate) fn waiting_for_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// The request body forwarded to the app: what was buffered, then the rest of the client's
/// body (cut off at the request body limit).
///
/// The client's trailer fields are never forwarded, whether the body goes whole (they are
/// dropped as it is read, see [`read_request_body`]) or as it arrives (dropped here, in
/// [`Body::poll_frame`]): a server that merges trailer fields into the headers (Tomcat with
/// `allowedTrailerHeaders`) would read an `X-HTTP-Method-Override` sent as a trailer, after
/// the sidecar checked the headers, and run e.g. a DELETE the policy decided as a POST. A
/// streamed upload's trailer fields (checksums, rarely sent) are lost, as those of a body
/// read whole always were.
pub(crate) struct RequestBody {
    /// Read before the app was called; sent first. Boxed: most requests have no body, and
    /// this type is moved with each request.
    held: Option<Box<Held>>,
    /// The rest, as the client sends it.
    rest: Option<Incoming>,
    /// Bytes `rest` may still bring within the limit.
    remaining: u64,
    /// Shared with the request path; none without a body, which can neither exceed the
    /// limit nor keep anyone waiting (and saves a request without one the allocation).
    progress: Option<Arc<BodyProgress>>,
    /// The `_method` check each piece passes before it goes on, when the body is too large
    /// to be checked whole ([`RequestBody::check_on_the_way`]).
    scan: Option<Box<OverrideScan>>,
}

/// The check of a body on its way stopped it ([`RequestBody::check_on_the_way`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body names another method, or cannot be read for one")]
pub(crate) struct StoppedByScan;

/// What was read before the app was called.
struct Held {
    /// Not yet handed to hyper.
    bytes: Option<Bytes>,
    /// The budget `bytes` hold: given back when the app's side asks for the next frame
    /// (hyper has then written them out) or when the body is dropped.
    _reservation: Option<Reservation>,
    /// Whether reading stopped short because the buffer budget had no room (not because the
    /// body outgrew the request buffer).
    no_room: bool,
}

/// The request body was larger than the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the limit")]
pub(crate) struct RequestBodyTooLarge;

/// No body.
impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::none()
    }
}

impl RequestBody {
    /// Whether the body was not read whole only because the buffer budget had no room then
    /// (it would have fitted the request buffer): a retry may find room.
    pub(crate) fn spilled_for_room(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.no_room)
    }

    /// No body.
    fn none() -> Self {
        RequestBody { held: None, rest: None, remaining: 0, progress: None, scan: None }
    }

    /// The client's body, streamed as it arrives, cut off past `limit` bytes.
    fn stream(body: Incoming, limit: u64, progress: Arc<BodyProgress>) -> Self {
        RequestBody { held: None, rest: Some(body), remaining: limit, progress: Some(progress), scan: None }
    }

    /// The bytes read before the app was called and not yet handed to hyper.
    fn buffered(&self) -> Option<&Bytes> {
        self.held.as_ref().and_then(|h| h.bytes.as_ref())
    }

    /// The whole body, when it was read into memory before the app is called.
    pub(crate) fn whole(&self) -> Option<&Bytes> {
        if self.is_complete() { self.buffered() } else { None }
    }

    /// How this body's forwarding goes (read after the exchange); none without a body.
    pub(crate) fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.progress.clone()
    }

    /// Checks the body for a `_method` field piece by piece as it goes on to the app, each
    /// piece before it goes and the last before the app has it all: on one (or on a body the
    /// scan cannot read) the body stops there, the exchange fails, and
    /// [`BodyProgress::stopped_by_scan`] says why. For a body not read whole.
    pub(crate) fn check_on_the_way(&mut self, scan: OverrideScan) {
        self.scan = Some(Box::new(scan));
    }

    /// Passes `piece` (the last when `at_end`) through the check on the way, if any: false
    /// when the body must stop (the reason recorded).
    fn passes(&mut self, piece: &[u8], at_end: bool) -> bool {
        let Some(scan) = self.scan.as_mut() else { return true };
        let found = scan.feed(piece, at_end);
        if found == Scanned::Clean {
            return true;
        }
        if let Some(progress) = &self.progress {
            let _ = progress.stopped_by_scan.set(found);
        }
        self.rest = None;
        self.held = None;
        false
    }

    /// True when the whole body is in memory (or there is none): nothing is left to wait
    /// for from the client.
    pub(crate) fn is_complete(&self) -> bool {
        self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(held) = &mut this.held {
            if let Some(bytes) = held.bytes.take() {
                let at_end = this.rest.as_ref().is_none_or(Body::is_end_stream);
                if !this.passes(&bytes, at_end) {
                    return Poll::Ready(Some(Err(Box::new(StoppedByScan))));
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            this.held = None;
        }
        let Some(body) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let mut polled = Pin::new(&mut *body).poll_frame(cx);
        // The client's trailer fields are dropped (see the type's documentation); the body
        // ends after them.
        while matches!(&polled, Poll::Ready(Some(Ok(frame))) if !frame.is_data()) {
            polled = Pin::new(&mut *body).poll_frame(cx);
        }
        if let Some(progress) = &this.progress {
            progress.waiting.store(polled.is_pending(), Ordering::Relaxed);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if let Some(progress) = &this.progress {
                        progress.arrived(len);
                    }
                    if len > this.remaining {
                        if let Some(progress) = &this.progress {
                            progress.exceeded.store(true, Ordering::Relaxed);
                        }
                        this.rest = None;
                        return Poll::Ready(Some(Err(Box::new(RequestBodyTooLarge))));
                    }
                    this.remaining -= len;
                    // The last piece is checked before it goes: the app must not have the
                    // whole of a body that names another method.
                    let at_end = body.is_end_stream();
                    if !this.passes(data, at_end) {
                        return Poll::Ready(Some(Err(Box::new(StoppedByScan))));
                    }
                }
                if let Some(progress) = &this.progress {
                    progress.moved();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                if !this.passes(&[], true) {
                    return Poll::Ready(Some(Err(Box::new(StoppedByScan))));
                }
                if let Some(progress) = &this.progress {
                    progress.moved();
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered().is_none() && self.is_complete()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered().map_or(0, |b| b.len() as u64);
        buffered_then(buffered, self.rest.as_ref().map(Body::size_hint))
    }
}

/// A body held whole in memory (or none) goes again as it is; one still arriving cannot.
impl Replay for RequestBody {
    fn replay(&self) -> Option<Self> {
        if !self.is_complete() {
            return None;
        }
        let held = self
            .buffered()
            .map(|b| Box::new(Held { bytes: Some(b.clone()), _reservation: None, no_room: false }));
        Some(RequestBody { held, ..RequestBody::default() })
    }
}

/// Why a request body could not be read before forwarding.
#[derive(Debug)]
pub(crate) enum BufferError {
    /// More than the request body limit (413).
    TooLarge,
    /// The client paused longer than the request body time-out (408).
    TimedOut,
    /// The client fell behind the minimum rate (408).
    TooSlow,
    /// The client's connection failed or sent a malformed body (400).
    Client(hyper::Error),
}

/// Reads `body` into memory up to the request buffer size (see the module docs) and returns
/// what to forward; a request without a body is returned at once.
pub(crate) async fn read_request_body(
    mut body: Incoming,
    declared_length: Option<u64>,
    limits: &ProxyLimits,
    budget: &Arc<BufferBudget>,
) -> Result<RequestBody, BufferError> {
    if body.is_end_stream() {
        // No body (a GET): nothing to forward or wait for.
        return Ok(RequestBody::none());
    }
    let progress = BodyProgress::new(MinRate::of(limits));
    let capacity = limits.request_buffer_bytes;
    if capacity == 0 || declared_length.is_some_and(|len| len > capacity) {
        return Ok(RequestBody::stream(body, limits.max_request_body_bytes, progress));
    }
    let mut reservation = Reservation::on(budget);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut total: u64 = 0;
    let (mut spilled, mut no_room) = (false, false);
    while !body.is_end_stream() {
        // Wait for the next bytes no longer than a pause may last, nor past what the
        // minimum rate allows.
        let pause_ends = Instant::now() + limits.request_body_timeout;
        let falls_behind = progress.allowance().filter(|&a| a < pause_ends);
        let frame = match tokio::time::timeout_at(
            falls_behind.unwrap_or(pause_ends),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        {
            Err(_) if falls_behind.is_some() => return Err(BufferError::TooSlow),
            Err(_) => return Err(BufferError::TimedOut),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BufferError::Client(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers of a body sent whole are dropped, as nginx does.
        let Ok(data) = frame.into_data() else { continue };
        let len = data.len() as u64;
        progress.arrived(len);
        total = total.saturating_add(len);
        if total > limits.max_request_body_bytes {
            return Err(BufferError::TooLarge);
        }
        let fits = reservation.grow(len);
        chunks.push_back(data);
        if !fits {
            (spilled, no_room) = (true, true);
            break;
        }
        if total > capacity {
            spilled = true;
            break;
        }
    }
    let bytes = Some(concat(chunks, total)).filter(|b| !b.is_empty());
    let rest = (spilled && !body.is_end_stream()).then_some(body);
    Ok(RequestBody {
        held: Some(Box::new(Held { bytes, _reservation: Some(reservation), no_room })),
        rest,
        remaining: limits.max_request_body_bytes - total,
        progress: Some(progress),
        scan: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn budget(total: u64) -> Arc<BufferBudget> {
        use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
        BufferBudget::new(total, Gauge::default(), Counter::default())
    }

    /// The upstream time-out counts from the body's last bytes: each move earns a deadline
    /// one time-out after it, and a body that stops moving (the client stalls, or the app
    /// stops reading) earns none.
    #[tokio::test(start_paused = true)]
    async fn the_upstream_time_out_counts_from_the_last_bytes() {
        let timeout = Duration::from_secs(30);
        let progress = BodyProgress::new(None);
        let start = Instant::now();
        assert_eq!(progress.later_deadline(start + timeout, timeout), None, "nothing moved");
        tokio::time::advance(Duration::from_secs(10)).await;
        progress.moved();
        assert_eq!(progress.later_deadline(start + timeout, timeout), Some(start + Duration::from_secs(40)));
        tokio::time::advance(Duration::from_secs(35)).await;
        progress.moved();
        let later = start + Duration::from_secs(75);
        assert_eq!(progress.later_deadline(start + Duration::from_secs(40), timeout), Some(later));
        assert_eq!(progress.later_deadline(later, timeout), None, "stopped moving");
    }

    /// Each byte earns `1 / rate` seconds after the grace; the cap applies only while the
    /// sidecar waits for the client, and a client behind it is too slow.
    #[tokio::test(start_paused = true)]
    async fn a_body_must_keep_up_the_minimum_rate_after_its_grace() {
        let rate = MinRate { grace: Duration::from_secs(30), bytes_per_second: 500 };
        let start = Instant::now();
        assert_eq!(rate.allowance(start, 0), Some(start + Duration::from_secs(30)));
        assert_eq!(rate.allowance(start, 250), Some(start + Duration::from_millis(30_500)));
        assert_eq!(rate.allowance(start, 1_000_000), Some(start + Duration::from_secs(2_030)));
        assert_eq!(rate.allowance(start, u64::MAX), None, "beyond any clock: no limit");
        let limits = ProxyLimits { request_body_min_rate: 0, ..ProxyLimits::default() };
        assert_eq!(MinRate::of(&limits), None, "0 turns it off");

        // A trickler: one byte every 20 s keeps each pause under the 30 s time-out.
        let timeout = Duration::from_secs(30);
        let progress = BodyProgress::new(Some(rate));
        progress.waiting.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(20)).await;
            progress.arrived(1);
            progress.moved();
        }
        // At 60 s the pause allows 90 s, but 3 bytes earned only 30.006 s.
        assert!(progress.too_slow());
        let earned = start + Duration::from_millis(30_006);
        assert_eq!(progress.later_deadline(start + timeout, timeout), Some(earned));
        assert_eq!(progress.later_deadline(earned, timeout), None, "nothing more earned: cut off");
        // The same body while the app is the one not reading: the pause rule alone.
        progress.waiting.store(false, Ordering::Relaxed);
        assert!(!progress.too_slow());
        assert_eq!(progress.later_deadline(start + timeout, timeout), Some(start + Duration::from_secs(90)));
        // A client keeping up: 20 kB in 60 s earns 30 + 40 s.
        progress.waiting.store(true, Ordering::Relaxed);
        progress.arrived(20_000);
        assert!(!progress.too_slow());
        assert_eq!(
            progress.later_deadline(start + timeout, timeout),
            Some(start + Duration::from_millis(70_006))
        );
    }

    #[test]
    fn a_default_body_is_empty_and_complete() {
        let body = RequestBody::default();
        assert!(body.is_end_stream());
        assert!(body.is_complete());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.replay().unwrap().is_end_stream());
    }

    #[tokio::test]
    async fn a_body_in_memory_goes_again_whole_and_holds_no_budget_twice() {
        use http_body_util::BodyExt;
        let b = budget(100);
        let mut reservation = Reservation::on(&b);
        assert!(reservation.grow(5));
        let held = Held {
            bytes: Some(Bytes::from_static(b"hello")),
            _reservation: Some(reservation),
            no_room: false,
        };
        let body = RequestBody { held: Some(Box::new(held)), ..RequestBody::default() };
        let copy = body.replay().unwrap();
        assert_eq!(copy.size_hint().exact(), Some(5));
        assert_eq!(b.in_use(), 5, "the copy takes nothing more");
        drop(body);
        assert_eq!(b.in_use(), 0);
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
    }

    /// Fix: the client's trailer fields never reach the app, whether its body is read whole,
    /// forwarded as it arrives from the start, or forwarded after a buffered part (a trailer
    /// `X-HTTP-Method-Override` would be one more header to an app that merges them).
    #[tokio::test]
    async fn request_trailer_fields_are_never_forwarded() {
        use http_body_util::BodyExt;
        // Buffer size, declared length: read whole; streamed from the start (no buffer, or a
        // length declared over it); buffered, then streamed.
        for (buffer, declared) in [(1024, None), (0, None), (4, Some(11)), (4, None)] {
            let limits = ProxyLimits { request_buffer_bytes: buffer, ..ProxyLimits::default() };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let tx = std::sync::Mutex::new(Some(tx));
            let (client, server) = tokio::io::duplex(4096);
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let tx = tx.lock().unwrap().take();
                let limits = limits.clone();
                async move {
                    let body = read_request_body(req.into_body(), declared, &limits, &budget(1 << 20))
                        .await
                        .unwrap();
                    let whole = body.is_complete();
                    let collected = body.collect().await.unwrap();
                    let trailers = collected.trailers().cloned();
                    tx.unwrap().send((whole, collected.to_bytes(), trailers)).unwrap();
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Empty::<Bytes>::new(),
                    ))
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service);
            let connection = tokio::spawn(connection);
            let mut client = client;
            tokio::io::AsyncWriteExt::write_all(
                &mut client,
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-HTTP-Method-Override\r\n\r\n\
                  5\r\nhello\r\n6\r\n world\r\n0\r\nX-HTTP-Method-Override: DELETE\r\n\r\n",
            )
            .await
            .unwrap();
            let (whole, bytes, trailers) = rx.await.unwrap();
            assert_eq!(whole, buffer == 1024, "buffer {buffer}");
            assert_eq!((bytes, trailers), (Bytes::from_static(b"hello world"), None), "buffer {buffer}");
            drop(client);
            let _ = connection.await;
        }
    }
}
