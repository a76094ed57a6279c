//! SQLite schema V2 (the record-hash index kept in ingest order, 16-byte keys): a V1 store
//! with events converts and still verifies and answers queries (the index itself:
//! `record_index.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use common::{Env, conversion_events};
use custos_api::AuditEvent;
use custos_store::{EventQuery, GENESIS_HASH, chain_hash};

/// The V1 schema as released (a fixture: the store's own copy must never change either).
const V1: &str = "
CREATE TABLE custos_schema (version INTEGER PRIMARY KEY, applied_at_us INTEGER NOT NULL);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    time_us INTEGER NOT NULL,
    namespace TEXT NOT NULL,
    policy TEXT,
    rule TEXT,
    principal TEXT NOT NULL,
    user_id TEXT,
    decision TEXT NOT NULL,
    path TEXT NOT NULL,
    records_returned INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX events_time ON events (time_us);
CREATE INDEX events_principal_time ON events (principal, time_us);
CREATE INDEX events_policy_time ON events (policy, time_us);
CREATE INDEX events_decision_time ON events (decision, time_us);
CREATE TABLE event_records (
    record_hash TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (record_hash, time_us, seq)
) WITHOUT ROWID;
CREATE INDEX event_records_seq ON event_records (seq);
CREATE TABLE chain_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE chain_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    pruned_before_us INTEGER
);
CREATE TABLE alerts (id TEXT PRIMARY KEY, time_us INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX alerts_time ON alerts (time_us);
INSERT INTO custos_schema VALUES (1, 0);
";

/// Writes `events` into a fresh V1 store at `path` as V1 ingest did (chain, columns, one
/// record-hash row per distinct record hash); returns the head hash.
fn write_v1_store(path: &std::path::Path, events: &[AuditEvent]) -> String {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
    conn.execute_batch(V1).unwrap();
    let tx = conn.transaction().unwrap();
    let mut prev = GENESIS_HASH.to_owned();
    for (i, e) in events.iter().enumerate() {
        let seq = i as i64 + 1;
        let mut stored = e.clone();
        stored.prev_hash = Some(prev.clone());
        let body = serde_json::to_string(&stored).unwrap();
        let hash = chain_hash(&prev, &body);
        let time_us = chrono::DateTime::parse_from_rfc3339(&e.time).unwrap().timestamp_micros();
        tx.execute(
            "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            rusqlite::params![
                seq,
                e.id,
                time_us,
                e.namespace,
                e.policy,
                e.rule,
                e.principal,
                e.user.as_ref().map(|u| u.id.clone()),
                e.decision.as_str(),
                e.path,
                e.records_returned as i64,
                prev,
                hash,
                body
            ],
        )
        .unwrap();
        let mut hashes = e.record_hashes.clone();
        hashes.sort();
        hashes.dedup();
        for h in hashes {
            tx.execute("INSERT INTO event_records VALUES (?1, ?2, ?3)", rusqlite::params![h, time_us, seq])
                .unwrap();
        }
        prev = hash;
    }
    tx.execute("INSERT INTO chain_head VALUES (1, ?1, ?2)", rusqlite::params![events.len() as i64, prev])
        .unwrap();
    tx.execute("INSERT INTO chain_anchor VALUES (1, 0, ?1, NULL)", [GENESIS_HASH]).unwrap();
    tx.commit().unwrap();
    prev
}

async fn ids(store: &custos_store::AnyStore, q: EventQuery) -> Vec<String> {
    store.query(&q).await.unwrap().events.into_iter().map(|e| e.id).collect()
}

#[tokio::test]
async fn a_v1_store_with_events_migrates_verifies_and_answers_queries() {
    let env = Env::sqlite();
    let Env::Sqlite { path, .. } = &env else { unreachable!() };
    let head_hash = write_v1_store(path, &conversion_events(Duration::minutes(1)));

    let store = env.open().await;
    let head = store.head().await.unwrap();
    assert_eq!((head.seq, head.hash.as_str()), (30, head_hash.as_str()));
    let report = store.verify(None).await.unwrap();
    assert_eq!((report.first_broken, report.checked), (None, 30));
    // The schema is V3 (V2, then the applied rules' usage index) and the V1 table is gone.
    let conn = rusqlite::Connection::open(path).unwrap();
    let version: i64 = conn.query_row("SELECT MAX(version) FROM custos_schema", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    let old: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'event_records_v1'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(old, 0);
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM event_records", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 30 + 10 + 1);

    // Event queries.
    let by_principal =
        ids(&store, EventQuery { principal: Some("user:u1".into()), ..EventQuery::default() }).await;
    let expected: Vec<String> = (0..30).rev().filter(|i| i % 3 == 1).map(|i| format!("v{i:03}")).collect();
    assert_eq!(by_principal, expected);

    // Subject lookups through the converted index; the chain continues; tampering with the
    // converted index is caught.
    common::assert_converted_index(&env, &store, Duration::minutes(1), Duration::hours(1)).await;
    common::assert_applied_rules_counted(&store, common::t0() + Duration::seconds(90)).await;
}
