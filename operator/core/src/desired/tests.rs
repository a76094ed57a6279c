//! Tests of the pure step, with `mk_*` builders for policies, pods and NetworkPolicies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use custos_api::DataAccessPolicy;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::conditions::*;
use super::*;

const NS: &str = "shop";

fn t(second: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + second).unwrap()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
}

/// A stored policy protecting `app=<name>` on port 8080, with one Allow rule whose source is
/// service account `portal` of the namespace, and a NetworkPolicy.
fn mk_policy(name: &str) -> DataAccessPolicy {
    mk_policy_spec(
        name,
        json!({
            "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 },
            "rules": [
                { "name": "portal-read", "action": "Allow", "from": { "workloads": [ { "serviceAccount": "portal" } ] } }
            ]
        }),
    )
}

fn mk_policy_spec(name: &str, spec: serde_json::Value) -> DataAccessPolicy {
    let mut p: DataAccessPolicy = serde_json::from_value(json!({
        "apiVersion": "custos.dev/v1alpha1",
        "kind": "DataAccessPolicy",
        "metadata": { "name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1 },
        "spec": spec,
    }))
    .expect("a valid DataAccessPolicy");
    p.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    p
}

/// A policy whose rowFilter is not valid CEL.
fn mk_invalid_policy(name: &str) -> DataAccessPolicy {
    mk_policy_spec(
        name,
        json!({
            "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 },
            "rules": [
                { "name": "broken", "action": "Allow", "records": "$.items[*]", "rowFilter": "record.branch ==" }
            ]
        }),
    )
}

/// A Running pod with an IP, injected (it has the `custos-sidecar` container).
fn mk_pod(ns: &str, name: &str, labels: &[(&str, &str)], service_account: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(map(labels)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            containers: vec![
                Container {
                    name: "app".into(),
                    ports: Some(vec![ContainerPort {
                        container_port: 8080,
                        name: Some("http".into()),
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                },
                Container { name: crate::names::SIDECAR_CONTAINER.into(), ..Container::default() },
            ],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..PodStatus::default()
        }),
    }
}

fn mk_port(port: Option<IntOrString>) -> NetworkPolicyPort {
    NetworkPolicyPort { port, protocol: Some("TCP".into()), end_port: None }
}

/// A NetworkPolicy of `ns` selecting `selector` with one ingress rule on `ports` (`None`: all).
fn mk_netpol(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: Option<Vec<NetworkPolicyPort>>,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: (!selector.is_empty()).then(|| map(selector)),
                match_expressions: None,
            }),
            ingress: Some(vec![NetworkPolicyIngressRule { from: None, ports }]),
            policy_types: Some(vec!["Ingress".into()]),
            egress: None,
        }),
    }
}

/// One of Custos's own NetworkPolicies, as the operator writes it for `policy`: labelled, and
/// owned by the policy as its controller.
fn mk_ours(name: &str, policy: &str) -> NetworkPolicy {
    let mut np = mk_netpol(NS, name, &[("app", policy)], None);
    np.metadata.labels = Some(map(&[(MANAGED_BY_LABEL, MANAGED_BY), (POLICY_LABEL, policy)]));
    np.metadata.owner_references = Some(vec![policy_owner_reference(policy, &format!("uid-{policy}"), true)]);
    np
}

fn snapshot(
    policies: Vec<DataAccessPolicy>,
    pods: Vec<Pod>,
    network_policies: Vec<NetworkPolicy>,
) -> NamespaceSnapshot {
    NamespaceSnapshot {
        namespace: NS.into(),
        policies,
        pods,
        network_policies,
        services: Some(Vec::new()),
        current_config: None,
    }
}

fn status_of<'a>(d: &'a Desired, policy: &str) -> &'a DataAccessPolicyStatus {
    &d.statuses.iter().find(|(n, _)| n == policy).unwrap_or_else(|| panic!("no status for {policy}")).1
}

fn cond<'a>(
    s: &'a DataAccessPolicyStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition in {s:#?}"))
}

fn config(d: &Desired) -> custos_api::SidecarConfig {
    let cm = d.config_map.as_ref().expect("a ConfigMap");
    let json = cm.data.as_ref().unwrap().get(CONFIG_KEY).unwrap();
    // The sidecar's own loader: schema version and hash are checked.
    let (config, _) = custos_policy::load_config(json.as_bytes()).expect("the sidecar loads the config");
    config
}

/// Feeds the computed statuses back into the policies, as the apply step would.
fn with_statuses(mut policies: Vec<DataAccessPolicy>, d: &Desired) -> Vec<DataAccessPolicy> {
    for p in &mut policies {
        if let Some((_, s)) = d.statuses.iter().find(|(n, _)| Some(n) == p.metadata.name.as_ref()) {
            p.status = Some(s.clone());
        }
    }
    policies
}

fn pods_fixture() -> Vec<Pod> {
    vec![
        mk_pod(NS, "orders-1", &[("app", "orders")], "orders", "10.0.0.1"),
        mk_pod(NS, "orders-2", &[("app", "orders")], "orders", "10.0.0.2"),
        mk_pod(NS, "portal-1", &[("app", "portal")], "portal", "10.0.1.1"),
        mk_pod(NS, "portal-2", &[("app", "portal")], "portal", "10.0.1.2"),
        mk_pod("other", "portal-x", &[("app", "portal")], "portal", "10.9.0.1"),
    ]
}

#[test]
fn config_map_holds_the_compiled_config_owned_by_every_live_policy() {
    let d = compute(&snapshot(vec![mk_policy("orders"), mk_policy("billing")], pods_fixture(), vec![]), t(0))
        .unwrap();
    let cm = d.config_map.as_ref().unwrap();
    assert_eq!(cm.metadata.name.as_deref(), Some(CONFIG_MAP_NAME));
    assert_eq!(cm.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        cm.metadata.labels.as_ref().unwrap().get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY)
    );
    let config = config(&d);
    assert_eq!(cm.metadata.annotations.as_ref().unwrap().get(CONFIG_HASH_ANNOTATION), Some(&config.hash));
    assert_eq!(d.config_hash.as_ref(), Some(&config.hash));
    let names: Vec<_> = config.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["billing", "orders"]);

    let owners = cm.metadata.owner_references.as_ref().unwrap();
    assert_eq!(owners.len(), 2);
    for (owner, name) in owners.iter().zip(["billing", "orders"]) {
        assert_eq!(owner.name, name);
        assert_eq!(owner.uid, format!("uid-{name}"));
        assert_eq!(owner.api_version, "custos.dev/v1alpha1");
        assert_eq!(owner.kind, "DataAccessPolicy");
        assert_eq!(owner.controller, Some(false));
    }
}

