//! The example policies as the demo runs them: read from `examples/` (compiled in), compiled
//! per namespace exactly as `custos compile` does, with two adjustments a laptop needs, both
//! shown in the report:
//! - the storefront's `jwksUri` points at the demo's identity provider on 127.0.0.1;
//! - when the demo runs outside the back office's opening hours (07:00-20:00 UTC, Mon-Sat),
//!   the `closed-outside-office-hours` rule is given a window around the current hour, so
//!   that the rest of the story can be told at any time of day.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, Timelike, Utc};
use custos_api::WorkloadIdentity;
use custos_policy::{PolicyInput, compile_namespace, load_policies};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};

/// The example policy files, by name.
const EXAMPLES: [(&str, &str); 5] = [
    ("courier-branch-scoping.yaml", include_str!("../../../../examples/courier-branch-scoping.yaml")),
    ("audit-mode-rollout.yaml", include_str!("../../../../examples/audit-mode-rollout.yaml")),
    ("backoffice-bulk-export.yaml", include_str!("../../../../examples/backoffice-bulk-export.yaml")),
    ("storefront-crawler-quotas.yaml", include_str!("../../../../examples/storefront-crawler-quotas.yaml")),
    ("scanner-egress-lockdown.yaml", include_str!("../../../../examples/scanner-egress-lockdown.yaml")),
];

/// The office-hours rule of backoffice-bulk-export.yaml.
const OFFICE_HOURS_RULE: &str = "closed-outside-office-hours";

/// One namespace's compiled config and NetworkPolicies.
pub(crate) struct Compiled {
    /// The sidecar config (JSON), as `custos compile` writes it.
    pub(crate) config_json: String,
    /// The NetworkPolicies of the namespace's policies.
    pub(crate) network_policies: Vec<NetworkPolicy>,
}

/// The compiled examples, and what the demo changed in them.
pub(crate) struct Policies {
    /// By namespace.
    pub(crate) namespaces: BTreeMap<String, Compiled>,
    /// Adjustments made to the examples, one line each.
    pub(crate) adjustments: Vec<String>,
}

/// Loads and compiles the examples as of `now`. `jwks_uri` replaces the storefront's identity
/// provider.
pub(crate) fn compile(
    jwks_uri: &str,
    workloads: &[WorkloadIdentity],
    now: DateTime<Utc>,
) -> anyhow::Result<Policies> {
    let mut by_namespace: BTreeMap<String, Vec<PolicyInput>> = BTreeMap::new();
    let mut adjustments = Vec::new();
    for (file, text) in EXAMPLES {
        let loaded = load_policies(text);
        if !loaded.errors.is_empty() {
            bail!("examples/{file} does not load: {:?}", loaded.errors.first().map(|e| &e.errors));
        }
        for mut policy in loaded.policies {
            adjust(&mut policy.input, jwks_uri, now, &mut adjustments);
            let namespace = policy.namespace.context("an example policy has no namespace")?;
            by_namespace.entry(namespace).or_default().push(policy.input);
        }
    }
    let mut namespaces = BTreeMap::new();
    for (namespace, inputs) in by_namespace {
        let out = compile_namespace(&namespace, &inputs, workloads.to_vec());
        if let Some((name, errors)) = out.errors.iter().next() {
            bail!("the example policy {namespace}/{name} does not compile: {errors:?}");
        }
        let config_json = serde_json::to_string_pretty(&out.config)?;
        namespaces.insert(namespace, Compiled { config_json, network_policies: out.network_policies });
    }
    Ok(Policies { namespaces, adjustments })
}

fn adjust(policy: &mut PolicyInput, jwks_uri: &str, now: DateTime<Utc>, adjustments: &mut Vec<String>) {
    if let Some(users) = policy.spec.identity.as_mut().and_then(|i| i.users.as_mut())
        && users.jwt.jwks_uri.is_some()
    {
        users.jwt.jwks_uri = Some(jwks_uri.to_owned());
        adjustments.push(format!("{}: jwksUri -> the demo's identity provider on 127.0.0.1", policy.name));
    }
    let (hour, weekday) = (now.hour(), now.weekday().num_days_from_sunday());
    let open = (7..20).contains(&hour) && weekday != 0;
    if open {
        return;
    }
    for rule in policy.spec.rules.iter_mut().filter(|r| r.name == OFFICE_HOURS_RULE) {
        let window: Vec<String> = [23, 0, 1, 2].iter().map(|d| ((hour + d) % 24).to_string()).collect();
        rule.when = Some(format!("!(request.hour in [{}])", window.join(", ")));
        adjustments.push(format!(
            "{}: it is {:02}:{:02} UTC on {}, outside office hours: {OFFICE_HOURS_RULE} opens the back office \
             from {:02}:00 to {:02}:00 UTC for the demo",
            policy.name,
            hour,
            now.minute(),
            now.weekday(),
            (hour + 23) % 24,
            (hour + 3) % 24,
        ));
    }
}

