//! Test environments: a SQLite file in a temporary directory, or a fresh schema in the
//! PostgreSQL database named by `CUSTOS_TEST_POSTGRES_URL` (dropped afterwards).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use custos_api::audit::{AUDIT_SCHEMA_VERSION, AuditUser};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_store::AnyStore;

pub const POSTGRES_ENV: &str = "CUSTOS_TEST_POSTGRES_URL";

pub enum Env {
    Sqlite { _dir: tempfile::TempDir, path: PathBuf },
    Postgres { base: String, schema: String },
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static NOTICE: AtomicBool = AtomicBool::new(false);

fn with_options(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-csearch_path%3D{schema}")
}

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

impl Env {
    pub fn sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        Env::Sqlite { _dir: dir, path }
    }

    /// `None` (with a notice) when no PostgreSQL is configured.
    pub async fn postgres() -> Option<Env> {
        let Ok(base) = std::env::var(POSTGRES_ENV) else {
            // Once, and past libtest's output capture, so that a skipped suite is visible.
            if !NOTICE.swap(true, Ordering::Relaxed) {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "NOTICE: {POSTGRES_ENV} is not set: the PostgreSQL store suite is skipped"
                );
            }
            return None;
        };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let schema = format!(
            "custos_test_{}_{}_{}",
            std::process::id(),
            nanos,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        pg_connect(&base).await.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
        Some(Env::Postgres { base, schema })
    }

    pub fn url(&self) -> String {
        match self {
            Env::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
            Env::Postgres { base, schema } => with_options(base, schema),
        }
    }

    pub async fn open(&self) -> AnyStore {
        custos_store::open(&self.url()).await.unwrap()
    }

    /// Runs SQL through a second connection, as an attacker with database access would.
    pub async fn raw(&self, sql: &str) {
        match self {
            Env::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Env::Postgres { .. } => {
                pg_connect(&self.url()).await.batch_execute(sql).await.unwrap();
            }
        }
    }
}

/// Turns a PostgreSQL store's record-hash index back into the V2 layout (64-character hex
/// `record_hash` keys, a `seq` index, the same day partitions), rebuilt from the event
/// bodies, drops the V5 rule_principal column and the V4 usage index of applied rules, and
/// forgets V3, V4 and V5: the next open
/// migrates it again.
pub const POSTGRES_RECORDS_BACK_TO_V2: &str = "
DO $$
DECLARE r record;
BEGIN
  ALTER TABLE events DROP COLUMN rule_principal;
  DELETE FROM custos_schema WHERE version = 5;
  DROP TABLE event_applied_rules;
  DELETE FROM custos_schema WHERE version = 4;
  FOR r IN SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'event_records'::regclass LOOP
    EXECUTE format('ALTER TABLE %I RENAME TO %I', r.name, 'old_' || r.name);
  END LOOP;
  ALTER TABLE event_records RENAME TO old_event_records;
  CREATE TABLE event_records (
      record_hash text NOT NULL,
      time_us bigint NOT NULL,
      seq bigint NOT NULL,
      PRIMARY KEY (record_hash, time_us, seq)
  ) PARTITION BY RANGE (time_us);
  CREATE INDEX event_records_seq ON event_records (seq);
  FOR r IN SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'old_event_records'::regclass LOOP
    EXECUTE format('CREATE TABLE %I PARTITION OF event_records %s', substr(r.name, 5), r.bound);
  END LOOP;
  DROP TABLE old_event_records;
  INSERT INTO event_records
    SELECT DISTINCT h, time_us, seq FROM events, jsonb_array_elements_text(body::jsonb -> 'recordHashes') AS h;
  DELETE FROM custos_schema WHERE version = 3;
END $$;
";

impl Env {
    /// PostgreSQL: a second connection holding an exclusive lock on `events` until dropped, so
    /// that every query of the table waits (`None` on SQLite, whose readers never wait).
    pub async fn lock_events(&self) -> Option<tokio_postgres::Client> {
        match self {
            Env::Sqlite { .. } => None,
            Env::Postgres { .. } => {
                Some(self.in_transaction("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").await)
            }
        }
    }

    /// PostgreSQL: a second connection holding a lock on `event_records` (the parent table)
    /// that makes writers wait, until rolled back or dropped; readers go on. An ingest of an
    /// event with record hashes then waits after writing its `events` rows, uncommitted.
    pub async fn lock_records(&self) -> tokio_postgres::Client {
        self.in_transaction("LOCK TABLE ONLY event_records IN SHARE MODE").await
    }

    /// PostgreSQL: a second connection in a transaction that has read `events` (a report
    /// query still running, as a prune sees it), until rolled back or dropped.
    pub async fn read_events_open(&self) -> tokio_postgres::Client {
        self.in_transaction("SELECT COUNT(*) FROM events").await
    }

    /// PostgreSQL: a second connection that ran `statement` in a transaction it keeps open
    /// (what it locks stays locked) until rolled back or dropped; a failing test holding it:
    /// the server ends the session after 20 s.
    async fn in_transaction(&self, statement: &str) -> tokio_postgres::Client {
        let client = pg_connect(&self.url()).await;
        client
            .batch_execute(&format!("SET idle_in_transaction_session_timeout = '20s'; BEGIN; {statement}"))
            .await
            .unwrap();
        client
    }

