//! The pure step of the controller: what one namespace should look like.
//!
//! [`compute`] takes a [`NamespaceSnapshot`] — the namespace's DataAccessPolicies, the pods
//! the operator sees, the namespace's NetworkPolicies — and returns the [`Desired`] state:
//!
//! - the `custos-config` ConfigMap: the compiled sidecar config of the live policies
//!   ([`custos_policy::compile_namespace`], unchanged) with the workload identity table, an
//!   owner reference to each live policy, the config hash as an annotation; `None` once no
//!   live policy is left (delete it);
//! - one NetworkPolicy per valid policy that wants one, owned (controller) by its policy,
//!   opening the sidecars' admin port to the sources of [`Options::sidecar_metrics_from`];
//! - the names of Custos's NetworkPolicies that are no longer wanted. The NetworkPolicy of a
//!   policy that stopped compiling is kept, not deleted: an edit that breaks a policy must not
//!   open its app port;
//! - the status of each live policy ([`conditions`]) and the Events the change of status
//!   calls for (a resync with nothing changed yields none);
//! - the policies being deleted whose finalizer can go once the rest is applied.
//!
//! Policies with a `deletionTimestamp` are left out of everything but that last list.
//! Deterministic: pods, policies and NetworkPolicies in any order give the same output.

mod bypass;
pub mod conditions;
mod mesh_ports;

pub use mesh_ports::{LINKERD_OPAQUE_PORTS, MeshIdentity};
mod pods;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use custos_api::config::SidecarConfig;
use custos_api::policy::Mode;
use custos_api::{DataAccessPolicy, DataAccessPolicyStatus};
use custos_policy::namespace::config_hash;
use custos_policy::{PolicyInput, compile_namespace};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use self::conditions::{
    BypassState, MeshPortState, NetworkPolicyState, PolicyFacts, ShadowState, SidecarState,
};
use crate::inject::ADMIN_PORT_NAME;
use crate::names::{
    CONFIG_KEY, CONFIG_MAP_NAME, FINALIZER, MANAGED_BY, MANAGED_BY_LABEL, POLICY_LABEL, network_policy_name,
};

/// apiVersion of the DataAccessPolicy owner references.
const POLICY_API_VERSION: &str = "custos.dev/v1alpha1";
/// Kind of the DataAccessPolicy owner references.
const POLICY_KIND: &str = "DataAccessPolicy";

/// Annotation of the `custos-config` ConfigMap holding the config hash (`sha256:<hex>`).
pub const CONFIG_HASH_ANNOTATION: &str = "custos.dev/config-hash";

/// What the controller read about one namespace.
#[derive(Clone, Debug, Default)]
pub struct NamespaceSnapshot {
    /// The namespace.
    pub namespace: String,
    /// Its DataAccessPolicies, including those being deleted (`deletionTimestamp` set).
    pub policies: Vec<DataAccessPolicy>,
    /// The pods the operator sees, in any namespace: those of this namespace (selected pod
    /// counts, bypass checks) and those rule sources may name (the identity table).
    pub pods: Vec<Pod>,
    /// The NetworkPolicies of the namespace, Custos's own and the others.
    pub network_policies: Vec<NetworkPolicy>,
    /// The Services of the namespace (how a mesh reads the protected pods' proxy port); `None`
    /// when they could not be listed (the check is then skipped, not the reconcile).
    pub services: Option<Vec<Service>>,
    /// The sidecar config the namespace's `custos-config` holds now, when it exists and
    /// parses: a policy whose spec no longer compiles keeps its last good compiled form from
    /// it, rather than dropping out of the config (which would leave its pods' sidecars
    /// passing every request).
    pub current_config: Option<SidecarConfig>,
}

/// The operator's cluster-wide choices that shape every namespace's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Who may reach the sidecars' admin port (the container port named [`ADMIN_PORT_NAME`]:
    /// `/metrics`, `/ready`, `/healthz`) through the NetworkPolicies derived from the policies,
    /// e.g. the monitoring namespace's Prometheus. Empty: nobody; a policy's NetworkPolicy opens its proxy port
    /// only, and where the cluster enforces it a Prometheus in another pod cannot scrape the
    /// sidecars (the kubelet's probes come from the node, which NetworkPolicies let through).
    pub sidecar_metrics_from: Vec<NetworkPolicyPeer>,
    /// The mesh the injected sidecars take caller identities from (`--caller-identity`
    /// among the sidecar arguments): whether, and for which mesh, `ProxyPortNotHttp` is
    /// checked.
    pub mesh_identity: Option<MeshIdentity>,
}

