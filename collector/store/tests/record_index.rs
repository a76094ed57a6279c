//! The record-hash index of both backends (schema V2 on SQLite, V3 on PostgreSQL): keyed by
//! (seq bucket, 16-byte key, seq), so that a batch writes into one bucket's pages. Hits are
//! checked against the event bodies; verification, subject lookups and retention cross bucket
//! boundaries. The PostgreSQL cases are skipped without `CUSTOS_TEST_POSTGRES_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use common::{Env, event, subject_hash, t0};
use custos_api::AuditEvent;
use custos_store::BreakKind;
use sha2::Digest;

#[tokio::test]
async fn sqlite_a_planted_index_row_is_not_an_access_and_fails_verification() {
    a_planted_index_row_is_not_an_access_and_fails_verification(Env::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_planted_index_row_is_not_an_access_and_fails_verification() {
    let Some(env) = Env::postgres().await else { return };
    a_planted_index_row_is_not_an_access_and_fails_verification(env).await;
}

#[tokio::test]
async fn sqlite_verification_subject_lookup_and_retention_span_index_buckets() {
    // SQLite: 2^14 events a bucket.
    verification_subject_lookup_and_retention_span_index_buckets(Env::sqlite(), 1 << 14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verification_subject_lookup_and_retention_span_index_buckets() {
    let Some(env) = Env::postgres().await else { return };
    // PostgreSQL: 2^16 events a bucket.
    verification_subject_lookup_and_retention_span_index_buckets(env, 1 << 16).await;
}

async fn a_planted_index_row_is_not_an_access_and_fails_verification(env: Env) {
    let store = env.open().await;
    let mut a = event("a", t0());
    a.record_hashes = vec![subject_hash(1)];
    let mut b = event("b", t0() + Duration::seconds(1));
    b.record_hashes = vec![subject_hash(2)];
    store.ingest(&[a, b]).await.unwrap();
    // An index row claiming that `b` (seq 2) returned subject 1: the key matches, the body
    // does not name the record hash, as with two record hashes sharing a key.
    let key = env.blob_literal(&sha2::Sha256::digest(subject_hash(1).as_bytes())[..16]);
    env.raw(&format!(
        "INSERT INTO event_records (bucket, record_key, seq, time_us) \
         SELECT 0, {key}, 2, time_us FROM events WHERE seq = 2;"
    ))
    .await;
    let hits = store.subject(&subject_hash(1), None, None, 0).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["a"]);
    let broken = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((broken.kind, broken.seq), (BreakKind::Edited, 2), "{broken:?}");
}

async fn verification_subject_lookup_and_retention_span_index_buckets(env: Env, bucket: usize) {
    // `bucket` events per index bucket: bucket + 3,616 events fill bucket 0 and part of 1.
    let store = env.open().await;
    let n = bucket + 3_616;
    let all: Vec<AuditEvent> = (0..n)
        .map(|i| {
            let mut e = event(&format!("b{i:06}"), t0() + Duration::seconds(i as i64));
            e.record_hashes = vec![subject_hash((i % 1000) as u64)];
            if i % 7 == 0 {
                e.record_hashes.push(subject_hash(5000));
            }
            e
        })
        .collect();
    for chunk in all.chunks(1000) {
        assert_eq!(store.ingest(chunk).await.unwrap().accepted, chunk.len() as u64);
    }
    let report = store.verify(None).await.unwrap();
    assert_eq!((report.first_broken, report.checked), (None, n as u64));
    // From just before the bucket boundary.
    let from = (bucket - 384) as u64;
    let partial = store.verify(Some(from)).await.unwrap();
    assert_eq!(
        (partial.first_broken, partial.checked, partial.start.seq),
        (None, n as u64 - from + 1, from - 1)
    );

    let sevens: Vec<usize> = (0..n).rev().filter(|i| i % 7 == 0).collect();
    let hits = store.subject(&subject_hash(5000), None, None, 0).await.unwrap();
    let expected: Vec<String> = sevens.iter().take(100).map(|i| format!("b{i:06}")).collect();
    assert_eq!(hits.iter().map(|h| h.event_id.clone()).collect::<Vec<_>>(), expected);
    assert_eq!(store.subject(&subject_hash(5000), None, None, 100_000).await.unwrap().len(), sevens.len());
    let threes = |from: usize| (from..n).filter(|i| i % 1000 == 3).count();
    assert_eq!(store.subject(&subject_hash(3), None, None, 0).await.unwrap().len(), threes(0));

    // Retention into bucket 1: the events before `cut` go, the rest still verifies.
    let cut = bucket + 616;
    // The clock at the newest event.
    let now = t0() + Duration::seconds(n as i64 - 1);
    let pruned = store.prune_as_of(t0() + Duration::seconds(cut as i64), now).await.unwrap();
    assert_eq!((pruned.deleted, pruned.anchor.seq), (cut as u64, cut as u64));
    let report = store.verify(None).await.unwrap();
    assert_eq!((report.first_broken, report.checked), (None, (n - cut) as u64));
    assert_eq!(store.subject(&subject_hash(3), None, None, 0).await.unwrap().len(), threes(cut));
    assert_eq!(env.count(&format!("SELECT COUNT(*) FROM event_records WHERE seq <= {cut}")).await, 0);

    // A hidden access in bucket 1 is caught.
    let hidden = bucket + 1_616;
    env.raw(&format!("DELETE FROM event_records WHERE seq = {hidden};")).await;
    let b = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (BreakKind::Edited, hidden as u64), "{b:?}");
}
