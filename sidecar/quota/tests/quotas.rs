//! Quota semantics: exact boundaries, independence, cluster usage, eviction.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use custos_api::collector::{RuleUsage, UsageResponse};
use custos_api::policy::Limits;
use custos_quota::{Admission, Exceeded, LimitKind, QuotaKey, QuotaSettings, Quotas, Timestamp};
use support::*;

fn quotas() -> Quotas {
    Quotas::new(QuotaSettings::default())
}

fn ok(remaining: Option<u64>) -> Result<Admission, Exceeded> {
    Ok(Admission { records_remaining: remaining })
}

fn refused(limit: LimitKind, retry_secs: u64) -> Result<Admission, Exceeded> {
    Err(Exceeded { limit, retry_after: secs(retry_secs) })
}

fn usage(rule: &str, requests: u64, hour: u64, day: u64) -> UsageResponse {
    let mut rules = BTreeMap::new();
    rules.insert(
        rule.to_owned(),
        RuleUsage { requests_last_minute: requests, records_last_hour: hour, records_last_day: day },
    );
    UsageResponse {
        policy: "customer-api".into(),
        principal: "user:alice".into(),
        as_of: String::new(),
        rules,
        instance: None,
        rules_without_instance: None,
    }
}

#[test]
fn rpm_burst_refusal_and_refill() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(3), None, None);
    for _ in 0..3 {
        assert_eq!(q.admit(&k, &l, at(0)), ok(None));
    }
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RequestsPerMinute, 20));
    // Refused requests take nothing: still 20 s from the same instant.
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RequestsPerMinute, 20));
    assert_eq!(q.admit(&k, &l, at(5)), refused(LimitKind::RequestsPerMinute, 15));
    // 1 ms short of a token: Retry-After rounds up to 1 s.
    assert_eq!(q.admit(&k, &l, at_ms(19_999)), refused(LimitKind::RequestsPerMinute, 1));
    assert_eq!(q.admit(&k, &l, at(20)), ok(None));
    assert_eq!(q.admit(&k, &l, at(20)), refused(LimitKind::RequestsPerMinute, 20));
    // A full minute refills the whole bucket, never more than its capacity.
    let later = 20 + 10 * MIN;
    for _ in 0..3 {
        assert_eq!(q.admit(&k, &l, at(later)), ok(None));
    }
    assert_eq!(q.admit(&k, &l, at(later)), refused(LimitKind::RequestsPerMinute, 20));
}

#[test]
fn rpm_sustained_rate() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(60), None, None);
    for _ in 0..60 {
        assert!(q.admit(&k, &l, at(0)).is_ok());
    }
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RequestsPerMinute, 1));
    // One token per second after the burst: 120 requests over 120 s pass, one each second.
    for s in 1..=120 {
        assert_eq!(q.admit(&k, &l, at(s)), ok(None), "second {s}");
        assert!(q.admit(&k, &l, at(s)).is_err(), "second {s}");
    }
}

#[test]
fn records_per_hour_boundaries() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(None, Some(10), None);
    assert_eq!(q.admit(&k, &l, at(0)), ok(Some(10)));
    q.record(&k, &l, 4, at(0));
    assert_eq!(q.admit(&k, &l, at(10 * MIN)), ok(Some(6)));
    q.record(&k, &l, 4, at(10 * MIN));
    assert_eq!(q.admit(&k, &l, at(20 * MIN)), ok(Some(2)));
    q.record(&k, &l, 2, at(20 * MIN));
    // Nothing left. The oldest bucket ([T, T+1 min), 4 records) expires at T + 61 min.
    assert_eq!(q.admit(&k, &l, at(30 * MIN)), refused(LimitKind::RecordsPerHour, 31 * MIN));
    assert_eq!(q.admit(&k, &l, at(61 * MIN - 1)), refused(LimitKind::RecordsPerHour, 1));
    assert_eq!(q.admit(&k, &l, at(61 * MIN)), ok(Some(4)));
    q.record(&k, &l, 4, at(61 * MIN));
    // Next to expire: the 4 of T + 10 min, at T + 71 min.
    assert_eq!(q.admit(&k, &l, at(65 * MIN)), refused(LimitKind::RecordsPerHour, 6 * MIN));
    assert_eq!(q.admit(&k, &l, at(71 * MIN)), ok(Some(4)));
    // Two hours on, everything has expired.
    assert_eq!(q.admit(&k, &l, at(200 * MIN)), ok(Some(10)));
}

