//! The status conditions of a DataAccessPolicy, how they are derived, and the Events their
//! changes call for.
//!
//! | type | status | reason |
//! |---|---|---|
//! | `Compiled` | True | `Compiled` |
//! | | False | `CompileError` (message: the compiler's field paths and reasons) |
//! | `NetworkPolicyApplied` | True | `Applied`, or `NotRequested` (`networkPolicy.enabled: false`, or mode Audit/Disabled) |
//! | | False | `CompileError`, or `ApplyFailed` (the apply was refused) |
//! | `Ready` | True | `Ready` |
//! | | False | the failing reason: `CompileError` or `ApplyFailed` |
//! | `SidecarBypass` | True | `NetworkPolicyAdmitsAppPort` (message: the NetworkPolicies) |
//! | | False | `NoBypass`, or `PolicyDisabled` (mode Disabled: not checked) |
//! | `SidecarMissing` | True | `PodsWithoutSidecar` (message: how many, and the first pods' names) |
//! | | False | `AllPodsInjected`, or `PolicyDisabled` (mode Disabled: not checked) |
//! | `SidecarOutdated` | True | `PodsWithOutdatedSidecar` (message: the first pods and what differs), or first `PoliciesDisagreeOnPorts` (the policies selecting some pods disagree on `proxyPort` or `appPort`: no restart advice, the injection would refuse their new pods) |
//! | | False | `SidecarsCurrent`, or `PolicyDisabled` (mode Disabled: not checked) |
//! | `ProxyPortNotHttp` | True | `MeshForwardsProxyPortOpaque` (message: the Services or pod annotations that declare it) |
//! | | False | `ProxyPortHttp`; not checked: `NoMeshIdentity` (the sidecars take no caller identity from a mesh), `ServicesUnlisted`, `PolicyDisabled` |
//! | `AuditShadowed` (mode Audit only) | True | `EnforcedPoliciesSelectPods` (message: how many pods, and the enforcing policies) |
//! | | False | `NoEnforcedPolicy` |
//!
//! `SidecarBypass`, `SidecarMissing`, `SidecarOutdated` and `ProxyPortNotHttp` are always present (False when all is well), so
//! `kubectl get -o yaml` shows that the checks ran; they are warnings and do not make `Ready`
//! False, nor does `AuditShadowed`.
//! `lastTransitionTime` changes only when a condition's status changes.

use custos_api::DataAccessPolicyStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{DesiredEvent, EventType};
use crate::names::CONFIG_MAP_NAME;

/// Condition type: the policy is compiled and its NetworkPolicy (when it wants one) applied.
pub const READY: &str = "Ready";
/// Condition type: the policy compiled into the namespace's sidecar config.
pub const COMPILED: &str = "Compiled";
/// Condition type: the policy's NetworkPolicy is applied (or not requested).
pub const NETWORK_POLICY_APPLIED: &str = "NetworkPolicyApplied";
/// Condition type: another NetworkPolicy admits traffic to the app port, around the sidecar.
pub const SIDECAR_BYPASS: &str = "SidecarBypass";

/// Condition type: some running pods the policy selects have no sidecar (created before the
/// policy selected them, or admitted while injection was off).
pub const SIDECAR_MISSING: &str = "SidecarMissing";

/// Condition type: some running pods the policy selects have a sidecar injected for other
/// settings than the policy has now (proxy port, app port, JWKS Secret): the injection fixes
/// them at pod creation, so they change only when the pods are replaced.
pub const SIDECAR_OUTDATED: &str = "SidecarOutdated";

/// Condition type: a Service or a pod annotation makes a mesh (Istio, Linkerd) forward the
/// sidecar's proxy port as opaque bytes rather than read it as HTTP; a mesh identity header
/// the caller sends then passes through (see `mesh_ports`).
pub const PROXY_PORT_NOT_HTTP: &str = "ProxyPortNotHttp";

/// Condition type (Audit-mode policies): enforcing policies select some of the same pods, where
/// they decide every request; this policy's rules are dry-run beside theirs (`dryRuns` in audit
/// events: its decision, its quotas, what its response plan would do), but not for requests they
/// deny.
pub const AUDIT_SHADOWED: &str = "AuditShadowed";

