//! [`Error`]: why a namespace reconcile failed, with the label it is counted under in
//! `custos_operator_reconcile_errors_total{reason}` ([`Error::metric_label`]). Messages name
//! objects (kind, namespace, name) and carry the apiserver's reason; never object contents.

use custos_operator_core::desired::DesiredError;

/// A failed step of a namespace reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the namespace's policies, NetworkPolicies or pods failed.
    #[error("cannot list {kind} in namespace {namespace}: {source}")]
    List {
        /// The kind listed.
        kind: &'static str,
        /// The namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A server-side apply (ConfigMap or NetworkPolicy) was refused.
    #[error("cannot apply {kind} {namespace}/{name}: {source}")]
    Apply {
        /// The kind applied.
        kind: &'static str,
        /// The namespace.
        namespace: String,
        /// The object's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a stale object failed.
    #[error("cannot delete {kind} {namespace}/{name}: {source}")]
    Delete {
        /// The kind deleted.
        kind: &'static str,
        /// The namespace.
        namespace: String,
        /// The object's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing a policy's status failed.
    #[error("cannot write the status of DataAccessPolicy {namespace}/{name}: {source}")]
    Status {
        /// The namespace.
        namespace: String,
        /// The policy.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the `custos.dev/cleanup` finalizer failed.
    #[error("cannot update the finalizers of DataAccessPolicy {namespace}/{name}: {source}")]
    Finalizer {
        /// The namespace.
        namespace: String,
        /// The policy.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A sidecar Secret to copy (`--sync-sidecar-secrets`) is missing from the operator's
    /// namespace.
    #[error(
        "Secret {namespace}/{name} to copy into namespaces with policies (--sync-sidecar-secrets) does not exist"
    )]
    MissingSecret {
        /// The operator's namespace.
        namespace: String,
        /// The Secret.
        name: String,
    },
    /// Something the operator builds does not serialise.
    #[error("cannot serialise {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: String,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The `reason` label of `custos_operator_reconcile_errors_total`: `list`, `apply`,
    /// `delete`, `status`, `finalizer`, `missing_secret` or `serialize`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::List { .. } => "list",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status { .. } => "status",
            Error::Finalizer { .. } => "finalizer",
            Error::MissingSecret { .. } => "missing_secret",
            Error::Serialize { .. } => "serialize",
        }
    }
}

impl From<DesiredError> for Error {
    fn from(error: DesiredError) -> Self {
        match error {
            DesiredError::Serialize { namespace, source } => {
                Error::Serialize { what: format!("the sidecar config of namespace {namespace}"), source }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("refused", reason).with_code(code).boxed())
    }

    #[test]
    fn every_variant_has_its_label_and_names_the_object() {
        let cases = [
            (
                Error::List { kind: "Pod", namespace: "shop".into(), source: api_error(403, "Forbidden") },
                "list",
            ),
            (
                Error::Apply {
                    kind: "NetworkPolicy",
                    namespace: "shop".into(),
                    name: "custos-orders".into(),
                    source: api_error(422, "Invalid"),
                },
                "apply",
            ),
            (
                Error::Delete {
                    kind: "ConfigMap",
                    namespace: "shop".into(),
                    name: "custos-config".into(),
                    source: api_error(500, "InternalError"),
                },
                "delete",
            ),
            (
                Error::Status {
                    namespace: "shop".into(),
                    name: "orders".into(),
                    source: api_error(409, "Conflict"),
                },
                "status",
            ),
            (
                Error::Finalizer {
                    namespace: "shop".into(),
                    name: "orders".into(),
                    source: api_error(409, "Conflict"),
                },
                "finalizer",
            ),
        ];
        for (error, label) in cases {
            assert_eq!(error.metric_label(), label);
            assert!(error.to_string().contains("shop"), "{error}");
            assert!(std::error::Error::source(&error).is_some());
        }
        let serde = serde_json::from_str::<u8>("x").unwrap_err();
        let e: Error = DesiredError::Serialize { namespace: "shop".into(), source: serde }.into();
        assert_eq!(e.metric_label(), "serialize");
        assert!(e.to_string().contains("sidecar config of namespace shop"), "{e}");
    }
}
