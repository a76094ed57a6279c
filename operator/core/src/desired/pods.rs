//! What the operator reads from pods: whether a pod counts (running, not terminating), its
//! IPs, service account and named ports; the workload identity table; selected pod counts.

use std::collections::BTreeMap;

use custos_api::DataAccessPolicySpec;
use custos_api::config::{PolicyConfig, WorkloadIdentity};
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::inject::{JWKS_DIR, PROXY_PORT_NAME};
use crate::names::SIDECAR_CONTAINER;
use crate::selector::selector_matches;

/// The labels of a pod (empty when it has none).
pub(crate) fn labels(pod: &Pod) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

/// The namespace of a pod (empty when unset).
pub(crate) fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

/// A pod that is Running and not being deleted.
pub(crate) fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The service account a pod runs as (`default` when the spec names none).
fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()))
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
}

/// The IPs of a pod: `status.podIPs`, else `status.podIP`. Host-network pods have none of
/// their own (their IP is the node's, shared with every other host-network process), so they
/// get none here.
fn ips(pod: &Pod) -> Vec<&str> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut ips: Vec<&str> =
        status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).filter(|ip| !ip.is_empty()).collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())
    {
        ips.push(ip);
    }
    ips
}

/// The container port a named port resolves to in `pod` (app and native-sidecar init
/// containers), if the pod declares it.
pub(crate) fn named_port(pod: &Pod, name: &str) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// Of the protected pods `selected`, those an object selecting by `selects` targets; `None`
/// when it targets none of them. While there are no protected pods, `stand_in` (the workload
/// selector's `matchLabels`) stands for them: an object selecting it targets them (an empty
/// list).
pub(crate) fn targeted<'a>(
    selected: &[&'a Pod],
    stand_in: &BTreeMap<String, String>,
    selects: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Option<Vec<&'a Pod>> {
    let targets: Vec<&Pod> = selected.iter().copied().filter(|p| selects(labels(p))).collect();
    (!targets.is_empty() || (selected.is_empty() && selects(stand_in))).then_some(targets)
}

/// The running pods of `in_namespace` that `selector` selects.
pub(crate) fn selected<'a>(pods: &'a [Pod], in_namespace: &str, selector: &LabelSelector) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|p| namespace(p) == in_namespace && is_running(p) && selector_matches(selector, labels(p)))
        .collect()
}

/// The `custos-sidecar` container of `pod` (regular or native).
fn sidecar_of(pod: &Pod) -> Option<&Container> {
    let s = pod.spec.as_ref()?;
    s.containers.iter().chain(s.init_containers.iter().flatten()).find(|c| c.name == SIDECAR_CONTAINER)
}

