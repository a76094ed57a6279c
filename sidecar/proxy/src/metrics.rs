//! Prometheus metrics of the sidecar. Label values are codes, policy and rule names and data
//! class names only: never paths, principals or user values.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::latency::{LatencyHistogram, LatencyShard};
use crate::upstream::UpstreamCounters;

/// Labels of `custos_sidecar_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// Allow, Deny or WouldDeny.
    pub decision: &'static str,
    /// Deciding policy ("" when none).
    pub policy: String,
    /// Deciding rule ("" when none).
    pub rule: String,
    /// A reason code (e.g. `deny_rule`, `path_rejected`, `invalid_token`).
    pub reason: &'static str,
}

/// Labels of `custos_sidecar_dry_runs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DryRunLabels {
    /// Allow or WouldDeny: what the Audit-mode policy would have decided.
    pub decision: &'static str,
    /// The Audit-mode policy.
    pub policy: String,
    /// Its matching rule ("" for its default action).
    pub rule: String,
    /// Its reason code (`allow_rule`, `deny_rule`, `default_allow`, `default_deny`).
    pub reason: String,
}

/// Labels naming a policy and rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RuleLabels {
    /// Policy name.
    pub policy: String,
    /// Rule name ("" for a default action).
    pub rule: String,
}

/// Labels with a single `class`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClassLabels {
    /// Data class name.
    pub class: String,
}

/// Labels with a single `limit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabels {
    /// Which limit.
    pub limit: &'static str,
}

/// Labels with a single `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    /// A reason code.
    pub reason: &'static str,
}

/// Labels with a single `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `success` or `failure`; for mesh callers, a `MeshCaller` label.
    pub result: &'static str,
}

/// Every metric the proxy updates.
pub(crate) struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub dry_runs: Family<DryRunLabels, Counter>,
    /// Observed through each proxy thread's shard ([`ThreadCounters::latency`]).
    pub request_duration: LatencyHistogram,
    pub records_served: Family<RuleLabels, Counter>,
    pub records_filtered: Family<RuleLabels, Counter>,
    pub records_truncated: Family<RuleLabels, Counter>,
    pub masked_fields: Family<ClassLabels, Counter>,
    pub quota_rejections: Family<LimitLabels, Counter>,
    pub limit_rejections: Family<LimitLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub transform_failures: Family<ReasonLabels, Counter>,
    pub connections: Gauge,
    /// Failed accepts on the proxy and admin ports (EMFILE and the like).
    pub accept_errors: Counter,
    /// Bytes of request bodies held in memory (see [`crate::budget::BufferBudget`]).
    pub request_buffer_bytes: Gauge,
    pub request_buffer_exhausted: Counter,
    /// Bytes of responses held in memory to be transformed.
    pub response_buffer_bytes: Gauge,
    pub response_buffer_exhausted: Counter,
    /// Bytes held in memory for the dry runs of Audit-mode policies beside the deciding one.
    pub dry_run_buffer_bytes: Gauge,
    pub dry_run_buffer_exhausted: Counter,
    /// Ids of records returned that no event carries a hash of (past
    /// [`custos_transform::MAX_RECORD_HASHES`] in one response).
    pub record_hashes_omitted: Counter,
    pub usage_sync_failures: Counter,
    /// `--caller-identity istio`: callers through the mesh's proxy, by what its
    /// `x-forwarded-client-cert` said.
    pub mesh_callers: Family<ResultLabels, Counter>,
    /// Counted by every proxy thread's [`crate::upstream::Upstream`].
    pub upstream: UpstreamCounters,
}

