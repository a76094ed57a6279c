//! The backend suite: every test runs against SQLite (a temporary file) and, when
//! `CUSTOS_TEST_POSTGRES_URL` is set, against PostgreSQL (a fresh schema per test).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use chrono::Duration;
use common::{Env, event, events, rfc3339, t0};
use custos_api::Decision;
use custos_store::{
    Alert, AnyStore, BreakKind, Error, EventQuery, GENESIS_HASH, Severity, StorePosition, TopBy, TopEntry,
    chain_hash,
};

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let env = super::Env::sqlite();
                    super::$name(&env).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(env) = super::Env::postgres().await else { return };
                    super::$name(&env).await;
                }
            )*
        }
    };
}

suite!(
    ingest_is_idempotent,
    partial_overlap_and_in_batch_duplicates,
    invalid_event_rejects_the_batch,
    inadmissible_events_are_refused_alike_by_both_stores,
    durable_across_reopen,
    verify_clean_chain,
    verify_catches_edited_rows,
    verify_catches_deleted_row,
    verify_catches_deleted_tail,
    a_cut_tail_fails_against_a_head_recorded_earlier,
    verify_catches_inserted_row,
    verify_catches_appended_row,
    verify_catches_a_row_planted_below_the_anchor,
    verify_catches_swapped_rows,
    verify_catches_record_index_tamper,
    verify_catches_a_moved_record_index_time,
    verify_catches_a_deleted_usage_index_row,
    verify_catches_a_deleted_rule_principal_row,
    verify_catches_a_cleared_rule_principal_column,
    verify_catches_an_edited_usage_index_row,
    verify_catches_a_usage_index_row_of_no_event,
    query_filters_and_pagination,
    subject_lookup,
    top_by_records_and_denials,
    usage_windows,
    usage_counts_the_rules_that_applied_beside_the_deciding_one,
    usage_counts_the_dry_runs_charged_to_their_rules,
    usage_counts_the_deciding_rule_under_its_rule_principal,
    usage_leaves_out_the_events_of_one_instance,
    prune_keeps_chain_verifiable,
    concurrent_prunes_and_verify_report_no_false_break,
    prune_refuses_a_broken_chain,
    events_older_than_the_pruned_part_are_not_stored_again,
    events_before_the_oldest_bound_are_expired,
    query_pages_are_bounded_in_bytes,
    a_clock_ahead_prunes_only_what_the_retention_allows,
    a_vouched_time_keeps_retention_a_maximum_without_new_events,
    following_the_store_reads_every_event_once_in_chain_order,
    events_by_dry_run,
    alerts_are_idempotent,
    concurrent_ingest_keeps_chain_valid,
    long_report_queries_are_stopped,
);

async fn all_ids(store: &AnyStore) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.query(&EventQuery { limit: 1000, cursor, ..EventQuery::default() }).await.unwrap();
        ids.extend(page.events.into_iter().map(|e| e.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return ids,
        }
    }
}

async fn assert_verifies(store: &AnyStore, checked: u64) {
    let report = store.verify(None).await.unwrap();
    assert_eq!(report.first_broken, None, "{report:?}");
    assert_eq!(report.checked, checked);
}

async fn ingest_is_idempotent(env: &Env) {
    let store = env.open().await;
    let batch = events("e", 10);
    let first = store.ingest(&batch).await.unwrap();
    assert_eq!((first.accepted, first.duplicates), (10, 0));
    let again = store.ingest(&batch).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 10));
    assert_eq!(all_ids(&store).await.len(), 10);
    assert_eq!(store.head().await.unwrap().seq, 10);
    assert_verifies(&store, 10).await;
    // An empty batch is fine.
    assert_eq!(store.ingest(&[]).await.unwrap().accepted, 0);
}

async fn partial_overlap_and_in_batch_duplicates(env: &Env) {
    let store = env.open().await;
    let all = events("e", 15);
    store.ingest(&all[..10]).await.unwrap();
    let out = store.ingest(&all[5..]).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (5, 5));
    let twice = vec![event("x", t0()), event("x", t0())];
    let out = store.ingest(&twice).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (1, 1));
    let ids = all_ids(&store).await;
    assert_eq!(ids.len(), 16);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 16);
    assert_verifies(&store, 16).await;

    // Which events were new, for consumers of stored events (the detectors): an old id, a new
    // one, the same old id again, a new id twice, another old one.
    let mixed = vec![
        all[2].clone(),
        event("y", t0()),
        all[2].clone(),
        event("z", t0()),
        event("z", t0()),
        all[14].clone(),
    ];
    let ingested = store.ingest_listing_new(&mixed).await.unwrap();
    assert_eq!(ingested.new, vec![1, 3]);
    assert_eq!((ingested.outcome.accepted, ingested.outcome.duplicates), (2, 4));
    // Reopened (a restarted collector knows nothing in memory): still only the new ones.
    drop(store);
    let reopened = env.open().await;
    let again = vec![event("y", t0()), event("w", t0()), all[0].clone()];
    assert_eq!(reopened.ingest_listing_new(&again).await.unwrap().new, vec![1]);
    assert_verifies(&reopened, 19).await;
}

async fn invalid_event_rejects_the_batch(env: &Env) {
    let store = env.open().await;
    let mut batch = events("e", 3);
    batch[1].time = "yesterday".into();
    match store.ingest(&batch).await {
        Err(Error::InvalidEvent { index: 1, .. }) => {}
        other => panic!("expected InvalidEvent at 1, got {other:?}"),
    }
    batch[1].time = rfc3339(t0());
    batch[2].id.clear();
    assert!(matches!(store.ingest(&batch).await, Err(Error::InvalidEvent { index: 2, .. })));
    assert!(all_ids(&store).await.is_empty());
    assert!(matches!(custos_store::open("mysql://x").await, Err(Error::BadUrl)));
}