/// Reason of `Ready` True.
pub const REASON_READY: &str = "Ready";
/// Reason of `Compiled` True, and of the Normal Event when the policy's config hash changes.
pub const REASON_COMPILED: &str = "Compiled";
/// Reason of `Compiled` False (and of `NetworkPolicyApplied`/`Ready` False because of it),
/// and of the Warning Event.
pub const REASON_COMPILE_ERROR: &str = "CompileError";
/// Reason of `NetworkPolicyApplied` True.
pub const REASON_APPLIED: &str = "Applied";
/// Reason of `NetworkPolicyApplied` True when the policy wants no NetworkPolicy.
pub const REASON_NOT_REQUESTED: &str = "NotRequested";
/// Reason of `NetworkPolicyApplied` (and `Ready`) False when the apply was refused.
pub const REASON_APPLY_FAILED: &str = "ApplyFailed";
/// Reason of the Warning Event when a NetworkPolicy apply fails.
pub const REASON_NETWORK_POLICY_FAILED: &str = "NetworkPolicyApplyFailed";
/// Reason of `SidecarBypass` True.
pub const REASON_BYPASS: &str = "NetworkPolicyAdmitsAppPort";
/// Reason of `SidecarBypass` False.
pub const REASON_NO_BYPASS: &str = "NoBypass";
/// Reason of `SidecarBypass` False for a Disabled policy (not checked).
pub const REASON_POLICY_DISABLED: &str = "PolicyDisabled";
/// Reason of the Warning Event when `SidecarBypass` turns True (or names other policies).
pub const REASON_SIDECAR_BYPASS_EVENT: &str = "SidecarBypass";
/// Reason of `SidecarMissing` True.
pub const REASON_PODS_WITHOUT_SIDECAR: &str = "PodsWithoutSidecar";
/// Reason of `SidecarMissing` False.
pub const REASON_ALL_PODS_INJECTED: &str = "AllPodsInjected";
/// Reason of the Warning Event when `SidecarMissing` turns True.
pub const REASON_SIDECAR_MISSING_EVENT: &str = "SidecarMissing";
/// Reason of `SidecarOutdated` True, and of the Warning Event when it turns True.
pub const REASON_PODS_WITH_OUTDATED_SIDECAR: &str = "PodsWithOutdatedSidecar";
/// Reason of `SidecarOutdated` False.
pub const REASON_SIDECARS_CURRENT: &str = "SidecarsCurrent";
/// Reason of `SidecarOutdated` True when the policies selecting some pods disagree on the
/// sidecar's ports (before any outdated sidecar), and of the Warning Event when it turns so.
pub const REASON_POLICIES_DISAGREE: &str = "PoliciesDisagreeOnPorts";

/// Reason of `ProxyPortNotHttp` True, and of the Warning Event when it turns True or names
/// other declarations.
pub const REASON_MESH_FORWARDS_OPAQUE: &str = "MeshForwardsProxyPortOpaque";
/// Reason of `ProxyPortNotHttp` False.
pub const REASON_PROXY_PORT_HTTP: &str = "ProxyPortHttp";
/// Reason of `ProxyPortNotHttp` False when the sidecars take no caller identity from a mesh
/// (not checked: the port's protocol changes nothing they believe).
pub const REASON_NO_MESH_IDENTITY: &str = "NoMeshIdentity";
/// Reason of `ProxyPortNotHttp` False when the namespace's Services could not be listed.
pub const REASON_SERVICES_UNLISTED: &str = "ServicesUnlisted";

/// Reason of `AuditShadowed` True, and of the Warning Event when it turns True.
pub const REASON_ENFORCED_POLICIES_SELECT_PODS: &str = "EnforcedPoliciesSelectPods";
/// Reason of `AuditShadowed` False.
pub const REASON_NO_ENFORCED_POLICY: &str = "NoEnforcedPolicy";

/// Pods named in the `SidecarMissing` message; the rest are counted.
const MISSING_PODS_NAMED: usize = 5;

/// The first [`MISSING_PODS_NAMED`] of `items` joined with `separator`, then `{and} N more`
/// for the rest.
fn first_named(items: &[String], separator: &str, and: &str) -> String {
    let mut named = items.iter().take(MISSING_PODS_NAMED).cloned().collect::<Vec<_>>().join(separator);
    if items.len() > MISSING_PODS_NAMED {
        named.push_str(&format!("{and} {} more", items.len() - MISSING_PODS_NAMED));
    }
    named
}

/// Event notes are limited to 1 kB by the Events API.
const MAX_NOTE_BYTES: usize = 1024;

