//! h2c streams a client stalls by granting them no flow-control window.
//!
//! [`crate::send_timeout`] ends a connection whose writes wait, which is how an HTTP/1.1 client
//! that stops reading shows. An h2c client can stall one stream without stopping its writes:
//! it grants the stream no window and keeps the connection busy otherwise (PINGs, other
//! streams). hyper then neither sends the stream's data nor asks its body for more, and the
//! response body holds the app connection it comes from (see [`crate::upstream`]) as long as
//! the client's connection lives. Each h2c response body here is handed to hyper in slices of
//! at most [`SLICE`] bytes, and tells its connection's [`StallWatch`] when it last handed one
//! out without being asked for the next. A stream left so for `--response-send-timeout`
//! (less than a slice of window in that time) loses its body: the app connection is given
//! back, and hyper resets the stream when it next asks for data. The connection and its other
//! streams go on (a gateway multiplexing many callers over one connection loses only the
//! stalled caller's). A body waiting for the app is not stalled.
//!
//! The same watchdog closes h2c connections left idle. hyper's HTTP/1.1 header read timer
//! closes a kept-alive connection that starts no request, but h2 has none: a client that sends
//! one request and then only answers PINGs would hold its connection slot for ever. Each h2c
//! stream is counted open from the call of the service until its response (body included) is
//! done or dropped ([`OpenStream`]); once no stream has been open for `--header-read-timeout`
//! the watchdog asks the connection to shut down gracefully (GOAWAY: streams the client has
//! already sent are still served), through [`StallWatch::idle_shutdown`].
//!
//! It also bounds the streams a client resets. h2's own limit counts only streams reset
//! before hyper accepts them; a client that sends a request's HEADERS and its RST_STREAM in
//! separate segments has each stream accepted, the app called, and the call cancelled (an app
//! connection lost, an audit event emitted) for some 40 bytes. An [`OpenStream`] dropped before
//! its response was done (its response future or body dropped, not ended) counts one reset;
//! past [`MAX_RESETS`] within [`RESET_WINDOW_MS`] the connection is shut down (GOAWAY) and
//! closed, through [`StallWatch::reset_flood`].

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// The largest piece of an h2c body handed to hyper at once: the window a stream must be
/// granted within the time-out to count as progressing.
const SLICE: usize = 16 * 1024;

/// In [`StallWatch::streams`]: one stream open (the low 32 bits), and one more started (the
/// high 32 bits, wrapping), added together with one atomic operation.
const STREAM_STARTED: u64 = (1 << 32) | 1;
const OPEN_STREAMS: u64 = u32::MAX as u64;

/// Streams one h2c client connection may reset (cancel after the service was called, before
/// their response was done) within [`RESET_WINDOW_MS`]: past it the connection is shut down
/// and closed. A client cancelling requests now and then (time-outs, a user navigating away)
/// stays far below, and so does a gateway cancelling every stream it has open at once (twice
/// the 256 streams a connection may have); one cancelling every request it sends, to make the
/// app do work for free, does not.
pub(crate) const MAX_RESETS: u32 = 512;

/// The window, in milliseconds, over which [`MAX_RESETS`] is counted.
pub(crate) const RESET_WINDOW_MS: u32 = 1000;

/// The h2c streams and response bodies of one client connection.
pub(crate) struct StallWatch {
    bodies: Mutex<Vec<Weak<BodyClock>>>,
    limit: Duration,
    epoch: Instant,
    /// Counts the streams whose bodies were taken.
    timed_out: Counter,
    /// How long the connection may go with no stream open (`--header-read-timeout`).
    idle_limit: Duration,
    /// Streams open (low 32 bits) and started (high 32 bits, wrapping): see
    /// [`STREAM_STARTED`].
    streams: AtomicU64,
    /// Whether the watchdog runs (started by the connection's first h2c stream).
    watching: AtomicBool,
    /// Set by the watchdog when the connection has had no stream open for the idle limit.
    idle: AtomicBool,
    /// Set by the watchdog when the connection, shut down gracefully, is still there with no
    /// stream open after another idle limit (a client that never acknowledges the GOAWAY's
    /// PING): it is then closed.
    abandon: AtomicBool,
    /// Streams reset within the current window (low 32 bits) and when that window started
    /// (high 32 bits: milliseconds since the epoch plus one, wrapping): see
    /// [`Self::stream_reset`].
    resets: AtomicU64,
    /// Set when more than [`MAX_RESETS`] streams were reset within [`RESET_WINDOW_MS`]: the
    /// connection is to be shut down and closed at once.
    reset_flood: AtomicBool,
    /// Wakes the connection's task to shut it down ([`Self::register`]).
    waker: Mutex<Option<Waker>>,
}

