//! Log lines that a flood of requests could repeat once a request, said at most once a
//! period instead (the metrics and audit events still count every occurrence).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// At most one "yes" per period, across threads.
pub(crate) struct Throttle {
    /// The period, in seconds.
    period: u64,
    /// When the last "yes" was given, in seconds since the Unix epoch (0: never).
    last: AtomicU64,
}

impl Throttle {
    /// A throttle letting one line through every `period` seconds.
    pub(crate) const fn every_secs(period: u64) -> Self {
        Throttle { period, last: AtomicU64::new(0) }
    }

    /// Whether the line is due now (the first call always is).
    pub(crate) fn due(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs().max(1));
        self.due_at(now)
    }

    fn due_at(&self, now: u64) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        let ready = last == 0 || now >= last.saturating_add(self.period) || now < last;
        ready && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_a_period() {
        let t = Throttle::every_secs(10);
        let said: Vec<bool> =
            [100, 100, 105, 109, 110, 111, 50, 50].iter().map(|&now| t.due_at(now)).collect();
        // A clock set back starts a new period rather than silencing the line for the gap.
        assert_eq!(said, [true, false, false, false, true, false, true, false]);
    }
}
