//! The operator's admission webhooks, served over TLS ([`crate::tls`]):
//!
//! - `POST /mutate-pods` ([`MUTATE_PODS_PATH`]): injects the Custos sidecar into pods that a
//!   DataAccessPolicy selects (or that a namespace labelled `custos.dev/injection=enabled`
//!   holds), as a JSON patch. See [`custos_operator_core::inject`] for the rules and
//!   `webhook/mutate.rs` for the failure semantics: a pod that cannot be read is refused.
//! - `POST /validate-policies` ([`VALIDATE_POLICIES_PATH`]): compiles DataAccessPolicies and
//!   refuses invalid ones with their field paths, admits valid ones with warnings for risky
//!   settings. See [`custos_operator_core::validate`].
//! - `POST /validate-pods` ([`VALIDATE_PODS_PATH`]): refuses updates of injected pods that
//!   would take the sidecar's enforcement away (its image swapped, a debug container in its
//!   volumes or process namespace). See [`custos_operator_core::inject::check_update`].
//!
//! All take an `admission.k8s.io/v1` AdmissionReview and answer one with the request's uid.
//! A body that is not an AdmissionReview gets 400 with the reason; a request for another kind
//! is admitted unchanged. The webhooks read the cluster through a [`ClusterView`] (the
//! operator's reflector stores; [`StaticView`] in tests) and never call the apiserver, so they
//! answer in microseconds and keep answering while the apiserver is slow.
//!
//! Metrics: `custos_operator_admissions_total{webhook,outcome}` with outcome `injected`,
//! `skipped`, `allowed`, `denied`, `refused`, `ignored` (not for this webhook), `error` (refused because
//! the request could not be handled) or `malformed` (400).

mod mutate;
mod pod_updates;
mod policies;
pub mod review;
mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use custos_api::DataAccessPolicy;
use custos_operator_core::inject::InjectSettings;
use http::StatusCode;

pub use server::serve;

use crate::metrics::OperatorMetrics;
use review::{AdmissionRequest, AdmissionResponse};

/// Path of the pod injection webhook.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";
/// Path of the policy validation webhook.
pub const VALIDATE_POLICIES_PATH: &str = "/validate-policies";
/// Path of the webhook that validates updates of injected pods.
pub const VALIDATE_PODS_PATH: &str = "/validate-pods";
/// Largest AdmissionReview accepted (413 above). An object is at most ~1.5 MiB in etcd and a
/// review of an UPDATE carries two.
pub const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

const MUTATE_PODS: &str = "mutate-pods";
const VALIDATE_POLICIES: &str = "validate-policies";
const VALIDATE_PODS: &str = "validate-pods";

/// What the webhooks know of the cluster: the DataAccessPolicies and the namespace labels,
/// from a cache kept current by watches.
pub trait ClusterView: Send + Sync + 'static {
    /// The DataAccessPolicies of `namespace` (any order).
    fn policies(&self, namespace: &str) -> Vec<Arc<DataAccessPolicy>>;
    /// The labels of `namespace`; `None` when the namespace is not known.
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>>;
}

/// A fixed [`ClusterView`], for tests and tools.
#[derive(Clone, Debug, Default)]
pub struct StaticView {
    policies: BTreeMap<String, Vec<Arc<DataAccessPolicy>>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl StaticView {
    /// An empty view: no policies, no namespaces.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a policy, in its `metadata.namespace` (`default` when unset).
    pub fn with_policy(mut self, policy: DataAccessPolicy) -> Self {
        let namespace = policy.metadata.namespace.clone().unwrap_or_else(|| "default".to_string());
        self.policies.entry(namespace).or_default().push(Arc::new(policy));
        self
    }

    /// Adds a namespace with its labels.
    pub fn with_namespace(mut self, name: &str, labels: BTreeMap<String, String>) -> Self {
        self.namespaces.insert(name.to_string(), labels);
        self
    }
}

impl ClusterView for StaticView {
    fn policies(&self, namespace: &str) -> Vec<Arc<DataAccessPolicy>> {
        self.policies.get(namespace).cloned().unwrap_or_default()
    }

    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.get(namespace).cloned()
    }
}

/// What the webhook handlers share; cheap to clone.
#[derive(Clone)]
pub struct WebhookState {
    view: Arc<dyn ClusterView>,
    settings: Arc<InjectSettings>,
    metrics: OperatorMetrics,
}

impl std::fmt::Debug for WebhookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl WebhookState {
    /// The state over `view`, injecting sidecars built from `settings`, counting into
    /// `metrics`.
    pub fn new(view: Arc<dyn ClusterView>, settings: InjectSettings, metrics: OperatorMetrics) -> Self {
        WebhookState { view, settings: Arc::new(settings), metrics }
    }

    /// The cluster view.
    pub fn view(&self) -> &dyn ClusterView {
        self.view.as_ref()
    }

    /// The injection settings.
    pub fn settings(&self) -> &InjectSettings {
        &self.settings
    }

    /// The metrics.
    pub fn metrics(&self) -> &OperatorMetrics {
        &self.metrics
    }
}

/// The webhook router: `POST /mutate-pods`, `POST /validate-policies` and
/// `POST /validate-pods`.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route(MUTATE_PODS_PATH, post(mutate_pods))
        .route(VALIDATE_POLICIES_PATH, post(validate_policies))
        .route(VALIDATE_PODS_PATH, post(validate_pods))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state)
}

async fn mutate_pods(State(state): State<WebhookState>, body: Bytes) -> Response {
    answer(&state, MUTATE_PODS, &body, |request| mutate::review(&state, request))
}

async fn validate_policies(State(state): State<WebhookState>, body: Bytes) -> Response {
    answer(&state, VALIDATE_POLICIES, &body, policies::review)
}

async fn validate_pods(State(state): State<WebhookState>, body: Bytes) -> Response {
    answer(&state, VALIDATE_PODS, &body, pod_updates::review)
}

/// Parses the review, answers it with `handle` and records the outcome.
fn answer(
    state: &WebhookState,
    webhook: &'static str,
    body: &[u8],
    handle: impl FnOnce(&AdmissionRequest) -> (&'static str, AdmissionResponse),
) -> Response {
    let started = Instant::now();
    let span = tracing::info_span!("admission", webhook, outcome = tracing::field::Empty);
    let _entered = span.enter();
    let (outcome, response) = match review::parse(body) {
        Ok(request) => {
            let (outcome, response) = handle(&request);
            (outcome, axum::Json(response.into_review()).into_response())
        }
        Err(e) => {
            tracing::warn!(webhook, error = %e, "malformed admission request");
            ("malformed", (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response())
        }
    };
    span.record("outcome", outcome);
    state.metrics.observe_admission(webhook, outcome, started.elapsed());
    response
}
