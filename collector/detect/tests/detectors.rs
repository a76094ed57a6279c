//! The detectors over synthetic traffic: silence on normal traffic, and each incident caught.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use custos_api::{AuditEvent, Decision};
use custos_detect::{Alert, DetectConfig, DetectorKind, Detectors, Severity};

/// Defaults, with the working hours in the population's zone and a one-day learning period.
fn config() -> DetectConfig {
    let mut c = DetectConfig::default();
    c.off_hours.time_zone = TZ.into();
    c.first_seen.learning = Duration::from_secs(86_400);
    c
}

fn engine(c: DetectConfig) -> Detectors {
    Detectors::new(c).unwrap()
}

fn of<'a>(alerts: &'a [Alert], detector: &str, principal: &str) -> Vec<&'a Alert> {
    alerts.iter().filter(|a| a.detector == detector && a.principal.as_deref() == Some(principal)).collect()
}

fn describe(alerts: &[Alert]) -> String {
    alerts
        .iter()
        .map(|a| format!("{} {} {:?}: {}", a.time, a.detector, a.principal, a.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the normal population for minutes `[0, to_min)` with `extra` injected.
fn run(d: &mut Detectors, to_min: i64, extra: impl FnMut(i64, &mut Vec<AuditEvent>)) -> Vec<Alert> {
    let mut alerts = Vec::new();
    Traffic::normal().replay(0, to_min, extra, |e| alerts.extend(d.observe(e)));
    alerts
}

/// `n` events per second of `principal`, `records` each, for minutes starting in
/// `[from, until)`.
fn crawler(
    principal: &str,
    from: i64,
    until: i64,
    per_second: i64,
    records: u64,
) -> impl FnMut(i64, &mut Vec<AuditEvent>) {
    let principal = principal.to_owned();
    move |t0, out| {
        if (from..until).contains(&t0) {
            let n = 60 * per_second;
            for i in 0..n {
                let mut e = mk_event(&principal, t0 + i * 60_000 / n, records);
                e.path = "/customers".into();
                out.push(e);
            }
        }
    }
}

fn assert_no_personal_data(alerts: &[Alert]) {
    for a in alerts {
        let json = serde_json::to_string(a).unwrap();
        for needle in ["/parcels", "/customers", "recordHashes", "branch\":\"b1"] {
            assert!(!json.contains(needle), "alert carries {needle}: {json}");
        }
    }
}

#[test]
fn a_normal_week_raises_no_alert_and_the_same_engine_still_catches_a_bulk_export() {
    let mut d = engine(config());
    let t = Traffic::normal();
    let alerts = run(&mut d, 7 * 24 * 60, |_, _| {});
    let stats = d.stats();
    assert!(alerts.is_empty(), "false positives on normal traffic:\n{}", describe(&alerts));
    assert!(stats.events > 300_000, "{stats:?}");
    assert_eq!((stats.late, stats.invalid, stats.duplicates), (0, 0, 0), "{stats:?}");
    assert_eq!(stats.tracked_principals, 11);

    // Not vacuous: the engine that stayed silent is armed.
    let monday = t.time(7, 10, 0);
    let alerts = d.observe(&mk_event("user:clerk-4", monday, 50_000));
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));
    assert_eq!(alerts[0].detector, "volume");
    assert_eq!(alerts[0].details["trigger"], "baseline");
}

/// The silence above is not for lack of noise: the same traffic trips tighter settings, so the
/// defaults are what keeps it quiet (ops-portal surges ~5x its baseline; the hourly report
/// job pulls ~20x its baseline, under the floor).
#[test]
fn the_normal_traffic_is_noisy_enough_to_trip_tighter_settings() {
    let volume_alerts = |factor: f64, floor: u64| {
        let mut c = config();
        c.volume.factor = factor;
        c.volume.floor = floor;
        let mut d = engine(c);
        let alerts = run(&mut d, 2 * 24 * 60, |_, _| {});
        let mut principals: Vec<String> =
            alerts.iter().filter(|a| a.detector == "volume").filter_map(|a| a.principal.clone()).collect();
        principals.dedup();
        principals
    };
    assert_eq!(volume_alerts(3.0, 1_000), ["workload:logistics/ops-portal"]);
    assert_eq!(volume_alerts(10.0, 300), ["workload:logistics/report-job"]);
}

#[test]
fn a_crawler_on_an_existing_account_raises_exactly_one_volume_alert() {
    let t = Traffic::normal();
    let start = t.time(2, 10, 0); // Wednesday 10:00 local, after two days of history.
    let mut d = engine(config());
    let alerts = run(
        &mut d,
        (start - t.start_ms) / MIN + 30,
        crawler("user:clerk-3", start, start + 10 * MIN, 60, 20),
    );
    assert_no_personal_data(&alerts);
    assert!(
        alerts.iter().all(|a| a.principal.as_deref() == Some("user:clerk-3")),
        "only the crawler alerts:\n{}",
        describe(&alerts)
    );
    let volume = of(&alerts, "volume", "user:clerk-3");
    assert_eq!(volume.len(), 1, "{}", describe(&alerts));
    let a = volume[0];
    assert_eq!(a.details["trigger"], "baseline");
    assert!(at(&a.time) >= start && at(&a.time) < start + MIN, "fires within the first minute: {}", a.time);
    assert!(a.details["records"].as_u64().unwrap() > a.details["threshold"].as_f64().unwrap() as u64);
    assert!(a.details["baseline"].as_f64().unwrap() < 200.0, "{}", a.details);
    assert_eq!(a.namespace.as_deref(), Some("logistics"));
    assert_eq!(a.details["cooldownSeconds"], 3600);
    assert!(d.stats().suppressed >= 9, "the other crawling minutes were silenced: {:?}", d.stats());
}

#[test]
fn a_crawler_running_past_the_cooldown_alerts_once_per_cooldown() {
    let t = Traffic::normal();
    let start = t.time(1, 10, 0);
    let mut c = config();
    c.cooldown = Duration::from_secs(20 * 60);
    let mut d = engine(c);
    let alerts = run(
        &mut d,
        (start - t.start_ms) / MIN + 31,
        crawler("user:clerk-1", start, start + 30 * MIN, 60, 20),
    );
    let volume = of(&alerts, "volume", "user:clerk-1");
    assert_eq!(volume.len(), 2, "{}", describe(&alerts));
    assert_ne!(volume[0].id, volume[1].id);
    let gap = at(&volume[1].time) - at(&volume[0].time);
    assert!((20 * MIN..21 * MIN).contains(&gap), "second alert once the cooldown ended: {gap} ms");
}

#[test]
fn a_fresh_crawler_account_is_caught_during_its_warmup() {
    let t = Traffic::normal();
    let start = t.time(1, 15, 0);
    let mut d = engine(config());
    let alerts = run(
        &mut d,
        (start - t.start_ms) / MIN + 12,
        crawler("user:scraper-9", start, start + 10 * MIN, 60, 20),
    );
    let volume = of(&alerts, "volume", "user:scraper-9");
    assert_eq!(volume.len(), 1, "{}", describe(&alerts));
    assert_eq!(volume[0].details["trigger"], "warmup");
    assert_eq!(of(&alerts, "first_seen", "user:scraper-9").len(), 1, "{}", describe(&alerts));
    assert_eq!(alerts.len(), 2, "{}", describe(&alerts));
}

#[test]
fn an_insider_reading_other_branches_raises_a_row_filter_burst() {
    let t = Traffic::normal();
    let start = t.time(2, 14, 0);
    let mut d = engine(config());
    let insider = move |t0: i64, out: &mut Vec<AuditEvent>| {
        if (start..start + 15 * MIN).contains(&t0) {
            for k in 0..2 {
                out.push(mk_deny("user:clerk-5", t0 + k * 20_000, "out_of_scope"));
                out.push(mk_filtered("user:clerk-5", t0 + k * 20_000 + 5_000, 3, 27));
            }
        }
    };
    let alerts = run(&mut d, (start - t.start_ms) / MIN + 20, insider);
    assert_no_personal_data(&alerts);
    let burst = of(&alerts, "row_filter_burst", "user:clerk-5");
    assert_eq!(burst.len(), 1, "{}", describe(&alerts));
    let details = &burst[0].details;
    assert!(details["outOfScopeDenials"].as_u64().unwrap() >= 10, "{details}");
    assert!(details["trigger"].as_str().unwrap().contains("denials"), "{details}");
    assert!(details["filteredRows"].as_u64().unwrap() >= 27 * 4, "{details}");
    assert!(at(&burst[0].time) < start + 6 * MIN, "caught within the window: {}", burst[0].time);
    assert!(alerts.iter().all(|a| a.principal.as_deref() == Some("user:clerk-5")), "{}", describe(&alerts));
}

#[test]
fn row_filter_rows_alert_only_when_they_are_a_high_share() {
    let t0 = at("2024-03-05T10:00:00+08:00");
    let mut d = engine(config());
    let mut alerts = Vec::new();
    for i in 0..20 {
        // 27 of 30 rows out of scope, 540 in total: over 500 at 90%.
        alerts.extend(d.observe(&mk_filtered("user:reader", t0 + i * 10_000, 3, 27)));
        // 30 of 330 out of scope, 600 in total: over 500 but at 9%.
        alerts.extend(d.observe(&mk_filtered("user:lister", t0 + i * 10_000, 300, 30)));
    }
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));
    assert_eq!(alerts[0].principal.as_deref(), Some("user:reader"));
    assert_eq!(alerts[0].details["trigger"], "rows");

    // Audit mode: would-deny out_of_scope counts too.
    for i in 0..10 {
        let mut e = mk_deny("user:auditee", t0 + i * 1_000, "out_of_scope (audit mode: not enforced)");
        e.decision = Decision::WouldDeny;
        alerts.extend(d.observe(&e));
    }
    assert_eq!(of(&alerts, "row_filter_burst", "user:auditee").len(), 1, "{}", describe(&alerts));
}

