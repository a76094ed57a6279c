//! Memory budgets for bodies held in memory: what all of them may hold together, shared by the
//! proxy threads, and the reservations each body takes from it as its bytes arrive.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The memory that bodies held in memory may take together, shared by the proxy threads: one
/// for request bodies read before the app is called, one for responses read to be
/// transformed, one for what dry runs read. Its use is a gauge
/// (`custos_sidecar_{request,response,dry_run}_buffer_bytes`); its refusals are counted
/// (`..._buffer_exhausted_total`).
pub(crate) struct BufferBudget {
    total: u64,
    in_use: Gauge,
    exhausted: Counter,
}

impl BufferBudget {
    /// A budget of `total` bytes whose use is reported by `in_use` and whose refusals are
    /// counted in `exhausted`.
    pub(crate) fn new(total: u64, in_use: Gauge, exhausted: Counter) -> Arc<Self> {
        Arc::new(BufferBudget { total, in_use, exhausted })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> u64 {
        u64::try_from(self.in_use.get()).unwrap_or(0)
    }

    /// The budget's size.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Takes `bytes` from the budget, or nothing when that would go over it.
    fn take(&self, bytes: u64) -> bool {
        let Ok(bytes) = i64::try_from(bytes) else { return false };
        let total = i64::try_from(self.total).unwrap_or(i64::MAX);
        self.in_use
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&after| after <= total)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.in_use.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Bytes taken from a [`BufferBudget`], given back when dropped.
pub(crate) struct Reservation {
    budget: Arc<BufferBudget>,
    bytes: u64,
}

impl Reservation {
    /// An empty reservation on `budget`.
    pub(crate) fn on(budget: &Arc<BufferBudget>) -> Self {
        Reservation { budget: budget.clone(), bytes: 0 }
    }

    /// What this reservation holds, as a reservation of its own; this one is left empty.
    pub(crate) fn take(&mut self) -> Reservation {
        Reservation { budget: self.budget.clone(), bytes: std::mem::take(&mut self.bytes) }
    }

    /// Takes `bytes` more, or nothing (`false`) when the budget has not that much left; a
    /// refusal is counted as a body the budget had no room for (every caller then stops
    /// growing that body's reservation, so each body counts once).
    pub(crate) fn grow(&mut self, bytes: u64) -> bool {
        let taken = self.budget.take(bytes);
        if taken {
            self.bytes += bytes;
        } else {
            self.budget.exhausted.inc();
        }
        taken
    }
}

impl Reservation {
    /// The bytes this reservation holds.
    pub(crate) fn held(&self) -> u64 {
        self.bytes
    }

    /// Gives back what this reservation holds above `bytes`.
    pub(crate) fn shrink_to(&mut self, bytes: u64) {
        if self.bytes > bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn budget(total: u64) -> Arc<BufferBudget> {
        BufferBudget::new(total, Gauge::default(), Counter::default())
    }

    #[test]
    fn reservations_stay_within_the_budget_and_give_back_on_drop() {
        let b = budget(100);
        let mut r1 = Reservation::on(&b);
        assert!(r1.grow(60));
        let mut r2 = Reservation::on(&b);
        assert!(!r2.grow(41), "60 + 41 is over 100");
        assert!(r2.grow(40));
        assert_eq!(b.in_use(), 100);
        assert!(!r2.grow(1));
        drop(r1);
        assert_eq!(b.in_use(), 40);
        assert!(r2.grow(60));
        // What a step no longer needs goes back before the next one takes its share.
        let held = r2.held();
        assert!(r2.grow(0) && held == 100);
        r2.shrink_to(40);
        assert_eq!((b.in_use(), r2.held()), (40, 40));
        r2.shrink_to(70);
        assert_eq!(b.in_use(), 40, "shrinking never takes more");
        drop(r2);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn a_zero_budget_takes_nothing_and_huge_requests_are_refused() {
        let b = budget(0);
        let mut r = Reservation::on(&b);
        assert!(r.grow(0));
        assert!(!r.grow(1));
        let b = budget(u64::MAX);
        let mut r = Reservation::on(&b);
        assert!(!r.grow(u64::MAX), "more than the gauge can count");
        assert!(r.grow(1 << 40));
        assert_eq!(b.in_use(), 1 << 40);
    }

    proptest::proptest! {
        /// Against a model (the sum of what live reservations hold): a reservation grows
        /// exactly when the budget has room, and dropping one gives back all it held.
        #[test]
        fn the_budget_matches_a_model(
            total in 0u64..2_000,
            ops in proptest::collection::vec((0usize..4, 0u64..700, proptest::bool::ANY), 0..60),
        ) {
            let b = budget(total);
            let mut live: Vec<(Reservation, u64)> = Vec::new();
            for (slot, bytes, drop_one) in ops {
                if drop_one && !live.is_empty() {
                    live.remove(slot % live.len());
                } else {
                    let held: u64 = live.iter().map(|(_, n)| n).sum();
                    let mut r = Reservation::on(&b);
                    let grew = r.grow(bytes);
                    proptest::prop_assert_eq!(grew, held + bytes <= total);
                    live.push((r, if grew { bytes } else { 0 }));
                }
                let held: u64 = live.iter().map(|(_, n)| n).sum();
                proptest::prop_assert_eq!(b.in_use(), held);
                proptest::prop_assert!(held <= total);
            }
            drop(live);
            proptest::prop_assert_eq!(b.in_use(), 0);
        }
    }

    #[test]
    fn threads_taking_and_giving_back_never_overdraw() {
        let b = budget(1000);
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let b = b.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for n in 0..20_000u64 {
                        let mut r = Reservation::on(&b);
                        if r.grow(1 + (n * 7 + i) % 300) {
                            peak.fetch_max(b.in_use(), Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 1000);
        assert_eq!(b.in_use(), 0);
    }
}
