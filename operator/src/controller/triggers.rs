//! Which namespaces a change of a watched object concerns. A pod concerns its own namespace
//! (selected pod counts, bypass checks) and every namespace with a policy whose rule sources
//! name the pod's namespace (the identity table). Matching on the namespace alone, not on
//! the source's labels or service account, also catches a pod whose labels changed away
//! from a source: its old entry must leave the table.

use std::collections::BTreeSet;

use custos_api::DataAccessPolicy;
use custos_api::policy::Mode;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

/// The namespaces of `policies` that a change of a pod in `pod_namespace` concerns.
pub(crate) fn namespaces_for_pod<'a>(
    pod_namespace: &str,
    policies: impl IntoIterator<Item = &'a DataAccessPolicy>,
) -> BTreeSet<String> {
    let mut namespaces = BTreeSet::new();
    for policy in policies {
        let Some(ns) = policy.metadata.namespace.as_deref() else { continue };
        if namespaces.contains(ns) {
            continue;
        }
        let names_pod_namespace = policy.spec.mode != Mode::Disabled
            && policy
                .spec
                .rules
                .iter()
                .filter_map(|r| r.from.as_ref())
                .flat_map(|f| f.workloads.iter())
                .any(|w| w.namespace.as_deref().unwrap_or(ns) == pod_namespace);
        if ns == pod_namespace || names_pod_namespace {
            namespaces.insert(ns.to_string());
        }
    }
    namespaces
}

/// Whether an event of the metadata watch on the operator's namespace's Secrets means the
/// copies may be stale, so every namespace must be reconciled: one of the `originals` was
/// created, changed or deleted, or the watch listed again (it may have missed a change).
/// The initial listing's objects do not count: the controllers reconcile everything on start.
pub(crate) fn secret_event_wakes<K: ResourceExt>(event: &Event<K>, originals: &[String]) -> bool {
    match event {
        Event::Apply(object) | Event::Delete(object) => originals.iter().any(|n| *n == object.name_any()),
        Event::InitDone => true,
        Event::Init | Event::InitApply(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(ns: &str, name: &str, sources: serde_json::Value) -> DataAccessPolicy {
        serde_json::from_value(json!({
            "apiVersion": "custos.dev/v1alpha1",
            "kind": "DataAccessPolicy",
            "metadata": { "name": name, "namespace": ns },
            "spec": {
                "workload": { "selector": { "matchLabels": { "app": name } }, "appPort": 8080 },
                "rules": [ { "name": "r", "action": "Allow", "from": { "workloads": sources } } ]
            }
        }))
        .expect("a policy")
    }

    #[test]
    fn a_pod_concerns_its_namespace_and_those_whose_sources_name_it() {
        let policies = [
            policy("shop", "orders", json!([{ "serviceAccount": "portal" }])),
            policy("billing", "invoices", json!([{ "namespace": "shop", "labels": { "app": "x" } }])),
            policy("hr", "people", json!([{ "namespace": "hr" }])),
        ];
        let got: Vec<_> = namespaces_for_pod("shop", &policies).into_iter().collect();
        assert_eq!(got, ["billing", "shop"]);
        let got: Vec<_> = namespaces_for_pod("hr", &policies).into_iter().collect();
        assert_eq!(got, ["hr"]);
        assert!(namespaces_for_pod("elsewhere", &policies).is_empty());
    }

    #[test]
    fn disabled_policies_name_no_sources() {
        let mut p = policy("billing", "invoices", json!([{ "namespace": "shop" }]));
        p.spec.mode = Mode::Disabled;
        assert!(namespaces_for_pod("shop", &[p]).is_empty());
    }

    #[test]
    fn only_events_of_the_originals_wake_the_controllers() {
        use k8s_openapi::api::core::v1::Secret;
        use kube::runtime::watcher::Event;

        let originals = vec!["custos-collector-token".to_string(), "custos-hash-key".to_string()];
        let secret = |name: &str| Secret {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        assert!(secret_event_wakes(&Event::Apply(secret("custos-hash-key")), &originals), "rotated");
        assert!(secret_event_wakes(&Event::Delete(secret("custos-collector-token")), &originals), "deleted");
        assert!(!secret_event_wakes(&Event::Apply(secret("custos-operator-webhook-tls")), &originals));
        assert!(!secret_event_wakes(&Event::Delete(secret("other")), &originals));
        assert!(!secret_event_wakes(&Event::InitApply(secret("custos-hash-key")), &originals), "listing");
        assert!(!secret_event_wakes(&Event::<Secret>::Init, &originals));
        assert!(secret_event_wakes(&Event::<Secret>::InitDone, &originals), "a re-list may hide a change");
    }
}