    /// The first column of the first row of `sql` (a count), read through a second connection.
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            Env::Sqlite { path, .. } => {
                rusqlite::Connection::open(path).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
            }
            Env::Postgres { .. } => pg_connect(&self.url()).await.query_one(sql, &[]).await.unwrap().get(0),
        }
    }

    /// A blob literal of the backend's SQL.
    pub fn blob_literal(&self, bytes: &[u8]) -> String {
        match self {
            Env::Sqlite { .. } => format!("x'{}'", hex::encode(bytes)),
            Env::Postgres { .. } => format!("'\\x{}'::bytea", hex::encode(bytes)),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Env::Postgres { base, schema } = self {
            let (base, schema) = (base.clone(), schema.clone());
            // A separate thread and runtime: this may run inside (or after) the test's runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    pg_connect(&base)
                        .await
                        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                        .await
                        .unwrap();
                });
            })
            .join();
        }
    }
}

/// 2025-06-01T12:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// An event with defaults: Allow by `user:alice` under policy `customers`, rule `read`.
pub fn event(id: &str, time: DateTime<Utc>) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: id.to_owned(),
        time: rfc3339(time),
        cluster: None,
        namespace: "shop".into(),
        policy: Some("customers".into()),
        rule: Some("read".into()),
        mode: Mode::Enforce,
        pod: Some("customers-0".into()),
        caller: None,
        user: Some(AuditUser {
            id: "alice".into(),
            attributes: [("branch".to_owned(), "north".to_owned())].into(),
        }),
        principal: "user:alice".into(),
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}".into(),
        decision: Decision::Allow,
        reason: "rule read allows".into(),
        status: 200,
        records_returned: 1,
        records_filtered: 0,
        records_truncated: 0,
        masked: [("email".to_owned(), 1)].into(),
        bytes: 120,
        latency_us: 900,
        trace_id: None,
        record_hashes: vec![],
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

/// `n` events `e000..`, one second apart from `t0`.
pub fn events(prefix: &str, n: usize) -> Vec<AuditEvent> {
    (0..n).map(|i| event(&format!("{prefix}{i:03}"), t0() + chrono::Duration::seconds(i as i64))).collect()
}

/// The record hash of data subject `n` (64 hex characters, as the sidecars send).
pub fn subject_hash(n: u64) -> String {
    format!("{n:064x}")
}

/// The events of the record-hash index conversion tests: 30 events `spacing` apart (ids
/// `v000`..`v029`, principals `user:u0..2` in turn); every third touches subject 42 (listed
/// twice), all touch subject 7, event 5 also carries a record hash that is not hex.
/// After a migration: an event at `at` naming a rule applied beside the deciding one is
/// counted in that rule's usage.
pub async fn assert_applied_rules_counted(store: &AnyStore, at: DateTime<Utc>) {
    let mut e = event("applied-after-migration", at);
    e.records_returned = 4;
    e.also_applied = vec![custos_api::audit::AppliedRule {
        policy: "baseline".into(),
        rule: "mask-addresses".into(),
        principal: None,
    }];
    store.ingest(&[e]).await.unwrap();
    let u = store.usage(Some("shop"), "baseline", "user:alice", at, None).await.unwrap();
    let expected = custos_api::collector::RuleUsage {
        requests_last_minute: 1,
        records_last_hour: 4,
        records_last_day: 4,
    };
    assert_eq!(u.rules.get("mask-addresses"), Some(&expected), "{u:?}");
}

pub fn conversion_events(spacing: chrono::Duration) -> Vec<AuditEvent> {
    (0..30)
        .map(|i| {
            let mut e = event(&format!("v{i:03}"), t0() + spacing * i);
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

/// What a store holding [`conversion_events`] (`spacing` apart) must answer after its
/// record-hash index was converted: subject lookups newest first, with time bounds and limits,
/// the non-hex hash, an unknown subject; then the chain continues with 5 events `after` t0 and
/// a deleted index row is caught as an edit of its event.
pub async fn assert_converted_index(
    env: &Env,
    store: &AnyStore,
    spacing: chrono::Duration,
    after: chrono::Duration,
) {
    let hits = store.subject(&subject_hash(42), None, None, 0).await.unwrap();
    let expected: Vec<String> = (0..30).rev().filter(|i| i % 3 == 0).map(|i| format!("v{i:03}")).collect();
    assert_eq!(hits.iter().map(|h| h.event_id.clone()).collect::<Vec<_>>(), expected);
    let bounded = store
        .subject(&subject_hash(42), Some(t0() + spacing * 3), Some(t0() + spacing * 9), 0)
        .await
        .unwrap();
    assert_eq!(bounded.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["v006", "v003"]);
    assert_eq!(store.subject(&subject_hash(7), None, None, 0).await.unwrap().len(), 30);
    assert_eq!(store.subject(&subject_hash(7), None, None, 4).await.unwrap().len(), 4);
    let h = store.subject("h", None, None, 0).await.unwrap();
    assert_eq!(h.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["v005"]);
    assert!(store.subject(&subject_hash(8), None, None, 0).await.unwrap().is_empty());

    let mut more = events("w", 5);
    for (i, e) in more.iter_mut().enumerate() {
        e.time = rfc3339(t0() + after + chrono::Duration::seconds(i as i64));
        e.record_hashes = vec![subject_hash(42)];
    }
    assert_eq!(store.ingest(&more).await.unwrap().accepted, 5);
    assert_eq!(store.verify(None).await.unwrap().checked, 35);
    assert_eq!(store.subject(&subject_hash(42), None, None, 1).await.unwrap()[0].event_id, "w004");
    env.raw("DELETE FROM event_records WHERE seq = 4;").await;
    let b = store.verify(None).await.unwrap().first_broken.unwrap();
    assert_eq!((b.kind, b.seq), (custos_store::BreakKind::Edited, 4), "{b:?}");
}