impl Metrics {
    /// Creates the metrics and registers them under `custos_sidecar_` in `registry`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            dry_runs: Family::default(),
            request_duration: LatencyHistogram::default(),
            records_served: Family::default(),
            records_filtered: Family::default(),
            records_truncated: Family::default(),
            masked_fields: Family::default(),
            quota_rejections: Family::default(),
            limit_rejections: Family::default(),
            config_reloads: Family::default(),
            transform_failures: Family::default(),
            connections: Gauge::default(),
            accept_errors: Counter::default(),
            request_buffer_bytes: Gauge::default(),
            request_buffer_exhausted: Counter::default(),
            response_buffer_bytes: Gauge::default(),
            response_buffer_exhausted: Counter::default(),
            dry_run_buffer_bytes: Gauge::default(),
            dry_run_buffer_exhausted: Counter::default(),
            record_hashes_omitted: Counter::default(),
            usage_sync_failures: Counter::default(),
            mesh_callers: Family::default(),
            upstream: UpstreamCounters::default(),
        };
        let r = registry.sub_registry_with_prefix("custos_sidecar");
        r.register("requests", "Requests by decision, policy, rule and reason code", m.requests.clone());
        r.register(
            "dry_runs",
            "Verdicts of Audit-mode policies that did not decide a request (another policy did), by the decision each would have made, policy, rule and reason code",
            m.dry_runs.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from the request to the response head, sidecar and app",
            m.request_duration.clone(),
        );
        r.register("records_served", "Records returned to callers", m.records_served.clone());
        r.register(
            "records_filtered",
            "Records removed by row filters (out of the caller's scope)",
            m.records_filtered.clone(),
        );
        r.register(
            "records_truncated",
            "Records removed by per-response caps and record quotas",
            m.records_truncated.clone(),
        );
        r.register("masked_fields", "Masked fields by data class", m.masked_fields.clone());
        r.register(
            "record_hashes_omitted",
            "Record ids not hashed into audit events: past the 10,000 hashes one event keeps (subject lookups miss them)",
            m.record_hashes_omitted.clone(),
        );
        r.register("quota_rejections", "Requests refused with 429, by limit", m.quota_rejections.clone());
        r.register(
            "limit_rejections",
            "Requests refused by a proxy limit (header_bytes, request_body_bytes, request_body_timeout, request_body_rate, request_buffer, response_body_bytes, upstream_connect, upstream_connections, upstream_timeout, connections, header_read_timeout, h2_reset_flood, admin_connections, admin_connections_per_peer, response_send_timeout)",
            m.limit_rejections.clone(),
        );
        r.register("config_reloads", "Config reloads by result", m.config_reloads.clone());
        r.register(
            "transform_failures",
            "Responses that had to be transformed and could not be, by reason",
            m.transform_failures.clone(),
        );
        r.register("connections", "Open client connections", m.connections.clone());
        r.register(
            "accept_errors",
            "Failed accepts of connections on the proxy and admin ports (such as EMFILE: out of file descriptors)",
            m.accept_errors.clone(),
        );
        r.register(
            "request_buffer_bytes",
            "Bytes of request bodies read into memory before the app is called",
            m.request_buffer_bytes.clone(),
        );
        r.register(
            "request_buffer_exhausted",
            "Request bodies forwarded as they arrived because the request buffers were full",
            m.request_buffer_exhausted.clone(),
        );
        r.register(
            "response_buffer_bytes",
            "Bytes of responses read into memory to be transformed, as received and decoded",
            m.response_buffer_bytes.clone(),
        );
        r.register(
            "response_buffer_exhausted",
            "Responses that could not be transformed because the response buffers were full",
            m.response_buffer_exhausted.clone(),
        );
        r.register(
            "dry_run_buffer_bytes",
            "Bytes held in memory for the dry runs of Audit-mode policies beside the deciding one (copies of responses, decoded bodies, parsed documents)",
            m.dry_run_buffer_bytes.clone(),
        );
        r.register(
            "dry_run_buffer_exhausted",
            "Dry runs not checked because the dry-run buffers were full (not_checked:dry_run_buffer_exhausted)",
            m.dry_run_buffer_exhausted.clone(),
        );
        r.register(
            "usage_sync_failures",
            "Failed fetches of cluster-wide usage from the collector",
            m.usage_sync_failures.clone(),
        );
        r.register(
            "mesh_callers",
            "With --caller-identity istio or linkerd, requests through the mesh's proxy by what its client certificate said (workload, no_certificate, foreign_trust_domain, malformed)",
            m.mesh_callers.clone(),
        );
        r.register("upstream_connections", "Connections opened to the app", m.upstream.connections.clone());
        r.register(
            "upstream_retries",
            "Requests sent again on a new connection because the app had closed the reused one before they were sent",
            m.upstream.retries.clone(),
        );
        r.register(
            "upstream_waits",
            "Requests that found every allowed connection to the app busy and waited for one",
            m.upstream.waits.clone(),
        );
        m
    }

    /// Counts a limit rejection.
    pub fn limit(&self, limit: &'static str) {
        self.limit_rejections.get_or_create(&LimitLabels { limit }).inc();
    }
}

/// Label sets remembered per cache: enough for the rules and classes a service's traffic
/// actually hits; the least recently added one makes room.
const CACHED_LABEL_SETS: usize = 32;

/// The counters of the label sets one proxy thread used last, so that counting a request
/// neither builds label values (two `String`s) nor hashes them and takes the family's lock,
/// which both proxy threads share. A counter here is the family's own (a shared handle).
pub(crate) struct CounterCache<L> {
    recent: Mutex<Vec<(L, Counter)>>,
}

impl<L: Clone + std::hash::Hash + Eq> Default for CounterCache<L> {
    fn default() -> Self {
        CounterCache { recent: Mutex::new(Vec::with_capacity(CACHED_LABEL_SETS)) }
    }
}

impl<L: Clone + std::hash::Hash + Eq> CounterCache<L> {
    /// Adds `n` to the counter of `family` whose labels satisfy `is`; `labels` builds them
    /// when this cache does not hold that counter yet.
    pub(crate) fn inc_by(
        &self,
        family: &Family<L, Counter>,
        is: impl Fn(&L) -> bool,
        labels: impl FnOnce() -> L,
        n: u64,
    ) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, counter)) = recent.iter().find(|(l, _)| is(l)) {
            counter.inc_by(n);
            return;
        }
        let labels = labels();
        let counter = family.get_or_create(&labels).clone();
        counter.inc_by(n);
        if recent.len() >= CACHED_LABEL_SETS {
            recent.remove(0);
        }
        recent.push((labels, counter));
    }
}

