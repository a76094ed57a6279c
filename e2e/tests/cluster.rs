//! The operator's scenarios against a real cluster with Custos installed (`make e2e`). Each
//! test creates its own namespace and deletes it at the end. They wait for the cluster to
//! converge (bounded polling, 60 s) rather than for fixed times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use custos_api::DataAccessPolicy;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn client() -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default().await.expect("KUBECONFIG must point at a cluster with Custos installed")
}

/// A fresh namespace for one scenario; deleted by [`Scenario::finish`].
struct Scenario {
    client: kube::Client,
    ns: String,
}

impl Scenario {
    async fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let client = client().await;
        let ns = format!("custos-e2e-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();
        Self { client, ns }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply_policy(&self, name: &str, spec: Value) -> Result<DataAccessPolicy, kube::Error> {
        let policy = json!({
            "apiVersion": "custos.dev/v1alpha1", "kind": "DataAccessPolicy",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        });
        self.api::<DataAccessPolicy>()
            .patch(name, &PatchParams::apply("custos-e2e").force(), &Patch::Apply(&policy))
            .await
    }

    async fn finish(self) {
        let _ = Api::<Namespace>::all(self.client.clone()).delete(&self.ns, &DeleteParams::default()).await;
    }
}

/// Polls `check` until it returns `Some` or [`WAIT`] passes.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn spec(app: &str) -> Value {
    json!({
        "workload": {"selector": {"matchLabels": {"app": app}}, "appPort": 8080},
        "defaultAction": "Deny",
        "rules": [{"name": "readers", "action": "Allow",
                   "from": {"workloads": [{"serviceAccount": "reader"}]},
                   "to": {"methods": ["GET"], "paths": ["/customers/**"]}}]
    })
}

fn condition(policy: &DataAccessPolicy, type_: &str) -> Option<(String, String)> {
    let status = policy.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.message.clone()))
}

async fn ready_policy(s: &Scenario, name: &str) -> DataAccessPolicy {
    eventually(&format!("{name} Ready=True"), || async {
        let p = s.api::<DataAccessPolicy>().get(name).await.ok()?;
        let observed = p.status.as_ref()?.observed_generation == p.metadata.generation;
        (observed && condition(&p, "Ready")?.0 == "True").then_some(p)
    })
    .await
}

async fn config_hash(s: &Scenario) -> Option<String> {
    let cm = s.api::<ConfigMap>().get("custos-config").await.ok()?;
    let config: Value = serde_json::from_str(cm.data?.get("config.json")?).ok()?;
    config["hash"].as_str().map(str::to_string)
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn policy_becomes_configmap_networkpolicy_and_status() {
    let s = Scenario::new("create").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    let p = ready_policy(&s, "customers").await;
    let hash = eventually("custos-config", || config_hash(&s)).await;
    assert_eq!(p.status.as_ref().unwrap().config_hash.as_deref(), Some(hash.as_str()));
    s.api::<NetworkPolicy>().get("custos-customers").await.expect("NetworkPolicy custos-customers");
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn update_changes_the_config_hash() {
    let s = Scenario::new("update").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    let before = eventually("custos-config", || config_hash(&s)).await;
    let mut changed = spec("customer-api");
    changed["defaultAction"] = json!("Allow");
    s.apply_policy("customers", changed).await.unwrap();
    let after =
        eventually("a new config hash", || async { config_hash(&s).await.filter(|h| *h != before) }).await;
    let p = ready_policy(&s, "customers").await;
    assert_eq!(p.status.unwrap().config_hash.as_deref(), Some(after.as_str()));
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn invalid_policy_is_denied_at_admission() {
    let s = Scenario::new("invalid").await;
    let mut bad = spec("customer-api");
    bad["rules"][0]["rowFilter"] = json!("record.branch ==");
    let error = s.apply_policy("broken", bad).await.expect_err("the validating webhook denies it");
    let message = error.to_string();
    assert!(message.contains("spec.rules[0].rowFilter"), "{message}");
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn delete_removes_owned_objects() {
    let s = Scenario::new("delete").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    s.api::<DataAccessPolicy>().delete("customers", &DeleteParams::default()).await.unwrap();
    eventually("NetworkPolicy and ConfigMap gone", || async {
        let np = s.api::<NetworkPolicy>().get_opt("custos-customers").await.ok()?;
        let cm = s.api::<ConfigMap>().get_opt("custos-config").await.ok()?;
        (np.is_none() && cm.is_none()).then_some(())
    })
    .await;
    s.finish().await;
}

fn pod(name: &str, app: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
                                 "ports": [{"containerPort": 8080}]}]}
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn selected_pod_gets_the_sidecar() {
    let s = Scenario::new("inject").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    let pods = s.api::<Pod>();
    let created =
        pods.create(&PostParams::default(), &pod("selected", "customer-api", json!({}))).await.unwrap();
    let names: Vec<_> = created.spec.unwrap().containers.into_iter().map(|c| c.name).collect();
    assert!(names.contains(&"custos-sidecar".to_string()), "{names:?}");
    let opted_out = pods
        .create(
            &PostParams::default(),
            &pod("opted-out", "customer-api", json!({"custos.dev/inject": "false"})),
        )
        .await
        .unwrap();
    let names: Vec<_> = opted_out.spec.unwrap().containers.into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["app"]);
    let other = pods.create(&PostParams::default(), &pod("other", "billing", json!({}))).await.unwrap();
    assert_eq!(other.spec.unwrap().containers.len(), 1);
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn bypassing_networkpolicy_is_flagged() {
    let s = Scenario::new("bypass").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    // A pod for the policy to protect (the bypass is about pods it selects).
    s.api::<Pod>().create(&PostParams::default(), &pod("selected", "customer-api", json!({}))).await.unwrap();
    let open: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "allow-app-port"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"port": 8080}]}]}
    }))
    .unwrap();
    s.api::<NetworkPolicy>().create(&PostParams::default(), &open).await.unwrap();
    eventually("SidecarBypass=True", || async {
        let p = s.api::<DataAccessPolicy>().get("customers").await.ok()?;
        let (status, message) = condition(&p, "SidecarBypass")?;
        (status == "True" && message.contains("allow-app-port")).then_some(())
    })
    .await;
    s.finish().await;
}
