//! One namespace reconcile, compute-then-apply: read the namespace (policies, NetworkPolicies,
//! the pods its policies care about), compute the desired state with
//! [`custos_operator_core::desired::compute`], then apply it.
//!
//! Reads are plain lists (consistent reads, no cache to warm up), so the very same code runs
//! against the in-memory API of the tests and benchmark and against a cluster. Pods are listed
//! only in the namespace itself and in the namespaces its rule sources name (and only those
//! the operator watches), restricted to `status.phase=Running` by the apiserver.
//!
//! The apply, in order:
//! 1. the `custos.dev/cleanup` finalizer is added to live policies lacking it (first, so the
//!    status written below describes the policy as it then is);
//! 2. the `custos-config` ConfigMap is server-side applied (field manager `custos`, forced),
//!    unless it already holds exactly the desired data, labels, annotations and owners, or
//!    deleted once no live policy is left; a failure stops the reconcile here;
//! 3. with `--sync-sidecar-secrets`, the sidecar Secrets are copied from the operator's
//!    namespace (or their copies deleted with the ConfigMap); a failure is reported at the end;
//! 4. each NetworkPolicy is server-side applied (skipped, like the ConfigMap, when the listed
//!    one is already exactly the desired one) — a refusal turns that policy's
//!    `NetworkPolicyApplied` False with the apiserver's reason and fails the reconcile at the
//!    end, after the other steps —, stale ones are deleted;
//! 5. statuses are patched (status subresource) only where they changed;
//! 6. the Events are recorded (best effort: a refused Event is logged, not retried);
//! 7. when everything above succeeded, the finalizer of the policies being deleted is
//!    removed, letting them go.

use std::collections::BTreeMap;

use custos_api::{DataAccessPolicy, DataAccessPolicyStatus};
use custos_operator_core::desired::{
    self, Desired, DesiredEvent, EventType, NamespaceSnapshot, has_finalizer, is_deleting, pod_namespaces,
};
use custos_operator_core::inject::{COLLECTOR_TOKEN_KEY, HASH_KEY_KEY};
use custos_operator_core::names::{
    CONFIG_MAP_NAME, FIELD_MANAGER, FINALIZER, MANAGED_BY, MANAGED_BY_LABEL, POLICY_LABEL,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType as KubeEventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::Context;
use crate::error::Error;

/// What a namespace reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// Hash of the applied `custos-config`; `None` when there is no config (deleted).
    pub config_hash: Option<String>,
    /// Live (not deleting) policies in the namespace.
    pub policies: usize,
    /// NetworkPolicies applied.
    pub network_policies_applied: usize,
    /// Applies skipped because the object already held exactly the desired state (the
    /// ConfigMap, NetworkPolicies, Secret copies): a resync with nothing changed writes nothing.
    pub applies_skipped: usize,
    /// Stale NetworkPolicies deleted.
    pub network_policies_deleted: usize,
    /// Whether the ConfigMap was deleted (no live policy left).
    pub config_map_deleted: bool,
    /// Policy statuses written (only those that changed).
    pub statuses_written: usize,
    /// Events recorded.
    pub events_recorded: usize,
    /// Finalizers added to live policies.
    pub finalizers_added: usize,
    /// Finalizers removed from policies being deleted.
    pub finalizers_removed: usize,
    /// Sidecar Secrets copied (applied) into the namespace.
    pub secrets_copied: usize,
    /// Copies of sidecar Secrets deleted (no live policy left).
    pub secrets_deleted: usize,
}

