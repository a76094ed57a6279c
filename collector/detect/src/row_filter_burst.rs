//! `row_filter_burst`: a principal reaching outside its scope. Two signals, summed per
//! principal within a sliding window:
//!
//! - rows dropped by the row filter (`records_filtered`): the caller asked for records of
//!   other branches/tenants and the sidecar removed them. Fires at `rows` filtered rows when
//!   they are at least `min_ratio` of the rows asked for (filtered + returned), so that list
//!   endpoints that return a little foreign data to everyone do not alert;
//! - `out_of_scope` denials (Deny or WouldDeny whose reason code is `out_of_scope`): a single
//!   record of another branch asked for by id. Fires at `denials` of them.
//!
//! This is the courier-insider pattern: accounts querying waybills of other outlets.

use custos_api::{AuditEvent, Decision};
use custos_store::Severity;
use serde_json::json;

use crate::config::{DetectorKind, RowFilterBurstConfig, format_duration};
use crate::engine::{Finding, rfc3339_ms};
use crate::window::{SLOTS, SlidingSum, slot_ms};

/// The reason code of a denial for reading outside the caller's scope.
pub const OUT_OF_SCOPE: &str = "out_of_scope";

/// The detector's settings, in engine units.
#[derive(Clone, Debug)]
pub(crate) struct RowFilterBurst {
    slot_ms: i64,
    window_label: String,
    rows: u64,
    min_ratio: f64,
    denials: u64,
}

/// Per-principal state.
#[derive(Clone, Debug, Default)]
pub(crate) struct RowFilterState {
    filtered: SlidingSum,
    returned: SlidingSum,
    out_of_scope: SlidingSum,
}

/// Whether the event is an out-of-scope denial (`out_of_scope`, possibly followed by an
/// audit-mode note).
pub(crate) fn is_out_of_scope(event: &AuditEvent) -> bool {
    matches!(event.decision, Decision::Deny | Decision::WouldDeny)
        && event
            .reason
            .strip_prefix(OUT_OF_SCOPE)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', ',', ':']))
}

impl RowFilterBurst {
    pub(crate) fn new(c: &RowFilterBurstConfig) -> Self {
        RowFilterBurst {
            slot_ms: slot_ms(i64::try_from(c.window.as_millis()).unwrap_or(i64::MAX)),
            window_label: format_duration(c.window),
            rows: c.rows,
            min_ratio: c.min_ratio,
            denials: c.denials,
        }
    }

    /// Counts the event at `t_ms` (the principal's monotonic clock).
    pub(crate) fn observe(
        &self,
        st: &mut RowFilterState,
        event: &AuditEvent,
        t_ms: i64,
        muted: bool,
    ) -> Option<Finding> {
        let oos_event = is_out_of_scope(event);
        let filtered = st.filtered.add(self.slot_ms, t_ms, event.records_filtered);
        let returned = st.returned.add(self.slot_ms, t_ms, event.records_returned);
        let oos = st.out_of_scope.add(self.slot_ms, t_ms, u64::from(oos_event));
        if event.records_filtered == 0 && !oos_event {
            // Only an event that adds to the evidence can raise an alert.
            return None;
        }
        let asked = filtered.saturating_add(returned);
        let ratio = if asked == 0 { 0.0 } else { filtered as f64 / asked as f64 };
        let rows_hit = self.rows > 0 && filtered >= self.rows && ratio >= self.min_ratio;
        let denials_hit = self.denials > 0 && oos >= self.denials;
        if !(rows_hit || denials_hit) {
            return None;
        }
        if muted {
            return Some(Finding::muted(DetectorKind::RowFilterBurst));
        }
        let start = st.filtered.window_start(self.slot_ms);
        Some(Finding {
            kind: DetectorKind::RowFilterBurst,
            window_start_ms: start,
            scope: None,
            severity: if rows_hit && denials_hit { Severity::Critical } else { Severity::Warning },
            message: format!(
                "{} reached outside its scope within {}: {filtered} rows removed by the row filter \
                 ({:.0}% of {asked} asked for; threshold {} at {:.0}%), {oos} out-of-scope denials \
                 (threshold {})",
                event.principal,
                self.window_label,
                ratio * 100.0,
                self.rows,
                self.min_ratio * 100.0,
                self.denials,
            ),
            details: json!({
                "filteredRows": filtered,
                "returnedRows": returned,
                "filteredRatio": (ratio * 1000.0).round() / 1000.0,
                "outOfScopeDenials": oos,
                "rowsThreshold": self.rows,
                "minRatio": self.min_ratio,
                "denialsThreshold": self.denials,
                "trigger": match (rows_hit, denials_hit) {
                    (true, true) => "rows_and_denials",
                    (true, false) => "rows",
                    _ => "denials",
                },
                "windowSeconds": self.slot_ms * SLOTS as i64 / 1000,
                "windowStart": rfc3339_ms(start),
            }),
            muted: false,
        })
    }
}
