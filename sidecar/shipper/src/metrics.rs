//! Prometheus metrics of the shipper.
//!
//! Accounting invariant, per process: every event given to [`Shipper::emit`](crate::Shipper::emit)
//! is counted in `events_emitted`, and ends up either acknowledged by the collector
//! (`events_delivered`), counted in `events_dropped{reason}`, or still pending (in the in-memory
//! queue, in the batch being built or sent, or in the disk spool: `spool_events`). Events found in
//! the spool at start (written by a previous process) are counted as delivered or dropped when
//! their fate is known, but were emitted by the previous process.

use custos_api::collector::IngestResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Label = [(&'static str, &'static str); 1];

/// Why events were dropped; the `reason` label of `custos_audit_events_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The in-memory queue between the request path and the shipper was full.
    QueueFull = 0,
    /// A batch could not be delivered and the disk spool had no room for it.
    SpoolFull = 1,
    /// A batch could not be delivered and writing it to the spool failed (I/O error).
    SpoolError = 2,
    /// The collector refused the batch as malformed (HTTP 4xx other than 401, 408 and 429; 413
    /// only for a single event, larger batches are split).
    Rejected = 3,
    /// A spool record failed its checksum or was torn by a crash and could not be read.
    Corrupt = 4,
    /// The event was emitted after the shipper had shut down.
    Shutdown = 5,
    /// The collector acknowledged fewer events of a batch than were sent, at every one of
    /// [`crate::MAX_SHORT_ACKS`] sends in a row: the events it did not count.
    Unacknowledged = 6,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 7] = [
        DropReason::QueueFull,
        DropReason::SpoolFull,
        DropReason::SpoolError,
        DropReason::Rejected,
        DropReason::Corrupt,
        DropReason::Shutdown,
        DropReason::Unacknowledged,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolError => "spool_error",
            DropReason::Rejected => "rejected",
            DropReason::Corrupt => "corrupt",
            DropReason::Shutdown => "shutdown",
            DropReason::Unacknowledged => "unacknowledged",
        }
    }
}

/// The outcome of one `POST /v1/events`; the `result` label of `custos_audit_batches_sent_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchResult {
    /// 200 with a valid answer: the batch is committed.
    Ok = 0,
    /// No answer within the request timeout (the batch is kept; after two in a row on
    /// connections the collector accepted, a batch of more than 64 events is split in two).
    Timeout = 1,
    /// Connection refused or reset, or another transport error.
    TransportError = 2,
    /// 5xx.
    ServerError = 3,
    /// 408 or 429.
    Throttled = 4,
    /// 401: the token was refused.
    Unauthorized = 5,
    /// Another 4xx: the batch was refused and dropped.
    Rejected = 6,
    /// 200 whose body is not an `IngestResponse`.
    MalformedResponse = 7,
    /// A status the contract does not use (1xx, 2xx other than 200, 3xx).
    UnexpectedStatus = 8,
    /// The token file could not be read; the batch was not sent.
    TokenError = 9,
    /// 413: the batch was split in two and both halves queued (a single event is dropped as
    /// `rejected`).
    TooLarge = 10,
    /// 400 `bad_event`: one event of the batch was refused; that event was dropped (as
    /// `rejected`) and the rest queued, or, when the answer did not say which, the batch was
    /// split in two and both halves queued, so that only the bad event is dropped.
    BadEvent = 11,
    /// 403, 404, 405, 415, or 400 `unsupported_schema_version`: the endpoint, a proxy in
    /// front of it or an older collector refused the request for a reason that is not the
    /// batch's own (a wrong URL, an authorisation layer, a rollout's version skew); kept for
    /// retry.
    Refused = 12,
    /// 200 whose counts cover fewer events than were sent: the batch is sent again (ingest is
    /// idempotent by event id), at most [`crate::MAX_SHORT_ACKS`] times in a row.
    ShortAck = 13,
}

impl BatchResult {
    /// Every result, in label order.
    pub const ALL: [BatchResult; 14] = [
        BatchResult::Ok,
        BatchResult::Timeout,
        BatchResult::TransportError,
        BatchResult::ServerError,
        BatchResult::Throttled,
        BatchResult::Unauthorized,
        BatchResult::Rejected,
        BatchResult::MalformedResponse,
        BatchResult::UnexpectedStatus,
        BatchResult::TokenError,
        BatchResult::TooLarge,
        BatchResult::BadEvent,
        BatchResult::Refused,
        BatchResult::ShortAck,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchResult::Ok => "ok",
            BatchResult::Timeout => "timeout",
            BatchResult::TransportError => "transport_error",
            BatchResult::ServerError => "server_error",
            BatchResult::Throttled => "throttled",
            BatchResult::Unauthorized => "unauthorized",
            BatchResult::Rejected => "rejected",
            BatchResult::MalformedResponse => "malformed_response",
            BatchResult::UnexpectedStatus => "unexpected_status",
            BatchResult::TokenError => "token_error",
            BatchResult::TooLarge => "too_large",
            BatchResult::BadEvent => "bad_event",
            BatchResult::Refused => "refused",
            BatchResult::ShortAck => "short_ack",
        }
    }
}

