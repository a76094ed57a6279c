//! The SQLite backend: one file, WAL, one writer connection and a few readers, each used
//! from a blocking task.
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL`, so the WAL is fsynced at every
//! commit and an acknowledged batch survives a power loss (NORMAL would only fsync at
//! checkpoints: a crash of the machine could lose the last acknowledged batches). With one
//! transaction per batch this is one fsync per batch.
//!
//! Writers are serialised by `BEGIN IMMEDIATE` (SQLite's single write lock), so two
//! processes sharing the file also keep one consistent chain.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custos_api::collector::RuleUsage;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::chain::{
    self, CHAIN_COLUMNS, ChainRow, Columns, GENESIS_HASH, Link, RecordKey, RecordsBySeq, SQLITE_BUCKET_SHIFT,
    Unlinked,
};
use crate::query::{self, Param, TimeRange};
use crate::{Error, EventQuery, Ingested, Result, SubjectAccess, TopBy, TopEntry};

/// Reader connections of a file store (WAL lets them read while the writer writes).
const READERS: usize = 2;

const V1: &str = "
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
CREATE TABLE chain_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE chain_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    pruned_before_us INTEGER
);
CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    time_us INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX alerts_time ON alerts (time_us);
";

/// V2: the record-hash index clustered by ingest order. V1 kept `event_records` ordered by
/// record hash, so the rows of every batch landed on random pages of an ever larger index and
/// each commit wrote nearly one page per record hash to the WAL (the ingest ceiling). V2 keys
/// it by `(bucket, record_key, seq)` with `bucket = seq >> BUCKET_SHIFT`: a batch writes into
/// the pages of the current bucket only, and a lookup seeks each bucket once. Record hashes are
/// stored as 16-byte [`chain::record_key`]s instead of 64 hex characters. The rows of V1 are
/// converted by [`convert_records_v2`] between `V2` and `V2_FINISH`.
const V2: &str = "
ALTER TABLE event_records RENAME TO event_records_v1;
CREATE TABLE event_records (
    bucket INTEGER NOT NULL,
    record_key BLOB NOT NULL,
    seq INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    PRIMARY KEY (bucket, record_key, seq)
) WITHOUT ROWID;
";

/// The end of V2, after the V1 rows are converted. The record-hash index has no seq index:
/// verification and retention read it bucket by bucket. The decision index keeps only the
/// events that are not `Allow` (the rare ones worth an index; an `Allow` filter reads the time
/// index and finds matches at once): [`crate::query`] adds its condition to the queries.
const V2_FINISH: &str = "
DROP TABLE event_records_v1;
DROP INDEX events_decision_time;
CREATE INDEX events_flagged_time ON events (decision, time_us) WHERE decision <> 'Allow';
";

/// V3: the usage index of the rules besides the deciding one that an event's request was
/// charged to (its `alsoApplied` and charged `dryRuns`, [`chain::AppliedRow`]): usage queries
/// count them per (policy, rule, principal) as they count the deciding rule from `events`. Keyed for those queries;
/// retention deletes by seq. Events stored before V3 carry no such rules.
const V3: &str = "
CREATE TABLE event_applied_rules (
    principal TEXT NOT NULL,
    policy TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    rule TEXT NOT NULL,
    namespace TEXT NOT NULL,
    admitted INTEGER NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (principal, policy, time_us, seq, rule)
) WITHOUT ROWID;
CREATE INDEX event_applied_rules_seq ON event_applied_rules (seq);
";

/// V4: the principal the deciding rule of an event counted by where it is not the event's
/// (`rulePrincipal`, [`chain::Columns::rule_principal`]): usage queries count the deciding
/// rule from `events` only for the events without one, and from the usage index, where the
/// rule's row is, for the others. Events stored before V4 carry none.
const V4: &str = "
ALTER TABLE events ADD COLUMN rule_principal TEXT;
";

/// Events per bucket of the record-hash index: `2^BUCKET_SHIFT`.
const BUCKET_SHIFT: u32 = SQLITE_BUCKET_SHIFT;

/// The record-hash index bucket of the event at `seq`.
fn bucket(seq: i64) -> i64 {
    chain::bucket_of(seq, BUCKET_SHIFT)
}

/// The last seq of the bucket of `seq`.
fn bucket_end(seq: i64) -> i64 {
    chain::bucket_end_of(seq, BUCKET_SHIFT)
}

/// Schema migrations, in order. Never edit a released one: add the next.
const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4)];

/// Copies the V1 record-hash rows into the V2 index.
fn convert_records_v2(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    let mut read = tx.prepare("SELECT record_hash, time_us, seq FROM event_records_v1 ORDER BY seq")?;
    let mut write = tx.prepare(
        "INSERT OR IGNORE INTO event_records (bucket, record_key, seq, time_us) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let (hash, time_us, seq): (String, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        write.execute(params![bucket(seq), chain::record_key(&hash), seq, time_us])?;
    }
    Ok(())
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    /// How long one read may run ([`crate::AnyStore::with_query_timeout`]).
    read_limit: Duration,
}

/// SQLite calls the progress handler every this many virtual machine instructions (well under
/// a millisecond).
const PROGRESS_STEPS: std::ffi::c_int = 1_000;

/// Runs `f` on `conn`, interrupted by SQLite once `limit` has passed.
fn limited<T>(
    conn: &mut Connection,
    limit: Duration,
    f: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<T> {
    /// Removes the handler however `f` ends (a panic too): the writer, which in-memory stores
    /// read on, must not keep an expired deadline for its writes.
    struct Unlimit<'c>(&'c mut Connection);
    impl Drop for Unlimit<'_> {
        fn drop(&mut self) {
            let _ = self.0.progress_handler(0, None::<fn() -> bool>);
        }
    }
    // Elapsed time, not a deadline compared with the clock: `elapsed` saturates at zero, so a
    // limit of zero stops a query at its first check whatever the clock reads.
    let start = std::time::Instant::now();
    conn.progress_handler(PROGRESS_STEPS, Some(move || start.elapsed() >= limit))?;
    let guard = Unlimit(conn);
    let result = f(&mut *guard.0);
    drop(guard);
    match result {
        Err(Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
            if e.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            Err(Error::QueryTimeout(limit))
        }
        other => other,
    }
}

struct Inner {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// A reader kept for the chain head and anchor (two one-row reads): `/ready` and the
    /// start of every verify and prune never wait behind an investigator's long scan.
    quick: Option<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("readers", &self.inner.readers.len()).finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic in a task leaves no half-done transaction behind (rusqlite rolls back on drop).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn task_error(e: tokio::task::JoinError) -> Error {
    Error::Task(e.to_string())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS custos_schema (
             version INTEGER PRIMARY KEY,
             applied_at_us INTEGER NOT NULL
         )",
    )?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: i64 =
        tx.query_row("SELECT COALESCE(MAX(version), 0) FROM custos_schema", [], |r| r.get(0))?;
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(Error::SchemaTooNew { found: current, supported: latest });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql)?;
        if *version == 1 {
            tx.execute("INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, ?1)", [GENESIS_HASH])?;
            tx.execute("INSERT INTO chain_anchor (id, seq, hash) VALUES (1, 0, ?1)", [GENESIS_HASH])?;
        }
        if *version == 2 {
            convert_records_v2(&tx)?;
            tx.execute_batch(V2_FINISH)?;
        }
        tx.execute(
            "INSERT INTO custos_schema (version, applied_at_us) VALUES (?1, ?2)",
            params![version, chrono::Utc::now().timestamp_micros()],
        )?;
        tracing::info!(version, "migrated the SQLite audit store");
    }
    tx.commit()?;
    Ok(())
}

fn chain_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChainRow> {
    Ok(ChainRow {
        seq: r.get(0)?,
        cols: Columns {
            id: r.get(1)?,
            time_us: r.get(2)?,
            namespace: r.get(3)?,
            policy: r.get(4)?,
            rule: r.get(5)?,
            principal: r.get(6)?,
            user_id: r.get(7)?,
            decision: r.get(8)?,
            path: r.get(9)?,
            records_returned: r.get(10)?,
            rule_principal: r.get(14)?,
        },
        prev_hash: r.get(11)?,
        hash: r.get(12)?,
        body: r.get(13)?,
    })
}

/// A stored record key as bytes, whatever its storage class (a key rewritten as text or a
/// number then fails verification instead of failing the read).
fn key_bytes(v: rusqlite::types::ValueRef<'_>) -> RecordKey {
    match v {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b.to_vec(),
        _ => Vec::new(),
    }
}

fn link_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Link> {
    Ok(Link { seq: r.get(0)?, hash: r.get(1)? })
}

fn values(params: Vec<Param>) -> Vec<Value> {
    params
        .into_iter()
        .map(|p| match p {
            Param::Text(s) => Value::Text(s),
            Param::Int(i) => Value::Integer(i),
        })
        .collect()
}

fn decision(s: &str) -> Result<custos_api::Decision> {
    match s {
        "Allow" => Ok(custos_api::Decision::Allow),
        "Deny" => Ok(custos_api::Decision::Deny),
        "WouldDeny" => Ok(custos_api::Decision::WouldDeny),
        _ => Err(Error::Corrupt("unknown decision in a stored row".into())),
    }
}

/// `SELECT id, time_us, namespace, principal, user_id, policy, rule, decision, path`.
pub(crate) type SubjectRow =
    (String, i64, String, String, Option<String>, Option<String>, Option<String>, String, String);

/// Maps a [`SubjectRow`].
pub(crate) fn subject_access(
    (event_id, time_us, namespace, principal, user_id, policy, rule, dec, path): SubjectRow,
) -> Result<SubjectAccess> {
    Ok(SubjectAccess {
        event_id,
        time: chain::format_time_us(time_us),
        namespace,
        principal,
        user_id,
        policy,
        rule,
        decision: decision(&dec)?,
        path,
    })
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Page cache of the writer connection: 256 MiB (negative: KiB), an upper bound, filled only
/// as the database grows.
const WRITER_CACHE_KIB: i64 = -262_144;
/// WAL size between automatic checkpoints: 64 MiB.
const WAL_AUTOCHECKPOINT_BYTES: i64 = 64 << 20;
/// Page size of a new database file.
const PAGE_SIZE: i64 = 8192;
/// Page cache of each reader connection: 32 MiB.
const READER_CACHE_KIB: i64 = -32_768;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` (`:memory:` for a private in-memory
    /// database) and migrates it.
    pub async fn open(path: &str) -> Result<SqliteStore> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path)).await.map_err(task_error)?
    }

    fn open_blocking(path: &str) -> Result<SqliteStore> {
        let memory = path == ":memory:";
        let mut writer = Connection::open(Path::new(path))?;
        writer.busy_timeout(Duration::from_secs(10))?;
        if !memory {
            // A new file gets 8 KiB pages (SQLite's default is 4 KiB): the ~1 KiB event rows
            // pack better and the trees are shallower. Must precede WAL mode, which writes the
            // header; an existing file keeps its page size.
            let pages: i64 = writer.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            if pages == 0 {
                writer.pragma_update(None, "page_size", PAGE_SIZE)?;
            }
            let mode: String = writer.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::Corrupt(format!("could not enable WAL (journal mode {mode})")));
            }
        }
        writer.pragma_update(None, "synchronous", "FULL")?;
        // SQLite's default page cache is 2 MiB: far too small for the random inserts into the
        // record-hash index once the store holds a few hundred thousand events (ingest then
        // falls to a few thousand events/s, the pages going back and forth to the OS).
        writer.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        // Checkpoint the WAL every 64 MiB instead of every 4 MiB: index pages dirtied by many
        // batches are copied into the database once instead of once per checkpoint.
        let page_size: i64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        writer.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_BYTES / page_size.max(512))?;
        migrate(&mut writer)?;
        let mut readers = Vec::new();
        let mut quick = None;
        if !memory {
            let open_reader = || -> Result<Connection> {
                let r = Connection::open_with_flags(
                    Path::new(path),
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                r.busy_timeout(Duration::from_secs(10))?;
                r.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
                Ok(r)
            };
            for _ in 0..READERS {
                readers.push(Mutex::new(open_reader()?));
            }
            quick = Some(Mutex::new(open_reader()?));
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
                quick,
            }),
            read_limit: crate::DEFAULT_QUERY_TIMEOUT,
        })
    }

    pub(crate) fn with_query_timeout(self, limit: Duration) -> SqliteStore {
        SqliteStore { read_limit: limit, ..self }
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&mut lock(&inner.writer))).await.map_err(task_error)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let limit = self.read_limit;
        tokio::task::spawn_blocking(move || {
            if inner.readers.is_empty() {
                return limited(&mut lock(&inner.writer), limit, f);
            }
            // A free reader if there is one (a long scan holds its reader), else in turn.
            let start = inner.next_reader.fetch_add(1, Ordering::Relaxed);
            let n = inner.readers.len();
            for k in 0..n {
                if let Ok(mut conn) = inner.readers[(start + k) % n].try_lock() {
                    return limited(&mut conn, limit, f);
                }
            }
            limited(&mut lock(&inner.readers[start % n]), limit, f)
        })
        .await
        .map_err(task_error)?
    }

    /// [`Self::read`] on the reader kept for short reads ([`Inner::quick`]).
    async fn read_quick<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || match &inner.quick {
            Some(quick) => f(&mut lock(quick)),
            None => f(&mut lock(&inner.writer)),
        })
        .await
        .map_err(task_error)?
    }

    pub(crate) async fn ingest(&self, batch: Vec<Unlinked>) -> Result<Ingested> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Link { seq: mut head_seq, hash: mut head_hash } =
                tx.query_row("SELECT seq, hash FROM chain_head WHERE id = 1", [], link_row)?;
            let pruned_before: Option<i64> =
                tx.query_row("SELECT pruned_before_us FROM chain_anchor WHERE id = 1", [], |r| r.get(0))?;
            let mut out = Ingested::default();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO events (seq, id, time_us, namespace, policy, rule, principal, \
                     user_id, decision, path, records_returned, prev_hash, hash, body, rule_principal) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                     ON CONFLICT (id) DO NOTHING",
                )?;
                let mut record = tx.prepare_cached(
                    "INSERT OR IGNORE INTO event_records (bucket, record_key, seq, time_us) \
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut applied = tx.prepare_cached(
                    "INSERT OR IGNORE INTO event_applied_rules \
                     (principal, policy, time_us, seq, rule, namespace, admitted, records) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for (index, u) in batch.into_iter().enumerate() {
                    if pruned_before.is_some_and(|before| u.cols.time_us < before) {
                        out.outcome.expired += 1;
                        continue;
                    }
                    let p = u.link(head_seq + 1, &head_hash)?;
                    let c = &p.cols;
                    let n = insert.execute(params![
                        p.seq,
                        c.id,
                        c.time_us,
                        c.namespace,
                        c.policy,
                        c.rule,
                        c.principal,
                        c.user_id,
                        c.decision,
                        c.path,
                        c.records_returned,
                        p.prev_hash,
                        p.hash,
                        p.body,
                        c.rule_principal
                    ])?;
                    if n == 0 {
                        out.outcome.duplicates += 1;
                        continue;
                    }
                    for key in &p.records {
                        record.execute(params![bucket(p.seq), key, p.seq, c.time_us])?;
                    }
                    for a in &p.applied {
                        applied.execute(params![
                            a.principal,
                            a.policy,
                            c.time_us,
                            p.seq,
                            a.rule,
                            c.namespace,
                            a.admitted,
                            a.records
                        ])?;
                    }
                    head_seq = p.seq;
                    head_hash = p.hash;
                    out.stored(index);
                }
            }
            if out.outcome.accepted > 0 {
                tx.execute(
                    "UPDATE chain_head SET seq = ?1, hash = ?2 WHERE id = 1",
                    params![head_seq, head_hash],
                )?;
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    pub(crate) async fn head_and_anchor(&self) -> Result<(Link, Link)> {
        self.read_quick(|conn| {
            let tx = conn.transaction()?;
            let head = tx.query_row("SELECT seq, hash FROM chain_head WHERE id = 1", [], link_row)?;
            let anchor = tx.query_row("SELECT seq, hash FROM chain_anchor WHERE id = 1", [], link_row)?;
            Ok((head, anchor))
        })
        .await
    }

    /// The first event row outside the chain: above the head, or at or below the retention
    /// anchor (retention deletes every row up to it, so one there was put there).
    pub(crate) async fn first_outside_chain(&self) -> Result<Option<(i64, String)>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT e.seq, e.id FROM events e, chain_head h, chain_anchor a \
                     WHERE h.id = 1 AND a.id = 1 AND (e.seq > h.seq OR e.seq <= a.seq) \
                     ORDER BY e.seq LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
        })
        .await
    }

    /// The first usage index row outside the chain (above the head, or at or below the
    /// retention anchor): usage counts it though no stored event gives it.
    pub(crate) async fn first_applied_outside_chain(&self) -> Result<Option<i64>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT MIN(x.seq) FROM event_applied_rules x, chain_head h, chain_anchor a \
                     WHERE h.id = 1 AND a.id = 1 AND (x.seq > h.seq OR x.seq <= a.seq)",
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .flatten())
        })
        .await
    }

    pub(crate) async fn chain_page(
        &self,
        after: (i64, Option<String>),
        bound: i64,
        limit: i64,
        records_after: i64,
    ) -> Result<(Vec<ChainRow>, RecordsBySeq, i64)> {
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let rows = match &after.1 {
                None => {
                    let mut st = tx.prepare_cached(&format!(
                        "SELECT {CHAIN_COLUMNS} FROM events WHERE seq > ?1 AND seq <= ?2 \
                         ORDER BY seq, id LIMIT ?3"
                    ))?;
                    st.query_map(params![after.0, bound, limit], chain_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
                Some(id) => {
                    let mut st = tx.prepare_cached(&format!(
                        "SELECT {CHAIN_COLUMNS} FROM events \
                         WHERE (seq > ?1 OR (seq = ?1 AND id > ?4)) AND seq <= ?2 \
                         ORDER BY seq, id LIMIT ?3"
                    ))?;
                    st.query_map(params![after.0, bound, limit, id], chain_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            // Whole buckets (the index has no seq order of its own): up to the end of the last
            // row's bucket, so the next page starts with its records already read.
            let (records, records_to) = match (rows.first(), rows.last()) {
                (Some(first), Some(last)) if last.seq > records_after => {
                    let from = first.seq.max(records_after + 1);
                    let to = bucket_end(last.seq);
                    let mut st = tx.prepare_cached(
                        "SELECT seq, record_key, time_us FROM event_records \
                         WHERE bucket BETWEEN ?1 AND ?2 AND seq BETWEEN ?3 AND ?4",
                    )?;
                    let records = st
                        .query_map(params![bucket(from), bucket(to), from, to], |r| {
                            Ok((r.get(0)?, key_bytes(r.get_ref(1)?), r.get(2)?))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    (records, to)
                }
                _ => (Vec::new(), records_after),
            };
            let mut indexed = chain::group_records(records);
            if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                let mut st = tx.prepare_cached(
                    "SELECT seq, principal, policy, rule, time_us, namespace, admitted, records \
                     FROM event_applied_rules WHERE seq BETWEEN ?1 AND ?2",
                )?;
                let applied = st
                    .query_map(params![first.seq, last.seq], |r| {
                        Ok((
                            r.get(0)?,
                            chain::IndexedApplied {
                                principal: r.get(1)?,
                                policy: r.get(2)?,
                                rule: r.get(3)?,
                                time_us: r.get(4)?,
                                namespace: r.get(5)?,
                                admitted: r.get(6)?,
                                records: r.get(7)?,
                            },
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                chain::group_applied(&mut indexed, applied);
            }
            Ok((rows, indexed, records_to))
        })
        .await
    }

    /// The rows of a page (see [`crate::AnyStore::query_within`]) and whether rows were left
    /// out for `max_bytes`.
    pub(crate) async fn query(
        &self,
        q: &EventQuery,
        cursor: Option<(i64, i64)>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<(i64, i64, String)>, bool)> {
        let (sql, params) = query::events_sql(
            q,
            cursor,
            limit,
            |i| format!("?{i}"),
            |entry| {
                format!(
                    "EXISTS (SELECT 1 FROM json_each(body, '$.dryRuns') AS d, json_each({entry}) AS want \
                 WHERE json_extract(d.value, '$.' || want.key) = want.value \
                 GROUP BY d.key HAVING COUNT(*) = (SELECT COUNT(*) FROM json_each({entry})))"
                )
            },
        );
        self.read(move |conn| {
            let mut st = conn.prepare_cached(&sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(values(params)))?;
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            // Rows are read one at a time: once the bodies reach `max_bytes`, the next row's
            // body is not read.
            while let Some(r) = rows.next()? {
                if bytes >= max_bytes {
                    return Ok((out, true));
                }
                let body: String = r.get(2)?;
                bytes = bytes.saturating_add(body.len());
                out.push((r.get(0)?, r.get(1)?, body));
            }
            Ok((out, false))
        })
        .await
    }

    pub(crate) async fn subject(
        &self,
        record_hash: &str,
        range: TimeRange,
        limit: i64,
    ) -> Result<Vec<SubjectAccess>> {
        let record_hash = record_hash.to_owned();
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let key = chain::record_key(&record_hash);
            // One seek per bucket; the hits are few, sorted here, newest first. The buckets
            // are those of the chain (after the anchor, up to the head) that hold rows.
            let (lo, hi): (Option<i64>, Option<i64>) = tx.query_row(
                // Separate subqueries: SQLite reads a lone MIN or MAX off the index, not a pair.
                "SELECT MAX((SELECT MIN(bucket) FROM event_records), \
                            ((SELECT seq FROM chain_anchor WHERE id = 1) + 1) >> ?1), \
                        MIN((SELECT MAX(bucket) FROM event_records), \
                            (SELECT seq FROM chain_head WHERE id = 1) >> ?1)",
                [BUCKET_SHIFT],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let mut hits: Vec<(i64, i64)> = Vec::new();
            if let (Some(lo), Some(hi)) = (lo, hi) {
                let mut st = tx.prepare_cached(
                    "SELECT time_us, seq FROM event_records \
                     WHERE bucket = ?1 AND record_key = ?2 AND time_us >= ?3 AND time_us < ?4",
                )?;
                for b in lo..=hi {
                    let rows = st.query_map(params![b, key, range.since, range.until], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                    for row in rows {
                        hits.push(row?);
                    }
                }
            }
            hits.sort_unstable_by(|a, b| b.cmp(a));
            let mut event = tx.prepare_cached(
                "SELECT id, time_us, namespace, principal, user_id, policy, rule, decision, path, body \
                 FROM events WHERE seq = ?1",
            )?;
            let mut out = Vec::new();
            for (_, seq) in hits {
                if out.len() as i64 >= limit {
                    break;
                }
                let found = event
                    .query_row([seq], |r| {
                        Ok((
                            (
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                                r.get(7)?,
                                r.get(8)?,
                            ),
                            r.get::<_, String>(9)?,
                        ))
                    })
                    .optional()?;
                // The key may be shared with another record hash: keep the events whose body
                // names this one.
                if let Some((row, body)) = found
                    && chain::names_record(&body, &record_hash)?
                {
                    out.push(subject_access(row)?);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(crate) async fn top(&self, by: TopBy, since: i64, limit: i64) -> Result<Vec<TopEntry>> {
        self.read(move |conn| {
            let sql = match by {
                TopBy::Records => {
                    "SELECT principal, SUM(records_returned) AS c FROM events \
                     WHERE time_us >= ?1 GROUP BY principal HAVING c > 0 \
                     ORDER BY c DESC, principal LIMIT ?2"
                }
                TopBy::Denials => {
                    "SELECT principal, COUNT(*) AS c FROM events \
                     WHERE decision = 'Deny' AND decision <> 'Allow' AND time_us >= ?1 GROUP BY principal \
                     ORDER BY c DESC, principal LIMIT ?2"
                }
            };
            let mut st = conn.prepare_cached(sql)?;
            Ok(st
                .query_map(params![since, limit], |r| {
                    Ok(TopEntry { principal: r.get(0)?, count: count(r.get(1)?) })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub(crate) async fn usage(
        &self,
        namespace: Option<&str>,
        policy: &str,
        principal: &str,
        now_us: i64,
        exclude_instance: Option<&str>,
    ) -> Result<Vec<(String, RuleUsage, RuleUsage)>> {
        let (namespace, policy, principal) =
            (namespace.map(str::to_owned), policy.to_owned(), principal.to_owned());
        let exclude = exclude_instance.map(str::to_owned);
        self.read(move |conn| {
            // The deciding rules from `events`, the others that applied from their index; each
            // count also without the events of instance ?8 (`own`: their ids carry its tag).
            let mut st = conn.prepare_cached(
                "SELECT rule, \
                 SUM(CASE WHEN time_us > ?4 AND admitted THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN time_us > ?5 THEN records ELSE 0 END), \
                 SUM(records), \
                 SUM(CASE WHEN time_us > ?4 AND admitted AND NOT own THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN time_us > ?5 AND NOT own THEN records ELSE 0 END), \
                 SUM(CASE WHEN NOT own THEN records ELSE 0 END) \
                 FROM (\
                   SELECT rule, time_us, decision <> 'Deny' AS admitted, records_returned AS records, \
                   (?8 IS NOT NULL AND substr(id, 11, 8) = ?8) AS own \
                   FROM events \
                   WHERE principal = ?1 AND policy = ?2 AND time_us > ?6 AND time_us <= ?3 \
                   AND rule IS NOT NULL AND rule_principal IS NULL AND (?7 IS NULL OR namespace = ?7) \
                   UNION ALL \
                   SELECT rule, time_us, admitted, records, \
                   (?8 IS NOT NULL AND EXISTS (SELECT 1 FROM events e WHERE e.seq = x.seq \
                    AND substr(e.id, 11, 8) = ?8)) AS own \
                   FROM event_applied_rules x \
                   WHERE principal = ?1 AND policy = ?2 AND time_us > ?6 AND time_us <= ?3 \
                   AND (?7 IS NULL OR namespace = ?7)\
                 ) GROUP BY rule",
            )?;
            Ok(st
                .query_map(
                    params![
                        principal,
                        policy,
                        now_us,
                        now_us - 60_000_000,
                        now_us - 3_600_000_000,
                        now_us - chain::DAY_US,
                        namespace,
                        exclude
                    ],
                    |r| {
                        let usage = |at: usize| -> rusqlite::Result<RuleUsage> {
                            Ok(RuleUsage {
                                requests_last_minute: count(r.get(at)?),
                                records_last_hour: count(r.get(at + 1)?),
                                records_last_day: count(r.get(at + 2)?),
                            })
                        };
                        Ok((r.get::<_, String>(0)?, usage(1)?, usage(4)?))
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub(crate) async fn prune_target(&self, cutoff: i64) -> Result<Option<i64>> {
        self.read(move |conn| {
            let min: Option<i64> =
                conn.query_row("SELECT MIN(seq) FROM events WHERE time_us >= ?1", [cutoff], |r| r.get(0))?;
            Ok(min.map(|m| m - 1))
        })
        .await
    }

    /// The latest event time stored, in µs (none in an empty store).
    pub(crate) async fn events_after(
        &self,
        seq: i64,
        id: String,
        limit: i64,
        max_bytes: i64,
    ) -> Result<Vec<(i64, String, String)>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT seq, id, body FROM events WHERE (seq, id) > (?1, ?2) ORDER BY seq, id LIMIT ?3",
            )?;
            let mut rows = st.query(params![seq, id, limit])?;
            let (mut out, mut bytes) = (Vec::new(), 0i64);
            // Once the bodies reach `max_bytes`, the next row's body is not read.
            while bytes < max_bytes
                && let Some(r) = rows.next()?
            {
                let body: String = r.get(2)?;
                bytes = bytes.saturating_add(i64::try_from(body.len()).unwrap_or(i64::MAX));
                out.push((r.get(0)?, r.get(1)?, body));
            }
            Ok(out)
        })
        .await
    }

    pub(crate) async fn last_position(&self) -> Result<Option<(i64, String)>> {
        self.read_quick(|conn| {
            Ok(conn
                .query_row("SELECT seq, id FROM events ORDER BY seq DESC, id DESC LIMIT 1", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?)
        })
        .await
    }

    pub(crate) async fn newest_time(&self) -> Result<Option<i64>> {
        self.read_quick(|conn| Ok(conn.query_row("SELECT MAX(time_us) FROM events", [], |r| r.get(0))?)).await
    }

    /// Deletes the events up to `last` (the anchor still `anchor`) and records `pruned_before`
    /// as the time before which ingest refuses events. The cutoff matters to PostgreSQL's
    /// partitions only.
    pub(crate) async fn prune_to(
        &self,
        anchor: &Link,
        last: &Link,
        _cutoff: i64,
        pruned_before: i64,
    ) -> Result<u64> {
        let (anchor, last) = (anchor.clone(), last.clone());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current = tx.query_row("SELECT seq, hash FROM chain_anchor WHERE id = 1", [], link_row)?;
            if current != anchor {
                return Err(Error::Corrupt("the anchor moved during prune (concurrent prune?)".into()));
            }
            tx.execute(
                "DELETE FROM event_records WHERE bucket <= ?1 AND seq <= ?2",
                params![bucket(last.seq), last.seq],
            )?;
            tx.execute("DELETE FROM event_applied_rules WHERE seq <= ?1", [last.seq])?;
            let deleted = tx.execute("DELETE FROM events WHERE seq <= ?1", [last.seq])?;
            tx.execute(
                "UPDATE chain_anchor SET seq = ?1, hash = ?2, \
                 pruned_before_us = MAX(COALESCE(pruned_before_us, ?3), ?3) WHERE id = 1",
                params![last.seq, last.hash, pruned_before],
            )?;
            tx.commit()?;
            Ok(deleted as u64)
        })
        .await
    }

    pub(crate) async fn insert_alerts(&self, rows: Vec<(String, i64, String)>) -> Result<u64> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut n = 0u64;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO alerts (id, time_us, body) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO NOTHING",
                )?;
                for (id, time_us, body) in &rows {
                    n += st.execute(params![id, time_us, body])? as u64;
                }
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    pub(crate) async fn alerts(&self, since: i64, limit: i64) -> Result<Vec<String>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT body FROM alerts WHERE time_us >= ?1 \
                 ORDER BY time_us DESC, id DESC LIMIT ?2",
            )?;
            Ok(st.query_map(params![since, limit], |r| r.get(0))?.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    /// A query of ~100,000 steps.
    fn count(conn: &Connection) -> rusqlite::Result<i64> {
        conn.query_row(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000) SELECT count(*) FROM n",
            [],
            |r| r.get(0),
        )
    }

    #[test]
    fn a_limited_read_leaves_no_limit_behind_even_when_it_panics() {
        let mut conn = Connection::open_in_memory().unwrap();
        let stopped = limited(&mut conn, Duration::ZERO, |c| Ok(count(c)?));
        assert!(matches!(stopped, Err(Error::QueryTimeout(_))), "{stopped:?}");
        assert_eq!(count(&conn).unwrap(), 20_000, "no limit after it");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = limited(&mut conn, Duration::ZERO, |_| -> Result<()> { panic!("a bug in a read") });
        }));
        assert!(panicked.is_err());
        assert_eq!(count(&conn).unwrap(), 20_000, "no limit after a panic either");
    }

    /// With every reader held by a long scan (here: their locks taken), the chain head, which
    /// `/ready` reads, still answers (a review measured it waiting behind two scans), and a
    /// read finds a reader as soon as one is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_chain_head_does_not_wait_behind_busy_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let inner = Arc::clone(&store.inner);
        let held: Vec<_> = inner.readers.iter().map(lock).collect();
        // A guard against a hang, not a timing: without the kept reader this waits for ever.
        let (head, _) = tokio::time::timeout(Duration::from_secs(30), store.head_and_anchor())
            .await
            .expect("the head waited behind the busy readers")
            .unwrap();
        assert_eq!(head.seq, 0);
        // One reader freed: a read takes it, whichever the turn says.
        let mut held = held;
        drop(held.remove(0));
        for _ in 0..4 {
            let seq = tokio::time::timeout(
                Duration::from_secs(30),
                store.read(|conn| {
                    Ok(conn.query_row("SELECT seq FROM chain_head", [], |r| r.get::<_, i64>(0))?)
                }),
            )
            .await
            .expect("a read waited for the busy reader while another was free")
            .unwrap();
            assert_eq!(seq, 0);
        }
        drop(held);
    }
}
