//! Leader election on a coordination.k8s.io Lease, against an in-memory Kubernetes API
//! (kube-fake-client): one of two replicas leads, the Lease names it, the other waits, and
//! the leader releases the Lease on shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use custos_operator::leader::{LeaderError, LeaderSettings, Leadership};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

fn settings(identity: &str) -> LeaderSettings {
    LeaderSettings {
        enabled: true,
        lease_name: "custos-operator".into(),
        lease_namespace: "custos-system".into(),
        identity: identity.into(),
        duration: Duration::from_secs(3),
        grace: Duration::from_secs(1),
    }
}

async fn holder(client: &kube::Client) -> Option<String> {
    let lease =
        Api::<Lease>::namespaced(client.clone(), "custos-system").get("custos-operator").await.ok()?;
    lease.spec?.holder_identity
}

#[tokio::test]
async fn one_replica_leads_the_other_waits_and_release_frees_the_lease() {
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let mut first = Leadership::elect(client.clone(), &settings("op-0")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), first.acquired()).await.expect("op-0 leads");
    assert!(first.is_leader());
    assert_eq!(holder(&client).await.as_deref(), Some("op-0"));

    let mut second = Leadership::elect(client.clone(), &settings("op-1")).await.unwrap();
    assert!(!second.is_leader(), "the Lease is held by op-0");

    // Not leading for a whole Lease duration while op-0 renews.
    let waited = tokio::time::timeout(Duration::from_secs(4), second.acquired()).await;
    assert!(waited.is_err(), "op-1 must not lead while op-0 holds the Lease");
    assert_eq!(holder(&client).await.as_deref(), Some("op-0"));

    // On shutdown op-0 releases the Lease, so that the next replica need not wait for it to
    // expire. (The take-over itself needs the apiserver's server-side apply ownership
    // transfer, which the in-memory API does not model: e2e covers it.)
    first.release().await;
    assert_eq!(holder(&client).await, None);
    second.release().await;
}

#[tokio::test]
async fn disabled_election_always_leads_and_bad_timing_is_refused() {
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let mut disabled = settings("solo");
    disabled.enabled = false;
    let mut solo = Leadership::elect(client.clone(), &disabled).await.unwrap();
    assert!(solo.acquired().await);
    assert!(holder(&client).await.is_none(), "no Lease without election");

    let mut bad = settings("op-0");
    bad.grace = bad.duration;
    let error = Leadership::elect(client, &bad).await.expect_err("grace must be shorter than duration");
    assert!(matches!(error, LeaderError::Timing { .. }), "{error}");
}
