//! h2c streams a client stalls by granting them no flow-control window.
//!
//! [`crate::send_timeout`] ends a connection whose writes wait, which is how an HTTP/1.1 client
//! that stops reading shows. An h2c client can stall one stream without stopping its writes:
//! it grants the stream no window and keeps the connection busy otherwise (PINGs, other
//! streams). hyper then neither sends the stream's data nor asks its body for more, and the
//! response body holds the app connection it comes from (see [`crate::upstream`]) as long as
//! the client's connection lives. Each h2c response body here tells its connection's
//! [`StallWatch`] when it last handed hyper a frame without being asked for the next; a
//! stream left so for `--response-send-timeout` ends its connection, as a write waiting that
//! long would. A body waiting for the app is not stalled.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// The h2c response bodies of one client connection.
pub(crate) struct StallWatch {
    bodies: Mutex<Vec<Weak<BodyClock>>>,
    /// Wakes the watch when the first body is registered (HTTP/1.1 connections have none).
    first: Notify,
    limit: Duration,
    epoch: Instant,
}

/// When a body last handed out a frame that no poll for the next has followed, in
/// milliseconds since the watch's epoch plus one; 0 while it waits for the app.
struct BodyClock {
    handed_out: AtomicU64,
}

impl StallWatch {
    pub(crate) fn new(limit: Duration) -> Arc<StallWatch> {
        Arc::new(StallWatch {
            bodies: Mutex::new(Vec::new()),
            first: Notify::new(),
            limit,
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Watches `body`, whose head hyper is about to send (counted as its first frame).
    pub(crate) fn watch(self: &Arc<Self>, body: ProxyBody) -> Watched {
        let clock = Arc::new(BodyClock { handed_out: AtomicU64::new(self.now()) });
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if bodies.is_empty() {
            self.first.notify_one();
        }
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&clock));
        drop(bodies);
        Watched { inner: body, clock: Some((clock, self.clone())) }
    }

    /// Completes once a body has been left for longer than the limit; never on a connection
    /// without h2c bodies.
    pub(crate) async fn stalled(&self) {
        // (`notify_one` keeps its wake-up for a waiter still to come: none is lost.)
        while self.bodies.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            self.first.notified().await;
        }
        let mut tick = tokio::time::interval((self.limit / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = u64::try_from(self.limit.as_millis()).unwrap_or(u64::MAX);
        loop {
            tick.tick().await;
            let now = self.now();
            let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
            let stalled = bodies.iter().filter_map(Weak::upgrade).any(|c| {
                let at = c.handed_out.load(Ordering::Relaxed);
                at != 0 && now.saturating_sub(at) > limit
            });
            if stalled {
                return;
            }
        }
    }
}

/// A response body as the client's connection sends it: h2c ones watched.
pub(crate) struct Watched {
    inner: ProxyBody,
    clock: Option<(Arc<BodyClock>, Arc<StallWatch>)>,
}

impl Watched {
    /// A body not watched (HTTP/1.1: its writes have their own time-out).
    pub(crate) fn plain(inner: ProxyBody) -> Watched {
        Watched { inner, clock: None }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some((clock, watch)) = &this.clock {
            let handed_out = match &polled {
                Poll::Ready(Some(Ok(_))) => watch.now(),
                // waiting for the app, or done
                _ => 0,
            };
            clock.handed_out.store(handed_out, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    /// A body handed out and not asked for more is stalled after the limit; one asked again
    /// (or waiting for the app) is not; a connection without watched bodies never is.
    #[tokio::test(start_paused = true)]
    async fn a_body_not_asked_for_more_is_stalled_after_the_limit() {
        let watch = StallWatch::new(Duration::from_secs(60));
        let idle = tokio::time::timeout(Duration::from_secs(600), watch.stalled()).await;
        assert!(idle.is_err(), "no body, no stall");

        let mut body = watch.watch(ProxyBody::full(Bytes::from_static(b"{}")));
        // Read to its end within the limit: done, not stalled.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "{}");
        assert!(body.frame().await.is_none());
        let done = tokio::time::timeout(Duration::from_secs(600), watch.stalled()).await;
        assert!(done.is_err(), "a body read to its end is not stalled");

        // Never asked for its first frame: stalled once the limit has passed.
        let _left = watch.watch(ProxyBody::full(Bytes::from_static(b"{}")));
        let started = Instant::now();
        watch.stalled().await;
        let waited = started.elapsed();
        assert!(waited > Duration::from_secs(60) && waited <= Duration::from_secs(76), "{waited:?}");
    }
}