#[test]
fn records_freed_only_once_enough_expires() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(None, Some(10), None);
    q.record(&k, &l, 1, at(0));
    q.record(&k, &l, 1, at(MIN));
    q.record(&k, &l, 12, at(2 * MIN)); // a caller that did not truncate
    // 14 used of 10: five must go; only the third bucket (expiring at T + 63 min) frees them.
    assert_eq!(q.admit(&k, &l, at(3 * MIN)), refused(LimitKind::RecordsPerHour, 60 * MIN));
    assert_eq!(q.admit(&k, &l, at(62 * MIN)), refused(LimitKind::RecordsPerHour, MIN));
    assert_eq!(q.admit(&k, &l, at(63 * MIN)), ok(Some(10)));
}

#[test]
fn records_per_day_window() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(None, Some(100), Some(5));
    assert_eq!(q.admit(&k, &l, at(0)), ok(Some(5)));
    q.record(&k, &l, 3, at(0));
    assert_eq!(q.admit(&k, &l, at(2 * HOUR)), ok(Some(2)));
    q.record(&k, &l, 2, at(2 * HOUR + 5 * MIN));
    // The day is used up while the hour has room; the 3 records of T's quarter hour
    // ([T, T+15 min)) go at T + 24 h 15 min.
    assert_eq!(q.admit(&k, &l, at(3 * HOUR)), refused(LimitKind::RecordsPerDay, DAY + 15 * MIN - 3 * HOUR));
    assert_eq!(q.admit(&k, &l, at(DAY + 15 * MIN - 1)), refused(LimitKind::RecordsPerDay, 1));
    assert_eq!(q.admit(&k, &l, at(DAY + 15 * MIN)), ok(Some(3)));
    // The hour figure is the smaller one when it is.
    q.record(&k, &l, 1, at(DAY + 15 * MIN));
    let l2 = limits(None, Some(1), Some(5));
    assert_eq!(q.admit(&k, &l2, at(DAY + 16 * MIN)), refused(LimitKind::RecordsPerHour, 60 * MIN));
    let l3 = limits(None, Some(3), Some(5));
    assert_eq!(q.admit(&k, &l3, at(DAY + 16 * MIN)), ok(Some(2)));
}

#[test]
fn longest_wait_is_reported() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(1), Some(2), None);
    assert_eq!(q.admit(&k, &l, at(0)), ok(Some(2)));
    q.record(&k, &l, 2, at(0));
    // Both refuse: the hour (61 min) outlasts the bucket (60 s).
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RecordsPerHour, 61 * MIN));
    let k2 = key("user:bob");
    assert!(q.admit(&k2, &l, at(0)).is_ok());
    q.record(&k2, &l, 1, at(0));
    assert_eq!(q.admit(&k2, &l, at(0)), refused(LimitKind::RequestsPerMinute, 60));
}

#[test]
fn no_limits_cost_nothing() {
    let q = quotas();
    let k = key("user:alice");
    let none = Limits { max_records_per_response: Some(5), ..Limits::default() };
    for _ in 0..1_000 {
        assert_eq!(q.admit(&k, &none, at(0)), ok(None));
        q.record(&k, &none, 1_000, at(0));
    }
    assert_eq!(q.tracked(), 0);
    // Requests-only limits track the key but say nothing about records.
    q.record(&k, &limits(Some(5), None, None), 10, at(0));
    assert_eq!(q.tracked(), 0);
    assert_eq!(q.admit(&k, &limits(Some(5), None, None), at(0)), ok(None));
    assert_eq!(q.tracked(), 1);
}

#[test]
fn zero_limits_refuse_everything() {
    let q = quotas();
    let k = key("user:alice");
    assert_eq!(q.admit(&k, &limits(Some(0), None, None), at(0)), refused(LimitKind::RequestsPerMinute, 60));
    assert_eq!(q.admit(&k, &limits(None, Some(0), None), at(0)), refused(LimitKind::RecordsPerHour, HOUR));
    assert_eq!(q.admit(&k, &limits(None, None, Some(0)), at(0)), refused(LimitKind::RecordsPerDay, DAY));
}

#[test]
fn counts_saturate() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(u32::MAX), Some(u64::MAX), Some(u64::MAX));
    assert_eq!(q.admit(&k, &l, at(0)), ok(Some(u64::MAX)));
    q.record(&k, &l, u64::MAX, at(0));
    q.record(&k, &l, u64::MAX, at(0));
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RecordsPerDay, DAY + 15 * MIN));
    assert_eq!(q.admit(&k, &l, at(61 * MIN)), refused(LimitKind::RecordsPerDay, DAY + 15 * MIN - 61 * MIN));
    assert_eq!(q.admit(&k, &l, Timestamp::from_millis(u64::MAX)), ok(Some(u64::MAX)));
}