/// What PostgreSQL would refuse (NUL, index entries over its btree limit) and what would harm
/// the store (times ahead of the clock, sums past 64 bits, raw ids as record hashes, a batch
/// over many days) is refused by both stores alike, as a bad event naming the field, never
/// its value; nothing of the batch is stored.
async fn inadmissible_events_are_refused_alike_by_both_stores(env: &Env) {
    let store = env.open().await;
    type Edit = fn(&mut custos_api::AuditEvent);
    let cases: [(Edit, &str); 48] = [
        (
            |e| e.rule_principal = Some(format!("peer:{}", "1".repeat(1100))),
            "rulePrincipal is longer than 1024 bytes",
        ),
        (
            |e| {
                e.rule = None;
                e.rule_principal = Some("peer:10.0.0.7".into());
            },
            "rulePrincipal needs the rule it counts for",
        ),
        (|e| e.rule_principal = Some(e.principal.clone()), "rulePrincipal must differ from principal"),
        (|e| e.rule_principal = Some("peer:10.0.\0.7".into()), "NUL character"),
        (
            |e| {
                e.also_applied = vec![applied("baseline", None)];
                e.dry_runs = vec![charged(dry_run("baseline"), None)];
            },
            "alsoApplied and charged dryRuns must name each policy once",
        ),
        (
            |e| {
                e.dry_runs = vec![custos_api::audit::DryRun { rule: None, ..charged(dry_run("trial"), None) }]
            },
            "a charged dryRuns entry must name its rule",
        ),
        (
            |e| e.dry_runs = vec![charged(dry_run("trial"), Some(&format!("user:{}", "u".repeat(1100))))],
            "a dryRuns principal is longer than 1024 bytes",
        ),
        (|e| e.dry_runs = vec![charged(dry_run("trial"), Some("peer:\0"))], "NUL character"),
        (
            |e| e.also_applied = vec![applied("baseline", None), applied("baseline", None)],
            "alsoApplied and charged dryRuns must name each policy once",
        ),
        (
            |e| e.also_applied = vec![applied(e.policy.as_deref().unwrap(), None)],
            "alsoApplied and charged dryRuns must name each policy once",
        ),
        (|e| e.id = "x".repeat(129), "id is longer than 128 bytes"),
        (|e| e.also_applied = vec![applied("baseline", None); 65], "alsoApplied has more than 64 entries"),
        (
            |e| e.also_applied = vec![applied(&"p".repeat(254), None)],
            "an alsoApplied policy or rule is longer than 253 bytes",
        ),
        (
            |e| e.also_applied = vec![applied("baseline", Some(&format!("user:{}", "u".repeat(1100))))],
            "an alsoApplied principal is longer than 1024 bytes",
        ),
        (|e| e.also_applied = vec![applied("base\0line", None)], "NUL character"),
        (|e| e.also_applied = vec![applied("baseline", Some("peer:10.0.\0.7"))], "NUL character"),
        (|e| e.principal = format!("user:{}", "u".repeat(3000)), "principal is longer than 1024 bytes"),
        (|e| e.policy = Some("p".repeat(254)), "policy is longer than 253 bytes"),
        (|e| e.namespace = "n".repeat(254), "namespace is longer than 253 bytes"),
        (|e| e.path = "/customers/\0/export".into(), "NUL character"),
        (
            |e| {
                e.user
                    .as_mut()
                    .unwrap()
                    .attributes
                    .insert("branch".into(), "no\0rth".into())
                    .map(drop)
                    .unwrap_or(())
            },
            "NUL character",
        ),
        (|e| e.record_hashes = vec!["13800138000".into()], "recordHashes must be 64 lowercase hex digits"),
        (|e| e.record_hashes = vec!["A".repeat(64)], "recordHashes must be 64 lowercase hex digits"),
        (|e| e.records_returned = 1 << 62, "a records count is above"),
        (|e| e.dry_runs = vec![dry_run("audit-only"); 65], "dryRuns has more than 64 entries"),
        (
            |e| e.dry_runs = vec![dry_run(&"p".repeat(254))],
            "a dryRuns policy or rule is longer than 253 bytes",
        ),
        (|e| e.dry_runs = vec![dry_run("no\0rth")], "NUL character"),
        (
            |e| {
                let mut run = dry_run("audit-only");
                run.transform.as_mut().unwrap().masked.insert("ph\0one".into(), 1);
                e.dry_runs = vec![run];
            },
            "NUL character",
        ),
        (
            |e| {
                let mut run = dry_run("audit-only");
                run.transform.as_mut().unwrap().records_filtered = 1 << 40;
                e.dry_runs = vec![run];
            },
            "a records count is above",
        ),
        (
            |e| {
                let mut run = dry_run("audit-only");
                run.transform.as_mut().unwrap().masked.insert("c".repeat(254), 1);
                e.dry_runs = vec![run];
            },
            "a dryRuns reason or masked class is longer than 253 bytes",
        ),
        (
            |e| {
                e.dry_runs =
                    vec![custos_api::audit::DryRun { reason: "r".repeat(254), ..dry_run("audit-only") }]
            },
            "a dryRuns reason or masked class is longer than 253 bytes",
        ),
        (|e| e.time = rfc3339(chrono::Utc::now() + Duration::minutes(11)), "more than 10 minutes ahead"),
        (|e| e.time = "2100-01-01T00:00:00Z".into(), "more than 10 minutes ahead"),
        // Sizes: an event is at most about what the sidecar can emit, never a batch's worth.
        (
            |e| e.record_hashes = (0..10_001).map(common::subject_hash).collect(),
            "recordHashes has more than 10000 entries",
        ),
        (|e| e.path = format!("/{}", "p".repeat(65_536)), "path is longer than 65536 bytes"),
        (|e| e.method = "M".repeat(65_537), "method is longer than 65536 bytes"),
        (|e| e.reason = "r".repeat(1025), "reason is longer than 1024 bytes"),
        (|e| e.trace_id = Some("0".repeat(257)), "traceId is longer than 256 bytes"),
        (|e| e.time = format!("2025-06-01T12:00:00.{}Z", "0".repeat(60)), "time is longer than 64 bytes"),
        (
            |e| {
                e.caller = Some(custos_api::audit::CallerWorkload {
                    namespace: "shop".into(),
                    service_account: "s".repeat(254),
                })
            },
            "caller namespace or serviceAccount is longer than 253 bytes",
        ),
        (|e| e.user.as_mut().unwrap().id = "u".repeat(1025), "user.id is longer than 1024 bytes"),
        (
            |e| {
                e.user.as_mut().unwrap().attributes =
                    (0..257).map(|i| (format!("a{i}"), "v".into())).collect()
            },
            "user.attributes has more than 256 entries",
        ),
        (
            |e| drop(e.user.as_mut().unwrap().attributes.insert("a".repeat(254), "v".into())),
            "a user.attributes name is longer than 253 bytes",
        ),
        (
            |e| drop(e.user.as_mut().unwrap().attributes.insert("branch".into(), "n".repeat(4097))),
            "a user.attributes value is longer than 4096 bytes",
        ),
        (
            |e| e.masked = (0..4161).map(|i| (format!("c{i}"), 1)).collect(),
            "masked has more than 4160 entries",
        ),
        (
            |e| {
                e.masked.insert("c".repeat(254), 1);
            },
            "a masked class is longer than 253 bytes",
        ),
        (
            |e| {
                let mut run = dry_run("audit-only");
                run.transform.as_mut().unwrap().masked = (0..4161).map(|i| (format!("c{i}"), 1)).collect();
                e.dry_runs = vec![run];
            },
            "a dryRuns masked has more than 4160 entries",
        ),
        (
            // Every field within its bounds, the whole over 2 MiB.
            |e| {
                e.dry_runs = (0..64)
                    .map(|p| {
                        let mut run = dry_run(&format!("audit-{p}"));
                        run.transform.as_mut().unwrap().masked =
                            (0..256).map(|c| (format!("{c:0>253}"), 1)).collect();
                        run
                    })
                    .collect();
            },
            "the event is larger than 2 MiB",
        ),
    ];
    for (edit, needle) in cases {
        let mut batch = events("bad", 3);
        edit(&mut batch[1]);
        match store.ingest(&batch).await {
            Err(Error::InvalidEvent { index: 1, reason }) => {
                assert!(reason.contains(needle), "{needle}: {reason}");
                assert!(!reason.contains("13800138000") && !reason.contains("no\0rth"), "{reason}");
            }
            other => panic!("{needle}: expected InvalidEvent at 1, got {other:?}"),
        }
    }
    // Within the bounds: stored.
    let mut fine = events("ok", 3);
    fine[0].id = "x".repeat(128);
    fine[1].time = rfc3339(chrono::Utc::now() + Duration::minutes(9));
    fine[2].records_returned = u64::from(u32::MAX);
    fine[2].record_hashes = vec![common::subject_hash(7)];
    fine[2].dry_runs = vec![dry_run(&"p".repeat(253)); 64];
    // The size bounds themselves: the sidecar's largest events pass.
    fine[0].record_hashes = (0..10_000).map(common::subject_hash).collect();
    fine[0].path = format!("/{}", "p".repeat(65_535));
    fine[0].reason = "r".repeat(1024);
    fine[0].user.as_mut().unwrap().attributes =
        (0..256).map(|i| (format!("{i:0>253}"), "v".repeat(if i == 0 { 4096 } else { 1 }))).collect();
    fine[0].masked = (0..256).map(|i| (format!("{i:0>253}"), 1)).collect();
    assert_eq!(store.ingest(&fine).await.unwrap().accepted, 3);
    let stored = store.query(&EventQuery { limit: 10, ..EventQuery::default() }).await.unwrap().events;
    let with_dry_runs = stored.iter().find(|e| e.id == fine[2].id).expect("stored");
    assert_eq!(with_dry_runs.dry_runs, fine[2].dry_runs, "dry runs are stored and read back");
    // One batch over 33 days: refused (a sender splits it); 32 days pass.
    let spread: Vec<_> = (0..33).map(|d| event(&format!("d{d:02}"), t0() + Duration::days(d))).collect();
    assert!(matches!(store.ingest(&spread).await, Err(Error::InvalidEvent { index: 32, .. })));
    assert_eq!(store.ingest(&spread[..32]).await.unwrap().accepted, 32);
    assert_eq!(all_ids(&store).await.len(), 35);
}

/// Events dated before the `oldest` bound (the collector's `--max-event-age`) are
/// acknowledged as expired and not stored, without refusing the batch: the others are stored
/// and listed at their positions, old events spread over many days do not make the batch span
/// too many, and PostgreSQL makes no partition for their days. They are still validated.
async fn events_before_the_oldest_bound_are_expired(env: &Env) {
    let store = env.open().await;
    let now = chrono::Utc::now();
    let oldest = Some(now - Duration::days(7));
    let batch = vec![
        event("recent-0", now - Duration::hours(1)),
        event("ancient", chrono::DateTime::from_timestamp(86_400, 0).unwrap()),
        event("recent-1", now - Duration::days(6)),
        event("old", now - Duration::days(8)),
    ];
    let ingested = store.ingest_listing_new_since(&batch, oldest).await.unwrap();
    assert_eq!((ingested.outcome.accepted, ingested.outcome.duplicates, ingested.outcome.expired), (2, 0, 2));
    assert_eq!(ingested.new, vec![0, 2]);
    let mut ids = all_ids(&store).await;
    ids.sort();
    assert_eq!(ids, ["recent-0", "recent-1"]);
    // Resent: the stored ones are duplicates, the old ones expired again.
    let again = store.ingest_listing_new_since(&batch, oldest).await.unwrap();
    assert_eq!((again.outcome.accepted, again.outcome.duplicates, again.outcome.expired), (0, 2, 2));
    // Forty old days and a fresh event: not "more than 32 days".
    let mut spread: Vec<_> =
        (0..40).map(|d| event(&format!("s{d:02}"), now - Duration::days(8 + d))).collect();
    spread.push(event("fresh", now));
    let out = store.ingest_listing_new_since(&spread, oldest).await.unwrap();
    assert_eq!((out.outcome.accepted, out.outcome.expired), (1, 40));
    assert_eq!(out.new, vec![40]);
    // Only old events: nothing stored, no error.
    let out = store.ingest_listing_new_since(&spread[..3], oldest).await.unwrap();
    assert_eq!((out.outcome.accepted, out.outcome.expired, out.new.len()), (0, 3, 0));
    // An old event is still validated.
    let mut bad = event("bad-old", now - Duration::days(9));
    bad.principal = format!("user:{}", "u".repeat(2000));
    let refused = store.ingest_listing_new_since(&[event("ok", now), bad], oldest).await;
    assert!(matches!(refused, Err(Error::InvalidEvent { index: 1, .. })), "{refused:?}");
    assert_eq!(all_ids(&store).await.len(), 3);
    assert_verifies(&store, 3).await;
    if let Env::Postgres { .. } = env {
        // Those of the stored events' days, and today's and tomorrow's (made at open).
        let today = now.timestamp().div_euclid(86_400);
        let days: HashSet<i64> = [now - Duration::hours(1), now - Duration::days(6), now]
            .iter()
            .map(|t| t.timestamp().div_euclid(86_400))
            .chain([today, today + 1])
            .collect();
        let partitions =
            env.count("SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").await;
        assert_eq!(partitions, days.len() as i64, "a partition per day of the stored events only");
    }
}