/// The shipper's metrics. Cheap to clone (all clones share the same values).
///
/// Registered names (see [`ShipperMetrics::register`]):
///
/// | name | type | meaning |
/// |---|---|---|
/// | `custos_audit_events_emitted_total` | counter | events handed to the shipper |
/// | `custos_audit_events_delivered_total` | counter | events in batches the collector acknowledged |
/// | `custos_audit_events_duplicate_total` | counter | of those, events the collector already had (resends) |
/// | `custos_audit_events_expired_total` | counter | of those, events older than what the collector's retention already deleted, or than its `--max-event-age` (not stored) |
/// | `custos_audit_events_dropped_total{reason}` | counter | events lost, by [`DropReason`] |
/// | `custos_audit_spool_bytes` | gauge | disk used by the spool's segment files |
/// | `custos_audit_spool_records` | gauge | batches waiting in the spool |
/// | `custos_audit_spool_events` | gauge | events waiting in the spool |
/// | `custos_audit_spool_corrupt_records_total` | counter | spool records lost to corruption or torn writes |
/// | `custos_audit_batches_sent_total{result}` | counter | `POST /v1/events` attempts, by [`BatchResult`] |
/// | `custos_audit_delivery_latency_seconds` | histogram | duration of acknowledged `POST /v1/events` |
#[derive(Clone, Debug)]
pub struct ShipperMetrics {
    events_emitted: Counter,
    events_delivered: Counter,
    events_duplicate: Counter,
    events_expired: Counter,
    events_dropped: Family<Label, Counter>,
    spool_bytes: Gauge,
    spool_records: Gauge,
    spool_events: Gauge,
    spool_corrupt_records: Counter,
    batches_sent: Family<Label, Counter>,
    delivery_latency: Histogram,
    /// Handles on the `events_dropped` series, indexed like [`DropReason::ALL`] (no lock on use).
    dropped_by_reason: [Counter; DropReason::ALL.len()],
    /// Handles on the `batches_sent` series, indexed like [`BatchResult::ALL`].
    batches_by_result: [Counter; BatchResult::ALL.len()],
}

impl Default for ShipperMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ShipperMetrics {
    /// New metrics, all zero. Every `reason` and `result` series exists from the start, so that
    /// rates and alerts work before the first drop.
    pub fn new() -> Self {
        let events_dropped: Family<Label, Counter> = Family::default();
        let batches_sent: Family<Label, Counter> = Family::default();
        let dropped_by_reason = DropReason::ALL
            .map(|reason| events_dropped.get_or_create(&[("reason", reason.as_str())]).clone());
        let batches_by_result =
            BatchResult::ALL.map(|result| batches_sent.get_or_create(&[("result", result.as_str())]).clone());
        ShipperMetrics {
            events_emitted: Counter::default(),
            events_delivered: Counter::default(),
            events_duplicate: Counter::default(),
            events_expired: Counter::default(),
            events_dropped,
            spool_bytes: Gauge::default(),
            spool_records: Gauge::default(),
            spool_events: Gauge::default(),
            spool_corrupt_records: Counter::default(),
            batches_sent,
            delivery_latency: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            dropped_by_reason,
            batches_by_result,
        }
    }

