//! Controller benchmark: 1,000 DataAccessPolicies across 100 namespaces with 10,000 pods in
//! an in-memory Kubernetes API (kube-fake-client); every namespace is reconciled (first
//! reconcile, then a resync with nothing changed). Printed beside it, measured in the same
//! run: a baseline of the same API writes with precomputed objects (no reads, no compute),
//! the pure compute step alone, and the ratios. Peak memory is the process's VmHWM.
//!
//! `cargo bench -p custos-operator --bench reconcile` (targets: ≤ 10 s, ≤ 200 MB);
//! `-- --quick` runs a tenth of it (CI smoke).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{context, mk_pod, mk_policy_spec};
use custos_api::DataAccessPolicy;
use custos_operator::context::Context;
use custos_operator::controller::{ReconcileOutcome, reconcile_namespace};
use custos_operator_core::desired::{self, Desired, EventType, NamespaceSnapshot, pod_namespaces};
use custos_operator_core::names::{CONFIG_MAP_NAME, FIELD_MANAGER, FINALIZER};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType as KubeEventType};
use kube::{Resource, ResourceExt};
use kube_fake_client::ClientBuilder;
use serde_json::json;

/// Namespace reconciles in flight, as the controller runs them.
const CONCURRENCY: usize = 4;
const SERVICES_PER_NAMESPACE: usize = 10;
const PODS_PER_SERVICE: usize = 9;
const PORTALS_PER_NAMESPACE: usize = 10;
const TARGET: Duration = Duration::from_secs(10);
const TARGET_MB: f64 = 200.0;

struct Shape {
    namespaces: usize,
}

fn namespace(i: usize) -> String {
    format!("tenant-{i:03}")
}

/// A realistic policy: JWT users with attributes, two data classes, a branch-scoped read
/// rule with a row filter, masks and limits from the namespace's portal and from the next
/// namespace's portal pods, a bulk-export deny, egress lockdown.
fn policy(ns: &str, next_ns: &str, service: &str) -> DataAccessPolicy {
    mk_policy_spec(
        ns,
        service,
        json!({
            "workload": { "selector": { "matchLabels": { "app": service } }, "appPort": 8080 },
            "identity": { "users": {
                "jwt": { "issuer": "https://sso.example.com", "audiences": [service], "jwksUri": "https://sso.example.com/jwks" },
                "attributes": { "branch": "branch_id", "role": "role" }
            } },
            "dataClasses": [
                { "name": "phone", "paths": ["$.items[*].phone"] },
                { "name": "name", "paths": ["$.items[*].name"] }
            ],
            "rules": [
                {
                    "name": "branch-clerks-read", "action": "Allow",
                    "from": {
                        "workloads": [
                            { "serviceAccount": "portal" },
                            { "namespace": next_ns, "labels": { "app": "portal" } }
                        ],
                        "users": { "role": ["clerk"] }
                    },
                    "to": { "methods": ["GET"], "paths": ["/customers/*", "/parcels/**"] },
                    "records": "$.items[*]",
                    "rowFilter": "record.branch == user.branch",
                    "mask": { "phone": "ShowLast4", "name": "ShowFirst1" },
                    "limits": { "requestsPerMinute": 120, "recordsPerHour": 300, "maxRecordsPerResponse": 50 }
                },
                { "name": "no-bulk-export", "action": "Deny", "to": { "paths": ["/customers/export"] } }
            ],
            "networkPolicy": { "enabled": true, "egress": "DenyAll" }
        }),
    )
}

/// The policies and pods of namespace `i` (deterministic: pod IPs follow from `i`).
fn namespace_objects(shape: &Shape, i: usize) -> (Vec<DataAccessPolicy>, Vec<Pod>) {
    let ns = namespace(i);
    let next_ns = namespace((i + 1) % shape.namespaces);
    let mut policies = Vec::new();
    let mut pods = Vec::new();
    let ip = |k: usize| format!("10.{}.{}.{}", i / 200, i % 200, k + 1);
    for s in 0..SERVICES_PER_NAMESPACE {
        let service = format!("svc-{s}");
        policies.push(policy(&ns, &next_ns, &service));
        for p in 0..PODS_PER_SERVICE {
            let k = s * PODS_PER_SERVICE + p;
            pods.push(mk_pod(&ns, &format!("{service}-{p}"), &[("app", &service)], &service, &ip(k)));
        }
    }
    for p in 0..PORTALS_PER_NAMESPACE {
        let k = SERVICES_PER_NAMESPACE * PODS_PER_SERVICE + p;
        pods.push(mk_pod(&ns, &format!("portal-{p}"), &[("app", "portal")], "portal", &ip(k)));
    }
    (policies, pods)
}