/// Pages bounded in bytes ([`AnyStore::query_within`]): each ends at the event whose body
/// reaches the bound (one event at least), every page but the last carries a cursor, and the
/// pages list every event once, newest first, whatever the bound.
async fn query_pages_are_bounded_in_bytes(env: &Env) {
    let store = env.open().await;
    let mut batch = events("b", 30);
    for (i, e) in batch.iter_mut().enumerate() {
        if i % 3 == 0 {
            e.record_hashes = (0..1_000).map(|n| common::subject_hash(i as u64 * 1_000 + n)).collect();
        }
    }
    store.ingest(&batch).await.unwrap();
    let newest_first: Vec<String> = batch.iter().rev().map(|e| e.id.clone()).collect();
    let big = 67_000;
    for max_bytes in [1, big, 3 * big, 10 << 20] {
        let mut q = EventQuery { limit: 1_000, ..EventQuery::default() };
        let (mut ids, mut pages) = (Vec::new(), 0);
        loop {
            let page = store.query_within(&q, max_bytes).await.unwrap();
            pages += 1;
            let sizes: Vec<usize> =
                page.events.iter().map(|e| serde_json::to_string(e).unwrap().len()).collect();
            let before_last: usize = sizes.iter().rev().skip(1).sum();
            assert!(before_last < max_bytes, "{max_bytes}: {sizes:?}");
            ids.extend(page.events.into_iter().map(|e| e.id));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(ids, newest_first, "{max_bytes}");
        match max_bytes {
            1 => assert!(pages >= 30, "one event per page: {pages}"),
            m if m == 10 << 20 => assert_eq!(pages, 1),
            _ => assert!((2..30).contains(&pages), "{max_bytes}: {pages}"),
        }
    }
}

/// Events carrying a dry run of a policy, with a decision, or both in the same entry; pages
/// as the other filters do.
async fn events_by_dry_run(env: &Env) {
    let store = env.open().await;
    let with = |id: &str, i: i64, runs: &[(&str, Decision)]| {
        let mut e = event(id, t0() + Duration::seconds(i));
        e.dry_runs = runs
            .iter()
            .map(|&(policy, decision)| custos_api::audit::DryRun { decision, ..dry_run(policy) })
            .collect();
        e
    };
    // Decided by `stricter` itself, would-deny, with another policy's dry run: a match on the
    // event's own columns, or on any entry for one field and another for the other, takes it.
    let mut decoy = with("decoy", 0, &[("narrow", Decision::Allow)]);
    decoy.policy = Some("stricter".into());
    decoy.decision = Decision::WouldDeny;
    store
        .ingest(&[
            decoy,
            with("a", 1, &[("stricter", Decision::WouldDeny)]),
            with("b", 2, &[("stricter", Decision::Allow), ("narrow", Decision::WouldDeny)]),
            with("c", 3, &[("narrow", Decision::Allow)]),
            with("d", 4, &[("stricter", Decision::WouldDeny), ("narrow", Decision::WouldDeny)]),
        ])
        .await
        .unwrap();
    let ids = |q: EventQuery| {
        let store = &store;
        async move { store.query(&q).await.unwrap().events.into_iter().map(|e| e.id).collect::<Vec<_>>() }
    };
    let q = |policy: Option<&str>, decision: Option<Decision>| EventQuery {
        dry_run_policy: policy.map(str::to_owned),
        dry_run_decision: decision,
        ..EventQuery::default()
    };
    assert_eq!(ids(q(Some("stricter"), None)).await, ["d", "b", "a"]);
    assert_eq!(ids(q(Some("stricter"), Some(Decision::WouldDeny))).await, ["d", "a"]);
    assert_eq!(ids(q(None, Some(Decision::WouldDeny))).await, ["d", "b", "a"]);
    // The same entry: b's stricter dry run allowed, its narrow one would deny.
    assert_eq!(ids(q(Some("narrow"), Some(Decision::Allow))).await, ["c", "decoy"]);
    assert_eq!(ids(q(Some("absent"), None)).await, Vec::<String>::new());
    // Pages, and with the other filters.
    let first = store.query(&EventQuery { limit: 1, ..q(Some("stricter"), None) }).await.unwrap();
    assert_eq!(first.events[0].id, "d");
    let rest = EventQuery { cursor: first.next_cursor, ..q(Some("stricter"), None) };
    assert_eq!(ids(rest).await, ["b", "a"]);
    let before_d = EventQuery { until: Some(t0() + Duration::seconds(4)), ..q(Some("narrow"), None) };
    assert_eq!(ids(before_d).await, ["c", "b", "decoy"]);
}

/// A rule of `policy` that applied beside the deciding one, counted by `principal` (the
/// event's when `None`).
fn applied(policy: &str, principal: Option<&str>) -> custos_api::audit::AppliedRule {
    custos_api::audit::AppliedRule {
        policy: policy.into(),
        rule: "mask-addresses".into(),
        principal: principal.map(str::to_owned),
    }
}

/// `run` as charged to its rule's quotas, under `principal` (the event's when `None`).
fn charged(run: custos_api::audit::DryRun, principal: Option<&str>) -> custos_api::audit::DryRun {
    custos_api::audit::DryRun { charged: true, principal: principal.map(str::to_owned), ..run }
}

/// A dry run of `policy` that would allow, with what its plan would have done.
fn dry_run(policy: &str) -> custos_api::audit::DryRun {
    custos_api::audit::DryRun {
        policy: policy.into(),
        rule: Some("own-branch".into()),
        principal: None,
        decision: custos_api::Decision::Allow,
        reason: "allow_rule".into(),
        charged: false,
        transform: Some(custos_api::audit::DryRunTransform {
            records_returned: 2,
            records_filtered: 1,
            records_truncated: 0,
            masked: [("phone".to_string(), 2)].into(),
        }),
    }
}

async fn durable_across_reopen(env: &Env) {
    let batch = events("e", 20);
    let head = {
        let store = env.open().await;
        store.ingest(&batch[..10]).await.unwrap();
        store.head().await.unwrap()
    };
    // Reopening runs the migrations again: a no-op.
    let store = env.open().await;
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(all_ids(&store).await.len(), 10);
    // A sender that did not see the answer resends; the chain continues after the head.
    let out = store.ingest(&batch).await.unwrap();
    assert_eq!((out.accepted, out.duplicates), (10, 10));
    assert_verifies(&store, 20).await;
    let stored = store.query(&EventQuery { limit: 1, ..EventQuery::default() }).await.unwrap();
    assert_eq!(stored.events[0].id, "e019");
}

async fn verify_clean_chain(env: &Env) {
    let store = env.open().await;
    let report = store.verify(None).await.unwrap();
    assert!(report.is_ok());
    assert_eq!(report.head.hash, GENESIS_HASH);
    // Across several days (several PostgreSQL partitions), with record hashes.
    let mut batch = events("e", 30);
    for (i, e) in batch.iter_mut().enumerate() {
        e.time = rfc3339(t0() + Duration::hours(7 * i as i64));
        e.record_hashes = vec![format!("{:064x}", i % 4), format!("{:064x}", 100 + i)];
    }
    store.ingest(&batch[..17]).await.unwrap();
    store.ingest(&batch[17..]).await.unwrap();
    assert_verifies(&store, 30).await;
    let from = store.verify(Some(11)).await.unwrap();
    assert!(from.is_ok());
    assert_eq!((from.checked, from.start.seq), (20, 10));
    // The stored events carry their chain link.
    let page = store.query(&EventQuery::default()).await.unwrap();
    let newest = &page.events[0];
    assert_eq!(newest.id, "e029");
    let head = store.head().await.unwrap();
    let body = serde_json::to_string(newest).unwrap();
    assert_eq!(chain_hash(newest.prev_hash.as_deref().unwrap(), &body), head.hash);
}

async fn tampered(env: &Env, sql: &str) -> custos_store::BrokenLink {
    let store = env.open().await;
    let mut batch = events("e", 10);
    for (i, e) in batch.iter_mut().enumerate() {
        e.record_hashes = vec![format!("{i:064x}")];
        // Rows in the usage index too: a rule applied beside, and a charged dry run.
        e.also_applied = vec![applied("baseline", None)];
        e.dry_runs = vec![charged(dry_run("trial"), Some("peer:10.0.0.7"))];
    }
    // And the deciding rule of the sixth (seq 6) counted by another principal.
    batch[5].rule_principal = Some("peer:10.0.0.9".into());
    store.ingest(&batch).await.unwrap();
    assert_verifies(&store, 10).await;
    env.raw(sql).await;
    let report = store.verify(None).await.unwrap();
    report.first_broken.expect("tampering goes unnoticed")
}

async fn verify_catches_edited_rows(env: &Env) {
    // A column edited at 5, a body edited at 4: the first (4) is reported.
    let b = tampered(
        env,
        "UPDATE events SET principal = 'user:mallory' WHERE seq = 5;
         UPDATE events SET body = replace(body, '\"status\":200', '\"status\":201') WHERE seq = 4;",
    )
    .await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 4), "{b:?}");
    assert_eq!(b.event_id.as_deref(), Some("e003"));
}

