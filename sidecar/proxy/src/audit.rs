//! Audit events: built on the request path, emitted once the response body has been sent (so
//! that the byte count is the real one), handed to the shipper without blocking.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use custos_api::AuditEvent;
use custos_shipper::Shipper;

/// `time` as the audit event writes it: RFC 3339 in UTC with microseconds,
/// `2026-12-06T04:30:12.345678Z`, as `to_rfc3339_opts(SecondsFormat::Micros, true)` writes
/// it, with the digits put in place instead of through the formatter's machinery (which cost
/// about 650 instructions on every request). Years outside 0–9999 take chrono's way.
pub(crate) fn event_time(t: &DateTime<Utc>) -> String {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year.unsigned_abs());
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    // a leap second is nanosecond 1,000,000,000 or more of second 59, written as second 60
    let nanos = t.nanosecond();
    put(17, 2, t.second() + nanos / 1_000_000_000);
    put(20, 6, nanos % 1_000_000_000 / 1_000);
    // only ASCII digits and separators were written
    std::str::from_utf8(&text).unwrap_or_default().to_owned()
}

/// An event waiting for its response body to end.
pub(crate) struct PendingEvent {
    event: Box<AuditEvent>,
    shipper: Shipper,
    bytes: u64,
    incomplete: bool,
}

impl PendingEvent {
    /// Wraps `event` for `shipper`.
    pub(crate) fn new(event: AuditEvent, shipper: Shipper) -> Self {
        PendingEvent { event: Box::new(event), shipper, bytes: 0, incomplete: false }
    }

    /// Counts body bytes sent.
    pub(crate) fn add_bytes(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_add(n);
    }

    /// The body did not reach its end (client gone, app failed mid-body).
    pub(crate) fn mark_incomplete(&mut self) {
        self.incomplete = true;
    }

    /// Whether the body did not reach its end ([`Self::mark_incomplete`]).
    pub(crate) fn is_incomplete(&self) -> bool {
        self.incomplete
    }

    /// The event, to complete before it is emitted.
    pub(crate) fn event_mut(&mut self) -> &mut AuditEvent {
        &mut self.event
    }

    /// Hands the event to the shipper (never blocks).
    pub(crate) fn emit(self) {
        let mut event = *self.event;
        event.bytes = self.bytes;
        if self.incomplete {
            event.reason.push_str(",response_incomplete");
        }
        self.shipper.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};
    use proptest::prelude::*;

    fn chrono_text(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    #[test]
    fn event_time_is_rfc3339_with_microseconds() {
        let t = Utc.with_ymd_and_hms(2026, 12, 6, 4, 30, 12).unwrap()
            + chrono::Duration::nanoseconds(345_678_901);
        assert_eq!(event_time(&t), "2026-12-06T04:30:12.345678Z");
        for t in [
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::nanoseconds(999_999_999),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
        ] {
            assert_eq!(event_time(&t), chrono_text(&t));
        }
        // a leap second: chrono writes it as second 60
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_250_000_000))
            .expect("a valid leap second")
            .and_utc();
        assert_eq!(event_time(&leap), chrono_text(&leap));
        assert_eq!(event_time(&leap), "2016-12-31T23:59:60.250000Z");
    }

    proptest! {
        /// Any instant from year -300 to year 10300 is written as chrono writes it.
        #[test]
        fn event_time_writes_what_chrono_writes(secs in -71_000_000_000i64..263_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            prop_assert_eq!(event_time(&t), chrono_text(&t));
        }
    }
}
