//! The compiled sidecar config: what the operator writes into the `custos-config` ConfigMap
//! of a namespace and what `custos compile` prints. The sidecar reads it, picks the policies
//! whose selector matches its own pod, and compiles them into its decision engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::DataAccessPolicySpec;

/// Version of the config format. A sidecar refuses configs of a version it does not know.
pub const CONFIG_SCHEMA_VERSION: u32 = 1;

/// The compiled config of one namespace: all its valid policies plus the workload identity
/// table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Format version, [`CONFIG_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Namespace the policies belong to.
    pub namespace: String,
    /// `sha256:<hex>` over the canonical JSON of `namespace`, `policies` and `workloads`.
    pub hash: String,
    /// The policies, sorted by name, with defaults filled in.
    pub policies: Vec<PolicyConfig>,
    /// Pod IP -> identity of the pods that rule sources may name, kept by the operator.
    #[serde(default)]
    pub workloads: Vec<WorkloadIdentity>,
}

/// One policy inside a [`SidecarConfig`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy name (metadata.name).
    pub name: String,
    /// metadata.generation the config was compiled from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The validated spec, with methods upper-cased and defaults made explicit.
    pub spec: DataAccessPolicySpec,
}

/// The identity of a pod that may call a protected workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadIdentity {
    /// Pod IP (IPv4 or IPv6).
    pub ip: String,
    /// Namespace of the pod.
    pub namespace: String,
    /// Service account the pod runs as.
    pub service_account: String,
    /// Pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Set for a caller the sidecar knows only by the identity in its certificate (behind a
    /// service mesh's proxy, `custos sidecar --caller-identity istio`), never in a config:
    /// its labels are not known (`labels` is empty), so an Allow rule's `from.workloads` entry
    /// that names labels never admits it, a Deny rule's always refuses it, and CEL sees no
    /// `workload.labels`.
    #[serde(skip)]
    pub labels_unknown: bool,
}
