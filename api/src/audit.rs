//! The audit event: one per request, sent by the sidecar to the collector. It carries no
//! personal data values: users are ids and attributes chosen by the policy, records are keyed
//! hashes, masked fields are counts.

pub mod json;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Mode;

/// Version of the audit event format.
pub const AUDIT_SCHEMA_VERSION: u32 = 1;

/// Whether `text` is a SHA-256 digest as the audit trail writes them (record hashes, chain
/// hashes): 64 lowercase hex digits.
pub fn is_hex_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The outcome of a decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Decision {
    /// The request was let through.
    Allow,
    /// The request was refused.
    Deny,
    /// Audit mode: the request would have been refused and was let through.
    WouldDeny,
}

impl Decision {
    /// The name used in events, metrics and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "Allow",
            Decision::Deny => "Deny",
            Decision::WouldDeny => "WouldDeny",
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The calling workload as the sidecar identified it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CallerWorkload {
    /// Namespace of the caller.
    pub namespace: String,
    /// Service account of the caller.
    pub service_account: String,
}

/// The end user as identified from a verified token.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditUser {
    /// The user id claim.
    pub id: String,
    /// The attributes the policy maps from claims (e.g. branch, role).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// One audit event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Format version, [`AUDIT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Unique event id (ULID); the collector ingests each id once.
    pub id: String,
    /// When the request arrived, RFC 3339 UTC.
    pub time: String,
    /// Cluster name, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Namespace of the protected workload.
    pub namespace: String,
    /// The policy that decided, if any selected the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The rule that decided; none when the default action applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The policy's mode when it decided.
    pub mode: Mode,
    /// Name of the protected pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The calling workload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<CallerWorkload>,
    /// The end user, when a token was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<AuditUser>,
    /// The key quotas and detectors count by: `user:<id>`, `workload:<ns>/<sa>` or `peer:<ip>`.
    pub principal: String,
    /// The principal the deciding rule's quotas counted the request by, when it is not
    /// [`AuditEvent::principal`]: a policy that verifies no users (or other tokens) counts by
    /// the calling workload or peer even where another policy's verifier named the user. The
    /// collector charges the rule's cluster-wide usage under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_principal: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Normalised request path, without the query string.
    pub path: String,
    /// Allow, Deny or WouldDeny.
    pub decision: Decision,
    /// Why, in words a machine can group by (e.g. `rule no-bulk-export denies`).
    pub reason: String,
    /// HTTP status returned to the caller.
    pub status: u16,
    /// Records in the response after filtering and capping.
    #[serde(default)]
    pub records_returned: u64,
    /// Records removed by the row filter (out of the caller's scope).
    #[serde(default)]
    pub records_filtered: u64,
    /// Records removed by the per-response cap.
    #[serde(default)]
    pub records_truncated: u64,
    /// Masked field count by data class (would-mask counts in Audit mode).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
    /// Response body bytes sent to the caller.
    #[serde(default)]
    pub bytes: u64,
    /// Time spent in the sidecar and the app, in microseconds.
    #[serde(default)]
    pub latency_us: u64,
    /// W3C trace id, when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Keyed hashes (HMAC-SHA256, hex) of the ids of the records returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub record_hashes: Vec<String>,
    /// The rules of the other enforcing policies that applied with the deciding one: when
    /// several policies constrain a request (row filters, record caps, masks, quotas), every
    /// one applies, and the event names the first by name in `policy`/`rule` (or the one whose
    /// plan refused the response) and the others here, in policy name order; at most
    /// [`MAX_ALSO_APPLIED`]. Each rule's quotas were
    /// charged this request and [`AuditEvent::records_returned`], which the collector counts
    /// as their cluster-wide usage as it does the deciding rule's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_applied: Vec<AppliedRule>,
    /// What the Audit-mode policies selecting the pod that did not decide the request would
    /// have decided (their dry runs beside the deciding policy), in policy name order; at most
    /// [`MAX_DRY_RUNS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_runs: Vec<DryRun>,
    /// Hash of the previous event in the store's chain; set by the collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
}

/// A rule of another enforcing policy that applied to the request beside the deciding one
/// ([`AuditEvent::also_applied`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedRule {
    /// The policy.
    pub policy: String,
    /// Its rule that applied.
    pub rule: String,
    /// The principal this policy counts the request by, when it is not the event's own
    /// [`AuditEvent::principal`] (a policy that verifies other tokens, or none, counts by
    /// another key: `user:<id>`, `workload:<ns>/<sa>` or `peer:<ip>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

/// Most other rules one event names in [`AuditEvent::also_applied`]: the sidecar names the
/// first this many (by policy name), and the collector refuses an event with more.
pub const MAX_ALSO_APPLIED: usize = 64;

/// Most dry runs one event carries: the sidecar records the first this many (by policy name),
/// and the collector refuses an event with more.
pub const MAX_DRY_RUNS: usize = 64;

/// The verdict of an Audit-mode policy that did not decide the request: what it would have
/// done had it been the only policy. Its rule's quotas count the request under the principal
/// its own policy identifies, in the sidecar's own buckets (a request they would refuse is
/// `WouldDeny` with reason `quota_exceeded`), and its response plan (row filter, record cap,
/// masks) is dry-run on the app's response ([`DryRun::transform`]) whenever the caller gets
/// that response whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    /// The Audit-mode policy.
    pub policy: String,
    /// Its matching rule; none when its default action would have decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The principal its policy counts the request by, when it is not the event's own
    /// [`AuditEvent::principal`] (set on the entries that are [`DryRun::charged`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// `Allow`, or `WouldDeny` for a request it would have refused.
    pub decision: Decision,
    /// Why, as a reason code: the decision's (`allow_rule`, `deny_rule`, `default_allow`,
    /// `default_deny`), or what would have refused an allowed request (`quota_exceeded`,
    /// `record_cap_exceeded`, `out_of_scope`, or why the response could not be checked, e.g.
    /// `response_not_json`; `fail_open:<code>` when the policy would have passed it on;
    /// `not_checked:<code>` when only the dry run could not read it).
    pub reason: String,
    /// Whether its rule's quotas counted this request (they would have admitted it), and the
    /// records its plan would have returned (`transform.recordsReturned`, none without a
    /// `transform`): the collector charges them to the rule's cluster-wide usage, as the
    /// sidecar charged its own dry-run counts, so that a dry-run quota holds across replicas
    /// as the enforced one will.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charged: bool,
    /// What the rule's response plan would have done to the app's response; absent when the
    /// rule has none, or the plan was not dry-run (the request or response was refused, the
    /// response had no body, did not arrive whole, or could not be checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<DryRunTransform>,
}

/// What an Audit-mode policy's response plan would have done to a response it did not decide
/// (would-be values: the caller got the deciding policy's response).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DryRunTransform {
    /// Records it would have returned.
    pub records_returned: u64,
    /// Records its row filter would have removed.
    pub records_filtered: u64,
    /// Records its per-response cap (or record quota) would have cut.
    pub records_truncated: u64,
    /// Fields it would have masked, by data class.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
}
