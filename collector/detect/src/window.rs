//! A sliding-window sum in constant memory: the window is split into [`SLOTS`] slots and the
//! sum covers the current slot and the `SLOTS - 1` before it (so the window is exact to one
//! slot, a tenth of its length).

/// Slots per window.
pub(crate) const SLOTS: usize = 10;

/// Sum of values added within the last window.
#[derive(Clone, Debug, Default)]
pub(crate) struct SlidingSum {
    slots: [u64; SLOTS],
    /// Index (time / slot length) of the newest slot; `None` before the first value.
    head: Option<i64>,
}

impl SlidingSum {
    /// Adds `value` at `t_ms` and returns the window's sum. `t_ms` must not go backwards
    /// (the engine passes each principal's monotonic clock); an older time counts in the
    /// newest slot.
    pub(crate) fn add(&mut self, slot_ms: i64, t_ms: i64, value: u64) -> u64 {
        self.advance(slot_ms, t_ms);
        let head = self.head.unwrap_or(0);
        let i = slot_index(head);
        self.slots[i] = self.slots[i].saturating_add(value);
        self.sum()
    }

    /// Moves the window to `t_ms` (clearing slots that fell out) without adding.
    pub(crate) fn advance(&mut self, slot_ms: i64, t_ms: i64) {
        let idx = t_ms.div_euclid(slot_ms.max(1));
        match self.head {
            None => self.head = Some(idx),
            Some(head) if idx > head => {
                let steps = idx - head;
                if steps >= SLOTS as i64 {
                    self.slots = [0; SLOTS];
                } else {
                    for k in 1..=steps {
                        self.slots[slot_index(head + k)] = 0;
                    }
                }
                self.head = Some(idx);
            }
            Some(_) => {}
        }
    }

    /// The window's sum.
    pub(crate) fn sum(&self) -> u64 {
        self.slots.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Start of the window (ms since the epoch): the start of the oldest slot it covers.
    pub(crate) fn window_start(&self, slot_ms: i64) -> i64 {
        let head = self.head.unwrap_or(0);
        (head - (SLOTS as i64 - 1)).saturating_mul(slot_ms.max(1))
    }
}

fn slot_index(idx: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..SLOTS.
    usize::try_from(idx.rem_euclid(SLOTS as i64)).unwrap_or(0)
}

/// The slot length for a window of `window_ms` (at least 1 ms).
pub(crate) fn slot_ms(window_ms: i64) -> i64 {
    (window_ms / SLOTS as i64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_within_the_window_and_forgets_after() {
        let mut s = SlidingSum::default();
        let slot = 1_000;
        assert_eq!(s.add(slot, 0, 5), 5);
        assert_eq!(s.add(slot, 9_999, 1), 6);
        // 10 s later the first slot falls out.
        assert_eq!(s.add(slot, 10_000, 1), 2);
        assert_eq!(s.window_start(slot), 1_000);
        // Far later everything is gone.
        assert_eq!(s.add(slot, 1_000_000, 3), 3);
        // An older time counts in the newest slot.
        assert_eq!(s.add(slot, 5, 1), 4);
        assert_eq!(s.sum(), 4);
    }

    #[test]
    fn negative_times_do_not_panic() {
        let mut s = SlidingSum::default();
        assert_eq!(s.add(7, -50, 1), 1);
        assert_eq!(s.add(7, i64::MIN / 2, 1), 2);
        assert_eq!(s.add(7, i64::MAX / 2, 1), 1);
        let _ = s.window_start(7);
    }
}
