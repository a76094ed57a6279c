//! `/validate-pods`: updates of pods that have the sidecar
//! ([`custos_operator_core::inject::check_update`]).
//!
//! The chart calls it for UPDATEs of pods labelled `custos.dev/sidecar=injected` (old or new
//! object), on the pod itself and on its `ephemeralcontainers` subresource (`kubectl debug`).
//! An update that swaps the sidecar's image, command or arguments, removes it, or adds an
//! ephemeral container that mounts the sidecar's volumes or targets its process namespace is
//! refused with 403 and the reason; every other update is admitted. Other kinds, other
//! subresources and other operations are admitted unchanged. An UPDATE whose pods cannot be
//! read is refused (fail closed, like the injection).

use custos_operator_core::inject::check_update;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::Operation;
use serde_json::Value;

use super::review::{AdmissionRequest, AdmissionResponse};

/// The subresource of `kubectl debug`.
const EPHEMERAL_CONTAINERS: &str = "ephemeralcontainers";

/// The answer and the outcome label of the metrics (`allowed`, `refused`, `ignored`, `error`).
pub(super) fn review(request: &AdmissionRequest) -> (&'static str, AdmissionResponse) {
    let subresource = request.sub_resource.as_deref().unwrap_or("");
    let pod_kind = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !pod_kind
        || request.operation != Operation::Update
        || !matches!(subresource, "" | EPHEMERAL_CONTAINERS)
    {
        return ("ignored", AdmissionResponse::allow(request));
    }
    let (old, new) = match (pod(&request.old_object, "oldObject"), pod(&request.object, "object")) {
        (Ok(old), Ok(new)) => (old, new),
        (Err(message), _) | (_, Err(message)) => {
            tracing::warn!(uid = %request.uid, namespace = ?request.namespace, error = %message, "pod update refused");
            let message = format!("custos: pod update refused: {message}");
            return ("error", AdmissionResponse::deny(request, 400, "BadRequest", message));
        }
    };
    match check_update(&old, &new) {
        None => ("allowed", AdmissionResponse::allow(request)),
        Some(refusal) => {
            tracing::warn!(
                uid = %request.uid, namespace = ?request.namespace, pod = %request.name, subresource,
                reason = refusal.label(), "pod update refused: it would take the sidecar's enforcement away"
            );
            let message = format!("custos: pod update refused: {refusal}");
            ("refused", AdmissionResponse::deny(request, 403, "Forbidden", message))
        }
    }
}

/// The pod in `value` (the request's `field`), or why it cannot be read (position and category
/// only: serde's message could quote a value of the pod).
fn pod(value: &Option<Value>, field: &str) -> Result<Pod, String> {
    let value = value.as_ref().ok_or_else(|| format!("the UPDATE request carries no {field}"))?;
    serde_json::from_value(value.clone()).map_err(|e| {
        let category = if e.is_data() { "invalid field" } else { "unreadable JSON" };
        format!("the {field} is not a valid Pod ({category}, line {} column {})", e.line(), e.column())
    })
}
