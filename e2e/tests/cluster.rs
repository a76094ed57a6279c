//! The operator's scenarios against a real cluster with Custos installed (`make e2e`): the
//! reconcile and webhook scenarios of `operator/tests/` (create, update, two policies in a
//! namespace, pods coming and going, delete, injection and re-admission, namespace-label
//! injection, admission denial, bypass warning, updates of injected pods refused, pods without
//! their sidecar reported) on a real API server. Each
//! test creates its own namespace and deletes it at the end. They wait for the cluster to
//! converge (bounded polling, 60 s) rather than for fixed times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use custos_api::DataAccessPolicy;
use custos_api::config::SidecarConfig;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
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

async fn sidecar_config(s: &Scenario) -> Option<SidecarConfig> {
    let cm = s.api::<ConfigMap>().get("custos-config").await.ok()?;
    serde_json::from_str(cm.data?.get("config.json")?).ok()
}

async fn config_hash(s: &Scenario) -> Option<String> {
    sidecar_config(s).await.map(|c| c.hash)
}

fn policy_names(config: &SidecarConfig) -> Vec<&str> {
    config.policies.iter().map(|p| p.name.as_str()).collect()
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

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn two_policies_share_one_config_and_each_keeps_its_network_policy() {
    let s = Scenario::new("two").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    s.apply_policy("parcels", spec("parcel-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    ready_policy(&s, "parcels").await;
    let config = eventually("both policies in custos-config", || async {
        sidecar_config(&s).await.filter(|c| policy_names(c) == ["customers", "parcels"])
    })
    .await;
    let cm = s.api::<ConfigMap>().get("custos-config").await.unwrap();
    let mut owners: Vec<_> =
        cm.metadata.owner_references.unwrap_or_default().into_iter().map(|o| o.name).collect();
    owners.sort();
    assert_eq!(owners, ["customers", "parcels"]);
    for name in ["custos-customers", "custos-parcels"] {
        s.api::<NetworkPolicy>().get(name).await.unwrap_or_else(|e| panic!("NetworkPolicy {name}: {e}"));
    }

    // One goes: the other stays enforced, alone in the config.
    s.api::<DataAccessPolicy>().delete("parcels", &DeleteParams::default()).await.unwrap();
    eventually("parcels gone from custos-config and its NetworkPolicy deleted", || async {
        let config = sidecar_config(&s).await?;
        let np = s.api::<NetworkPolicy>().get_opt("custos-parcels").await.ok()?;
        (policy_names(&config) == ["customers"] && np.is_none()).then_some(())
    })
    .await;
    assert_ne!(config_hash(&s).await, Some(config.hash));
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn pods_coming_and_going_update_the_identity_table() {
    let s = Scenario::new("identity").await;
    // The rule source of `spec`: workloads running as the `reader` service account.
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    s.api::<ServiceAccount>().create(&PostParams::default(), &account).await.unwrap();
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;

    let mut client_pod = pod("reader-1", "reader", json!({}));
    client_pod.spec.as_mut().unwrap().service_account_name = Some("reader".into());
    s.api::<Pod>().create(&PostParams::default(), &client_pod).await.unwrap();
    let ip = eventually("reader-1 gets a pod IP", || async {
        s.api::<Pod>().get("reader-1").await.ok()?.status?.pod_ip
    })
    .await;
    eventually("reader-1 in the identity table", || async {
        let config = sidecar_config(&s).await?;
        config
            .workloads
            .iter()
            .any(|w| w.ip == ip && w.service_account == "reader" && w.namespace == s.ns)
            .then_some(())
    })
    .await;

    s.api::<Pod>().delete("reader-1", &DeleteParams::default().grace_period(0)).await.unwrap();
    eventually("reader-1 gone from the identity table", || async {
        let config = sidecar_config(&s).await?;
        config.workloads.iter().all(|w| w.ip != ip).then_some(())
    })
    .await;
    s.finish().await;
}

fn container_names(pod: &Pod) -> Vec<String> {
    pod.spec.as_ref().map(|s| s.containers.iter().map(|c| c.name.clone()).collect()).unwrap_or_default()
}

fn custos_volumes(pod: &Pod) -> Vec<String> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes.into_iter().flatten().map(|v| v.name.clone()).filter(|n| n.starts_with("custos")).collect()
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn an_injected_pod_admitted_again_is_unchanged() {
    let s = Scenario::new("readmit").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    let pods = s.api::<Pod>();
    let injected =
        pods.create(&PostParams::default(), &pod("first", "customer-api", json!({}))).await.unwrap();
    assert!(container_names(&injected).contains(&"custos-sidecar".to_string()));
    let sidecar_label = injected.metadata.labels.as_ref().and_then(|l| l.get("custos.dev/sidecar"));
    assert_eq!(
        sidecar_label.map(String::as_str),
        Some("injected"),
        "the label the chart's PodMonitor selects"
    );

    // The injected pod, as the API server returned it, admitted again (dry run, new name).
    let mut again = injected.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("again".into()),
        labels: injected.metadata.labels.clone(),
        annotations: injected.metadata.annotations.clone(),
        ..Default::default()
    };
    again.status = None;
    let readmitted = pods.create(&PostParams { dry_run: true, field_manager: None }, &again).await.unwrap();
    assert_eq!(container_names(&readmitted), container_names(&injected));
    assert_eq!(custos_volumes(&readmitted), custos_volumes(&injected));
    let sidecar = |p: &Pod| {
        p.spec.as_ref().unwrap().containers.iter().find(|c| c.name == "custos-sidecar").cloned().unwrap()
    };
    assert_eq!(sidecar(&readmitted), sidecar(&injected));
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn a_namespace_labelled_for_injection_gets_sidecars_in_unselected_pods() {
    let s = Scenario::new("nslabel").await;
    // Its sidecars need the namespace's compiled config: one policy, for another app.
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    let pods = s.api::<Pod>();
    let before = pods.create(&PostParams::default(), &pod("before", "legacy", json!({}))).await.unwrap();
    assert_eq!(container_names(&before), ["app"], "not selected, namespace not labelled");

    let label = json!({"metadata": {"labels": {"custos.dev/injection": "enabled"}}});
    Api::<Namespace>::all(s.client.clone())
        .patch(&s.ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    // The webhook sees the label once its namespace cache has it: retried dry runs.
    eventually("a legacy pod injected in the labelled namespace", || async {
        let created = pods
            .create(&PostParams { dry_run: true, field_manager: None }, &pod("after", "legacy", json!({})))
            .await
            .ok()?;
        container_names(&created).contains(&"custos-sidecar".to_string()).then_some(())
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
    // Opting out of a policy that enforces: refused, not admitted unprotected.
    let refused = pods
        .create(
            &PostParams::default(),
            &pod("opted-out", "customer-api", json!({"custos.dev/inject": "false"})),
        )
        .await
        .expect_err("a pod an enforced policy selects cannot opt out");
    assert!(refused.to_string().contains("custos.dev/inject=false"), "{refused}");
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

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn an_injected_pods_sidecar_cannot_be_swapped_or_debugged() {
    let s = Scenario::new("update").await;
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    ready_policy(&s, "customers").await;
    let pods = s.api::<Pod>();
    let injected =
        pods.create(&PostParams::default(), &pod("guarded", "customer-api", json!({}))).await.unwrap();
    assert!(container_names(&injected).contains(&"custos-sidecar".to_string()));

    // kubectl set image pod/guarded custos-sidecar=alpine/socat
    let swap = json!({"spec": {"containers": [{"name": "custos-sidecar", "image": "alpine/socat:1.8.0.0"}]}});
    let refused = pods
        .patch("guarded", &PatchParams::default(), &Patch::Strategic(&swap))
        .await
        .expect_err("the sidecar's image cannot be swapped");
    assert!(refused.to_string().contains("changes the image of the custos-sidecar container"), "{refused}");

    // kubectl debug -it guarded --image=busybox --target=custos-sidecar
    let debug = json!({"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": "busybox:1.36", "targetContainerName": "custos-sidecar"
    }]}});
    let refused = pods
        .patch_ephemeral_containers("guarded", &PatchParams::default(), &Patch::Strategic(&debug))
        .await
        .expect_err("a debug container cannot target the sidecar");
    assert!(refused.to_string().contains("targets the custos-sidecar container"), "{refused}");

    // Into the app's container, and a label edit: admitted.
    let debug_app = json!({"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": "busybox:1.36", "targetContainerName": "app"
    }]}});
    pods.patch_ephemeral_containers("guarded", &PatchParams::default(), &Patch::Strategic(&debug_app))
        .await
        .unwrap();
    let label = json!({"metadata": {"labels": {"release": "canary"}}});
    pods.patch("guarded", &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    s.finish().await;
}

#[tokio::test]
#[ignore = "needs a cluster with Custos installed: make e2e"]
async fn pods_running_before_their_policy_are_reported_without_a_sidecar() {
    let s = Scenario::new("missing").await;
    // Created before any policy selects it: no sidecar.
    let early = s.api::<Pod>().create(&PostParams::default(), &pod("early", "customer-api", json!({}))).await;
    assert_eq!(container_names(&early.unwrap()), ["app"]);
    s.apply_policy("customers", spec("customer-api")).await.unwrap();
    eventually("SidecarMissing=True naming the early pod", || async {
        let p = s.api::<DataAccessPolicy>().get("customers").await.ok()?;
        let (status, message) = condition(&p, "SidecarMissing")?;
        (status == "True" && message.contains("(early)")).then_some(())
    })
    .await;
    s.api::<Pod>()
        .delete("early", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .unwrap();
    eventually("SidecarMissing=False once it is gone", || async {
        let p = s.api::<DataAccessPolicy>().get("customers").await.ok()?;
        let (status, _) = condition(&p, "SidecarMissing")?;
        (status == "False").then_some(())
    })
    .await;
    s.finish().await;
}