#[test]
fn clock_going_back_is_harmless() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(2), Some(5), None);
    assert!(q.admit(&k, &l, at(100)).is_ok());
    q.record(&k, &l, 3, at(100));
    assert!(q.admit(&k, &l, at(50)).is_ok());
    q.record(&k, &l, 2, at(50));
    // No refill for negative time; the records of the past count in the newest bucket.
    assert_eq!(q.admit(&k, &l, at(40)).unwrap_err().limit, LimitKind::RecordsPerHour);
    // They expire with the newest bucket ([T + 1 min, T + 2 min)), at T + 2 min + 1 h.
    assert_eq!(q.admit(&k, &l, at(100 + HOUR)), refused(LimitKind::RecordsPerHour, 20));
}

/// A request under several rules is counted under every one or under none: a refusal by
/// any key leaves the others' counts as they were.
#[test]
fn admit_all_counts_all_or_nothing() {
    let q = quotas();
    let alice = key("user:alice");
    let bob = QuotaKey::new("customer-api", "export", "user:alice");
    let loose = limits(Some(3), Some(5), None);
    let tight = limits(Some(1), None, None);
    assert_eq!(q.admit_all(&[], at(0)), Ok(Vec::new()));
    assert_eq!(
        q.admit_all(&[(&alice, &loose), (&bob, &tight)], at(0)),
        Ok(vec![Admission { records_remaining: Some(5) }, Admission { records_remaining: None }])
    );
    assert_eq!(q.tracked(), 2, "each key counted");
    for _ in 0..3 {
        let (at_key, exceeded) = q.admit_all(&[(&alice, &loose), (&bob, &tight)], at(0)).unwrap_err();
        assert_eq!((at_key, exceeded.limit), (1, LimitKind::RequestsPerMinute), "the second key refuses");
    }
    // Refused three times, alice's key still has the two tokens the first request left.
    assert_eq!(q.admit(&alice, &loose, at(0)), ok(Some(5)));
    assert_eq!(q.admit(&alice, &loose, at(0)), ok(Some(5)));
    assert_eq!(q.admit(&alice, &loose, at(0)), refused(LimitKind::RequestsPerMinute, 20));
    // A key not tracked yet that refuses (a zero limit) counts nothing either, and makes no entry.
    let carol = key("user:carol");
    let (at_key, _) = q
        .admit_all(&[(&carol, &loose), (&key("user:dave"), &limits(Some(0), None, None))], at(0))
        .unwrap_err();
    assert_eq!(at_key, 1);
    assert_eq!(q.tracked(), 2, "nothing made for carol or dave");
    // Rules without limits cost nothing and stay untracked.
    assert_eq!(
        q.admit_all(&[(&carol, &limits(None, None, None))], at(0)),
        Ok(vec![Admission { records_remaining: None }])
    );
    assert_eq!(q.tracked(), 2);
}

/// In a full table, making room for a joint admission's second key does not evict its first
/// (just counted, so not refused: it would be ranked before the refused keys).
#[test]
fn admit_all_does_not_evict_its_own_keys() {
    let q = Quotas::new(QuotaSettings { max_tracked: 4, shards: 1, ..QuotaSettings::default() });
    let one = limits(Some(1), None, None);
    for who in ["user:a", "user:b", "user:c"] {
        assert!(q.admit(&key(who), &one, at(0)).is_ok());
        assert!(q.admit(&key(who), &one, at(0)).is_err(), "{who} is now refused");
    }
    let (first, second) = (key("user:first"), key("user:second"));
    assert!(q.admit_all(&[(&first, &one), (&second, &one)], at(0)).is_ok());
    assert_eq!(
        q.admit(&first, &one, at(0)),
        refused(LimitKind::RequestsPerMinute, 60),
        "first keeps its count"
    );
    assert_eq!(q.admit(&second, &one, at(0)), refused(LimitKind::RequestsPerMinute, 60));
}

/// Under concurrent requests, a key counts exactly the joint admissions that succeeded: no
/// request refused by one key is left counted under another (checking every key and then
/// admitting each in turn leaks a token whenever another request takes the last one between).
#[test]
fn admit_all_is_atomic_under_contention() {
    let q = Arc::new(Quotas::new(QuotaSettings { shards: 4, ..QuotaSettings::default() }));
    let wide = key("user:alice");
    let narrow = QuotaKey::new("customer-api", "export", "user:alice");
    let (wide_limit, narrow_limit) = (limits(Some(100_000), None, None), limits(Some(400), None, None));
    let start = std::sync::Barrier::new(6);
    let joint: u64 = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..4 {
            handles.push(scope.spawn(|| {
                start.wait();
                let mut admitted = 0u64;
                for _ in 0..1_000 {
                    admitted += u64::from(
                        q.admit_all(&[(&wide, &wide_limit), (&narrow, &narrow_limit)], at(0)).is_ok(),
                    );
                }
                admitted
            }));
        }
        // Requests under the narrow rule alone compete for the same tokens.
        for _ in 0..2 {
            scope.spawn(|| {
                start.wait();
                for _ in 0..1_000 {
                    let _ = q.admit(&narrow, &narrow_limit, at(0));
                }
            });
        }
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert!(joint <= 400, "never more than the narrow rule allows: {joint}");
    let mut wide_left = 0u64;
    while q.admit(&wide, &wide_limit, at(0)).is_ok() {
        wide_left += 1;
    }
    assert_eq!(wide_left, 100_000 - joint, "the wide rule counted exactly the joint admissions");
}

