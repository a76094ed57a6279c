//! Query building shared by the backends: filters, cursors and time ranges.

use chrono::{DateTime, Utc};

use crate::{Error, EventQuery, Result};

/// The condition of the partial index of the events that are not `Allow` (both backends).
pub(crate) const NOT_ALLOW: &str = "decision <> 'Allow'";

/// A bound parameter of a dynamically built statement.
#[derive(Clone, Debug)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// `[since, until)` in microseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimeRange {
    pub since: i64,
    pub until: i64,
}

impl TimeRange {
    pub(crate) fn new(since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> TimeRange {
        TimeRange {
            since: since.map_or(i64::MIN, |t| t.timestamp_micros()),
            until: until.map_or(i64::MAX, |t| t.timestamp_micros()),
        }
    }
}

/// The cursor after the row at `(time_us, seq)`: opaque to clients.
pub(crate) fn make_cursor(time_us: i64, seq: i64) -> String {
    format!("{time_us}.{seq}")
}

pub(crate) fn parse_cursor(c: &str) -> Result<(i64, i64)> {
    let (t, s) = c.split_once('.').ok_or(Error::BadCursor)?;
    Ok((t.parse().map_err(|_| Error::BadCursor)?, s.parse().map_err(|_| Error::BadCursor)?))
}

/// Builds `SELECT time_us, seq, body FROM events WHERE ... ORDER BY time_us DESC, seq DESC
/// LIMIT n`, with placeholders written by `ph` (1-based). `has_dry_run` writes the backend's
/// condition that the event's `dryRuns` hold an entry with every member of the JSON object
/// bound to the placeholder it is given.
pub(crate) fn events_sql(
    q: &EventQuery,
    cursor: Option<(i64, i64)>,
    limit: i64,
    ph: fn(usize) -> String,
    has_dry_run: fn(&str) -> String,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    let mut push = |conds: &mut Vec<String>, col: &str, op: &str, p: Param| {
        params.push(p);
        conds.push(format!("{col} {op} {}", ph(params.len())));
    };
    if let Some(v) = &q.namespace {
        push(&mut conds, "namespace", "=", Param::Text(v.clone()));
    }
    if let Some(v) = &q.policy {
        push(&mut conds, "policy", "=", Param::Text(v.clone()));
    }
    if let Some(v) = &q.principal {
        push(&mut conds, "principal", "=", Param::Text(v.clone()));
    }
    if let Some(v) = q.decision {
        push(&mut conds, "decision", "=", Param::Text(v.as_str().to_owned()));
        if v != custos_api::Decision::Allow {
            // Implied, but spelled out so that the index of the non-Allow events (a partial
            // index) is usable with a bound parameter.
            conds.push(NOT_ALLOW.to_owned());
        }
    }
    if let Some(t) = q.since {
        push(&mut conds, "time_us", ">=", Param::Int(t.timestamp_micros()));
    }
    if let Some(t) = q.until {
        push(&mut conds, "time_us", "<", Param::Int(t.timestamp_micros()));
    }
    if let Some((t, seq)) = cursor {
        // Keyset pagination: strictly after (time_us, seq) in descending order. The first
        // comparison lets the planner bound the index range.
        push(&mut conds, "time_us", "<=", Param::Int(t));
        params.push(Param::Int(t));
        let pt = ph(params.len());
        params.push(Param::Int(seq));
        let ps = ph(params.len());
        conds.push(format!("(time_us < {pt} OR seq < {ps})"));
    }
    if q.dry_run_policy.is_some() || q.dry_run_decision.is_some() {
        let mut entry = serde_json::Map::new();
        if let Some(policy) = &q.dry_run_policy {
            entry.insert("policy".into(), policy.clone().into());
        }
        if let Some(decision) = q.dry_run_decision {
            entry.insert("decision".into(), decision.as_str().into());
        }
        params.push(Param::Text(serde_json::Value::Object(entry).to_string()));
        // The text test first: most events have no dry run, and need not be parsed.
        conds.push(format!("body LIKE '%\"dryRuns\":%' AND {}", has_dry_run(&ph(params.len()))));
    }
    params.push(Param::Int(limit));
    let pl = ph(params.len());
    let where_ = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
    (
        format!("SELECT time_us, seq, body FROM events {where_} ORDER BY time_us DESC, seq DESC LIMIT {pl}"),
        params,
    )
}
