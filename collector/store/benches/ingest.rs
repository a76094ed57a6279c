//! Store benchmark (`make bench-store`): ingest throughput with 1,000-event batches into SQLite
//! and PostgreSQL, each beside a baseline of plain batched inserts of the same rows in the same
//! run, and the latency of the `subject` query ("who accessed this customer") once the store
//! holds many events.
//!
//! The baseline writes the same rows (same columns, same JSON body, same record-hash index rows)
//! into the same tables and indexes, one transaction per 1,000 events, the plain way of each
//! backend (SQLite: prepared inserts; PostgreSQL: `COPY ... FROM STDIN BINARY`, as the store),
//! but without what the store adds: the hash chain (SHA-256 per event, the chain head row),
//! idempotency by event id (`ON CONFLICT DO NOTHING`, the id lookup) and the batch validation.
//!
//! Environment: `CUSTOS_BENCH_EVENTS` (events measured for ingest, default 200,000),
//! `CUSTOS_BENCH_SUBJECT_EVENTS` (store size for the subject query, default 10,000,000; 0 skips
//! it), `CUSTOS_BENCH_POSTGRES_URL` (or `CUSTOS_TEST_POSTGRES_URL`; PostgreSQL is skipped
//! without either), `CUSTOS_BENCH_POSTGRES_SUBJECT_EVENTS` (the same subject query on
//! PostgreSQL, its store filled to that many events; default 0: skipped, the fill takes
//! minutes and the schema is dropped at the end).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use custos_api::audit::{AUDIT_SCHEMA_VERSION, AuditUser};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_store::AnyStore;

/// The allocator of the `custos` binary, in which the collector runs the store.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1000;
/// Data subjects in the synthetic traffic: each event touches up to 6 of them.
const SUBJECTS: u64 = 2_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
}

/// A cheap deterministic mix (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The keyed hash of data subject `n` as a sidecar would report it (64 hex chars).
fn subject_hash(n: u64) -> String {
    format!("{:016x}{:016x}{:016x}{:016x}", mix(n), mix(n ^ 1), mix(n ^ 2), mix(n ^ 3))
}

/// Event number `i` of the synthetic traffic: 200 users over 4 namespaces, 1 event per 10 ms,
/// 0 to 5 records each (most list calls return a few), 1 in 20 denied.
fn event(run: &str, i: u64) -> AuditEvent {
    let r = mix(i);
    let user = r % 200;
    let denied = r.is_multiple_of(20);
    let records = if denied { 0 } else { (r >> 8) % 6 };
    let time = t0() + chrono::Duration::milliseconds(i64::try_from(i * 10).unwrap());
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: format!("{run}-{i:012}"),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        cluster: Some("prod-eu".into()),
        namespace: format!("shop-{}", user % 4),
        policy: Some("customers".into()),
        rule: Some(if denied { "deny-export" } else { "read-own-branch" }.into()),
        mode: Mode::Enforce,
        pod: Some(format!("customer-api-{}", r % 3)),
        caller: None,
        user: Some(AuditUser {
            id: format!("u{user:04}"),
            attributes: [("branch".to_owned(), format!("HB-{:02}", user % 12))].into(),
        }),
        principal: format!("user:u{user:04}"),
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}/orders".into(),
        decision: if denied { Decision::Deny } else { Decision::Allow },
        reason: if denied { "rule_deny".into() } else { "rule_allow".into() },
        status: if denied { 403 } else { 200 },
        records_returned: records,
        records_filtered: 0,
        records_truncated: 0,
        masked: BTreeMap::from([("phone".to_owned(), records), ("name".to_owned(), records)]),
        bytes: 400 + records * 180,
        latency_us: 900 + r % 700,
        trace_id: None,
        record_hashes: (0..records).map(|k| subject_hash(mix(i * 8 + k) % SUBJECTS)).collect(),
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