/// An h2c stream counted open in its connection's [`StallWatch`] until this is dropped: from
/// the call of the service until its response body is done (or the response is dropped).
/// Dropped before its response ended (not [`Self::done`]), it counts a reset stream.
pub(crate) struct OpenStream {
    watch: Arc<StallWatch>,
    /// Whether the response ended (its body's end handed out, or an error that resets the
    /// stream from this side): set through a shared reference, from
    /// [`Body::is_end_stream`].
    done: AtomicBool,
}

impl OpenStream {
    /// Watches `body`, the stream's response body, which keeps the stream open.
    pub(crate) fn watch(self, body: ProxyBody) -> Watched {
        let watch = self.watch.clone();
        watch.watch_body(body, Some(self))
    }

    /// The response ended: dropping this no longer counts a reset.
    fn done(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.watch.streams.fetch_sub(1, Ordering::Relaxed);
        if !*self.done.get_mut() {
            self.watch.stream_reset();
        }
    }
}

/// One h2c body, shared by its stream and its connection's watchdog.
struct BodyClock {
    /// When the body last handed out a slice that no poll for the next has followed, in
    /// milliseconds since the watch's epoch plus one; 0 while it waits for the app or is done.
    /// Written under the `stream` lock.
    handed_out: AtomicU64,
    /// The body and what is left of its last frame, taken (dropped) by the watchdog when the
    /// stream stalls: the app connection goes back, and the stream's next poll is an error.
    stream: Mutex<Option<Stream>>,
}

/// What an h2c body still has to send.
struct Stream {
    body: ProxyBody,
    /// What is left of the body's last frame, handed out a slice at a time.
    rest: Bytes,
}

impl Stream {
    /// The next slice of `rest`.
    fn slice(&mut self) -> Bytes {
        let n = self.rest.len().min(SLICE);
        self.rest.split_to(n)
    }
}