/// The state the namespace should be brought to.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// The `custos-config` ConfigMap to apply; `None`: delete it (no live policy left).
    pub config_map: Option<ConfigMap>,
    /// The hash of the compiled config, when there is one.
    pub config_hash: Option<String>,
    /// The NetworkPolicies to apply, sorted by name.
    pub network_policies: Vec<NetworkPolicy>,
    /// Custos's NetworkPolicies of the namespace to delete, sorted.
    pub stale_network_policies: Vec<String>,
    /// The status of each live policy, sorted by policy name.
    pub statuses: Vec<(String, DataAccessPolicyStatus)>,
    /// The Events to record, in policy order.
    pub events: Vec<DesiredEvent>,
    /// Policies being deleted that carry the finalizer: remove it once the rest is applied.
    pub release_finalizers: Vec<String>,
}

/// The severity of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Something went as it should.
    Normal,
    /// Something needs attention.
    Warning,
}

/// An Event to record on a DataAccessPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredEvent {
    /// The policy the Event regards.
    pub policy: String,
    /// Normal or Warning.
    pub type_: EventType,
    /// PascalCase reason, e.g. `CompileError`.
    pub reason: String,
    /// Human-readable note (at most 1 kB).
    pub note: String,
}

/// Why the desired state cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// The compiled config does not serialise (not expected of a compiled config).
    #[error("cannot serialise the sidecar config of namespace {namespace}: {source}")]
    Serialize {
        /// The namespace.
        namespace: String,
        /// The serialiser's error.
        source: serde_json::Error,
    },
}

/// True for a policy being deleted (`deletionTimestamp` set).
pub fn is_deleting(policy: &DataAccessPolicy) -> bool {
    policy.metadata.deletion_timestamp.is_some()
}

