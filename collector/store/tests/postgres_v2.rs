//! PostgreSQL schema V2 (the decision index reduced to the events that are not `Allow`): a V1
//! store with events migrates and still verifies and answers queries. Skipped without
//! `CUSTOS_TEST_POSTGRES_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use common::{Env, event, t0};
use custos_api::Decision;
use custos_store::{EventQuery, TopBy, TopEntry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_store_with_events_migrates_verifies_and_answers_queries() {
    let Some(env) = Env::postgres().await else { return };
    let batch: Vec<_> = (0..30)
        .map(|i| {
            let mut e = event(&format!("p{i:03}"), t0() + Duration::minutes(i));
            e.decision = [Decision::Allow, Decision::Deny, Decision::WouldDeny][i as usize % 3];
            e.principal = format!("user:u{}", i % 2);
            e.record_hashes = vec![format!("{:064x}", i % 4)];
            e
        })
        .collect();
    {
        let store = env.open().await;
        store.ingest(&batch).await.unwrap();
    }
    // Back to V1: V3 replaced the record-hash index, V2 only the decision index.
    env.raw(common::POSTGRES_RECORDS_BACK_TO_V2).await;
    env.raw(
        "DROP INDEX events_flagged_time;
         CREATE INDEX events_decision_time ON events (decision, time_us, seq);
         DELETE FROM custos_schema WHERE version = 2;",
    )
    .await;

    let store = env.open().await;
    let (client, conn) = tokio_postgres::connect(&env.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let version: i64 = client.query_one("SELECT MAX(version) FROM custos_schema", &[]).await.unwrap().get(0);
    assert_eq!(version, 5);
    let indexes: Vec<String> = client
        .query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'events' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(indexes.contains(&"events_flagged_time".to_owned()), "{indexes:?}");
    assert!(!indexes.contains(&"events_decision_time".to_owned()), "{indexes:?}");

    let report = store.verify(None).await.unwrap();
    assert_eq!((report.first_broken, report.checked), (None, 30));
    for (d, rem) in [(Decision::Allow, 0), (Decision::Deny, 1), (Decision::WouldDeny, 2)] {
        let page = store.query(&EventQuery { decision: Some(d), ..EventQuery::default() }).await.unwrap();
        let expected: Vec<String> =
            (0..30).rev().filter(|i| i % 3 == rem).map(|i| format!("p{i:03}")).collect();
        assert_eq!(page.events.into_iter().map(|e| e.id).collect::<Vec<_>>(), expected, "{d:?}");
    }
    // Denials: i % 3 == 1, principals alternate: 5 each.
    assert_eq!(
        store.top(TopBy::Denials, None, 0).await.unwrap(),
        [
            TopEntry { principal: "user:u0".into(), count: 5 },
            TopEntry { principal: "user:u1".into(), count: 5 }
        ]
    );
    assert_eq!(store.subject(&format!("{:064x}", 1), None, None, 0).await.unwrap().len(), 8);
    // Ingest continues the chain.
    store.ingest(&[event("after", t0() + Duration::hours(2))]).await.unwrap();
    assert_eq!(store.verify(None).await.unwrap().checked, 31);
}