/// Reconciles `namespace`: reads it, computes the desired state, applies it (see the module
/// documentation for the order). Returns the first failure after doing all it could.
#[tracing::instrument(name = "reconcile", skip(ctx))]
pub async fn reconcile_namespace(ctx: &Context, namespace: &str) -> Result<ReconcileOutcome, Error> {
    let mut outcome = ReconcileOutcome::default();
    let policies_api: Api<DataAccessPolicy> = Api::namespaced(ctx.client.clone(), namespace);

    let mut policies = list(&policies_api, ListParams::default(), "DataAccessPolicy", namespace).await?;
    for policy in policies.iter_mut().filter(|p| !is_deleting(p) && !has_finalizer(p)) {
        let mut finalizers = policy.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        if let Some(updated) = set_finalizers(&policies_api, policy, finalizers).await? {
            *policy = updated;
            outcome.finalizers_added += 1;
        }
    }
    let np_api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let network_policies = list(&np_api, ListParams::default(), "NetworkPolicy", namespace).await?;
    // Read for a warning only: a Service list refused (a ClusterRole older than the
    // operator) skips that check, not the reconcile.
    let services_api: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let services = match list(&services_api, ListParams::default(), "Service", namespace).await {
        Ok(services) => Some(services),
        Err(error) => {
            tracing::warn!(namespace, %error, "cannot list Services: the ProxyPortNotHttp check is skipped");
            None
        }
    };
    let mut pods = Vec::new();
    for pods_namespace in pod_namespaces(namespace, &policies) {
        if ctx.settings.watches(&pods_namespace) {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pods_namespace);
            let running = ListParams::default().fields("status.phase=Running");
            pods.extend(list(&api, running, "Pod", &pods_namespace).await?);
        }
    }

    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let current = cm_api.get_opt(CONFIG_MAP_NAME).await.map_err(|source| Error::List {
        kind: "ConfigMap",
        namespace: namespace.to_string(),
        source,
    })?;
    let current_config = current.as_ref().and_then(current_sidecar_config);
    let snapshot = NamespaceSnapshot {
        namespace: namespace.to_string(),
        policies,
        pods,
        network_policies,
        services,
        current_config,
    };
    let now = Timestamp::now();
    let mut desired = desired::compute_with(&snapshot, now, &ctx.settings.options)?;
    outcome.policies = desired.statuses.len();
    outcome.config_hash.clone_from(&desired.config_hash);

    apply_config_map(ctx, namespace, &desired, current.as_ref(), &mut outcome).await?;
    let mut failures = sync_secrets(ctx, namespace, &desired, &mut outcome).await;
    failures.extend(apply_network_policies(ctx, &snapshot, &mut desired, now, &mut outcome).await);
    let stale_failures = delete_stale(&np_api, namespace, &desired, &mut outcome).await;
    // A deleting policy's clean-up is the ConfigMap without it (applied above, or the `?`
    // returned) and its NetworkPolicy deleted (a stale one): its finalizer goes once both are
    // done, whatever else failed (another policy's NetworkPolicy refused, a Secret missing),
    // so that one broken policy does not hold every deletion of its namespace.
    let cleaned_up = stale_failures.is_empty();
    failures.extend(stale_failures);
    failures.extend(write_statuses(&policies_api, &snapshot, &desired, &mut outcome).await);
    record_events(ctx, &snapshot, &desired.events, &mut outcome).await;

    if cleaned_up {
        for name in &desired.release_finalizers {
            let Some(policy) = snapshot.policies.iter().find(|p| p.metadata.name.as_ref() == Some(name))
            else {
                continue;
            };
            let finalizers = policy.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
            if set_finalizers(&policies_api, policy, finalizers).await?.is_some() {
                outcome.finalizers_removed += 1;
            }
        }
    }
    tracing::debug!(
        namespace,
        config_hash = outcome.config_hash.as_deref().unwrap_or("-"),
        policies = outcome.policies,
        network_policies = outcome.network_policies_applied,
        statuses = outcome.statuses_written,
        events = outcome.events_recorded,
        "namespace reconciled"
    );
    match failures.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(outcome),
    }
}

async fn list<K>(
    api: &Api<K>,
    params: ListParams,
    kind: &'static str,
    namespace: &str,
) -> Result<Vec<K>, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(&params).await {
        Ok(list) => Ok(list.items),
        Err(source) => Err(Error::List { kind, namespace: namespace.to_string(), source }),
    }
}

/// Sets the finalizers of `policy` (merge patch, conditional on its resourceVersion). `None`
/// when the policy is gone already.
async fn set_finalizers(
    api: &Api<DataAccessPolicy>,
    policy: &DataAccessPolicy,
    finalizers: Vec<String>,
) -> Result<Option<DataAccessPolicy>, Error> {
    let name = policy.name_any();
    let patch = json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": policy.resource_version() }
    });
    match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(updated) => Ok(Some(updated)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(source) => {
            Err(Error::Finalizer { namespace: policy.namespace().unwrap_or_default(), name, source })
        }
    }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_not_found())
}

