//! Sidecar bypass: a NetworkPolicy that Custos does not manage, selecting a protected pod and
//! admitting ingress to its app port, lets callers reach the app directly, around the
//! sidecar (NetworkPolicies are additive: one allowing rule is enough).

use custos_api::policy::DataAccessPolicySpec;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pods;
use crate::selector::selector_matches;

/// The names (sorted) of the NetworkPolicies of `namespace`, other than Custos's own, that
/// admit ingress to the app port of the policy's pods.
///
/// The protected pods are `selected` (the running pods the workload selector matches); while
/// there are none, the selector's `matchLabels` stand for them. A rule without ports admits
/// every port; a numbered port (or range) admits the app port when it covers it; a named port
/// admits it when a protected pod declares that name for the app port, or when there is no pod
/// to resolve the name on. Only TCP rules count (the protocol defaults to TCP).
pub(crate) fn bypassing(
    namespace: &str,
    spec: &DataAccessPolicySpec,
    selected: &[&Pod],
    network_policies: &[NetworkPolicy],
) -> Vec<String> {
    let app_port = i32::from(spec.workload.app_port);
    let stand_in = spec.workload.selector.match_labels.clone().unwrap_or_default();
    let mut names: Vec<String> = network_policies
        .iter()
        .filter(|np| np.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .filter(|np| !super::is_ours(np))
        .filter(|np| {
            let Some(np_spec) = np.spec.as_ref() else { return false };
            if np_spec.policy_types.as_ref().is_some_and(|t| !t.iter().any(|t| t == "Ingress")) {
                return false;
            }
            let pod_selector = np_spec.pod_selector.clone().unwrap_or_default();
            let Some(targets) = pods::targeted(selected, &stand_in, |l| selector_matches(&pod_selector, l))
            else {
                return false;
            };
            np_spec.ingress.iter().flatten().any(|rule| match rule.ports.as_deref() {
                None | Some([]) => true,
                Some(ports) => ports.iter().any(|p| admits(p, app_port, &targets)),
            })
        })
        .filter_map(|np| np.metadata.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn admits(port: &NetworkPolicyPort, app_port: i32, targets: &[&Pod]) -> bool {
    if port.protocol.as_deref().is_some_and(|p| !p.eq_ignore_ascii_case("TCP")) {
        return false;
    }
    match &port.port {
        None => true,
        Some(IntOrString::Int(n)) => match port.end_port {
            Some(end) => (*n..=end).contains(&app_port),
            None => *n == app_port,
        },
        Some(IntOrString::String(name)) => {
            targets.is_empty() || targets.iter().any(|p| pods::named_port(p, name) == Some(app_port))
        }
    }
}
