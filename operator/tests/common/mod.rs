//! Builders shared by the controller's integration tests and benchmark: `mk_*` objects as a
//! cluster would store them, and an in-memory API (kube-fake-client) holding them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use custos_api::{DataAccessPolicy, DataAccessPolicyStatus, SidecarConfig};
use custos_operator::OperatorMetrics;
use custos_operator::context::{Context, Settings};
use custos_operator_core::names::{
    CONFIG_KEY, CONFIG_MAP_NAME, MANAGED_BY, MANAGED_BY_LABEL, POLICY_LABEL, SIDECAR_CONTAINER,
};
use k8s_openapi::api::core::v1::{ConfigMap, Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, ListParams};
use kube_fake_client::{ClientBuilder, interceptor};
use serde_json::json;

/// The namespace most tests use.
pub const NS: &str = "shop";

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
}

/// A policy of `ns` protecting `app=<name>` on port 8080, with one Allow rule for the `portal`
/// service account of the namespace, and (by default) a NetworkPolicy. As submitted: no uid,
/// no finalizer, no status.
pub fn mk_policy(ns: &str, name: &str) -> DataAccessPolicy {
    mk_policy_spec(
        ns,
        name,
        json!({
            "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 },
            "rules": [
                { "name": "portal-read", "action": "Allow", "from": { "workloads": [ { "serviceAccount": "portal" } ] } }
            ]
        }),
    )
}

/// A policy of `ns` with the given spec.
pub fn mk_policy_spec(ns: &str, name: &str, spec: serde_json::Value) -> DataAccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "custos.dev/v1alpha1",
        "kind": "DataAccessPolicy",
        "metadata": { "name": name, "namespace": ns },
        "spec": spec,
    }))
    .expect("a valid DataAccessPolicy")
}

/// A policy whose rule masks a data class it never declares (a compile error at
/// `spec.rules[0].mask.phone`).
pub fn mk_invalid_policy(ns: &str, name: &str) -> DataAccessPolicy {
    mk_policy_spec(
        ns,
        name,
        json!({
            "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 },
            "rules": [ { "name": "masked", "action": "Allow", "mask": { "phone": "ShowLast4" } } ]
        }),
    )
}

/// A Running, injected pod with one IP: an app container declaring port 8080 as `http`, and the
/// `custos-sidecar` container.
pub fn mk_pod(ns: &str, name: &str, labels: &[(&str, &str)], service_account: &str, ip: &str) -> Pod {
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
                    image: Some("registry.example/app:1".into()),
                    ports: Some(vec![ContainerPort {
                        container_port: 8080,
                        name: Some("http".into()),
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                },
                Container { name: SIDECAR_CONTAINER.into(), ..Container::default() },
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

/// A NetworkPolicy of `ns` selecting `selector` (empty: every pod) with one ingress rule
/// from anywhere on `ports` (`None`: every port).
pub fn mk_netpol(
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

/// One of Custos's own NetworkPolicies for `policy`, as the operator writes it.
pub fn mk_our_netpol(ns: &str, policy: &str) -> NetworkPolicy {
    let mut np = mk_netpol(ns, &format!("custos-{policy}"), &[("app", policy)], None);
    np.metadata.labels = Some(map(&[(MANAGED_BY_LABEL, MANAGED_BY), (POLICY_LABEL, policy)]));
    // What makes it Custos's own: the policy as its controlling owner.
    np.metadata.owner_references = Some(vec![custos_operator_core::desired::policy_owner_reference(
        policy,
        &format!("uid-{policy}"),
        true,
    )]);
    np
}

/// What the in-memory API starts with.
#[derive(Default)]
pub struct Objects {
    pub policies: Vec<DataAccessPolicy>,
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
    pub config_maps: Vec<ConfigMap>,
}

/// An in-memory API holding `objects`, with the DataAccessPolicy CRD and its status
/// subresource registered, and `interceptors` in front.
pub async fn fake_api(objects: Objects, interceptors: Option<interceptor::Funcs>) -> kube::Client {
    // `with_status_subresource::<DataAccessPolicy>()` needs `DataAccessPolicy: Default`, which
    // a CustomResource is not; the in-memory API also registers the status subresource of a
    // kind when an object of it is seeded with a `status`, so the seeded policies carry an
    // empty one (`status: {}`, which the reconcile treats like no status).
    let mut policies = objects.policies;
    for p in &mut policies {
        p.status.get_or_insert_with(DataAccessPolicyStatus::default);
    }
    let mut builder = ClientBuilder::new()
        .with_resource::<DataAccessPolicy>()
        .with_objects(policies)
        .with_objects(objects.pods)
        .with_objects(objects.network_policies)
        .with_objects(objects.config_maps);
    if let Some(funcs) = interceptors {
        builder = builder.with_interceptor_funcs(funcs);
    }
    builder.build().await.expect("fake Kubernetes API")
}

/// A controller context over `client`, watching every namespace.
pub fn context(client: &kube::Client) -> Context {
    Context::new(
        client.clone(),
        OperatorMetrics::new(),
        Settings { instance: "custos-operator-0".into(), ..Settings::default() },
    )
}

pub async fn policy(client: &kube::Client, ns: &str, name: &str) -> DataAccessPolicy {
    Api::<DataAccessPolicy>::namespaced(client.clone(), ns).get(name).await.expect("the policy")
}

pub async fn config_map(client: &kube::Client, ns: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(CONFIG_MAP_NAME).await.expect("get ConfigMap")
}

/// The config in `ns`'s ConfigMap, loaded as the sidecar loads it (hash verified).
pub async fn sidecar_config(client: &kube::Client, ns: &str) -> SidecarConfig {
    let cm = config_map(client, ns).await.expect("a custos-config ConfigMap");
    let json = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY)).expect("config.json");
    custos_policy::load_config(json.as_bytes()).expect("the sidecar loads the config").0
}

/// Names of the NetworkPolicies of `ns`, sorted.
/// NetworkPolicy `name` of `ns`, as stored.
pub async fn network_policy(client: &kube::Client, ns: &str, name: &str) -> NetworkPolicy {
    Api::<NetworkPolicy>::namespaced(client.clone(), ns).get(name).await.expect("get NetworkPolicy")
}

pub async fn network_policy_names(client: &kube::Client, ns: &str) -> Vec<String> {
    let list =
        Api::<NetworkPolicy>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = list.items.into_iter().filter_map(|np| np.metadata.name).collect();
    names.sort();
    names
}

pub async fn events(client: &kube::Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items
}

/// The Events regarding `policy` with `reason`.
pub async fn events_with(client: &kube::Client, ns: &str, policy: &str, reason: &str) -> Vec<Event> {
    events(client, ns)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy))
        .collect()
}