/// The apiserver's own words for a refusal (its message carries no object contents beyond
/// field paths), else the client error.
fn reason(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The sidecar config a `custos-config` ConfigMap holds, if it parses (the operator wrote it;
/// anything else is ignored: no policy is then carried forward).
fn current_sidecar_config(cm: &ConfigMap) -> Option<custos_api::config::SidecarConfig> {
    let text = cm.data.as_ref()?.get(custos_operator_core::names::CONFIG_KEY)?;
    serde_json::from_str(text).ok()
}

/// Applies the desired ConfigMap (or deletes it), unless `existing` (read at the start of the
/// reconcile) is already as desired.
async fn apply_config_map(
    ctx: &Context,
    namespace: &str,
    desired: &Desired,
    existing: Option<&ConfigMap>,
    outcome: &mut ReconcileOutcome,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let err = |source| Error::Apply {
        kind: "ConfigMap",
        namespace: namespace.to_string(),
        name: CONFIG_MAP_NAME.to_string(),
        source,
    };
    match &desired.config_map {
        Some(cm) => {
            if existing.is_some_and(|e| config_map_current(e, cm)) {
                outcome.applies_skipped += 1;
            } else {
                api.patch(CONFIG_MAP_NAME, &apply_params(), &Patch::Apply(cm)).await.map_err(err)?;
            }
        }
        None => outcome.config_map_deleted = delete(&api, "ConfigMap", namespace, CONFIG_MAP_NAME).await?,
    }
    Ok(())
}

/// Deletes `name` of `kind`: `Ok(true)` when it was deleted, `Ok(false)` when it was gone
/// already.
async fn delete<K>(api: &Api<K>, kind: &'static str, namespace: &str, name: &str) -> Result<bool, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(source) => {
            Err(Error::Delete { kind, namespace: namespace.to_string(), name: name.to_string(), source })
        }
    }
}

/// True when `existing` holds exactly what `desired` sets (data, labels, annotations, owner
/// references): applying it would change nothing, so the resync skips the write. Anything
/// else (an edit by someone, a field the apiserver added) is not "current" and is applied, as
/// before.
fn config_map_current(existing: &ConfigMap, desired: &ConfigMap) -> bool {
    existing.data == desired.data
        && existing.binary_data == desired.binary_data
        && same_metadata(&existing.metadata, &desired.metadata)
}

/// [`config_map_current`] for a NetworkPolicy: the same spec, labels, annotations and owners.
fn network_policy_current(existing: &NetworkPolicy, desired: &NetworkPolicy) -> bool {
    existing.spec == desired.spec && same_metadata(&existing.metadata, &desired.metadata)
}

/// [`config_map_current`] for a Secret copy: the same type, data, labels, annotations and owners.
fn secret_current(existing: &Secret, desired: &Secret) -> bool {
    existing.type_ == desired.type_
        && existing.data == desired.data
        && same_metadata(&existing.metadata, &desired.metadata)
}

/// The metadata the operator sets: labels, annotations, owner references.
fn same_metadata(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    existing.labels == desired.labels
        && existing.annotations == desired.annotations
        && existing.owner_references == desired.owner_references
}