async fn verify_catches_deleted_row(env: &Env) {
    let b = tampered(env, "DELETE FROM events WHERE seq = 5;").await;
    assert_eq!((b.kind, b.seq, b.event_id.as_deref()), (BreakKind::Deleted, 5, None), "{b:?}");
}

async fn verify_catches_deleted_tail(env: &Env) {
    let b = tampered(env, "DELETE FROM events WHERE seq >= 9;").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Deleted, 9), "{b:?}");
}

/// The tail cut and `chain_head` moved back with it (a review's probe) verifies on its own;
/// checked against a head recorded earlier, it does not.
async fn a_cut_tail_fails_against_a_head_recorded_earlier(env: &Env) {
    let store = env.open().await;
    store.ingest(&events("e", 10)).await.unwrap();
    let recorded = store.head().await.unwrap();
    let (seq, hash) = (recorded.seq, recorded.hash.clone());
    assert_eq!(store.verify_expecting(None, Some((seq, hash.clone()))).await.unwrap().first_broken, None);
    let earlier = store.verify(Some(1)).await.unwrap();
    assert!(earlier.is_ok());
    // An earlier row, and the anchor (genesis, seq 0), check too.
    let page = store.query(&EventQuery { limit: 10, ..EventQuery::default() }).await.unwrap();
    let e5 = page.events.iter().find(|e| e.id == "e005").unwrap();
    let row5 =
        custos_store::chain_hash(e5.prev_hash.as_deref().unwrap(), &serde_json::to_string(e5).unwrap());
    assert_eq!(store.verify_expecting(None, Some((6, row5))).await.unwrap().first_broken, None);
    assert_eq!(
        store.verify_expecting(None, Some((0, GENESIS_HASH.into()))).await.unwrap().first_broken,
        None
    );
    let wrong = "f".repeat(64);
    let b = store.verify_expecting(None, Some((6, wrong))).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 6), "{b:?}");

    env.raw(
        "DELETE FROM events WHERE seq >= 9;
         UPDATE chain_head SET seq = 8, hash = (SELECT hash FROM events WHERE seq = 8) WHERE id = 1;",
    )
    .await;
    assert_eq!(store.verify(None).await.unwrap().first_broken, None, "on its own it verifies");
    let b = store.verify_expecting(None, Some((seq, hash))).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Deleted, 10), "{b:?}");
    assert!(b.detail.contains("tail was cut"), "{b:?}");
}

async fn verify_catches_inserted_row(env: &Env) {
    // A forged row with a valid hash linked to seq 5, the rows after it renumbered.
    let store = env.open().await;
    store.ingest(&events("e", 10)).await.unwrap();
    let page = store.query(&EventQuery::default()).await.unwrap();
    let h5 = page.events.iter().find(|e| e.id == "e005").unwrap().prev_hash.clone().unwrap();
    let mut forged = event("forged", t0() + Duration::milliseconds(5500));
    forged.prev_hash = Some(h5.clone());
    let body = serde_json::to_string(&forged).unwrap();
    let hash = chain_hash(&h5, &body);
    let time_us = (t0() + Duration::milliseconds(5500)).timestamp_micros();
    env.raw(&format!(
        "UPDATE events SET seq = -seq WHERE seq > 5;
         UPDATE events SET seq = -seq + 1 WHERE seq < 0;
         UPDATE event_records SET seq = seq + 1 WHERE seq > 5;
         INSERT INTO events (seq, id, time_us, namespace, policy, rule, principal, user_id,
             decision, path, records_returned, prev_hash, hash, body)
         VALUES (6, 'forged', {time_us}, 'shop', 'customers', 'read', 'user:alice', 'alice',
             'Allow', '/customers/{{id}}', 1, '{h5}', '{hash}', '{body}');"
    ))
    .await;
    let b = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Inserted, 6), "{b:?}");
    assert_eq!(b.event_id.as_deref(), Some("forged"));
}

async fn verify_catches_appended_row(env: &Env) {
    // A copy of the last row as seq 11, the chain head untouched.
    let b = tampered(
        env,
        "INSERT INTO events (seq, id, time_us, namespace, policy, rule, principal, user_id,
             decision, path, records_returned, prev_hash, hash, body)
         SELECT 11, 'appended', time_us, namespace, policy, rule, principal, user_id,
             decision, path, records_returned, hash, hash, body FROM events WHERE seq = 10;",
    )
    .await;
    assert_eq!((b.kind, b.seq), (BreakKind::Inserted, 11), "{b:?}");
}

async fn verify_catches_a_row_planted_below_the_anchor(env: &Env) {
    // A review's probe: a row at seq 0 (the genesis anchor) was never walked, yet every query
    // served it.
    let b = tampered(
        env,
        "INSERT INTO events (seq, id, time_us, namespace, policy, rule, principal, user_id,
             decision, path, records_returned, prev_hash, hash, body)
         SELECT 0, 'planted', time_us, namespace, policy, rule, 'user:mallory', user_id,
             decision, path, records_returned, prev_hash, hash, body FROM events WHERE seq = 1;",
    )
    .await;
    assert_eq!((b.kind, b.seq, b.event_id.as_deref()), (BreakKind::Inserted, 0, Some("planted")), "{b:?}");
    assert!(b.detail.contains("retention anchor"), "{b:?}");
}

async fn verify_catches_swapped_rows(env: &Env) {
    let b = tampered(
        env,
        "UPDATE events SET seq = -1 WHERE seq = 5;
         UPDATE events SET seq = 5 WHERE seq = 6;
         UPDATE events SET seq = 6 WHERE seq = -1;",
    )
    .await;
    assert_eq!((b.kind, b.seq), (BreakKind::Reordered, 5), "{b:?}");
}

async fn verify_catches_record_index_tamper(env: &Env) {
    // Hiding an access to a data subject: the index row goes, the event stays.
    let b = tampered(env, "DELETE FROM event_records WHERE seq = 3;").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 3), "{b:?}");
}

async fn verify_catches_a_moved_record_index_time(env: &Env) {
    // Hiding it by moving the index row's time (a review's probe: subject lookups select by
    // the index's time, so the access vanished from them while the chain still verified).
    let b = tampered(env, "UPDATE event_records SET time_us = time_us + 1 WHERE seq = 3;").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 3), "{b:?}");
}

async fn verify_catches_a_deleted_usage_index_row(env: &Env) {
    // Lifting a principal's quota under a rule that applied beside the deciding one.
    let b = tampered(env, "DELETE FROM event_applied_rules WHERE seq = 3 AND policy = 'baseline';").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 3), "{b:?}");
}

async fn verify_catches_a_deleted_rule_principal_row(env: &Env) {
    // Lifting the quota of the peer the deciding rule counted the request by.
    let b = tampered(env, "DELETE FROM event_applied_rules WHERE seq = 6 AND policy = 'customers';").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 6), "{b:?}");
}

async fn verify_catches_a_cleared_rule_principal_column(env: &Env) {
    // Counting the deciding rule under the event's principal instead.
    let b = tampered(env, "UPDATE events SET rule_principal = NULL WHERE seq = 6;").await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 6), "{b:?}");
}

async fn verify_catches_an_edited_usage_index_row(env: &Env) {
    let b = tampered(
        env,
        "UPDATE event_applied_rules SET principal = 'peer:10.0.0.8' WHERE seq = 4 AND policy = 'trial';",
    )
    .await;
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 4), "{b:?}");
}

async fn verify_catches_a_usage_index_row_of_no_event(env: &Env) {
    // Locking a principal out: a row above the chain head counts in its usage.
    let b = tampered(
        env,
        "INSERT INTO event_applied_rules (principal, policy, time_us, seq, rule, namespace, admitted, records) \
         SELECT 'user:bob', policy, time_us, 99, rule, namespace, admitted, 1000000 FROM event_applied_rules WHERE seq = 10 AND policy = 'baseline';",
    )
    .await;
    assert_eq!((b.kind, b.seq), (BreakKind::Inserted, 99), "{b:?}");
}