#[test]
fn each_valid_policy_gets_a_network_policy_it_controls() {
    let d =
        compute(&snapshot(vec![mk_policy("orders"), mk_policy("billing")], vec![], vec![]), t(0)).unwrap();
    let names: Vec<_> = d.network_policies.iter().map(|np| np.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["custos-billing", "custos-orders"]);
    let owner = &d.network_policies[1].metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.name.as_str(), owner.uid.as_str()), ("orders", "uid-orders"));
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));
}

/// The ingress rules of `np` as (ports, sources) in the API's JSON, for comparison.
fn ingress_of(np: &NetworkPolicy) -> Vec<(serde_json::Value, serde_json::Value)> {
    let rules = np.spec.as_ref().unwrap().ingress.clone().unwrap_or_default();
    rules.iter().map(|r| (json!(r.ports), json!(r.from))).collect()
}

#[test]
fn the_admin_port_opens_to_the_metrics_sources_and_only_then() {
    let nobody_allowed = mk_policy_spec(
        "vault",
        json!({
            "workload": { "selector": { "matchLabels": { "app": "vault" } }, "appPort": 8080 },
            "rules": [ { "name": "no-export", "action": "Deny", "to": { "paths": ["/export"] } } ]
        }),
    );
    let snap = snapshot(vec![mk_policy("orders"), nobody_allowed], vec![], vec![]);
    let proxy_rule = (
        json!([{ "port": 15080, "protocol": "TCP" }]),
        json!([{
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": NS } },
            "podSelector": {}
        }]),
    );

    // Default: the proxy port only (and nothing at all for a policy that allows nothing).
    let d = compute(&snap, t(0)).unwrap();
    assert_eq!(d.network_policies.len(), 2);
    assert_eq!(ingress_of(&d.network_policies[0]), std::slice::from_ref(&proxy_rule));
    assert_eq!(ingress_of(&d.network_policies[1]), []);

    let monitoring: NetworkPolicyPeer = serde_json::from_value(json!({
        "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "monitoring" } },
        "podSelector": { "matchLabels": { "app.kubernetes.io/name": "prometheus" } }
    }))
    .unwrap();
    let options = Options { sidecar_metrics_from: vec![monitoring.clone()], ..Options::default() };
    let d = compute_with(&snap, t(0), &options).unwrap();
    // by name: sidecars injected with another --sidecar-admin-port stay reachable
    let admin_rule = (json!([{ "port": "custos-admin", "protocol": "TCP" }]), json!([monitoring]));
    assert_eq!(ingress_of(&d.network_policies[0]), [proxy_rule, admin_rule.clone()]);
    assert_eq!(ingress_of(&d.network_policies[1]), [admin_rule]);
    // The rest of the desired state does not depend on it.
    let plain = compute(&snap, t(0)).unwrap();
    assert_eq!(d.config_hash, plain.config_hash);
    assert_eq!(d.statuses, plain.statuses);
}

#[test]
fn identity_table_lists_the_running_pods_rule_sources_select_across_namespaces() {
    let mut spec = serde_json::to_value(mk_policy("orders").spec).unwrap();
    spec["rules"][0]["from"]["workloads"] = json!([
        { "serviceAccount": "portal" },
        { "namespace": "other", "labels": { "app": "portal" } }
    ]);
    let mut terminating = mk_pod(NS, "portal-old", &[("app", "portal")], "portal", "10.0.1.9");
    terminating.metadata.deletion_timestamp = Some(Time(t(0)));
    let mut pending = mk_pod(NS, "portal-new", &[("app", "portal")], "portal", "10.0.1.8");
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let mut no_ip = mk_pod(NS, "portal-noip", &[("app", "portal")], "portal", "");
    no_ip.status.as_mut().unwrap().pod_ips = None;
    let mut host = mk_pod(NS, "portal-host", &[("app", "portal")], "portal", "192.168.0.10");
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut pods = pods_fixture();
    pods.extend([terminating, pending, no_ip, host]);

    let d = compute(&snapshot(vec![mk_policy_spec("orders", spec)], pods, vec![]), t(0)).unwrap();
    let ips: Vec<_> = config(&d).workloads.iter().map(|w| (w.ip.clone(), w.namespace.clone())).collect();
    assert_eq!(
        ips,
        [
            ("10.0.1.1".to_string(), NS.to_string()),
            ("10.0.1.2".to_string(), NS.to_string()),
            ("10.9.0.1".to_string(), "other".to_string()),
        ]
    );
    let w = &config(&d).workloads[0];
    assert_eq!(w.service_account, "portal");
    assert_eq!(w.labels, map(&[("app", "portal")]));
}

#[test]
fn an_ip_claimed_by_two_identities_is_left_out() {
    let pods = vec![
        mk_pod(NS, "portal-1", &[("app", "portal")], "portal", "10.0.1.1"),
        mk_pod(NS, "portal-2", &[("app", "portal"), ("v", "2")], "portal", "10.0.1.1"),
        mk_pod(NS, "portal-3", &[("app", "portal")], "portal", "10.0.1.3"),
    ];
    let d = compute(&snapshot(vec![mk_policy("orders")], pods, vec![]), t(0)).unwrap();
    let ips: Vec<_> = config(&d).workloads.iter().map(|w| w.ip.clone()).collect();
    assert_eq!(ips, ["10.0.1.3"]);
}

#[test]
fn output_does_not_depend_on_the_order_of_pods_policies_or_network_policies() {
    let policies = vec![mk_policy("orders"), mk_policy("billing"), mk_invalid_policy("broken")];
    let netpols = vec![
        mk_netpol(NS, "allow-all", &[], None),
        mk_netpol(NS, "metrics", &[("app", "orders")], Some(vec![mk_port(Some(IntOrString::Int(9090)))])),
    ];
    let a = compute(&snapshot(policies.clone(), pods_fixture(), netpols.clone()), t(0)).unwrap();
    let mut pods = pods_fixture();
    pods.reverse();
    pods.rotate_left(2);
    let mut policies = policies;
    policies.reverse();
    let mut netpols = netpols;
    netpols.reverse();
    let b = compute(&snapshot(policies, pods, netpols), t(0)).unwrap();

    assert_eq!(a.config_hash, b.config_hash);
    assert_eq!(a.config_map, b.config_map);
    assert_eq!(a.network_policies, b.network_policies);
    assert_eq!(a.statuses, b.statuses);
    assert_eq!(a.events, b.events);
    assert_eq!(a.stale_network_policies, b.stale_network_policies);
}

