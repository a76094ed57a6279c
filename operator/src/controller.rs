//! The DataAccessPolicy controller, compute-then-apply.
//!
//! [`reconcile_namespace`] is the whole job: read a namespace, compute its desired state with
//! the pure [`custos_operator_core::desired::compute`], apply it (module `reconcile` documents the
//! steps). [`run`] drives it with kube-runtime `Controller`s:
//!
//! - one per scope: all namespaces, or each namespace of `settings.namespaces`;
//! - the reconcile of a policy is the reconcile of its namespace; reconciles of one namespace
//!   are serialised and coalesced (module `coalesce`), so ten policies changed at once cost one
//!   namespace reconcile, not ten;
//! - triggers: the policies themselves (deletion goes through the `custos.dev/cleanup`
//!   finalizer, so a deleted policy is recompiled out before it disappears); every
//!   NetworkPolicy of the namespace (Custos's own — repaired when edited or deleted — and the
//!   others, for the bypass check); the Services of the namespace (how a mesh reads the
//!   proxy port, `ProxyPortNotHttp`); the `custos-config` ConfigMaps; pods, mapped to their
//!   namespace and to the namespaces whose rule sources name theirs (module `triggers`; in the
//!   per-namespace mode a pod concerning another scope wakes that scope's controller);
//! - with `--sync-sidecar-secrets`, a metadata watch on the operator's namespace's Secrets:
//!   a change of an original wakes every scope, so rotations reach the copies at once;
//! - every reconcile is counted and timed in [`crate::OperatorMetrics`]; a failed one is
//!   retried with a per-namespace back-off (module `backoff`, 2 s doubling to 5 min); a successful
//!   one is repeated after [`RESYNC`] to catch anything a watch missed.
//!
//! [`run`] runs until its future is dropped: the caller aborts it when this replica loses
//! the leader Lease, and dropping it stops the watches and cancels reconciles in flight.

mod backoff;
mod coalesce;
mod reconcile;
mod triggers;

use std::sync::Arc;
use std::time::Duration;

use custos_api::DataAccessPolicy;
use custos_operator_core::names::{CONFIG_MAP_NAME, MANAGED_BY, MANAGED_BY_LABEL};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use self::backoff::Backoff;
use self::coalesce::{Coalesced, Coalescer};
pub use self::reconcile::{ReconcileOutcome, reconcile_namespace};
use crate::context::Context;
use crate::error::Error;

/// How long after a successful reconcile a policy is reconciled again regardless of events.
pub const RESYNC: Duration = Duration::from_secs(600);

/// Reconciles running at once (per scope).
const CONCURRENCY: u16 = 4;

/// One controller's view: its policy cache, and how to make it reconcile everything.
struct Scope {
    store: Store<DataAccessPolicy>,
    wake: mpsc::Sender<()>,
}

impl Scope {
    /// Makes the scope's controller reconcile all its policies.
    fn wake(&self) {
        // Full: a wake-up is pending already, which is all that is needed.
        let _ = self.wake.try_send(());
    }
}

/// What the reconciles of every scope share.
struct Shared {
    ctx: Arc<Context>,
    coalescer: Coalescer,
    backoff: Backoff,
    scopes: Vec<Scope>,
}

impl Shared {
    /// A policy of `namespace` in scope `scope`: reconciling it reconciles the namespace.
    fn namespace_ref(&self, scope: usize, namespace: Option<String>) -> Option<ObjectRef<DataAccessPolicy>> {
        let namespace = namespace?;
        let store = &self.scopes.get(scope)?.store;
        store.find(|p| p.metadata.namespace.as_ref() == Some(&namespace)).map(|p| ObjectRef::from_obj(&*p))
    }

    /// The policies of scope `scope` to reconcile for a pod change; other scopes concerned are
    /// woken up (a full reconcile of theirs, coalesced per namespace).
    fn pod_refs(&self, scope: usize, pod: &Pod) -> Vec<ObjectRef<DataAccessPolicy>> {
        let Some(pod_namespace) = pod.metadata.namespace.as_deref() else { return Vec::new() };
        let all: Vec<Arc<DataAccessPolicy>> = self.scopes.iter().flat_map(|s| s.store.state()).collect();
        let mut refs = Vec::new();
        for namespace in triggers::namespaces_for_pod(pod_namespace, all.iter().map(|p| &**p)) {
            if let Some(r) = self.namespace_ref(scope, Some(namespace.clone())) {
                refs.push(r);
                continue;
            }
            for other in self
                .scopes
                .iter()
                .filter(|s| s.store.find(|p| p.metadata.namespace.as_ref() == Some(&namespace)).is_some())
            {
                other.wake();
            }
        }
        refs
    }

