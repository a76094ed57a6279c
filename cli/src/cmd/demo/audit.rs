//! What the audit store says about the replay: events per phase with their record and mask
//! counts, the alerts, the accesses to the sample customer, and the chain verification.

use std::collections::BTreeMap;

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use custos_api::{AuditEvent, Decision};
use custos_store::{Alert, AnyStore, EventQuery, MAX_LIMIT, SubjectAccess, VerifyReport};
use serde::Serialize;

use super::phase::Phase;

/// Counts of one phase's stored events.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EventCounts {
    /// Events stored.
    pub(crate) events: u64,
    /// Allow decisions.
    pub(crate) allow: u64,
    /// Deny decisions.
    pub(crate) deny: u64,
    /// WouldDeny decisions (Audit mode).
    pub(crate) would_deny: u64,
    /// Records returned.
    pub(crate) records_returned: u64,
    /// Records removed by row filters.
    pub(crate) records_filtered: u64,
    /// Records cut by per-response caps.
    pub(crate) records_truncated: u64,
    /// Masked (or would-mask) fields by data class.
    pub(crate) masked: BTreeMap<String, u64>,
}

impl EventCounts {
    fn add(&mut self, e: &AuditEvent) {
        self.events += 1;
        match e.decision {
            Decision::Allow => self.allow += 1,
            Decision::Deny => self.deny += 1,
            Decision::WouldDeny => self.would_deny += 1,
        }
        self.records_returned += e.records_returned;
        self.records_filtered += e.records_filtered;
        self.records_truncated += e.records_truncated;
        for (class, n) in &e.masked {
            *self.masked.entry(class.clone()).or_default() += n;
        }
    }

    /// Masked fields of every class.
    pub(crate) fn masked_total(&self) -> u64 {
        self.masked.values().sum()
    }
}

/// Everything the report reads from the store.
pub(crate) struct Findings {
    /// Event counts, by phase key.
    pub(crate) counts: BTreeMap<&'static str, EventCounts>,
    /// Every alert, oldest first.
    pub(crate) alerts: Vec<Alert>,
    /// Accesses to the sample customer, oldest first.
    pub(crate) accesses: Vec<SubjectAccess>,
    /// The chain verification.
    pub(crate) verify: VerifyReport,
}

fn store_error(e: custos_store::Error) -> anyhow::Error {
    anyhow!("the audit store failed: {e}")
}

/// The phase an event belongs to: the normal traffic before `incidents_start`, afterwards the
/// incident whose callers include the event's principal.
pub(crate) fn phase_of<'p>(phases: &'p [Phase], principal: &str, after_start: bool) -> Option<&'p Phase> {
    let (normal, incidents) = phases.split_first()?;
    if !after_start {
        return Some(normal);
    }
    incidents.iter().find(|p| p.principals.contains(principal))
}

/// Reads the store.
pub(crate) async fn read(
    store: &AnyStore,
    phases: &[Phase],
    incidents_start: DateTime<Utc>,
    subject_hash: &str,
) -> anyhow::Result<Findings> {
    let mut counts: BTreeMap<&'static str, EventCounts> =
        phases.iter().map(|p| (p.key, EventCounts::default())).collect();
    let mut query = EventQuery { limit: MAX_LIMIT, ..EventQuery::default() };
    loop {
        let page = store.query(&query).await.map_err(store_error)?;
        for event in &page.events {
            let after = DateTime::parse_from_rfc3339(&event.time).is_ok_and(|t| t >= incidents_start);
            if let Some(phase) = phase_of(phases, &event.principal, after) {
                counts.entry(phase.key).or_default().add(event);
            }
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    let mut alerts = store.alerts(None, MAX_LIMIT).await.map_err(store_error)?;
    alerts.reverse();
    let mut accesses = store.subject(subject_hash, None, None, MAX_LIMIT).await.map_err(store_error)?;
    accesses.reverse();
    let verify = store.verify(None).await.map_err(store_error)?;
    Ok(Findings { counts, alerts, accesses, verify })
}
