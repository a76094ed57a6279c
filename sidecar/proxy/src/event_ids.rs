//! Audit event ids: ULIDs whose 80 random bits are this process's *instance tag* (the first
//! 40, drawn once at start), a 12-bit counter and 28 random bits drawn per event. Ids stay
//! unique (within the process and millisecond by the counter, up to 4,096 events a
//! millisecond; across processes by the tag) and unguessable (28 random bits: the collector
//! takes each id once, so an id guessed ahead would let a sender with any namespace's token
//! suppress another's event), and the collector can tell this process's events from the
//! others': the usage a sidecar fetches names its tag (`instance=`) and gets the figures
//! without its own events too, so that what it has counted but not yet delivered does not
//! lower the other replicas' usage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the tag, and of the rest, in an id's random part.
const HALF: u32 = 40;
const MASK: u64 = (1 << HALF) - 1;
/// Random bits per event, below the counter.
const RANDOM_BITS: u32 = 28;
/// The counter's bits, above them.
const COUNTER_MASK: u64 = (1 << (HALF - RANDOM_BITS)) - 1;

/// The ids of one process's events.
#[derive(Debug)]
pub(crate) struct EventIds {
    tag: u64,
    counter: AtomicU64,
    /// The tag as the ids spell it (their characters 11 to 18).
    tag_text: String,
}

impl EventIds {
    /// A new tag and counter, from the `ulid` crate's random source.
    pub(crate) fn new() -> EventIds {
        let random = ulid::Ulid::new().random();
        // Truncations keep the low bits on purpose: 40 of the 80 random bits each.
        let tag = ((random >> HALF) as u64) & MASK;
        let counter = (random as u64) & MASK;
        let tag_text = ulid::Ulid::from_parts(0, u128::from(tag) << HALF).to_string()[10..18].to_string();
        EventIds { tag, counter: AtomicU64::new(counter), tag_text }
    }

    /// The id of an event of a request that arrived at `wall`.
    pub(crate) fn next(&self, wall: SystemTime) -> String {
        let ms =
            wall.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
        // Truncation keeps the low bits on purpose. (`from_datetime` draws the random part
        // without reading the clock again, as the ids before the tag were made.)
        let random = (ulid::Ulid::from_datetime(wall).random() as u64) & ((1 << RANDOM_BITS) - 1);
        let low = ((counter << RANDOM_BITS) | random) & MASK;
        ulid::Ulid::from_parts(ms, (u128::from(self.tag) << HALF) | u128::from(low)).to_string()
    }

    /// This process's instance tag, as the ids spell it.
    pub(crate) fn instance(&self) -> &str {
        &self.tag_text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;

    /// The counter field of an id.
    fn counter_of(id: &str) -> u64 {
        ((ulid::Ulid::from_string(id).unwrap().random() as u64) >> RANDOM_BITS) & COUNTER_MASK
    }

    #[test]
    fn ids_are_ulids_of_the_time_carrying_the_tag_and_never_repeat() {
        let ids = EventIds::new();
        let wall = UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        let mut seen = HashSet::new();
        let mut counters = HashSet::new();
        // A whole turn of the counter in one millisecond: every counter value once, so the ids
        // are unique by the counter alone.
        for _ in 0..=COUNTER_MASK {
            let id = ids.next(wall);
            let parsed = ulid::Ulid::from_string(&id).unwrap();
            assert_eq!(parsed.timestamp_ms(), 1_765_000_000_123);
            assert_eq!(&id[10..18], ids.instance(), "{id}");
            assert!(counters.insert(counter_of(&id)), "{id}");
            assert!(seen.insert(id));
        }
        assert_eq!(counters.len() as u64, COUNTER_MASK + 1);
        assert!(custos_api::collector::is_instance_tag(ids.instance()), "{}", ids.instance());
        // Another process: another tag (2^-40 to collide).
        assert_ne!(EventIds::new().instance(), ids.instance());
    }

    #[test]
    fn the_counter_wraps_within_its_bits_without_touching_the_tag() {
        let ids = EventIds { counter: AtomicU64::new(COUNTER_MASK), ..EventIds::new() };
        let wall = UNIX_EPOCH + Duration::from_millis(5);
        let (a, b) = (ids.next(wall), ids.next(wall));
        assert_eq!((&a[10..18], &b[10..18]), (ids.instance(), ids.instance()));
        assert_eq!((counter_of(&a), counter_of(&b)), (COUNTER_MASK, 0));
    }
}