fn batches(run: &str, from: u64, count: u64) -> impl Iterator<Item = Vec<AuditEvent>> + '_ {
    (from..from + count)
        .step_by(BATCH)
        .map(move |start| (start..(start + BATCH as u64).min(from + count)).map(|i| event(run, i)).collect())
}

/// One baseline row: the columns the store writes, without the chain.
struct Row {
    id: String,
    time_us: i64,
    namespace: String,
    policy: Option<String>,
    rule: Option<String>,
    principal: String,
    user_id: Option<String>,
    decision: &'static str,
    path: String,
    records_returned: i64,
    body: String,
    records: Vec<String>,
}

fn row(e: &AuditEvent) -> Row {
    Row {
        id: e.id.clone(),
        time_us: DateTime::parse_from_rfc3339(&e.time).unwrap().timestamp_micros(),
        namespace: e.namespace.clone(),
        policy: e.policy.clone(),
        rule: e.rule.clone(),
        principal: e.principal.clone(),
        user_id: e.user.as_ref().map(|u| u.id.clone()),
        decision: e.decision.as_str(),
        path: e.path.clone(),
        records_returned: i64::try_from(e.records_returned).unwrap(),
        body: serde_json::to_string(e).unwrap(),
        records: e.record_hashes.clone(),
    }
}

const FAKE_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The record-hash index key of a record hash, as the store computes it: the first 16 bytes of
/// its SHA-256 (`collector/store/src/chain.rs`).
fn record_key(record_hash: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(record_hash.as_bytes())[..16].to_vec()
}

/// Events per bucket of the record-hash index: `2^14` on SQLite, `2^16` on PostgreSQL
/// (`collector/store/src/chain.rs`).
const SQLITE_BUCKET_SHIFT: u32 = 14;
const POSTGRES_BUCKET_SHIFT: u32 = 16;

