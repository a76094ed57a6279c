//! `custos operator` wired together against an in-memory Kubernetes API (kube-fake-client),
//! with the webhook configurations of `e2e/manifests/operator.yaml`: the generated CA is
//! patched into both configurations, the webhooks answer over TLS with that CA for the
//! Service's DNS name, injecting from the policies the caches hold; the replica takes the
//! Lease and reports it; `/readyz` turns ready; shutdown stops everything and frees the Lease.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use custos_api::DataAccessPolicy;
use custos_operator::args::OperatorArgs;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: OperatorArgs,
}

fn manifest_docs() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/manifests/operator.yaml");
    serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn doc<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let doc = manifest_docs().into_iter().find(|d| d["kind"] == kind).unwrap();
    serde_json::from_value(doc).unwrap()
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..200 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_serves_webhooks_leads_and_stops() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut policy: DataAccessPolicy =
        serde_json::from_value(fixture("policy-valid.json")["request"]["object"].clone()).unwrap();
    policy.metadata.managed_fields = None;
    policy.metadata.uid = None;
    policy.metadata.creation_timestamp = None;
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "logistics", "labels": {"team": "parcels"}}}))
            .unwrap();
    let client = kube_fake_client::ClientBuilder::new()
        .with_resource::<DataAccessPolicy>()
        .with_object(policy)
        .with_object(namespace)
        .with_object(doc::<MutatingWebhookConfiguration>("MutatingWebhookConfiguration"))
        .with_object(doc::<ValidatingWebhookConfiguration>("ValidatingWebhookConfiguration"))
        .build()
        .await
        .unwrap();

    let config = Cli::try_parse_from([
        "custos-operator",
        "--admin",
        "127.0.0.1:0",
        "--webhook-listen",
        "127.0.0.1:0",
        "--instance",
        "op-0",
        "--lease-duration",
        "3s",
        "--lease-grace",
        "1s",
    ])
    .unwrap()
    .args
    .into_config()
    .unwrap();
    let running = custos_operator::start_with_client(config, client.clone()).await.unwrap();
    let admin = format!("http://{}", running.admin_addr);
    let plain = reqwest::Client::new();

    // The generated CA lands in both webhook configurations.
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let ca_bundle = eventually("the CA bundle in the MutatingWebhookConfiguration", || async {
        let c = mutating.get("custos-sidecar-injector").await.ok()?;
        c.webhooks?.first()?.client_config.ca_bundle.clone()
    })
    .await;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let v = validating.get("custos-policy-validator").await.unwrap();
    assert_eq!(v.webhooks.unwrap()[0].client_config.ca_bundle.as_ref(), Some(&ca_bundle));
    let ca_pem = String::from_utf8(ca_bundle.0.clone()).unwrap();
    assert!(ca_pem.contains("BEGIN CERTIFICATE"), "{ca_pem}");

    // Ready once the caches have listed the policies and namespaces.
    eventually("/readyz 200", || async {
        let r = plain.get(format!("{admin}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // The webhook, over TLS, trusted through the patched CA, for the Service's name.
    let host = "custos-operator-webhook.custos-system.svc";
    let tls = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .resolve(host, running.webhook_addr.unwrap())
        .build()
        .unwrap();
    let review = fixture("pod-selected.json");
    let answer: Value = tls
        .post(format!("https://{host}:{}/mutate-pods", running.webhook_addr.unwrap().port()))
        .json(&review)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "the cached policy selects the pod: {answer}");

    // It leads: the Lease names it and the gauge says so.
    eventually("leader gauge", || async {
        let text = plain.get(format!("{admin}/metrics")).send().await.ok()?.text().await.ok()?;
        text.contains("custos_operator_leader 1").then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "custos-system");
    let lease = leases.get("custos-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("op-0"));
    let metrics = plain.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("custos_operator_admissions_total{webhook=\"mutate-pods\",outcome=\"injected\"} 1"),
        "{metrics}"
    );

    tokio::time::timeout(Duration::from_secs(30), running.shutdown()).await.expect("shutdown finishes");
    let lease = leases.get("custos-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None, "the Lease is released on shutdown");
    assert!(plain.get(format!("{admin}/healthz")).send().await.is_err(), "the admin server is closed");
}