/// An in-memory API seeded with every namespace's objects, one namespace at a time (the
/// typed objects of only one namespace are alive at once).
async fn seeded_api(shape: &Shape) -> kube::Client {
    let mut builder = ClientBuilder::new().with_resource::<DataAccessPolicy>();
    for i in 0..shape.namespaces {
        let (mut policies, pods) = namespace_objects(shape, i);
        // Registers the status subresource (see `common::fake_api`).
        for p in &mut policies {
            p.status.get_or_insert_with(Default::default);
        }
        builder = builder.with_objects(policies).with_objects(pods);
    }
    builder.build().await.expect("fake Kubernetes API")
}

/// Peak resident set (VmHWM) in MB.
fn peak_mb() -> f64 {
    rss_field("VmHWM:")
}

fn rss_mb() -> f64 {
    rss_field("VmRSS:")
}

fn rss_field(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Reconciles every namespace, `CONCURRENCY` at a time; the outcomes summed.
async fn reconcile_all(ctx: &Context, namespaces: &[String]) -> ReconcileOutcome {
    let outcomes: Vec<ReconcileOutcome> = futures::stream::iter(namespaces)
        .map(|ns| async move { reconcile_namespace(ctx, ns).await.expect("reconcile") })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut total = ReconcileOutcome::default();
    for o in outcomes {
        total.policies += o.policies;
        total.network_policies_applied += o.network_policies_applied;
        total.statuses_written += o.statuses_written;
        total.events_recorded += o.events_recorded;
        total.finalizers_added += o.finalizers_added;
        total.finalizers_removed += o.finalizers_removed;
        total.network_policies_deleted += o.network_policies_deleted;
        total.applies_skipped += o.applies_skipped;
    }
    total
}

/// API writes a first reconcile makes: finalizers, ConfigMaps, NetworkPolicies, statuses,
/// Events.
fn writes(o: &ReconcileOutcome, config_maps: usize) -> usize {
    o.finalizers_added + config_maps + o.network_policies_applied + o.statuses_written + o.events_recorded
}

/// The snapshot the reconcile reads for namespace `i`, built in memory: its policies, its
/// pods and the next namespace's (which its rule sources name).
fn snapshot(shape: &Shape, i: usize) -> NamespaceSnapshot {
    let (policies, mut pods) = namespace_objects(shape, i);
    let namespace = namespace(i);
    let wanted = pod_namespaces(&namespace, &policies);
    let (_, next_pods) = namespace_objects(shape, (i + 1) % shape.namespaces);
    pods.extend(next_pods.into_iter().filter(|p| p.namespace().is_some_and(|n| wanted.contains(&n))));
    NamespaceSnapshot {
        namespace,
        policies,
        pods,
        network_policies: vec![],
        services: Some(vec![]),
        current_config: None,
    }
}

/// The baseline: the same writes as the first reconcile, of precomputed objects, no reads.
async fn plain_writes(ctx: &Context, snapshot: &NamespaceSnapshot, desired: &Desired) -> usize {
    let ns = snapshot.namespace.as_str();
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let policies: Api<DataAccessPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let mut n = 0;
    for p in &snapshot.policies {
        let patch = json!({ "metadata": { "finalizers": [FINALIZER] } });
        policies.patch(&p.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        n += 1;
    }
    if let Some(cm) = &desired.config_map {
        Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
            .patch(CONFIG_MAP_NAME, &apply, &Patch::Apply(cm))
            .await
            .unwrap();
        n += 1;
    }
    let netpols: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    for np in &desired.network_policies {
        netpols.patch(&np.name_any(), &apply, &Patch::Apply(np)).await.unwrap();
        n += 1;
    }
    for (name, status) in &desired.statuses {
        let patch = json!({ "status": status });
        policies.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        n += 1;
    }
    for e in &desired.events {
        let Some(p) = snapshot.policies.iter().find(|p| p.name_any() == e.policy) else { continue };
        let event = Event {
            type_: if e.type_ == EventType::Normal { KubeEventType::Normal } else { KubeEventType::Warning },
            reason: e.reason.clone(),
            note: Some(e.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        ctx.recorder.publish(&event, &p.object_ref(&())).await.unwrap();
        n += 1;
    }
    n
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let shape = Shape { namespaces: if quick { 10 } else { 100 } };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run(&shape));
}

async fn run(shape: &Shape) {
    let namespaces: Vec<String> = (0..shape.namespaces).map(namespace).collect();
    let client = seeded_api(shape).await;
    let ctx = context(&client);
    let seeded_mb = rss_mb();
    let policies = shape.namespaces * SERVICES_PER_NAMESPACE;
    let pods = shape.namespaces * (SERVICES_PER_NAMESPACE * PODS_PER_SERVICE + PORTALS_PER_NAMESPACE);
    println!(
        "custos operator reconcile: {policies} policies in {} namespaces, {pods} pods, in-memory API, {CONCURRENCY} namespaces at a time",
        namespaces.len(),
    );

    // The reconcile: first, then again with nothing changed.
    let started = Instant::now();
    let first = reconcile_all(&ctx, &namespaces).await;
    let total = started.elapsed();
    let started = Instant::now();
    let resync = reconcile_all(&ctx, &namespaces).await;
    let resync_time = started.elapsed();
    let peak = peak_mb();
    assert_eq!(first.policies, policies);
    assert_eq!(
        (resync.statuses_written, resync.events_recorded, resync.network_policies_applied),
        (0, 0, 0),
        "a resync writes no status, no Event, no NetworkPolicy"
    );
    let reconcile_writes = writes(&first, namespaces.len());
    drop(ctx);
    drop(client);

    // Baselines, after the peak was taken: the pure step alone (timed), then the same writes
    // of its precomputed output into a fresh API seeded alike (timed).
    let mut compute = Duration::ZERO;
    let mut precomputed = Vec::with_capacity(shape.namespaces);
    for i in 0..shape.namespaces {
        let mut snapshot = snapshot(shape, i);
        let started = Instant::now();
        let desired = desired::compute(&snapshot, Timestamp::now()).expect("compute");
        compute += started.elapsed();
        snapshot.pods = Vec::new();
        precomputed.push((snapshot, desired));
    }
    let client = seeded_api(shape).await;
    let ctx = context(&client);
    let started = Instant::now();
    let baseline_writes: usize = futures::stream::iter(&precomputed)
        .map(|(s, d)| plain_writes(&ctx, s, d))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<usize>>()
        .await
        .into_iter()
        .sum();
    let baseline = started.elapsed();

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON);
    println!("  first reconcile, all namespaces : {}  ({reconcile_writes} API writes)", seconds(total));
    println!(
        "  resync, nothing changed         : {}  (reads and compute; {} applies skipped as already current)",
        seconds(resync_time),
        resync.applies_skipped
    );
    println!(
        "  baseline: plain writes          : {}  ({baseline_writes} API writes of precomputed objects)  reconcile/baseline = {:.2}",
        seconds(baseline),
        ratio(total, baseline)
    );
    println!(
        "  baseline: pure compute alone    : {}  reconcile/compute = {:.1}",
        seconds(compute),
        ratio(total, compute)
    );
    println!(
        "  peak memory (VmHWM)             : {peak:.0} MB  (RSS with the API seeded: {seeded_mb:.0} MB)"
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "  targets: total ≤ {} s {}, peak ≤ {TARGET_MB:.0} MB {}",
        TARGET.as_secs(),
        verdict(total <= TARGET),
        verdict(peak <= TARGET_MB)
    );
}
