//! The namespace reconcile against an in-memory Kubernetes API (kube-fake-client, which has
//! no watches: the tests call `reconcile_namespace` where the controller would).
//!
//! Covered: a new policy gets its ConfigMap, NetworkPolicy, finalizer, status and Event; a
//! spec change gives a new config hash; two policies share one config owned by both; an
//! invalid policy is reported with its field path while the other stays; deletion, through
//! the API and through the finalizer, recompiles the namespace and lets the policy go; pods
//! coming and going change the identity table and hash; a foreign NetworkPolicy opening the
//! app port raises SidecarBypass and a Warning; a refused NetworkPolicy turns its condition
//! False; a reconcile with nothing changed writes no status and records no Event; the
//! operator's metrics sources open the sidecars' admin port in the applied NetworkPolicies; a
//! Service declaring the proxy port TCP to a mesh raises ProxyPortNotHttp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use custos_api::{DataAccessPolicy, DataAccessPolicyStatus};
use custos_operator::context::{Context, Settings};
use custos_operator::controller::reconcile_namespace;
use custos_operator::{Error, OperatorMetrics};
use custos_operator_core::desired::conditions::*;
use custos_operator_core::desired::{CONFIG_HASH_ANNOTATION, Options};
use custos_operator_core::names::FINALIZER;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use kube_fake_client::{PatchType, interceptor};
use serde_json::json;

fn condition<'a>(status: &'a DataAccessPolicyStatus, type_: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} in {status:#?}"))
}

fn status(policy: &DataAccessPolicy) -> &DataAccessPolicyStatus {
    policy.status.as_ref().expect("a status")
}

fn shop_pods() -> Vec<Pod> {
    vec![
        mk_pod(NS, "orders-1", &[("app", "orders")], "orders", "10.0.0.1"),
        mk_pod(NS, "orders-2", &[("app", "orders")], "orders", "10.0.0.2"),
        mk_pod(NS, "portal-1", &[("app", "portal")], "portal", "10.0.1.1"),
    ]
}

/// The fake API holding the `orders` policy and the shop's pods, and a context over it.
async fn orders_api() -> (kube::Client, Context) {
    let client = fake_api(
        Objects { policies: vec![mk_policy(NS, "orders")], pods: shop_pods(), ..Objects::default() },
        None,
    )
    .await;
    let ctx = context(&client);
    (client, ctx)
}

#[tokio::test]
async fn a_new_policy_gets_its_config_network_policy_finalizer_status_and_event() {
    let (client, ctx) = orders_api().await;
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(outcome.policies, 1);
    assert_eq!(outcome.finalizers_added, 1);
    assert_eq!(outcome.network_policies_applied, 1);
    assert_eq!(outcome.statuses_written, 1);
    assert_eq!(outcome.events_recorded, 1);

    let cm = config_map(&client, NS).await.unwrap();
    let config = sidecar_config(&client, NS).await;
    assert_eq!(outcome.config_hash.as_ref(), Some(&config.hash));
    assert_eq!(cm.annotations().get(CONFIG_HASH_ANNOTATION), Some(&config.hash));
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    // The identity table: the portal pod, named by the rule source.
    let ips: Vec<_> = config.workloads.iter().map(|w| (w.ip.as_str(), w.service_account.as_str())).collect();
    assert_eq!(ips, [("10.0.1.1", "portal")]);

    let stored = policy(&client, NS, "orders").await;
    assert!(stored.finalizers().iter().any(|f| f == FINALIZER), "{:?}", stored.finalizers());
    let owner = &cm.owner_references()[0];
    assert_eq!(owner.api_version, DataAccessPolicy::api_version(&()));
    assert_eq!(owner.kind, DataAccessPolicy::kind(&()));
    assert_eq!((owner.name.as_str(), Some(&owner.uid)), ("orders", stored.metadata.uid.as_ref()));
    assert_eq!(owner.controller, Some(false));

    assert_eq!(network_policy_names(&client, NS).await, ["custos-orders"]);
    let np = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), NS)
        .get("custos-orders")
        .await
        .unwrap();
    let np_owner = &np.owner_references()[0];
    assert_eq!((np_owner.uid.as_str(), np_owner.controller), (owner.uid.as_str(), Some(true)));

    let s = status(&stored);
    assert_eq!(s.observed_generation, stored.metadata.generation);
    assert_eq!(s.config_hash.as_ref(), Some(&config.hash));
    assert_eq!(s.selected_pods, Some(2));
    assert_eq!(s.rule_count, Some(1));
    for type_ in [READY, COMPILED, NETWORK_POLICY_APPLIED] {
        assert_eq!(condition(s, type_).status, "True", "{type_}: {s:#?}");
    }
    assert_eq!(condition(s, SIDECAR_BYPASS).status, "False");
    assert_eq!(condition(s, SIDECAR_MISSING).status, "False");

    let compiled = events_with(&client, NS, "orders", REASON_COMPILED).await;
    assert_eq!(compiled.len(), 1);
    let e = &compiled[0];
    assert_eq!(e.type_.as_deref(), Some("Normal"));
    assert_eq!(e.regarding.as_ref().and_then(|r| r.uid.as_ref()), stored.metadata.uid.as_ref());
    assert_eq!(e.reporting_controller.as_deref(), Some("custos-operator"));
    assert_eq!(e.reporting_instance.as_deref(), Some("custos-operator-0"));
}