#[test]
fn the_hash_follows_the_identity_table() {
    let base = compute(&snapshot(vec![mk_policy("orders")], pods_fixture(), vec![]), t(0)).unwrap();
    let mut more = pods_fixture();
    more.push(mk_pod(NS, "portal-3", &[("app", "portal")], "portal", "10.0.1.3"));
    let grown = compute(&snapshot(vec![mk_policy("orders")], more, vec![]), t(0)).unwrap();
    assert_ne!(base.config_hash, grown.config_hash);
    // A pod no rule source names changes nothing.
    let mut unrelated = pods_fixture();
    unrelated.push(mk_pod(NS, "batch-1", &[("app", "batch")], "batch", "10.0.2.1"));
    let same = compute(&snapshot(vec![mk_policy("orders")], unrelated, vec![]), t(0)).unwrap();
    assert_eq!(base.config_hash, same.config_hash);
}

#[test]
fn an_invalid_policy_is_left_out_while_the_other_stays() {
    let policies = vec![mk_policy("orders"), mk_invalid_policy("broken")];
    let d = compute(&snapshot(policies, pods_fixture(), vec![]), t(0)).unwrap();
    let config = config(&d);
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    assert_eq!(d.network_policies.len(), 1);

    let broken = status_of(&d, "broken");
    let compiled = cond(broken, COMPILED);
    assert_eq!((compiled.status.as_str(), compiled.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    assert!(compiled.message.contains("spec.rules[0].rowFilter"), "{}", compiled.message);
    let np = cond(broken, NETWORK_POLICY_APPLIED);
    assert_eq!((np.status.as_str(), np.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    let ready = cond(broken, READY);
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    assert_eq!(broken.config_hash, None);
    assert_eq!(broken.rule_count, Some(1));

    let orders = status_of(&d, "orders");
    assert_eq!(cond(orders, READY).status, "True");
    assert_eq!(cond(orders, COMPILED).status, "True");
    assert_eq!(orders.config_hash.as_ref(), Some(&config.hash));

    let warnings: Vec<_> = d.events.iter().filter(|e| e.type_ == EventType::Warning).collect();
    assert_eq!(warnings.len(), 1, "{:#?}", d.events);
    assert_eq!((warnings[0].policy.as_str(), warnings[0].reason.as_str()), ("broken", REASON_COMPILE_ERROR));
    assert!(warnings[0].note.contains("spec.rules[0].rowFilter"));
}

/// A policy whose spec stops compiling (the validating webhook bypassed, a stricter compiler
/// after an upgrade) keeps its last good compiled form in the config, so its pods' sidecars
/// go on enforcing it; its status says so. Without a config to carry it from, it is left out.
#[test]
fn a_policy_that_stops_compiling_stays_enforced_as_it_last_compiled() {
    let mut good = mk_policy("orders");
    good.metadata.generation = Some(3);
    let before = compute(&snapshot(vec![good.clone(), mk_policy("billing")], vec![], vec![]), t(0)).unwrap();
    let previous = config(&before);

    let mut broken = mk_invalid_policy("orders");
    broken.metadata.generation = Some(4);
    broken.metadata.uid = good.metadata.uid.clone();
    let snap = NamespaceSnapshot {
        current_config: Some(previous.clone()),
        ..snapshot(vec![broken.clone(), mk_policy("billing")], vec![], vec![])
    };
    let d = compute(&snap, t(1)).unwrap();
    let now = config(&d);
    let names: Vec<&str> = now.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["billing", "orders"], "sorted by name, as compiled");
    let carried = now.policies.iter().find(|p| p.name == "orders").unwrap();
    assert_eq!(carried, previous.policies.iter().find(|p| p.name == "orders").unwrap());
    assert_eq!(carried.generation, Some(3));
    let compiled = cond(status_of(&d, "orders"), COMPILED);
    assert_eq!((compiled.status.as_str(), compiled.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    assert!(compiled.message.contains("spec.rules[0].rowFilter"), "{}", compiled.message);
    assert!(
        compiled.message.contains("generation 3, the last that compiled, is still enforced"),
        "{}",
        compiled.message
    );

    // Set to Disabled while broken: not carried.
    broken.spec.mode = Mode::Disabled;
    let snap = NamespaceSnapshot {
        current_config: Some(previous),
        ..snapshot(vec![broken.clone(), mk_policy("billing")], vec![], vec![])
    };
    let names: Vec<String> =
        config(&compute(&snap, t(2)).unwrap()).policies.into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["billing"]);
    // Nothing to carry from: left out.
    broken.spec.mode = Mode::Enforce;
    let d = compute(&snapshot(vec![broken, mk_policy("billing")], vec![], vec![]), t(3)).unwrap();
    assert_eq!(config(&d).policies.len(), 1);
}

#[test]
fn a_network_policy_is_deleted_when_no_longer_wanted_but_kept_for_a_policy_that_stopped_compiling() {
    let ours = mk_ours;
    let mut audit = mk_policy("audited");
    audit.spec.mode = custos_api::policy::Mode::Audit;
    let netpols = vec![
        ours("custos-orders", "orders"),
        ours("custos-gone", "gone"),
        ours("custos-broken", "broken"),
        ours("custos-audited", "audited"),
        mk_netpol(NS, "foreign", &[("app", "x")], None),
    ];
    let d = compute(
        &snapshot(vec![mk_policy("orders"), mk_invalid_policy("broken"), audit], vec![], netpols),
        t(0),
    )
    .unwrap();
    assert_eq!(d.stale_network_policies, ["custos-audited", "custos-gone"]);
    let np = cond(status_of(&d, "audited"), NETWORK_POLICY_APPLIED);
    assert_eq!((np.status.as_str(), np.reason.as_str()), ("True", REASON_NOT_REQUESTED));
}

#[test]
fn without_live_policies_the_config_map_goes_and_finalizers_are_released() {
    let mut gone = mk_policy("orders");
    gone.metadata.deletion_timestamp = Some(Time(t(0)));
    let ours = mk_ours("custos-orders", "orders");
    let d = compute(&snapshot(vec![gone], pods_fixture(), vec![ours]), t(0)).unwrap();
    assert!(d.config_map.is_none());
    assert!(d.config_hash.is_none());
    assert!(d.statuses.is_empty() && d.events.is_empty() && d.network_policies.is_empty());
    assert_eq!(d.stale_network_policies, ["custos-orders"]);
    assert_eq!(d.release_finalizers, ["orders"]);
}

#[test]
fn a_policy_being_deleted_leaves_the_config_while_the_others_stay() {
    let mut gone = mk_policy("billing");
    gone.metadata.deletion_timestamp = Some(Time(t(0)));
    let mut no_finalizer = mk_policy("legacy");
    no_finalizer.metadata.deletion_timestamp = Some(Time(t(0)));
    no_finalizer.metadata.finalizers = Some(vec!["other.dev/keep".into()]);
    let d = compute(&snapshot(vec![mk_policy("orders"), gone, no_finalizer], vec![], vec![]), t(0)).unwrap();
    assert_eq!(config(&d).policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    let owners: Vec<_> =
        d.config_map.unwrap().metadata.owner_references.unwrap().into_iter().map(|o| o.name).collect();
    assert_eq!(owners, ["orders"]);
    assert_eq!(d.statuses.len(), 1);
    assert_eq!(d.release_finalizers, ["billing"]);
}

#[test]
fn selected_pods_honour_match_expressions() {
    let mut p = mk_policy("orders");
    p.spec.workload.selector = LabelSelector {
        match_labels: Some(map(&[("app", "orders")])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "track".into(),
            operator: "NotIn".into(),
            values: Some(vec!["canary".into()]),
        }]),
    };
    let canary = mk_pod(NS, "orders-c", &[("app", "orders"), ("track", "canary")], "orders", "10.0.0.3");
    let other_ns = mk_pod("other", "orders-x", &[("app", "orders")], "orders", "10.9.0.3");
    let mut pods = pods_fixture();
    pods.extend([canary, other_ns]);
    let d = compute(&snapshot(vec![p], pods, vec![]), t(0)).unwrap();
    assert_eq!(status_of(&d, "orders").selected_pods, Some(2));
}

#[test]
fn status_reports_generation_rules_and_ready() {
    let mut p = mk_policy("orders");
    p.metadata.generation = Some(7);
    let d = compute(&snapshot(vec![p], pods_fixture(), vec![]), t(0)).unwrap();
    let s = status_of(&d, "orders");
    assert_eq!(s.observed_generation, Some(7));
    assert_eq!(s.rule_count, Some(1));
    assert_eq!(s.selected_pods, Some(2));
    let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            READY,
            COMPILED,
            NETWORK_POLICY_APPLIED,
            SIDECAR_BYPASS,
            SIDECAR_MISSING,
            SIDECAR_OUTDATED,
            PROXY_PORT_NOT_HTTP
        ]
    );
    assert!(s.conditions.iter().all(|c| c.observed_generation == Some(7)));
    assert_eq!(cond(s, NETWORK_POLICY_APPLIED).reason, REASON_APPLIED);
    let bypass = cond(s, SIDECAR_BYPASS);
    assert_eq!((bypass.status.as_str(), bypass.reason.as_str()), ("False", REASON_NO_BYPASS));
}

fn bypass_of(netpols: Vec<NetworkPolicy>, pods: Vec<Pod>) -> (String, String) {
    let d = compute(&snapshot(vec![mk_policy("orders")], pods, netpols), t(0)).unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_BYPASS);
    (c.status.clone(), c.message.clone())
}

