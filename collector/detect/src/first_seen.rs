//! `first_seen`: a principal accessing a (namespace, policy) it was never seen in, once the
//! engine's learning period is over (so a fresh collector learns the existing population
//! instead of alerting on everyone). Only Allow and WouldDeny decisions count (data flowed);
//! a principal merely denied is not "seen". Principal kinds are chosen by prefix (default
//! `user:` and `workload:`; `peer:<ip>` keys change with every pod IP and are left out).
//!
//! What was seen lives in the principal's state: a principal forgotten after the state TTL or
//! under memory pressure is new again when it comes back. The alert id depends only on the
//! principal and the scope, so such a repeat is stored once.

use custos_api::{AuditEvent, Decision};
use custos_store::Severity;
use serde_json::json;

use crate::config::{DetectorKind, FirstSeenConfig};
use crate::engine::Finding;

/// Most scopes remembered per principal; beyond, the oldest is forgotten.
pub(crate) const MAX_SCOPES: usize = 64;

/// A (namespace, policy) pair.
pub(crate) type Scope = (Box<str>, Option<Box<str>>);

/// The detector's settings, in engine units.
#[derive(Clone, Debug)]
pub(crate) struct FirstSeen {
    pub(crate) learning_ms: i64,
    prefixes: Vec<String>,
}

impl FirstSeen {
    pub(crate) fn new(c: &FirstSeenConfig) -> Self {
        FirstSeen {
            learning_ms: i64::try_from(c.learning.as_millis()).unwrap_or(i64::MAX),
            prefixes: c.prefixes.iter().map(|p| p.trim().to_owned()).collect(),
        }
    }

    /// Records the event's scope; a new one after learning is a finding.
    pub(crate) fn observe(
        &self,
        scopes: &mut Vec<Scope>,
        event: &AuditEvent,
        learning_over: bool,
        muted: bool,
    ) -> Option<Finding> {
        if !matches!(event.decision, Decision::Allow | Decision::WouldDeny)
            || !self.prefixes.iter().any(|p| event.principal.starts_with(p.as_str()))
        {
            return None;
        }
        let known = scopes
            .iter()
            .any(|(ns, policy)| **ns == *event.namespace && policy.as_deref() == event.policy.as_deref());
        if known {
            return None;
        }
        if scopes.len() >= MAX_SCOPES {
            scopes.remove(0);
        }
        scopes.push((event.namespace.as_str().into(), event.policy.as_deref().map(Into::into)));
        if !learning_over {
            return None;
        }
        if muted {
            return Some(Finding::muted(DetectorKind::FirstSeen));
        }
        let policy = event.policy.as_deref().unwrap_or("-");
        Some(Finding {
            kind: DetectorKind::FirstSeen,
            window_start_ms: 0,
            scope: Some(format!("{}\u{1f}{policy}", event.namespace)),
            severity: Severity::Info,
            message: format!(
                "{} accessed namespace {} under policy {policy} for the first time",
                event.principal, event.namespace
            ),
            details: json!({
                "decision": event.decision.as_str(),
                "rule": event.rule,
                "knownScopes": scopes.len() - 1,
                "recordsReturned": event.records_returned,
            }),
            muted: false,
        })
    }
}