#[test]
fn keys_are_independent() {
    let q = quotas();
    let l = limits(Some(1), Some(3), None);
    let keys = [
        QuotaKey::new("customer-api", "read", "user:alice"),
        QuotaKey::new("customer-api", "read", "user:bob"),
        QuotaKey::new("customer-api", "export", "user:alice"),
        QuotaKey::new("orders-api", "read", "user:alice"),
        QuotaKey::new("customer-api", "read", "workload:logistics/ops-portal"),
        QuotaKey::new("customer-api", "read", "peer:10.0.0.7"),
    ];
    for k in &keys {
        assert_eq!(q.admit(k, &l, at(0)), ok(Some(3)), "{k:?}");
        q.record(k, &l, 3, at(0));
    }
    for k in &keys {
        assert_eq!(q.admit(k, &l, at(0)).unwrap_err().limit, LimitKind::RecordsPerHour, "{k:?}");
    }
    assert_eq!(q.tracked(), keys.len());
}

#[test]
fn exceeded_display_names_the_limit_not_the_principal() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(3), None, None);
    for _ in 0..3 {
        q.admit(&k, &l, at(0)).unwrap();
    }
    let e = q.admit(&k, &l, at(0)).unwrap_err();
    assert_eq!(e.to_string(), "quota exceeded: requestsPerMinute; retry after 20 s");
    assert_eq!(e.retry_after_secs(), 20);
    assert_eq!(LimitKind::RecordsPerDay.as_str(), "recordsPerDay");
}

// ---------------------------------------------------------------- cluster usage

/// One replica with a collector that reports its own events behaves exactly as one without.
#[test]
fn single_replica_with_collector_is_unchanged() {
    let with = quotas();
    let without = quotas();
    let mut collector = Collector::default();
    let k = key("user:alice");
    let l = limits(Some(5), Some(40), Some(100));
    let mut t = 0u64;
    for step in 0..600u64 {
        t += [1, 3, 7, 30, 400][(step % 5) as usize] * 1_000 / 4 + step % 11;
        let now = at_ms(t);
        if step % 4 == 0 {
            // Reports lag a little behind and arrive in between requests.
            let as_of = at_ms(t.saturating_sub(1_500));
            with.apply_cluster_usage(
                "customer-api",
                "user:alice",
                &collector.usage("customer-api", "user:alice", as_of),
                as_of,
                now,
            );
        }
        let a = with.admit(&k, &l, now);
        assert_eq!(a, without.admit(&k, &l, now), "step {step}");
        if let Ok(Admission { records_remaining: Some(left) }) = a {
            collector.request("read", now);
            let n = (step * 7 % 13).min(left);
            with.record(&k, &l, n, now);
            without.record(&k, &l, n, now);
            collector.records("read", n, now);
        }
    }
}

/// A crawler spread round-robin over three replicas, asking 10 records per request.
fn farm(limit: u64, sync_every: Option<usize>) -> u64 {
    let replicas: Vec<Quotas> = (0..3).map(|_| quotas()).collect();
    let mut collector = Collector::default();
    let k = key("user:alice");
    let l = limits(None, Some(limit), None);
    let mut served = 0;
    for i in 0..300usize {
        let now = at(i as u64);
        if let Some(every) = sync_every
            && i % every == 0
        {
            for r in &replicas {
                let u = collector.usage("customer-api", "user:alice", now);
                r.apply_cluster_usage("customer-api", "user:alice", &u, now, now);
            }
        }
        let replica = &replicas[i % 3];
        if let Ok(a) = replica.admit(&k, &l, now) {
            let n = a.records_remaining.unwrap().min(10);
            replica.record(&k, &l, n, now);
            collector.records("read", n, now);
            served += n;
        }
    }
    served
}

#[test]
fn replicas_cannot_be_farmed_for_records() {
    // Without the collector each replica serves its own 100.
    assert_eq!(farm(100, None), 300);
    // With usage after every request the three together serve exactly the limit.
    assert_eq!(farm(100, Some(1)), 100);
    // With usage every 6 requests, the two other replicas may each serve what they were
    // allowed since the last report: at most 2 requests × 10 records each.
    let served = farm(100, Some(6));
    assert!((100..=100 + 2 * 2 * 10).contains(&served), "{served}");
}