/// `--sync-sidecar-secrets`: while the namespace has a config, each sidecar Secret of the
/// operator's namespace is server-side applied here (same type and data, labelled
/// `app.kubernetes.io/managed-by: custos`, owned by the policies like the ConfigMap); once it
/// has none, the copies are deleted. A Secret of that name without the label is the user's
/// and is left alone.
async fn sync_secrets(
    ctx: &Context,
    namespace: &str,
    desired: &Desired,
    outcome: &mut ReconcileOutcome,
) -> Vec<Error> {
    let Some(sync) = ctx.settings.secret_sync.as_ref().filter(|s| s.source_namespace != namespace) else {
        return Vec::new();
    };
    let source: Api<Secret> = Api::namespaced(ctx.client.clone(), &sync.source_namespace);
    let target: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut failures = Vec::new();
    let ours = |s: &Secret| s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
    for name in &sync.names {
        let existing = match target.get_opt(name).await {
            Ok(existing) => existing,
            Err(source) => {
                failures.push(Error::List { kind: "Secret", namespace: namespace.to_string(), source });
                continue;
            }
        };
        if existing.as_ref().is_some_and(|s| !ours(s)) {
            tracing::debug!(namespace, secret = %name, "sidecar Secret provided by the user: not copied");
            continue;
        }
        let Some(config_map) = &desired.config_map else {
            if existing.is_some() {
                match delete(&target, "Secret", namespace, name).await {
                    Ok(deleted) => outcome.secrets_deleted += usize::from(deleted),
                    Err(e) => failures.push(e),
                }
            }
            continue;
        };
        let original = match source.get_opt(name).await {
            Ok(Some(original)) => original,
            Ok(None) => {
                tracing::warn!(namespace = %sync.source_namespace, secret = %name, "sidecar Secret to copy is missing");
                failures.push(Error::MissingSecret {
                    namespace: sync.source_namespace.clone(),
                    name: name.clone(),
                });
                continue;
            }
            Err(source) => {
                failures.push(Error::List {
                    kind: "Secret",
                    namespace: sync.source_namespace.clone(),
                    source,
                });
                continue;
            }
        };
        // Only what a sidecar mounts: an original shared with other uses (a database URL
        // beside the token, say) does not spread them into every namespace with policies.
        let mut data = original.data.map(|mut data| {
            data.retain(|key, _| key == COLLECTOR_TOKEN_KEY || key == HASH_KEY_KEY);
            data
        });
        if sync.collector_token.as_ref() == Some(name) {
            data = data.map(|data| namespace_token_data(data, namespace));
        }
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())])),
                owner_references: config_map.metadata.owner_references.clone(),
                ..ObjectMeta::default()
            },
            type_: original.type_,
            data,
            ..Secret::default()
        };
        if existing.as_ref().is_some_and(|e| secret_current(e, &copy)) {
            outcome.applies_skipped += 1;
            continue;
        }
        match target.patch(name, &apply_params(), &Patch::Apply(&copy)).await {
            Ok(_) => outcome.secrets_copied += 1,
            Err(source) => failures.push(Error::Apply {
                kind: "Secret",
                namespace: namespace.to_string(),
                name: name.clone(),
                source,
            }),
        }
    }
    failures
}

/// The collector token Secret's data for `namespace`: its `token` replaced by the namespace
/// token derived from it (the rest as it is; a `token` that is not UTF-8 text is copied as is,
/// and the collector refuses it as it would the original).
fn namespace_token_data(
    mut data: BTreeMap<String, k8s_openapi::ByteString>,
    namespace: &str,
) -> BTreeMap<String, k8s_openapi::ByteString> {
    if let Some(token) =
        data.get(COLLECTOR_TOKEN_KEY).and_then(|t| std::str::from_utf8(&t.0).ok()).map(str::trim)
        && !token.is_empty()
    {
        let derived = custos_api::collector::namespace_token(token, namespace);
        data.insert(COLLECTOR_TOKEN_KEY.to_string(), k8s_openapi::ByteString(derived.into_bytes()));
    }
    data
}

/// Applies every desired NetworkPolicy; a refused one marks its policy's status and is
/// returned as a failure.
async fn apply_network_policies(
    ctx: &Context,
    snapshot: &NamespaceSnapshot,
    desired: &mut Desired,
    now: Timestamp,
    outcome: &mut ReconcileOutcome,
) -> Vec<Error> {
    let namespace = snapshot.namespace.as_str();
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let mut failures = Vec::new();
    let mut refused = Vec::new();
    for np in &desired.network_policies {
        let name = np.name_any();
        let existing = snapshot.network_policies.iter().find(|e| e.metadata.name.as_ref() == Some(&name));
        if existing.is_some_and(|e| network_policy_current(e, np)) {
            outcome.applies_skipped += 1;
            continue;
        }
        match api.patch(&name, &apply_params(), &Patch::Apply(np)).await {
            Ok(_) => outcome.network_policies_applied += 1,
            Err(source) => {
                let policy = np.labels().get(POLICY_LABEL).cloned().unwrap_or_default();
                tracing::warn!(namespace, network_policy = %name, error = %source, "NetworkPolicy refused");
                refused.push((policy, reason(&source)));
                failures.push(Error::Apply {
                    kind: "NetworkPolicy",
                    namespace: namespace.to_string(),
                    name,
                    source,
                });
            }
        }
    }
    for (policy, why) in refused {
        desired.network_policy_failed(snapshot, &policy, &why, now);
    }
    failures
}