#[tokio::test]
async fn a_second_reconcile_with_nothing_changed_writes_no_status_and_records_no_event() {
    let status_writes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&status_writes);
    let funcs = interceptor::Funcs::new().patch_status(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(None)
    });
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), mk_invalid_policy(NS, "broken")],
        pods: shop_pods(),
        network_policies: vec![mk_netpol(NS, "allow-all", &[], None)],
        ..Objects::default()
    };
    let client = fake_api(objects, Some(funcs)).await;
    let ctx = context(&client);
    reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(status_writes.load(Ordering::SeqCst), 2);
    let events_before = events(&client, NS).await.len();
    // orders: Compiled, SidecarBypass; broken: CompileError, SidecarBypass.
    assert_eq!(events_before, 4);
    let versions = [policy(&client, NS, "orders").await, policy(&client, NS, "broken").await]
        .map(|p| p.resource_version());

    let config_version = config_map(&client, NS).await.unwrap().resource_version();
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!((outcome.statuses_written, outcome.events_recorded, outcome.finalizers_added), (0, 0, 0));
    // The ConfigMap and the one NetworkPolicy (of `orders`) are already as desired: not written.
    assert_eq!((outcome.network_policies_applied, outcome.applies_skipped), (0, 2));
    assert_eq!(config_map(&client, NS).await.unwrap().resource_version(), config_version);
    assert_eq!(status_writes.load(Ordering::SeqCst), 2, "no status written");
    assert_eq!(events(&client, NS).await.len(), events_before, "no Event recorded");
    let after = [policy(&client, NS, "orders").await, policy(&client, NS, "broken").await]
        .map(|p| p.resource_version());
    assert_eq!(after, versions, "the policies were not written at all");

    // Someone edits the NetworkPolicy: the next reconcile applies it again.
    let nps = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), NS);
    let edit = json!({"spec": {"ingress": []}});
    nps.patch("custos-orders", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!((outcome.network_policies_applied, outcome.applies_skipped), (1, 1));
    let restored = nps.get("custos-orders").await.unwrap();
    assert!(!restored.spec.unwrap().ingress.unwrap_or_default().is_empty(), "the ingress rules are back");
}

#[tokio::test]
async fn a_spec_change_gives_a_new_config_hash_and_observed_generation() {
    let (client, ctx) = orders_api().await;
    let first = reconcile_namespace(&ctx, NS).await.unwrap().config_hash.unwrap();

    let api = Api::<DataAccessPolicy>::namespaced(client.clone(), NS);
    let patch = json!({ "spec": { "workload": { "appPort": 9090 } } });
    let changed = api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let second = reconcile_namespace(&ctx, NS).await.unwrap().config_hash.unwrap();
    assert_ne!(first, second);

    let stored = policy(&client, NS, "orders").await;
    let s = status(&stored);
    assert_eq!(s.config_hash.as_ref(), Some(&second));
    assert_eq!(s.observed_generation, changed.metadata.generation);
    assert!(s.conditions.iter().all(|c| c.observed_generation == changed.metadata.generation), "{s:#?}");
    assert_eq!(sidecar_config(&client, NS).await.policies[0].spec.workload.app_port, 9090);
    assert_eq!(
        events_with(&client, NS, "orders", REASON_COMPILED).await.len(),
        1,
        "the repeat folds into a series"
    );
}

