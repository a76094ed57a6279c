//! `denial_burst`: at least `threshold` Deny or WouldDeny decisions by one principal within a
//! sliding window. Catches scanners and credential misuse probing endpoints the principal is
//! not allowed to use, quota-hammering crawlers, and (in Audit mode) what would be refused.

use custos_api::{AuditEvent, Decision};
use custos_store::Severity;
use serde_json::json;

use crate::config::{DenialBurstConfig, DetectorKind, format_duration};
use crate::engine::{Finding, rfc3339_ms};
use crate::window::{SlidingSum, slot_ms};

/// The detector's settings, in engine units.
#[derive(Clone, Debug)]
pub(crate) struct DenialBurst {
    slot_ms: i64,
    window_label: String,
    threshold: u64,
}

impl DenialBurst {
    pub(crate) fn new(c: &DenialBurstConfig) -> Self {
        DenialBurst {
            slot_ms: slot_ms(i64::try_from(c.window.as_millis()).unwrap_or(i64::MAX)),
            window_label: format_duration(c.window),
            threshold: c.threshold,
        }
    }

    /// Counts a denial at `t_ms` (the principal's monotonic clock).
    pub(crate) fn observe(
        &self,
        st: &mut SlidingSum,
        event: &AuditEvent,
        t_ms: i64,
        muted: bool,
    ) -> Option<Finding> {
        if !matches!(event.decision, Decision::Deny | Decision::WouldDeny) {
            return None;
        }
        let denials = st.add(self.slot_ms, t_ms, 1);
        if denials < self.threshold {
            return None;
        }
        if muted {
            return Some(Finding::muted(DetectorKind::DenialBurst));
        }
        let start = st.window_start(self.slot_ms);
        Some(Finding {
            kind: DetectorKind::DenialBurst,
            window_start_ms: start,
            scope: None,
            severity: if denials >= self.threshold.saturating_mul(5) {
                Severity::Critical
            } else {
                Severity::Warning
            },
            message: format!(
                "{} was denied {denials} times within {} (threshold {})",
                event.principal, self.window_label, self.threshold
            ),
            details: json!({
                "denials": denials,
                "threshold": self.threshold,
                "windowSeconds": self.slot_ms * crate::window::SLOTS as i64 / 1000,
                "windowStart": rfc3339_ms(start),
                "lastDecision": event.decision.as_str(),
                "lastReason": event.reason,
            }),
            muted: false,
        })
    }
}
