//! Explicit time: every operation of [`Quotas`](crate::Quotas) takes the current time as a
//! [`Timestamp`], so that the crate never reads a clock and tests are deterministic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: whole milliseconds since the Unix epoch (UTC).
///
/// The sidecar builds it from its wall clock (`Timestamp::from(SystemTime::now())`); tests build
/// it from literal numbers. Wall-clock time is used (not a monotonic clock) because it is
/// compared with the collector's `asOf`; a clock that steps backwards never refills a bucket
/// and never expires a record early (see the crate documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// `millis` milliseconds since the Unix epoch.
    pub const fn from_millis(millis: u64) -> Timestamp {
        Timestamp(millis)
    }

    /// `secs` seconds since the Unix epoch (saturating).
    pub const fn from_secs(secs: u64) -> Timestamp {
        Timestamp(secs.saturating_mul(1_000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This time plus `d`, saturating at the largest representable time; sub-millisecond
    /// parts of `d` are dropped.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// This time minus `d`, saturating at the epoch; sub-millisecond parts of `d` are dropped.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// The time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl From<SystemTime> for Timestamp {
    /// Times before the epoch map to the epoch; times past `u64::MAX` ms saturate.
    fn from(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(duration_millis(d)),
            Err(_) => Timestamp::EPOCH,
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(t.0)
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturating, like [`Timestamp::saturating_add`].
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturating, like [`Timestamp::saturating_sub`].
    fn sub(self, d: Duration) -> Timestamp {
        self.saturating_sub(d)
    }
}

/// Whole milliseconds of `d`, saturating at `u64::MAX`.
pub(crate) fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(Timestamp::from_secs(3).as_millis(), 3_000);
        assert_eq!(Timestamp::from_secs(u64::MAX).as_millis(), u64::MAX);
        let t = Timestamp::from_millis(1_500);
        assert_eq!(t + Duration::from_millis(500), Timestamp::from_secs(2));
        assert_eq!(t.saturating_sub(Duration::from_secs(10)), Timestamp::EPOCH);
        assert_eq!(Timestamp::from_secs(5).saturating_duration_since(t), Duration::from_millis(3_500));
        assert_eq!(t.saturating_duration_since(Timestamp::from_secs(5)), Duration::ZERO);
        assert_eq!(Timestamp::from(UNIX_EPOCH - Duration::from_secs(1)), Timestamp::EPOCH);
        let st = UNIX_EPOCH + Duration::from_millis(1_234_567);
        assert_eq!(SystemTime::from(Timestamp::from(st)), st);
        assert_eq!(
            Timestamp::from_millis(u64::MAX) + Duration::from_secs(1),
            Timestamp::from_millis(u64::MAX)
        );
    }
}