#[tokio::test]
async fn two_policies_share_one_config_owned_by_both() {
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), mk_policy(NS, "billing")],
        pods: shop_pods(),
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    reconcile_namespace(&context(&client), NS).await.unwrap();

    let config = sidecar_config(&client, NS).await;
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["billing", "orders"]);
    assert_eq!(network_policy_names(&client, NS).await, ["custos-billing", "custos-orders"]);
    let cm = config_map(&client, NS).await.unwrap();
    let owners: BTreeSet<_> = cm.owner_references().iter().map(|o| o.uid.clone()).collect();
    let uids: BTreeSet<_> = [policy(&client, NS, "orders").await, policy(&client, NS, "billing").await]
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    assert_eq!(owners, uids);
    for name in ["orders", "billing"] {
        assert_eq!(status(&policy(&client, NS, name).await).config_hash.as_ref(), Some(&config.hash));
    }
}

#[tokio::test]
async fn an_invalid_policy_is_reported_with_its_field_path_and_the_other_stays() {
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), mk_invalid_policy(NS, "broken")],
        pods: shop_pods(),
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    reconcile_namespace(&context(&client), NS).await.unwrap();

    let config = sidecar_config(&client, NS).await;
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    assert_eq!(network_policy_names(&client, NS).await, ["custos-orders"]);

    let broken = policy(&client, NS, "broken").await;
    let s = status(&broken);
    let compiled = condition(s, COMPILED);
    assert_eq!((compiled.status.as_str(), compiled.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    assert!(compiled.message.contains("spec.rules[0].mask.phone"), "{}", compiled.message);
    assert_eq!(condition(s, READY).status, "False");
    assert_eq!(condition(s, NETWORK_POLICY_APPLIED).status, "False");
    assert_eq!(s.config_hash, None);
    assert_eq!(status(&policy(&client, NS, "orders").await).config_hash.as_ref(), Some(&config.hash));

    let warnings = events_with(&client, NS, "broken", REASON_COMPILE_ERROR).await;
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    assert!(warnings[0].note.as_deref().unwrap_or_default().contains("spec.rules[0].mask.phone"));
}

/// A policy edited past the validating webhook into a spec that does not compile stays in
/// the ConfigMap as it last compiled: its sidecars go on enforcing it.
#[tokio::test]
async fn a_policy_that_stops_compiling_stays_in_the_config_as_it_last_compiled() {
    let (client, ctx) = orders_api().await;
    reconcile_namespace(&ctx, NS).await.unwrap();
    let before = sidecar_config(&client, NS).await;

    let api = Api::<DataAccessPolicy>::namespaced(client.clone(), NS);
    let broken = mk_invalid_policy(NS, "orders");
    let patch = json!({ "spec": { "rules": broken.spec.rules } });
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();

    let after = sidecar_config(&client, NS).await;
    assert_eq!(after.policies, before.policies, "the last good form is kept");
    let stored = policy(&client, NS, "orders").await;
    let s = status(&stored);
    let compiled = condition(s, COMPILED);
    assert_eq!((compiled.status.as_str(), compiled.reason.as_str()), ("False", REASON_COMPILE_ERROR));
    assert!(compiled.message.contains("the last that compiled, is still enforced"), "{}", compiled.message);
}

#[tokio::test]
async fn a_policy_deleted_through_the_api_leaves_the_config_and_its_network_policy_goes() {
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), mk_policy(NS, "billing")],
        pods: shop_pods(),
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    let ctx = context(&client);
    reconcile_namespace(&ctx, NS).await.unwrap();
    let api = Api::<DataAccessPolicy>::namespaced(client.clone(), NS);
    // Gone at once (the in-memory API ignores finalizers), and its dependents orphaned: the
    // reconcile must do the clean-up itself.
    api.delete("billing", &DeleteParams::orphan()).await.unwrap();
    assert_eq!(network_policy_names(&client, NS).await, ["custos-billing", "custos-orders"]);

    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(outcome.network_policies_deleted, 1);
    assert_eq!(network_policy_names(&client, NS).await, ["custos-orders"]);
    let config = sidecar_config(&client, NS).await;
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    let owners: Vec<_> =
        config_map(&client, NS).await.unwrap().owner_references().iter().map(|o| o.name.clone()).collect();
    assert_eq!(owners, ["orders"]);

    // The last one: the ConfigMap goes too.
    api.delete("orders", &DeleteParams::orphan()).await.unwrap();
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert!(outcome.config_map_deleted);
    assert!(config_map(&client, NS).await.is_none());
    assert!(network_policy_names(&client, NS).await.is_empty());
}