#[test]
fn an_empty_pod_selector_without_ports_bypasses_the_sidecar() {
    let (status, message) = bypass_of(vec![mk_netpol(NS, "allow-all", &[], None)], pods_fixture());
    assert_eq!(status, "True");
    assert!(message.contains("allow-all") && message.contains("8080"), "{message}");
}

#[test]
fn ports_decide_whether_the_app_port_is_admitted() {
    let np = |ports| vec![mk_netpol(NS, "np", &[("app", "orders")], Some(ports))];
    let int = |p| mk_port(Some(IntOrString::Int(p)));
    assert_eq!(bypass_of(np(vec![int(8080)]), pods_fixture()).0, "True");
    assert_eq!(bypass_of(np(vec![int(9090), int(15080)]), pods_fixture()).0, "False");
    let range = NetworkPolicyPort { end_port: Some(9000), ..int(8000) };
    assert_eq!(bypass_of(np(vec![range]), pods_fixture()).0, "True");
    let udp = NetworkPolicyPort { protocol: Some("UDP".into()), ..int(8080) };
    assert_eq!(bypass_of(np(vec![udp]), pods_fixture()).0, "False");
    let any_port = mk_port(None);
    assert_eq!(bypass_of(np(vec![any_port]), pods_fixture()).0, "True");
    // Named ports resolve on the protected pods: `http` is 8080 there, `metrics` is not declared.
    let named = |n: &str| mk_port(Some(IntOrString::String(n.into())));
    assert_eq!(bypass_of(np(vec![named("http")]), pods_fixture()).0, "True");
    assert_eq!(bypass_of(np(vec![named("metrics")]), pods_fixture()).0, "False");
    // Without pods to resolve on, a named port counts as the app port.
    assert_eq!(bypass_of(np(vec![named("metrics")]), vec![]).0, "True");
}

#[test]
fn a_network_policy_must_select_a_protected_pod_to_bypass() {
    assert_eq!(bypass_of(vec![mk_netpol(NS, "np", &[("app", "portal")], None)], pods_fixture()).0, "False");
    assert_eq!(bypass_of(vec![mk_netpol(NS, "np", &[("app", "orders")], None)], pods_fixture()).0, "True");
    // Without running pods, the selector's matchLabels stand for them.
    assert_eq!(bypass_of(vec![mk_netpol(NS, "np", &[("app", "orders")], None)], vec![]).0, "True");
    assert_eq!(bypass_of(vec![mk_netpol(NS, "np", &[("app", "portal")], None)], vec![]).0, "False");
}

#[test]
fn other_namespaces_our_own_and_egress_only_network_policies_do_not_bypass() {
    let elsewhere = mk_netpol("other", "allow-all", &[], None);
    let ours = mk_ours("custos-orders", "orders");
    let mut egress_only = mk_netpol(NS, "egress", &[], None);
    egress_only.spec.as_mut().unwrap().policy_types = Some(vec!["Egress".into()]);
    let mut deny_all = mk_netpol(NS, "deny-all", &[], None);
    deny_all.spec.as_mut().unwrap().ingress = Some(vec![]);
    let (status, message) = bypass_of(vec![elsewhere, ours, egress_only, deny_all], pods_fixture());
    assert_eq!(status, "False", "{message}");
}