/// Where the policy's NetworkPolicy stands before the apply.
pub(crate) enum NetworkPolicyState {
    /// Wanted: the named NetworkPolicy is applied.
    Wanted(String),
    /// Not wanted, for the reason given.
    NotRequested(&'static str),
    /// The policy does not compile.
    CompileError,
}

/// Whether another NetworkPolicy bypasses the sidecar.
pub(crate) enum BypassState {
    /// The policy is Disabled: not checked.
    Disabled,
    /// The names of the bypassing NetworkPolicies (none: no bypass).
    Checked { app_port: u16, bypassing: Vec<String> },
}

/// Whether the selected pods have the sidecar.
pub(crate) enum SidecarState {
    /// The policy is Disabled: not checked.
    Disabled,
    /// The names of the selected running pods without the sidecar, sorted; those whose
    /// sidecar was injected for other settings, each with what differs, sorted; and those
    /// whose selecting policies disagree on the sidecar's ports, each with how, sorted.
    Checked { missing: Vec<String>, outdated: Vec<String>, disagreeing: Vec<String> },
}

/// Whether the mesh the sidecars take identities from would read the proxy port as something
/// other than HTTP.
pub(crate) enum MeshPortState {
    /// The policy is Disabled: not checked.
    Disabled,
    /// The sidecars take no caller identity from a mesh: not checked.
    NoMeshIdentity,
    /// The Services could not be listed: not checked.
    ServicesUnlisted,
    /// What declares the proxy port as not HTTP to `mesh`, one sentence each (none: nothing).
    Checked { mesh: super::MeshIdentity, proxy_port: u16, declarations: Vec<String> },
}

/// Whether enforcing policies select the pods of an Audit-mode policy.
pub(crate) enum ShadowState {
    /// Not an Audit-mode policy: no `AuditShadowed` condition.
    NotAudit,
    /// How many of the selected running pods enforcing policies also select, and those
    /// policies' names, sorted (none: not shadowed).
    Checked { pods: usize, by: Vec<String> },
}

/// What the status of one policy is derived from.
pub(crate) struct PolicyFacts<'a> {
    pub(crate) generation: Option<i64>,
    pub(crate) rule_count: usize,
    pub(crate) selected_pods: usize,
    pub(crate) config_hash: Option<&'a str>,
    /// The compiler's messages, `path: reason`, when the policy does not compile.
    pub(crate) compile_errors: Option<Vec<String>>,
    pub(crate) network_policy: NetworkPolicyState,
    pub(crate) bypass: BypassState,
    pub(crate) sidecar: SidecarState,
    pub(crate) mesh_port: MeshPortState,
    pub(crate) shadow: ShadowState,
}

