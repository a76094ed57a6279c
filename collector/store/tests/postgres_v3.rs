//! PostgreSQL schema V3 (the record-hash index in ingest order: `(bucket, 16-byte key, seq,
//! time_us)`, no `seq` index): a V2 store with events on two days converts, partition by
//! partition, and still verifies and answers subject queries; tampering with the converted
//! index is caught. Skipped without `CUSTOS_TEST_POSTGRES_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use common::{Env, event, t0};
use custos_api::AuditEvent;
use custos_store::BreakKind;

fn subject_hash(n: u64) -> String {
    format!("{n:064x}")
}

/// 30 events two hours apart (t0 is noon: they span three days); every third touches subject
/// 42 (twice, once stored), all touch subject 7, event 5 carries a record hash that is not hex.
fn v2_events() -> Vec<AuditEvent> {
    (0..30)
        .map(|i| {
            let mut e = event(&format!("v{i:03}"), t0() + Duration::hours(2 * i));
            e.principal = format!("user:u{}", i % 3);
            e.record_hashes = vec![subject_hash(7)];
            if i % 3 == 0 {
                e.record_hashes.extend([subject_hash(42), subject_hash(42)]);
            }
            if i == 5 {
                e.record_hashes.push("h".into());
            }
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_store_with_events_converts_verifies_and_answers_subject_queries() {
    let Some(env) = Env::postgres().await else { return };
    {
        let store = env.open().await;
        assert_eq!(store.ingest(&v2_events()).await.unwrap().accepted, 30);
    }
    env.raw(common::POSTGRES_RECORDS_BACK_TO_V2).await;
    assert_eq!(env.count("SELECT COUNT(*) FROM event_records WHERE record_hash = 'h'").await, 1);
    let v2_partitions = "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'event_records'::regclass";
    let partitions = env.count(v2_partitions).await;
    assert!(partitions >= 3, "{partitions} partitions");

    let store = env.open().await;
    assert_eq!(env.count("SELECT MAX(version) FROM custos_schema").await, 3);
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

    // Subject lookups through the converted index, newest first, with time bounds.
    let hits = store.subject(&subject_hash(42), None, None, 0).await.unwrap();
    let expected: Vec<String> = (0..30).rev().filter(|i| i % 3 == 0).map(|i| format!("v{i:03}")).collect();
    assert_eq!(hits.iter().map(|h| h.event_id.clone()).collect::<Vec<_>>(), expected);
    let bounded = store
        .subject(&subject_hash(42), Some(t0() + Duration::hours(6)), Some(t0() + Duration::hours(18)), 0)
        .await
        .unwrap();
    assert_eq!(bounded.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["v006", "v003"]);
    assert_eq!(store.subject(&subject_hash(7), None, None, 0).await.unwrap().len(), 30);
    assert_eq!(store.subject(&subject_hash(7), None, None, 4).await.unwrap().len(), 4);
    let h = store.subject("h", None, None, 0).await.unwrap();
    assert_eq!(h.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["v005"]);
    assert!(store.subject(&subject_hash(8), None, None, 0).await.unwrap().is_empty());

    // The chain continues; tampering with the converted index is caught.
    let mut more = common::events("w", 5);
    for (i, e) in more.iter_mut().enumerate() {
        e.time = common::rfc3339(t0() + Duration::hours(60) + Duration::seconds(i as i64));
        e.record_hashes = vec![subject_hash(42)];
    }
    assert_eq!(store.ingest(&more).await.unwrap().accepted, 5);
    assert_eq!(store.verify(None).await.unwrap().checked, 35);
    assert_eq!(store.subject(&subject_hash(42), None, None, 1).await.unwrap()[0].event_id, "w004");
    env.raw("DELETE FROM event_records WHERE seq = 4;").await;
    let b = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, 4), "{b:?}");
}
