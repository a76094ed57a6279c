//! Coalescing of namespace reconciles. The controller reconciles policies, but a policy's
//! reconcile is its namespace's; with ten policies in a namespace, one change queues ten
//! reconciles of the same namespace. They run one at a time per namespace, and a reconcile
//! is skipped when a successful one started after it was requested: that one already read
//! everything the request was about.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Serialises and coalesces reconciles per namespace.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    /// Ticks at every request and every start, so the two can be ordered.
    clock: AtomicU64,
    /// Per namespace: the tick at which the last successful reconcile started.
    namespaces: Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
}

/// What [`Coalescer::run`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Coalesced<T> {
    /// The reconcile ran and returned this.
    Ran(T),
    /// A successful reconcile that started after this request covered it.
    Covered,
}

impl Coalescer {
    /// Runs `reconcile` for `namespace` unless a successful reconcile started after this call
    /// covered it; reconciles of one namespace never overlap.
    pub(crate) async fn run<T, E, F, Fut>(&self, namespace: &str, reconcile: F) -> Coalesced<Result<T, E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let requested = self.tick();
        let slot = {
            let mut namespaces = self.namespaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(namespaces.entry(namespace.to_string()).or_default())
        };
        let mut last_success_start = slot.lock().await;
        if *last_success_start > requested {
            return Coalesced::Covered;
        }
        let started = self.tick();
        let result = reconcile().await;
        if result.is_ok() {
            *last_success_start = started;
        }
        Coalesced::Ran(result)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn requests_queued_behind_a_running_reconcile_are_covered_by_the_next_one_only() {
        let c = Arc::new(Coalescer::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();

        // A reconcile is running (requested before the others).
        let first = {
            let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
            tokio::spawn(async move {
                c.run("shop", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    released.await.expect("released");
                    Ok::<_, ()>(())
                })
                .await
            })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Three requests arrive while it runs: it started before them, so it does not cover
        // them; the first of them to run covers the other two.
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
                tokio::spawn(async move {
                    c.run("shop", || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, ()>(())
                    })
                    .await
                })
            })
            .collect();
        // Let the three register their request (one tick each, after the first's two) before
        // the first finishes.
        while c.clock.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Coalesced::Ran(Ok(())));
        let mut outcomes = Vec::new();
        for q in queued {
            outcomes.push(q.await.unwrap());
        }
        assert_eq!(outcomes.iter().filter(|o| matches!(o, Coalesced::Ran(_))).count(), 1, "{outcomes:?}");
        assert_eq!(outcomes.iter().filter(|o| **o == Coalesced::Covered).count(), 2, "{outcomes:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_reconcile_covers_nothing_and_namespaces_are_independent() {
        let c = Coalescer::default();
        assert_eq!(c.run("shop", || async { Err::<(), _>("refused") }).await, Coalesced::Ran(Err("refused")));
        assert_eq!(c.run("shop", || async { Ok::<_, ()>(1) }).await, Coalesced::Ran(Ok(1)));
        assert_eq!(c.run("billing", || async { Ok::<_, ()>(2) }).await, Coalesced::Ran(Ok(2)));
        // Sequential requests each come after the last start: each runs.
        assert_eq!(c.run("shop", || async { Ok::<_, ()>(3) }).await, Coalesced::Ran(Ok(3)));
    }
}