impl StallWatch {
    /// The watch of a new connection: `limit` is `--response-send-timeout` (streams stalled
    /// longer lose their bodies, counted in `timed_out`), `idle_limit` `--header-read-timeout`.
    pub(crate) fn new(limit: Duration, timed_out: Counter, idle_limit: Duration) -> Arc<StallWatch> {
        Arc::new(StallWatch {
            bodies: Mutex::new(Vec::new()),
            limit,
            epoch: Instant::now(),
            timed_out,
            idle_limit,
            streams: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            reset_flood: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    /// An h2c stream starts (the service is called): counted open until the returned guard
    /// drops. The connection's first stream starts its watchdog.
    pub(crate) fn stream_started(self: &Arc<Self>) -> OpenStream {
        self.streams.fetch_add(STREAM_STARTED, Ordering::Relaxed);
        self.start_watchdog();
        OpenStream { watch: self.clone(), done: AtomicBool::new(false) }
    }

    /// A stream was dropped before its response ended (the client reset it, or its connection
    /// is gone): counted in the current window (one clock read); past [`MAX_RESETS`] within
    /// it, [`Self::reset_flood`] turns true and the connection's task is woken.
    fn stream_reset(&self) {
        // Milliseconds since the epoch plus one, wrapping (the window start only needs
        // comparing with times less than 49 days later).
        let now = self.now() as u32;
        let mut flooded = false;
        let _ = self.resets.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |resets| {
            let (start, n) = ((resets >> 32) as u32, resets as u32);
            let (start, n) = if now.wrapping_sub(start) >= RESET_WINDOW_MS {
                (now, 1)
            } else {
                (start, n.saturating_add(1))
            };
            flooded = n > MAX_RESETS;
            Some((u64::from(start) << 32) | u64::from(n))
        });
        if flooded
            && !self.reset_flood.load(Ordering::Relaxed)
            && !self.reset_flood.swap(true, Ordering::Relaxed)
        {
            tracing::debug!(
                limit = MAX_RESETS,
                "h2c client reset too many streams within a second: closing its connection"
            );
            self.wake();
        }
    }

    /// Whether the connection is to be shut down and closed at once: its client reset more
    /// than [`MAX_RESETS`] streams within [`RESET_WINDOW_MS`].
    pub(crate) fn reset_flood(&self) -> bool {
        self.reset_flood.load(Ordering::Relaxed)
    }

    /// Starts the watchdog, a task of its own, unless it runs: the connection's own task (and
    /// every HTTP/1.1 connection) pays nothing for it.
    fn start_watchdog(self: &Arc<Self>) {
        if !self.watching.load(Ordering::Relaxed) && !self.watching.swap(true, Ordering::Relaxed) {
            tokio::spawn(watchdog(Arc::downgrade(self)));
        }
    }

    /// Whether the watchdog runs, i.e. whether the connection is h2c and has had a stream:
    /// only then can [`Self::idle_shutdown`] turn true.
    pub(crate) fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// Whether the connection should shut down gracefully: no stream open on it for the idle
    /// limit.
    pub(crate) fn idle_shutdown(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// Whether the connection, shut down gracefully for being idle, is to be closed at once: it
    /// has stayed with no stream open for another idle limit.
    pub(crate) fn idle_abandon(&self) -> bool {
        // A stream started since the watchdog looked (the client may open streams until it
        // acknowledges the GOAWAY) keeps the connection: it ends when that stream is done.
        self.abandon.load(Ordering::Relaxed) && self.streams.load(Ordering::Relaxed) & OPEN_STREAMS == 0
    }

    /// Records the connection task's waker, woken when [`Self::idle_shutdown`] turns true.
    pub(crate) fn register(&self, waker: Waker) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker);
    }

    /// The connection has been idle for the idle limit (`abandon`: twice): tells its task.
    fn shut_down_idle(&self, abandon: bool) {
        self.idle.store(true, Ordering::Relaxed);
        if abandon {
            self.abandon.store(true, Ordering::Relaxed);
        }
        self.wake();
    }

    /// Wakes the connection's task, if it has handed its waker.
    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Watches `body`, whose head hyper is about to send (counted as its first slice), and
    /// keeps `open` (its stream counted open) until the body is dropped.
    fn watch_body(self: &Arc<Self>, body: ProxyBody, open: Option<OpenStream>) -> Watched {
        self.start_watchdog();
        let stream = Stream { body, rest: Bytes::new() };
        let clock =
            Arc::new(BodyClock { handed_out: AtomicU64::new(self.now()), stream: Mutex::new(Some(stream)) });
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&clock));
        drop(bodies);
        Watched { plain: None, watched: Some((clock, self.clone())), open }
    }

    /// Takes the bodies left for longer than the limit; how many.
    fn release_stalled(&self) -> u64 {
        let limit = u64::try_from(self.limit.as_millis()).unwrap_or(u64::MAX);
        let now = self.now();
        let stalled: Vec<(Arc<BodyClock>, u64)> = {
            let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
            bodies
                .iter()
                .filter_map(Weak::upgrade)
                .filter_map(|c| {
                    let at = c.handed_out.load(Ordering::Relaxed);
                    (at != 0 && now.saturating_sub(at) > limit).then_some((c, at))
                })
                .collect()
        };
        let mut released = 0;
        for (clock, at) in stalled {
            let taken = {
                let mut stream = clock.stream.lock().unwrap_or_else(PoisonError::into_inner);
                // Only if no slice went out since it was judged (the stream writes under this lock).
                let still =
                    clock.handed_out.compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok();
                if still { stream.take() } else { None }
            };
            // Dropped outside the lock: the app connection goes back or closes.
            if taken.is_some() {
                released += 1;
            }
        }
        released
    }
}

