//! The quotas' clock: the wall clock, made step-free by [`SteadyClock`].

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime};

use custos_quota::{SteadyClock, Timestamp};

/// The monotonic origin of the clock's readings.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// One clock for the process: every proxy thread and the usage sync give [`Quotas`]
/// (`custos_quota::Quotas`) the same time, so that after a backward step no thread sees
/// another's updates in its future. Held for a few instructions per request.
static CLOCK: Mutex<SteadyClock> = Mutex::new(SteadyClock::new());

/// Quota time for a request whose wall-clock time is `wall` (see [`SteadyClock`]: a wall
/// clock stepped back does not lock principals out).
pub(crate) fn quota_time(wall: SystemTime) -> Timestamp {
    let origin = *ORIGIN.get_or_init(Instant::now);
    let mut clock = CLOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Read under the lock: readings given to the clock never decrease.
    clock.time(wall, origin.elapsed())
}