#[test]
fn replicas_cannot_be_farmed_for_requests() {
    const L: u32 = 60;
    let replicas: Vec<Quotas> = (0..3).map(|_| quotas()).collect();
    let mut collector = Collector::default();
    let k = key("user:alice");
    let l = limits(Some(L), None, None);
    let mut admitted_at = Vec::new();
    // 12 requests a second for 10 minutes, round-robin; usage every 5 s.
    for i in 0..(12 * 600u64) {
        let now = at_ms(i * 1_000 / 12);
        if i % 60 == 0 {
            for r in &replicas {
                let u = collector.usage("customer-api", "user:alice", now);
                r.apply_cluster_usage("customer-api", "user:alice", &u, now, now);
            }
        }
        if replicas[(i % 3) as usize].admit(&k, &l, now).is_ok() {
            collector.request("read", now);
            admitted_at.push(now.as_millis());
        }
    }
    let total = admitted_at.len() as u64;
    // A single bucket would allow the burst L plus L per minute: 660 in 10 minutes. Three
    // unsynchronised buckets would allow 3 × 660. Allow for reports every 5 s.
    assert!(total <= 660 + 60, "{total}");
    assert!(total >= 600, "{total}");
    // Any 60 s window: at most what a single bucket allows, 2L.
    for (i, &t) in admitted_at.iter().enumerate() {
        let in_window = admitted_at[i..].iter().take_while(|&&u| u < t + 60_000).count() as u64;
        assert!(in_window <= 2 * u64::from(L), "{in_window} at {t}");
    }
}

#[test]
fn stale_usage_is_ignored() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(10), Some(100), Some(1_000));
    let now = at(2 * DAY);
    // Older than every window: ignored entirely, nothing created.
    let old = now.saturating_sub(secs(DAY));
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 10, 100, 1_000), old, now),
        0
    );
    assert_eq!(q.tracked(), 0);
    assert_eq!(q.admit(&k, &l, now), ok(Some(100)));
    // Two hours old: only the day figure counts.
    let q = quotas();
    let as_of = now.saturating_sub(secs(2 * HOUR));
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 10, 100, 950), as_of, now),
        1
    );
    assert_eq!(q.admit(&k, &l, now), ok(Some(50)));
    // Ninety seconds old: the hour counts, not the requests.
    let q = quotas();
    let as_of = now.saturating_sub(secs(90));
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 10, 30, 30), as_of, now),
        1
    );
    for _ in 0..10 {
        assert_eq!(q.admit(&k, &l, now), ok(Some(70)));
    }
    // The hour figure ages out one hour after as_of.
    assert_eq!(q.admit(&k, &l, as_of + secs(HOUR) - secs(1)), ok(Some(70)));
    assert_eq!(q.admit(&k, &l, as_of + secs(HOUR)), ok(Some(100)));
}

#[test]
fn local_count_wins_over_a_lagging_cluster_figure() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(None, Some(100), None);
    q.admit(&k, &l, at(0)).unwrap();
    q.record(&k, &l, 50, at(0));
    // The collector has only seen 20 of this replica's 50.
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 20, 20), at(10), at(10)),
        1
    );
    assert_eq!(q.admit(&k, &l, at(10)), ok(Some(50)));
    // It has seen the 50 and 30 more from elsewhere.
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 80, 80), at(20), at(20)),
        1
    );
    assert_eq!(q.admit(&k, &l, at(20)), ok(Some(20)));
    // Local records after as_of add to the cluster figure.
    q.record(&k, &l, 15, at(2 * MIN));
    assert_eq!(q.admit(&k, &l, at(2 * MIN)), ok(Some(5)));
    assert_eq!(q.admit(&k, &l, at(HOUR)), ok(Some(5)));
    // The others' 30 count until as_of + 1 h; local records until their bucket expires.
    assert_eq!(q.admit(&k, &l, at(20 + HOUR)), ok(Some(35)));
    assert_eq!(q.admit(&k, &l, at(61 * MIN)), ok(Some(85)));
    assert_eq!(q.admit(&k, &l, at(63 * MIN)), ok(Some(100)));
}

