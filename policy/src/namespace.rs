//! Compiling all the policies of one namespace: the sidecar config (versioned, hashed), one
//! NetworkPolicy per policy, and the errors of the invalid ones, which are left out without
//! breaking the others.

use std::collections::BTreeMap;

use custos_api::config::{CONFIG_SCHEMA_VERSION, PolicyConfig, SidecarConfig, WorkloadIdentity};
use custos_api::policy::{DataAccessPolicySpec, Mode, NetworkPolicySpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::compile::{CompiledPolicy, compile_policy};
use crate::error::FieldErrors;
use crate::netpol;

/// One policy as the compiler receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    /// metadata.name.
    pub name: String,
    /// metadata.generation, when known.
    pub generation: Option<i64>,
    /// The spec.
    pub spec: DataAccessPolicySpec,
}

/// The result of compiling a namespace.
#[derive(Clone, Debug)]
pub struct NamespaceCompilation {
    /// The sidecar config of the valid policies.
    pub config: SidecarConfig,
    /// One NetworkPolicy per valid policy that wants one.
    pub network_policies: Vec<NetworkPolicy>,
    /// Problems of the invalid policies, by policy name.
    pub errors: BTreeMap<String, FieldErrors>,
}

impl NamespaceCompilation {
    /// True when every policy compiled.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Compiles the policies of `namespace` together with its workload identity table. Pure: the
/// same input always gives the same output, hash included.
pub fn compile_namespace(
    namespace: &str,
    policies: &[PolicyInput],
    mut workloads: Vec<WorkloadIdentity>,
) -> NamespaceCompilation {
    let mut sorted: Vec<&PolicyInput> = policies.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    let mut errors: BTreeMap<String, FieldErrors> = BTreeMap::new();
    let mut configs = Vec::new();
    let mut network_policies = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, p) in sorted.iter().enumerate() {
        if seen.insert(p.name.as_str(), i).is_some() {
            errors
                .entry(p.name.clone())
                .or_default()
                .push("metadata.name", "duplicate policy name in namespace");
            continue;
        }
        match compile_policy(namespace, &p.name, &p.spec) {
            Ok(_) => {
                let spec = normalised_spec(&p.spec);
                if let Some(np) = netpol::build(namespace, &p.name, &spec) {
                    network_policies.push(np);
                }
                configs.push(PolicyConfig { name: p.name.clone(), generation: p.generation, spec });
            }
            Err(e) => {
                errors.insert(p.name.clone(), e);
            }
        }
    }
    workloads.sort();
    workloads.dedup();
    let mut config = SidecarConfig {
        schema_version: CONFIG_SCHEMA_VERSION,
        namespace: namespace.to_string(),
        hash: String::new(),
        policies: configs,
        workloads,
    };
    config.hash = config_hash(&config);
    NamespaceCompilation { config, network_policies, errors }
}

/// The spec as it goes into the sidecar config: methods upper-cased, defaults explicit.
fn normalised_spec(spec: &DataAccessPolicySpec) -> DataAccessPolicySpec {
    let mut spec = spec.clone();
    spec.workload.proxy_port = Some(spec.workload.proxy_port());
    if spec.network_policy.is_none() {
        spec.network_policy = Some(NetworkPolicySpec::default());
    }
    for rule in &mut spec.rules {
        if let Some(to) = &mut rule.to {
            for m in &mut to.methods {
                *m = m.to_ascii_uppercase();
            }
        }
    }
    spec
}

/// `sha256:<hex>` over the canonical JSON of the config's namespace, policies and workloads.
pub fn config_hash(config: &SidecarConfig) -> String {
    #[derive(Serialize)]
    struct Hashed<'a> {
        schema_version: u32,
        namespace: &'a str,
        policies: &'a [PolicyConfig],
        workloads: &'a [WorkloadIdentity],
    }
    let canonical = serde_json::to_vec(&Hashed {
        schema_version: config.schema_version,
        namespace: &config.namespace,
        policies: &config.policies,
        workloads: &config.workloads,
    })
    .unwrap_or_default();
    format!("sha256:{}", hex::encode(Sha256::digest(&canonical)))
}

/// Why a sidecar config cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is not JSON of the expected shape.
    #[error("config is not a valid sidecar config: {0}")]
    Parse(String),
    /// The config is of a format version this build does not know.
    #[error("config schemaVersion {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
        /// The version supported.
        supported: u32,
    },
    /// The hash does not match the content: the file was edited or truncated.
    #[error("config hash mismatch: the content does not match {declared}")]
    HashMismatch {
        /// The declared hash.
        declared: String,
    },
    /// A policy in the config does not compile.
    #[error("policy {policy}: {errors}")]
    Policy {
        /// The policy name.
        policy: String,
        /// Its problems.
        errors: FieldErrors,
    },
}

/// Parses and verifies a sidecar config and compiles its policies (all of them: selecting the
/// ones of a pod is [`crate::Engine::for_pod`]'s job).
pub fn load_config(json: &[u8]) -> Result<(SidecarConfig, Vec<CompiledPolicy>), ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct VersionOnly {
        schema_version: u32,
    }
    let version: VersionOnly = serde_json::from_slice(json).map_err(|e| ConfigError::Parse(e.to_string()))?;
    if version.schema_version != CONFIG_SCHEMA_VERSION {
        return Err(ConfigError::UnsupportedVersion {
            found: version.schema_version,
            supported: CONFIG_SCHEMA_VERSION,
        });
    }
    let config: SidecarConfig =
        serde_json::from_slice(json).map_err(|e| ConfigError::Parse(e.to_string()))?;
    if config_hash(&config) != config.hash {
        return Err(ConfigError::HashMismatch { declared: config.hash.clone() });
    }
    let mut policies = Vec::with_capacity(config.policies.len());
    for p in &config.policies {
        if p.spec.mode == Mode::Disabled {
            continue;
        }
        let compiled = compile_policy(&config.namespace, &p.name, &p.spec)
            .map_err(|errors| ConfigError::Policy { policy: p.name.clone(), errors })?;
        policies.push(compiled);
    }
    Ok((config, policies))
}