#[test]
fn a_bulk_export_of_50000_records_raises_a_critical_volume_alert() {
    let t = Traffic::normal();
    let when = t.time(1, 11, 0);
    let mut d = engine(config());
    let export = move |t0: i64, out: &mut Vec<AuditEvent>| {
        if t0 == when {
            let mut e = mk_event("user:clerk-2", when + 17_000, 50_000);
            e.path = "/customers/export".into();
            out.push(e);
        }
    };
    let alerts = run(&mut d, (when - t.start_ms) / MIN + 60, export);
    assert_no_personal_data(&alerts);
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));
    let a = &alerts[0];
    assert_eq!((a.detector.as_str(), a.principal.as_deref()), ("volume", Some("user:clerk-2")));
    assert_eq!(a.severity, Severity::Critical);
    assert_eq!(a.details["trigger"], "baseline");
    assert!(a.details["records"].as_u64().unwrap() >= 50_000);
}

#[test]
fn denial_bursts_fire_at_the_threshold_within_the_window_only() {
    let t0 = at("2024-03-05T10:00:00+08:00");
    let mut d = engine(config());
    let mut alerts = Vec::new();
    for i in 0..19 {
        alerts.extend(d.observe(&mk_deny("user:almost", t0 + i * 5_000, "rule no-bulk-export denies")));
    }
    for i in 0..20 {
        // One denial a minute: never 20 within 5 minutes.
        alerts.extend(d.observe(&mk_deny("user:slow", t0 + i * MIN, "default_deny")));
    }
    assert!(alerts.is_empty(), "{}", describe(&alerts));
    for i in 0..40 {
        let mut e = mk_deny("user:prober", t0 + i * 3_000, "quota_exceeded:requests_per_minute");
        if i % 2 == 0 {
            e.decision = Decision::WouldDeny;
        }
        alerts.extend(d.observe(&e));
    }
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));
    assert_eq!(alerts[0].detector, "denial_burst");
    assert_eq!(alerts[0].details["denials"], 20);
    assert_eq!(at(&alerts[0].time), t0 + 19 * 3_000);
}

