//! Leader election on a coordination.k8s.io Lease, against an in-memory Kubernetes API
//! (kube-fake-client): one of two replicas leads, the Lease names it, the other waits, the
//! leader releases the Lease on shutdown, and a leader cut off from its Lease stops leading
//! before the Lease can expire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use custos_operator::leader::{LeaderError, LeaderSettings, Leadership, valid_until};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff;
use kube::api::Api;
use kube_fake_client::interceptor;

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

/// A 4 s Lease renewed 2 s before expiry (the fence stops 0.5 s before it).
fn fast_lease(identity: &str) -> LeaderSettings {
    LeaderSettings { duration: Duration::from_secs(4), grace: Duration::from_secs(2), ..settings(identity) }
}

/// An in-memory API where every read and write of the Lease first goes through `call` (an
/// error fails the request).
async fn lease_api(
    call: impl Fn() -> Result<(), kube_fake_client::Error> + Clone + Send + Sync + 'static,
) -> kube::Client {
    let on_get = call.clone();
    let funcs = interceptor::Funcs::new()
        .patch(move |ctx| {
            if ctx.name == "custos-operator" {
                call()?;
            }
            Ok(None)
        })
        .get(move |ctx| {
            if ctx.name == "custos-operator" {
                on_get()?;
            }
            Ok(None)
        });
    kube_fake_client::ClientBuilder::new().with_interceptor_funcs(funcs).build().await.unwrap()
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

    // Not leading for a whole Lease duration while op-0 renews, and op-0 leading throughout
    // (its fence sees every renewal in time).
    let (waited, lost) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(4), second.acquired()),
        tokio::time::timeout(Duration::from_secs(4), first.lost()),
    );
    assert!(waited.is_err(), "op-1 must not lead while op-0 holds the Lease");
    assert!(lost.is_err(), "op-0 must lead throughout while it renews");
    assert_eq!(holder(&client).await.as_deref(), Some("op-0"));

    // On shutdown op-0 releases the Lease, so that the next replica need not wait for it to
    // expire. (The take-over itself needs the apiserver's server-side apply ownership
    // transfer, which the in-memory API does not model: e2e covers it.)
    first.release().await;
    assert_eq!(holder(&client).await, None);
    second.release().await;
}

/// A leader that cannot reach its Lease stops leading before the Lease can expire (another
/// replica could take it then), although the election library, retrying its renewals, still
/// says leader; it leads again once a read shows the Lease renewed.
#[tokio::test]
async fn a_leader_cut_off_from_its_lease_stops_before_the_lease_expires() {
    let partitioned = Arc::new(AtomicBool::new(false));
    let cut = partitioned.clone();
    let client = lease_api(move || {
        if cut.load(Ordering::SeqCst) {
            return Err(kube_fake_client::Error::InvalidRequest("the API server cannot be reached".into()));
        }
        Ok(())
    })
    .await;
    let timing = fast_lease("op-0");
    let mut leader = Leadership::elect(client.clone(), &timing).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), leader.acquired()).await.expect("op-0 leads");

    partitioned.store(true, Ordering::SeqCst);
    // The Lease was renewed at most when the partition began, so another replica may take it
    // 4 s after that at the earliest; op-0 stops a quarter of a grace (0.5 s) before, i.e.
    // within 3.5 s.
    tokio::time::timeout(Duration::from_millis(3_900), leader.lost())
        .await
        .expect("op-0 stops leading in time");
    assert!(!leader.is_leader());

    partitioned.store(false, Ordering::SeqCst);
    let again = tokio::time::timeout(Duration::from_secs(20), leader.acquired()).await;
    assert_eq!(again.ok(), Some(true), "op-0 leads again once its renewal goes through");
    assert_eq!(holder(&client).await.as_deref(), Some("op-0"));
    leader.release().await;
}

/// With a slow API server (every Lease read and write taking 600 ms), the leader's renewals
/// are still confirmed in time: it leads throughout, without stopping and restarting its
/// controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_api_server_does_not_interrupt_the_leader() {
    let client = lease_api(|| {
        std::thread::sleep(Duration::from_millis(600));
        Ok(())
    })
    .await;
    let timing = fast_lease("op-0");
    let mut leader = Leadership::elect(client, &timing).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), leader.acquired()).await.expect("op-0 leads");
    // Four renewals (every 2 s of a 4 s Lease) go through meanwhile.
    let lost = tokio::time::timeout(Duration::from_secs(8), leader.lost()).await;
    assert!(lost.is_err(), "op-0 must lead throughout");
    leader.release().await;
}

#[test]
fn a_lease_confirms_only_its_holder_until_its_renewal_runs_out() {
    let renewed = jiff::Timestamp::from_second(1_700_000_000).unwrap();
    let lease = |holder: Option<&str>, renew: Option<jiff::Timestamp>, seconds: Option<i32>| Lease {
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: renew.map(MicroTime),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }),
        ..Lease::default()
    };
    let margin = Duration::from_millis(2_500);
    let expected = SystemTime::from(renewed) + Duration::from_secs(15) - margin;
    assert_eq!(valid_until(&lease(Some("op-0"), Some(renewed), Some(15)), "op-0", margin), Some(expected));
    for (case, other) in [
        ("held by another replica", lease(Some("op-1"), Some(renewed), Some(15))),
        ("released", lease(None, Some(renewed), Some(15))),
        ("never renewed", lease(Some("op-0"), None, Some(15))),
        ("no duration", lease(Some("op-0"), Some(renewed), None)),
        ("negative duration", lease(Some("op-0"), Some(renewed), Some(-1))),
        ("no spec", Lease::default()),
    ] {
        assert_eq!(valid_until(&other, "op-0", margin), None, "{case}");
    }
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