/// The new status of a policy; conditions whose status does not change keep their
/// `lastTransitionTime` from `old`.
pub(crate) fn status(
    old: Option<&DataAccessPolicyStatus>,
    facts: &PolicyFacts<'_>,
    now: &Time,
) -> DataAccessPolicyStatus {
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(old, type_, ok, reason, message, facts.generation, now)
    };
    let compiled = match &facts.compile_errors {
        None => cond(COMPILED, true, REASON_COMPILED, format!("compiled into ConfigMap {CONFIG_MAP_NAME}")),
        Some(errors) => cond(COMPILED, false, REASON_COMPILE_ERROR, errors.join("; ")),
    };
    let network_policy = match &facts.network_policy {
        NetworkPolicyState::Wanted(name) => {
            cond(NETWORK_POLICY_APPLIED, true, REASON_APPLIED, format!("NetworkPolicy {name} applied"))
        }
        NetworkPolicyState::NotRequested(why) => {
            cond(NETWORK_POLICY_APPLIED, true, REASON_NOT_REQUESTED, (*why).to_string())
        }
        NetworkPolicyState::CompileError => cond(
            NETWORK_POLICY_APPLIED,
            false,
            REASON_COMPILE_ERROR,
            "not applied: the policy does not compile (a NetworkPolicy applied before is kept)".into(),
        ),
    };
    let bypass = match &facts.bypass {
        BypassState::Disabled => {
            cond(SIDECAR_BYPASS, false, REASON_POLICY_DISABLED, "mode is Disabled: not checked".into())
        }
        BypassState::Checked { app_port, bypassing } if bypassing.is_empty() => cond(
            SIDECAR_BYPASS,
            false,
            REASON_NO_BYPASS,
            format!("no other NetworkPolicy admits ingress to app port {app_port}"),
        ),
        BypassState::Checked { app_port, bypassing } => {
            let (noun, verb) =
                if bypassing.len() == 1 { ("NetworkPolicy", "admits") } else { ("NetworkPolicies", "admit") };
            cond(
                SIDECAR_BYPASS,
                true,
                REASON_BYPASS,
                format!(
                    "{noun} {} {verb} ingress to app port {app_port} of the protected pods, around the sidecar",
                    bypassing.join(", ")
                ),
            )
        }
    };
    let sidecar = match &facts.sidecar {
        SidecarState::Disabled => {
            cond(SIDECAR_MISSING, false, REASON_POLICY_DISABLED, "mode is Disabled: not checked".into())
        }
        SidecarState::Checked { missing, disagreeing, .. } if missing.is_empty() => cond(
            SIDECAR_MISSING,
            false,
            REASON_ALL_PODS_INJECTED,
            if disagreeing.is_empty() {
                format!("all {} selected running pods have the sidecar", facts.selected_pods)
            } else {
                format!(
                    "all {} selected running pods whose policies agree on the sidecar's ports have the sidecar \
                     ({} whose policies disagree: see SidecarOutdated)",
                    facts.selected_pods.saturating_sub(disagreeing.len()),
                    disagreeing.len()
                )
            },
        ),
        SidecarState::Checked { missing, .. } => {
            let names = first_named(missing, ", ", " and");
            cond(
                SIDECAR_MISSING,
                true,
                REASON_PODS_WITHOUT_SIDECAR,
                format!(
                    "{} of {} selected running pods have no sidecar ({names}): they were created before the \
                     policy selected them or while injection was off, and nothing enforces the policy in them \
                     (the NetworkPolicy, where enforced, cuts them off instead); replace them, e.g. \
                     kubectl rollout restart, to inject it",
                    missing.len(),
                    facts.selected_pods
                ),
            )
        }
    };
    let outdated = match &facts.sidecar {
        SidecarState::Disabled => {
            cond(SIDECAR_OUTDATED, false, REASON_POLICY_DISABLED, "mode is Disabled: not checked".into())
        }
        SidecarState::Checked { disagreeing, .. } if !disagreeing.is_empty() => {
            let pods = first_named(disagreeing, "; ", "; and");
            cond(
                SIDECAR_OUTDATED,
                true,
                REASON_POLICIES_DISAGREE,
                format!(
                    "{} of {} selected running pods are selected by policies that disagree on the sidecar's \
                     ports: {pods}. The injection refuses their new pods while an Enforce policy selects them \
                     (else leaves them without a sidecar): make the policies agree before replacing any pod",
                    disagreeing.len(),
                    facts.selected_pods
                ),
            )
        }
        SidecarState::Checked { outdated, .. } if outdated.is_empty() => cond(
            SIDECAR_OUTDATED,
            false,
            REASON_SIDECARS_CURRENT,
            "every selected running pod's sidecar has the policy's proxy port, app port and JWKS Secret"
                .into(),
        ),
        SidecarState::Checked { outdated, .. } => {
            let pods = first_named(outdated, "; ", "; and");
            cond(
                SIDECAR_OUTDATED,
                true,
                REASON_PODS_WITH_OUTDATED_SIDECAR,
                format!(
                    "{} of {} selected running pods have a sidecar injected for other settings than the policy's: \
                     {pods}. The injection sets them when a pod is created; replace the pods (kubectl rollout \
                     restart) for the policy's to apply",
                    outdated.len(),
                    facts.selected_pods
                ),
            )
        }
    };
    let mesh_port = match &facts.mesh_port {
        MeshPortState::Disabled => {
            cond(PROXY_PORT_NOT_HTTP, false, REASON_POLICY_DISABLED, "mode is Disabled: not checked".into())
        }
        MeshPortState::NoMeshIdentity => cond(
            PROXY_PORT_NOT_HTTP,
            false,
            REASON_NO_MESH_IDENTITY,
            "the sidecars take no caller identity from a mesh (no --caller-identity among the operator's \
             sidecar arguments): not checked"
                .into(),
        ),
        MeshPortState::ServicesUnlisted => cond(
            PROXY_PORT_NOT_HTTP,
            false,
            REASON_SERVICES_UNLISTED,
            "the operator could not list the namespace's Services: not checked".into(),
        ),
        MeshPortState::Checked { mesh, proxy_port, declarations } if declarations.is_empty() => cond(
            PROXY_PORT_NOT_HTTP,
            false,
            REASON_PROXY_PORT_HTTP,
            format!(
                "no Service port or opaque-ports annotation the operator reads makes {} forward proxy port \
                 {proxy_port} as opaque bytes",
                mesh.name()
            ),
        ),
        MeshPortState::Checked { mesh, declarations, .. } => cond(
            PROXY_PORT_NOT_HTTP,
            true,
            REASON_MESH_FORWARDS_OPAQUE,
            format!(
                "{}. The mesh's proxy then passes the caller's own {} header through, and the sidecars \
                 (--caller-identity {}) believe it: any caller could name itself any workload. Make the port \
                 HTTP to the mesh (a Service port named http-* or appProtocol: http; not in opaque-ports)",
                declarations.join("; "),
                mesh.header(),
                mesh.name()
            ),
        ),
    };
    let mut conditions = vec![compiled, network_policy, bypass, sidecar, outdated, mesh_port];
    match &facts.shadow {
        ShadowState::NotAudit => {}
        ShadowState::Checked { by, .. } if by.is_empty() => conditions.push(cond(
            AUDIT_SHADOWED,
            false,
            REASON_NO_ENFORCED_POLICY,
            "no enforcing policy selects the pods this policy selects".into(),
        )),
        ShadowState::Checked { pods, by } => {
            let noun = if by.len() == 1 { "policy" } else { "policies" };
            conditions.push(cond(
                AUDIT_SHADOWED,
                true,
                REASON_ENFORCED_POLICIES_SELECT_PODS,
                format!(
                    "{pods} of {} selected running pods are also selected by the enforcing {noun} {}: there the \
                     enforcing policies decide every request; this policy is dry-run beside them (its decisions, \
                     quotas and what it would mask, filter or cap: dryRuns in their audit events, \
                     custos_sidecar_dry_runs_total), but not for requests they deny; to see those too, set the \
                     enforcing policy itself to Audit for the trial",
                    facts.selected_pods,
                    by.join(", ")
                ),
            ));
        }
    }
    let mut status = DataAccessPolicyStatus {
        observed_generation: facts.generation,
        conditions,
        rule_count: Some(i32::try_from(facts.rule_count).unwrap_or(i32::MAX)),
        selected_pods: Some(i32::try_from(facts.selected_pods).unwrap_or(i32::MAX)),
        config_hash: facts.config_hash.map(str::to_string),
    };
    set_ready(old, &mut status, now);
    status
}