/// Until the connection is gone, checks its bodies, taking those that have stalled, and
/// whether it has been idle for the idle limit (then has it shut down), every quarter of the
/// shorter limit (7.5 s with the defaults; at most every 50 ms).
async fn watchdog(watch: Weak<StallWatch>) {
    let Some(period) = watch.upgrade().map(|w| tick_period(w.limit, w.idle_limit)) else { return };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The streams as last seen, and for how many checks since they have stayed so with none
    // open (a stream started or ended in between changes them).
    let mut seen = u64::MAX;
    let mut idle_checks: u32 = 0;
    loop {
        tick.tick().await;
        let Some(watch) = watch.upgrade() else { return };
        let released = watch.release_stalled();
        if released > 0 {
            watch.timed_out.inc_by(released);
            tracing::debug!(
                streams = released,
                "h2c streams stalled past the send time-out: their bodies released"
            );
        }
        let streams = watch.streams.load(Ordering::Relaxed);
        if streams & OPEN_STREAMS == 0 && streams == seen {
            idle_checks = idle_checks.saturating_add(1);
        } else {
            (seen, idle_checks) = (streams, 0);
        }
        // Idle at least since the check that saw `seen` first: `idle_checks` periods.
        let idle_for = period.saturating_mul(idle_checks);
        if idle_for >= watch.idle_limit && !watch.idle_shutdown() {
            tracing::debug!("h2c connection idle past the header read time-out: shutting it down");
            watch.shut_down_idle(false);
        } else if idle_for >= watch.idle_limit.saturating_mul(2) && !watch.idle_abandon() {
            tracing::debug!("h2c connection still open after its graceful shutdown: closing it");
            watch.shut_down_idle(true);
        }
    }
}

fn tick_period(limit: Duration, idle_limit: Duration) -> Duration {
    (limit.min(idle_limit) / 4).max(Duration::from_millis(50))
}

/// Why a watched body ended early.
#[derive(Debug, thiserror::Error)]
#[error("the client granted the stream no window for the send time-out: response body released")]
pub(crate) struct Stalled;

/// A response body as the client's connection sends it: HTTP/1.1 ones as they are, h2c ones
/// in slices and watched.
pub(crate) struct Watched {
    /// An HTTP/1.1 body (its writes have their own time-out).
    plain: Option<ProxyBody>,
    watched: Option<(Arc<BodyClock>, Arc<StallWatch>)>,
    /// The h2c stream, counted open until the body is dropped.
    open: Option<OpenStream>,
}

impl Watched {
    /// A body not watched (HTTP/1.1).
    pub(crate) fn plain(inner: ProxyBody) -> Watched {
        Watched { plain: Some(inner), watched: None, open: None }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(plain) = &mut this.plain {
            return Pin::new(plain).poll_frame(cx).map_err(Into::into);
        }
        let Some((clock, watch)) = &this.watched else { return Poll::Ready(None) };
        let mut guard = clock.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = guard.as_mut() else {
            // Taken by the watchdog: hyper resets the stream (counted as stalled, not reset).
            if let Some(open) = &this.open {
                open.done();
            }
            return Poll::Ready(Some(Err(Stalled.into())));
        };
        let out = if stream.rest.is_empty() {
            match Pin::new(&mut stream.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.len() > SLICE => {
                        stream.rest = data;
                        Poll::Ready(Some(Ok(Frame::data(stream.slice()))))
                    }
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                other => other.map(|_| None),
            }
        } else {
            Poll::Ready(Some(Ok(Frame::data(stream.slice()))))
        };
        let handed_out = if matches!(out, Poll::Ready(Some(Ok(_)))) { watch.now() } else { 0 };
        if matches!(out, Poll::Ready(None | Some(Err(_))))
            && let Some(open) = &this.open
        {
            // Ended (or reset from this side, not by the client).
            open.done();
        }
        clock.handed_out.store(handed_out, Ordering::Relaxed);
        drop(guard);
        out
    }

