//! Alerts recorded as Kubernetes Events on their DataAccessPolicy, against an in-memory
//! Kubernetes API (kube-fake-client): the Event regards the policy (kind, name, uid), carries
//! the detector as reason, the severity as type and the message as note; repeats fold into a
//! series; alerts without a (live) policy record nothing and do not fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use custos_api::DataAccessPolicy;
use custos_collector::kube_events::{REPORTING_CONTROLLER, SkipReason};
use custos_collector::{KubeEventRecorder, KubeEvents};
use custos_detect::{AlertDispatcher, AlertRecorder, SinkConfig};
use custos_store::{Alert, Severity};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams};
use kube::runtime::events::Reporter;
use serde_json::json;

const NS: &str = "shop";
const POLICY: &str = "orders";

fn policy(namespace: &str, name: &str) -> DataAccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "custos.dev/v1alpha1",
        "kind": "DataAccessPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 }
        }
    }))
    .expect("a minimal DataAccessPolicy")
}

fn alert(
    id: &str,
    detector: &str,
    severity: Severity,
    namespace: Option<&str>,
    policy: Option<&str>,
) -> Alert {
    Alert {
        id: id.into(),
        time: "2026-01-01T00:00:00Z".into(),
        detector: detector.into(),
        namespace: namespace.map(Into::into),
        policy: policy.map(Into::into),
        principal: Some("spiffe://cluster.local/ns/shop/sa/reporting".into()),
        severity,
        message: format!("{detector}: 42 in 5m for spiffe://cluster.local/ns/shop/sa/reporting"),
        details: serde_json::Value::Null,
    }
}

/// A fake API holding the `shop/orders` policy, and that policy as stored (with its uid).
async fn cluster() -> (kube::Client, DataAccessPolicy) {
    let client = kube_fake_client::ClientBuilder::new()
        .with_resource::<DataAccessPolicy>()
        .with_object(policy(NS, POLICY))
        .build()
        .await
        .expect("fake Kubernetes API");
    let stored = Api::<DataAccessPolicy>::namespaced(client.clone(), NS).get(POLICY).await.unwrap();
    assert!(stored.metadata.uid.as_deref().is_some_and(|u| !u.is_empty()), "the fake API sets a uid");
    (client, stored)
}

fn recorder(client: &kube::Client) -> KubeEventRecorder {
    KubeEventRecorder::with_reporter(
        client.clone(),
        Reporter { controller: REPORTING_CONTROLLER.into(), instance: Some("collector-0".into()) },
    )
}

async fn events(client: &kube::Client, namespace: &str) -> Vec<K8sEvent> {
    Api::<K8sEvent>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap().items
}

fn event_with_reason<'a>(events: &'a [K8sEvent], reason: &str) -> &'a K8sEvent {
    let matching: Vec<_> = events.iter().filter(|e| e.reason.as_deref() == Some(reason)).collect();
    assert_eq!(matching.len(), 1, "one {reason} Event expected in {events:#?}");
    matching[0]
}

#[tokio::test]
async fn an_alert_becomes_an_event_regarding_its_policy() {
    let (client, stored) = cluster().await;
    let r = recorder(&client);
    let a = alert("a1", "denial_burst", Severity::Critical, Some(NS), Some(POLICY));
    AlertRecorder::record(&r, &a).await.unwrap();

    let all = events(&client, NS).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    let e = &all[0];
    let regarding = e.regarding.as_ref().expect("regarding");
    assert_eq!(regarding.api_version.as_deref(), Some("custos.dev/v1alpha1"));
    assert_eq!(regarding.kind.as_deref(), Some("DataAccessPolicy"));
    assert_eq!(regarding.namespace.as_deref(), Some(NS));
    assert_eq!(regarding.name.as_deref(), Some(POLICY));
    assert_eq!(regarding.uid, stored.metadata.uid);
    assert_eq!(e.reason.as_deref(), Some("DenialBurst"));
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.note.as_deref(), Some(a.message.as_str()));
    assert_eq!(e.action.as_deref(), Some("Alert"));
    assert_eq!(e.reporting_controller.as_deref(), Some("custos-collector"));
    assert_eq!(e.reporting_instance.as_deref(), Some("collector-0"));
    assert_eq!(e.metadata.namespace.as_deref(), Some(NS));
    assert!(e.event_time.is_some(), "events.k8s.io/v1 needs eventTime");
    assert_eq!(r.skipped(SkipReason::NoPolicy) + r.skipped(SkipReason::PolicyNotFound), 0);

    // An info alert of another detector: a second, Normal, Event.
    let info = alert("a2", "first_seen", Severity::Info, Some(NS), Some(POLICY));
    AlertRecorder::record(&r, &info).await.unwrap();
    let all = events(&client, NS).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    let e = event_with_reason(&all, "FirstSeen");
    assert_eq!(e.type_.as_deref(), Some("Normal"));
    assert_eq!(e.note.as_deref(), Some(info.message.as_str()));
    assert_eq!(e.regarding.as_ref().and_then(|r| r.uid.clone()), stored.metadata.uid);
}

