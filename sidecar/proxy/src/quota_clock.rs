//! The quotas' clock: the wall clock, made step-free by [`SteadyClock`].

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use custos_quota::{SteadyClock, Timestamp};

/// The monotonic origin of every thread's [`SteadyClock`].
static ORIGIN: OnceLock<Instant> = OnceLock::new();

thread_local! {
    /// One per thread: no lock on the request path. Each thread's quota time is step-free;
    /// between threads they agree with the wall clock to the millisecond, except while one
    /// slews after a backward step.
    static CLOCK: RefCell<SteadyClock> = RefCell::new(SteadyClock::default());
}

/// Quota time for a request whose wall-clock time is `wall` (see [`SteadyClock`]: a wall
/// clock stepped back does not lock principals out).
pub(crate) fn quota_time(wall: SystemTime) -> Timestamp {
    let mono = ORIGIN.get_or_init(Instant::now).elapsed();
    CLOCK.with(|clock| clock.borrow_mut().time(wall, mono))
}
