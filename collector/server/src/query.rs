//! The query endpoints: `GET /v1/events`, `/v1/subjects/{hash}`, `/v1/top`, `/v1/alerts`,
//! `/v1/usage` and `/v1/verify`.
//!
//! Parameters are checked strictly: an unknown or repeated parameter, or a malformed value
//! (one holding a NUL character included), is a 400 `bad_query` naming the parameter (values
//! are never echoed).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use custos_api::Decision;
use custos_api::collector::UsageResponse;
use custos_store::{Alert, EventQuery, MAX_LIMIT, Page, SubjectAccess, TopBy, TopEntry, VerifyReport};
use http::{StatusCode, Uri};
use serde::Serialize;

use crate::duration::parse_duration;
use crate::error::{ApiError, reason};
use crate::state::CollectorState;

/// The decoded query string of one request.
#[derive(Debug, Default)]
pub(crate) struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    /// Decodes the query string, refusing parameters not in `allowed` and repeated ones.
    pub(crate) fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut values = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if !allowed.contains(&name.as_ref()) {
                let shown = if name.len() <= 32
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    name.to_string()
                } else {
                    "?".to_owned()
                };
                return Err(ApiError::bad_query(
                    &shown,
                    format!("unknown parameter `{shown}` (accepted: {})", allowed.join(", ")),
                ));
            }
            if value.contains('\0') {
                // PostgreSQL refuses such text (SQLSTATE 22021): the client's error, not the
                // store's.
                return Err(ApiError::bad_query(
                    &name,
                    format!("parameter `{name}` must not contain a NUL character (%00)"),
                ));
            }
            if values.insert(name.to_string(), value.into_owned()).is_some() {
                return Err(ApiError::bad_query(&name, format!("parameter `{name}` is given twice")));
            }
        }
        Ok(Params { values })
    }

    /// A parameter's value; an empty value counts as absent.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name).ok_or_else(|| ApiError::bad_query(name, format!("parameter `{name}` is required")))
    }

    /// A time: RFC 3339, or a duration (`15m`, `24h`, `7d`) meaning that long before `now`.
    pub(crate) fn time(&self, name: &str, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, ApiError> {
        let Some(value) = self.get(name) else { return Ok(None) };
        parse_time(value, now).map(Some).map_err(|what| {
            ApiError::bad_query(
                name,
                format!(
                    "parameter `{name}` must be an RFC 3339 time or a duration like 15m, 24h, 7d: {what}"
                ),
            )
        })
    }

    /// `limit`: 1 to [`MAX_LIMIT`]; absent means the store's default.
    pub(crate) fn limit(&self) -> Result<u32, ApiError> {
        let Some(value) = self.get("limit") else { return Ok(0) };
        match value.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_query(
                "limit",
                format!("parameter `limit` must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }
}

/// Parses an RFC 3339 time or a relative duration before `now`.
pub(crate) fn parse_time(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if value.starts_with(|c: char| c.is_ascii_digit()) && !value.contains([':', 'T']) {
        let d = parse_duration(value)?;
        let d = chrono::TimeDelta::from_std(d).map_err(|_| "duration out of range".to_owned())?;
        return now.checked_sub_signed(d).ok_or_else(|| "duration out of range".to_owned());
    }
    Err("not an RFC 3339 time".to_owned())
}

fn parse_decision(value: &str) -> Option<Decision> {
    [Decision::Allow, Decision::Deny, Decision::WouldDeny]
        .into_iter()
        .find(|d| d.as_str().eq_ignore_ascii_case(value))
}

fn check_range(since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    match (since, until) {
        (Some(s), Some(u)) if s >= u => {
            Err(ApiError::bad_query("until", "`until` must be later than `since`"))
        }
        _ => Ok(()),
    }
}

/// `GET /v1/events`.
pub(crate) async fn events(State(state): State<CollectorState>, uri: Uri) -> Result<Json<Page>, ApiError> {
    let p = Params::parse(
        uri.query(),
        &[
            "namespace",
            "policy",
            "principal",
            "decision",
            "dryRunPolicy",
            "dryRunDecision",
            "since",
            "until",
            "limit",
            "cursor",
        ],
    )?;
    let now = Utc::now();
    let decision = match p.get("decision") {
        None => None,
        Some(d) => Some(parse_decision(d).ok_or_else(|| {
            ApiError::bad_query("decision", "parameter `decision` must be Allow, Deny or WouldDeny")
        })?),
    };
    let dry_run_decision = match p.get("dryRunDecision") {
        None => None,
        Some(d) => Some(parse_decision(d).filter(|d| *d != Decision::Deny).ok_or_else(|| {
            ApiError::bad_query("dryRunDecision", "parameter `dryRunDecision` must be Allow or WouldDeny")
        })?),
    };
    let q = EventQuery {
        namespace: p.get("namespace").map(str::to_owned),
        policy: p.get("policy").map(str::to_owned),
        principal: p.get("principal").map(str::to_owned),
        decision,
        dry_run_policy: p.get("dryRunPolicy").map(str::to_owned),
        dry_run_decision,
        since: p.time("since", now)?,
        until: p.time("until", now)?,
        limit: p.limit()?,
        cursor: p.get("cursor").map(str::to_owned),
    };
    check_range(q.since, q.until)?;
    Ok(Json(state.report("query", move |store| async move { store.query(&q).await }).await?))
}

/// The answer of `GET /v1/subjects/{hash}`.
#[derive(Serialize)]
pub(crate) struct SubjectAnswer {
    subject: String,
    accesses: Vec<SubjectAccess>,
}

/// `GET /v1/subjects/{hash}`.
pub(crate) async fn subject(
    State(state): State<CollectorState>,
    hash: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<SubjectAnswer>, ApiError> {
    let bad_hash = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            reason::BAD_SUBJECT_HASH,
            "the subject must be a keyed record hash: 64 lowercase hex characters",
        )
    };
    let Path(hash) = hash.map_err(|_| bad_hash())?;
    if !custos_api::audit::is_hex_digest(&hash) {
        return Err(bad_hash());
    }
    let p = Params::parse(uri.query(), &["since", "until", "limit"])?;
    let now = Utc::now();
    let (since, until) = (p.time("since", now)?, p.time("until", now)?);
    check_range(since, until)?;
    let limit = p.limit()?;
    let key = hash.clone();
    let accesses = state
        .report("subject", move |store| async move { store.subject(&key, since, until, limit).await })
        .await?;
    Ok(Json(SubjectAnswer { subject: hash, accesses }))
}

/// The answer of `GET /v1/top`.
#[derive(Serialize)]
pub(crate) struct TopAnswer {
    by: TopBy,
    entries: Vec<TopEntry>,
}

/// `GET /v1/top`.
pub(crate) async fn top(State(state): State<CollectorState>, uri: Uri) -> Result<Json<TopAnswer>, ApiError> {
    let p = Params::parse(uri.query(), &["by", "since", "limit"])?;
    let by = match p.get("by") {
        None | Some("records") => TopBy::Records,
        Some("denials") => TopBy::Denials,
        Some(_) => return Err(ApiError::bad_query("by", "parameter `by` must be records or denials")),
    };
    let since = p.time("since", Utc::now())?;
    let limit = p.limit()?;
    let entries = state.report("top", move |store| async move { store.top(by, since, limit).await }).await?;
    Ok(Json(TopAnswer { by, entries }))
}

/// The answer of `GET /v1/alerts`.
#[derive(Serialize)]
pub(crate) struct AlertsAnswer {
    alerts: Vec<Alert>,
}

/// `GET /v1/alerts`.
pub(crate) async fn alerts(
    State(state): State<CollectorState>,
    uri: Uri,
) -> Result<Json<AlertsAnswer>, ApiError> {
    let p = Params::parse(uri.query(), &["since", "limit"])?;
    let since = p.time("since", Utc::now())?;
    let limit = p.limit()?;
    let alerts = state.report("alerts", move |store| async move { store.alerts(since, limit).await }).await?;
    Ok(Json(AlertsAnswer { alerts }))
}

/// `GET /v1/usage`.
pub(crate) async fn usage(
    State(state): State<CollectorState>,
    axum::Extension(scope): axum::Extension<crate::auth::Scope>,
    uri: Uri,
) -> Result<Json<UsageResponse>, ApiError> {
    let p = Params::parse(uri.query(), &["policy", "principal", "namespace", "instance"])?;
    let policy = p.required("policy")?;
    let principal = p.required("principal")?;
    let instance = p.get("instance");
    if instance.is_some_and(|i| !custos_api::collector::is_instance_tag(i)) {
        return Err(ApiError::bad_query(
            "instance",
            "parameter `instance` must be an instance tag: 8 characters of Crockford's base32 (0-9, A-Z but I, L, O, U)",
        ));
    }
    let mut namespace = p.get("namespace");
    // A namespace token reads its own namespace's usage only.
    if let crate::auth::Scope::Namespace(own) = &scope {
        if namespace.is_some_and(|n| n != own) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                crate::error::reason::WRONG_NAMESPACE,
                format!("a namespace token of {own} reads the usage of {own} only"),
            ));
        }
        namespace = Some(own.as_str());
    }
    let answer =
        state.timed("usage", state.store().usage(namespace, policy, principal, Utc::now(), instance)).await?;
    Ok(Json(answer))
}