#[tokio::test]
async fn a_repeated_alert_folds_into_a_series() {
    let (client, _) = cluster().await;
    let r = recorder(&client);
    for id in ["a1", "a2", "a3"] {
        let a = alert(id, "row_filter_burst", Severity::Warning, Some(NS), Some(POLICY));
        AlertRecorder::record(&r, &a).await.unwrap();
    }
    let all = events(&client, NS).await;
    assert_eq!(all.len(), 1, "repeats are patched into the first Event: {all:#?}");
    let e = event_with_reason(&all, "RowFilterBurst");
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(3), "{e:#?}");
}

#[tokio::test]
async fn alerts_without_a_live_policy_record_nothing_and_do_not_fail() {
    let (client, _) = cluster().await;
    let r = recorder(&client);

    // The policy was deleted (or never existed).
    let gone = alert("a1", "volume", Severity::Warning, Some(NS), Some("deleted-policy"));
    AlertRecorder::record(&r, &gone).await.expect("a missing policy is not an error");
    assert!(!r.publish(&gone).await.unwrap(), "skipped");
    assert_eq!(r.skipped(SkipReason::PolicyNotFound), 2);
    // Same name in another namespace: not the policy.
    let elsewhere = alert("a2", "volume", Severity::Warning, Some("billing"), Some(POLICY));
    AlertRecorder::record(&r, &elsewhere).await.unwrap();
    assert_eq!(r.skipped(SkipReason::PolicyNotFound), 3);

    // No namespace or no policy named.
    for (ns, p) in [(None, Some(POLICY)), (Some(NS), None), (None, None)] {
        AlertRecorder::record(&r, &alert("a3", "off_hours", Severity::Critical, ns, p)).await.unwrap();
    }
    assert_eq!(r.skipped(SkipReason::NoPolicy), 3);

    assert!(events(&client, NS).await.is_empty());
    assert!(events(&client, "billing").await.is_empty());
}

#[tokio::test]
async fn the_dispatcher_hands_alerts_to_the_recorder() {
    let (client, stored) = cluster().await;
    let dispatcher =
        AlertDispatcher::builder(SinkConfig::default()).recorder(recorder(&client)).start().unwrap();
    dispatcher.dispatch(vec![
        alert("a1", "denial_burst", Severity::Warning, Some(NS), Some(POLICY)),
        alert("a2", "volume", Severity::Warning, Some(NS), Some("deleted-policy")),
    ]);
    assert!(dispatcher.shutdown(Duration::from_secs(30)).await, "every alert handled");
    let m = dispatcher.metrics();
    assert_eq!(m.recordings("kubernetes_events", true), 2, "a skipped alert is not a failure");
    assert_eq!(m.recordings("kubernetes_events", false), 0);

    let all = events(&client, NS).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0].regarding.as_ref().and_then(|r| r.uid.clone()), stored.metadata.uid);
    assert_eq!(all[0].reason.as_deref(), Some("DenialBurst"));
}

#[test]
fn kube_events_are_off_unless_asked_when_configured_by_hand() {
    let config =
        custos_collector::CollectorConfig::new("sqlite::memory:", custos_collector::Auth::Unauthenticated);
    assert_eq!(config.kube_events, KubeEvents::Off);
}
