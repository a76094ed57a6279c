//! Alerts as Kubernetes Events on the `DataAccessPolicy` they concern (`--kube-events`).
//!
//! [`KubeEventRecorder`] is an [`AlertRecorder`]: for every alert that names a namespace and a
//! policy, it reads the policy (`GET dataaccesspolicies.custos.dev`, for its uid) and publishes
//! an `events.k8s.io/v1` Event regarding it through kube's [`Recorder`], so `kubectl describe
//! dap <policy>` and `kubectl events` show the alert:
//!
//! - reason: the detector in CamelCase (`denial_burst` → `DenialBurst`);
//! - type: `Warning` for warning and critical alerts, `Normal` for info ones;
//! - note: the alert's message (free of personal data by construction);
//! - action `Alert`, reporting controller `custos-collector` (instance: the pod name, from
//!   `HOSTNAME`).
//!
//! Alerts without a namespace or policy, and alerts whose policy no longer exists, are skipped
//! (logged at debug level and counted in `custos_collector_kube_events_skipped_total{reason}`).
//! Repeats of the same detector's alert on the same policy within a few minutes are folded by
//! kube's recorder into one Event whose `series.count` grows (its note stays the first one's).
//!
//! RBAC: `get` on `dataaccesspolicies.custos.dev`, `create` and `patch` on
//! `events.k8s.io` `events` (see `docs/collector.md`).

use custos_api::DataAccessPolicy;
use custos_detect::{AlertRecorder, RecorderError};
use custos_store::{Alert, Severity};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The reporting controller of the Events.
pub const REPORTING_CONTROLLER: &str = "custos-collector";
/// The action of the Events.
pub const ACTION: &str = "Alert";
/// Longest note the Events API takes (1 kB).
const MAX_NOTE_BYTES: usize = 1024;
/// Longest reason the Events API takes.
const MAX_REASON_CHARS: usize = 128;

/// `--kube-events`: whether alerts are also recorded as Kubernetes Events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeEvents {
    /// On when running in a cluster (`KUBERNETES_SERVICE_HOST` set), using the in-cluster
    /// configuration; if no client can be built there, a warning and no Events.
    #[default]
    Auto,
    /// On: the collector does not start without a Kubernetes client (in-cluster or
    /// kubeconfig).
    On,
    /// Off.
    Off,
}

impl KubeEvents {
    /// Whether Events are wanted, given whether the process runs in a cluster.
    pub fn wanted(self, in_cluster: bool) -> bool {
        match self {
            KubeEvents::Auto => in_cluster,
            KubeEvents::On => true,
            KubeEvents::Off => false,
        }
    }
}

/// True when the process runs in a Kubernetes pod (`KUBERNETES_SERVICE_HOST` is set).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
}

/// Builds a Kubernetes client from the in-cluster configuration or the kubeconfig
/// ([`Client::try_default`]), with rustls over ring (the workspace's crypto provider).
pub async fn default_client() -> Result<Client, kube::Error> {
    // kube's TLS builds its rustls configuration with the process default provider; make it
    // ring explicitly (a no-op when one is already installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await
}

/// Why an alert was not recorded as an Event; the `reason` label of
/// `custos_collector_kube_events_skipped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The alert names no namespace or no policy.
    NoPolicy,
    /// The policy does not exist (any more).
    PolicyNotFound,
}

impl SkipReason {
    /// Every reason.
    pub const ALL: [SkipReason; 2] = [SkipReason::NoPolicy, SkipReason::PolicyNotFound];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoPolicy => "no_policy",
            SkipReason::PolicyNotFound => "policy_not_found",
        }
    }
}

/// Records alerts as Kubernetes Events regarding their `DataAccessPolicy` (see the module
/// documentation).
#[derive(Clone)]
pub struct KubeEventRecorder {
    client: Client,
    recorder: Recorder,
    skipped: Family<[(&'static str, &'static str); 1], Counter>,
}

impl std::fmt::Debug for KubeEventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEventRecorder").finish_non_exhaustive()
    }
}

impl KubeEventRecorder {
    /// A recorder publishing with `client`, as controller `custos-collector` and instance the
    /// pod name (`HOSTNAME`, when set).
    pub fn new(client: Client) -> Self {
        let instance = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
        Self::with_reporter(client, Reporter { controller: REPORTING_CONTROLLER.to_owned(), instance })
    }

    /// A recorder publishing with `client` as `reporter`.
    pub fn with_reporter(client: Client, reporter: Reporter) -> Self {
        let skipped = Family::default();
        for r in SkipReason::ALL {
            let _ = skipped.get_or_create(&[("reason", r.as_str())]);
        }
        KubeEventRecorder { recorder: Recorder::new(client.clone(), reporter), client, skipped }
    }