/// With the figures without this replica's own events (`rulesWithoutInstance`), the others'
/// usage is the larger of those and `cluster - local`: this replica's events the collector
/// does not have yet (queued, spooled) no longer lower it, and its delivered events that its
/// own counts lost (an evicted key) still count.
#[test]
fn figures_without_this_replicas_events_bound_the_others_usage_from_below() {
    let (k, l) = (key("user:alice"), limits(Some(10), Some(100), None));
    // The collector has none of this replica's events: the others used 4 requests and 30
    // records.
    let run = |without: Option<(u64, u64)>| {
        let q = quotas();
        q.admit(&k, &l, at(0)).unwrap();
        q.record(&k, &l, 50, at(0));
        let mut u = usage("read", 4, 30, 30);
        u.rules_without_instance = without.map(|(requests, records)| {
            BTreeMap::from([(
                "read".to_owned(),
                RuleUsage {
                    requests_last_minute: requests,
                    records_last_hour: records,
                    records_last_day: records,
                },
            )])
        });
        assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &u, at(10), at(10)), 1);
        q
    };
    // With them: 50 here + 30 elsewhere.
    assert_eq!(run(Some((4, 30))).admit(&k, &l, at(10)), ok(Some(20)));
    // From an older collector: 30 - 50 < 0, nothing elsewhere (the under-count this avoids).
    assert_eq!(run(None).admit(&k, &l, at(10)), ok(Some(50)));
    // Requests, 10 a minute (the bucket full again at 10 s): the others' 4 hold 4 tokens, so 6
    // pass; from an older collector, 4 - 1 (this replica's) = 3 held, and 7 pass.
    let passed = |q: Quotas| (0..20).take_while(|_| q.admit(&k, &l, at(10)).is_ok()).count();
    assert_eq!(passed(run(Some((4, 30)))), 6);
    assert_eq!(passed(run(None)), 7);

    // A replica whose own count is gone (an evicted key: here a fresh table) while the
    // collector holds its 50 delivered records: cluster - local keeps them; the figure
    // without its events alone would not.
    let q = quotas();
    let mut u = usage("read", 0, 80, 80);
    u.rules_without_instance = Some(BTreeMap::from([(
        "read".to_owned(),
        RuleUsage { records_last_hour: 30, records_last_day: 30, ..RuleUsage::default() },
    )]));
    assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &u, at(10), at(10)), 1);
    assert_eq!(q.admit(&k, &l, at(10)), ok(Some(20)));
    // A rule the figures without its events lack: all of its usage is this replica's.
    let q = quotas();
    q.admit(&k, &l, at(0)).unwrap();
    q.record(&k, &l, 50, at(0));
    let mut u = usage("read", 1, 50, 50);
    u.rules_without_instance = Some(BTreeMap::new());
    assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &u, at(10), at(10)), 1);
    assert_eq!(q.admit(&k, &l, at(10)), ok(Some(50)));
}

#[test]
fn older_or_foreign_reports_are_ignored() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(None, Some(100), None);
    q.admit(&k, &l, at(0)).unwrap();
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 40, 40), at(20), at(20)),
        1
    );
    // Out of order: an older report does not replace the newer one.
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 0, 0), at(10), at(21)),
        0
    );
    assert_eq!(q.admit(&k, &l, at(21)), ok(Some(60)));
    // The collector answering about someone else is not applied.
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:bob", &usage("read", 0, 99, 99), at(30), at(30)),
        0
    );
    assert_eq!(
        q.apply_cluster_usage("orders-api", "user:alice", &usage("read", 0, 99, 99), at(30), at(30)),
        0
    );
    assert_eq!(q.admit(&k, &l, at(30)), ok(Some(60)));
    // as_of ahead of this clock is taken as now (so it ages out from now).
    assert_eq!(
        q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 10, 10), at(600), at(40)),
        1
    );
    assert_eq!(q.admit(&k, &l, at(40)), ok(Some(90)));
    assert_eq!(q.admit(&k, &l, at(40 + HOUR)), ok(Some(100)));
}

#[test]
fn cluster_requests_hold_the_bucket() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(6), None, None);
    q.admit(&k, &l, at(0)).unwrap();
    // 5 requests cluster-wide, 1 of them ours: the other replicas hold 4 of our 5 tokens.
    assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 5, 0, 0), at(0), at(0)), 1);
    assert_eq!(q.admit(&k, &l, at(0)), ok(None));
    // Now 4 tokens, 4 held; the bucket refills at 6 - 4 = 2 tokens a minute: 30 s per token.
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RequestsPerMinute, 30));
    assert_eq!(q.admit(&k, &l, at(30)), ok(None));
    assert_eq!(q.admit(&k, &l, at(30)), refused(LimitKind::RequestsPerMinute, 30));
    // When the others' figure ages out (as_of + 60 s), their tokens are free again.
    for _ in 0..5 {
        assert_eq!(q.admit(&k, &l, at(60)), ok(None));
    }
    assert_eq!(q.admit(&k, &l, at(60)), refused(LimitKind::RequestsPerMinute, 10));
}

#[test]
fn others_at_the_limit_refuse_until_their_figure_ages_out() {
    let q = quotas();
    let k = key("user:alice");
    let l = limits(Some(3), None, None);
    assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 3, 0, 0), at(0), at(0)), 1);
    // No refill while others hold all 3 tokens: wait the 60 s of their figure.
    assert_eq!(q.admit(&k, &l, at(0)), refused(LimitKind::RequestsPerMinute, 60));
    assert_eq!(q.admit(&k, &l, at(60)), ok(None));
}

