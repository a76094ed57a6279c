//! The in-memory queue between the request path and the worker.
//!
//! A plain channel wakes its receiver on every message. Here the receiver runs on another
//! thread than the proxy threads, so waking it for each event would cost every request a
//! cross-thread wake-up (an eventfd write on the request path, a context switch on the
//! worker's side): at tens of thousands of requests per second, more CPU than the audit
//! event itself. The sender instead counts the events it queues and wakes the worker only
//! when the count reaches [`wake_threshold`] ([`WAKE_EVERY`] events, fewer for small batches
//! or queues); the worker also drains the queue on its flush tick, so a partial batch still
//! leaves within the flush interval. Waking every few dozen events rather than once per
//! batch keeps the worker's bursts of encoding short (a batch of hundreds of events takes
//! the better part of a millisecond to encode, time taken from the proxy threads on a small
//! pod).
//!
//! The count is raised before an event is queued and lowered by the worker after it took
//! events out, so it never falls below the number of queued events and never wraps.
//!
//! The queue is bounded twice: by its capacity in events, and by an estimate of the memory
//! its events hold (`max_bytes`; the sender passes each event's estimate to
//! [`QueueSender::try_send`]). Events differ in size by three orders of magnitude (one
//! carrying thousands of record hashes holds most of a megabyte), so a bound by count alone
//! does not bound memory. The byte total is charged, with an atomic add, before an event is
//! queued and released by the worker after it took the event out, so it too never falls
//! below what the queued events hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{Notify, mpsc};

/// Queued events at which the worker is woken, unless a batch or half the queue is smaller.
pub(crate) const WAKE_EVERY: usize = 64;

/// Queued events at which the worker is woken: [`WAKE_EVERY`], but at most a full batch and
/// at most half the queue, so that a burst cannot fill the queue before the worker hears of it.
pub(crate) fn wake_threshold(batch_max: usize, capacity: usize) -> usize {
    WAKE_EVERY.min(batch_max).min(capacity / 2).max(1)
}

struct Signal {
    /// Events counted in by senders and not yet taken out by the worker.
    pending: AtomicUsize,
    /// Estimated bytes charged by senders and not yet released by the worker.
    bytes: AtomicUsize,
    /// Bound on `bytes`.
    max_bytes: usize,
    wake_at: usize,
    notify: Notify,
}

/// The request path's end. Dropping it closes the queue and wakes the worker.
pub(crate) struct QueueSender<T> {
    /// Each event with the bytes it was charged.
    tx: Option<mpsc::Sender<(T, usize)>>,
    signal: Arc<Signal>,
}

/// The worker's end.
pub(crate) struct QueueReceiver<T> {
    rx: mpsc::Receiver<(T, usize)>,
    signal: Arc<Signal>,
}

/// Why [`QueueSender::try_send`] refused an event (which is then dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its capacity, or the event's bytes would take it past its byte bound.
    Full,
    /// The worker closed the queue (shutdown).
    Closed,
}

/// What [`QueueReceiver::drain`] found after taking events out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The queue is empty for now (or the limit was reached).
    Open,
    /// The queue is empty and every sender is gone.
    Closed,
}

/// A queue of `capacity` events holding at most `max_bytes` (as estimated by the senders),
/// whose receiver is woken every `wake_at` events.
pub(crate) fn channel<T>(
    capacity: usize,
    max_bytes: usize,
    wake_at: usize,
) -> (QueueSender<T>, QueueReceiver<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let signal = Arc::new(Signal {
        pending: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        max_bytes,
        wake_at: wake_at.max(1),
        notify: Notify::new(),
    });
    (QueueSender { tx: Some(tx), signal: Arc::clone(&signal) }, QueueReceiver { rx, signal })
}

impl<T> QueueSender<T> {
    /// Queues `event`, charging `bytes` (its estimated memory) against the byte bound, without
    /// waiting; wakes the worker when this event completes a batch. Refused as
    /// [`Refused::Full`] when the queue holds its capacity or `bytes` more would take it past
    /// its byte bound.
    pub(crate) fn try_send(&self, event: T, bytes: usize) -> Result<(), Refused> {
        let Some(tx) = &self.tx else { return Err(Refused::Closed) };
        // Charged first, released on refusal: concurrent senders may see a total briefly too
        // high (and refuse an event that would have fitted), never one too low. An event over
        // the bound alone is refused before it is added, so the total cannot wrap.
        if bytes > self.signal.max_bytes {
            return Err(Refused::Full);
        }
        let charged = self.signal.bytes.fetch_add(bytes, Ordering::Relaxed);
        if charged + bytes > self.signal.max_bytes {
            self.signal.bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        let before = self.signal.pending.fetch_add(1, Ordering::Relaxed);
        match tx.try_send((event, bytes)) {
            Ok(()) => {
                if before + 1 == self.signal.wake_at {
                    self.signal.notify.notify_one();
                }
                Ok(())
            }
            Err(error) => {
                self.signal.pending.fetch_sub(1, Ordering::Relaxed);
                self.signal.bytes.fetch_sub(bytes, Ordering::Relaxed);
                Err(match error {
                    TrySendError::Full(_) => Refused::Full,
                    TrySendError::Closed(_) => Refused::Closed,
                })
            }
        }
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        // Close first, so that the woken worker finds the queue closed.
        self.tx.take();
        self.signal.notify.notify_one();
    }
}

impl<T> QueueReceiver<T> {
    /// Completes when the wake-up threshold's worth of events is queued, or the queue was closed (a wake-up
    /// that arrives while the worker is busy is kept for its next call).
    pub(crate) async fn ready(&self) {
        self.signal.notify.notified().await;
    }