    /// Registers `custos_collector_kube_events_skipped_total{reason}` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "custos_collector_kube_events_skipped",
            "Alerts not recorded as Kubernetes Events: no policy named, or the policy does not exist",
            self.skipped.clone(),
        );
    }

    /// Alerts skipped so far for `reason`.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped.get_or_create(&[("reason", reason.as_str())]).get()
    }

    fn skip(&self, alert: &Alert, reason: SkipReason) {
        self.skipped.get_or_create(&[("reason", reason.as_str())]).inc();
        tracing::debug!(
            alert = %alert.id,
            detector = %alert.detector,
            namespace = alert.namespace.as_deref().unwrap_or("-"),
            policy = alert.policy.as_deref().unwrap_or("-"),
            reason = reason.as_str(),
            "alert not recorded as a Kubernetes Event"
        );
    }

    /// Records `alert` as an Event on its policy. `Ok(false)`: skipped (no policy named, or
    /// the policy does not exist); errors are the API's (e.g. forbidden, unreachable).
    pub async fn publish(&self, alert: &Alert) -> Result<bool, kube::Error> {
        let (Some(event), Some(namespace), Some(name)) =
            (event_for(alert), non_empty(&alert.namespace), non_empty(&alert.policy))
        else {
            self.skip(alert, SkipReason::NoPolicy);
            return Ok(false);
        };
        let policies: Api<DataAccessPolicy> = Api::namespaced(self.client.clone(), namespace);
        let Some(policy) = policies.get_opt(name).await? else {
            self.skip(alert, SkipReason::PolicyNotFound);
            return Ok(false);
        };
        self.recorder.publish(&event, &policy_reference(&policy)).await?;
        Ok(true)
    }
}

impl AlertRecorder for KubeEventRecorder {
    fn name(&self) -> &'static str {
        "kubernetes_events"
    }

    async fn record(&self, alert: &Alert) -> Result<(), RecorderError> {
        self.publish(alert).await.map(drop).map_err(|e| Box::new(e) as RecorderError)
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

/// The Event recording `alert`, or `None` when the alert names no namespace or no policy.
pub fn event_for(alert: &Alert) -> Option<Event> {
    non_empty(&alert.namespace)?;
    non_empty(&alert.policy)?;
    Some(Event {
        type_: match alert.severity {
            Severity::Info => EventType::Normal,
            Severity::Warning | Severity::Critical => EventType::Warning,
        },
        reason: event_reason(&alert.detector),
        note: Some(truncate(&alert.message, MAX_NOTE_BYTES).to_owned()),
        action: ACTION.to_owned(),
        secondary: None,
    })
}

/// A detector name in CamelCase (`denial_burst` → `DenialBurst`, `first-seen` →
/// `FirstSeen`), at most 128 characters; `Alert` for an empty name.
pub fn event_reason(detector: &str) -> String {
    let mut reason = String::new();
    for word in detector.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            reason.push(first.to_ascii_uppercase());
            reason.extend(chars);
        }
    }
    if reason.is_empty() {
        return "Alert".to_owned();
    }
    reason.chars().take(MAX_REASON_CHARS).collect()
}

/// The reference of an Event regarding `policy`: apiVersion, kind, namespace, name and uid
/// (no resourceVersion, so that the Events of a policy whose status changes still fold
/// together).
pub fn policy_reference(policy: &DataAccessPolicy) -> ObjectReference {
    ObjectReference {
        api_version: Some(DataAccessPolicy::api_version(&()).into_owned()),
        kind: Some(DataAccessPolicy::kind(&()).into_owned()),
        namespace: policy.metadata.namespace.clone(),
        name: policy.metadata.name.clone(),
        uid: policy.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn alert(severity: Severity, namespace: Option<&str>, policy: Option<&str>) -> Alert {
        Alert {
            id: "a1".into(),
            time: "2026-01-01T00:00:00Z".into(),
            detector: "denial_burst".into(),
            namespace: namespace.map(Into::into),
            policy: policy.map(Into::into),
            principal: Some("spiffe://cluster.local/ns/shop/sa/reporting".into()),
            severity,
            message: "42 denials in 5m".into(),
            details: serde_json::Value::Null,
        }
    }

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(event_reason("denial_burst"), "DenialBurst");
        assert_eq!(event_reason("row_filter_burst"), "RowFilterBurst");
        assert_eq!(event_reason("first-seen"), "FirstSeen");
        assert_eq!(event_reason("volume"), "Volume");
        assert_eq!(event_reason(""), "Alert");
        assert_eq!(event_reason(&"x".repeat(300)).len(), 128);
    }

    #[test]
    fn severity_sets_the_type_and_the_message_is_the_note() {
        let e = event_for(&alert(Severity::Critical, Some("shop"), Some("orders"))).unwrap();
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.reason, "DenialBurst");
        assert_eq!(e.note.as_deref(), Some("42 denials in 5m"));
        assert_eq!(e.action, "Alert");
        assert!(e.secondary.is_none());
        let e = event_for(&alert(Severity::Warning, Some("shop"), Some("orders"))).unwrap();
        assert_eq!(e.type_, EventType::Warning);
        let e = event_for(&alert(Severity::Info, Some("shop"), Some("orders"))).unwrap();
        assert_eq!(e.type_, EventType::Normal);
    }

    #[test]
    fn alerts_without_a_policy_have_no_event() {
        assert!(event_for(&alert(Severity::Warning, None, Some("orders"))).is_none());
        assert!(event_for(&alert(Severity::Warning, Some("shop"), None)).is_none());
        assert!(event_for(&alert(Severity::Warning, Some(""), Some("orders"))).is_none());
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let mut a = alert(Severity::Warning, Some("shop"), Some("orders"));
        a.message = "é".repeat(600);
        let note = event_for(&a).unwrap().note.unwrap();
        assert_eq!(note.len(), 1024);
        assert!(note.chars().all(|c| c == 'é'));
    }

    #[test]
    fn auto_follows_the_cluster() {
        assert!(KubeEvents::Auto.wanted(true));
        assert!(!KubeEvents::Auto.wanted(false));
        assert!(KubeEvents::On.wanted(false));
        assert!(!KubeEvents::Off.wanted(true));
    }
}