/// The egress a NetworkPolicy allows, one line per rule (`DNS`, the collector, named
/// destinations), or why it does not restrict egress.
pub(crate) fn egress_summary(policy: &NetworkPolicy) -> Vec<String> {
    let Some(spec) = &policy.spec else { return vec!["no spec".to_owned()] };
    let restricts = spec.policy_types.as_ref().is_some_and(|t| t.iter().any(|t| t == "Egress"));
    if !restricts {
        return vec!["egress not restricted".to_owned()];
    }
    let rules = spec.egress.as_deref().unwrap_or_default();
    let mut lines: Vec<String> = rules
        .iter()
        .map(|rule| {
            let to: Vec<String> = rule.to.as_deref().unwrap_or_default().iter().map(peer).collect();
            let ports: Vec<String> = rule.ports.as_deref().unwrap_or_default().iter().map(port).collect();
            let to = if to.is_empty() { "anywhere".to_owned() } else { to.join(", ") };
            if ports.is_empty() {
                format!("allow {to}")
            } else {
                format!("allow {to} on {}", ports.join(", "))
            }
        })
        .collect();
    lines.push("deny everything else (no internet, no other services)".to_owned());
    lines
}

fn labels(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Option<String> {
    let labels = selector?.match_labels.as_ref()?;
    Some(labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

fn peer(peer: &NetworkPolicyPeer) -> String {
    let namespace = peer
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|l| l.get("kubernetes.io/metadata.name"))
        .map_or_else(|| "any namespace".to_owned(), |n| format!("namespace {n}"));
    match labels(peer.pod_selector.as_ref()) {
        Some(pods) if !pods.is_empty() => format!("pods {pods} in {namespace}"),
        _ => format!("all pods in {namespace}"),
    }
}

fn port(port: &NetworkPolicyPort) -> String {
    let number = match &port.port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => n.to_string(),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => s.clone(),
        None => "any".to_owned(),
    };
    format!("{}/{number}", port.protocol.as_deref().unwrap_or("TCP"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_example_compiles_and_the_scanners_egress_is_locked_down() {
        let monday_noon = "2026-11-23T12:00:00Z".parse().unwrap();
        let policies = compile("http://127.0.0.1:1/.well-known/jwks.json", &[], monday_noon).unwrap();
        assert_eq!(policies.adjustments.len(), 1, "{:?}", policies.adjustments);
        let names: Vec<&str> = policies.namespaces.keys().map(String::as_str).collect();
        assert_eq!(names, ["backoffice", "logistics", "scanning", "storefront"]);
        assert!(
            policies.namespaces["storefront"]
                .config_json
                .contains("http://127.0.0.1:1/.well-known/jwks.json")
        );
        assert!(policies.adjustments.iter().any(|a| a.starts_with("pickup-search: jwksUri")));
        let scanning = &policies.namespaces["scanning"].network_policies;
        let lines = egress_summary(&scanning[0]);
        assert!(lines.iter().any(|l| l.contains("app=parcel-db") && l.contains("TCP/5432")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("UDP/53")), "{lines:?}");
        assert!(lines.last().unwrap().starts_with("deny everything else"));
        let logistics = &policies.namespaces["logistics"].network_policies;
        assert!(logistics.iter().all(|np| egress_summary(np) == ["egress not restricted"]));
    }

    #[test]
    fn at_night_the_office_hours_open_around_the_current_hour() {
        let sunday_night = "2026-11-22T23:30:00Z".parse().unwrap();
        let policies = compile("http://127.0.0.1:1/jwks.json", &[], sunday_night).unwrap();
        let config = &policies.namespaces["backoffice"].config_json;
        assert!(config.contains("!(request.hour in [22, 23, 0, 1])"), "{config}");
        let note = policies.adjustments.iter().find(|a| a.contains(OFFICE_HOURS_RULE)).unwrap();
        assert!(note.contains("23:30 UTC on Sun") && note.contains("from 22:00 to 02:00 UTC"), "{note}");
    }
}