#[test]
fn usage_for_untracked_rules_is_kept_but_not_active() {
    let q = quotas();
    let mut rules = BTreeMap::new();
    rules.insert(
        "read".to_owned(),
        RuleUsage { requests_last_minute: 0, records_last_hour: 7, records_last_day: 7 },
    );
    rules.insert("export".to_owned(), RuleUsage::default());
    let u = UsageResponse {
        policy: "customer-api".into(),
        principal: "user:alice".into(),
        as_of: String::new(),
        rules,
        instance: None,
        rules_without_instance: None,
    };
    assert_eq!(q.apply_cluster_usage("customer-api", "user:alice", &u, at(0), at(0)), 1);
    assert_eq!(q.tracked(), 1);
    assert!(q.active_principals(at(0), secs(60)).is_empty());
    assert_eq!(q.admit(&key("user:alice"), &limits(None, Some(10), None), at(1)), ok(Some(3)));
    assert_eq!(
        q.active_principals(at(1), secs(60)),
        vec![("customer-api".to_owned(), "user:alice".to_owned())]
    );
}

// ---------------------------------------------------------------- memory

#[test]
fn active_principals_are_recent_and_distinct() {
    let q = quotas();
    let l = limits(Some(10), None, None);
    q.admit(&QuotaKey::new("p1", "a", "user:alice"), &l, at(0)).unwrap();
    q.admit(&QuotaKey::new("p1", "b", "user:alice"), &l, at(100)).unwrap();
    q.admit(&QuotaKey::new("p1", "a", "user:bob"), &l, at(10)).unwrap();
    q.admit(&QuotaKey::new("p2", "a", "user:bob"), &l, at(100)).unwrap();
    let pair = |p: &str, u: &str| (p.to_owned(), u.to_owned());
    assert_eq!(
        q.active_principals(at(100), secs(90)),
        vec![pair("p1", "user:alice"), pair("p1", "user:bob"), pair("p2", "user:bob")]
    );
    assert_eq!(
        q.active_principals(at(100), secs(60)),
        vec![pair("p1", "user:alice"), pair("p2", "user:bob")]
    );
}

#[test]
fn idle_eviction_is_lossless() {
    let q = Quotas::new(QuotaSettings { idle_after: secs(5 * MIN), ..QuotaSettings::default() });
    let rpm_only = limits(Some(2), None, None);
    let records = limits(None, None, Some(3));
    let a = key("user:a");
    let b = key("user:b");
    q.admit(&a, &rpm_only, at(0)).unwrap();
    q.admit(&a, &rpm_only, at(0)).unwrap();
    q.admit(&b, &records, at(0)).unwrap();
    q.record(&b, &records, 3, at(0));
    assert_eq!(q.evict_idle(at(MIN)), 0);
    // Idle long enough, bucket full again, request window gone: `a` goes. `b` is refused for
    // a day and stays however idle it is.
    assert_eq!(q.evict_idle(at(5 * MIN)), 1);
    assert_eq!(q.tracked(), 1);
    assert_eq!(q.evict_idle(at(20 * HOUR)), 0);
    assert_eq!(q.admit(&b, &records, at(20 * HOUR)).unwrap_err().limit, LimitKind::RecordsPerDay);
    // Seen at 20 h: not idle yet when its records go (24 h 15 min), idle and empty after.
    assert_eq!(q.evict_idle(at(DAY + 15 * MIN)), 0);
    assert_eq!(q.evict_idle(at(DAY + 2 * HOUR)), 1);
    assert_eq!(q.tracked(), 0);
    // Cluster figures that still count keep a key too.
    q.apply_cluster_usage("customer-api", "user:alice", &usage("read", 0, 5, 5), at(2 * DAY), at(2 * DAY));
    assert_eq!(q.evict_idle(at(2 * DAY + 2 * HOUR)), 0);
    assert_eq!(q.evict_idle(at(3 * DAY)), 1);
    assert_eq!(q.pressure_evictions(), 0);
}