/// A policy being deleted: `deletionTimestamp` set, held by the finalizer.
fn deleting(mut policy: DataAccessPolicy) -> DataAccessPolicy {
    policy.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    policy.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_800_000_000).unwrap()));
    policy
}

#[tokio::test]
async fn the_finalizer_holds_a_deleted_policy_until_the_namespace_is_recompiled() {
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), deleting(mk_policy(NS, "billing"))],
        pods: shop_pods(),
        network_policies: vec![mk_our_netpol(NS, "billing"), mk_our_netpol(NS, "orders")],
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    let outcome = reconcile_namespace(&context(&client), NS).await.unwrap();
    assert_eq!(outcome.finalizers_removed, 1);
    assert_eq!(outcome.policies, 1);
    assert_eq!(network_policy_names(&client, NS).await, ["custos-orders"]);
    let config = sidecar_config(&client, NS).await;
    assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["orders"]);
    // Without its last finalizer, the policy is gone.
    let gone = Api::<DataAccessPolicy>::namespaced(client.clone(), NS).get_opt("billing").await.unwrap();
    assert!(gone.is_none(), "{gone:#?}");
}

#[tokio::test]
async fn the_last_policy_deleted_through_the_finalizer_takes_the_config_map() {
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders")],
        pods: shop_pods(),
        network_policies: vec![mk_netpol(NS, "foreign", &[("app", "x")], None)],
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    let ctx = context(&client);
    reconcile_namespace(&ctx, NS).await.unwrap();
    assert!(config_map(&client, NS).await.is_some());

    // Same namespace, now with the policy being deleted (the in-memory API cannot set a
    // deletionTimestamp on a stored object, so it starts that way).
    let cm = config_map(&client, NS).await.unwrap();
    let stored = policy(&client, NS, "orders").await;
    let mut deleted = deleting(stored);
    deleted.metadata.resource_version = None;
    let mut leftover = cm;
    leftover.metadata.resource_version = None;
    let objects = Objects {
        policies: vec![deleted],
        pods: shop_pods(),
        network_policies: vec![mk_our_netpol(NS, "orders"), mk_netpol(NS, "foreign", &[("app", "x")], None)],
        config_maps: vec![leftover],
    };
    let client = fake_api(objects, None).await;
    let outcome = reconcile_namespace(&context(&client), NS).await.unwrap();
    assert!(outcome.config_map_deleted);
    assert_eq!(outcome.finalizers_removed, 1);
    assert!(config_map(&client, NS).await.is_none());
    assert_eq!(network_policy_names(&client, NS).await, ["foreign"], "only Custos's own are deleted");
    assert!(
        Api::<DataAccessPolicy>::namespaced(client.clone(), NS).get_opt("orders").await.unwrap().is_none()
    );
}

