//! The post-commit hook: newly stored events handed to an in-process consumer (the detectors).
//!
//! After every successful ingest that stored at least one new event, the collector offers the
//! committed batch to the channel set in
//! [`CollectorConfig::observer`](crate::CollectorConfig::observer) with `try_send`: the
//! acknowledgement to the sender never waits for the consumer. When the channel is full (or
//! closed) the batch is not delivered and its events are counted in
//! `custos_collector_observer_dropped_events_total`; size the channel for bursts.
//!
//! The store reports counts, not which ids were new, so a batch that was partly a resend comes
//! whole ([`StoredBatch::all_new`] is `false`): consumers dedupe by event id, e.g. with
//! [`RecentIds`]. Events carry the sender's fields; the store's `prevHash` is not filled in.

use std::collections::{HashSet, VecDeque};

use custos_api::AuditEvent;

/// A batch the store has durably committed.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredBatch {
    /// Every event of the committed batch, in request order.
    pub events: Vec<AuditEvent>,
    /// Events the store newly stored (at least 1).
    pub accepted: u64,
    /// Events of the batch that were already stored (or repeated within the batch).
    pub duplicates: u64,
}

impl StoredBatch {
    /// Whether every event of the batch was newly stored (no resend, no repeat): no dedupe
    /// needed.
    pub fn all_new(&self) -> bool {
        self.duplicates == 0
    }
}

/// A bounded set of recently seen event ids, for consumers of [`StoredBatch`]es to skip events
/// they were already given (a resent batch). The oldest ids are forgotten first; an event
/// resent after more than `capacity` other events may be seen twice, and events stored before
/// a restart of the collector are not known.
#[derive(Clone, Debug)]
pub struct RecentIds {
    capacity: usize,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// Remembers up to `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentIds {
            capacity,
            seen: HashSet::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
        }
    }

    /// Records `id`; returns whether it was not seen (recently) before.
    pub fn first_seen(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }

    /// The events of `batch` not seen before, recording them all.
    pub fn new_events(&mut self, batch: StoredBatch) -> Vec<AuditEvent> {
        batch.events.into_iter().filter(|e| self.first_seen(&e.id)).collect()
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest_first() {
        let mut ids = RecentIds::new(2);
        assert!(ids.first_seen("a"));
        assert!(!ids.first_seen("a"));
        assert!(ids.first_seen("b"));
        assert!(ids.first_seen("c"));
        assert_eq!(ids.len(), 2);
        assert!(!ids.first_seen("b"));
        assert!(!ids.first_seen("c"));
        assert!(ids.first_seen("a"), "a was forgotten");
    }
}