/// Plain batched inserts into a SQLite file with the store's schema (made by opening it as a
/// store), same pragmas (WAL, synchronous=FULL, page cache).
fn sqlite_baseline(path: &std::path::Path, run: &str, count: u64) -> Duration {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    // The store's writer cache (see collector/store/src/sqlite.rs).
    conn.pragma_update(None, "cache_size", -262_144).unwrap();
    // Checkpoints every 64 MiB, in pages of the file (made by the store: its page size).
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", (64 << 20) / page_size).unwrap();
    let mut seq: i64 = 1_000_000_000;
    let started = Instant::now();
    for batch in batches(run, 0, count) {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (seq, id, time_us, namespace, policy, rule, principal, user_id, \
                     decision, path, records_returned, prev_hash, hash, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .unwrap();
            let mut record = tx
                .prepare_cached(
                    "INSERT INTO event_records (bucket, record_key, seq, time_us) VALUES (?1, ?2, ?3, ?4)",
                )
                .unwrap();
            for e in &batch {
                let r = row(e);
                seq += 1;
                insert
                    .execute(rusqlite::params![
                        seq,
                        r.id,
                        r.time_us,
                        r.namespace,
                        r.policy,
                        r.rule,
                        r.principal,
                        r.user_id,
                        r.decision,
                        r.path,
                        r.records_returned,
                        FAKE_HASH,
                        FAKE_HASH,
                        r.body
                    ])
                    .unwrap();
                let mut keys: Vec<Vec<u8>> = r.records.iter().map(|h| record_key(h)).collect();
                keys.sort();
                keys.dedup();
                for k in &keys {
                    record.execute(rusqlite::params![seq >> SQLITE_BUCKET_SHIFT, k, seq, r.time_us]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed()
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Plain batched writes into the store's PostgreSQL tables (same schema, partitions and
/// indexes): one transaction per batch, `events` and `event_records` each written by one
/// `COPY ... FROM STDIN BINARY` (the fastest plain way, and the store's). Like the SQLite
/// baseline, no idempotency (`event_ids` is not written).
async fn postgres_baseline(url: &str, run: &str, count: u64) -> Duration {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    let mut client = pg_client(url).await;
    let t = Type::TEXT;
    let i = Type::INT8;
    let event_types = [
        i.clone(),
        t.clone(),
        i.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        i.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
    ];
    let mut seq: i64 = 1_000_000_000;
    let started = Instant::now();
    for batch in batches(run, 0, count) {
        let rows: Vec<(i64, Row)> = batch
            .iter()
            .map(|e| {
                seq += 1;
                (seq, row(e))
            })
            .collect();
        let tx = client.transaction().await.unwrap();
        let sink = tx
            .copy_in(
                "COPY events (seq, id, time_us, namespace, policy, rule, principal, user_id, decision, \
                 path, records_returned, prev_hash, hash, body) FROM STDIN BINARY",
            )
            .await
            .unwrap();
        let mut w = std::pin::pin!(BinaryCopyInWriter::new(sink, &event_types));
        for (s, r) in &rows {
            let values: [&(dyn ToSql + Sync); 14] = [
                s,
                &r.id,
                &r.time_us,
                &r.namespace,
                &r.policy,
                &r.rule,
                &r.principal,
                &r.user_id,
                &r.decision,
                &r.path,
                &r.records_returned,
                &FAKE_HASH,
                &FAKE_HASH,
                &r.body,
            ];
            w.as_mut().write(&values).await.unwrap();
        }
        w.as_mut().finish().await.unwrap();
        let sink = tx
            .copy_in("COPY event_records (bucket, record_key, seq, time_us) FROM STDIN BINARY")
            .await
            .unwrap();
        let mut w =
            std::pin::pin!(BinaryCopyInWriter::new(sink, &[i.clone(), Type::BYTEA, i.clone(), i.clone()]));
        for (s, r) in &rows {
            let mut keys: Vec<Vec<u8>> = r.records.iter().map(|h| record_key(h)).collect();
            keys.sort();
            keys.dedup();
            let bucket = s >> POSTGRES_BUCKET_SHIFT;
            for k in keys {
                w.as_mut().write(&[&bucket, &k, s, &r.time_us]).await.unwrap();
            }
        }
        w.as_mut().finish().await.unwrap();
        tx.commit().await.unwrap();
    }
    started.elapsed()
}

async fn ingest(store: &AnyStore, run: &str, from: u64, count: u64) -> Duration {
    let started = Instant::now();
    for batch in batches(run, from, count) {
        let out = store.ingest(&batch).await.unwrap();
        assert_eq!(out.accepted, batch.len() as u64, "every event of a fresh batch is stored");
    }
    started.elapsed()
}

fn rate(count: u64, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64()
}

fn report(backend: &str, baseline_name: &str, count: u64, custos: Duration, baseline: Duration) {
    let (c, b) = (rate(count, custos), rate(count, baseline));
    println!(
        "ingest {backend:<10} {count} events in {BATCH}-event batches: custos {c:>9.0} ev/s   \
         {baseline_name} {b:>9.0} ev/s   ratio {:.2}",
        c / b
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Fills `store` to `total` events (reusing what an earlier run left there) and times 200
/// `subject` queries for random data subjects.
async fn subject_latency(backend: &str, store: &AnyStore, total: u64) {
    let head = store.head().await.unwrap().seq;
    if head < total {
        let started = Instant::now();
        let missing = total - head;
        let mut done = 0;
        for batch in batches("fill", head, missing) {
            store.ingest(&batch).await.unwrap();
            done += batch.len() as u64;
            if done.is_multiple_of(1_000_000) {
                println!(
                    "  {backend}: {} of {total} events stored ({:.0} ev/s)",
                    head + done,
                    rate(done, started.elapsed())
                );
            }
        }
    }
    let mut times = Vec::new();
    let mut found = 0;
    for q in 0..200u64 {
        let hash = subject_hash(mix(q * 7919) % SUBJECTS);
        let started = Instant::now();
        let accesses = store.subject(&hash, None, None, 100).await.unwrap();
        times.push(started.elapsed());
        found += accesses.len();
    }
    times.sort();
    println!(
        "subject    {backend:<10} at {total} events: p50 {:.2} ms  p99 {:.2} ms  ({} accesses found by 200 queries; target p50 <= 50 ms)",
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        percentile(&times, 0.99).as_secs_f64() * 1000.0,
        found
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let count = env_u64("CUSTOS_BENCH_EVENTS", 200_000);
    let subject_total = env_u64("CUSTOS_BENCH_SUBJECT_EVENTS", 10_000_000);
    let pg_subject_total = env_u64("CUSTOS_BENCH_POSTGRES_SUBJECT_EVENTS", 0);
    let dir = tempfile::tempdir().unwrap();

    // SQLite: the store and the baseline on separate files, alternating twice.
    let mut custos = Duration::ZERO;
    let mut baseline = Duration::ZERO;
    for round in 0..2 {
        let store_path = dir.path().join(format!("custos-{round}.db"));
        let store = custos_store::open(&format!("sqlite:{}", store_path.display())).await.unwrap();
        custos += ingest(&store, &format!("c{round}"), 0, count / 2).await;
        drop(store);
        let base_path = dir.path().join(format!("baseline-{round}.db"));
        drop(custos_store::open(&format!("sqlite:{}", base_path.display())).await.unwrap());
        let path = base_path.clone();
        let run = format!("b{round}");
        baseline +=
            tokio::task::spawn_blocking(move || sqlite_baseline(&path, &run, count / 2)).await.unwrap();
    }
    report("sqlite", "plain batched inserts", count / 2 * 2, custos, baseline);

    let pg =
        std::env::var("CUSTOS_BENCH_POSTGRES_URL").or_else(|_| std::env::var("CUSTOS_TEST_POSTGRES_URL"));
    let reachable = match &pg {
        Ok(base) => tokio_postgres::connect(base, tokio_postgres::NoTls).await.is_ok(),
        Err(_) => false,
    };
    let pg_schemas = match &pg {
        Ok(base) if reachable => {
            let admin = pg_client(base).await;
            let suffix = std::process::id();
            let (store_schema, base_schema) =
                (format!("custos_bench_{suffix}"), format!("custos_bench_base_{suffix}"));
            for s in [&store_schema, &base_schema] {
                admin
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE; CREATE SCHEMA {s}"))
                    .await
                    .unwrap();
            }
            let with = |s: &str| {
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options=-csearch_path%3D{s}")
            };
            let store = custos_store::open(&with(&store_schema)).await.unwrap();
            // The baseline's tables: the store's schema; one event creates the day partition
            // the measured rows fall into.
            let base_store = custos_store::open(&with(&base_schema)).await.unwrap();
            base_store.ingest(&[event("warm-up", 0)]).await.unwrap();
            drop(base_store);
            let c = ingest(&store, "pc", 0, count).await;
            let b = postgres_baseline(&with(&base_schema), "pb", count).await;
            report("postgres", "plain batched COPY", count, c, b);
            Some((admin, store, store_schema, base_schema))
        }
        _ => {
            println!(
                "ingest postgres   skipped: no PostgreSQL reachable at CUSTOS_BENCH_POSTGRES_URL / CUSTOS_TEST_POSTGRES_URL"
            );
            None
        }
    };

    if subject_total > 0 {
        // A file that outlives the run (target/), so a re-run does not refill 10 M events.
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("custos-bench-subject.db");
        let store = custos_store::open(&format!("sqlite:{}", path.display())).await.unwrap();
        subject_latency("sqlite", &store, subject_total).await;
    }
    if let Some((admin, store, store_schema, base_schema)) = pg_schemas {
        if pg_subject_total > 0 {
            subject_latency("postgres", &store, pg_subject_total).await;
        }
        drop(store);
        for s in [store_schema, base_schema] {
            admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE")).await.unwrap();
        }
    }
}