/// The names of `pods` that have no `custos-sidecar` container (regular or native), sorted.
pub(crate) fn without_sidecar(pods: &[&Pod]) -> Vec<String> {
    let mut names: Vec<String> = pods
        .iter()
        .filter(|p| sidecar_of(p).is_none())
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

/// Where the policies selecting one pod (not Disabled) disagree on the sidecar's ports, as the
/// injection would refuse them: `policies a, b disagree on proxyPort (15080, 16000)`; `None`
/// when they agree.
pub(crate) fn port_disagreement(policies: &[&custos_api::DataAccessPolicy]) -> Option<String> {
    let disagree = |field: &str, port: &dyn Fn(&DataAccessPolicySpec) -> u16| {
        let mut ports: Vec<u16> = policies.iter().map(|p| port(&p.spec)).collect();
        ports.sort_unstable();
        ports.dedup();
        (ports.len() > 1).then(|| {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{field} {}", ports.join(", "))
        })
    };
    let fields: Vec<String> = [
        disagree("proxyPort", &|s: &DataAccessPolicySpec| s.workload.proxy_port()),
        disagree("appPort", &|s: &DataAccessPolicySpec| s.workload.app_port),
    ]
    .into_iter()
    .flatten()
    .collect();
    if fields.is_empty() {
        return None;
    }
    let mut names: Vec<&str> = policies.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    names.sort_unstable();
    Some(format!("policies {} disagree on {}", names.join(", "), fields.join(" and ")))
}

/// Of `pods`, those whose sidecar was injected for other settings than `spec` has now, each
/// as its name and what differs, sorted by name. The injection fixes them when a pod is
/// created (a pod spec cannot change them later), so after an edit of the policy the running
/// pods keep the old ones until they are replaced:
///
/// - the sidecar listens on another port than `proxyPort` (its `custos-proxy` port): callers
///   and Services of the new port reach nothing;
/// - it forwards to another port than `appPort` (`CUSTOS_UPSTREAM`, set when the pod was
///   injected before a policy selected it: the pod's first port);
/// - the `jwksSecretRef` Secret is not mounted: every user token is refused.
pub(crate) fn outdated_sidecars(pods: &[&Pod], spec: &DataAccessPolicySpec) -> Vec<String> {
    let proxy_port = i32::from(spec.workload.proxy_port());
    let app_port = spec.workload.app_port;
    let jwks = spec
        .identity
        .as_ref()
        .and_then(|i| i.users.as_ref())
        .and_then(|u| u.jwt.jwks_secret_ref.as_ref())
        .map(|r| (r.name.as_str(), format!("{JWKS_DIR}/{}", r.name)));
    let mut outdated: Vec<String> = pods
        .iter()
        .filter_map(|pod| {
            let sidecar = sidecar_of(pod)?;
            let mut differs = Vec::new();
            let listens = sidecar.ports.iter().flatten().find(|p| p.name.as_deref() == Some(PROXY_PORT_NAME));
            if let Some(port) = listens.map(|p| p.container_port).filter(|p| *p != proxy_port) {
                differs.push(format!("listens on {port}, proxyPort is {proxy_port}"));
            }
            let upstream = sidecar
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "CUSTOS_UPSTREAM")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u16>().ok());
            if let Some(port) = upstream.filter(|p| *p != app_port) {
                differs.push(format!("forwards to port {port}, appPort is {app_port}"));
            }
            if let Some((secret, path)) = &jwks
                && !sidecar.volume_mounts.iter().flatten().any(|m| &m.mount_path == path)
            {
                differs.push(format!("JWKS Secret {secret} not mounted"));
            }
            (!differs.is_empty()).then(|| {
                format!("{} ({})", pod.metadata.name.as_deref().unwrap_or_default(), differs.join(", "))
            })
        })
        .collect();
    outdated.sort();
    outdated
}

/// The workload identity table of a namespace's config: one entry per IP of every running pod
/// that a `rules[].from.workloads[]` entry of an enabled policy selects (namespace — the
/// policy's own when omitted —, service account when given, labels). Sorted by IP. An IP that
/// two different identities claim (a reused IP seen twice in the cache) is left out: a
/// caller that cannot be told apart is not trusted as either.
pub(crate) fn identities(
    policy_namespace: &str,
    policies: &[PolicyConfig],
    pods: &[Pod],
) -> Vec<WorkloadIdentity> {
    let sources: Vec<_> = policies
        .iter()
        .filter(|p| p.spec.mode != custos_api::policy::Mode::Disabled)
        .flat_map(|p| p.spec.rules.iter())
        .filter_map(|r| r.from.as_ref())
        .flat_map(|f| f.workloads.iter())
        .collect();
    if sources.is_empty() {
        return Vec::new();
    }
    let mut by_ip: BTreeMap<&str, Vec<WorkloadIdentity>> = BTreeMap::new();
    for pod in pods.iter().filter(|p| is_running(p)) {
        let ns = namespace(pod);
        let sa = service_account(pod);
        let pod_labels = labels(pod);
        let selected = sources.iter().any(|w| {
            w.namespace.as_deref().unwrap_or(policy_namespace) == ns
                && w.service_account.as_deref().is_none_or(|want| want == sa)
                && w.labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        });
        if !selected {
            continue;
        }
        for ip in ips(pod) {
            let identity = WorkloadIdentity {
                ip: ip.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
                labels: pod_labels.clone(),
                labels_unknown: false,
            };
            let entries = by_ip.entry(ip).or_default();
            if !entries.contains(&identity) {
                entries.push(identity);
            }
        }
    }
    by_ip.into_values().filter(|ids| ids.len() == 1).flatten().collect()
}