#[test]
fn first_seen_alerts_only_after_learning_and_once_per_scope() {
    let t0 = at("2024-03-04T09:00:00+08:00");
    let mut d = engine(config());
    let mut alerts = Vec::new();
    alerts.extend(d.observe(&mk_event("user:a", t0, 1)));
    alerts.extend(d.observe(&mk_event("user:b", t0 + 2 * HOUR, 1)));
    assert!(alerts.is_empty(), "learning: {}", describe(&alerts));

    let after = t0 + 25 * HOUR;
    let new_user = d.observe(&mk_event("user:c", after, 1));
    assert_eq!(new_user.len(), 1, "{}", describe(&new_user));
    assert_eq!((new_user[0].detector.as_str(), new_user[0].severity), ("first_seen", Severity::Info));
    assert!(d.observe(&mk_event("user:c", after + MIN, 1)).is_empty());
    assert!(d.observe(&mk_event("user:a", after + MIN, 1)).is_empty(), "known");

    let new_scope = d.observe(&in_scope(mk_event("user:a", after + 2 * MIN, 1), "billing", "invoices-api"));
    assert_eq!(new_scope.len(), 1, "{}", describe(&new_scope));
    assert_eq!(new_scope[0].namespace.as_deref(), Some("billing"));
    assert!(d.observe(&mk_event("peer:10.1.2.3", after, 1)).is_empty(), "peer keys are left out");
    assert!(d.observe(&mk_deny("user:d", after, "default_deny")).is_empty(), "denied is not seen");
    assert_eq!(d.observe(&mk_event("user:d", after + MIN, 1)).len(), 1);

    // The id depends on principal and scope only.
    let mut fresh = engine(config());
    fresh.observe(&mk_event("user:z", t0 - 10 * DAY, 1));
    let again = fresh.observe(&mk_event("user:c", t0 + 42 * DAY, 1));
    assert_eq!(again.len(), 1, "{}", describe(&again));
    assert_eq!(again[0].id, new_user[0].id);
}