#[tokio::test]
async fn pods_coming_and_going_change_the_identity_table_and_hash() {
    let (client, ctx) = orders_api().await;
    let before = reconcile_namespace(&ctx, NS).await.unwrap().config_hash.unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    pods.create(&PostParams::default(), &mk_pod(NS, "portal-2", &[("app", "portal")], "portal", "10.0.1.2"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &mk_pod(NS, "orders-3", &[("app", "orders")], "orders", "10.0.0.3"))
        .await
        .unwrap();
    let grown = reconcile_namespace(&ctx, NS).await.unwrap().config_hash.unwrap();
    assert_ne!(before, grown);
    let ips: Vec<_> = sidecar_config(&client, NS).await.workloads.into_iter().map(|w| w.ip).collect();
    assert_eq!(ips, ["10.0.1.1", "10.0.1.2"]);
    let s = status(&policy(&client, NS, "orders").await).clone();
    assert_eq!((s.selected_pods, s.config_hash.as_ref()), (Some(3), Some(&grown)));

    pods.delete("portal-2", &DeleteParams::default()).await.unwrap();
    pods.delete("orders-3", &DeleteParams::default()).await.unwrap();
    let after = reconcile_namespace(&ctx, NS).await.unwrap().config_hash.unwrap();
    assert_eq!(after, before, "the same pods give the same hash");
    assert_eq!(status(&policy(&client, NS, "orders").await).selected_pods, Some(2));
}

#[tokio::test]
async fn pods_of_namespaces_the_operator_does_not_watch_are_not_read() {
    let spec = json!({
        "workload": { "selector": { "matchLabels": { "app": "orders" } }, "appPort": 8080 },
        "rules": [
            { "name": "partner", "action": "Allow", "from": { "workloads": [ { "namespace": "partner" } ] } }
        ]
    });
    let objects = Objects {
        policies: vec![mk_policy_spec(NS, "orders", spec)],
        pods: vec![mk_pod("partner", "client-1", &[("app", "client")], "client", "10.5.0.1")],
        ..Objects::default()
    };
    let client = fake_api(objects, None).await;
    reconcile_namespace(&context(&client), NS).await.unwrap();
    let ips: Vec<_> = sidecar_config(&client, NS).await.workloads.into_iter().map(|w| w.ip).collect();
    assert_eq!(ips, ["10.5.0.1"], "all namespaces watched: the partner pod is in the table");

    let only_shop = Settings {
        instance: "op-0".into(),
        namespaces: Some(BTreeSet::from([NS.to_string()])),
        ..Settings::default()
    };
    let ctx = Context::new(client.clone(), OperatorMetrics::new(), only_shop);
    reconcile_namespace(&ctx, NS).await.unwrap();
    assert!(sidecar_config(&client, NS).await.workloads.is_empty());
}

/// The ports of the ingress rules of NetworkPolicy `name` as stored.
async fn ingress_ports(client: &kube::Client, name: &str) -> Vec<Vec<String>> {
    let rules = network_policy(client, NS, name).await.spec.unwrap().ingress.unwrap_or_default();
    let port = |p: &NetworkPolicyPort| match &p.port {
        Some(IntOrString::Int(n)) => Some(n.to_string()),
        Some(IntOrString::String(name)) => Some(name.clone()),
        None => None,
    };
    rules.iter().map(|r| r.ports.iter().flatten().filter_map(port).collect()).collect()
}

#[tokio::test]
async fn metrics_sources_open_the_sidecars_admin_port_on_the_next_reconcile() {
    let client = fake_api(
        Objects { policies: vec![mk_policy(NS, "orders")], pods: shop_pods(), ..Objects::default() },
        None,
    )
    .await;
    reconcile_namespace(&context(&client), NS).await.unwrap();
    assert_eq!(ingress_ports(&client, "custos-orders").await, [vec!["15080"]]);

    // The operator restarted with --sidecar-metrics-from: the stored NetworkPolicy is updated.
    let monitoring: NetworkPolicyPeer = serde_json::from_value(
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}),
    )
    .unwrap();
    let settings = Settings {
        instance: "op-0".into(),
        options: Options { sidecar_metrics_from: vec![monitoring.clone()], ..Options::default() },
        ..Settings::default()
    };
    let ctx = Context::new(client.clone(), OperatorMetrics::new(), settings);
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(outcome.network_policies_applied, 1);
    assert_eq!(ingress_ports(&client, "custos-orders").await, [vec!["15080"], vec!["custos-admin"]]);
    let np = network_policy(&client, NS, "custos-orders").await;
    assert_eq!(np.spec.unwrap().ingress.unwrap()[1].from, Some(vec![monitoring]));

    // And closed again without it.
    reconcile_namespace(&context(&client), NS).await.unwrap();
    assert_eq!(ingress_ports(&client, "custos-orders").await, [vec!["15080"]]);
}

