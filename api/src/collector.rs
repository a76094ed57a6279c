//! The wire contract between sidecars and the collector.
//!
//! - `POST /v1/events`: a batch of [`AuditEvent`](crate::AuditEvent)s as NDJSON (one event per
//!   line; `Content-Type: application/x-ndjson`, optionally `Content-Encoding: gzip`) or a
//!   JSON array, with `Authorization: Bearer <token>`. The collector answers 200 with an
//!   [`IngestResponse`] only after the batch is durably committed; ingest is idempotent by
//!   event id, so a sender that did not see the answer resends the whole batch.
//! - `GET /v1/usage?policy=NAME&principal=KEY[&namespace=NS]`: a principal's cluster-wide
//!   usage, as a [`UsageResponse`], so that replicas of one workload share their quotas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