#[test]
fn several_bypassing_network_policies_are_named_in_order() {
    let (_, message) =
        bypass_of(vec![mk_netpol(NS, "zeta", &[], None), mk_netpol(NS, "alpha", &[], None)], pods_fixture());
    assert!(message.starts_with("NetworkPolicies alpha, zeta admit"), "{message}");
}

#[test]
fn last_transition_time_is_kept_while_the_status_holds() {
    let first = compute(&snapshot(vec![mk_policy("orders")], pods_fixture(), vec![]), t(0)).unwrap();
    assert_eq!(cond(status_of(&first, "orders"), READY).last_transition_time, Time(t(0)));

    // Later, with the status written back: same conditions, same times, even with a new
    // pod count.
    let policies = with_statuses(vec![mk_policy("orders")], &first);
    let mut pods = pods_fixture();
    pods.push(mk_pod(NS, "orders-3", &[("app", "orders")], "orders", "10.0.0.3"));
    let second = compute(&snapshot(policies.clone(), pods, vec![]), t(60)).unwrap();
    let s = status_of(&second, "orders");
    assert_eq!(s.selected_pods, Some(3));
    assert!(s.conditions.iter().all(|c| c.last_transition_time == Time(t(0))), "{s:#?}");

    // A bypass appears: SidecarBypass flips (new time), the others keep theirs.
    let third =
        compute(&snapshot(policies, pods_fixture(), vec![mk_netpol(NS, "open", &[], None)]), t(120)).unwrap();
    let s = status_of(&third, "orders");
    assert_eq!(cond(s, SIDECAR_BYPASS).last_transition_time, Time(t(120)));
    assert_eq!(cond(s, READY).last_transition_time, Time(t(0)));
    assert_eq!(cond(s, COMPILED).last_transition_time, Time(t(0)));
}

#[test]
fn condition_times_are_whole_seconds() {
    let now = t(0).checked_add(k8s_openapi::jiff::SignedDuration::from_millis(750)).unwrap();
    let d = compute(&snapshot(vec![mk_policy("orders")], vec![], vec![]), now).unwrap();
    assert_eq!(cond(status_of(&d, "orders"), READY).last_transition_time, Time(t(0)));
}

#[test]
fn events_follow_changes_and_a_resync_is_silent() {
    let netpols = vec![mk_netpol(NS, "open", &[], None)];
    let first = compute(&snapshot(vec![mk_policy("orders")], pods_fixture(), netpols.clone()), t(0)).unwrap();
    let reasons: Vec<_> = first.events.iter().map(|e| (e.type_, e.reason.as_str())).collect();
    assert_eq!(
        reasons,
        [(EventType::Normal, REASON_COMPILED), (EventType::Warning, REASON_SIDECAR_BYPASS_EVENT)]
    );

    // Resync: nothing changed, nothing to say, same status.
    let policies = with_statuses(vec![mk_policy("orders")], &first);
    let again = compute(&snapshot(policies.clone(), pods_fixture(), netpols.clone()), t(30)).unwrap();
    assert!(again.events.is_empty(), "{:#?}", again.events);
    assert_eq!(again.statuses, first.statuses);

    // A new caller pod changes the config hash: Compiled again; the bypass is old news.
    let mut pods = pods_fixture();
    pods.push(mk_pod(NS, "portal-3", &[("app", "portal")], "portal", "10.0.1.3"));
    let grown = compute(&snapshot(policies, pods, netpols), t(60)).unwrap();
    let reasons: Vec<_> = grown.events.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, [REASON_COMPILED]);
    assert!(grown.events[0].note.contains(grown.config_hash.as_deref().unwrap()));
}

#[test]
fn a_compile_error_is_reported_again_only_when_its_message_changes() {
    let first = compute(&snapshot(vec![mk_invalid_policy("broken")], vec![], vec![]), t(0)).unwrap();
    assert_eq!(first.events.len(), 1);
    let policies = with_statuses(vec![mk_invalid_policy("broken")], &first);
    let same = compute(&snapshot(policies.clone(), vec![], vec![]), t(10)).unwrap();
    assert!(same.events.is_empty(), "{:#?}", same.events);

    let mut other = policies[0].clone();
    other.spec.rules[0].row_filter = Some("record.branch == usr.branch".into());
    let changed = compute(&snapshot(vec![other], vec![], vec![]), t(20)).unwrap();
    assert_eq!(changed.events.len(), 1);
    assert_eq!(changed.events[0].reason, REASON_COMPILE_ERROR);
    // Still False: the transition time stays.
    assert_eq!(cond(status_of(&changed, "broken"), COMPILED).last_transition_time, Time(t(0)));
}

#[test]
fn a_refused_network_policy_turns_its_conditions_false_once() {
    let snap = snapshot(vec![mk_policy("orders"), mk_policy("billing")], pods_fixture(), vec![]);
    let mut d = compute(&snap, t(0)).unwrap();
    d.network_policy_failed(&snap, "orders", "admission webhook denied the request", t(0));
    let s = status_of(&d, "orders");
    let np = cond(s, NETWORK_POLICY_APPLIED);
    assert_eq!((np.status.as_str(), np.reason.as_str()), ("False", REASON_APPLY_FAILED));
    assert!(np.message.contains("custos-orders") && np.message.contains("webhook denied"), "{}", np.message);
    let ready = cond(s, READY);
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", REASON_APPLY_FAILED));
    assert_eq!(cond(status_of(&d, "billing"), READY).status, "True");
    let reasons: Vec<_> = d.events.iter().map(|e| (e.policy.as_str(), e.reason.as_str())).collect();
    assert_eq!(
        reasons,
        [("billing", REASON_COMPILED), ("orders", REASON_COMPILED), ("orders", REASON_NETWORK_POLICY_FAILED)]
    );

    // The same failure on the next reconcile: no new Event, same status.
    let snap2 = NamespaceSnapshot { policies: with_statuses(snap.policies.clone(), &d), ..snap };
    let mut d2 = compute(&snap2, t(30)).unwrap();
    d2.network_policy_failed(&snap2, "orders", "admission webhook denied the request", t(30));
    assert!(d2.events.is_empty(), "{:#?}", d2.events);
    assert_eq!(d2.statuses, d.statuses);
}

