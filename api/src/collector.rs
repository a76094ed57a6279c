//! The wire contract between sidecars and the collector.
//!
//! - `POST /v1/events`: a batch of [`AuditEvent`](crate::AuditEvent)s as NDJSON (one event per
//!   line; `Content-Type: application/x-ndjson`, optionally `Content-Encoding: gzip`) or a
//!   JSON array, with `Authorization: Bearer <token>`. The collector answers 200 with an
//!   [`IngestResponse`] only after the batch is durably committed; ingest is idempotent by
//!   event id, so a sender that did not see the answer resends the whole batch.
//! - `GET /v1/usage?policy=NAME&principal=KEY[&namespace=NS][&instance=TAG]`: a principal's
//!   cluster-wide usage, as a [`UsageResponse`], so that replicas of one workload share their
//!   quotas; with `instance`, the counts are also given without the events of that sidecar
//!   process (their ids carry its tag, [`instance_of_event_id`]).
//!
//! # Tokens
//!
//! The collector token (`--token-file`) may do everything. A *namespace token*
//! ([`namespace_token`]), derived from it for one namespace, may only send that namespace's
//! events (`POST /v1/events`, `POST /v1/logs`) and read its usage: the operator gives each
//! namespace's sidecars one, so a token read from one namespace neither writes events in the
//! name of another nor reads anybody's audit trail.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Parses `SEQ:HASH`, a chain position recorded earlier (`custos audit verify --expect`,
/// `GET /v1/verify?expect=`): a sequence number and a 64-digit lowercase hex hash.
pub fn parse_expected_link(text: &str) -> Result<(u64, String), &'static str> {
    let (seq, hash) = text.split_once(':').ok_or("expected SEQ:HASH")?;
    let seq = seq.parse::<u64>().map_err(|_| "SEQ must be a sequence number")?;
    if !crate::audit::is_hex_digest(hash) {
        return Err("HASH must be 64 lowercase hex digits");
    }
    Ok((seq, hash.to_owned()))
}

/// Prefix of a [`namespace_token`].
pub const NAMESPACE_TOKEN_PREFIX: &str = "custos-ns.";

/// The namespace token of `namespace` for the collector token `token`:
/// `custos-ns.<namespace>.<hex HMAC-SHA256(token, "custos/collector/namespace-token/v1\n" + namespace)>`.
/// Namespaces are DNS labels (no `.`), so the token reads back unambiguously
/// ([`parse_namespace_token`]).
pub fn namespace_token(token: &str, namespace: &str) -> String {
    format!("{NAMESPACE_TOKEN_PREFIX}{namespace}.{}", hex::encode(namespace_mac(token, namespace)))
}

/// The HMAC of a namespace token.
pub fn namespace_mac(token: &str, namespace: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"custos/collector/namespace-token/v1\n");
    mac.update(namespace.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The namespace and the HMAC a presented namespace token claims, unchecked; `None` when it
/// is not shaped as one.
pub fn parse_namespace_token(presented: &str) -> Option<(&str, [u8; 32])> {
    let rest = presented.strip_prefix(NAMESPACE_TOKEN_PREFIX)?;
    let (namespace, mac) = rest.rsplit_once('.')?;
    if namespace.is_empty() || namespace.len() > 63 || mac.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(mac, &mut bytes).ok()?;
    Some((namespace, bytes))
}

/// Path of the batch ingest endpoint.
pub const EVENTS_PATH: &str = "/v1/events";
/// Path of the usage endpoint.
pub const USAGE_PATH: &str = "/v1/usage";

/// The collector's answer to an accepted batch.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IngestResponse {
    /// Events stored by this request.
    pub accepted: u64,
    /// Events already stored before (same id), not stored again.
    pub duplicates: u64,
    /// Events older than what the collector's retention has already deleted: acknowledged,
    /// not stored (left out when 0, and absent from older collectors' answers).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expired: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Usage of one principal under one policy, cluster-wide, per rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageResponse {
    /// The policy asked about.
    pub policy: String,
    /// The principal asked about (`user:<id>`, `workload:<ns>/<sa>` or `peer:<ip>`).
    pub principal: String,
    /// When the counts were computed, RFC 3339 UTC.
    pub as_of: String,
    /// Counts by rule name.
    pub rules: BTreeMap<String, RuleUsage>,
    /// The instance tag the request named, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// With an `instance`: the counts by rule without the events that instance (one sidecar
    /// process) sent, i.e. the other replicas' usage as the collector has it, including its
    /// earlier processes' (a restarted container's). Absent from older collectors' answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_without_instance: Option<BTreeMap<String, RuleUsage>>,
}

/// Characters of an instance tag.
pub const INSTANCE_TAG_LEN: usize = 8;

/// Whether `text` is an instance tag: 8 characters of Crockford's base32 as ULIDs write them
/// (digits and uppercase letters but I, L, O, U).
pub fn is_instance_tag(text: &str) -> bool {
    text.len() == INSTANCE_TAG_LEN
        && text.bytes().all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

/// The instance tag an event id carries (its characters 11 to 18), when it is shaped as a
/// ULID: a sidecar's events carry its process's tag there.
pub fn instance_of_event_id(id: &str) -> Option<&str> {
    (id.len() == 26).then(|| id.get(10..18)).flatten().filter(|t| is_instance_tag(t))
}

/// Request and record counts of one principal under one rule, over trailing windows ending
/// at `as_of`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuleUsage {
    /// Requests in the last 60 seconds.
    pub requests_last_minute: u64,
    /// Records returned in the last hour.
    pub records_last_hour: u64,
    /// Records returned in the last 24 hours.
    pub records_last_day: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_tokens_read_back_and_differ_by_namespace_and_token() {
        let t = namespace_token("s3cret", "shop");
        assert!(t.starts_with("custos-ns.shop.") && t.len() == "custos-ns.shop.".len() + 64, "{t}");
        let (ns, mac) = parse_namespace_token(&t).expect("parses");
        assert_eq!((ns, mac), ("shop", namespace_mac("s3cret", "shop")));
        assert_ne!(namespace_token("s3cret", "shop"), namespace_token("s3cret", "logistics"));
        assert_ne!(namespace_token("s3cret", "shop"), namespace_token("other", "shop"));
        for bad in [
            "s3cret",
            "custos-ns.",
            "custos-ns.shop",
            "custos-ns..abc",
            "custos-ns.shop.zz",
            &t[..t.len() - 1],
        ] {
            assert!(parse_namespace_token(bad).is_none(), "{bad}");
        }
    }
}