/// True when the policy carries the operator's finalizer.
pub fn has_finalizer(policy: &DataAccessPolicy) -> bool {
    policy.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

/// The namespaces whose pods a snapshot of `namespace` needs: the namespace itself and every
/// namespace a rule source of a live, enabled policy names (its own when omitted).
pub fn pod_namespaces(namespace: &str, policies: &[DataAccessPolicy]) -> BTreeSet<String> {
    let mut namespaces = BTreeSet::from([namespace.to_string()]);
    for policy in policies.iter().filter(|p| !is_deleting(p) && p.spec.mode != Mode::Disabled) {
        for w in policy.spec.rules.iter().filter_map(|r| r.from.as_ref()).flat_map(|f| f.workloads.iter()) {
            namespaces.insert(w.namespace.clone().unwrap_or_else(|| namespace.to_string()));
        }
    }
    namespaces
}

/// Computes the desired state of `snapshot.namespace` with the default [`Options`]. `now`
/// stamps the conditions whose status changes (to the second).
pub fn compute(snapshot: &NamespaceSnapshot, now: Timestamp) -> Result<Desired, DesiredError> {
    compute_with(snapshot, now, &Options::default())
}

/// Computes the desired state of `snapshot.namespace` with `options`. `now` stamps the
/// conditions whose status changes (to the second).
pub fn compute_with(
    snapshot: &NamespaceSnapshot,
    now: Timestamp,
    options: &Options,
) -> Result<Desired, DesiredError> {
    let now = Time(Timestamp::from_second(now.as_second()).unwrap_or(now));
    let namespace = snapshot.namespace.as_str();
    let mut policies: Vec<&DataAccessPolicy> = snapshot
        .policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .filter(|p| p.metadata.name.as_deref().is_some_and(|n| !n.is_empty()))
        .collect();
    policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let (deleting, live): (Vec<&DataAccessPolicy>, Vec<&DataAccessPolicy>) =
        policies.into_iter().partition(|p| is_deleting(p));

    let release_finalizers =
        deleting.iter().filter(|p| has_finalizer(p)).map(|p| name(p).to_string()).collect();

    if live.is_empty() {
        return Ok(Desired {
            stale_network_policies: stale(snapshot, &BTreeSet::new(), &BTreeSet::new()),
            release_finalizers,
            ..Desired::default()
        });
    }

    let inputs: Vec<PolicyInput> = live
        .iter()
        .map(|p| PolicyInput {
            name: name(p).to_string(),
            generation: p.metadata.generation,
            spec: p.spec.clone(),
        })
        .collect();
    let mut compilation = compile_namespace(namespace, &inputs, Vec::new());
    // A policy that stopped compiling (the validating webhook bypassed, or a stricter
    // compiler after an upgrade) stays enforced as it last compiled.
    let mut carried: BTreeMap<String, Option<i64>> = BTreeMap::new();
    if let Some(current) = &snapshot.current_config {
        for policy in &live {
            let policy_name = name(policy);
            if !compilation.errors.contains_key(policy_name) || policy.spec.mode == Mode::Disabled {
                continue;
            }
            if let Some(last_good) = current.policies.iter().find(|p| p.name == policy_name) {
                carried.insert(policy_name.to_string(), last_good.generation);
                compilation.config.policies.push(last_good.clone());
            }
        }
        compilation.config.policies.sort_by(|a, b| a.name.cmp(&b.name));
    }
    compilation.config.workloads = pods::identities(namespace, &compilation.config.policies, &snapshot.pods);
    compilation.config.hash = config_hash(&compilation.config);
    let hash = compilation.config.hash.clone();

    let config_json = serde_json::to_string_pretty(&compilation.config)
        .map_err(|source| DesiredError::Serialize { namespace: namespace.to_string(), source })?;
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP_NAME.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())])),
            annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), hash.clone())])),
            owner_references: Some(live.iter().filter_map(|p| owner_reference(p, false)).collect()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config_json)])),
        ..ConfigMap::default()
    };

    let mut network_policies = compilation.network_policies;
    for np in &mut network_policies {
        let owner = np.metadata.labels.as_ref().and_then(|l| l.get(POLICY_LABEL)).cloned();
        if let Some(policy) = owner.and_then(|o| live.iter().find(|p| name(p) == o)) {
            np.metadata.owner_references = owner_reference(policy, true).map(|r| vec![r]);
        }
        open_admin_port(np, &options.sidecar_metrics_from);
    }
    network_policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let wanted: BTreeSet<String> =
        network_policies.iter().filter_map(|np| np.metadata.name.clone()).collect();
    let kept: BTreeSet<String> = live
        .iter()
        .filter(|p| compilation.errors.contains_key(name(p)))
        .map(|p| network_policy_name(name(p)))
        .collect();

    // The pods each policy selects; and the enforcing policies (as the sidecars have them:
    // compiled, or carried as they last compiled), whose verdicts outrank any Audit policy's.
    let selected_by: Vec<Vec<&Pod>> =
        live.iter().map(|p| pods::selected(&snapshot.pods, namespace, &p.spec.workload.selector)).collect();
    let mut enforced_by: BTreeMap<*const Pod, Vec<&str>> = BTreeMap::new();
    for (i, policy) in live.iter().enumerate() {
        let enforced = policy.spec.mode == Mode::Enforce
            && compilation.config.policies.iter().any(|c| c.name == name(policy));
        if enforced {
            for pod in &selected_by[i] {
                enforced_by.entry(std::ptr::from_ref(*pod)).or_default().push(name(policy));
            }
        }
    }

    // The policies that are not Disabled selecting each pod: those whose ports the injection
    // must reconcile (it refuses, or skips, a pod they disagree on).
    let mut injecting: BTreeMap<*const Pod, Vec<&DataAccessPolicy>> = BTreeMap::new();
    for (i, policy) in live.iter().enumerate() {
        if policy.spec.mode != Mode::Disabled {
            for pod in &selected_by[i] {
                injecting.entry(std::ptr::from_ref(*pod)).or_default().push(policy);
            }
        }
    }
    let disagreement = |pod: &Pod| {
        injecting.get(&std::ptr::from_ref(pod)).and_then(|policies| pods::port_disagreement(policies))
    };

    let mut statuses = Vec::with_capacity(live.len());
    let mut events = Vec::new();
    for (index, policy) in live.iter().enumerate() {
        let policy_name = name(policy);
        let errors = compilation.errors.get(policy_name);
        let selected = selected_by[index].clone();
        let np_name = network_policy_name(policy_name);
        let network_policy = if errors.is_some() {
            NetworkPolicyState::CompileError
        } else if wanted.contains(&np_name) {
            NetworkPolicyState::Wanted(np_name)
        } else {
            NetworkPolicyState::NotRequested(not_requested_reason(policy))
        };
        let bypass = if policy.spec.mode == Mode::Disabled {
            BypassState::Disabled
        } else {
            BypassState::Checked {
                app_port: policy.spec.workload.app_port,
                bypassing: bypass::bypassing(namespace, &policy.spec, &selected, &snapshot.network_policies),
            }
        };
        let sidecar = if policy.spec.mode == Mode::Disabled {
            SidecarState::Disabled
        } else {
            let (disagreeing, agreeing): (Vec<&Pod>, Vec<&Pod>) =
                selected.iter().partition(|pod| disagreement(pod).is_some());
            let mut disagreeing: Vec<String> = disagreeing
                .iter()
                .map(|pod| {
                    let what = disagreement(pod).unwrap_or_default();
                    format!("{} ({what})", pod.metadata.name.as_deref().unwrap_or_default())
                })
                .collect();
            disagreeing.sort();
            SidecarState::Checked {
                missing: pods::without_sidecar(&agreeing),
                outdated: pods::outdated_sidecars(&agreeing, &policy.spec),
                disagreeing,
            }
        };
        let mesh_port = match (policy.spec.mode, options.mesh_identity, &snapshot.services) {
            (Mode::Disabled, _, _) => MeshPortState::Disabled,
            (_, None, _) => MeshPortState::NoMeshIdentity,
            (_, Some(_), None) => MeshPortState::ServicesUnlisted,
            (_, Some(mesh), Some(services)) => MeshPortState::Checked {
                mesh,
                proxy_port: policy.spec.workload.proxy_port(),
                declarations: mesh_ports::non_http_declarations(
                    mesh,
                    namespace,
                    &policy.spec,
                    &selected,
                    services,
                ),
            },
        };
        let shadow = if policy.spec.mode == Mode::Audit {
            shadow_of(&selected, &enforced_by)
        } else {
            ShadowState::NotAudit
        };
        let facts = PolicyFacts {
            generation: policy.metadata.generation,
            rule_count: policy.spec.rules.len(),
            selected_pods: selected.len(),
            config_hash: errors.is_none().then_some(hash.as_str()),
            compile_errors: errors.map(|e| {
                let mut messages: Vec<String> = e.iter().map(ToString::to_string).collect();
                if let Some(generation) = carried.get(policy_name) {
                    let which = generation
                        .map_or_else(|| "the last".to_string(), |g| format!("generation {g}, the last"));
                    messages
                        .push(format!("{which} that compiled, is still enforced until the spec is fixed"));
                }
                messages
            }),
            network_policy,
            bypass,
            sidecar,
            mesh_port,
            shadow,
        };
        let status = conditions::status(policy.status.as_ref(), &facts, &now);
        events.extend(conditions::events(policy_name, policy.status.as_ref(), &status));
        statuses.push((policy_name.to_string(), status));
    }

    Ok(Desired {
        config_map: Some(config_map),
        config_hash: Some(hash),
        stale_network_policies: stale(snapshot, &wanted, &kept),
        network_policies,
        statuses,
        events,
        release_finalizers,
    })
}

