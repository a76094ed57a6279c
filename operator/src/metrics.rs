//! The operator's Prometheus metrics (`/metrics` on the admin address).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `custos_operator_reconciles_total` | `result` (`ok`, `error`) | namespace reconciles |
//! | `custos_operator_reconcile_errors_total` | `reason` | failed reconciles, by [`crate::Error::metric_label`] |
//! | `custos_operator_reconcile_duration_seconds` | | reconcile time (compute + apply) |
//! | `custos_operator_admissions_total` | `webhook` (`mutate-pods`, `validate-policies`, `validate-pods`), `outcome` | admission requests answered |
//! | `custos_operator_admission_duration_seconds` | `webhook` | admission handling time |
//! | `custos_operator_leader` | | 1 while this replica holds the Lease (as last read, renewed in time) |
//! | `custos_operator_policies` | | DataAccessPolicies in the watched namespaces |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabel {
    webhook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    webhook: &'static str,
    outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 250 µs .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

struct Inner {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    reconcile_errors: Family<ReasonLabel, Counter>,
    reconcile_seconds: Histogram,
    admissions: Family<AdmissionLabels, Counter>,
    admission_seconds: Family<WebhookLabel, Histogram, fn() -> Histogram>,
    leader: Gauge,
    policies: Gauge,
}

/// The operator's metrics; cheap to clone (shared).
#[derive(Clone)]
pub struct OperatorMetrics {
    inner: Arc<Inner>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for OperatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorMetrics").finish_non_exhaustive()
    }
}

impl OperatorMetrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("custos_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register("reconciles", "Namespace reconciles, by result", reconciles.clone());
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("reconcile_errors", "Failed reconciles, by reason", reconcile_errors.clone());
        let reconcile_seconds = latency_histogram();
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile a namespace (compute and apply)",
            reconcile_seconds.clone(),
        );
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission requests answered, by webhook and outcome",
            admissions.clone(),
        );
        let admission_seconds =
            Family::<WebhookLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "admission_duration_seconds",
            "Time to answer an admission request, by webhook",
            admission_seconds.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        let policies = Gauge::default();
        registry.register("policies", "DataAccessPolicies in the watched namespaces", policies.clone());
        Self {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_errors,
                reconcile_seconds,
                admissions,
                admission_seconds,
                leader,
                policies,
            }),
        }
    }

    /// Records one reconcile: its duration and `Ok` or the error's metric label.
    pub fn observe_reconcile(&self, duration: Duration, outcome: Result<(), &'static str>) {
        self.inner.reconcile_seconds.observe(duration.as_secs_f64());
        match outcome {
            Ok(()) => {
                self.inner.reconciles.get_or_create(&ResultLabel { result: "ok" }).inc();
            }
            Err(reason) => {
                self.inner.reconciles.get_or_create(&ResultLabel { result: "error" }).inc();
                self.inner.reconcile_errors.get_or_create(&ReasonLabel { reason }).inc();
            }
        }
    }

    /// Records one admission request: `webhook` is `mutate-pods`, `validate-policies` or `validate-pods`,
    /// `outcome` e.g. `injected`, `skipped`, `refused`, `allowed`, `denied`, `error`.
    pub fn observe_admission(&self, webhook: &'static str, outcome: &'static str, duration: Duration) {
        self.inner.admissions.get_or_create(&AdmissionLabels { webhook, outcome }).inc();
        self.inner.admission_seconds.get_or_create(&WebhookLabel { webhook }).observe(duration.as_secs_f64());
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// Sets the number of watched DataAccessPolicies.
    pub fn set_policies(&self, count: usize) {
        self.inner.policies.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Count of reconciles with `result` (`ok` or `error`), for tests.
    pub fn reconciles(&self, result: &'static str) -> u64 {
        self.inner.reconciles.get_or_create(&ResultLabel { result }).get()
    }

    /// Count of admissions by webhook and outcome, for tests.
    pub fn admissions(&self, webhook: &'static str, outcome: &'static str) -> u64 {
        self.inner.admissions.get_or_create(&AdmissionLabels { webhook, outcome }).get()
    }

    /// The Prometheus text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_errors_are_labelled_by_reason() {
        let m = OperatorMetrics::new();
        m.observe_reconcile(Duration::from_millis(3), Ok(()));
        m.observe_reconcile(Duration::from_millis(3), Err("apply"));
        assert_eq!(m.reconciles("ok"), 1);
        assert_eq!(m.reconciles("error"), 1);
        let text = m.encode();
        assert!(text.contains("custos_operator_reconcile_errors_total{reason=\"apply\"} 1"), "{text}");
        assert!(text.contains("custos_operator_reconcile_duration_seconds_count 2"), "{text}");
    }

    #[test]
    fn admissions_and_leader() {
        let m = OperatorMetrics::new();
        m.observe_admission("mutate-pods", "injected", Duration::from_micros(400));
        m.set_leader(true);
        m.set_policies(7);
        let text = m.encode();
        assert!(
            text.contains("custos_operator_admissions_total{webhook=\"mutate-pods\",outcome=\"injected\"} 1"),
            "{text}"
        );
        assert!(text.contains("custos_operator_leader 1"), "{text}");
        assert!(text.contains("custos_operator_policies 7"), "{text}");
    }
}