async fn query_filters_and_pagination(env: &Env) {
    let store = env.open().await;
    let principals = ["user:a", "user:b", "user:c"];
    let mut batch = Vec::new();
    for i in 0..60usize {
        // Pairs of events share a timestamp, to exercise the seq tie-break.
        let mut e = event(&format!("q{i:03}"), t0() + Duration::seconds((i / 2) as i64));
        e.principal = principals[i % 3].into();
        e.decision = [Decision::Allow, Decision::Deny, Decision::WouldDeny, Decision::Allow][i % 4];
        e.policy = Some(if i % 5 == 0 { "orders" } else { "customers" }.into());
        e.namespace = if i % 2 == 0 { "shop" } else { "bank" }.into();
        batch.push(e);
    }
    store.ingest(&batch[..25]).await.unwrap();
    store.ingest(&batch[25..]).await.unwrap();

    let expect = |f: &dyn Fn(usize) -> bool| -> Vec<String> {
        let mut v: Vec<usize> = (0..60).filter(|i| f(*i)).collect();
        v.reverse(); // newest first: time desc, then seq desc
        v.into_iter().map(|i| format!("q{i:03}")).collect()
    };
    let paged = |q: EventQuery| {
        let store = store.clone();
        async move {
            let mut out = Vec::new();
            let mut q = q;
            loop {
                let page = store.query(&q).await.unwrap();
                assert!(page.events.len() <= q.limit as usize);
                out.extend(page.events.into_iter().map(|e| e.id));
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => return out,
                }
            }
        }
    };
    let base = EventQuery { limit: 7, ..EventQuery::default() };
    assert_eq!(paged(base.clone()).await, expect(&|_| true));
    assert_eq!(
        paged(EventQuery { principal: Some("user:b".into()), ..base.clone() }).await,
        expect(&|i| i % 3 == 1)
    );
    assert_eq!(
        paged(EventQuery { decision: Some(Decision::Deny), ..base.clone() }).await,
        expect(&|i| i % 4 == 1)
    );
    assert_eq!(
        paged(EventQuery { policy: Some("orders".into()), namespace: Some("shop".into()), ..base.clone() })
            .await,
        expect(&|i| i % 5 == 0 && i % 2 == 0)
    );
    assert_eq!(
        paged(EventQuery {
            since: Some(t0() + Duration::seconds(10)),
            until: Some(t0() + Duration::seconds(20)),
            principal: Some("user:a".into()),
            ..base.clone()
        })
        .await,
        expect(&|i| (20..40).contains(&i) && i % 3 == 0)
    );
    // Default limit, exact-size last page, bad cursor.
    let page = store.query(&EventQuery::default()).await.unwrap();
    assert_eq!((page.events.len(), page.next_cursor), (60, None));
    let bad = store.query(&EventQuery { cursor: Some("not-a-cursor".into()), ..EventQuery::default() }).await;
    assert!(matches!(bad, Err(Error::BadCursor)));
}

async fn subject_lookup(env: &Env) {
    let store = env.open().await;
    let subject = format!("{:064x}", 42);
    let other = format!("{:064x}", 7);
    let mut batch = events("s", 12);
    for (i, e) in batch.iter_mut().enumerate() {
        e.record_hashes = if i % 3 == 0 {
            vec![other.clone(), subject.clone(), subject.clone()]
        } else {
            vec![other.clone()]
        };
        e.principal = format!("user:u{i}");
        e.user = Some(custos_api::audit::AuditUser { id: format!("u{i}"), attributes: Default::default() });
    }
    batch[9].decision = Decision::WouldDeny;
    store.ingest(&batch).await.unwrap();
    let hits = store.subject(&subject, None, None, 0).await.unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.event_id.as_str()).collect();
    assert_eq!(ids, ["s009", "s006", "s003", "s000"]);
    let h = &hits[0];
    assert_eq!(h.principal, "user:u9");
    assert_eq!(h.user_id.as_deref(), Some("u9"));
    assert_eq!(h.decision, Decision::WouldDeny);
    assert_eq!((h.policy.as_deref(), h.rule.as_deref()), (Some("customers"), Some("read")));
    assert_eq!(h.path, "/customers/{id}");
    assert_eq!(h.time, rfc3339(t0() + Duration::seconds(9)));
    let since = store
        .subject(&subject, Some(t0() + Duration::seconds(3)), Some(t0() + Duration::seconds(9)), 0)
        .await
        .unwrap();
    assert_eq!(since.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["s006", "s003"]);
    assert_eq!(store.subject(&subject, None, None, 1).await.unwrap().len(), 1);
    assert!(store.subject(&"f".repeat(64), None, None, 0).await.unwrap().is_empty());
    assert_eq!(store.subject(&other, None, None, 0).await.unwrap().len(), 12);
}

async fn top_by_records_and_denials(env: &Env) {
    let store = env.open().await;
    let mut batch = Vec::new();
    let spec = [
        ("user:a", Decision::Allow, 50u64, 0i64),
        ("user:a", Decision::Allow, 30, 10),
        ("user:b", Decision::Allow, 100, 20),
        ("user:b", Decision::Deny, 0, 30),
        ("user:c", Decision::Deny, 0, 40),
        ("user:c", Decision::Deny, 0, 50),
        ("user:c", Decision::Deny, 0, 60),
        ("user:d", Decision::Allow, 0, 70),
        ("user:a", Decision::Allow, 500, -3600), // before `since`
    ];
    for (i, (p, d, r, dt)) in spec.iter().enumerate() {
        let mut e = event(&format!("t{i}"), t0() + Duration::seconds(*dt));
        e.principal = (*p).into();
        e.decision = *d;
        e.records_returned = *r;
        batch.push(e);
    }
    store.ingest(&batch).await.unwrap();
    let entry = |p: &str, count| TopEntry { principal: p.into(), count };
    assert_eq!(
        store.top(TopBy::Records, Some(t0()), 0).await.unwrap(),
        [entry("user:b", 100), entry("user:a", 80)]
    );
    assert_eq!(store.top(TopBy::Records, None, 1).await.unwrap(), [entry("user:a", 580)]);
    assert_eq!(
        store.top(TopBy::Denials, Some(t0()), 10).await.unwrap(),
        [entry("user:c", 3), entry("user:b", 1)]
    );
}

async fn usage_windows(env: &Env) {
    let store = env.open().await;
    let now = t0();
    let mk = |id: &str, dt: i64, d: Decision, records: u64| {
        let mut e = event(id, now + Duration::seconds(dt));
        e.decision = d;
        e.records_returned = records;
        e
    };
    let mut batch = vec![
        mk("u1", -10, Decision::Allow, 5),
        mk("u2", -20, Decision::Deny, 0),
        mk("u3", -30, Decision::WouldDeny, 2),
        mk("u4", -90, Decision::Allow, 7),
        mk("u5", -7200, Decision::Allow, 11),
        mk("u6", -25 * 3600, Decision::Allow, 100), // outside the day
        mk("u7", 10, Decision::Allow, 1000),        // after `now`
        mk("u8", -60, Decision::Allow, 3),          // exactly a minute ago: outside
    ];
    let mut other_rule = mk("u9", -5, Decision::Allow, 4);
    other_rule.rule = Some("export".into());
    let mut no_rule = mk("u10", -5, Decision::Allow, 4);
    no_rule.rule = None;
    let mut other_principal = mk("u11", -5, Decision::Allow, 4);
    other_principal.principal = "user:bob".into();
    let mut other_policy = mk("u12", -5, Decision::Allow, 4);
    other_policy.policy = Some("orders".into());
    let mut other_ns = mk("u13", -5, Decision::Allow, 4);
    other_ns.namespace = "bank".into();
    batch.extend([other_rule, no_rule, other_principal, other_policy, other_ns]);
    store.ingest(&batch).await.unwrap();

    let u = store.usage(Some("shop"), "customers", "user:alice", now, None).await.unwrap();
    assert_eq!(u.policy, "customers");
    assert_eq!(u.principal, "user:alice");
    assert_eq!(u.as_of, rfc3339(now));
    assert_eq!(u.rules.len(), 2);
    let read = u.rules["read"];
    assert_eq!(read.requests_last_minute, 2); // u1 + u3; u2 was denied
    assert_eq!(read.records_last_hour, 5 + 2 + 7 + 3);
    assert_eq!(read.records_last_day, 5 + 2 + 7 + 3 + 11);
    assert_eq!(u.rules["export"].requests_last_minute, 1);
    // Without a namespace: every namespace counts.
    let all = store.usage(None, "customers", "user:alice", now, None).await.unwrap();
    assert_eq!(all.rules["read"].requests_last_minute, 3);
    let none = store.usage(None, "customers", "user:nobody", now, None).await.unwrap();
    assert!(none.rules.is_empty());
}