#[test]
fn off_hours_reads_alert_at_3am_local_time_and_not_at_10am() {
    let mut c = config();
    c.first_seen.enabled = false;
    let mut d = engine(c.clone());
    // Wednesday 2024-03-06 in Shanghai (UTC+8).
    let night = at("2024-03-06T03:00:00+08:00");
    let day = at("2024-03-06T10:00:00+08:00");
    assert!(d.observe(&mk_event("user:owl", day, 5)).is_empty());
    let alerts = d.observe(&mk_event("user:owl", night + DAY, 5));
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));
    assert_eq!(alerts[0].detector, "off_hours");
    assert_eq!(alerts[0].details["localTime"], "Thu 03:00");
    assert!(alerts[0].message.contains("Asia/Shanghai"), "{}", alerts[0].message);

    // 03:00 local is 19:00 UTC the day before: inside a UTC working day, so the zone matters.
    assert!(at("2024-03-05T19:00:00Z") == night);
    assert!(d.observe(&mk_event("workload:logistics/ops-portal", night, 50)).is_empty(), "not a person");
    assert!(d.observe(&mk_deny("user:owl2", night, "default_deny")).is_empty(), "nothing was read");
    assert!(d.observe(&mk_event("user:owl3", night, 0)).is_empty(), "no records");
    assert_eq!(d.observe(&mk_event("user:owl4", night, 1)).len(), 1);
    let saturday = at("2024-03-09T10:00:00+08:00");
    assert_eq!(d.observe(&mk_event("user:owl5", saturday, 1)).len(), 1, "weekend");

    // A zone with summer time: 06:30Z in July is 08:30 in Berlin.
    c.off_hours.time_zone = "Europe/Berlin".into();
    let mut berlin = engine(c);
    assert!(berlin.observe(&mk_event("user:early", at("2024-07-03T06:30:00Z"), 1)).is_empty());
    assert_eq!(berlin.observe(&mk_event("user:early2", at("2024-07-03T05:30:00Z"), 1)).len(), 1);
}

