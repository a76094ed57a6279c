//! The webhooks' [`ClusterView`] over reflector stores: the DataAccessPolicies of the watched
//! namespaces and the labels of every namespace, kept current by watches on every replica
//! (leader or not), so the webhooks answer from memory. Namespaces are watched whole (they
//! are few and small; the metadata-only watch saves little).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use custos_api::DataAccessPolicy;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::task::JoinSet;

use crate::webhook::ClusterView;

/// Policies (per watched namespace, or all) and namespace metadata from reflectors.
#[derive(Clone)]
pub struct StoreView {
    policies: Vec<Store<DataAccessPolicy>>,
    namespaces: Store<Namespace>,
}

impl std::fmt::Debug for StoreView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreView").field("policy_scopes", &self.policies.len()).finish_non_exhaustive()
    }
}

impl StoreView {
    /// Starts the reflectors on `tasks` (they run until the set is aborted): policies of
    /// `namespaces` (all when `None`) and the metadata of all namespaces.
    pub fn start(client: &Client, namespaces: Option<&BTreeSet<String>>, tasks: &mut JoinSet<()>) -> Self {
        let scopes: Vec<Api<DataAccessPolicy>> = match namespaces {
            None => vec![Api::all(client.clone())],
            Some(set) => set.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
        };
        let mut policies = Vec::with_capacity(scopes.len());
        for api in scopes {
            let (reader, writer) = reflector::store();
            let stream =
                reflector::reflector(writer, watcher(api, watcher::Config::default().any_semantic()))
                    .default_backoff()
                    .touched_objects();
            tasks.spawn(drain("DataAccessPolicy", stream));
            policies.push(reader);
        }
        let (namespace_reader, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default().any_semantic()),
        )
        .default_backoff()
        .touched_objects();
        tasks.spawn(drain("Namespace", stream));
        Self { policies, namespaces: namespace_reader }
    }

    /// Resolves once every policy store has had its initial list: from then on a pod that a
    /// policy selects is injected. (The namespace labels, which only matter for namespaces
    /// labelled for injection, follow on their own: [`StoreView::namespaces_synced`].)
    pub async fn synced(&self) {
        for store in &self.policies {
            let _ = store.wait_until_ready().await;
        }
    }

    /// Resolves once the namespace store has had its initial list.
    pub async fn namespaces_synced(&self) {
        let _ = self.namespaces.wait_until_ready().await;
    }
}

async fn drain<S, T>(kind: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, watcher::Error>>,
{
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        if let Err(error) = item {
            tracing::warn!(kind, %error, "watch failed; retrying with back-off");
        }
    }
}

impl ClusterView for StoreView {
    fn policies(&self, namespace: &str) -> Vec<Arc<DataAccessPolicy>> {
        // Only the namespace's policies are cloned (an `Arc` each), not the whole cache.
        self.policies
            .iter()
            .flat_map(|store| store.state_filter(|p| p.metadata.namespace.as_deref() == Some(namespace)))
            .collect()
    }

    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.get(&ObjectRef::new(namespace)).map(|ns| ns.labels().clone())
    }
}