/// `GET /v1/verify`: 200 with the report whether or not the chain is intact.
pub(crate) async fn verify(
    State(state): State<CollectorState>,
    uri: Uri,
) -> Result<Json<VerifyReport>, ApiError> {
    let p = Params::parse(uri.query(), &["from", "expect"])?;
    let expect = match p.get("expect") {
        None => None,
        Some(v) => Some(
            custos_api::collector::parse_expected_link(v)
                .map_err(|why| ApiError::bad_query("expect", format!("parameter `expect`: {why}")))?,
        ),
    };
    let from =
        match p.get("from") {
            None => None,
            Some(v) => Some(v.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::bad_query("from", "parameter `from` must be a sequence number >= 1")
            })?),
        };
    if let Some(from) = from {
        // Past the head there is nothing to walk, and the walk would report the rows before
        // `from` as deleted.
        let head = state.timed("head", state.store().head()).await?;
        if from > head.seq + 1 {
            return Err(ApiError::bad_query(
                "from",
                format!("parameter `from` is past the chain head (seq {})", head.seq),
            ));
        }
    }
    let report = state
        .report("verify", move |store| async move { store.verify_expecting(from, expect).await })
        .await?;
    if let Some(broken) = &report.first_broken {
        tracing::warn!(seq = broken.seq, kind = ?broken.kind, "verify: the audit chain is broken");
    }
    Ok(Json(report))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone;

    #[test]
    fn times_are_rfc3339_or_relative() {
        let now = Utc.with_ymd_and_hms(2025, 6, 2, 0, 0, 0).unwrap();
        assert_eq!(
            parse_time("2025-06-01T12:00:00Z", now).unwrap(),
            Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
        );
        assert_eq!(
            parse_time("2025-06-01T14:00:00+02:00", now).unwrap(),
            Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
        );
        assert_eq!(parse_time("24h", now).unwrap(), Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap());
        assert_eq!(parse_time("15m", now).unwrap(), Utc.with_ymd_and_hms(2025, 6, 1, 23, 45, 0).unwrap());
        assert_eq!(parse_time("7d", now).unwrap(), Utc.with_ymd_and_hms(2025, 5, 26, 0, 0, 0).unwrap());
        for bad in ["yesterday", "2025-06-01", "12:00", "-1h", "5", ""] {
            assert!(parse_time(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn params_refuse_unknown_repeated_and_bad_values() {
        let p = Params::parse(Some("since=1h&limit=5&namespace="), &["since", "limit", "namespace"]).unwrap();
        assert_eq!(p.limit().unwrap(), 5);
        assert_eq!(p.get("namespace"), None);
        let e = Params::parse(Some("sincee=1h"), &["since"]).unwrap_err();
        assert_eq!(e.field("parameter").unwrap(), "sincee");
        let e = Params::parse(Some("since=1h&since=2h"), &["since"]).unwrap_err();
        assert_eq!(e.reason(), reason::BAD_QUERY);
        for limit in ["0", "-1", "x", "10001"] {
            let p = Params::parse(Some(&format!("limit={limit}")), &["limit"]).unwrap();
            assert_eq!(p.limit().unwrap_err().field("parameter").unwrap(), "limit");
        }
        assert!(parse_decision("wouldDeny").is_some());
        assert!(parse_decision("Maybe").is_none());
    }

    /// A NUL character (`%00`) in a value is the client's error, named by its parameter:
    /// PostgreSQL refuses such text (SQLSTATE 22021), which answered 503 `store_unavailable`.
    #[test]
    fn nul_characters_in_values_are_a_bad_query() {
        for query in ["principal=%00", "policy=p&principal=user:a%00b", "since=1h%00"] {
            let e = Params::parse(Some(query), &["policy", "principal", "since"]).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(e.reason(), reason::BAD_QUERY, "{query}");
            let name = if query.starts_with("since") { "since" } else { "principal" };
            assert_eq!(e.field("parameter").unwrap(), name, "{query}");
            assert!(e.message().contains("NUL"), "{}", e.message());
            assert!(!e.message().contains("user:a"), "{}", e.message());
        }
        // A NUL in a name is an unknown parameter, not shown.
        let e = Params::parse(Some("princ%00ipal=x"), &["principal"]).unwrap_err();
        assert_eq!(e.field("parameter").unwrap(), "?");
    }

    #[test]
    fn record_hashes_are_64_lowercase_hex() {
        assert!(custos_api::audit::is_hex_digest(&"a1".repeat(32)));
        assert!(!custos_api::audit::is_hex_digest(&"A1".repeat(32)));
        assert!(!custos_api::audit::is_hex_digest(&"a1".repeat(31)));
        assert!(!custos_api::audit::is_hex_digest(&"g1".repeat(32)));
    }
}