#[tokio::test]
async fn a_network_policy_opening_the_app_port_raises_sidecar_bypass_once() {
    let (client, ctx) = orders_api().await;
    reconcile_namespace(&ctx, NS).await.unwrap();
    assert!(events_with(&client, NS, "orders", REASON_SIDECAR_BYPASS_EVENT).await.is_empty());

    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &mk_netpol(NS, "allow-all", &[], None))
        .await
        .unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();
    let s = status(&policy(&client, NS, "orders").await).clone();
    let bypass = condition(&s, SIDECAR_BYPASS);
    assert_eq!((bypass.status.as_str(), bypass.reason.as_str()), ("True", REASON_BYPASS));
    assert!(bypass.message.contains("allow-all"), "{}", bypass.message);
    assert_eq!(condition(&s, READY).status, "True", "a warning, not a failure");
    let warnings = events_with(&client, NS, "orders", REASON_SIDECAR_BYPASS_EVENT).await;
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    assert!(warnings[0].note.as_deref().unwrap_or_default().contains("allow-all"));

    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(outcome.events_recorded, 0);
    assert!(network_policy_names(&client, NS).await.contains(&"allow-all".to_string()), "not ours to delete");
}

/// A Service that declares the proxy port TCP to a mesh raises `ProxyPortNotHttp` and a
/// Warning once; renamed to `http-*`, the condition turns False.
#[tokio::test]
async fn a_service_declaring_the_proxy_port_tcp_raises_proxy_port_not_http() {
    let (client, mut ctx) = orders_api().await;
    // Sidecars injected with --caller-identity=istio.
    ctx.settings.options.mesh_identity = Some(custos_operator_core::desired::MeshIdentity::Istio);
    reconcile_namespace(&ctx, NS).await.unwrap();
    let s = status(&policy(&client, NS, "orders").await).clone();
    assert_eq!(condition(&s, PROXY_PORT_NOT_HTTP).reason, REASON_PROXY_PORT_HTTP);

    let services = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), NS);
    let service = |port_name: &str| -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(json!({
            "metadata": {"name": "orders", "namespace": NS},
            "spec": {"selector": {"app": "orders"},
                     "ports": [{"name": port_name, "port": 80, "targetPort": "custos-proxy"}]},
        }))
        .unwrap()
    };
    services.create(&PostParams::default(), &service("tcp-orders")).await.unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();
    let s = status(&policy(&client, NS, "orders").await).clone();
    let c = condition(&s, PROXY_PORT_NOT_HTTP);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_MESH_FORWARDS_OPAQUE));
    assert!(c.message.contains("Service orders port tcp-orders"), "{}", c.message);
    assert_eq!(condition(&s, READY).status, "True", "a warning, not a failure");
    assert_eq!(events_with(&client, NS, "orders", REASON_MESH_FORWARDS_OPAQUE).await.len(), 1);
    assert_eq!(reconcile_namespace(&ctx, NS).await.unwrap().events_recorded, 0);

    services.replace("orders", &PostParams::default(), &service("http-orders")).await.unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();
    let s = status(&policy(&client, NS, "orders").await).clone();
    assert_eq!(condition(&s, PROXY_PORT_NOT_HTTP).status, "False");
}

#[tokio::test]
async fn a_refused_network_policy_turns_its_condition_false_and_fails_the_reconcile() {
    let funcs = interceptor::Funcs::new().patch(|ctx| {
        if ctx.name == "custos-orders" && ctx.patch_type == PatchType::ApplyPatch {
            return Err(kube_fake_client::Error::InvalidRequest("spec.podSelector: denied by policy".into()));
        }
        Ok(None)
    });
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), mk_policy(NS, "billing")],
        pods: shop_pods(),
        ..Objects::default()
    };
    let client = fake_api(objects, Some(funcs)).await;
    let error = reconcile_namespace(&context(&client), NS).await.unwrap_err();
    assert!(
        matches!(&error, Error::Apply { kind: "NetworkPolicy", name, .. } if name == "custos-orders"),
        "{error}"
    );
    assert_eq!(error.metric_label(), "apply");

    assert_eq!(network_policy_names(&client, NS).await, ["custos-billing"]);
    let s = status(&policy(&client, NS, "orders").await).clone();
    let np = condition(&s, NETWORK_POLICY_APPLIED);
    assert_eq!((np.status.as_str(), np.reason.as_str()), ("False", REASON_APPLY_FAILED));
    assert!(np.message.contains("denied by policy"), "{}", np.message);
    assert_eq!(
        (condition(&s, READY).status.as_str(), condition(&s, READY).reason.as_str()),
        ("False", REASON_APPLY_FAILED)
    );
    assert_eq!(condition(&status(&policy(&client, NS, "billing").await).clone(), READY).status, "True");
    assert_eq!(events_with(&client, NS, "orders", REASON_NETWORK_POLICY_FAILED).await.len(), 1);
    // The config still went out.
    assert_eq!(sidecar_config(&client, NS).await.policies.len(), 2);
}

