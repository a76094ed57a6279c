//! PostgreSQL schema V3 (the record-hash index in ingest order: `(bucket, 16-byte key, seq,
//! time_us)`, no `seq` index): a V2 store with events on three days converts, partition by
//! partition, and still verifies and answers subject queries; tampering with the converted
//! index is caught. Skipped without `CUSTOS_TEST_POSTGRES_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use common::{Env, conversion_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_store_with_events_converts_verifies_and_answers_subject_queries() {
    let Some(env) = Env::postgres().await else { return };
    {
        let store = env.open().await;
        assert_eq!(
            store
                .ingest_as_before_admission_checks(&conversion_events(Duration::hours(2)))
                .await
                .unwrap()
                .accepted,
            30
        );
    }
    env.raw(common::POSTGRES_RECORDS_BACK_TO_V2).await;
    assert_eq!(env.count("SELECT COUNT(*) FROM event_records WHERE record_hash = 'h'").await, 1);
    let v2_partitions = "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'event_records'::regclass";
    let partitions = env.count(v2_partitions).await;
    assert!(partitions >= 3, "{partitions} partitions");

    let store = env.open().await;
    assert_eq!(env.count("SELECT MAX(version) FROM custos_schema").await, 5);
    // V4: a partition of the applied rules' usage index for every day of events.
    let events_partitions =
        env.count("SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").await;
    let applied_partitions =
        env.count("SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'event_applied_rules'::regclass").await;
    assert_eq!(applied_partitions, events_partitions);
    assert_eq!(env.count("SELECT COUNT(*) FROM pg_class WHERE relname LIKE 'event_records_v2%'").await, 0);
    assert_eq!(env.count(v2_partitions).await, partitions);
    assert_eq!(env.count("SELECT COUNT(*) FROM event_records").await, 30 + 10 + 1);
    assert_eq!(
        env.count(
            "SELECT COUNT(*) FROM pg_attribute WHERE attrelid = 'event_records'::regclass \
             AND attname IN ('bucket', 'record_key') AND NOT attisdropped"
        )
        .await,
        2
    );
    let report = store.verify(None).await.unwrap();
    assert_eq!((report.first_broken, report.checked), (None, 30));

    // Subject lookups through the converted index (t0 is noon: the events span three days);
    // the chain continues; tampering with the converted index is caught.
    common::assert_converted_index(&env, &store, Duration::hours(2), Duration::hours(60)).await;
    common::assert_applied_rules_counted(&store, common::t0() + Duration::hours(1)).await;
}

/// A replica of a version before V4 prunes a day by dropping its `events` and
/// `event_records` partitions only: the day's partition of the applied rules' index is left
/// behind, empty or not, and the next prune (by this version) drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_rules_partition_left_by_an_older_replica_goes_with_the_next_prune() {
    let Some(env) = Env::postgres().await else { return };
    let store = env.open().await;
    let t0 = common::t0();
    // The clock at the newest event, on the third day.
    let now = t0 + Duration::days(2);
    let batch: Vec<_> = [t0, t0 + Duration::days(1), now]
        .into_iter()
        .enumerate()
        .map(|(i, at)| {
            let mut e = common::event(&format!("o{i}"), at);
            e.also_applied = vec![custos_api::audit::AppliedRule {
                policy: "baseline".into(),
                rule: "mask-addresses".into(),
                principal: None,
            }];
            e
        })
        .collect();
    store.ingest(&batch).await.unwrap();
    let day = |at: chrono::DateTime<chrono::Utc>| at.format("d%Y%m%d").to_string();
    let exists = |suffix: String| {
        format!(
            "SELECT COUNT(*) FROM (SELECT to_regclass('event_applied_rules_{suffix}') AS t) p WHERE t IS NOT NULL"
        )
    };
    assert_eq!(env.count(&exists(day(t0))).await, 1);
    // The first day pruned; then its applied partition put back, as an older replica's prune
    // would have left it.
    let midnight =
        |at: chrono::DateTime<chrono::Utc>| at.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    store.prune_as_of(midnight(t0 + Duration::days(1)), now).await.unwrap();
    assert_eq!(env.count(&exists(day(t0))).await, 0);
    let (lo, hi) = (midnight(t0).timestamp_micros(), midnight(t0 + Duration::days(1)).timestamp_micros());
    env.raw(&format!(
        "CREATE TABLE event_applied_rules_{} PARTITION OF event_applied_rules FOR VALUES FROM ({lo}) TO ({hi})",
        day(t0)
    ))
    .await;
    assert_eq!(env.count(&exists(day(t0))).await, 1);
    store.prune_as_of(midnight(t0 + Duration::days(2)), now).await.unwrap();
    assert_eq!(env.count(&exists(day(t0))).await, 0, "the orphan partition was left");
    assert_eq!(env.count(&exists(day(t0 + Duration::days(1)))).await, 0);
    assert_eq!(store.verify(None).await.unwrap().first_broken, None);
}