/// Where several policies constrain a request, the event names the others' rules in
/// `alsoApplied`; each is charged the request and the records returned under its own
/// principal (the entry's, else the event's), in its own windows, and survives reopening and
/// retention as the events do.
async fn usage_counts_the_rules_that_applied_beside_the_deciding_one(env: &Env) {
    let store = env.open().await;
    let now = t0();
    let mk = |id: &str, dt: i64, d: Decision, records: u64, principal: Option<&str>| {
        let mut e = event(id, now + Duration::seconds(dt));
        e.decision = d;
        e.records_returned = records;
        e.also_applied = vec![applied("baseline", principal)];
        e
    };
    let mut by_bob = mk("a3", -20, Decision::Allow, 3, Some("user:alice"));
    by_bob.principal = "user:bob".into();
    let mut other_ns = mk("a6", -5, Decision::Allow, 100, None);
    other_ns.namespace = "bank".into();
    let batch = vec![
        mk("a1", -10, Decision::Allow, 6, None),
        mk("a2", -15, Decision::Deny, 0, None),
        by_bob,
        mk("a4", -30, Decision::Allow, 50, Some("peer:10.0.0.7")),
        mk("a5", -1800, Decision::WouldDeny, 9, None),
        other_ns,
        mk("a7", -25 * 3600, Decision::Allow, 1000, None), // outside the day
        mk("a8", 10, Decision::Allow, 1000, None),         // after `now`
    ];
    store.ingest(&batch).await.unwrap();
    let rules = |u: custos_api::collector::UsageResponse| {
        u.rules
            .into_iter()
            .map(|(rule, n)| (rule, [n.requests_last_minute, n.records_last_hour, n.records_last_day]))
            .collect::<Vec<_>>()
    };
    // a1 and a3 in the minute (a2 was denied); a5 in the hour too.
    let expected = vec![("mask-addresses".to_owned(), [2, 6 + 3 + 9, 6 + 3 + 9])];
    assert_eq!(
        rules(store.usage(Some("shop"), "baseline", "user:alice", now, None).await.unwrap()),
        expected
    );
    assert_eq!(
        rules(store.usage(Some("shop"), "baseline", "peer:10.0.0.7", now, None).await.unwrap()),
        [("mask-addresses".to_owned(), [1, 50, 50])]
    );
    assert_eq!(
        rules(store.usage(None, "baseline", "user:alice", now, None).await.unwrap())[0].1,
        [3, 118, 118]
    );
    // The deciding rule is counted as before, each request once.
    let decided = rules(store.usage(Some("shop"), "customers", "user:alice", now, None).await.unwrap());
    assert_eq!(decided, [("read".to_owned(), [2, 6 + 50 + 9, 6 + 50 + 9])]);
    assert_eq!(
        rules(store.usage(Some("shop"), "customers", "user:bob", now, None).await.unwrap()),
        [("read".to_owned(), [1, 3, 3])]
    );

    // Reopened: the same. Retention of every event takes their rows with them (a8 would
    // still be in the day two hours later; an event then, of no other rule, ages them).
    drop(store);
    let store = env.open().await;
    assert_eq!(
        rules(store.usage(Some("shop"), "baseline", "user:alice", now, None).await.unwrap()),
        expected
    );
    let later = now + Duration::hours(2);
    store.ingest(&[event("later", later)]).await.unwrap();
    store.prune_as_of(later - Duration::seconds(5), later).await.unwrap();
    let after = rules(
        store
            .usage(Some("shop"), "baseline", "user:alice", later + Duration::seconds(1), None)
            .await
            .unwrap(),
    );
    assert!(after.is_empty(), "{after:?}");
}

/// An Audit-mode policy's dry run beside an enforcing one that its quotas counted
/// (`charged`) is charged to its rule's usage: the request (whatever the enforcing policy
/// then made of the response) and the records its plan would have returned, under its own
/// principal; dry runs not charged (refused by a quota or a rule) count nothing.
async fn usage_counts_the_dry_runs_charged_to_their_rules(env: &Env) {
    let store = env.open().await;
    let now = t0();
    let mk = |id: &str, d: Decision, run: custos_api::audit::DryRun| {
        let mut e = event(id, now - Duration::seconds(10));
        e.decision = d;
        e.records_returned = 5;
        e.dry_runs = vec![run];
        e
    };
    let without_transform = custos_api::audit::DryRun { transform: None, ..charged(dry_run("trial"), None) };
    let refused = custos_api::audit::DryRun {
        decision: Decision::WouldDeny,
        reason: "quota_exceeded".into(),
        transform: None,
        ..dry_run("trial")
    };
    store
        .ingest(&[
            mk("d1", Decision::Allow, charged(dry_run("trial"), None)),
            mk("d2", Decision::Allow, refused),
            mk("d3", Decision::Deny, without_transform),
            mk("d4", Decision::Allow, charged(dry_run("trial"), Some("peer:10.0.0.9"))),
        ])
        .await
        .unwrap();
    let counts = |u: custos_api::collector::UsageResponse| {
        u.rules
            .into_iter()
            .map(|(rule, n)| (rule, [n.requests_last_minute, n.records_last_hour]))
            .collect::<Vec<_>>()
    };
    // d1 and d3 (its response refused after the dry run's quotas counted it); 2 records of d1.
    let alice = counts(store.usage(Some("shop"), "trial", "user:alice", now, None).await.unwrap());
    assert_eq!(alice, [("own-branch".to_owned(), [2, 2])]);
    let peer = counts(store.usage(Some("shop"), "trial", "peer:10.0.0.9", now, None).await.unwrap());
    assert_eq!(peer, [("own-branch".to_owned(), [1, 2])]);
    // The deciding policy's own usage is unchanged by its dry runs.
    let decided = counts(store.usage(Some("shop"), "customers", "user:alice", now, None).await.unwrap());
    assert_eq!(decided, [("read".to_owned(), [3, 20])]);
}

/// The deciding rule of a policy that counts by another principal than the event's (one that
/// verifies no users, beside one that named the user: `rulePrincipal`) is charged under that
/// principal, as the sidecar's quotas counted it, so that its quotas hold across replicas: the
/// request unless the event is a `Deny`, and the records returned; and not under the event's
/// principal. Reopened and verified, the same.
async fn usage_counts_the_deciding_rule_under_its_rule_principal(env: &Env) {
    let store = env.open().await;
    let now = t0();
    let mk = |id: &str, d: Decision, records: u64, rule_principal: Option<&str>| {
        let mut e = event(id, now - Duration::seconds(10));
        e.decision = d;
        e.records_returned = records;
        e.rule_principal = rule_principal.map(str::to_owned);
        e
    };
    let peer = Some("peer:10.0.0.7");
    let mut of_bob = mk("r3", Decision::Allow, 4, peer);
    of_bob.principal = "user:bob".into();
    let mut beside = mk("r5", Decision::Allow, 16, peer);
    beside.also_applied = vec![applied("baseline", None)];
    let batch = vec![
        mk("r1", Decision::Allow, 1, peer),
        mk("r2", Decision::Deny, 0, peer),
        of_bob,
        mk("r4", Decision::Allow, 2, None),
        beside,
    ];
    store.ingest(&batch).await.unwrap();
    let counts = |u: custos_api::collector::UsageResponse| {
        u.rules
            .into_iter()
            .map(|(rule, n)| (rule, [n.requests_last_minute, n.records_last_hour]))
            .collect::<Vec<_>>()
    };
    // r1, r3 and r5 under the peer, from alice's and bob's tokens alike (r2 was denied).
    for store in [store, env.open().await] {
        let by_peer =
            counts(store.usage(Some("shop"), "customers", "peer:10.0.0.7", now, None).await.unwrap());
        assert_eq!(by_peer, [("read".to_owned(), [3, 1 + 4 + 16])]);
        // The rule beside it counts under the event's principal, as before.
        let baseline = counts(store.usage(Some("shop"), "baseline", "user:alice", now, None).await.unwrap());
        assert_eq!(baseline, [("mask-addresses".to_owned(), [1, 16])]);
        assert!(
            counts(store.usage(Some("shop"), "baseline", "peer:10.0.0.7", now, None).await.unwrap())
                .is_empty()
        );
        // Under the event's principal, the rule counts only the requests it counted by it: r4.
        let by_alice = counts(store.usage(Some("shop"), "customers", "user:alice", now, None).await.unwrap());
        assert_eq!(by_alice, [("read".to_owned(), [1, 2])]);
    }
    let store = env.open().await;
    assert_verifies(&store, 5).await;
}