#[test]
fn a_flood_of_principals_is_bounded_and_spares_the_refused() {
    let q = Quotas::new(QuotaSettings { max_tracked: 10_000, ..QuotaSettings::default() });
    let l = limits(Some(100), Some(10), None);
    let crawler = key("user:crawler");
    q.admit(&crawler, &l, at(0)).unwrap();
    q.record(&crawler, &l, 10, at(0));
    assert!(q.admit(&crawler, &l, at(0)).is_err());
    // 100k other principals, each served one record: they hold usage but are not refused.
    for i in 0..100_000u64 {
        let k = key(&format!("peer:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
        let now = at_ms(1_000 + i);
        q.admit(&k, &l, now).unwrap();
        q.record(&k, &l, 1, now);
        assert!(i % 1_000 != 0 || q.tracked() <= 10_000);
    }
    assert!(q.tracked() <= 10_000);
    assert!(q.tracked() >= 8_000, "{}", q.tracked());
    assert!(q.pressure_evictions() >= 90_000);
    // The least recently seen key of all, but refused: never chosen while others can go.
    assert_eq!(q.admit(&crawler, &l, at(200)).unwrap_err().limit, LimitKind::RecordsPerHour);
}

#[test]
fn a_flood_of_refused_principals_forgets_the_oldest() {
    // Documented trade-off: when every key is refused, the least recently seen goes and
    // starts again with a fresh quota.
    let q = Quotas::new(QuotaSettings { max_tracked: 1_000, shards: 4, ..QuotaSettings::default() });
    let l = limits(None, Some(1), None);
    let first = key("user:first");
    q.admit(&first, &l, at(0)).unwrap();
    q.record(&first, &l, 1, at(0));
    for i in 0..10_000u64 {
        let k = key(&format!("user:{i}"));
        q.admit(&k, &l, at(1 + i / 100)).unwrap();
        q.record(&k, &l, 1, at(1 + i / 100));
    }
    assert!(q.tracked() <= 1_000);
    assert_eq!(q.admit(&first, &l, at(200)), ok(Some(1)));
}

#[test]
fn lossless_keys_go_first_under_pressure() {
    let q = Quotas::new(QuotaSettings { max_tracked: 16, shards: 1, ..QuotaSettings::default() });
    let l = limits(None, Some(5), None);
    let heavy = key("user:heavy");
    q.admit(&heavy, &l, at(0)).unwrap();
    q.record(&heavy, &l, 2, at(0));
    // Admitted but never recorded: nothing to lose.
    for i in 0..40 {
        q.admit(&key(&format!("user:{i}")), &l, at(10)).unwrap();
    }
    assert!(q.tracked() <= 16);
    assert_eq!(q.pressure_evictions(), 0);
    assert_eq!(q.admit(&heavy, &l, at(20)), ok(Some(3)));
}

#[test]
fn tiny_tables_still_work() {
    let q = Quotas::new(QuotaSettings { max_tracked: 0, shards: 0, ..QuotaSettings::default() });
    let l = limits(Some(1), None, None);
    q.admit(&key("user:a"), &l, at(0)).unwrap();
    q.admit(&key("user:b"), &l, at(0)).unwrap();
    assert_eq!(q.tracked(), 1);
}

// ---------------------------------------------------------------- concurrency

#[test]
fn concurrent_admits_lose_no_update() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Quotas>();
    let q = Arc::new(quotas());
    let l = limits(Some(500), Some(1_000_000), None);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let q = Arc::clone(&q);
            let l = l.clone();
            std::thread::spawn(move || {
                let mut admitted = 0;
                for i in 0..400 {
                    // One shared principal, and one per thread.
                    if q.admit(&key("user:shared"), &l, at(0)).is_ok() {
                        admitted += 1;
                        q.record(&key("user:shared"), &l, 1, at(0));
                    }
                    q.admit(&key(&format!("user:{t}")), &l, at(0)).unwrap();
                    let _ = i;
                }
                admitted
            })
        })
        .collect();
    let total: u32 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 500);
    assert_eq!(q.tracked(), 5);
    assert_eq!(
        q.admit(&key("user:shared"), &limits(Some(500), Some(1_000_000), None), at(61)),
        ok(Some(1_000_000 - 500))
    );
}

/// A wall clock stepped back an hour: read raw, a principal that had used its bucket is
/// refused until the clock is back where it was; through `SteadyClock` it refills, at half
/// rate while the clock slews.
#[test]
fn a_wall_clock_stepped_back_locks_nobody_out_through_the_steady_clock() {
    use std::time::{Duration, UNIX_EPOCH};
    let wall = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let l = limits(Some(60), None, None);
    let k = key("user:alice");
    let t0 = 1_700_000_000;
    let drain = |q: &Quotas, now: Timestamp| {
        while q.admit(&k, &l, now).is_ok() {}
    };

    let raw = quotas();
    drain(&raw, Timestamp::from(wall(t0)));
    // An hour back, then ten seconds later: nothing refilled.
    assert!(raw.admit(&k, &l, Timestamp::from(wall(t0 - 3_600 + 10))).is_err());

    let steady = quotas();
    let mut clock = custos_quota::SteadyClock::default();
    drain(&steady, clock.time(wall(t0), Duration::ZERO));
    let admitted = (1..=10)
        .filter(|&s| steady.admit(&k, &l, clock.time(wall(t0 - 3_600 + s), Duration::from_secs(s))).is_ok())
        .count();
    // The clock holds at the first reading after the step, then runs at half speed: 4.5 s
    // of quota time in the next 9 s refill 4 whole tokens of the 60 per minute.
    assert_eq!(admitted, 4);
}
