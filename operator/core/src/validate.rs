//! Policy admission: a DataAccessPolicy → admitted, with warnings for risky-but-valid
//! settings, or denied with every problem at its field path.
//!
//! [`validate`] runs the policy compiler ([`custos_policy::compile_policy`]), the same one the
//! controller and the sidecar run, so a policy the webhook admits always compiles.
//! [`validate_object`] first checks a whole object, as the apiserver sends it, against the
//! CRD's schema (unknown fields, wrong types, values outside an enum), again with field paths.
//!
//! Every path the user sees starts at the object root, e.g.
//! `spec.rules[0].rowFilter: undeclared reference 'usr'`.

use custos_api::DataAccessPolicySpec;
use custos_api::policy::{Action, Mode};
use custos_policy::{FieldError, FieldErrors, compile_policy, load_policies};

/// The outcome of admitting a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validation {
    /// The policy compiles.
    Allowed {
        /// Risky but valid settings, one sentence each, naming the field.
        warnings: Vec<String>,
    },
    /// The policy does not compile.
    Denied {
        /// Every problem, at its field path from the object root (`spec.…`, `metadata.…`).
        errors: FieldErrors,
        /// One message naming the policy and each problem with its path, for the user.
        message: String,
    },
}

impl Validation {
    /// True for [`Validation::Allowed`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Validation::Allowed { .. })
    }
}

/// Validates the policy `namespace/name`.
pub fn validate(namespace: &str, name: &str, spec: &DataAccessPolicySpec) -> Validation {
    match compile_policy(namespace, name, spec) {
        Ok(_) => Validation::Allowed { warnings: warnings(spec) },
        Err(errors) => denied(namespace, name, errors),
    }
}

/// Validates a whole DataAccessPolicy object as JSON (what an admission request carries):
/// schema first, then [`validate`]. The name is `metadata.name`, or `metadata.generateName`
/// followed by `<generated>` when the apiserver has not generated it yet.
pub fn validate_object(namespace: &str, object: &serde_json::Value) -> Validation {
    let metadata = object.get("metadata");
    let text = |key: &str| metadata.and_then(|m| m.get(key)).and_then(serde_json::Value::as_str);
    let name = match (text("name"), text("generateName")) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        // The apiserver cuts a prefix to 58 characters and adds 5: generated names always fit
        // the 63 of `metadata.name`; the placeholder is kept within them too.
        (_, Some(prefix)) if !prefix.is_empty() => {
            let keep = prefix.char_indices().nth(63 - "<generated>".len()).map_or(prefix.len(), |(i, _)| i);
            format!("{}<generated>", &prefix[..keep])
        }
        _ => String::new(),
    };
    let mut document = object.clone();
    if let Some(meta) = document.get_mut("metadata").and_then(serde_json::Value::as_object_mut)
        && !name.is_empty()
    {
        // The loader insists on metadata.name; a generateName-only object gets a placeholder.
        meta.insert("name".to_string(), serde_json::Value::String(name.clone()));
    }
    let loaded = load_policies(&document.to_string());
    if let Some(error) = loaded.errors.into_iter().next() {
        return denied(namespace, &name, error.errors);
    }
    match loaded.policies.into_iter().next() {
        Some(policy) => validate(namespace, &name, &policy.input.spec),
        None => {
            let kind = loaded.skipped.into_iter().next().unwrap_or_else(|| "(none)".to_string());
            let mut errors = FieldErrors::default();
            errors.push("kind", format!("must be DataAccessPolicy, got {kind}"));
            denied(namespace, &name, errors)
        }
    }
}

fn denied(namespace: &str, name: &str, errors: FieldErrors) -> Validation {
    let errors = FieldErrors(
        errors.0.into_iter().map(|e| FieldError { path: rooted(&e.path), message: e.message }).collect(),
    );
    let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let subject = if name.is_empty() { namespace.to_string() } else { format!("{namespace}/{name}") };
    let message = format!("DataAccessPolicy {subject} is invalid: {}", problems.join("; "));
    Validation::Denied { errors, message }
}

/// A field path from the object root: paths of the spec's fields get their `spec.` prefix.
fn rooted(path: &str) -> String {
    let root = path.split(['.', '[']).next().unwrap_or_default();
    if matches!(root, "spec" | "metadata" | "apiVersion" | "kind" | "status" | "(document)") {
        path.to_string()
    } else if path.is_empty() {
        "spec".to_string()
    } else {
        format!("spec.{path}")
    }
}

/// Risky-but-valid settings of a policy that compiles.
fn warnings(spec: &DataAccessPolicySpec) -> Vec<String> {
    let mut warnings = Vec::new();
    match spec.mode {
        Mode::Audit => warnings.push(
            "spec.mode is Audit: decisions are only recorded (WouldDeny), nothing is enforced; switch to \
             Enforce once the audit trail looks right"
                .to_string(),
        ),
        Mode::Disabled => {
            warnings.push("spec.mode is Disabled: the policy is ignored and protects nothing".to_string())
        }
        Mode::Enforce => {}
    }
    if spec.mode != Mode::Disabled && spec.default_action == Action::Allow {
        warnings.push(
            "spec.defaultAction is Allow: requests no rule matches pass unfiltered and unmasked".to_string(),
        );
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let open = rule.from.as_ref().is_none_or(|f| *f == Default::default());
        if rule.action == Action::Allow && open {
            warnings.push(format!(
                "spec.rules[{i}] ({}) allows every caller: it has no from (workloads, users or \
                 authenticated)",
                rule.name
            ));
        }
    }
    if spec.mode == Mode::Enforce && spec.network_policy.as_ref().is_some_and(|np| !np.enabled) {
        warnings.push(
            "spec.networkPolicy.enabled is false: other pods can reach the app port directly, bypassing the \
             sidecar"
                .to_string(),
        );
    }
    let has_users = spec.identity.as_ref().is_some_and(|i| i.users.is_some());
    if !has_users {
        for (i, rule) in spec.rules.iter().enumerate() {
            for (field, expr) in [("when", &rule.when), ("rowFilter", &rule.row_filter)] {
                if expr.as_deref().is_some_and(mentions_user) {
                    warnings.push(format!(
                        "spec.rules[{i}].{field} uses user but spec.identity.users is not set: every caller \
                         is anonymous"
                    ));
                }
            }
        }
    }
    warnings
}

/// True when a CEL expression refers to the `user` variable (`user.x`, `user["x"]`), judged
/// from its text: an approximation that is enough for a warning.
fn mentions_user(expr: &str) -> bool {
    let bytes = expr.as_bytes();
    expr.match_indices("user").any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + 4).copied();
        let starts_word = before.is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'.'));
        starts_word && matches!(after, Some(b'.' | b'['))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
