//! PostgreSQL retention against an ingest in flight: a day partition is dropped only when no
//! transaction can still be writing an event of it that the prune has not seen.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration as StdDuration;

use chrono::Duration;
use common::{Env, event, subject_hash, t0};

/// Polls `sql` (a count, through a second connection) until it is at least 1.
async fn until_waiting(env: &Env, what: &str, sql: &str) {
    for _ in 0..400 {
        if env.count(sql).await >= 1 {
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// An ingest writes an event of a day that the prune running meanwhile finds wholly pruned
/// (the event is older than the cutoff, but chained after the pruned part, and its batch
/// read the retention cutoff before the prune committed). The prune's count of the day's
/// partition cannot see the uncommitted event: before the fix, its `DROP TABLE` waited for
/// the ingest to commit and then dropped the acknowledged event with the partition (verify:
/// `Deleted`; the next prune: "AUDIT CHAIN BROKEN"). The prune must see it and keep the day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_a_day_an_ingest_in_flight_writes_to() {
    let Some(env) = Env::postgres().await else { return };
    let store = env.open().await;
    // Day 0 and day 1 go (the cutoff is the start of day 2); day 3 stays.
    let start_of = |d: i64| (t0() + Duration::days(d)).date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let old =
        [event("a0", t0()), event("a1", t0() + Duration::days(1)), event("b0", t0() + Duration::days(3))];
    assert_eq!(store.ingest(&old).await.unwrap().accepted, 3);

    // The ingest is held after its `events` COPY (its event is in day 0's partition,
    // uncommitted): its record-hash index COPY waits for this lock.
    let holder = env.lock_records().await;
    let mut late = event("late", t0() + Duration::seconds(5));
    late.record_hashes = vec![subject_hash(1)];
    let ingest = tokio::spawn({
        let store = store.clone();
        async move { store.ingest(&[late]).await }
    });
    until_waiting(
        &env,
        "the ingest to wait for the record-hash index",
        "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = 'event_records'::regclass",
    )
    .await;

    // The prune meanwhile: day 0's partition looks all pruned (a0, seq 1 <= the last pruned
    // seq 2); it waits for the ingest on the `events` table.
    let prune = tokio::spawn({
        let store = store.clone();
        async move { store.prune_as_of(start_of(2), t0() + Duration::days(3)).await }
    });
    until_waiting(
        &env,
        "the prune to wait for the ingest",
        "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = 'events'::regclass",
    )
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();

    let ingested = ingest.await.unwrap().unwrap();
    assert_eq!((ingested.accepted, ingested.expired), (1, 0));
    let pruned = prune.await.unwrap().unwrap();
    assert_eq!((pruned.deleted, pruned.anchor.seq), (2, 2));
    let report = store.verify(None).await.unwrap();
    assert_eq!(report.first_broken, None, "{report:?}");
    assert_eq!((report.start.seq, report.checked), (2, 2));
    let hits = store.subject(&subject_hash(1), None, None, 0).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["late"]);
    // The next retention run finds the chain intact, and ingest goes on.
    store.prune_as_of(start_of(2), t0() + Duration::days(3)).await.unwrap();
    assert_eq!(store.ingest(&[event("b1", t0() + Duration::days(3))]).await.unwrap().accepted, 1);
    assert_eq!(store.verify(None).await.unwrap().first_broken, None);
}

/// A report query holding the events table (up to `--query-timeout`) does not hold retention
/// and, behind it, every ingest: the prune waits a short while for the lock a partition drop
/// needs, then deletes the day's rows instead and leaves the partition to a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_does_not_wait_long_behind_a_reader() {
    let Some(env) = Env::postgres().await else { return };
    let store = env.open().await;
    let start_of = |d: i64| (t0() + Duration::days(d)).date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let events =
        [event("a0", t0()), event("a1", t0() + Duration::days(1)), event("b0", t0() + Duration::days(3))];
    assert_eq!(store.ingest(&events).await.unwrap().accepted, 3);
    let partitions = "SELECT COUNT(*) FROM pg_class WHERE relname LIKE 'events\\_%' AND relkind = 'r' \
                      AND relnamespace = current_schema()::regnamespace";
    let before = env.count(partitions).await;

    let reader = env.read_events_open().await;
    let pruned = tokio::time::timeout(
        StdDuration::from_secs(15),
        store.prune_as_of(start_of(2), t0() + Duration::days(3)),
    )
    .await
    .expect("the prune did not wait for the reader to finish")
    .unwrap();
    assert_eq!((pruned.deleted, pruned.anchor.seq), (2, 2));
    assert_eq!(env.count(partitions).await, before, "no partition dropped while the table was busy");
    // Ingest went on meanwhile, and the store verifies.
    assert_eq!(store.ingest(&[event("b1", t0() + Duration::days(3))]).await.unwrap().accepted, 1);
    assert_eq!(store.verify(None).await.unwrap().first_broken, None);

    // The reader gone, the next run that deletes anything drops the emptied days' partitions
    // too.
    reader.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.ingest(&[event("c0", t0() + Duration::days(5))]).await.unwrap().accepted, 1);
    let pruned = store.prune_as_of(start_of(4), t0() + Duration::days(5)).await.unwrap();
    assert_eq!(pruned.deleted, 2, "b0 and b1");
    assert!(env.count(partitions).await < before, "the empty days' partitions dropped");
    assert_eq!(store.verify(None).await.unwrap().first_broken, None);
}
