//! What the Custos HTTP servers (the sidecar's proxy and admin ports, the collector, the
//! operator's webhooks and admin port) share when they accept a connection.
//!
//! hyper's HTTP/1 `header_read_timeout` bounds the wait for a request head, also between
//! requests on a kept-alive connection, but hyper-util's `auto` builder first reads up to 24
//! bytes to tell HTTP/1.1 from h2c, with no timer at all. A client that connects and sends
//! nothing, or a few bytes of the h2 preface, holds the connection (and, in the sidecar, one
//! of its `--max-connections` slots) until it hangs up. [`first_request_within`] closes such
//! a connection when no request has started by a deadline.

#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// Whether a request has started on a connection: cloned into the connection's service,
/// which calls [`mark`](Self::mark) on each request.
#[derive(Clone, Debug, Default)]
pub struct RequestStarted(Arc<AtomicBool>);

impl RequestStarted {
    /// A connection on which no request has started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a request has started (its head was read).
    #[inline]
    pub fn mark(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Whether [`mark`](Self::mark) has been called.
    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// No request started on the connection before the deadline; it was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRequestInTime;

impl std::fmt::Display for NoRequestInTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no request within the header read time-out")
    }
}

impl std::error::Error for NoRequestInTime {}

/// Drives `connection` (a hyper connection future) to its end, unless no request has started
/// on it (see [`RequestStarted`]) within `deadline` of this call: then `connection` is
/// dropped, which closes the socket, and [`NoRequestInTime`] is returned.
///
/// The timer is dropped as soon as a request has started, so a connection pays for it only
/// until its first request (an idle kept-alive connection is hyper's `header_read_timeout`'s
/// to close).
pub fn first_request_within<F: Future>(
    connection: F,
    started: RequestStarted,
    deadline: Duration,
) -> FirstRequestWithin<F> {
    FirstRequestWithin { connection, deadline: Some(tokio::time::sleep(deadline)), started }
}

pin_project_lite::pin_project! {
    /// The future of [`first_request_within`].
    #[must_use = "futures do nothing unless polled"]
    pub struct FirstRequestWithin<F> {
        #[pin]
        connection: F,
        #[pin]
        deadline: Option<tokio::time::Sleep>,
        started: RequestStarted,
    }
}

impl<F: Future> Future for FirstRequestWithin<F> {
    type Output = Result<F::Output, NoRequestInTime>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.connection.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
            if this.started.is_marked() {
                this.deadline.set(None);
            } else if deadline.poll(cx).is_ready() {
                return Poll::Ready(Err(NoRequestInTime));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_dropped_at_the_deadline() {
        let started = RequestStarted::new();
        let begun = tokio::time::Instant::now();
        let result = first_request_within(std::future::pending::<()>(), started, DEADLINE).await;
        assert_eq!(result, Err(NoRequestInTime));
        assert_eq!(begun.elapsed(), DEADLINE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_request_lives_past_the_deadline() {
        let started = RequestStarted::new();
        let marker = started.clone();
        let connection = async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            marker.mark();
            tokio::time::sleep(Duration::from_secs(600)).await;
            "served"
        };
        let begun = tokio::time::Instant::now();
        assert_eq!(first_request_within(connection, started, DEADLINE).await, Ok("served"));
        assert_eq!(begun.elapsed(), Duration::from_secs(601));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_started_just_before_the_deadline_counts() {
        let started = RequestStarted::new();
        let marker = started.clone();
        let connection = async move {
            tokio::time::sleep(DEADLINE - Duration::from_millis(1)).await;
            marker.mark();
            std::future::pending::<()>().await;
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(3600),
            first_request_within(connection, started, DEADLINE),
        );
        assert!(outcome.await.is_err(), "the connection was closed although a request had started");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_returns_its_output() {
        let started = RequestStarted::new();
        let result = first_request_within(async { 7 }, started.clone(), DEADLINE).await;
        assert_eq!(result, Ok(7));
        assert!(!started.is_marked());
    }
}
