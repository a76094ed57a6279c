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
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// The h2c response bodies of one client connection, and what ends it.
pub(crate) struct StallWatch {
    bodies: Mutex<Vec<Weak<BodyClock>>>,
    /// The connection's task ([`Self::ends`]).
    connection: OnceLock<AbortHandle>,
    limit: Duration,
    epoch: Instant,
    /// Counts the connections ended so.
    timed_out: Counter,
}

/// When a body last handed out a frame that no poll for the next has followed, in
/// milliseconds since the watch's epoch plus one; 0 while it waits for the app.
struct BodyClock {
    handed_out: AtomicU64,
}

impl StallWatch {
    pub(crate) fn new(limit: Duration, timed_out: Counter) -> Arc<StallWatch> {
        Arc::new(StallWatch {
            bodies: Mutex::new(Vec::new()),
            connection: OnceLock::new(),
            limit,
            epoch: Instant::now(),
            timed_out,
        })
    }

    /// The task of the connection whose bodies these are: aborted when one stalls.
    pub(crate) fn ends(&self, connection: AbortHandle) {
        let _ = self.connection.set(connection);
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Watches `body`, whose head hyper is about to send (counted as its first frame). The
    /// first body of a connection starts its watchdog, a task of its own, so that the
    /// connection's own task (and every HTTP/1.1 connection) pays nothing for the watch.
    pub(crate) fn watch(self: &Arc<Self>, body: ProxyBody) -> Watched {
        let clock = Arc::new(BodyClock { handed_out: AtomicU64::new(self.now()) });
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if bodies.is_empty() {
            tokio::spawn(watchdog(Arc::downgrade(self)));
        }
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&clock));
        drop(bodies);
        Watched { inner: body, clock: Some((clock, self.clone())) }
    }

    /// Whether a body has been left for longer than the limit.
    fn any_stalled(&self) -> bool {
        let limit = u64::try_from(self.limit.as_millis()).unwrap_or(u64::MAX);
        let now = self.now();
        let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.iter().filter_map(Weak::upgrade).any(|c| {
            let at = c.handed_out.load(Ordering::Relaxed);
            at != 0 && now.saturating_sub(at) > limit
        })
    }
}

/// Checks a connection's bodies every quarter of the limit until the connection is gone or a
/// body has stalled, which ends the connection.
async fn watchdog(watch: Weak<StallWatch>) {
    let Some(limit) = watch.upgrade().map(|w| w.limit) else { return };
    let mut tick = tokio::time::interval((limit / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(watch) = watch.upgrade() else { return };
        if watch.any_stalled() {
            watch.timed_out.inc();
            if let Some(connection) = watch.connection.get() {
                connection.abort();
            }
            return;
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

    /// A body read to its end is not stalled; one handed out and not asked for more ends its
    /// connection once the limit has passed; a connection without watched bodies has no
    /// watchdog at all.
    #[tokio::test(start_paused = true)]
    async fn a_body_not_asked_for_more_ends_its_connection_after_the_limit() {
        let counter = Counter::default();
        let watch = StallWatch::new(Duration::from_secs(60), counter.clone());
        let connection = tokio::spawn(std::future::pending::<()>());
        watch.ends(connection.abort_handle());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!connection.is_finished(), "no body, no stall");

        let mut body = watch.watch(ProxyBody::full(Bytes::from_static(b"{}")));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "{}");
        assert!(body.frame().await.is_none());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!connection.is_finished(), "a body read to its end is not stalled");

        // Never asked for its first frame: the connection ends once the limit has passed.
        let _left = watch.watch(ProxyBody::full(Bytes::from_static(b"{}")));
        let started = Instant::now();
        let ended = connection.await;
        assert!(ended.unwrap_err().is_cancelled());
        let waited = started.elapsed();
        assert!(waited > Duration::from_secs(60) && waited <= Duration::from_secs(76), "{waited:?}");
        assert_eq!(counter.get(), 1);
    }
}