    fn policy_count(&self) -> usize {
        self.scopes.iter().map(|s| s.store.len()).sum()
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until the returned future is dropped (see the module documentation).
pub async fn run(ctx: Arc<Context>) {
    let scope_namespaces: Vec<Option<String>> = match &ctx.settings.namespaces {
        None => vec![None],
        Some(namespaces) => namespaces.iter().cloned().map(Some).collect(),
    };
    let client = ctx.client.clone();
    let mut controllers = Vec::new();
    let mut scopes = Vec::new();
    let mut wakes = Vec::new();
    for namespace in &scope_namespaces {
        let policies = scoped::<DataAccessPolicy>(&client, namespace.as_deref());
        let controller = Controller::new(policies, watcher::Config::default().any_semantic());
        let (wake, woken) = mpsc::channel(1);
        scopes.push(Scope { store: controller.store(), wake });
        controllers.push(controller);
        wakes.push(woken);
    }
    let shared = Arc::new(Shared {
        ctx: Arc::clone(&ctx),
        coalescer: Coalescer::default(),
        backoff: Backoff::default(),
        scopes,
    });
    tracing::info!(scopes = scope_namespaces.len(), "policy controller started");
    let rotations = watch_originals(Arc::clone(&ctx), Arc::clone(&shared));

    let runs = controllers.into_iter().zip(wakes).zip(scope_namespaces).enumerate().map(
        |(i, ((controller, woken), namespace))| {
            let ns = namespace.as_deref();
            let (for_netpols, for_config_maps, for_pods, for_services) =
                (Arc::clone(&shared), Arc::clone(&shared), Arc::clone(&shared), Arc::clone(&shared));
            let ours = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
            let config_maps =
                watcher::Config::default().labels(&ours).fields(&format!("metadata.name={CONFIG_MAP_NAME}"));
            let woken =
                futures::stream::unfold(woken, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });
            controller
                .watches(scoped::<NetworkPolicy>(&client, ns), watcher::Config::default(), move |np| {
                    for_netpols.namespace_ref(i, np.namespace())
                })
                .watches(scoped::<ConfigMap>(&client, ns), config_maps, move |cm| {
                    for_config_maps.namespace_ref(i, cm.namespace())
                })
                .watches(scoped::<Pod>(&client, ns), watcher::Config::default().any_semantic(), move |pod| {
                    for_pods.pod_refs(i, &pod)
                })
                .watches(scoped::<Service>(&client, ns), watcher::Config::default(), move |service| {
                    for_services.namespace_ref(i, service.namespace())
                })
                .reconcile_all_on(woken)
                .with_config(controller::Config::default().concurrency(CONCURRENCY))
                .run(reconcile, error_policy, Arc::clone(&shared))
                .for_each(|result| {
                    match result {
                        Ok(_) => {}
                        Err(controller::Error::QueueError(error)) => {
                            tracing::warn!(%error, "watch failed; retrying");
                        }
                        Err(error) => tracing::debug!(%error, "reconcile not completed"),
                    }
                    std::future::ready(())
                })
        },
    );
    futures::future::join(futures::future::join_all(runs), rotations).await;
}

/// With `--sync-sidecar-secrets`: watches the metadata of the Secrets in the operator's
/// namespace and wakes every scope when an original changes (see
/// [`triggers::secret_event_wakes`]), so that a rotated collector token or hash key reaches
/// the copies at once rather than at the next resync. Returns at once without Secret copies.
async fn watch_originals(ctx: Arc<Context>, shared: Arc<Shared>) {
    let Some(sync) = ctx.settings.secret_sync.clone() else { return };
    // Metadata only: the operator never holds the originals' data outside a reconcile.
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &sync.source_namespace);
    let events = watcher::watcher(secrets, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) if triggers::secret_event_wakes(&event, &sync.names) => {
                tracing::debug!(namespace = %sync.source_namespace, "sidecar Secrets changed: reconciling every namespace");
                shared.scopes.iter().for_each(Scope::wake);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "watch on the sidecar Secrets failed; retrying"),
        }
    }
}

async fn reconcile(policy: Arc<DataAccessPolicy>, shared: Arc<Shared>) -> Result<Action, Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let ctx = &shared.ctx;
    let ran = shared
        .coalescer
        .run(&namespace, || async {
            let started = std::time::Instant::now();
            let result = reconcile_namespace(ctx, &namespace).await;
            ctx.metrics.observe_reconcile(
                started.elapsed(),
                result.as_ref().map(|_| ()).map_err(Error::metric_label),
            );
            ctx.metrics.set_policies(shared.policy_count());
            result
        })
        .await;
    match ran {
        Coalesced::Covered => Ok(Action::requeue(RESYNC)),
        Coalesced::Ran(Ok(_)) => {
            shared.backoff.succeeded(&namespace);
            Ok(Action::requeue(RESYNC))
        }
        Coalesced::Ran(Err(error)) => Err(error),
    }
}

fn error_policy(policy: Arc<DataAccessPolicy>, error: &Error, shared: Arc<Shared>) -> Action {
    let namespace = policy.namespace().unwrap_or_default();
    let delay = shared.backoff.failed(&namespace);
    tracing::warn!(namespace, %error, retry_in_s = delay.as_secs(), "namespace reconcile failed");
    Action::requeue(delay)
}