#[test]
fn pod_namespaces_are_the_namespace_and_those_rule_sources_name() {
    let mut spec = serde_json::to_value(mk_policy("orders").spec).unwrap();
    spec["rules"][0]["from"]["workloads"] = json!([{ "namespace": "portal" }, { "serviceAccount": "x" }]);
    let mut disabled = mk_policy_spec("off", spec.clone());
    disabled.spec.mode = custos_api::policy::Mode::Disabled;
    disabled.spec.rules[0].from.as_mut().unwrap().workloads[0].namespace = Some("ignored".into());
    let got = pod_namespaces(NS, &[mk_policy_spec("orders", spec), disabled]);
    assert_eq!(got.into_iter().collect::<Vec<_>>(), ["portal", NS]);
}

#[test]
fn finalizer_helpers() {
    let mut p = mk_policy("orders");
    assert!(has_finalizer(&p) && !is_deleting(&p));
    p.metadata.finalizers = None;
    p.metadata.deletion_timestamp = Some(Time(t(0)));
    assert!(!has_finalizer(&p) && is_deleting(&p));
}

/// Labels make no NetworkPolicy Custos's own: one labelled managed-by=custos (and with a
/// policy label) without the policy as its controlling owner is checked for a bypass like any
/// other, and never deleted as stale; one owned but not named after its owner neither.
#[test]
fn labels_alone_do_not_make_a_network_policy_ours() {
    let mut spoofed = mk_netpol(NS, "open-app-port", &[("app", "orders")], None);
    spoofed.metadata.labels = Some(map(&[(MANAGED_BY_LABEL, MANAGED_BY), (POLICY_LABEL, "orders")]));
    let mut misnamed = mk_ours("custos-orders", "orders");
    misnamed.metadata.name = Some("custos-other".into());
    let (status, message) = bypass_of(vec![spoofed.clone(), misnamed.clone()], pods_fixture());
    assert_eq!(status, "True", "{message}");
    assert!(message.contains("custos-other, open-app-port"), "{message}");
    let d = compute(&snapshot(vec![mk_policy("orders")], vec![], vec![spoofed, misnamed]), t(0)).unwrap();
    assert!(d.stale_network_policies.is_empty(), "{:?}", d.stale_network_policies);
}

/// A Running pod like [`mk_pod`] but without the sidecar (created before the policy).
fn mk_uninjected_pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let mut pod = mk_pod(NS, name, labels, "default", "10.0.9.9");
    pod.spec.as_mut().unwrap().containers.retain(|c| c.name != crate::names::SIDECAR_CONTAINER);
    pod
}

#[test]
fn selected_pods_without_the_sidecar_are_reported_once() {
    let orders = [("app", "orders")];
    let injected = mk_pod(NS, "orders-a", &orders, "default", "10.0.0.1");
    let mut native = mk_pod(NS, "orders-n", &orders, "default", "10.0.0.2");
    let spec = native.spec.as_mut().unwrap();
    let sidecar = spec.containers.pop().unwrap();
    spec.init_containers = Some(vec![sidecar]);
    let snap = snapshot(vec![mk_policy("orders")], vec![injected.clone(), native.clone()], vec![]);
    let d = compute(&snap, t(0)).unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_MISSING);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_ALL_PODS_INJECTED));
    assert_eq!(c.message, "all 2 selected running pods have the sidecar");

    // Seven pods created before the policy: counted, the first five named.
    let mut pods = vec![injected, native];
    pods.extend((1..=7).map(|i| mk_uninjected_pod(&format!("orders-old-{i}"), &orders)));
    let mut snap = snapshot(vec![mk_policy("orders")], pods, vec![]);
    snap.policies[0].status = Some(status_of(&d, "orders").clone());
    let d2 = compute(&snap, t(1)).unwrap();
    let c = cond(status_of(&d2, "orders"), SIDECAR_MISSING);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_PODS_WITHOUT_SIDECAR));
    assert!(
        c.message.starts_with(
            "7 of 9 selected running pods have no sidecar (orders-old-1, orders-old-2, orders-old-3, \
             orders-old-4, orders-old-5 and 2 more)"
        ),
        "{}",
        c.message
    );
    assert!(c.message.contains("kubectl rollout restart"), "{}", c.message);
    assert_eq!(cond(status_of(&d2, "orders"), READY).status, "True", "a warning, not a failure");
    let missing_events: Vec<_> =
        d2.events.iter().filter(|e| e.reason == REASON_SIDECAR_MISSING_EVENT).collect();
    assert_eq!(missing_events.len(), 1);
    assert_eq!(missing_events[0].type_, EventType::Warning);

    // The rollout goes on: fewer pods without it, no second Event.
    snap.policies[0].status = Some(status_of(&d2, "orders").clone());
    snap.pods.retain(|p| p.metadata.name.as_deref() != Some("orders-old-7"));
    let d3 = compute(&snap, t(2)).unwrap();
    assert!(cond(status_of(&d3, "orders"), SIDECAR_MISSING).message.starts_with("6 of 8"));
    assert!(d3.events.iter().all(|e| e.reason != REASON_SIDECAR_MISSING_EVENT), "{:?}", d3.events);

    // A Disabled policy is not checked.
    let mut disabled = mk_policy("orders");
    disabled.spec.mode = custos_api::policy::Mode::Disabled;
    let d = compute(&snapshot(vec![disabled], snap.pods.clone(), vec![]), t(0)).unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_MISSING);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_POLICY_DISABLED));
}

/// A pod `app=orders` whose app listens on `app_port`, injected by the real injection with
/// the namespace's policy as it was (`spec`; one selecting `app=other` leaves the pod to the
/// namespace label alone).
fn mk_injected_pod(name: &str, spec: serde_json::Value, app_port: i32) -> Pod {
    let mut pod = mk_pod(NS, name, &[("app", "orders")], "default", "10.0.0.1");
    let containers = &mut pod.spec.as_mut().unwrap().containers;
    containers.retain(|c| c.name != crate::names::SIDECAR_CONTAINER);
    containers[0].ports.as_mut().unwrap()[0].container_port = app_port;
    let policies = [mk_policy_spec("orders", spec)];
    let labels = map(&[(crate::names::NAMESPACE_INJECTION_LABEL, "enabled")]);
    let settings = crate::inject::InjectSettings::default();
    match crate::inject::inject(&pod, NS, &labels, &policies, &settings) {
        crate::inject::Injection::Inject { pod: injected, .. } => Pod { status: pod.status, ..*injected },
        other => panic!("expected an injection, got {other:?}"),
    }
}

