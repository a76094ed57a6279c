//! The NetworkPolicy derived from a DataAccessPolicy: ingress only to the sidecar's port,
//! only from the workloads its Allow rules name; the app port closed; optional egress
//! lockdown.

use std::collections::BTreeMap;
use std::net::IpAddr;

use custos_api::policy::{Action, DataAccessPolicySpec, EgressMode, EgressPeer, Mode, NetworkPolicySpec};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::{FieldErrors, Path};
use crate::selector::{check_label_key, check_label_value, is_dns_label};

/// Label the operator puts on every object it manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "custos";
/// Label naming the DataAccessPolicy an object was derived from.
pub const POLICY_LABEL: &str = "custos.dev/policy";
/// Labels of the Custos collector pods, which sidecars must reach even under egress lockdown:
/// those the Helm chart gives them (`app.kubernetes.io/name` is the chart's name, `custos`
/// unless `nameOverride` changes it). The chart test checks that they select its collector.
pub const COLLECTOR_POD_LABELS: [(&str, &str); 2] =
    [("app.kubernetes.io/name", "custos"), ("app.kubernetes.io/component", "collector")];
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The NetworkPolicy name for a DataAccessPolicy.
pub fn network_policy_name(policy: &str) -> String {
    format!("custos-{policy}")
}

/// Checks `spec.networkPolicy`.
pub(crate) fn check(np: &NetworkPolicySpec, path: &Path, errors: &mut FieldErrors) {
    if np.egress == EgressMode::Allow && !np.egress_allow.is_empty() {
        errors.push(path.field("egressAllow").as_str(), "only applies when egress is DenyAll");
    }
    for (i, peer) in np.egress_allow.iter().enumerate() {
        let pp = path.field("egressAllow").index(i);
        let has_pods = peer.namespace.is_some() || !peer.pod_labels.is_empty();
        match (&peer.cidr, has_pods) {
            (Some(_), true) | (None, false) => {
                errors.push(pp.as_str(), "set either cidr, or namespace and/or podLabels")
            }
            (Some(cidr), false) if !is_cidr(cidr) => errors
                .push(pp.field("cidr").as_str(), "must be an IP block such as 10.0.0.0/16 or 2001:db8::/32"),
            _ => {}
        }
        if let Some(ns) = &peer.namespace
            && !is_dns_label(ns)
        {
            errors.push(pp.field("namespace").as_str(), "must be a valid namespace name");
        }
        for (k, v) in &peer.pod_labels {
            let lp = pp.field("podLabels").key(k);
            check_label_key(k, &lp, errors);
            check_label_value(v, &lp, errors);
        }
        for (j, port) in peer.ports.iter().enumerate() {
            if *port == 0 {
                errors.push(pp.field("ports").index(j).as_str(), "must be between 1 and 65535");
            }
        }
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, prefix)) = s.split_once('/') else { return false };
    let Ok(ip) = ip.parse::<IpAddr>() else { return false };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

/// Builds the NetworkPolicy for a valid policy, or `None` when none is wanted (disabled by
/// `spec.networkPolicy.enabled: false`, or the policy is in Audit or Disabled mode, which
/// must not change traffic).
pub fn build(namespace: &str, name: &str, spec: &DataAccessPolicySpec) -> Option<NetworkPolicy> {
    let np = spec.network_policy.clone().unwrap_or_default();
    if !np.enabled || spec.mode != Mode::Enforce {
        return None;
    }
    let proxy_port = NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(spec.workload.proxy_port()))),
        protocol: Some("TCP".into()),
        ..Default::default()
    };

    // Sources: the workloads named by Allow rules. One Allow rule without workload sources
    // (users from anywhere, e.g. through an ingress gateway) opens the proxy port to all.
    let allows: Vec<_> = spec.rules.iter().filter(|r| r.action == Action::Allow).collect();
    let open_to_all = allows.iter().any(|r| r.from.as_ref().is_none_or(|f| f.workloads.is_empty()))
        || (allows.is_empty() && spec.default_action == Action::Allow);
    let mut peers: Vec<NetworkPolicyPeer> = Vec::new();
    if !open_to_all {
        for w in allows.iter().filter_map(|r| r.from.as_ref()).flat_map(|f| f.workloads.iter()) {
            let ns = w.namespace.clone().unwrap_or_else(|| namespace.to_string());
            let peer = NetworkPolicyPeer {
                namespace_selector: Some(labels_selector([(NAMESPACE_NAME_LABEL.to_string(), ns)].into())),
                pod_selector: Some(labels_selector(w.labels.clone())),
                ..Default::default()
            };
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
    }
    let ingress = if allows.is_empty() && spec.default_action == Action::Deny {
        // Nothing is ever allowed: close everything.
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule {
            from: if open_to_all { None } else { Some(peers) },
            ports: Some(vec![proxy_port]),
        }]
    };

    let mut policy_types = vec!["Ingress".to_string()];
    let egress = if np.egress == EgressMode::DenyAll {
        policy_types.push("Egress".to_string());
        Some(egress_rules(&np.egress_allow))
    } else {
        None
    };

    Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(name)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (POLICY_LABEL.to_string(), name.to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: Some(spec.workload.selector.clone()),
            policy_types: Some(policy_types),
            ingress: Some(ingress),
            egress,
        }),
    })
}

fn egress_rules(allow: &[EgressPeer]) -> Vec<NetworkPolicyEgressRule> {
    let port = |p: u16, proto: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(p))),
        protocol: Some(proto.to_string()),
        ..Default::default()
    };
    let mut rules = vec![
        // DNS, so the app can still resolve its allowed destinations.
        NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: Some(labels_selector([("k8s-app".to_string(), "kube-dns".to_string())].into())),
                ..Default::default()
            }]),
            ports: Some(vec![port(53, "UDP"), port(53, "TCP")]),
        },
        // The Custos collector, so audit events still leave the pod.
        NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: Some(labels_selector(
                    COLLECTOR_POD_LABELS.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
                )),
                ..Default::default()
            }]),
            ports: None,
        },
    ];
    for peer in allow {
        let to = if let Some(cidr) = &peer.cidr {
            NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: cidr.clone(), except: None }),
                ..Default::default()
            }
        } else {
            NetworkPolicyPeer {
                namespace_selector: peer
                    .namespace
                    .as_ref()
                    .map(|ns| labels_selector([(NAMESPACE_NAME_LABEL.to_string(), ns.clone())].into())),
                pod_selector: Some(labels_selector(peer.pod_labels.clone())),
                ..Default::default()
            }
        };
        rules.push(NetworkPolicyEgressRule {
            to: Some(vec![to]),
            ports: (!peer.ports.is_empty()).then(|| peer.ports.iter().map(|p| port(*p, "TCP")).collect()),
        });
    }
    rules
}

fn labels_selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector { match_labels: (!labels.is_empty()).then_some(labels), match_expressions: None }
}