    fn is_end_stream(&self) -> bool {
        match (&self.plain, &self.watched) {
            (Some(plain), _) => plain.is_end_stream(),
            // A taken body has not ended: its next poll is the error that resets the stream
            // (never a clean end of a cut-off response).
            (None, Some((clock, _))) => {
                let end = clock
                    .stream
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .is_some_and(|s| s.rest.is_empty() && s.body.is_end_stream());
                // hyper sends the end with the head or last data frame and polls no more.
                if end && let Some(open) = &self.open {
                    open.done();
                }
                end
            }
            (None, None) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.plain, &self.watched) {
            (Some(plain), _) => plain.size_hint(),
            (None, Some((clock, _))) => {
                match clock.stream.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                    Some(s) => crate::body::buffered_then(s.rest.len() as u64, Some(s.body.size_hint())),
                    None => SizeHint::default(),
                }
            }
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An h2c connection with a stream open is not idle however long the stream lasts (here
    /// ten minutes, past the body's end until hyper drops it); once its last stream is done
    /// it is shut down after the idle limit, within a check period, and its task woken. A
    /// stream started meanwhile starts the wait again.
    #[tokio::test(start_paused = true)]
    async fn a_connection_with_no_stream_open_for_the_idle_limit_is_shut_down() {
        let watch = StallWatch::new(Duration::from_secs(60), Counter::default(), Duration::from_secs(30));
        let wakes = Arc::new(Wakes::default());
        watch.register(Waker::from(wakes.clone()));
        assert!(!watch.watching());

        let stream = watch.stream_started();
        assert!(watch.watching());
        tokio::time::sleep(Duration::from_secs(300)).await;
        let mut body = stream.watch(ProxyBody::full(Bytes::from_static(b"ok")));
        while body.frame().await.is_some() {}
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert!(!watch.idle_shutdown(), "a stream open (its body not dropped) keeps the connection");

        drop(body);
        tokio::time::sleep(Duration::from_secs(20)).await;
        // Another stream, started and ended, starts the wait again.
        drop(watch.stream_started());
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!watch.idle_shutdown(), "idle for less than the limit");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(watch.idle_shutdown(), "idle for the limit plus a check period");
        assert!(!watch.idle_abandon());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);

        // Still there, no stream open, another limit later: to be closed at once.
        watch.register(Waker::from(wakes.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(watch.idle_abandon());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
    }

    /// Streams dropped before their response ended count as resets: more than [`MAX_RESETS`]
    /// within [`RESET_WINDOW_MS`] set the flood flag and wake the connection's task. Streams
    /// whose bodies ended do not count, nor do resets spread over windows.
    #[tokio::test(start_paused = true)]
    async fn streams_reset_in_a_flood_shut_the_connection_down() {
        let watch = StallWatch::new(Duration::from_secs(60), Counter::default(), Duration::from_secs(3600));
        let wakes = Arc::new(Wakes::default());
        watch.register(Waker::from(wakes.clone()));
        for _ in 0..1000 {
            let mut body = watch.stream_started().watch(ProxyBody::full(Bytes::from_static(b"ok")));
            while body.frame().await.is_some() {}
        }
        assert!(!watch.reset_flood(), "streams whose responses ended are not resets");

        for _ in 0..MAX_RESETS {
            drop(watch.stream_started());
        }
        tokio::time::sleep(Duration::from_millis(u64::from(RESET_WINDOW_MS) + 1)).await;
        for _ in 0..MAX_RESETS {
            drop(watch.stream_started());
        }
        assert!(!watch.reset_flood(), "the bound, in each of two windows");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
        drop(watch.stream_started());
        assert!(watch.reset_flood());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
    }

    /// A body read to its end is not stalled; one handed out and not asked for more loses its
    /// body once the limit has passed, and says so when asked again; large frames go in slices.
    #[tokio::test(start_paused = true)]
    async fn a_body_not_asked_for_more_is_released_after_the_limit() {
        let counter = Counter::default();
        let watch = StallWatch::new(Duration::from_secs(60), counter.clone(), Duration::from_secs(3600));

        let mut body = watch.watch_body(ProxyBody::full(Bytes::from(vec![b'x'; 40 * 1024])), None);
        assert_eq!(body.size_hint().exact(), Some(40 * 1024));
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        assert_eq!(sizes, [SLICE, SLICE, 8 * 1024]);
        assert!(body.is_end_stream());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(counter.get(), 0, "a body read to its end, a slice every 30 s, is not stalled");

        // Handed out a slice, then never asked for more: released after the limit.
        let mut left = watch.watch_body(ProxyBody::full(Bytes::from(vec![b'y'; 20 * 1024])), None);
        assert_eq!(left.frame().await.unwrap().unwrap().into_data().unwrap().len(), SLICE);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(counter.get(), 0);
        tokio::time::sleep(Duration::from_secs(17)).await;
        assert_eq!(counter.get(), 1);
        // The rest is gone with the body: not an end (which would be a clean end of a cut-off
        // response) but the error that resets the stream.
        assert!(!left.is_end_stream());
        assert!(left.frame().await.unwrap().is_err());
    }
}
