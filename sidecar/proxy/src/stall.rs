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

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// The largest piece of an h2c body handed to hyper at once: the window a stream must be
/// granted within the time-out to count as progressing.
const SLICE: usize = 16 * 1024;

/// The h2c response bodies of one client connection.
pub(crate) struct StallWatch {
    bodies: Mutex<Vec<Weak<BodyClock>>>,
    limit: Duration,
    epoch: Instant,
    /// Counts the streams whose bodies were taken.
    timed_out: Counter,
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
    pub(crate) fn new(limit: Duration, timed_out: Counter) -> Arc<StallWatch> {
        Arc::new(StallWatch { bodies: Mutex::new(Vec::new()), limit, epoch: Instant::now(), timed_out })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Watches `body`, whose head hyper is about to send (counted as its first slice). The
    /// first body of a connection starts its watchdog, a task of its own, so that the
    /// connection's own task (and every HTTP/1.1 connection) pays nothing for the watch.
    pub(crate) fn watch(self: &Arc<Self>, body: ProxyBody) -> Watched {
        let stream = Stream { body, rest: Bytes::new() };
        let clock =
            Arc::new(BodyClock { handed_out: AtomicU64::new(self.now()), stream: Mutex::new(Some(stream)) });
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if bodies.is_empty() {
            tokio::spawn(watchdog(Arc::downgrade(self)));
        }
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&clock));
        drop(bodies);
        Watched { plain: None, watched: Some((clock, self.clone())) }
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

/// Checks a connection's bodies every quarter of the limit until the connection is gone,
/// taking those that have stalled.
async fn watchdog(watch: Weak<StallWatch>) {
    let Some(limit) = watch.upgrade().map(|w| w.limit) else { return };
    let mut tick = tokio::time::interval((limit / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
    }
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
}

impl Watched {
    /// A body not watched (HTTP/1.1).
    pub(crate) fn plain(inner: ProxyBody) -> Watched {
        Watched { plain: Some(inner), watched: None }
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
            // Taken by the watchdog: hyper resets the stream.
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
        clock.handed_out.store(handed_out, Ordering::Relaxed);
        drop(guard);
        out
    }

    fn is_end_stream(&self) -> bool {
        match (&self.plain, &self.watched) {
            (Some(plain), _) => plain.is_end_stream(),
            // A taken body has not ended: its next poll is the error that resets the stream
            // (never a clean end of a cut-off response).
            (None, Some((clock, _))) => clock
                .stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|s| s.rest.is_empty() && s.body.is_end_stream()),
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

    /// A body read to its end is not stalled; one handed out and not asked for more loses its
    /// body once the limit has passed, and says so when asked again; large frames go in slices.
    #[tokio::test(start_paused = true)]
    async fn a_body_not_asked_for_more_is_released_after_the_limit() {
        let counter = Counter::default();
        let watch = StallWatch::new(Duration::from_secs(60), counter.clone());

        let mut body = watch.watch(ProxyBody::full(Bytes::from(vec![b'x'; 40 * 1024])));
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
        let mut left = watch.watch(ProxyBody::full(Bytes::from(vec![b'y'; 20 * 1024])));
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