async fn delete_stale(
    api: &Api<NetworkPolicy>,
    namespace: &str,
    desired: &Desired,
    outcome: &mut ReconcileOutcome,
) -> Vec<Error> {
    let mut failures = Vec::new();
    for name in &desired.stale_network_policies {
        match delete(api, "NetworkPolicy", namespace, name).await {
            Ok(deleted) => outcome.network_policies_deleted += usize::from(deleted),
            Err(e) => failures.push(e),
        }
    }
    failures
}

/// Patches the status of each policy whose status changed.
async fn write_statuses(
    api: &Api<DataAccessPolicy>,
    snapshot: &NamespaceSnapshot,
    desired: &Desired,
    outcome: &mut ReconcileOutcome,
) -> Vec<Error> {
    let mut failures = Vec::new();
    for (name, status) in &desired.statuses {
        let old = snapshot
            .policies
            .iter()
            .find(|p| p.metadata.name.as_ref() == Some(name) && !is_deleting(p))
            .and_then(|p| p.status.as_ref());
        if old == Some(status) {
            continue;
        }
        let patch = match status_patch(old, status) {
            Ok(patch) => patch,
            Err(source) => {
                failures.push(Error::Serialize {
                    what: format!("the status of DataAccessPolicy {name}"),
                    source,
                });
                continue;
            }
        };
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => outcome.statuses_written += 1,
            Err(e) if is_not_found(&e) => {}
            Err(source) => failures.push(Error::Status {
                namespace: snapshot.namespace.clone(),
                name: name.clone(),
                source,
            }),
        }
    }
    failures
}

/// A JSON merge patch from `old` to `new`: the new status, with `null` for the fields the old
/// one had and the new one has not (so they are removed).
fn status_patch(
    old: Option<&DataAccessPolicyStatus>,
    new: &DataAccessPolicyStatus,
) -> serde_json::Result<Value> {
    let mut status = serde_json::to_value(new)?;
    if let (Some(old), Some(fields)) = (old, status.as_object_mut())
        && let Value::Object(old_fields) = serde_json::to_value(old)?
    {
        for key in old_fields.keys() {
            fields.entry(key.clone()).or_insert(Value::Null);
        }
    }
    Ok(json!({ "status": status }))
}

async fn record_events(
    ctx: &Context,
    snapshot: &NamespaceSnapshot,
    events: &[DesiredEvent],
    outcome: &mut ReconcileOutcome,
) {
    for event in events {
        let Some(policy) = snapshot.policies.iter().find(|p| p.metadata.name.as_ref() == Some(&event.policy))
        else {
            continue;
        };
        // The reference names the policy (uid, no resourceVersion): repeats fold into a series.
        let regarding = policy.object_ref(&());
        let kube_event = Event {
            type_: match event.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: event.reason.clone(),
            note: Some(event.note.clone()),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        match ctx.recorder.publish(&kube_event, &regarding).await {
            Ok(()) => outcome.events_recorded += 1,
            Err(error) => tracing::warn!(
                namespace = %snapshot.namespace,
                policy = %event.policy,
                reason = %event.reason,
                %error,
                "cannot record Event"
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_status_patch_nulls_the_fields_that_went_away() {
        let old = DataAccessPolicyStatus {
            observed_generation: Some(1),
            config_hash: Some("sha256:aa".into()),
            selected_pods: Some(2),
            ..Default::default()
        };
        let new = DataAccessPolicyStatus {
            observed_generation: Some(2),
            selected_pods: Some(2),
            ..Default::default()
        };
        let patch = status_patch(Some(&old), &new).unwrap();
        assert_eq!(
            patch,
            json!({ "status": { "observedGeneration": 2, "selectedPods": 2, "configHash": null } })
        );
        let first = status_patch(None, &new).unwrap();
        assert_eq!(first, json!({ "status": { "observedGeneration": 2, "selectedPods": 2 } }));
    }
}
