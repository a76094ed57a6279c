//! `/mutate-pods`: sidecar injection ([`custos_operator_core::inject`]) as a JSON patch.
//!
//! Failure semantics: requests this webhook is not for (other kinds, subresources, operations
//! other than CREATE) are admitted unchanged. A pod that cannot be read, or whose patch cannot
//! be built, is *refused* (fail closed, as Custos does in Enforce): admitting it could start a
//! data-holding pod without its sidecar, and the controller that creates it retries. Whether
//! the pod is admitted when the webhook is unreachable is the webhook configuration's
//! `failurePolicy`. A pod that is skipped for a reason its owner should know (opted out while a
//! policy selects it, host network, conflicting policies...) is admitted with a warning, unless
//! a policy in `Enforce` mode selects it: then it is refused with that reason, as is a pod
//! whose containers mount the sidecar's volumes ([`Refusal`](custos_operator_core::inject::Refusal)).

use custos_operator_core::inject::{Injection, inject};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::Operation;
use serde_json::Value;

use super::WebhookState;
use super::review::{AdmissionRequest, AdmissionResponse};

/// The answer and the outcome label of the metrics (`injected`, `skipped`, `refused`,
/// `ignored`, `error`).
pub(super) fn review(state: &WebhookState, request: &AdmissionRequest) -> (&'static str, AdmissionResponse) {
    if !request.is_for("", "Pod") || request.operation != Operation::Create {
        return ("ignored", AdmissionResponse::allow(request));
    }
    let Some(object) = &request.object else {
        return error(request, "the CREATE request carries no pod object".to_string());
    };
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(pod) => pod,
        Err(e) => {
            // Position and category only: serde's message could quote a value of the pod.
            let category = if e.is_data() { "invalid field" } else { "unreadable JSON" };
            return error(request, format!("the object is not a valid Pod ({category}, {})", position(&e)));
        }
    };
    let Some(namespace) = request.namespace.clone().or_else(|| pod.metadata.namespace.clone()) else {
        return error(request, "the request names no namespace".to_string());
    };
    let pod_name = pod_name(&pod, request);
    let namespace_labels = state.view().namespace_labels(&namespace).unwrap_or_else(|| {
        tracing::debug!(%namespace, "namespace not known to the webhook's cache: no namespace labels");
        Default::default()
    });
    let policies = state.view().policies(&namespace);
    match inject(&pod, &namespace, &namespace_labels, &policies, state.settings()) {
        Injection::Skip(reason) => {
            tracing::debug!(
                uid = %request.uid, %namespace, pod = %pod_name, reason = reason.label(), "pod not injected"
            );
            let warnings = reason.warning().into_iter().collect();
            ("skipped", AdmissionResponse::allow(request).with_warnings(warnings))
        }
        Injection::Refuse(refusal) => {
            tracing::warn!(
                uid = %request.uid, %namespace, pod = %pod_name, reason = refusal.label(),
                "pod refused: it would run unprotected"
            );
            let message = format!("custos: pod refused: {refusal}");
            ("refused", AdmissionResponse::deny(request, 403, "Forbidden", message))
        }
        Injection::Inject { pod: injected, policies } => match patched(request, object, &pod, &injected) {
            Ok(response) => {
                tracing::info!(
                    uid = %request.uid, %namespace, pod = %pod_name, policies = %policies.join(","),
                    dry_run = request.dry_run, "sidecar injected"
                );
                ("injected", response)
            }
            Err(message) => error(request, message),
        },
    }
}

/// Admits `request` with the JSON patch from `before` to `after`, checked against the object
/// as the apiserver sent it (`raw`).
fn patched(
    request: &AdmissionRequest,
    raw: &Value,
    before: &Pod,
    after: &Pod,
) -> Result<AdmissionResponse, String> {
    let encode = |pod: &Pod| serde_json::to_value(pod).map_err(|e| format!("cannot encode the pod: {e}"));
    let patch = json_patch::diff(&encode(before)?, &encode(after)?);
    let mut check = raw.clone();
    json_patch::patch(&mut check, &patch)
        .map_err(|e| format!("the injection patch does not apply to the pod as sent: {e}"))?;
    AdmissionResponse::allow(request)
        .with_patch(&patch)
        .map_err(|e| format!("cannot encode the injection patch: {e}"))
}

fn error(request: &AdmissionRequest, message: String) -> (&'static str, AdmissionResponse) {
    tracing::warn!(
        uid = %request.uid, namespace = ?request.namespace, error = %message, "pod refused: cannot inject"
    );
    let message = format!("custos sidecar injection failed: {message}");
    ("error", AdmissionResponse::deny(request, 400, "BadRequest", message))
}

fn position(e: &serde_json::Error) -> String {
    format!("line {} column {}", e.line(), e.column())
}

/// The pod's name for logs: its name, else `<generateName>*`, else the request's name.
fn pod_name(pod: &Pod, request: &AdmissionRequest) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}*"),
        _ => request.name.clone(),
    }
}
