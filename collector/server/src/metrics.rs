//! Prometheus metrics of the collector, served at `/metrics` (OpenMetrics text).
//!
//! Every label has a bounded set of values: `reason` codes, store operations, route templates
//! (never raw paths), HTTP statuses and detector names.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

fn store_histogram() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

struct Inner {
    registry: Registry,
    events_ingested: Counter,
    events_duplicate: Counter,
    events_expired: Counter,
    batches_rejected: Family<ReasonLabel, Counter>,
    store_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    requests: Family<RequestLabels, Counter>,
    prune_deleted: Counter,
    prune_runs: Family<ResultLabel, Counter>,
    retention_halted: Gauge,
    observer_dropped: Counter,
}

/// The collector's metrics; cheap to clone (all clones update the same series).
#[derive(Clone)]
pub struct CollectorMetrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CollectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorMetrics").finish_non_exhaustive()
    }
}

impl Default for CollectorMetrics {
    fn default() -> Self {
        CollectorMetrics::new()
    }
}

impl CollectorMetrics {
    /// The collector's metrics in a registry of their own.
    pub fn new() -> Self {
        CollectorMetrics::new_in(Registry::default())
    }

    /// The collector's metrics, registered into `registry`, which may already hold other
    /// metrics (e.g. the detectors'): `/metrics` serves the whole registry.
    pub fn new_in(mut registry: Registry) -> Self {
        let events_ingested = Counter::default();
        registry.register(
            "custos_collector_events_ingested",
            "Audit events newly stored (acknowledged to the sender)",
            events_ingested.clone(),
        );
        let events_duplicate = Counter::default();
        registry.register(
            "custos_collector_events_duplicate",
            "Audit events received again (same id) and not stored twice",
            events_duplicate.clone(),
        );
        let events_expired = Counter::default();
        registry.register(
            "custos_collector_events_expired",
            "Audit events received older than what retention already deleted or than --max-event-age: acknowledged, not stored",
            events_expired.clone(),
        );
        let batches_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "custos_collector_batches_rejected",
            "Ingest requests answered with an error, by reason code",
            batches_rejected.clone(),
        );
        let store_seconds =
            Family::<OpLabel, Histogram, fn() -> Histogram>::new_with_constructor(store_histogram);
        registry.register(
            "custos_collector_store_seconds",
            "Duration of audit store operations, by operation",
            store_seconds.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "custos_collector_requests",
            "HTTP requests, by route template and status",
            requests.clone(),
        );
        let prune_deleted = Counter::default();
        registry.register(
            "custos_collector_prune_deleted",
            "Audit events deleted by retention",
            prune_deleted.clone(),
        );
        let prune_runs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "custos_collector_prune_runs",
            "Retention runs, by result (ok, error, chain_broken)",
            prune_runs.clone(),
        );
        let retention_halted = Gauge::default();
        registry.register(
            "custos_collector_retention_halted",
            "1 when retention stopped because the chain to be pruned does not verify",
            retention_halted.clone(),
        );
        let observer_dropped = Counter::default();
        registry.register(
            "custos_collector_observer_dropped_events",
            "Stored events not handed to the detectors because their queue was full or closed",
            observer_dropped.clone(),
        );
        CollectorMetrics {
            inner: Arc::new(Inner {
                registry,
                events_ingested,
                events_duplicate,
                events_expired,
                batches_rejected,
                store_seconds,
                requests,
                prune_deleted,
                prune_runs,
                retention_halted,
                observer_dropped,
            }),
        }
    }

    /// The registry served at `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry) {
            tracing::warn!(%error, "metrics encoding failed");
        }
        text
    }

    pub(crate) fn ingested(&self, outcome: custos_store::IngestOutcome) {
        self.inner.events_ingested.inc_by(outcome.accepted);
        self.inner.events_duplicate.inc_by(outcome.duplicates);
        self.inner.events_expired.inc_by(outcome.expired);
    }

    pub(crate) fn batch_rejected(&self, reason: &'static str) {
        self.inner.batches_rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn store_op(&self, op: &'static str, elapsed: Duration) {
        self.inner.store_seconds.get_or_create(&OpLabel { op }).observe(elapsed.as_secs_f64());
    }

    pub(crate) fn request(&self, endpoint: &str, status: u16) {
        self.inner.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_owned(), status }).inc();
    }

    pub(crate) fn pruned(&self, deleted: u64) {
        self.inner.prune_deleted.inc_by(deleted);
    }

    pub(crate) fn prune_run(&self, result: &'static str) {
        self.inner.prune_runs.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn retention_halted(&self) {
        self.inner.retention_halted.set(1);
    }

    /// Returns the new total.
    pub(crate) fn observer_dropped(&self, events: u64) -> u64 {
        self.inner.observer_dropped.inc_by(events) + events
    }
}

/// Maps a reason code (a `&str` from an [`ApiError`](crate::ApiError)) to its static label.
pub(crate) fn static_reason(reason: &str) -> &'static str {
    use crate::error::reason::*;
    const ALL: [&str; 24] = [
        MISSING_TOKEN,
        INVALID_TOKEN,
        TOKEN_UNAVAILABLE,
        NAMESPACE_TOKEN_SCOPE,
        WRONG_NAMESPACE,
        BAD_EVENT,
        EMPTY_BATCH,
        UNSUPPORTED_SCHEMA_VERSION,
        BATCH_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        BAD_ENCODING,
        BODY_TIMEOUT,
        BAD_BODY,
        STORE_UNAVAILABLE,
        STORE_CORRUPT,
        BAD_QUERY,
        BAD_SUBJECT_HASH,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        QUERY_TIMEOUT,
        QUERIES_BUSY,
        SHUTTING_DOWN,
        INTERNAL,
        "other",
    ];
    ALL.iter().copied().find(|r| *r == reason).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_exposed_under_the_documented_names() {
        let m = CollectorMetrics::new();
        m.ingested(custos_store::IngestOutcome { accepted: 3, duplicates: 1, expired: 2 });
        m.batch_rejected("bad_event");
        m.store_op("ingest", Duration::from_millis(2));
        m.request("/v1/events", 200);
        m.pruned(5);
        let text = m.encode();
        for needle in [
            "custos_collector_events_ingested_total 3",
            "custos_collector_events_duplicate_total 1",
            "custos_collector_events_expired_total 2",
            "custos_collector_batches_rejected_total{reason=\"bad_event\"} 1",
            "custos_collector_store_seconds_count{op=\"ingest\"} 1",
            "custos_collector_requests_total{endpoint=\"/v1/events\",status=\"200\"} 1",
            "custos_collector_prune_deleted_total 5",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn unknown_reasons_collapse_to_other() {
        assert_eq!(static_reason("bad_event"), "bad_event");
        assert_eq!(static_reason("anything else"), "other");
    }
}