    /// Hands up to `limit` queued events to `take`, oldest first, until `take` returns false:
    /// how many, and whether the queue is closed. The bytes they were charged are released.
    /// When a threshold's worth is still queued afterwards, the next [`ready`](Self::ready)
    /// completes at once.
    pub(crate) fn drain(&mut self, limit: usize, mut take: impl FnMut(T) -> bool) -> (usize, Drained) {
        let mut taken = 0;
        let mut released = 0;
        let mut state = Drained::Open;
        while taken < limit {
            match self.rx.try_recv() {
                Ok((event, bytes)) => {
                    taken += 1;
                    released += bytes;
                    if !take(event) {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    state = Drained::Closed;
                    break;
                }
            }
        }
        if released > 0 {
            self.signal.bytes.fetch_sub(released, Ordering::Relaxed);
        }
        let left = self.signal.pending.fetch_sub(taken, Ordering::Relaxed) - taken;
        if left >= self.signal.wake_at {
            self.signal.notify.notify_one();
        }
        (taken, state)
    }

    /// Refuses further events; those queued can still be drained.
    pub(crate) fn close(&mut self) {
        self.rx.close();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use super::*;

    /// Events are opaque to the queue: numbered ones stand in for audit events.
    fn event(n: u32) -> u32 {
        n
    }

    /// A byte bound the tests of the count and the wake-ups never reach.
    const NO_BYTE_BOUND: usize = usize::MAX / 2;

    /// The bytes charged for an event without record hashes.
    const SMALL: usize = 1024;

    /// Whether `ready` completes at once.
    fn woken<T>(rx: &QueueReceiver<T>) -> bool {
        let ready = pin!(rx.ready());
        ready.poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(())
    }

    #[test]
    fn threshold_is_a_few_dozen_events_but_at_most_a_batch_or_half_the_queue() {
        assert_eq!(wake_threshold(1000, 10_000), WAKE_EVERY);
        assert_eq!(wake_threshold(10, 10_000), 10);
        assert_eq!(wake_threshold(1000, 40), 20);
        assert_eq!(wake_threshold(100, 1), 1);
        assert_eq!(wake_threshold(1, 10), 1);
    }

    #[test]
    fn the_worker_is_woken_at_the_threshold_not_per_event() {
        let (tx, mut rx) = channel(100, NO_BYTE_BOUND, 10);
        for n in 0..9 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        assert!(!woken(&rx), "woken below the threshold");
        tx.try_send(event(9), SMALL).unwrap();
        assert!(woken(&rx), "not woken at the threshold");
        let mut got = Vec::new();
        assert_eq!(
            rx.drain(usize::MAX, |e| {
                got.push(e);
                true
            })
            .1,
            Drained::Open
        );
        assert_eq!(got.len(), 10);
        assert_eq!(got, (0..10).collect::<Vec<u32>>());
        // the count starts again from zero
        for n in 0..9 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        assert!(!woken(&rx));
    }

    #[test]
    fn a_wake_up_while_the_worker_is_busy_is_kept() {
        let (tx, rx) = channel(100, NO_BYTE_BOUND, 3);
        for n in 0..3 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        // nobody was waiting when the third event came: the next wait completes at once
        assert!(woken(&rx));
    }

    #[test]
    fn a_limited_drain_leaving_a_batch_wakes_the_worker_again() {
        let (tx, mut rx) = channel(100, NO_BYTE_BOUND, 4);
        for n in 0..10 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        assert!(woken(&rx));
        let mut got = Vec::new();
        rx.drain(4, |e| {
            got.push(e);
            true
        });
        assert!(woken(&rx), "6 left, threshold 4: woken again");
        rx.drain(4, |e| {
            got.push(e);
            true
        });
        assert!(!woken(&rx), "2 left: wait for more or the tick");
        rx.drain(4, |e| {
            got.push(e);
            true
        });
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn refused_events_are_not_counted() {
        let (tx, mut rx) = channel(2, NO_BYTE_BOUND, 2);
        tx.try_send(event(0), SMALL).unwrap();
        tx.try_send(event(1), SMALL).unwrap();
        assert!(matches!(tx.try_send(event(2), SMALL), Err(Refused::Full)));
        let mut got = Vec::new();
        rx.drain(usize::MAX, |e| {
            got.push(e);
            true
        });
        assert_eq!(rx.signal.pending.load(Ordering::Relaxed), 0);
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 0);
        rx.close();
        assert!(matches!(tx.try_send(event(3), SMALL), Err(Refused::Closed)));
        assert_eq!(rx.signal.pending.load(Ordering::Relaxed), 0);
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 0);
    }

    /// Bytes charged for an event carrying 10 000 record hashes (about 88 bytes each).
    const LARGE: usize = 880_000 + SMALL;

    #[test]
    fn large_events_past_the_byte_bound_are_refused_until_the_worker_takes_earlier_ones_out() {
        // Room for 3 large events, and 10 000 events by count.
        let (tx, mut rx) = channel(10_000, 3 * LARGE + 10 * SMALL, 64);
        for n in 0..3 {
            tx.try_send(event(n), LARGE).unwrap();
        }
        // By count the queue is nearly empty; by bytes it is full for large events.
        assert_eq!(tx.try_send(event(3), LARGE), Err(Refused::Full));
        assert_eq!(tx.try_send(event(4), LARGE), Err(Refused::Full));
        assert_eq!(rx.signal.pending.load(Ordering::Relaxed), 3, "refused events are not counted");
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 3 * LARGE, "refused events are not charged");
        // Small events still fit in what is left.
        for n in 10..20 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        assert_eq!(tx.try_send(event(20), SMALL), Err(Refused::Full));
        // The worker takes the oldest large event out: room for one more, not two.
        let mut got = Vec::new();
        rx.drain(1, |e| {
            got.push(e);
            true
        });
        assert_eq!(got, [0]);
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 2 * LARGE + 10 * SMALL);
        tx.try_send(event(5), LARGE).unwrap();
        assert_eq!(tx.try_send(event(6), LARGE), Err(Refused::Full));
        // Taking everything out releases everything.
        rx.drain(usize::MAX, |e| {
            got.push(e);
            true
        });
        assert_eq!(got, [0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 5]);
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 0);
        for n in 0..3 {
            tx.try_send(event(n), LARGE).unwrap();
        }
    }

    #[test]
    fn an_event_larger_than_the_whole_bound_is_refused_even_into_an_empty_queue() {
        let (tx, rx) = channel(100, LARGE - 1, 10);
        assert_eq!(tx.try_send(event(0), LARGE), Err(Refused::Full));
        assert_eq!(tx.try_send(event(1), usize::MAX), Err(Refused::Full));
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(rx.signal.pending.load(Ordering::Relaxed), 0);
        tx.try_send(event(2), SMALL).unwrap();
    }

    #[test]
    fn small_events_fill_the_queue_by_count_as_before() {
        // The default bounds: 10 000 events, 32 MiB; an event without record hashes is charged
        // about 1 KiB, so the count binds first.
        let (tx, rx) = channel(10_000, 32 << 20, 64);
        for n in 0..10_000 {
            tx.try_send(event(n), SMALL).unwrap();
        }
        assert_eq!(tx.try_send(event(10_000), SMALL), Err(Refused::Full));
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 10_000 * SMALL);
    }

    #[test]
    fn dropping_the_sender_wakes_the_worker_and_closes_after_the_last_event() {
        let (tx, mut rx) = channel(100, NO_BYTE_BOUND, 50);
        tx.try_send(event(0), SMALL).unwrap();
        assert!(!woken(&rx));
        drop(tx);
        assert!(woken(&rx), "not woken by the close");
        let mut got = Vec::new();
        assert_eq!(
            rx.drain(usize::MAX, |e| {
                got.push(e);
                true
            })
            .1,
            Drained::Closed
        );
        assert_eq!(got.len(), 1, "the queued event is still delivered");
    }

    #[test]
    fn concurrent_senders_lose_nothing_and_the_count_returns_to_zero() {
        // Events of 1 to 3 units against room for 64 events and 128 units: either bound binds.
        let (tx, mut rx) = channel(64, 128 * SMALL, 8);
        let tx = Arc::new(tx);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let tx = Arc::clone(&tx);
                std::thread::spawn(move || {
                    let mut sent = 0;
                    let mut n = 0;
                    while n < 5_000 {
                        let size = SMALL * (1 + (n as usize % 3));
                        match tx.try_send(event(t * 10_000 + n), size) {
                            Ok(()) => {
                                sent += 1;
                                n += 1;
                            }
                            Err(Refused::Full) => std::thread::yield_now(),
                            Err(Refused::Closed) => panic!("closed"),
                        }
                    }
                    sent
                })
            })
            .collect();
        let mut got = Vec::new();
        // The worker as it runs: woken at the threshold, or by its tick.
        runtime.block_on(async {
            while got.len() < 20_000 {
                let _ = tokio::time::timeout(Duration::from_millis(1), rx.ready()).await;
                rx.drain(16, |e| {
                    got.push(e);
                    true
                });
            }
        });
        let sent: u32 = senders.into_iter().map(|s| s.join().unwrap()).sum();
        assert_eq!(sent, 20_000);
        assert_eq!(got.len(), 20_000);
        assert_eq!(rx.signal.pending.load(Ordering::Relaxed), 0);
        assert_eq!(rx.signal.bytes.load(Ordering::Relaxed), 0);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 20_000, "an event was lost or repeated");
    }
}