/// Another policy's refused NetworkPolicy does not hold a deleted policy: its clean-up (the
/// ConfigMap without it, its NetworkPolicy deleted) is done, so its finalizer goes.
#[tokio::test]
async fn a_refused_network_policy_does_not_hold_another_policys_deletion() {
    let funcs = interceptor::Funcs::new().patch(|ctx| {
        if ctx.name == "custos-orders" && ctx.patch_type == PatchType::ApplyPatch {
            return Err(kube_fake_client::Error::InvalidRequest("metadata.labels: invalid value".into()));
        }
        Ok(None)
    });
    let objects = Objects {
        policies: vec![mk_policy(NS, "orders"), deleting(mk_policy(NS, "billing"))],
        pods: shop_pods(),
        network_policies: vec![mk_our_netpol(NS, "billing")],
        ..Objects::default()
    };
    let client = fake_api(objects, Some(funcs)).await;
    let error = reconcile_namespace(&context(&client), NS).await.unwrap_err();
    assert!(matches!(&error, Error::Apply { kind: "NetworkPolicy", .. }), "{error}");
    assert!(network_policy_names(&client, NS).await.is_empty(), "billing's NetworkPolicy deleted");
    let gone = Api::<DataAccessPolicy>::namespaced(client.clone(), NS).get_opt("billing").await.unwrap();
    assert!(gone.is_none(), "the deleted policy's finalizer was released: {gone:#?}");
    assert_eq!(sidecar_config(&client, NS).await.policies.len(), 1);
}

/// A pod created before its policy has no sidecar: the policy's status says so, with a Warning
/// Event, until the pod is replaced.
#[tokio::test]
async fn selected_pods_without_the_sidecar_are_reported_until_replaced() {
    let mut pods = shop_pods();
    let mut old = mk_pod(NS, "orders-0", &[("app", "orders")], "orders", "10.0.0.9");
    old.spec.as_mut().unwrap().containers.retain(|c| c.name != "custos-sidecar");
    pods.push(old);
    let client =
        fake_api(Objects { policies: vec![mk_policy(NS, "orders")], pods, ..Objects::default() }, None).await;
    let ctx = context(&client);
    reconcile_namespace(&ctx, NS).await.unwrap();
    let stored = policy(&client, NS, "orders").await;
    let missing = condition(status(&stored), SIDECAR_MISSING);
    assert_eq!((missing.status.as_str(), missing.reason.as_str()), ("True", REASON_PODS_WITHOUT_SIDECAR));
    assert!(
        missing.message.starts_with("1 of 3 selected running pods have no sidecar (orders-0)"),
        "{}",
        missing.message
    );
    assert_eq!(condition(status(&stored), READY).status, "True");
    assert_eq!(events_with(&client, NS, "orders", REASON_SIDECAR_MISSING_EVENT).await.len(), 1);

    // Replaced (the old pod gone): False again, no further Event.
    Api::<Pod>::namespaced(client.clone(), NS).delete("orders-0", &Default::default()).await.unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();
    let stored = policy(&client, NS, "orders").await;
    let missing = condition(status(&stored), SIDECAR_MISSING);
    assert_eq!((missing.status.as_str(), missing.reason.as_str()), ("False", REASON_ALL_PODS_INJECTED));
    assert_eq!(events_with(&client, NS, "orders", REASON_SIDECAR_MISSING_EVENT).await.len(), 1);
}