#[test]
fn replays_are_deterministic_and_reingesting_does_not_alert_again() {
    let t = Traffic::normal();
    let start = t.time(1, 10, 0);
    let mut events = Vec::new();
    let mut extra = crawler("user:clerk-6", start, start + 3 * MIN, 60, 20);
    t.replay(
        0,
        (start - t.start_ms) / MIN + 5,
        |t0, out| {
            extra(t0, out);
            if t0 == start {
                for i in 0..25 {
                    out.push(mk_deny("user:clerk-7", t0 + i * 1_000, "out_of_scope"));
                }
                out.push(mk_event("user:night-owl", t.time(1, 2, 0), 3));
            }
        },
        |e| events.push(e.clone()),
    );
    let mut c = config();
    c.dedupe_window = events.len();
    let mut a = engine(c.clone());
    let mut b = engine(c);
    let first = a.observe_all(&events);
    let second = b.observe_all(&events);
    assert!(first.len() >= 4, "{}", describe(&first));
    assert_eq!(first, second);
    let ids: std::collections::BTreeSet<_> = first.iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids.len(), first.len(), "ids are unique");

    // A resent batch: ignored.
    let again = a.observe_all(&events[events.len() - 5_000..]);
    assert!(again.is_empty(), "{}", describe(&again));
    assert_eq!(a.stats().duplicates, 5_000);
}

#[test]
fn out_of_order_events_are_tolerated_and_late_ones_skipped_by_windows() {
    let t0 = at("2024-03-05T10:00:00+08:00");
    let mut d = engine(config());
    // 25 denials within a minute, arriving newest first.
    let mut alerts = Vec::new();
    for i in (0..25).rev() {
        alerts.extend(d.observe(&mk_deny("user:shuffled", t0 + i * 2_000, "default_deny")));
    }
    assert_eq!(alerts.len(), 1, "{}", describe(&alerts));

    // An event an hour older than the principal's clock is late: not counted in buckets.
    assert!(d.observe(&mk_event("user:shuffled", t0 + HOUR, 1)).is_empty());
    let late = d.observe(&mk_event("user:shuffled", t0, 200_000));
    assert!(late.iter().all(|a| a.detector != "volume"), "{}", describe(&late));
    assert_eq!(d.stats().late, 1);

    // Times far apart and backwards do not panic.
    for s in ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2024-03-05T10:00:00+14:00"] {
        d.observe(&mk_event("user:clock-skew", at(s), 7));
    }
}

/// An event dated ahead of the collector's clock (the store takes up to 10 minutes of skew,
/// and a namespace token may send events of any principal) moves a principal's clock only up
/// to when it was received: the events that follow, dated now, still count in the windows.
/// Before, one event dated now + 9 minutes made every later event of that principal late for
/// minutes, skipped by volume, denial_burst and row_filter_burst.
#[test]
fn a_future_dated_event_does_not_blind_the_windowed_detectors() {
    let t0 = at("2026-03-03T10:00:00Z");
    let received = chrono::DateTime::from_timestamp_millis(t0).unwrap();
    let mut d = engine(config());
    let mut alerts = d.observe_received(&mk_event("user:mallory", t0 + 9 * MIN, 0), received);
    alerts.extend(d.observe_received(&mk_deny("user:prober", t0 + 9 * MIN, "default_deny"), received));
    for i in 0..50 {
        alerts.extend(d.observe_received(&mk_event("user:mallory", t0 + i * 100, 10_000), received));
        alerts.extend(d.observe_received(&mk_deny("user:prober", t0 + i * 100, "default_deny"), received));
    }
    assert_eq!(d.stats().late, 0, "{:?}", d.stats());
    assert_eq!(of(&alerts, "volume", "user:mallory").len(), 1, "{}", describe(&alerts));
    assert_eq!(of(&alerts, "denial_burst", "user:prober").len(), 1, "{}", describe(&alerts));
    // The future-dated event itself counts at its receipt: its alert is dated then.
    assert!(alerts.iter().all(|a| at(&a.time) <= t0 + 50 * 100), "{}", describe(&alerts));

    // Without a receipt time (a replay) the event's own time is taken, as before.
    let mut replay = engine(config());
    replay.observe(&mk_event("user:mallory", t0 + 9 * MIN, 0));
    for i in 0..50 {
        replay.observe(&mk_event("user:mallory", t0 + i * 100, 10_000));
    }
    assert_eq!(replay.stats().late, 50);
}

