//! Per-namespace retry back-off of failed reconciles: 2 s, 4 s, 8 s … up to 5 minutes,
//! reset by a success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const FIRST: Duration = Duration::from_secs(2);
const MAX: Duration = Duration::from_secs(300);

/// Consecutive failures per namespace.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `namespace`; returns how long to wait before retrying.
    pub(crate) fn failed(&self, namespace: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(namespace.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
        FIRST.saturating_mul(factor).min(MAX)
    }

    /// Records a success of `namespace`.
    pub(crate) fn succeeded(&self, namespace: &str) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(namespace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets_on_success() {
        let b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.failed("shop").as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(b.failed("billing").as_secs(), 2, "per namespace");
        b.succeeded("shop");
        assert_eq!(b.failed("shop").as_secs(), 2);
    }
}