/// Marks the policy's NetworkPolicy as refused by the apiserver (`message` says why) and
/// derives `Ready` again.
pub(crate) fn network_policy_failed(
    old: Option<&DataAccessPolicyStatus>,
    status: &mut DataAccessPolicyStatus,
    message: String,
    now: &Time,
) {
    let failed = condition(
        old,
        NETWORK_POLICY_APPLIED,
        false,
        REASON_APPLY_FAILED,
        message,
        status.observed_generation,
        now,
    );
    match status.conditions.iter_mut().find(|c| c.type_ == NETWORK_POLICY_APPLIED) {
        Some(c) => *c = failed,
        None => status.conditions.push(failed),
    }
    set_ready(old, status, now);
}

/// (Re)computes `Ready` from the other conditions and puts it first.
fn set_ready(old: Option<&DataAccessPolicyStatus>, status: &mut DataAccessPolicyStatus, now: &Time) {
    status.conditions.retain(|c| c.type_ != READY);
    let failing = [COMPILED, NETWORK_POLICY_APPLIED]
        .iter()
        .filter_map(|t| status.conditions.iter().find(|c| c.type_ == *t))
        .find(|c| c.status != "True");
    let ready = match failing {
        None => condition(
            old,
            READY,
            true,
            REASON_READY,
            format!("compiled into ConfigMap {CONFIG_MAP_NAME}; NetworkPolicy in place or not requested"),
            status.observed_generation,
            now,
        ),
        Some(c) => condition(
            old,
            READY,
            false,
            &c.reason,
            format!("see the {} condition", c.type_),
            status.observed_generation,
            now,
        ),
    };
    status.conditions.insert(0, ready);
}