/// Pods whose sidecar the injection made for other settings than the policy has now (its
/// proxy port, app port or JWKS Secret changed since, or it was injected before a policy
/// selected it) are reported, with what differs, and one Warning Event; a warning, not a
/// failure; a Disabled policy is not checked.
#[test]
fn sidecars_injected_for_other_settings_are_reported() {
    let spec_of = |app: &str, proxy_port: u16, jwks: bool| {
        let mut spec = json!({
            "workload": { "selector": { "matchLabels": { "app": app } }, "appPort": 8080, "proxyPort": proxy_port },
            "rules": [ { "name": "read", "action": "Allow" } ]
        });
        if jwks {
            spec["identity"] = json!({"users": {"jwt": {"issuer": "https://sso.example", "audiences": ["orders"], "jwksSecretRef": {"name": "sso-jwks"}}}});
        }
        spec
    };
    let spec = |proxy_port: u16, jwks: bool| spec_of("orders", proxy_port, jwks);
    let current = mk_injected_pod("orders-a", spec(15080, true), 8080);
    let d = compute(
        &snapshot(vec![mk_policy_spec("orders", spec(15080, true))], vec![current.clone()], vec![]),
        t(0),
    )
    .unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_OUTDATED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_SIDECARS_CURRENT), "{}", c.message);

    // The policy now listens on 16000 and verifies users with a JWKS Secret the old pod lacks;
    // a pod injected by the namespace label forwards to its first port.
    let old = mk_injected_pod("orders-b", spec(15080, false), 8080);
    let by_label = mk_injected_pod("orders-c", spec_of("other", 15080, false), 9090);
    let mut snap =
        snapshot(vec![mk_policy_spec("orders", spec(16000, true))], vec![current, old, by_label], vec![]);
    snap.policies[0].status = Some(status_of(&d, "orders").clone());
    let d2 = compute(&snap, t(1)).unwrap();
    let c = cond(status_of(&d2, "orders"), SIDECAR_OUTDATED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_PODS_WITH_OUTDATED_SIDECAR));
    assert!(
        c.message.starts_with(
            "3 of 3 selected running pods have a sidecar injected for other settings than the policy's: \
             orders-a (listens on 15080, proxyPort is 16000); \
             orders-b (listens on 15080, proxyPort is 16000, JWKS Secret sso-jwks not mounted); \
             orders-c (listens on 15080, proxyPort is 16000, forwards to port 9090, appPort is 8080, \
             JWKS Secret sso-jwks not mounted)"
        ),
        "{}",
        c.message
    );
    let ready = cond(status_of(&d2, "orders"), READY);
    assert_eq!(ready.status, "True", "a warning, not a failure: {}", ready.message);
    let events: Vec<_> = d2.events.iter().filter(|e| e.reason == REASON_PODS_WITH_OUTDATED_SIDECAR).collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].type_, EventType::Warning);

    // Still outdated: no second Event.
    snap.policies[0].status = Some(status_of(&d2, "orders").clone());
    let d3 = compute(&snap, t(2)).unwrap();
    assert!(d3.events.iter().all(|e| e.reason != REASON_PODS_WITH_OUTDATED_SIDECAR), "{:?}", d3.events);

    // A Disabled policy is not checked.
    let mut disabled = mk_policy_spec("orders", spec(16000, true));
    disabled.spec.mode = custos_api::policy::Mode::Disabled;
    let d = compute(&snapshot(vec![disabled], snap.pods.clone(), vec![]), t(0)).unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_OUTDATED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_POLICY_DISABLED));
}

/// Two policies selecting the same pods disagree on the proxy port: the injection would refuse
/// (or skip) their new pods, so the condition says so, with its own reason and Event, and
/// does not advise a restart; once they agree, outdated sidecars are reported as before.
#[test]
fn policies_disagreeing_on_ports_are_reported_without_restart_advice() {
    let spec = |proxy_port: u16| {
        json!({
            "workload": { "selector": { "matchLabels": { "app": "orders" } }, "appPort": 8080, "proxyPort": proxy_port },
            "rules": [ { "name": "read", "action": "Allow" } ]
        })
    };
    let pod = mk_injected_pod("orders-a", spec(15080), 8080);
    // A pod without the sidecar as well: restarting it would not inject it either.
    let old = mk_uninjected_pod("orders-old", &[("app", "orders")]);
    let snap = snapshot(
        vec![mk_policy_spec("orders", spec(15080)), mk_policy_spec("orders-baseline", spec(16000))],
        vec![pod.clone(), old],
        vec![],
    );
    let d = compute(&snap, t(0)).unwrap();
    for name in ["orders", "orders-baseline"] {
        let c = cond(status_of(&d, name), SIDECAR_OUTDATED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_POLICIES_DISAGREE), "{name}");
        assert!(
            c.message
                .contains("orders-a (policies orders, orders-baseline disagree on proxyPort 15080, 16000)")
                && c.message.contains("orders-old (policies orders, orders-baseline disagree"),
            "{}",
            c.message
        );
        assert!(!c.message.contains("rollout restart"), "{}", c.message);
        let missing = cond(status_of(&d, name), SIDECAR_MISSING);
        assert_eq!(missing.status, "False", "no restart advice there either: {}", missing.message);
        assert!(
            missing.message.contains("(2 whose policies disagree: see SidecarOutdated)"),
            "{}",
            missing.message
        );
    }
    assert!(d.events.iter().any(|e| e.reason == REASON_POLICIES_DISAGREE), "{:?}", d.events);

    // A Disabled policy does not take part.
    let mut disabled = mk_policy_spec("orders-baseline", spec(16000));
    disabled.spec.mode = custos_api::policy::Mode::Disabled;
    let d =
        compute(&snapshot(vec![mk_policy_spec("orders", spec(15080)), disabled], vec![pod], vec![]), t(0))
            .unwrap();
    let c = cond(status_of(&d, "orders"), SIDECAR_OUTDATED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_SIDECARS_CURRENT), "{}", c.message);
}