/// first_seen's learning period starts at the first receipt (the collector's start), not at
/// the first event's own time: an old event delivered first (a sender's spool, a forged time)
/// no longer ends the learning period at once, which made every principal "new".
#[test]
fn first_seen_learns_from_the_first_receipt_not_from_an_old_event() {
    let now = at("2026-03-03T10:00:00Z");
    let received = |t: i64| chrono::DateTime::from_timestamp_millis(t).unwrap();
    let mut d = engine(config());
    d.observe_received(&mk_event("user:old", now - 6 * DAY, 1), received(now));
    let alerts = d.observe_received(&mk_event("user:newcomer", now + HOUR, 1), received(now + HOUR));
    assert!(of(&alerts, "first_seen", "user:newcomer").is_empty(), "{}", describe(&alerts));
    let later = now + DAY + HOUR;
    let alerts = d.observe_received(&mk_event("user:later", later, 1), received(later));
    assert_eq!(of(&alerts, "first_seen", "user:later").len(), 1, "{}", describe(&alerts));
}

#[test]
fn invalid_events_are_counted_not_used() {
    let mut d = engine(config());
    let mut e = mk_event("user:x", at("2024-03-05T10:00:00Z"), 1);
    e.time = "yesterday".into();
    assert!(d.observe(&e).is_empty());
    let mut e = mk_event("", at("2024-03-05T10:00:00Z"), 1);
    e.principal.clear();
    assert!(d.observe(&e).is_empty());
    let s = d.stats();
    assert_eq!((s.events, s.invalid, s.tracked_principals), (2, 2, 0));
}

#[test]
fn memory_is_bounded_and_evictions_are_counted() {
    let mut c = config();
    c.max_principals = 50;
    c.state_ttl = Duration::from_secs(3600);
    let mut d = engine(c);
    let t0 = at("2024-03-05T10:00:00+08:00");
    for i in 0..500 {
        d.observe(&mk_event(&format!("user:u{i}"), t0 + i, 1));
        assert!(d.tracked_principals() <= 50);
    }
    let s = d.stats();
    assert_eq!(s.evicted_capacity, 450, "{s:?}");
    // Two hours later every one of them is idle.
    d.observe(&mk_event("user:late-riser", t0 + 2 * HOUR, 1));
    let s = d.stats();
    assert_eq!(s.tracked_principals, 1, "{s:?}");
    assert_eq!(s.evicted_idle, 50, "{s:?}");
}

#[test]
fn disabled_detectors_stay_silent() {
    let mut c = config();
    for kind in DetectorKind::ALL {
        c.set_enabled(kind, false);
    }
    let mut d = engine(c);
    let t0 = at("2024-03-06T03:00:00+08:00");
    let mut alerts = d.observe(&mk_event("user:x", t0, 500_000));
    for i in 0..50 {
        alerts.extend(d.observe(&mk_deny("user:x", t0 + i, "out_of_scope")));
    }
    assert!(alerts.is_empty(), "{}", describe(&alerts));
}

#[tokio::test]
async fn alerts_are_stored_once_however_often_they_are_raised() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        custos_store::open(&format!("sqlite:{}", dir.path().join("audit.db").display())).await.unwrap();
    let t0 = at("2024-03-06T03:00:00+08:00");
    let events: Vec<_> = (0..30).map(|i| mk_deny("user:probe", t0 + i * 1_000, "out_of_scope")).collect();
    let first = engine(config()).observe_all(&events);
    let replayed = engine(config()).observe_all(&events);
    assert_eq!(first.len(), 2, "{}", describe(&first)); // denial_burst and row_filter_burst
    assert_eq!(store.insert_alerts(&first).await.unwrap(), 2);
    assert_eq!(store.insert_alerts(&replayed).await.unwrap(), 0);
    let stored = store.alerts(None, 0).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|a| first.contains(a)));
}