fn condition(
    old: Option<&DataAccessPolicyStatus>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = find(old, type_)
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        last_transition_time,
        message,
        observed_generation: generation,
        reason: reason.to_string(),
        status: status.to_string(),
        type_: type_.to_string(),
    }
}

fn find<'a>(status: Option<&'a DataAccessPolicyStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// The Events the change from `old` to `new` calls for: Warning `CompileError` when
/// `Compiled` turns False or its message changes; Normal `Compiled` when the policy compiles
/// into a config hash it was not part of before; Warning `NetworkPolicyApplyFailed` when the
/// apply is refused (anew or for another reason); Warning `SidecarBypass` when `SidecarBypass`
/// turns True or names other NetworkPolicies; Warning `SidecarMissing` when `SidecarMissing`
/// turns True (not as its count moves, which it does through every rollout); Warning
/// `MeshForwardsProxyPortOpaque` when `ProxyPortNotHttp` turns True (not as the pods it names
/// change through a rollout); Warning `EnforcedPoliciesSelectPods` when `AuditShadowed` turns True.
/// Nothing when nothing changed.
pub(crate) fn events(
    policy: &str,
    old: Option<&DataAccessPolicyStatus>,
    new: &DataAccessPolicyStatus,
) -> Vec<DesiredEvent> {
    let mut events = Vec::new();
    let mut push = |type_: EventType, reason: &str, note: &str| {
        events.push(DesiredEvent {
            policy: policy.to_string(),
            type_,
            reason: reason.to_string(),
            note: truncate(note),
        });
    };
    let same = |a: Option<&Condition>, b: &Condition| {
        a.is_some_and(|a| a.status == b.status && a.reason == b.reason && a.message == b.message)
    };
    if let Some(c) = find(Some(new), COMPILED) {
        if c.status == "False" && !same(find(old, COMPILED), c) {
            push(EventType::Warning, REASON_COMPILE_ERROR, &c.message);
        }
        let was_compiled = find(old, COMPILED).is_some_and(|o| o.status == "True");
        let hash_changed = old.and_then(|o| o.config_hash.as_deref()) != new.config_hash.as_deref();
        if c.status == "True"
            && (!was_compiled || hash_changed)
            && let Some(hash) = new.config_hash.as_deref()
        {
            push(
                EventType::Normal,
                REASON_COMPILED,
                &format!("compiled into ConfigMap {CONFIG_MAP_NAME}, config hash {hash}"),
            );
        }
    }
    if let Some(c) = find(Some(new), NETWORK_POLICY_APPLIED)
        && c.reason == REASON_APPLY_FAILED
        && !same(find(old, NETWORK_POLICY_APPLIED), c)
    {
        push(EventType::Warning, REASON_NETWORK_POLICY_FAILED, &c.message);
    }
    if let Some(c) = find(Some(new), SIDECAR_BYPASS)
        && c.status == "True"
        && !same(find(old, SIDECAR_BYPASS), c)
    {
        push(EventType::Warning, REASON_SIDECAR_BYPASS_EVENT, &c.message);
    }
    if let Some(c) = find(Some(new), SIDECAR_MISSING)
        && c.status == "True"
        && find(old, SIDECAR_MISSING).is_none_or(|o| o.status != "True")
    {
        push(EventType::Warning, REASON_SIDECAR_MISSING_EVENT, &c.message);
    }
    if let Some(c) = find(Some(new), SIDECAR_OUTDATED)
        && c.status == "True"
        && find(old, SIDECAR_OUTDATED).is_none_or(|o| o.status != "True" || o.reason != c.reason)
    {
        push(EventType::Warning, &c.reason, &c.message);
    }
    if let Some(c) = find(Some(new), PROXY_PORT_NOT_HTTP)
        && c.status == "True"
        && find(old, PROXY_PORT_NOT_HTTP).is_none_or(|o| o.status != "True")
    {
        push(EventType::Warning, REASON_MESH_FORWARDS_OPAQUE, &c.message);
    }
    if let Some(c) = find(Some(new), AUDIT_SHADOWED)
        && c.status == "True"
        && find(old, AUDIT_SHADOWED).is_none_or(|o| o.status != "True")
    {
        push(EventType::Warning, REASON_ENFORCED_POLICIES_SELECT_PODS, &c.message);
    }
    events
}

fn truncate(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_at_a_char_boundary_within_one_kilobyte() {
        let note = "é".repeat(800);
        let cut = truncate(&note);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