/// With an instance tag, the events whose ids carry it (one sidecar process's) are left out
/// of the usage, from the deciding rule's counts and from the rules applied beside it alike.
async fn usage_leaves_out_the_events_of_one_instance(env: &Env) {
    let store = env.open().await;
    let now = t0();
    let mk = |id: String, records: u64| {
        let mut e = event(&id, now - Duration::seconds(10));
        e.records_returned = records;
        e.also_applied = vec![applied("baseline", None)];
        e
    };
    let (mine, theirs) = ("M1NE0000", "THEM0000");
    store
        .ingest(&[
            mk(format!("01J0000000{mine}00000001"), 1),
            mk(format!("01J0000000{mine}00000002"), 2),
            mk(format!("01J0000000{theirs}00000001"), 4),
            mk("not-a-ulid".to_owned(), 8),
        ])
        .await
        .unwrap();
    let counts = |rules: &std::collections::BTreeMap<String, custos_api::collector::RuleUsage>| {
        rules.values().map(|n| [n.requests_last_minute, n.records_last_hour]).collect::<Vec<_>>()
    };
    for policy in ["customers", "baseline"] {
        let all = store.usage(Some("shop"), policy, "user:alice", now, None).await.unwrap();
        assert_eq!(
            (counts(&all.rules), all.instance, all.rules_without_instance),
            (vec![[4, 15]], None, None)
        );
        let asked = store.usage(Some("shop"), policy, "user:alice", now, Some(mine)).await.unwrap();
        assert_eq!(counts(&asked.rules), vec![[4, 15]], "{policy}: the totals as without it");
        assert_eq!(asked.instance.as_deref(), Some(mine));
        assert_eq!(counts(asked.rules_without_instance.as_ref().unwrap()), vec![[2, 12]], "{policy}");
    }
}

/// Two collector replicas pruning at once, and a verify meanwhile (a review's probes: rows the
/// other replica deleted mid-walk were reported as a broken chain, which halts retention and
/// raises the tampering alarm): no break, and the chain verifies afterwards.
async fn concurrent_prunes_and_verify_report_no_false_break(env: &Env) {
    let store = env.open().await;
    let all = events("e", 6_000);
    for chunk in all.chunks(1000) {
        store.ingest(chunk).await.unwrap();
    }
    // The clock at the newest event.
    let (cutoff, now) = (t0() + Duration::seconds(3_000), t0() + Duration::seconds(5_999));
    let other = env.open().await;
    let first = tokio::spawn({
        let s = store.clone();
        async move { s.prune_as_of(cutoff, now).await }
    });
    let verifying = tokio::spawn({
        let s = store.clone();
        async move { s.verify(None).await }
    });
    let second = other.prune_as_of(cutoff + Duration::seconds(1_000), now).await;
    let first = first.await.unwrap();
    let report = verifying.await.unwrap().unwrap();
    assert!(first.is_ok() && second.is_ok(), "{first:?} / {second:?}");
    assert_eq!(report.first_broken, None, "{report:?}");
    let after = store.verify(None).await.unwrap();
    assert_eq!(after.first_broken, None, "{after:?}");
    // A replica that lost the race pruned nothing this round; the next round catches up.
    assert!([3_000, 4_000].contains(&after.start.seq), "{after:?}");
    other.prune_as_of(cutoff + Duration::seconds(1_000), now).await.unwrap();
    assert_eq!(store.verify(None).await.unwrap().start.seq, 4_000);
}

async fn prune_keeps_chain_verifiable(env: &Env) {
    let store = env.open().await;
    let day = |d: i64, i: i64| t0() + Duration::days(d) + Duration::seconds(i);
    let mk = |id: &str, t| {
        let mut e = event(id, t);
        e.record_hashes = vec![format!("{:064x}", 1)];
        e
    };
    let mut batch: Vec<_> = (0..5).map(|i| mk(&format!("a{i}"), day(0, i))).collect();
    batch.extend((0..3).map(|i| mk(&format!("b{i}"), day(1, i))));
    batch.push(mk("late", day(0, 100))); // an old event ingested late: seq 9
    batch.extend((3..5).map(|i| mk(&format!("b{i}"), day(1, i))));
    batch.extend((0..5).map(|i| mk(&format!("c{i}"), day(2, i))));
    store.ingest(&batch[..7]).await.unwrap();
    store.ingest(&batch[7..]).await.unwrap();
    let start_of = |d: i64| {
        use chrono::Timelike;
        let t = t0() + Duration::days(d);
        t.with_hour(0).unwrap()
    };

    // The clock at the newest event (c4). Everything before day 1 is old, but `late` (seq 9)
    // is chained after day-1 events.
    let now = day(2, 4);
    let report = store.prune_as_of(start_of(1), now).await.unwrap();
    assert_eq!((report.deleted, report.anchor.seq), (5, 5));
    assert_eq!(store.anchor().await.unwrap(), report.anchor);
    let v = store.verify(None).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.checked, v.start.seq), (11, 5));
    assert!(all_ids(&store).await.contains(&"late".to_owned()));

    let report = store.prune_as_of(start_of(2), now).await.unwrap();
    assert_eq!((report.deleted, report.anchor.seq), (6, 11));
    assert_verifies(&store, 5).await;
    assert_eq!(store.subject(&format!("{:064x}", 1), None, None, 0).await.unwrap().len(), 5);
    // Nothing more to prune; ingest continues the chain from the head.
    assert_eq!(store.prune_as_of(start_of(2), now).await.unwrap().deleted, 0);
    // (An event older than the pruned part is not stored: see the next test.)
    let out = store.ingest(&[mk("d0", day(3, 0)), mk("old", day(0, 7)), mk("d1", day(3, 1))]).await.unwrap();
    assert_eq!((out.accepted, out.expired), (2, 1));
    assert_verifies(&store, 7).await;
    // Tampering after a prune is still caught.
    env.raw("DELETE FROM events WHERE seq = 13;").await;
    let b = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Deleted, 13));
}

/// Retention forgets the ids of the events it deletes, so a sender's late resend of one would
/// be stored again (and its chain position reused for a copy): every event older than the
/// cutoff, up to the newest pruned one, is acknowledged as expired instead, never stored;
/// after it, events are stored as before (nothing after it was deleted: an event older than
/// the cutoff goes with a later run).
async fn events_older_than_the_pruned_part_are_not_stored_again(env: &Env) {
    let store = env.open().await;
    let old: Vec<_> = (0..5).map(|i| event(&format!("a{i}"), t0() + Duration::seconds(i))).collect();
    let cutoff = t0() + Duration::hours(1);
    store.ingest(&old).await.unwrap();
    store.ingest(&[event("b0", cutoff + Duration::seconds(1))]).await.unwrap();
    assert_eq!(store.prune_as_of(cutoff, cutoff + Duration::seconds(1)).await.unwrap().deleted, 5);

    let again = store.ingest(&old).await.unwrap();
    assert_eq!((again.accepted, again.duplicates, again.expired), (0, 0, 5), "resent after the prune");
    let newest_pruned = t0() + Duration::seconds(4);
    let boundary = [
        event("at-newest-pruned", newest_pruned),
        event("just-after", newest_pruned + Duration::microseconds(1)),
        event("at-cutoff", cutoff),
        event("b0", cutoff + Duration::seconds(1)),
    ];
    let out = store.ingest(&boundary).await.unwrap();
    assert_eq!((out.accepted, out.duplicates, out.expired), (2, 1, 1));
    let mut ids = all_ids(&store).await;
    ids.sort();
    assert_eq!(ids, ["at-cutoff", "b0", "just-after"]);
    assert_verifies(&store, 3).await;
    // An event days older is not stored either, and PostgreSQL makes no partition for its day.
    let older = store.ingest(&[event("days-older", t0() - Duration::days(2))]).await.unwrap();
    assert_eq!(older.expired, 1);
    if matches!(env, Env::Postgres { .. }) {
        let partitions = "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema() \
                          AND tablename = 'events_d20250530'";
        assert_eq!(env.count(partitions).await, 0);
    }
}

/// A collector whose clock jumped ahead by more than the retention (a year here): retention
/// measures the age of the events from the newest stored one, not from the clock, so it
/// prunes only the events older than the retention relative to it (before: every event, the
/// whole trail); and it remembers as pruned no more than it deleted, so once the clock is
/// right again an event timed now is stored (before: acknowledged as expired and dropped,
/// as was every event until the clock caught up with the saved cutoff).
async fn a_clock_ahead_prunes_only_what_the_retention_allows(env: &Env) {
    let store = env.open().await;
    let now = chrono::Utc::now();
    let at = |t: chrono::DateTime<chrono::Utc>, prefix: &str| -> Vec<_> {
        (0..5).map(|i| event(&format!("{prefix}{i}"), t + Duration::seconds(i))).collect()
    };
    let (old, young) = (at(now - Duration::days(40), "o"), at(now - Duration::hours(1), "y"));
    store.ingest(&old).await.unwrap();
    store.ingest(&young).await.unwrap();
    let ahead = now + Duration::days(365);

    // 50 days: nothing is that much older than the newest event.
    let report = store.prune_as_of(ahead - Duration::days(50), ahead).await.unwrap();
    assert_eq!((report.deleted, report.anchor.seq), (0, 0));
    // 30 days: the old events only.
    let report = store.prune_as_of(ahead - Duration::days(30), ahead).await.unwrap();
    assert_eq!((report.deleted, report.anchor.seq), (5, 5));

    // The clock is right again.
    let fresh = store.ingest(&[event("fresh", now)]).await.unwrap();
    assert_eq!((fresh.accepted, fresh.expired), (1, 0), "an event timed now");
    // A pruned event resent is still expired; an event after the newest pruned one is stored
    // (though older than the retention: the next runs prune it).
    let resent = store.ingest(&old[4..]).await.unwrap();
    assert_eq!((resent.accepted, resent.expired), (0, 1));
    let between = store.ingest(&[event("between", now - Duration::days(35))]).await.unwrap();
    assert_eq!((between.accepted, between.expired), (1, 0));
    let mut ids = all_ids(&store).await;
    ids.sort();
    assert_eq!(ids, ["between", "fresh", "y0", "y1", "y2", "y3", "y4"]);
    assert_verifies(&store, 7).await;
}

