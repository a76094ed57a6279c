//! Kubernetes label selectors, compiled once and matched against pod labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::{FieldErrors, Path};

/// A compiled label selector. The empty selector matches every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Compiles `selector`, recording problems under `path`.
    pub(crate) fn compile(selector: &LabelSelector, path: &Path, errors: &mut FieldErrors) -> Self {
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            let p = path.field("matchLabels").key(k);
            check_label_key(k, &p, errors);
            check_label_value(v, &p, errors);
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let p = path.field("matchExpressions").index(i);
            check_label_key(&expr.key, &p.field("key"), errors);
            let values = expr.values.clone().unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                check_label_value(v, &p.field("values").index(j), errors);
            }
            let needs_values = matches!(expr.operator.as_str(), "In" | "NotIn");
            if needs_values && values.is_empty() {
                errors.push(
                    p.field("values").as_str(),
                    format!("operator {} needs at least one value", expr.operator),
                );
            }
            if !needs_values && !values.is_empty() {
                errors
                    .push(p.field("values").as_str(), format!("operator {} takes no values", expr.operator));
            }
            let key = expr.key.clone();
            match expr.operator.as_str() {
                "In" => requirements.push(Requirement::In(key, values)),
                "NotIn" => requirements.push(Requirement::NotIn(key, values)),
                "Exists" => requirements.push(Requirement::Exists(key)),
                "DoesNotExist" => requirements.push(Requirement::DoesNotExist(key)),
                other => errors.push(
                    p.field("operator").as_str(),
                    format!("unknown operator '{other}' (expected In, NotIn, Exists or DoesNotExist)"),
                ),
            }
        }
        Selector { requirements }
    }

    /// A selector from plain `matchLabels`.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Self {
        Selector {
            requirements: labels.iter().map(|(k, v)| Requirement::Equals(k.clone(), v.clone())).collect(),
        }
    }

    /// True when `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// True for the empty selector, which matches every pod.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Checks a label key: optional DNS-subdomain prefix and a name of at most 63 characters.
pub(crate) fn check_label_key(key: &str, path: &Path, errors: &mut FieldErrors) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(is_dns_label))
    {
        errors.push(path.as_str(), "label key prefix must be a DNS subdomain");
    }
    if !is_label_name(name) {
        errors.push(
            path.as_str(),
            "label key name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
}

/// Checks a label value: empty, or at most 63 characters of the label alphabet.
pub(crate) fn check_label_value(value: &str, path: &Path, errors: &mut FieldErrors) {
    if !value.is_empty() && !is_label_name(value) {
        errors.push(
            path.as_str(),
            "label value must be at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// True for an RFC 1123 DNS label (namespace names, Service names).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}