/// Which of `selected` (an Audit policy's pods) enforcing policies also select
/// (`enforced_by`: each pod of the snapshot an enforcing policy selects, and those policies):
/// those pods' count and the policies' names.
fn shadow_of(selected: &[&Pod], enforced_by: &BTreeMap<*const Pod, Vec<&str>>) -> ShadowState {
    let mut pods = 0;
    let mut by = BTreeSet::new();
    for pod in selected {
        if let Some(names) = enforced_by.get(&std::ptr::from_ref(*pod)) {
            pods += 1;
            by.extend(names.iter().map(|n| (*n).to_string()));
        }
    }
    ShadowState::Checked { pods, by: by.into_iter().collect() }
}

/// Adds to `np` an ingress rule that opens the sidecars' admin port to `from` (none when
/// `from` is empty). NetworkPolicies only ever allow: the proxy port's rule is unchanged. The
/// port is named ([`ADMIN_PORT_NAME`]), not numbered, so sidecars injected before a change of
/// the operator's `--sidecar-admin-port` stay reachable until their pods are replaced.
fn open_admin_port(np: &mut NetworkPolicy, from: &[NetworkPolicyPeer]) {
    if from.is_empty() {
        return;
    }
    let Some(spec) = np.spec.as_mut() else { return };
    spec.ingress.get_or_insert_with(Vec::new).push(NetworkPolicyIngressRule {
        from: Some(from.to_vec()),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::String(ADMIN_PORT_NAME.to_string())),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }]),
    });
}