    /// Registers every metric in `registry` (names in the type's documentation).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "custos_audit_events_emitted",
            "Audit events handed to the shipper",
            self.events_emitted.clone(),
        );
        registry.register(
            "custos_audit_events_delivered",
            "Audit events in batches the collector acknowledged (stored, already stored, or expired)",
            self.events_delivered.clone(),
        );
        registry.register(
            "custos_audit_events_duplicate",
            "Audit events the collector reported as already stored (resent batches)",
            self.events_duplicate.clone(),
        );
        registry.register(
            "custos_audit_events_expired",
            "Audit events the collector acknowledged without storing: older than what its retention already deleted, or than its --max-event-age",
            self.events_expired.clone(),
        );
        registry.register(
            "custos_audit_events_dropped",
            "Audit events lost, by reason",
            self.events_dropped.clone(),
        );
        registry.register(
            "custos_audit_spool_bytes",
            "Bytes used on disk by the audit spool",
            self.spool_bytes.clone(),
        );
        registry.register(
            "custos_audit_spool_records",
            "Batches waiting in the audit spool",
            self.spool_records.clone(),
        );
        registry.register(
            "custos_audit_spool_events",
            "Audit events waiting in the audit spool",
            self.spool_events.clone(),
        );
        registry.register(
            "custos_audit_spool_corrupt_records",
            "Audit spool records lost to a failed checksum or a torn write",
            self.spool_corrupt_records.clone(),
        );
        registry.register(
            "custos_audit_batches_sent",
            "Attempts to send a batch of audit events to the collector, by result",
            self.batches_sent.clone(),
        );
        registry.register(
            "custos_audit_delivery_latency_seconds",
            "Duration of acknowledged batch deliveries to the collector",
            self.delivery_latency.clone(),
        );
    }

    /// Events handed to the shipper.
    pub fn events_emitted(&self) -> u64 {
        self.events_emitted.get()
    }

    /// Events acknowledged by the collector.
    pub fn events_delivered(&self) -> u64 {
        self.events_delivered.get()
    }

    /// Events the collector reported as duplicates.
    pub fn events_duplicate(&self) -> u64 {
        self.events_duplicate.get()
    }

    /// Events the collector reported as expired (older than its retention or its maximum
    /// event age).
    pub fn events_expired(&self) -> u64 {
        self.events_expired.get()
    }

    /// Events dropped for `reason`.
    pub fn events_dropped(&self, reason: DropReason) -> u64 {
        self.dropped_by_reason[reason as usize].get()
    }

    /// Events dropped for any reason.
    pub fn events_dropped_total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.events_dropped(*r)).sum()
    }

    /// Batch sends with `result`.
    pub fn batches_sent(&self, result: BatchResult) -> u64 {
        self.batches_by_result[result as usize].get()
    }

    /// Disk bytes used by the spool.
    pub fn spool_bytes(&self) -> u64 {
        u64::try_from(self.spool_bytes.get()).unwrap_or(0)
    }

    /// Records (batches) waiting in the spool.
    pub fn spool_records(&self) -> u64 {
        u64::try_from(self.spool_records.get()).unwrap_or(0)
    }

    /// Events waiting in the spool.
    pub fn spool_events(&self) -> u64 {
        u64::try_from(self.spool_events.get()).unwrap_or(0)
    }

    /// Spool records lost to corruption.
    pub fn spool_corrupt_records(&self) -> u64 {
        self.spool_corrupt_records.get()
    }

    pub(crate) fn emitted(&self) {
        self.events_emitted.inc();
    }

    /// Counts `n` dropped events; returns the new total for `reason`.
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) -> u64 {
        self.dropped_by_reason[reason as usize].inc_by(n) + n
    }

    pub(crate) fn delivered(&self, events: u64, response: &IngestResponse, latency_seconds: f64) {
        self.events_delivered.inc_by(events);
        self.events_duplicate.inc_by(response.duplicates);
        self.events_expired.inc_by(response.expired);
        self.delivery_latency.observe(latency_seconds);
    }

    pub(crate) fn batch(&self, result: BatchResult) {
        self.batches_by_result[result as usize].inc();
    }

    pub(crate) fn corrupt_record(&self, events: u64) {
        self.spool_corrupt_records.inc();
        self.dropped(DropReason::Corrupt, events);
    }

    pub(crate) fn set_spool(&self, bytes: u64, records: u64, events: u64) {
        self.spool_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.spool_records.set(i64::try_from(records).unwrap_or(i64::MAX));
        self.spool_events.set(i64::try_from(events).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes_every_series() {
        let metrics = ShipperMetrics::new();
        metrics.dropped(DropReason::SpoolFull, 3);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        assert!(prometheus_client::encoding::text::encode(&mut text, &registry).is_ok());
        assert!(text.contains("custos_audit_events_dropped_total{reason=\"spool_full\"} 3"));
        assert!(text.contains("custos_audit_events_dropped_total{reason=\"queue_full\"} 0"));
        assert!(text.contains("custos_audit_batches_sent_total{result=\"ok\"} 0"));
        assert!(text.contains("custos_audit_spool_bytes 0"));
        assert_eq!(metrics.events_dropped_total(), 3);
    }

    #[test]
    fn discriminants_index_the_all_arrays() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        for (i, result) in BatchResult::ALL.iter().enumerate() {
            assert_eq!(*result as usize, i);
        }
    }
}