/// No event arrived for 40 days: measured from the newest event alone, nothing would be
/// pruned however long that lasts; a time the caller vouches for (its monotonic clock since an
/// earlier run) measures the age instead, so retention stays a maximum. A vouched time ahead
/// of the clock is not believed.
async fn a_vouched_time_keeps_retention_a_maximum_without_new_events(env: &Env) {
    let store = env.open().await;
    // Microseconds, as the store keeps times.
    let now = chrono::DateTime::from_timestamp_micros(chrono::Utc::now().timestamp_micros()).unwrap();
    let at = |t: chrono::DateTime<chrono::Utc>, prefix: &str| -> Vec<_> {
        (0..5).map(|i| event(&format!("{prefix}{i}"), t + Duration::seconds(i))).collect()
    };
    store.ingest(&at(now - Duration::days(60), "o")).await.unwrap();
    store.ingest(&at(now - Duration::days(40), "n")).await.unwrap();
    let retention = Duration::days(30);

    let (report, from) = store.prune_measured(now - retention, now, None).await.unwrap();
    assert_eq!(report.deleted, 0, "measured from the newest event (40 days ago): nothing 30 days older");
    assert_eq!(from, now - Duration::days(40) + Duration::seconds(4));
    let (report, from) =
        store.prune_measured(now - retention, now, Some(now - Duration::days(15))).await.unwrap();
    assert_eq!((report.deleted, from), (5, now - Duration::days(15)), "the 60-day-old events");
    let (report, from) =
        store.prune_measured(now - retention, now, Some(now + Duration::days(365))).await.unwrap();
    assert_eq!((report.deleted, from), (5, now), "never past the clock");
    assert!(all_ids(&store).await.is_empty());
}

/// A reader following the store (the detection lease holder) reads every event once, in
/// chain order, in pages bounded by count and by bytes, from a position; the lease is one
/// holder's at a time on PostgreSQL, and comes free when its holder drops it.
async fn following_the_store_reads_every_event_once_in_chain_order(env: &Env) {
    let store = env.open().await;
    assert_eq!(store.last_position().await.unwrap(), StorePosition::default());
    assert!(store.events_after(&StorePosition::default(), 10, usize::MAX).await.unwrap().is_empty());
    // Times out of order across batches: chain order is the order of storing.
    store.ingest(&events("a", 25)).await.unwrap();
    store.ingest(&[event("late", t0() - Duration::days(1))]).await.unwrap();
    store.ingest(&events("b", 5)).await.unwrap();
    let mut position = StorePosition::default();
    let mut read = Vec::new();
    loop {
        let page = store.events_after(&position, 7, usize::MAX).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        assert!(page.len() <= 7);
        position = last.clone();
        read.extend(page.into_iter().map(|(_, e)| e.id));
    }
    let mut expected: Vec<String> = events("a", 25).into_iter().map(|e| e.id).collect();
    expected.push("late".into());
    expected.extend(events("b", 5).into_iter().map(|e| e.id));
    assert_eq!(read, expected);
    assert_eq!(store.last_position().await.unwrap(), position);
    // A byte bound stops a page at the event that reaches it (at least one event).
    let one = store.events_after(&StorePosition::default(), 100, 1).await.unwrap();
    assert_eq!(one.len(), 1);
    let some = store.events_after(&StorePosition::default(), 100, 3_000).await.unwrap();
    assert!(some.len() > 1 && some.len() < 31, "{}", some.len());

    let lease = store.try_lease("test").await.unwrap().expect("free");
    assert!(lease.held(std::time::Duration::from_secs(2)).await);
    if matches!(env, Env::Postgres { .. }) {
        let other = env.open().await;
        assert!(other.try_lease("test").await.unwrap().is_none(), "one holder at a time");
        assert!(other.try_lease("another").await.unwrap().is_some(), "leases of other names are apart");
        drop(lease);
        let mut taken = None;
        for _ in 0..100 {
            taken = other.try_lease("test").await.unwrap();
            if taken.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(taken.is_some(), "free once its holder dropped it");
    }
}

async fn prune_refuses_a_broken_chain(env: &Env) {
    let store = env.open().await;
    store.ingest(&events("e", 10)).await.unwrap();
    env.raw("UPDATE events SET principal = 'user:mallory' WHERE seq = 2;").await;
    // The clock at the newest event.
    match store.prune_as_of(t0() + Duration::seconds(5), t0() + Duration::seconds(9)).await {
        Err(Error::ChainBroken(b)) => assert_eq!((b.kind, b.seq), (BreakKind::Edited, 2)),
        other => panic!("expected ChainBroken, got {other:?}"),
    }
    assert_eq!(all_ids(&store).await.len(), 10);
}

async fn alerts_are_idempotent(env: &Env) {
    let store = env.open().await;
    let alert = |id: &str, dt: i64| Alert {
        id: id.into(),
        time: rfc3339(t0() + Duration::seconds(dt)),
        detector: "volume".into(),
        namespace: Some("shop".into()),
        policy: Some("customers".into()),
        principal: Some("user:alice".into()),
        severity: Severity::Warning,
        message: "record volume 12x the baseline".into(),
        details: serde_json::json!({"factor": 12.5, "baseline": 40}),
    };
    assert_eq!(store.insert_alerts(&[alert("a1", 0), alert("a2", 10)]).await.unwrap(), 2);
    assert_eq!(store.insert_alerts(&[alert("a2", 10), alert("a3", 20), alert("a3", 20)]).await.unwrap(), 1);
    let all = store.alerts(None, 0).await.unwrap();
    assert_eq!(all.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a3", "a2", "a1"]);
    assert_eq!(all[2], alert("a1", 0));
    let recent = store.alerts(Some(t0() + Duration::seconds(10)), 1).await.unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].id, "a3");
    let mut bad = alert("a4", 0);
    bad.time = "noon".into();
    assert!(matches!(store.insert_alerts(&[bad]).await, Err(Error::InvalidAlert { index: 0, .. })));
}

async fn concurrent_ingest_keeps_chain_valid(env: &Env) {
    // Two stores on the same database (two pools / two SQLite writers), two tasks each,
    // overlapping ids between them.
    let a = env.open().await;
    let b = env.open().await;
    let all = events("c", 400);
    let mut tasks = Vec::new();
    for (k, store) in [a.clone(), a.clone(), b.clone(), b.clone()].into_iter().enumerate() {
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            // Task k sends ids [k*80, k*80 + 160): each overlaps its neighbour by 80.
            let mine = &all[k * 80..(k * 80 + 160).min(all.len())];
            for chunk in mine.chunks(20) {
                accepted += store.ingest(chunk).await.unwrap().accepted;
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(accepted, 400);
    assert_eq!(all_ids(&a).await.len(), 400);
    assert_eq!(a.head().await.unwrap().seq, 400);
    assert_verifies(&b, 400).await;
}

async fn long_report_queries_are_stopped(env: &Env) {
    let store = env.open().await;
    store.ingest(&events("e", 2_000)).await.unwrap();
    let top = store.top(TopBy::Records, None, 10).await.unwrap();
    let page = EventQuery { limit: 1_000, ..EventQuery::default() };
    // SQLite: a limit of zero stops a query at its first progress check (after 1,000 steps,
    // which these take). PostgreSQL: the table is locked by another connection, so the
    // queries wait until the statement time-out cancels them.
    let (limited, lock) = match env {
        Env::Sqlite { .. } => (store.clone().with_query_timeout(std::time::Duration::ZERO), None),
        Env::Postgres { .. } => {
            (store.clone().with_query_timeout(std::time::Duration::from_millis(200)), env.lock_events().await)
        }
    };
    let stopped = limited.top(TopBy::Records, None, 10).await;
    assert!(matches!(stopped, Err(Error::QueryTimeout(_))), "top was not stopped: {stopped:?}");
    assert!(stopped.unwrap_err().to_string().contains("ran longer than"));
    let stopped = limited.query(&page).await.map(|p| p.events.len());
    assert!(matches!(stopped, Err(Error::QueryTimeout(_))), "query was not stopped: {stopped:?}");
    drop(lock);
    // The connections that were interrupted serve the next queries, unlimited or not.
    assert_eq!(store.top(TopBy::Records, None, 10).await.unwrap(), top);
    assert_eq!(store.query(&page).await.unwrap().events.len(), 1_000);
    if matches!(env, Env::Postgres { .. }) {
        assert_eq!(limited.top(TopBy::Records, None, 10).await.unwrap(), top);
    }
}
