//! `/validate-policies`: DataAccessPolicy admission ([`custos_operator_core::validate`]).
//!
//! A policy that does not compile is refused with HTTP 422 `Invalid`, a message naming every
//! problem with its field path (what kubectl prints) and one status cause per problem. A valid
//! policy is admitted with warnings for risky settings (Audit mode, defaultAction Allow...).
//!
//! Two updates are admitted whatever the spec: those of a policy being deleted (the operator
//! removes its finalizer; refusing would leave it stuck), and those that leave the spec
//! unchanged (metadata edits of a policy admitted before this webhook existed); the latter get
//! the problems as warnings. Other kinds, subresources, DELETE and CONNECT are admitted
//! unchanged. A CREATE or UPDATE without an object is refused.

use custos_operator_core::validate::{Validation, validate_object};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::StatusCause;
use kube::core::admission::Operation;

use super::review::{AdmissionRequest, AdmissionResponse};

const GROUP: &str = "custos.dev";
const KIND: &str = "DataAccessPolicy";

/// The answer and the outcome label of the metrics (`allowed`, `denied`, `ignored`, `error`).
pub(super) fn review(request: &AdmissionRequest) -> (&'static str, AdmissionResponse) {
    let writes = matches!(request.operation, Operation::Create | Operation::Update);
    if !request.is_for(GROUP, KIND) || !writes {
        return ("ignored", AdmissionResponse::allow(request));
    }
    let Some(object) = &request.object else {
        let message = "the request carries no DataAccessPolicy object".to_string();
        tracing::warn!(uid = %request.uid, namespace = ?request.namespace, "policy refused: no object");
        return ("error", AdmissionResponse::deny(request, 400, "BadRequest", message));
    };
    if object.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()) {
        return ("allowed", AdmissionResponse::allow(request));
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.pointer("/metadata/namespace").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default();
    let unchanged = request.operation == Operation::Update
        && request.old_object.as_ref().and_then(|old| old.get("spec")) == object.get("spec");

    match validate_object(&namespace, object) {
        Validation::Allowed { warnings } => {
            tracing::debug!(
                uid = %request.uid, %namespace, name = %request.name, warnings = warnings.len(),
                "policy admitted"
            );
            ("allowed", AdmissionResponse::allow(request).with_warnings(warnings))
        }
        Validation::Denied { message, .. } if unchanged => {
            let warning = format!("the spec is unchanged but does not compile: {message}");
            ("allowed", AdmissionResponse::allow(request).with_warnings(vec![warning]))
        }
        Validation::Denied { errors, message } => {
            tracing::info!(
                uid = %request.uid, %namespace, name = %request.name, problems = errors.0.len(),
                "policy refused: it does not compile"
            );
            let causes = errors
                .iter()
                .map(|e| StatusCause {
                    field: Some(e.path.clone()),
                    message: Some(e.message.clone()),
                    reason: Some("FieldValueInvalid".to_string()),
                })
                .collect();
            let response = AdmissionResponse::deny(request, 422, "Invalid", message).with_causes(
                KIND,
                GROUP,
                &request.name,
                causes,
            );
            ("denied", response)
        }
    }
}
