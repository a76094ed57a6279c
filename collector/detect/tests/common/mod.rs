//! Event builders and a synthetic traffic generator for the detector tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use custos_api::audit::{AuditUser, CallerWorkload};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn at(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
}

/// RFC 3339 UTC of `t_ms`.
pub fn rfc(t_ms: i64) -> String {
    DateTime::from_timestamp_millis(t_ms).unwrap().to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub const MIN: i64 = 60_000;
pub const HOUR: i64 = 60 * MIN;
pub const DAY: i64 = 24 * HOUR;

/// A unique event id per call (ids must differ, or the engine's de-duplication drops them).
pub fn next_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(1);
    format!("01TESTEVENT{:015}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// An Allow event of `principal` at `t_ms` returning `records`, in logistics/customer-api.
pub fn mk_event(principal: &str, t_ms: i64, records: u64) -> AuditEvent {
    let (user, caller) = if let Some(id) = principal.strip_prefix("user:") {
        let attributes = BTreeMap::from([("branch".to_owned(), "b1".to_owned())]);
        (Some(AuditUser { id: id.to_owned(), attributes }), None)
    } else if let Some(w) = principal.strip_prefix("workload:") {
        let (ns, sa) = w.split_once('/').unwrap_or(("default", w));
        (None, Some(CallerWorkload { namespace: ns.to_owned(), service_account: sa.to_owned() }))
    } else {
        (None, None)
    };
    AuditEvent {
        schema_version: custos_api::audit::AUDIT_SCHEMA_VERSION,
        id: next_id(),
        time: rfc(t_ms),
        cluster: None,
        namespace: "logistics".into(),
        policy: Some("customer-api".into()),
        rule: Some("branch-clerks-read".into()),
        mode: Mode::Enforce,
        pod: Some("customer-api-0".into()),
        caller,
        user,
        principal: principal.to_owned(),
        rule_principal: None,
        method: "GET".into(),
        path: "/parcels".into(),
        decision: Decision::Allow,
        reason: "rule branch-clerks-read allows".into(),
        status: 200,
        records_returned: records,
        records_filtered: 0,
        records_truncated: 0,
        masked: BTreeMap::new(),
        bytes: records.saturating_mul(200),
        latency_us: 1_500,
        trace_id: None,
        record_hashes: Vec::new(),
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

/// A Deny event with a reason code.
pub fn mk_deny(principal: &str, t_ms: i64, reason: &str) -> AuditEvent {
    AuditEvent {
        decision: Decision::Deny,
        reason: reason.to_owned(),
        status: 403,
        rule: None,
        records_returned: 0,
        bytes: 80,
        ..mk_event(principal, t_ms, 0)
    }
}

/// An Allow event whose row filter removed `filtered` rows and let `returned` through.
pub fn mk_filtered(principal: &str, t_ms: i64, returned: u64, filtered: u64) -> AuditEvent {
    AuditEvent { records_filtered: filtered, ..mk_event(principal, t_ms, returned) }
}

/// The same event in another (namespace, policy).
pub fn in_scope(mut e: AuditEvent, namespace: &str, policy: &str) -> AuditEvent {
    e.namespace = namespace.to_owned();
    e.policy = Some(policy.to_owned());
    e
}

/// splitmix64: a small deterministic generator, so replays are reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The normal population: clerks working business hours in one time zone, and workloads
/// running around the clock with a daily rhythm.
#[derive(Clone, Debug)]
pub struct Traffic {
    /// Monday 00:00 local time, in ms since the epoch.
    pub start_ms: i64,
    /// Local time = UTC + this offset (the zone has no DST).
    pub utc_offset_ms: i64,
    pub users: Vec<String>,
    pub seed: u64,
}

/// The zone of the synthetic population: UTC+8 all year.
pub const TZ: &str = "Asia/Shanghai";

impl Traffic {
    /// Eight clerks and three workloads, starting Monday 2024-03-04 00:00 Shanghai time.
    pub fn normal() -> Self {
        Traffic {
            start_ms: at("2024-03-04T00:00:00+08:00"),
            utc_offset_ms: 8 * HOUR,
            users: (1..=8).map(|i| format!("user:clerk-{i}")).collect(),
            seed: 0x5eed,
        }
    }

    /// Local wall time of `t_ms`.
    pub fn local(&self, t_ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(t_ms + self.utc_offset_ms).unwrap()
    }

    /// `t_ms` of `day` (0 = Monday) at `hh:mm` local time.
    pub fn time(&self, day: i64, hh: i64, mm: i64) -> i64 {
        self.start_ms + day * DAY + hh * HOUR + mm * MIN
    }

    /// Generates the normal traffic of minutes `[from_min, to_min)` after `start_ms`, plus what
    /// `extra` adds each minute, and hands each event to `sink` in arrival order (events of a
    /// minute arrive shuffled by up to 3 s, as batches from several sidecars would).
    pub fn replay(
        &self,
        from_min: i64,
        to_min: i64,
        mut extra: impl FnMut(i64, &mut Vec<AuditEvent>),
        mut sink: impl FnMut(&AuditEvent),
    ) {
        let mut rng = Rng::new(self.seed);
        let mut minute_events: Vec<(i64, AuditEvent)> = Vec::new();
        let mut extras = Vec::new();
        for m in 0..to_min {
            let t0 = self.start_ms + m * MIN;
            // Draw for every minute (also skipped ones) so that a window is the same traffic
            // whatever `from_min` is.
            self.minute(t0, &mut rng, &mut minute_events);
            if m < from_min {
                minute_events.clear();
                continue;
            }
            extras.clear();
            extra(t0, &mut extras);
            for e in extras.drain(..) {
                let arrival = at(&e.time) + rng.below(3_000) as i64;
                minute_events.push((arrival, e));
            }
            minute_events.sort_by_key(|(arrival, _)| *arrival);
            for (_, e) in minute_events.drain(..) {
                sink(&e);
            }
        }
    }

    fn minute(&self, t0: i64, rng: &mut Rng, out: &mut Vec<(i64, AuditEvent)>) {
        let local = self.local(t0);
        let weekday = local.weekday().num_days_from_monday() < 5;
        let hour = local.hour();
        let minute_of_day = hour * 60 + local.minute();
        let mut push = |t: i64, e: AuditEvent, rng: &mut Rng| {
            let arrival = t + rng.below(3_000) as i64;
            out.push((arrival, e));
        };
        // Clerks: 08:30-18:00 on weekdays, busier mornings and afternoons than lunch.
        if weekday && (510..1080).contains(&minute_of_day) {
            let p = match hour {
                12 => 0.15,
                9..=11 | 14..=16 => 0.5,
                _ => 0.3,
            };
            for user in &self.users {
                if !rng.chance(p) {
                    continue;
                }
                // Now and then a clerk works through a queue: a dozen requests in a minute.
                let requests = if rng.chance(0.03) { 10 + rng.below(6) } else { 1 + rng.below(6) };
                for _ in 0..requests {
                    let t = t0 + rng.below(60_000) as i64;
                    let mut e = if rng.chance(0.01) {
                        mk_deny(user, t, "rule no-bulk-export denies")
                    } else {
                        // Mostly short pages; sometimes a full page of 100.
                        let returned = if rng.chance(0.03) { 100 } else { 1 + rng.below(30) };
                        let filtered = if rng.chance(0.05) { rng.below(3) } else { 0 };
                        mk_filtered(user, t, returned, filtered)
                    };
                    if rng.chance(0.1) {
                        e = in_scope(e, "billing", "invoices-api");
                    }
                    push(t, e, rng);
                }
            }
        }
        // Workloads, around the clock, twice as busy in business hours, with the odd minute
        // three times as busy again; the report job also runs a larger report every hour.
        let busy: u64 = if (8..20).contains(&hour) { 2 } else { 1 };
        let surge: u64 = if rng.chance(0.01) { 3 } else { 1 };
        let workloads: [(&str, u64, u64, u64); 3] = [
            ("workload:logistics/ops-portal", 10 * busy * surge, 10, 10),
            ("workload:logistics/report-job", busy, 5, 10),
            ("workload:billing/sync", 2, 1, 20),
        ];
        for (principal, base_rate, min_records, spread) in workloads {
            let n = base_rate + rng.below(base_rate + 1);
            for _ in 0..n {
                let t = t0 + rng.below(60_000) as i64;
                let mut e = mk_event(principal, t, min_records + rng.below(spread));
                if principal.starts_with("workload:billing") {
                    e = in_scope(e, "billing", "invoices-api");
                }
                push(t, e, rng);
            }
        }
        if local.minute() == 0 {
            let t = t0 + 1_000 + rng.below(5_000) as i64;
            push(t, mk_event("workload:logistics/report-job", t, 400 + rng.below(300)), rng);
        }
    }
}