impl Desired {
    /// Records that the apiserver refused `policy`'s NetworkPolicy (`error` says why, without
    /// personal data): its `NetworkPolicyApplied` and `Ready` turn False with reason
    /// `ApplyFailed`, and its Events are derived again against the status in `snapshot`.
    pub fn network_policy_failed(
        &mut self,
        snapshot: &NamespaceSnapshot,
        policy: &str,
        error: &str,
        now: Timestamp,
    ) {
        let now = Time(Timestamp::from_second(now.as_second()).unwrap_or(now));
        let Some((_, status)) = self.statuses.iter_mut().find(|(name, _)| name == policy) else { return };
        let old = snapshot
            .policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(policy) && !is_deleting(p))
            .and_then(|p| p.status.as_ref());
        let message = format!("NetworkPolicy {} could not be applied: {error}", network_policy_name(policy));
        conditions::network_policy_failed(old, status, message, &now);
        let events = conditions::events(policy, old, status);
        self.events.retain(|e| e.policy != policy);
        self.events.extend(events);
        // Back to policy order (stable: each policy's Events keep their order).
        self.events.sort_by(|a, b| a.policy.cmp(&b.policy));
    }
}

fn name(policy: &DataAccessPolicy) -> &str {
    policy.metadata.name.as_deref().unwrap_or_default()
}

/// An owner reference to `policy` (none without a uid, which only a stored object has).
fn owner_reference(policy: &DataAccessPolicy, controller: bool) -> Option<OwnerReference> {
    let uid = policy.metadata.uid.as_deref().filter(|u| !u.is_empty())?;
    Some(policy_owner_reference(name(policy), uid, controller))
}

/// An owner reference to the DataAccessPolicy `name` (uid `uid`), as the operator puts on the
/// objects it derives from it; `controller` for a NetworkPolicy (see [`is_ours`]).
pub fn policy_owner_reference(name: &str, uid: &str, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: POLICY_API_VERSION.to_string(),
        kind: POLICY_KIND.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        controller: Some(controller),
        block_owner_deletion: controller.then_some(true),
    }
}

fn not_requested_reason(policy: &DataAccessPolicy) -> &'static str {
    match policy.spec.mode {
        Mode::Audit => "mode is Audit: no NetworkPolicy changes traffic during a dry run",
        Mode::Disabled => "mode is Disabled",
        Mode::Enforce => "spec.networkPolicy.enabled is false",
    }
}

/// Whether `np` is one of Custos's own NetworkPolicies: it names a DataAccessPolicy as its
/// controlling owner and is named after it (`custos-<policy>`). Labels prove nothing (anyone
/// who may create a NetworkPolicy may set them): a labelled one of somebody else's would pass
/// unchecked for a bypass, or be deleted as ours. One that claims the owner falsely is
/// overwritten (its name is ours) or deleted with the stale ones.
pub(crate) fn is_ours(np: &NetworkPolicy) -> bool {
    let Some(np_name) = np.metadata.name.as_deref() else { return false };
    np.metadata.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == POLICY_KIND
            && o.api_version == POLICY_API_VERSION
            && network_policy_name(&o.name) == np_name
    })
}

/// Custos's NetworkPolicies of the namespace ([`is_ours`]) that are neither `wanted` nor
/// `kept`, sorted.
fn stale(snapshot: &NamespaceSnapshot, wanted: &BTreeSet<String>, kept: &BTreeSet<String>) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .network_policies
        .iter()
        .filter(|np| np.metadata.namespace.as_deref().is_none_or(|ns| ns == snapshot.namespace))
        .filter(|np| is_ours(np))
        .filter_map(|np| np.metadata.name.clone())
        .filter(|n| !wanted.contains(n) && !kept.contains(n))
        .collect();
    names.sort();
    names.dedup();
    names
}
