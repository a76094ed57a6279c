//! The post-commit hook: newly stored events handed to an in-process consumer (the detectors).
//!
//! After every successful ingest that stored at least one new event, the collector offers the
//! events it newly stored to the channel set in
//! [`CollectorConfig::observer`](crate::CollectorConfig::observer) with `try_send`: the
//! acknowledgement to the sender never waits for the consumer. When the channel is full (or
//! closed) the batch is not delivered and its events are counted in
//! `custos_collector_observer_dropped_events_total`; size the channel for bursts.
//!
//! Each stored event is offered once: the events of a resent batch that were already stored
//! (even long ago, or before a restart) are left out, as are later copies of an id repeated
//! within a batch. Events carry the sender's fields; the store's `prevHash` is not filled in.

use custos_api::AuditEvent;

/// The events of one batch the store has durably committed as new.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredBatch {
    /// The events this commit stored (at least 1), in request order.
    pub events: Vec<AuditEvent>,
    /// Events of the request that were not stored because their id was already stored (or
    /// repeated within the request): not in [`Self::events`].
    pub duplicates: u64,
}
