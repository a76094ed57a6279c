//! `off_hours`: data read outside the working window (e.g. 08:00–19:00, Mon–Fri) in a
//! configured IANA time zone, by principals whose key matches a prefix (default `user:`:
//! people, not batch workloads). Only Allow decisions returning at least one record count.
//! The back-office employee downloading customer data at night is the pattern.
//!
//! The event's own time is used (not the principal's clock), so a late event is judged by
//! when it happened.

use chrono::{DateTime, Datelike, Timelike, Weekday};
use custos_api::{AuditEvent, Decision};
use custos_store::Severity;
use serde_json::json;

use crate::config::{ConfigError, DetectorKind, OffHoursConfig, WorkingHours};
use crate::engine::Finding;

/// The detector's settings, compiled.
#[derive(Clone, Debug)]
pub(crate) struct OffHours {
    hours: WorkingHours,
    prefixes: Vec<String>,
    window_label: String,
}

impl OffHours {
    pub(crate) fn new(c: &OffHoursConfig) -> Result<Self, ConfigError> {
        Ok(OffHours {
            hours: c.compile()?,
            prefixes: c.prefixes.iter().map(|p| p.trim().to_owned()).collect(),
            window_label: format!(
                "{}-{} {} {}",
                c.start.trim(),
                c.end.trim(),
                c.days.trim(),
                c.time_zone.trim()
            ),
        })
    }

    /// Whether `t_ms` falls in the working window.
    pub(crate) fn is_working_time(&self, t_ms: i64) -> bool {
        let Some(utc) = DateTime::from_timestamp_millis(t_ms) else { return true };
        let local = utc.with_timezone(&self.hours.tz);
        let day = local.weekday();
        let tod = local.time();
        let h = &self.hours;
        let on = |d: Weekday| h.days[d.num_days_from_monday() as usize];
        if h.start < h.end {
            on(day) && tod >= h.start && tod < h.end
        } else {
            // Over midnight: the part after midnight belongs to the previous day's window.
            (on(day) && tod >= h.start) || (on(day.pred()) && tod < h.end)
        }
    }

    /// A finding when the event reads data outside the working window.
    pub(crate) fn observe(&self, event: &AuditEvent, t_ms: i64, muted: bool) -> Option<Finding> {
        if event.decision != Decision::Allow
            || event.records_returned == 0
            || !self.prefixes.iter().any(|p| event.principal.starts_with(p.as_str()))
            || self.is_working_time(t_ms)
        {
            return None;
        }
        if muted {
            return Some(Finding::muted(DetectorKind::OffHours));
        }
        let local = DateTime::from_timestamp_millis(t_ms)?.with_timezone(&self.hours.tz);
        let local_time = format!("{} {:02}:{:02}", local.weekday(), local.hour(), local.minute());
        Some(Finding {
            kind: DetectorKind::OffHours,
            window_start_ms: t_ms.div_euclid(60_000) * 60_000,
            scope: None,
            severity: Severity::Warning,
            message: format!(
                "{} read {} records at {local_time} local time, outside working hours ({})",
                event.principal, event.records_returned, self.window_label
            ),
            details: json!({
                "localTime": local_time,
                "workingHours": self.window_label,
                "recordsReturned": event.records_returned,
                "rule": event.rule,
            }),
            muted: false,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn overnight_windows_belong_to_their_start_day() {
        let c = OffHoursConfig {
            start: "22:00".into(),
            end: "06:00".into(),
            days: "Mon-Fri".into(),
            ..OffHoursConfig::default()
        };
        let oh = OffHours::new(&c).unwrap();
        // 2024-01-01 is a Monday.
        assert!(oh.is_working_time(ms("2024-01-01T23:00:00Z")));
        assert!(oh.is_working_time(ms("2024-01-02T05:59:00Z")), "Monday's night shift");
        assert!(!oh.is_working_time(ms("2024-01-02T12:00:00Z")));
        assert!(oh.is_working_time(ms("2024-01-06T01:00:00Z")), "Friday's night shift, Saturday 01:00");
        assert!(!oh.is_working_time(ms("2024-01-07T01:00:00Z")), "Sunday 01:00: Saturday is off");
        assert!(!oh.is_working_time(ms("2024-01-01T01:00:00Z")), "Monday 01:00: Sunday is off");
    }

    #[test]
    fn zones_shift_the_window() {
        let c = OffHoursConfig { time_zone: "Asia/Shanghai".into(), ..OffHoursConfig::default() };
        let oh = OffHours::new(&c).unwrap();
        // 02:00Z Tuesday = 10:00 in Shanghai; 19:00Z Tuesday = 03:00 Wednesday there.
        assert!(oh.is_working_time(ms("2024-01-02T02:00:00Z")));
        assert!(!oh.is_working_time(ms("2024-01-02T19:00:00Z")));
    }
}
