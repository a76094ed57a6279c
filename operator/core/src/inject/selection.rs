//! Which policies select a pod, and what the sidecar needs to know about them.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use custos_api::DataAccessPolicy;
use custos_api::policy::Mode;
use k8s_openapi::api::core::v1::Container;

use crate::selector::selector_matches;

/// The policies of `namespace` that select a pod labelled `labels`: mode not `Disabled`, not
/// being deleted, selector matching. Sorted by name, without duplicates.
pub(super) fn selecting_policies<'a, P: Borrow<DataAccessPolicy>>(
    policies: &'a [P],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a DataAccessPolicy> {
    let mut selecting: Vec<&DataAccessPolicy> = policies
        .iter()
        .map(Borrow::borrow)
        .filter(|p| p.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.metadata.name.as_deref().is_some_and(|n| !n.is_empty()))
        .filter(|p| p.spec.mode != Mode::Disabled)
        .filter(|p| selector_matches(&p.spec.workload.selector, labels))
        .collect();
    selecting.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    selecting.dedup_by(|a, b| a.metadata.name == b.metadata.name);
    selecting
}

/// The JWKS Secrets the selecting policies verify tokens with, sorted, without duplicates.
pub(super) fn jwks_secrets(policies: &[&DataAccessPolicy]) -> Vec<String> {
    let mut secrets: Vec<String> = policies
        .iter()
        .filter_map(|p| p.spec.identity.as_ref()?.users.as_ref()?.jwt.jwks_secret_ref.as_ref())
        .map(|r| r.name.clone())
        .filter(|name| !name.is_empty())
        .collect();
    secrets.sort();
    secrets.dedup();
    secrets
}

/// The first TCP `containerPort` of the first app container that declares one.
pub(super) fn first_app_port(containers: &[Container]) -> Option<u16> {
    containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto.eq_ignore_ascii_case("TCP")))
        .find_map(|p| u16::try_from(p.container_port).ok().filter(|port| *port != 0))
}