/// The metrics one proxy thread updates on every request: counters through
/// [`CounterCache`]s over the families of [`Metrics`], and its shard of the latency
/// histogram.
pub(crate) struct ThreadCounters {
    requests: CounterCache<RequestLabels>,
    records_served: CounterCache<RuleLabels>,
    masked_fields: CounterCache<ClassLabels>,
    /// This thread's shard of `metrics.request_duration`.
    pub latency: Arc<LatencyShard>,
}

impl ThreadCounters {
    /// New handles for one thread on `metrics`.
    pub(crate) fn new(metrics: &Metrics) -> Self {
        ThreadCounters {
            requests: CounterCache::default(),
            records_served: CounterCache::default(),
            masked_fields: CounterCache::default(),
            latency: metrics.request_duration.shard(),
        }
    }

    /// Counts one request in `custos_sidecar_requests_total`.
    pub(crate) fn request(
        &self,
        metrics: &Metrics,
        decision: &'static str,
        policy: &str,
        rule: &str,
        reason: &'static str,
    ) {
        self.requests.inc_by(
            &metrics.requests,
            |l| l.decision == decision && l.reason == reason && l.policy == policy && l.rule == rule,
            || RequestLabels { decision, policy: policy.to_string(), rule: rule.to_string(), reason },
            1,
        );
    }

    /// Counts records served under `policy`/`rule`.
    pub(crate) fn records_served(&self, metrics: &Metrics, policy: &str, rule: &str, n: u64) {
        self.records_served.inc_by(
            &metrics.records_served,
            |l| l.policy == policy && l.rule == rule,
            || RuleLabels { policy: policy.to_string(), rule: rule.to_string() },
            n,
        );
    }

    /// Counts masked fields of `class`.
    pub(crate) fn masked_fields(&self, metrics: &Metrics, class: &str, n: u64) {
        self.masked_fields.inc_by(
            &metrics.masked_fields,
            |l| l.class == class,
            || ClassLabels { class: class.to_string() },
            n,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mk_metrics() -> (Registry, Metrics) {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        (registry, metrics)
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn thread_handles_count_into_the_shared_series() {
        let (registry, metrics) = mk_metrics();
        let (a, b) = (ThreadCounters::new(&metrics), ThreadCounters::new(&metrics));
        for _ in 0..3 {
            a.request(&metrics, "Allow", "shop", "list", "allow_rule");
            a.latency.observe(std::time::Duration::from_micros(300));
        }
        b.latency.observe(std::time::Duration::from_millis(2));
        b.request(&metrics, "Allow", "shop", "list", "allow_rule");
        b.request(&metrics, "Deny", "shop", "list", "quota_exceeded");
        a.records_served(&metrics, "shop", "list", 18);
        b.records_served(&metrics, "shop", "list", 2);
        a.masked_fields(&metrics, "phone", 5);
        let out = text(&registry);
        for line in [
            "custos_sidecar_requests_total{decision=\"Allow\",policy=\"shop\",rule=\"list\",reason=\"allow_rule\"} 4",
            "custos_sidecar_requests_total{decision=\"Deny\",policy=\"shop\",rule=\"list\",reason=\"quota_exceeded\"} 1",
            "custos_sidecar_records_served_total{policy=\"shop\",rule=\"list\"} 20",
            "custos_sidecar_masked_fields_total{class=\"phone\"} 5",
            "custos_sidecar_request_duration_seconds_bucket{le=\"0.00025\"} 0",
            "custos_sidecar_request_duration_seconds_bucket{le=\"0.0005\"} 3",
            "custos_sidecar_request_duration_seconds_bucket{le=\"0.001\"} 3",
            "custos_sidecar_request_duration_seconds_bucket{le=\"0.0025\"} 4",
            "custos_sidecar_request_duration_seconds_bucket{le=\"+Inf\"} 4",
            "custos_sidecar_request_duration_seconds_count 4",
            "custos_sidecar_request_duration_seconds_sum 0.0029",
        ] {
            assert!(out.contains(line), "{line} missing in\n{out}");
        }
    }

    #[test]
    fn more_label_sets_than_the_cache_holds_still_count_exactly() {
        let (registry, metrics) = mk_metrics();
        let counters = ThreadCounters::new(&metrics);
        let rules: Vec<String> = (0..CACHED_LABEL_SETS * 3).map(|i| format!("rule-{i}")).collect();
        // Round-robin over three times as many rules as the cache holds: every lookup misses.
        for round in 0..4 {
            for rule in &rules {
                counters.records_served(&metrics, "shop", rule, round + 1);
            }
        }
        let out = text(&registry);
        for rule in &rules {
            let line = format!("custos_sidecar_records_served_total{{policy=\"shop\",rule=\"{rule}\"}} 10");
            assert!(out.contains(&line), "{line} missing");
        }
        assert_eq!(counters.records_served.recent.lock().unwrap().len(), CACHED_LABEL_SETS);
    }
}