/// A Service that makes a mesh forward the proxy port as opaque TCP is reported on every
/// policy of those pods (`ProxyPortNotHttp`, a warning: `Ready` stays True), with a Warning
/// Event when it appears; fixed, the condition turns False; a Disabled policy is not checked.
#[test]
fn a_service_a_mesh_reads_as_tcp_on_the_proxy_port_is_reported() {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    let orders = [("app", "orders")];
    let pods = vec![mk_pod(NS, "orders-a", &orders, "default", "10.0.0.1")];
    let service = |port_name: &str| Service {
        metadata: ObjectMeta {
            name: Some("orders".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(map(&orders)),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port: 80,
                target_port: Some(IntOrString::String("custos-proxy".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let mut snap = snapshot(vec![mk_policy("orders")], pods, vec![]);
    snap.services = Some(vec![service("tcp-orders")]);
    let istio = Options { mesh_identity: Some(MeshIdentity::Istio), ..Options::default() };
    let compute = |snap: &NamespaceSnapshot, at| compute_with(snap, at, &istio);
    // Sidecars that take no identity from a mesh: not checked.
    let c = cond(status_of(&super::compute(&snap, t(0)).unwrap(), "orders"), PROXY_PORT_NOT_HTTP).clone();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_NO_MESH_IDENTITY));
    let d = compute(&snap, t(0)).unwrap();
    let c = cond(status_of(&d, "orders"), PROXY_PORT_NOT_HTTP);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_MESH_FORWARDS_OPAQUE));
    let expected_start = "Service orders port tcp-orders targets the proxy port: its name says tcp";
    assert!(c.message.starts_with(expected_start), "{}", c.message);
    assert!(c.message.contains("x-forwarded-client-cert header through"), "{}", c.message);
    assert!(c.message.contains("any caller could name itself any workload"), "{}", c.message);
    assert!(!c.message.contains("  "), "{}", c.message);
    assert_eq!(cond(status_of(&d, "orders"), READY).status, "True", "a warning, not a failure");
    let warned: Vec<_> = d.events.iter().filter(|e| e.reason == REASON_MESH_FORWARDS_OPAQUE).collect();
    assert_eq!(warned.len(), 1, "{:?}", d.events);
    assert_eq!(warned[0].type_, EventType::Warning);

    // Still True, even with another finding: no second Event. Renamed to http-*: False.
    snap.policies[0].status = Some(status_of(&d, "orders").clone());
    snap.services.as_mut().unwrap().push(Service {
        metadata: ObjectMeta { name: Some("orders-2".into()), ..service("x").metadata },
        ..service("tls-orders")
    });
    let d2 = compute(&snap, t(1)).unwrap();
    assert!(d2.events.iter().all(|e| e.reason != REASON_MESH_FORWARDS_OPAQUE), "{:?}", d2.events);
    snap.services = Some(vec![service("http-orders")]);
    let d3 = compute(&snap, t(2)).unwrap();
    let c = cond(status_of(&d3, "orders"), PROXY_PORT_NOT_HTTP);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_PROXY_PORT_HTTP));
    assert_eq!(
        c.message,
        "no Service port or opaque-ports annotation the operator reads makes istio forward proxy port 15080 as \
         opaque bytes"
    );
    // Services that could not be listed: not checked.
    snap.services = None;
    let c = cond(status_of(&compute(&snap, t(3)).unwrap(), "orders"), PROXY_PORT_NOT_HTTP).clone();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_SERVICES_UNLISTED));

    let mut disabled = mk_policy("orders");
    disabled.spec.mode = custos_api::policy::Mode::Disabled;
    snap.policies = vec![disabled];
    snap.services = Some(vec![service("tcp-orders")]);
    let c = cond(status_of(&compute(&snap, t(4)).unwrap(), "orders"), PROXY_PORT_NOT_HTTP).clone();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_POLICY_DISABLED));
}

/// An Audit-mode policy on pods an enforcing policy also selects is never the deciding one
/// there (enforced verdicts outrank dry runs): `AuditShadowed` says so, with a Warning Event
/// once; a policy of another mode has no such condition.
#[test]
fn an_audit_policy_on_pods_an_enforcing_policy_selects_is_reported_shadowed() {
    let audit = |name: &str, app: &str| {
        mk_policy_spec(
            name,
            json!({
                "workload": { "selector": { "matchLabels": { "app": app } }, "appPort": 8080 },
                "mode": "Audit",
                "rules": [ { "name": "stricter", "action": "Allow", "from": { "workloads": [ { "serviceAccount": "portal" } ] } } ]
            }),
        )
    };
    let policies =
        vec![mk_policy("orders"), audit("orders-trial", "orders"), audit("portal-trial", "portal")];
    let d = compute(&snapshot(policies.clone(), pods_fixture(), vec![]), t(0)).unwrap();

    let c = cond(status_of(&d, "orders-trial"), AUDIT_SHADOWED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_ENFORCED_POLICIES_SELECT_PODS));
    assert!(
        c.message
            .starts_with("2 of 2 selected running pods are also selected by the enforcing policy orders:"),
        "{}",
        c.message
    );
    let c = cond(status_of(&d, "portal-trial"), AUDIT_SHADOWED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_NO_ENFORCED_POLICY));
    assert!(status_of(&d, "orders").conditions.iter().all(|c| c.type_ != AUDIT_SHADOWED));
    // Not a readiness matter.
    assert_eq!(cond(status_of(&d, "orders-trial"), READY).status, "True");
    let warned: Vec<_> = d
        .events
        .iter()
        .filter(|e| e.reason == REASON_ENFORCED_POLICIES_SELECT_PODS)
        .map(|e| (e.policy.as_str(), e.type_))
        .collect();
    assert_eq!(warned, [("orders-trial", EventType::Warning)]);

    // Resync: no Event again; with one more pod, the count moves and still no Event.
    let policies = with_statuses(policies, &d);
    let again = compute(&snapshot(policies.clone(), pods_fixture(), vec![]), t(30)).unwrap();
    assert!(
        again.events.iter().all(|e| e.reason != REASON_ENFORCED_POLICIES_SELECT_PODS),
        "{:#?}",
        again.events
    );
    let mut pods = pods_fixture();
    pods.push(mk_pod(NS, "orders-3", &[("app", "orders")], "orders", "10.0.0.3"));
    let grown = compute(&snapshot(policies, pods, vec![]), t(60)).unwrap();
    assert!(cond(status_of(&grown, "orders-trial"), AUDIT_SHADOWED).message.starts_with("3 of 3 "));
    assert!(grown.events.iter().all(|e| e.reason != REASON_ENFORCED_POLICIES_SELECT_PODS));

    // The enforcing policy switched to Audit for the trial: nothing shadows the copy any more.
    let mut trial = mk_policy("orders");
    trial.spec.mode = custos_api::policy::Mode::Audit;
    let d = compute(&snapshot(vec![trial, audit("orders-trial", "orders")], pods_fixture(), vec![]), t(0))
        .unwrap();
    assert_eq!(cond(status_of(&d, "orders-trial"), AUDIT_SHADOWED).status, "False");
}
