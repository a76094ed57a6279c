//! Explicit time: every operation of [`Quotas`](crate::Quotas) takes the current time as a
//! [`Timestamp`], so that the crate never reads a clock and tests are deterministic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: whole milliseconds since the Unix epoch (UTC).
///
/// The sidecar builds it from its wall clock (`Timestamp::from(SystemTime::now())`); tests build
/// it from literal numbers. Wall-clock time is used (not a monotonic clock) because it is
/// compared with the collector's `asOf`. A clock stepped backwards would refill no bucket and
/// expire no record until it is back where it was: the sidecar's readings go through a
/// [`SteadyClock`], which never goes back.
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

/// Quota time from wall-clock readings that never steps backwards: what the sidecar gives
/// [`Quotas`](crate::Quotas).
///
/// A wall clock stepped back by `Δ` (NTP correcting a clock that ran ahead, an operator's
/// `date -s`) would leave every bucket and window updated in the last `Δ` "in the future":
/// no request token refills, and no record expires, until the clock is back where it was, so
/// an active principal would be refused for up to `Δ`. This clock holds still instead, then
/// runs at half speed until it meets the wall clock again (after `2Δ`): quotas refill at half
/// their rate meanwhile, stricter but never locked. Forward steps and normal time are the wall
/// clock's own.
#[derive(Clone, Debug, Default)]
pub struct SteadyClock {
    /// The last time given (since the Unix epoch, to the nanosecond), and the monotonic
    /// reading it was given at.
    last: Option<(Duration, Duration)>,
    /// How far this clock is ahead of the wall clock (shrinking at half the elapsed time).
    ahead: Duration,
}

impl SteadyClock {
    /// A clock that has given no time yet.
    pub const fn new() -> SteadyClock {
        SteadyClock { last: None, ahead: Duration::ZERO }
    }

    /// The quota time for the wall-clock reading `wall`, taken at `mono` on a monotonic clock
    /// (any origin, e.g. the elapsed time of a process-wide `Instant`; readings given to one
    /// `SteadyClock` must not decrease). Never earlier than the time it gave before.
    pub fn time(&mut self, wall: SystemTime, mono: Duration) -> Timestamp {
        let wall = wall.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        if let Some((last, at)) = self.last {
            self.ahead = self.ahead.saturating_sub(mono.saturating_sub(at) / 2);
            if wall.saturating_add(self.ahead) < last {
                self.ahead = last - wall;
            }
        }
        let now = wall.saturating_add(self.ahead);
        self.last = Some((now, mono));
        Timestamp(duration_millis(now))
    }
}

/// Whole milliseconds of `d`, saturating at `u64::MAX`.
pub(crate) fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_steady_clock_follows_the_wall_and_slews_after_a_backward_step() {
        let base = UNIX_EPOCH + Duration::from_secs(1_000);
        let wall = |n: u64| base + ms(n);
        let t = |n: u64| Timestamp::from(wall(n));
        let mut clock = SteadyClock::default();
        // Normal time and a forward step: the wall clock's own.
        assert_eq!(clock.time(wall(0), ms(0)), t(0));
        assert_eq!(clock.time(wall(500), ms(500)), t(500));
        assert_eq!(clock.time(wall(60_000), ms(600)), t(60_000), "forward step followed");
        // Stepped back by 10 s: holds still, then gains half a millisecond per millisecond.
        assert_eq!(clock.time(wall(50_000), ms(600)), t(60_000));
        assert_eq!(clock.time(wall(52_000), ms(2_600)), t(61_000));
        assert_eq!(clock.time(wall(60_000), ms(10_600)), t(65_000));
        // Met again after twice the step: the wall clock from then on.
        assert_eq!(clock.time(wall(70_000), ms(20_600)), t(70_000));
        assert_eq!(clock.time(wall(70_001), ms(20_601)), t(70_001));
        // Readings a tenth of a millisecond apart add up during a slew as well.
        let mut clock = SteadyClock::default();
        clock.time(wall(10_000), Duration::ZERO);
        clock.time(wall(0), Duration::ZERO);
        let mut elapsed = Duration::ZERO;
        for _ in 0..10_000 {
            elapsed += Duration::from_micros(100);
            clock.time(wall(0) + elapsed, elapsed);
        }
        assert_eq!(clock.time(wall(1_000), ms(1_000)), t(10_500));
    }

    proptest! {
        /// Whatever the wall clock does, quota time never goes back and never lags it; while
        /// the wall clock does not step, quota time runs at least half as fast.
        #[test]
        fn steady_clock_never_goes_back(
            steps in proptest::collection::vec((0u64..10_000, proptest::option::of(-5_000_000i64..5_000_000)), 1..200)
        ) {
            let base = UNIX_EPOCH + Duration::from_secs(10_000);
            let mut clock = SteadyClock::default();
            let (mut mono, mut offset, mut last) = (Duration::ZERO, 0i64, None::<(Timestamp, Duration, u64)>);
            for (elapsed, step) in steps {
                mono += ms(elapsed);
                offset += step.unwrap_or(0);
                let wall_ms = (mono.as_millis() as i64 + offset).max(0) as u64;
                let now = clock.time(base + ms(wall_ms), mono);
                prop_assert!(now >= Timestamp::from(base + ms(wall_ms)));
                if let Some((before, at, wall_before)) = last {
                    prop_assert!(now >= before);
                    if wall_ms == wall_before + elapsed {
                        prop_assert!(now.as_millis() + 1 >= before.as_millis() + (mono - at).as_millis() as u64 / 2);
                    }
                }
                last = Some((now, mono, wall_ms));
            }
        }
    }

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
