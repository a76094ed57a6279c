//! Rolling-window counters: sparse, time-ordered buckets of fixed granularity.

use std::collections::VecDeque;

/// Milliseconds in a second, minute, hour and day.
pub(crate) const SECOND_MS: u64 = 1_000;
/// Milliseconds in a minute.
pub(crate) const MINUTE_MS: u64 = 60 * SECOND_MS;
/// Milliseconds in an hour.
pub(crate) const HOUR_MS: u64 = 60 * MINUTE_MS;
/// Milliseconds in a day.
pub(crate) const DAY_MS: u64 = 24 * HOUR_MS;

/// The shape of a rolling window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spec {
    /// Bucket width, ms.
    pub granularity: u64,
    /// Window length, ms.
    pub length: u64,
    /// How long a bucket is kept after it left the window, ms, so that the count of a window
    /// ending slightly in the past (the collector's `asOf`) can still be computed.
    pub retention: u64,
}

/// Requests admitted, per second, over the last minute (subtracted from the cluster figure).
pub(crate) const REQUESTS: Spec =
    Spec { granularity: SECOND_MS, length: MINUTE_MS, retention: 15 * SECOND_MS };
/// Records returned, per minute, over the last hour.
pub(crate) const HOUR: Spec = Spec { granularity: MINUTE_MS, length: HOUR_MS, retention: 15 * MINUTE_MS };
/// Records returned, per quarter hour, over the last day.
pub(crate) const DAY: Spec = Spec { granularity: 15 * MINUTE_MS, length: DAY_MS, retention: HOUR_MS };

/// A rolling counter. Only non-empty buckets are stored, oldest first, so an idle or light
/// principal costs a few bytes and a heavy one at most `(length + retention) / granularity + 1`
/// buckets.
#[derive(Clone, Debug, Default)]
pub(crate) struct Window {
    /// (bucket index = time / granularity, count), strictly increasing indices.
    buckets: VecDeque<(u32, u64)>,
}

impl Spec {
    fn index(self, now: u64) -> u32 {
        u32::try_from(now / self.granularity).unwrap_or(u32::MAX)
    }

    fn start(self, idx: u32) -> u64 {
        u64::from(idx).saturating_mul(self.granularity)
    }

    /// When a bucket's count stops counting: `length` after the bucket's end, so every
    /// event is counted for at least `length` and at most `length + granularity`.
    pub(crate) fn expiry(self, idx: u32) -> u64 {
        self.start(idx).saturating_add(self.granularity).saturating_add(self.length)
    }
}

impl Window {
    /// Counts `n` events at `now`. If the clock went backwards, the events go into the newest
    /// bucket, which keeps them at least as long as their own would.
    pub(crate) fn add(&mut self, spec: Spec, now: u64, n: u64) {
        if n == 0 {
            return;
        }
        let idx = spec.index(now);
        match self.buckets.back_mut() {
            Some((last, count)) if *last >= idx => *count = count.saturating_add(n),
            _ => self.buckets.push_back((idx, n)),
        }
    }

    /// Drops the buckets that are past their window and their retention.
    pub(crate) fn prune(&mut self, spec: Spec, now: u64) {
        while let Some(&(idx, _)) = self.buckets.front() {
            if spec.expiry(idx).saturating_add(spec.retention) <= now {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Whether the window holds nothing, counting retained buckets, as of `now`.
    pub(crate) fn is_clear(&self, spec: Spec, now: u64) -> bool {
        self.buckets.iter().all(|&(idx, _)| spec.expiry(idx).saturating_add(spec.retention) <= now)
    }

    /// Events counted at `now`: every bucket not yet expired (including buckets "from the
    /// future" if the clock went backwards).
    pub(crate) fn used(&self, spec: Spec, now: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|&&(idx, _)| spec.expiry(idx) > now)
            .fold(0, |acc, &(_, count)| acc.saturating_add(count))
    }

    /// Events in the window ending at `t` (a past time), by bucket: every bucket that started
    /// at or before `t` and had not expired at `t`. Over-counts by at most the two boundary
    /// buckets, never under-counts while `t` is within the retention.
    pub(crate) fn used_at(&self, spec: Spec, t: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|&&(idx, _)| spec.start(idx) <= t && spec.expiry(idx) > t)
            .fold(0, |acc, &(_, count)| acc.saturating_add(count))
    }

    /// `(expiry time, count)` of the buckets counted at `now`, oldest first.
    pub(crate) fn expiries(&self, spec: Spec, now: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets.iter().map(move |&(idx, count)| (spec.expiry(idx), count)).filter(move |&(e, _)| e > now)
    }

    /// Gives back memory held by a deque that has shrunk well below its capacity.
    pub(crate) fn shrink(&mut self) {
        if self.buckets.capacity() > 2 * self.buckets.len() + 4 {
            self.buckets.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_expire_after_length_past_their_end() {
        let mut w = Window::default();
        w.add(HOUR, 30_000, 5); // bucket [0, 60 s)
        w.add(HOUR, 59_999, 1);
        w.add(HOUR, 60_000, 2); // bucket [60 s, 120 s)
        assert_eq!(w.used(HOUR, 60_000), 8);
        assert_eq!(w.used(HOUR, HOUR_MS + 59_999), 8);
        assert_eq!(w.used(HOUR, HOUR_MS + 60_000), 2);
        assert_eq!(w.used(HOUR, HOUR_MS + 120_000), 0);
        assert_eq!(
            w.expiries(HOUR, 0).collect::<Vec<_>>(),
            vec![(HOUR_MS + 60_000, 6), (HOUR_MS + 120_000, 2)]
        );
        assert_eq!(w.used_at(HOUR, 59_000), 6);
        assert!(!w.is_clear(HOUR, HOUR_MS + 120_000));
        w.prune(HOUR, HOUR_MS + 120_000 + HOUR.retention);
        assert!(w.is_clear(HOUR, 0));
        assert_eq!(w.buckets.len(), 0);
    }

    #[test]
    fn clock_going_back_counts_in_newest_bucket() {
        let mut w = Window::default();
        w.add(REQUESTS, 10_000, 1);
        w.add(REQUESTS, 5_000, 1);
        assert_eq!(w.buckets.len(), 1);
        assert_eq!(w.used(REQUESTS, 5_000), 2);
        w.add(REQUESTS, 5_000, 0);
        assert_eq!(w.used(REQUESTS, 5_000), 2);
    }
}
