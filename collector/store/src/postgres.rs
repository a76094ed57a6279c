//! The PostgreSQL backend: `events`, `event_records` and `event_applied_rules` partitioned by
//! day on the event time (declarative range partitions, created on demand for the days of each
//! batch and for today and tomorrow at open; `event_records` keyed by seq bucket and 16-byte
//! record key, schema V3; `event_applied_rules`, the usage index of rules that applied beside
//! the deciding one, schema V4),
//! a non-partitioned `event_ids` table for idempotency by id, pooled
//! connections (deadpool); a batch is written with one `COPY ... FROM STDIN BINARY` per table,
//! never a statement per row.
//!
//! Writers serialise on the `chain_head` row (`SELECT ... FOR UPDATE` inside the ingest
//! transaction), so any number of collector processes share one consistent chain; the
//! duplicate check runs under that lock too, so it is race-free. Durable on commit.
//! Retention drops a day's partitions only under an exclusive lock on `events`, once every
//! ingest that wrote to the table has committed and its events are seen: ingest itself takes
//! no lock for retention.

use std::collections::{BTreeSet, HashSet};
use std::pin::pin;
use std::sync::{Arc, Mutex};

use custos_api::AuditEvent;
use custos_api::collector::RuleUsage;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{IsolationLevel, NoTls, Row};

use crate::chain::{
    self, CHAIN_COLUMNS, ChainRow, Columns, DAY_US, GENESIS_HASH, Link, POSTGRES_BUCKET_SHIFT, RecordsBySeq,
    Unlinked,
};
use crate::query::{self, Param, TimeRange};
use crate::{Error, EventQuery, Ingested, Result, SubjectAccess, TopBy, TopEntry};

/// Connections in the pool.
const POOL_SIZE: usize = 8;

const V1: &str = "
CREATE TABLE events (
    seq bigint NOT NULL,
    id text NOT NULL,
    time_us bigint NOT NULL,
    namespace text NOT NULL,
    policy text,
    rule text,
    principal text NOT NULL,
    user_id text,
    decision text NOT NULL,
    path text NOT NULL,
    records_returned bigint NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    body text NOT NULL
) PARTITION BY RANGE (time_us);
CREATE INDEX events_seq ON events (seq, id);
CREATE INDEX events_time ON events (time_us, seq);
CREATE INDEX events_principal_time ON events (principal, time_us, seq);
CREATE INDEX events_policy_time ON events (policy, time_us, seq);
CREATE INDEX events_decision_time ON events (decision, time_us, seq);
CREATE TABLE event_records (
    record_hash text NOT NULL,
    time_us bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (record_hash, time_us, seq)
) PARTITION BY RANGE (time_us);
CREATE INDEX event_records_seq ON event_records (seq);
CREATE TABLE event_ids (
    id text PRIMARY KEY,
    seq bigint NOT NULL
);
CREATE INDEX event_ids_seq ON event_ids USING brin (seq);
CREATE TABLE chain_head (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL
);
CREATE TABLE chain_anchor (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL,
    pruned_before_us bigint
);
CREATE TABLE alerts (
    id text PRIMARY KEY,
    time_us bigint NOT NULL,
    body text NOT NULL
);
CREATE INDEX alerts_time ON alerts (time_us);
";

/// V2: the decision index keeps only the events that are not `Allow` (a partial index, one
/// index insert saved per ordinary event); an `Allow` filter reads the time index and finds
/// matches at once. [`crate::query`] spells out the index condition in the queries.
const V2: &str = "
DROP INDEX events_decision_time;
CREATE INDEX events_flagged_time ON events (decision, time_us, seq) WHERE decision <> 'Allow';
";

/// V3: the record-hash index clustered by ingest order, as SQLite's V2. V1 keyed
/// `event_records` by the 64-character record hash, so each batch's rows landed on random
/// pages of the day's index (one dirtied page, and after a checkpoint one full-page WAL image,
/// per record hash) and a second index on `seq` was written for verification and retention.
/// V3 keys it by `(bucket, record_key, seq, time_us)` with `bucket = seq >> 16` (2^16 events a
/// bucket, [`POSTGRES_BUCKET_SHIFT`]: fewer probes per lookup than SQLite's 2^14) and
/// 16-byte [`chain::record_key`]s: a batch writes into the current bucket's pages only; a
/// lookup seeks each bucket; verification and retention read bucket ranges. The V2 table and
/// its partitions are renamed `event_records_v2*` by [`rename_records_v2`] before this runs,
/// and converted by [`convert_records_v3`] after.
const V3: &str = "
CREATE TABLE event_records (
    bucket bigint NOT NULL,
    record_key bytea NOT NULL,
    seq bigint NOT NULL,
    time_us bigint NOT NULL,
    PRIMARY KEY (bucket, record_key, seq, time_us)
) PARTITION BY RANGE (time_us);
";

/// V4: the usage index of the rules besides the deciding one that an event's request was
/// charged to (its `alsoApplied` and charged `dryRuns`, [`chain::AppliedRow`]), partitioned by day like `events`
/// ([`applied_partitions_v4`] gives it a partition per existing day of `events`): usage
/// queries count them per (policy, rule, principal) as they count the deciding rule from
/// `events`. Events stored before V4 carry no such rules.
const V4: &str = "
CREATE TABLE event_applied_rules (
    principal text NOT NULL,
    policy text NOT NULL,
    time_us bigint NOT NULL,
    seq bigint NOT NULL,
    rule text NOT NULL,
    namespace text NOT NULL,
    admitted boolean NOT NULL,
    records bigint NOT NULL,
    PRIMARY KEY (principal, policy, time_us, seq, rule)
) PARTITION BY RANGE (time_us);
CREATE INDEX event_applied_rules_seq ON event_applied_rules (seq);
";

/// Events per bucket of the record-hash index: `2^BUCKET_SHIFT`.
const BUCKET_SHIFT: u32 = POSTGRES_BUCKET_SHIFT;

/// The record-hash index bucket of the event at `seq`.
fn bucket(seq: i64) -> i64 {
    chain::bucket_of(seq, BUCKET_SHIFT)
}

/// The last seq of the bucket of `seq`.
fn bucket_end(seq: i64) -> i64 {
    chain::bucket_end_of(seq, BUCKET_SHIFT)
}

/// Schema migrations, in order. Never edit a released one: add the next.
/// V5: the principal the deciding rule of an event counted by where it is not the event's
/// (`rulePrincipal`, [`chain::Columns::rule_principal`]), as SQLite's V4: usage queries count
/// the deciding rule from `events` only for the events without one. A column without a
/// default: no table is rewritten.
const V5: &str = "
ALTER TABLE events ADD COLUMN rule_principal text;
";

const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5)];

/// The day partitions of a partitioned table: (suffix after `{parent}_`, bound expression).
async fn partitions_of(tx: &tokio_postgres::Transaction<'_>, parent: &str) -> Result<Vec<(String, String)>> {
    tx.query(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::text::regclass",
        &[&parent],
    )
    .await?
    .iter()
    .map(|r| {
        let name: String = r.try_get(0)?;
        let suffix = name.strip_prefix(parent).and_then(|n| n.strip_prefix('_')).unwrap_or(&name).to_owned();
        Ok((suffix, r.try_get(1)?))
    })
    .collect()
}

/// Before V3: the V2 record-hash table and its day partitions move aside
/// (`event_records_v2`, `event_records_v2_dYYYYMMDD`) so that V3 can take their names.
async fn rename_records_v2(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    for (suffix, _) in partitions_of(tx, "event_records").await? {
        tx.batch_execute(&format!("ALTER TABLE event_records_{suffix} RENAME TO event_records_v2_{suffix}"))
            .await?;
    }
    tx.batch_execute("ALTER TABLE event_records RENAME TO event_records_v2").await?;
    Ok(())
}

/// After V3: a partition per V2 partition (same bounds), the V2 rows converted (the key is
/// computed by the server: the first 16 bytes of SHA-256 of the hex record hash, exactly
/// [`chain::record_key`]), the V2 table dropped.
async fn convert_records_v3(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    for (suffix, bound) in partitions_of(tx, "event_records_v2").await? {
        tx.batch_execute(&format!("CREATE TABLE event_records_{suffix} PARTITION OF event_records {bound}"))
            .await?;
    }
    let converted = tx
        .execute(
            "INSERT INTO event_records (bucket, record_key, seq, time_us) \
             SELECT seq >> $1, substring(sha256(convert_to(record_hash, 'UTF8')) FROM 1 FOR $2), seq, time_us \
             FROM event_records_v2 ON CONFLICT DO NOTHING",
            &[&i32::try_from(BUCKET_SHIFT).unwrap_or(16), &i32::try_from(chain::RECORD_KEY_LEN).unwrap_or(16)],
        )
        .await?;
    tx.batch_execute("DROP TABLE event_records_v2").await?;
    tracing::info!(converted, "record-hash index converted to the bucketed V3 layout");
    Ok(())
}

/// After V4: a partition of the usage index per day partition of `events` (same bounds).
async fn applied_partitions_v4(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    for (suffix, bound) in partitions_of(tx, "events").await? {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS event_applied_rules_{suffix} PARTITION OF event_applied_rules {bound}"
        ))
        .await?;
    }
    Ok(())
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Days (since the epoch) whose partitions are known to exist.
    partitions: Arc<Mutex<HashSet<i64>>>,
    /// The statement time-out of report queries ([`crate::AnyStore::with_query_timeout`]).
    query_limit: std::time::Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

fn link_at(r: &Row, i: usize) -> Result<Link> {
    Ok(Link { seq: r.try_get(i)?, hash: r.try_get(i + 1)? })
}

fn chain_row(r: &Row) -> Result<ChainRow> {
    Ok(ChainRow {
        seq: r.try_get(0)?,
        cols: Columns {
            id: r.try_get(1)?,
            time_us: r.try_get(2)?,
            namespace: r.try_get(3)?,
            policy: r.try_get(4)?,
            rule: r.try_get(5)?,
            principal: r.try_get(6)?,
            user_id: r.try_get(7)?,
            decision: r.try_get(8)?,
            path: r.try_get(9)?,
            records_returned: r.try_get(10)?,
            rule_principal: r.try_get(14)?,
        },
        prev_hash: r.try_get(11)?,
        hash: r.try_get(12)?,
        body: r.try_get(13)?,
    })
}

/// Partition suffix of a day: `dYYYYMMDD` (`n<days>` before 1970).
/// How long a prune waits for the events table's exclusive lock before dropping a day
/// partition (a report query may hold the table for up to `--query-timeout`).
const PRUNE_LOCK_WAIT_MS: u64 = 2_000;

fn day_suffix(day: i64) -> String {
    match chrono::DateTime::from_timestamp(day * 86_400, 0) {
        Some(t) if day >= 0 => format!("d{}", t.format("%Y%m%d")),
        _ => format!("n{}", day.unsigned_abs()),
    }
}

/// The day of an `events_dYYYYMMDD` partition.
fn day_of_partition(name: &str) -> Option<i64> {
    let ymd = name.strip_prefix("events_d")?;
    let date = chrono::NaiveDate::parse_from_str(ymd, "%Y%m%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp().div_euclid(86_400))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn is_missing_partition(e: &Error) -> bool {
    matches!(e, Error::Postgres(pe) if pe.code() == Some(&SqlState::CHECK_VIOLATION))
}

/// The column types of `events`, in [`CHAIN_COLUMNS`] order.
const EVENT_TYPES: [Type; 15] = [
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// The column types of `event_applied_rules`, in the order ingest copies them.
const APPLIED_TYPES: [Type; 8] =
    [Type::TEXT, Type::TEXT, Type::INT8, Type::INT8, Type::TEXT, Type::TEXT, Type::BOOL, Type::INT8];

impl PostgresStore {
    /// Connects (pooled), migrates the schema and creates today's and tomorrow's partitions.
    pub async fn open(url: &str) -> Result<PostgresStore> {
        let config: tokio_postgres::Config = url.parse().map_err(|_| Error::BadUrl)?;
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool =
            Pool::builder(manager).max_size(POOL_SIZE).build().map_err(|e| Error::Pool(e.to_string()))?;
        let store = PostgresStore {
            pool,
            partitions: Arc::new(Mutex::new(HashSet::new())),
            query_limit: crate::DEFAULT_QUERY_TIMEOUT,
        };
        store.migrate().await?;
        let today = chrono::Utc::now().timestamp_micros().div_euclid(DAY_US);
        store.ensure_partitions(&BTreeSet::from([today, today + 1])).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(|e| Error::Pool(e.to_string()))
    }

    pub(crate) fn with_query_timeout(self, limit: std::time::Duration) -> PostgresStore {
        PostgresStore { query_limit: limit, ..self }
    }

    /// Begins a read-only transaction whose statements the server cancels after the query time
    /// limit.
    async fn limited<'c>(
        &self,
        client: &'c mut deadpool_postgres::Client,
    ) -> Result<deadpool_postgres::Transaction<'c>> {
        let tx = client.build_transaction().read_only(true).start().await?;
        let millis = self.query_limit.as_millis().max(1);
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {millis}")).await?;
        Ok(tx)
    }

    /// One report statement in a [`Self::limited`] transaction.
    async fn limited_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut client = self.client().await?;
        let rows = async {
            let tx = self.limited(&mut client).await?;
            let st = tx.prepare_cached(sql).await?;
            let rows = tx.query(&st, params).await?;
            tx.commit().await?;
            Ok(rows)
        }
        .await;
        rows.map_err(|e| self.stopped(e))
    }

    /// [`Error::QueryTimeout`] for a statement the server cancelled at the time limit.
    fn stopped(&self, error: Error) -> Error {
        match &error {
            Error::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                Error::QueryTimeout(self.query_limit)
            }
            _ => error,
        }
    }

    fn known_partitions(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.partitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One migrator at a time per schema (several collectors may start together).
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.custos_migrate'))", &[])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS custos_schema (
                 version bigint PRIMARY KEY,
                 applied_at_us bigint NOT NULL
             )",
        )
        .await?;
        let current: i64 =
            tx.query_one("SELECT COALESCE(MAX(version), 0) FROM custos_schema", &[]).await?.try_get(0)?;
        let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current > latest {
            return Err(Error::SchemaTooNew { found: current, supported: latest });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            if *version == 3 {
                rename_records_v2(&tx).await?;
            }
            tx.batch_execute(sql).await?;
            if *version == 3 {
                convert_records_v3(&tx).await?;
            }
            if *version == 4 {
                applied_partitions_v4(&tx).await?;
            }
            if *version == 1 {
                tx.execute("INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, $1)", &[&GENESIS_HASH])
                    .await?;
                tx.execute("INSERT INTO chain_anchor (id, seq, hash) VALUES (1, 0, $1)", &[&GENESIS_HASH])
                    .await?;
            }
            tx.execute(
                "INSERT INTO custos_schema (version, applied_at_us) VALUES ($1, $2)",
                &[version, &chrono::Utc::now().timestamp_micros()],
            )
            .await?;
            tracing::info!(version, "migrated the PostgreSQL audit store");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Creates the day partitions of `days` that this process has not seen yet.
    async fn ensure_partitions(&self, days: &BTreeSet<i64>) -> Result<()> {
        let missing: Vec<i64> = {
            let known = self.known_partitions();
            days.iter().copied().filter(|d| !known.contains(d)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.custos_partitions'))", &[])
            .await?;
        // No partition for a day wholly before the retention cutoff: none of its events will be
        // stored (the cutoff only rises, so the ingest transaction's own reading expires them).
        let pruned_before: Option<i64> =
            tx.query_one("SELECT pruned_before_us FROM chain_anchor WHERE id = 1", &[]).await?.try_get(0)?;
        for &day in missing.iter().filter(|&&d| pruned_before.is_none_or(|before| (d + 1) * DAY_US > before))
        {
            let suffix = day_suffix(day);
            let (lo, hi) = (day * DAY_US, (day + 1) * DAY_US);
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS events_{suffix} PARTITION OF events \
                     FOR VALUES FROM ({lo}) TO ({hi});
                 CREATE TABLE IF NOT EXISTS event_records_{suffix} PARTITION OF event_records \
                     FOR VALUES FROM ({lo}) TO ({hi});
                 CREATE TABLE IF NOT EXISTS event_applied_rules_{suffix} PARTITION OF event_applied_rules \
                     FOR VALUES FROM ({lo}) TO ({hi});"
            ))
            .await?;
        }
        tx.commit().await?;
        self.known_partitions().extend(missing);
        Ok(())
    }

    pub(crate) async fn ingest(&self, events: &[AuditEvent], batch: Vec<Unlinked>) -> Result<Ingested> {
        let days: BTreeSet<i64> = batch.iter().map(|u| u.cols.time_us.div_euclid(DAY_US)).collect();
        self.ensure_partitions(&days).await?;
        match self.ingest_tx(events, batch.clone()).await {
            // A partition this process believed in was dropped (by a prune elsewhere).
            Err(e) if is_missing_partition(&e) => {
                self.known_partitions().clear();
                self.ensure_partitions(&days).await?;
                self.ingest_tx(events, batch).await
            }
            other => other,
        }
    }

    async fn ingest_tx(&self, events: &[AuditEvent], batch: Vec<Unlinked>) -> Result<Ingested> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let head_st = tx.prepare_cached("SELECT seq, hash FROM chain_head WHERE id = 1 FOR UPDATE").await?;
        let head = link_at(&tx.query_one(&head_st, &[]).await?, 0)?;
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let dup_st = tx.prepare_cached("SELECT id FROM event_ids WHERE id = ANY($1)").await?;
        let mut seen: HashSet<String> =
            tx.query(&dup_st, &[&ids]).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        // Read after the ids (each statement sees what has committed before it): a prune that
        // commits between the two made its cutoff visible here, so an id it deleted is found
        // expired; one that commits later deleted none of the ids found above.
        let anchor_st = tx.prepare_cached("SELECT pruned_before_us FROM chain_anchor WHERE id = 1").await?;
        let pruned_before: Option<i64> = tx.query_one(&anchor_st, &[]).await?.try_get(0)?;
        let mut out = Ingested::default();
        let mut linked = Vec::with_capacity(events.len());
        let (mut seq, mut hash) = (head.seq, head.hash);
        for (index, (e, u)) in events.iter().zip(batch).enumerate() {
            if pruned_before.is_some_and(|before| u.cols.time_us < before) {
                out.outcome.expired += 1;
                continue;
            }
            if !seen.insert(e.id.clone()) {
                out.outcome.duplicates += 1;
                continue;
            }
            let p = u.link(seq + 1, &hash)?;
            seq = p.seq;
            hash.clone_from(&p.hash);
            linked.push(p);
            out.stored(index);
        }
        if out.outcome.accepted > 0 {
            // COPY ... BINARY: the rows stream in the binary wire format, no SQL to parse.
            let st = tx.prepare_cached("COPY event_ids (id, seq) FROM STDIN BINARY").await?;
            let mut w = pin!(BinaryCopyInWriter::new(tx.copy_in(&st).await?, &[Type::TEXT, Type::INT8]));
            for p in &linked {
                w.as_mut().write(&[&p.cols.id, &p.seq]).await?;
            }
            w.as_mut().finish().await?;
            let st = tx.prepare_cached(&format!("COPY events ({CHAIN_COLUMNS}) FROM STDIN BINARY")).await?;
            let mut w = pin!(BinaryCopyInWriter::new(tx.copy_in(&st).await?, &EVENT_TYPES));
            for p in &linked {
                let c = &p.cols;
                w.as_mut()
                    .write(&[
                        &p.seq,
                        &c.id,
                        &c.time_us,
                        &c.namespace,
                        &c.policy,
                        &c.rule,
                        &c.principal,
                        &c.user_id,
                        &c.decision,
                        &c.path,
                        &c.records_returned,
                        &p.prev_hash,
                        &p.hash,
                        &p.body,
                        &c.rule_principal,
                    ])
                    .await?;
            }
            w.as_mut().finish().await?;
            if linked.iter().any(|p| !p.records.is_empty()) {
                let st = tx
                    .prepare_cached("COPY event_records (bucket, record_key, seq, time_us) FROM STDIN BINARY")
                    .await?;
                let mut w = pin!(BinaryCopyInWriter::new(
                    tx.copy_in(&st).await?,
                    &[Type::INT8, Type::BYTEA, Type::INT8, Type::INT8]
                ));
                for p in &linked {
                    let b = bucket(p.seq);
                    for key in &p.records {
                        w.as_mut().write(&[&b, key, &p.seq, &p.cols.time_us]).await?;
                    }
                }
                w.as_mut().finish().await?;
            }
            if linked.iter().any(|p| !p.applied.is_empty()) {
                let st = tx
                    .prepare_cached(
                        "COPY event_applied_rules (principal, policy, time_us, seq, rule, namespace, \
                         admitted, records) FROM STDIN BINARY",
                    )
                    .await?;
                let mut w = pin!(BinaryCopyInWriter::new(tx.copy_in(&st).await?, &APPLIED_TYPES));
                for p in &linked {
                    let c = &p.cols;
                    for a in &p.applied {
                        w.as_mut()
                            .write(&[
                                &a.principal,
                                &a.policy,
                                &c.time_us,
                                &p.seq,
                                &a.rule,
                                &c.namespace,
                                &a.admitted,
                                &a.records,
                            ])
                            .await?;
                    }
                }
                w.as_mut().finish().await?;
            }
            let st = tx.prepare_cached("UPDATE chain_head SET seq = $1, hash = $2 WHERE id = 1").await?;
            tx.execute(&st, &[&seq, &hash]).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(crate) async fn head_and_anchor(&self) -> Result<(Link, Link)> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT h.seq, h.hash, a.seq, a.hash FROM chain_head h, chain_anchor a \
                 WHERE h.id = 1 AND a.id = 1",
            )
            .await?;
        let row = client.query_one(&st, &[]).await?;
        Ok((link_at(&row, 0)?, link_at(&row, 2)?))
    }

    /// The first event row outside the chain: above the head, or at or below the retention
    /// anchor (retention deletes every row up to it, so one there was put there).
    pub(crate) async fn first_outside_chain(&self) -> Result<Option<(i64, String)>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT e.seq, e.id FROM events e, chain_head h, chain_anchor a \
                 WHERE h.id = 1 AND a.id = 1 AND (e.seq > h.seq OR e.seq <= a.seq) \
                 ORDER BY e.seq LIMIT 1",
                &[],
            )
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// The first usage index row outside the chain (above the head, or at or below the
    /// retention anchor): usage counts it though no stored event gives it.
    pub(crate) async fn first_applied_outside_chain(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT MIN(x.seq) FROM event_applied_rules x, chain_head h, chain_anchor a \
                 WHERE h.id = 1 AND a.id = 1 AND (x.seq > h.seq OR x.seq <= a.seq)",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub(crate) async fn chain_page(
        &self,
        after: (i64, Option<String>),
        bound: i64,
        limit: i64,
        records_after: i64,
    ) -> Result<(Vec<ChainRow>, RecordsBySeq, i64)> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .read_only(true)
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let rows = match &after.1 {
            None => {
                let st = tx
                    .prepare_cached(&format!(
                        "SELECT {CHAIN_COLUMNS} FROM events WHERE seq > $1 AND seq <= $2 \
                         ORDER BY seq, id LIMIT $3"
                    ))
                    .await?;
                tx.query(&st, &[&after.0, &bound, &limit]).await?
            }
            Some(id) => {
                let st = tx
                    .prepare_cached(&format!(
                        "SELECT {CHAIN_COLUMNS} FROM events \
                         WHERE (seq > $1 OR (seq = $1 AND id > $4)) AND seq <= $2 \
                         ORDER BY seq, id LIMIT $3"
                    ))
                    .await?;
                tx.query(&st, &[&after.0, &bound, &limit, id]).await?
            }
        };
        let rows = rows.iter().map(chain_row).collect::<Result<Vec<_>>>()?;
        let (records, records_to) = match (rows.first(), rows.last()) {
            // Whole buckets (the index has no seq order of its own): up to the end of the last
            // row's bucket, so the next page starts with its records already read.
            (Some(first), Some(last)) if last.seq > records_after => {
                let st = tx
                    .prepare_cached(
                        "SELECT seq, record_key, time_us FROM event_records \
                         WHERE bucket BETWEEN $1 AND $2 AND seq BETWEEN $3 AND $4",
                    )
                    .await?;
                let from = first.seq.max(records_after + 1);
                let to = bucket_end(last.seq);
                let records = tx
                    .query(&st, &[&bucket(from), &bucket(to), &from, &to])
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<_>>>()?;
                (records, to)
            }
            _ => (Vec::new(), records_after),
        };
        let mut indexed = chain::group_records(records);
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            let st = tx
                .prepare_cached(
                    "SELECT seq, principal, policy, rule, time_us, namespace, admitted, records \
                     FROM event_applied_rules WHERE seq BETWEEN $1 AND $2",
                )
                .await?;
            // By seq alone (every day's partition is probed by its seq index): a row moved to
            // another time must still be found, and reported.
            let applied = tx
                .query(&st, &[&first.seq, &last.seq])
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get(0)?,
                        chain::IndexedApplied {
                            principal: r.try_get(1)?,
                            policy: r.try_get(2)?,
                            rule: r.try_get(3)?,
                            time_us: r.try_get(4)?,
                            namespace: r.try_get(5)?,
                            admitted: r.try_get(6)?,
                            records: r.try_get(7)?,
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            chain::group_applied(&mut indexed, applied);
        }
        tx.commit().await?;
        Ok((rows, indexed, records_to))
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
        let (mut sql, mut params) = query::events_sql(
            q,
            cursor,
            limit,
            |i| format!("${i}"),
            |entry| format!("(body::jsonb -> 'dryRuns') @> jsonb_build_array({entry}::text::jsonb)"),
        );
        let bounded = max_bytes != usize::MAX;
        if bounded {
            // The rows up to the one whose body reaches `max_bytes` (sizes from the stored
            // values' headers, without reading them), and how many the page had.
            params.push(Param::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX)));
            sql = format!(
                "SELECT time_us, seq, body, total FROM (\
                     SELECT time_us, seq, body, COUNT(*) OVER () AS total, \
                     COALESCE(SUM(octet_length(body)) OVER (ORDER BY time_us DESC, seq DESC \
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before \
                     FROM ({sql}) AS page) AS sized \
                 WHERE before < ${} ORDER BY time_us DESC, seq DESC",
                params.len()
            );
        }
        let params: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(s) => Box::new(s),
                    Param::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let rows = self.limited_query(&sql, &refs).await?;
        let total = match rows.first() {
            Some(r) if bounded => r.try_get::<_, i64>(3)?,
            _ => 0,
        };
        let cut = total > rows.len() as i64;
        let rows =
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect::<Result<_>>()?;
        Ok((rows, cut))
    }

    pub(crate) async fn subject(
        &self,
        record_hash: &str,
        range: TimeRange,
        limit: i64,
    ) -> Result<Vec<SubjectAccess>> {
        let mut client = self.client().await?;
        let rows = async {
            let tx = self.limited(&mut client).await?;
            let rows = self.subject_rows(&tx, record_hash, range, limit).await?;
            tx.commit().await?;
            Ok(rows)
        }
        .await
        .map_err(|e| self.stopped(e))?;
        let mut out = Vec::new();
        for r in rows {
            // The 16-byte key could be shared with another record hash (a 2^-128 chance): keep
            // the events whose body names this one.
            let body: String = r.try_get(9)?;
            if !chain::names_record(&body, record_hash)? {
                continue;
            }
            out.push(crate::sqlite::subject_access((
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
                r.try_get(6)?,
                r.try_get(7)?,
                r.try_get(8)?,
            ))?);
        }
        Ok(out)
    }

    async fn subject_rows(
        &self,
        client: &deadpool_postgres::Transaction<'_>,
        record_hash: &str,
        range: TimeRange,
        limit: i64,
    ) -> Result<Vec<tokio_postgres::Row>> {
        // The buckets of the chain (after the anchor, up to the head); `bucket = ANY(...)` makes
        // one index descent per bucket (a range on the leading column would read every key of
        // every bucket). Partitions outside the time range are pruned.
        let (anchor, head) = {
            let row = client
                .query_one(
                    "SELECT a.seq, h.seq FROM chain_anchor a, chain_head h WHERE a.id = 1 AND h.id = 1",
                    &[],
                )
                .await?;
            (row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?)
        };
        if head <= anchor {
            return Ok(Vec::new());
        }
        let buckets: Vec<i64> = (bucket(anchor + 1)..=bucket(head)).collect();
        let key = chain::record_key(record_hash);
        let st = client
            .prepare_cached(
                "SELECT e.id, e.time_us, e.namespace, e.principal, e.user_id, e.policy, e.rule, \
                 e.decision, e.path, e.body \
                 FROM (SELECT seq, time_us FROM event_records \
                       WHERE bucket = ANY($1) AND record_key = $2 AND time_us >= $3 AND time_us < $4 \
                       ORDER BY time_us DESC, seq DESC LIMIT $5) r \
                 JOIN events e ON e.seq = r.seq AND e.time_us = r.time_us \
                 ORDER BY r.time_us DESC, r.seq DESC",
            )
            .await?;
        Ok(client.query(&st, &[&buckets, &key, &range.since, &range.until, &limit]).await?)
    }

    pub(crate) async fn top(&self, by: TopBy, since: i64, limit: i64) -> Result<Vec<TopEntry>> {
        let sql = match by {
            TopBy::Records => {
                "SELECT principal, SUM(records_returned)::bigint AS c FROM events \
                 WHERE time_us >= $1 GROUP BY principal HAVING SUM(records_returned) > 0 \
                 ORDER BY c DESC, principal LIMIT $2"
            }
            TopBy::Denials => {
                "SELECT principal, COUNT(*) AS c FROM events \
                 WHERE decision = 'Deny' AND decision <> 'Allow' AND time_us >= $1 GROUP BY principal \
                 ORDER BY c DESC, principal LIMIT $2"
            }
        };
        let rows = self.limited_query(sql, &[&since, &limit]).await?;
        rows.iter().map(|r| Ok(TopEntry { principal: r.try_get(0)?, count: count(r.try_get(1)?) })).collect()
    }

    pub(crate) async fn usage(
        &self,
        namespace: Option<&str>,
        policy: &str,
        principal: &str,
        now_us: i64,
        exclude_instance: Option<&str>,
    ) -> Result<Vec<(String, RuleUsage, RuleUsage)>> {
        let client = self.client().await?;
        let st = client
            // The deciding rules from `events`, the others that applied from their index; each
            // count also without the events of instance $8 (`own`: their ids carry its tag).
            .prepare_cached(
                "SELECT rule, \
                 SUM(CASE WHEN time_us > $4 AND admitted THEN 1 ELSE 0 END)::bigint, \
                 SUM(CASE WHEN time_us > $5 THEN records ELSE 0 END)::bigint, \
                 SUM(records)::bigint, \
                 SUM(CASE WHEN time_us > $4 AND admitted AND NOT own THEN 1 ELSE 0 END)::bigint, \
                 SUM(CASE WHEN time_us > $5 AND NOT own THEN records ELSE 0 END)::bigint, \
                 SUM(CASE WHEN NOT own THEN records ELSE 0 END)::bigint \
                 FROM (\
                   SELECT rule, time_us, decision <> 'Deny' AS admitted, records_returned AS records, \
                   ($8::text IS NOT NULL AND substr(id, 11, 8) = $8) AS own \
                   FROM events \
                   WHERE principal = $1 AND policy = $2 AND time_us > $6 AND time_us <= $3 \
                   AND rule IS NOT NULL AND rule_principal IS NULL AND ($7::text IS NULL OR namespace = $7) \
                   UNION ALL \
                   SELECT rule, time_us, admitted, records, \
                   ($8::text IS NOT NULL AND EXISTS (SELECT 1 FROM events e WHERE e.seq = x.seq \
                    AND e.time_us = x.time_us AND substr(e.id, 11, 8) = $8)) AS own \
                   FROM event_applied_rules x \
                   WHERE principal = $1 AND policy = $2 AND time_us > $6 AND time_us <= $3 \
                   AND ($7::text IS NULL OR namespace = $7)\
                 ) AS charged GROUP BY rule",
            )
            .await?;
        client
            .query(
                &st,
                &[
                    &principal,
                    &policy,
                    &now_us,
                    &(now_us - 60_000_000),
                    &(now_us - 3_600_000_000),
                    &(now_us - DAY_US),
                    &namespace,
                    &exclude_instance,
                ],
            )
            .await?
            .iter()
            .map(|r| {
                let usage = |at: usize| -> Result<RuleUsage> {
                    Ok(RuleUsage {
                        requests_last_minute: count(r.try_get(at)?),
                        records_last_hour: count(r.try_get(at + 1)?),
                        records_last_day: count(r.try_get(at + 2)?),
                    })
                };
                Ok((r.try_get(0)?, usage(1)?, usage(4)?))
            })
            .collect()
    }

    pub(crate) async fn prune_target(&self, cutoff: i64) -> Result<Option<i64>> {
        let client = self.client().await?;
        let min: Option<i64> = client
            .query_one("SELECT MIN(seq) FROM events WHERE time_us >= $1", &[&cutoff])
            .await?
            .try_get(0)?;
        Ok(min.map(|m| m - 1))
    }

    /// The latest event time stored, in µs (none in an empty store): one backward step of each
    /// day's time index.
    pub(crate) async fn events_after(
        &self,
        seq: i64,
        id: String,
        limit: i64,
        max_bytes: i64,
    ) -> Result<Vec<(i64, String, String)>> {
        let client = self.client().await?;
        // The rows up to the one whose body reaches `max_bytes` (sizes from the stored values'
        // headers, without reading them).
        let st = client
            .prepare_cached(
                "SELECT seq, id, body FROM (\
                   SELECT seq, id, body, COALESCE(SUM(octet_length(body)) OVER (ORDER BY seq, id \
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before \
                   FROM (SELECT seq, id, body FROM events WHERE (seq, id) > ($1, $2) \
                         ORDER BY seq, id LIMIT $3) AS page) AS sized \
                 WHERE before < $4 ORDER BY seq, id",
            )
            .await?;
        let rows = client.query(&st, &[&seq, &id, &limit, &max_bytes]).await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
    }

    pub(crate) async fn last_position(&self) -> Result<Option<(i64, String)>> {
        let client = self.client().await?;
        let st =
            client.prepare_cached("SELECT seq, id FROM events ORDER BY seq DESC, id DESC LIMIT 1").await?;
        let row = client.query_opt(&st, &[]).await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Takes the session-level advisory lock `name` (of this schema) on a connection of its
    /// own, kept out of the pool: held until that connection closes. `None`: another session
    /// holds it.
    pub(crate) async fn try_lease(&self, name: &str) -> Result<Option<deadpool_postgres::ClientWrapper>> {
        // Out of the pool first: whatever happens next (an error, this future dropped), the
        // connection closes with it, and a lock taken on it with the session; it never goes
        // back to the pool holding the lock.
        let client = deadpool_postgres::Object::take(self.client().await?);
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext(current_schema() || '.' || $1))", &[&name])
            .await?
            .try_get(0)?;
        if !taken {
            return Ok(None);
        }
        // The server must notice a lost holder (a node gone, a network cut) within seconds,
        // not at TCP's defaults (hours), or no other replica can take the lock meanwhile. Best
        // effort: a pooler in front may refuse them (and applies its own).
        if let Err(error) = client
            .batch_execute(
                "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                 SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000",
            )
            .await
        {
            tracing::warn!(%error, "cannot shorten the detection lease connection's keep-alives");
        }
        Ok(Some(client))
    }

    pub(crate) async fn newest_time(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let st = client.prepare_cached("SELECT MAX(time_us) FROM events").await?;
        Ok(client.query_one(&st, &[]).await?.try_get(0)?)
    }

    /// Deletes the events up to `last` (the anchor still `anchor`): the day partitions wholly
    /// before `cutoff` that hold no later event are dropped, the other rows deleted. Records
    /// `pruned_before` as the time before which ingest refuses events (and makes no partition).
    pub(crate) async fn prune_to(
        &self,
        anchor: &Link,
        last: &Link,
        cutoff: i64,
        pruned_before: i64,
    ) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let current = link_at(
            &tx.query_one("SELECT seq, hash FROM chain_anchor WHERE id = 1 FOR UPDATE", &[]).await?,
            0,
        )?;
        if &current != anchor {
            return Err(Error::Corrupt("the anchor moved during prune (concurrent prune?)".into()));
        }
        // No partition is made meanwhile: the lists of days read below stay true until commit.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.custos_partitions'))", &[])
            .await?;
        let mut deleted = 0u64;
        // Whole days before the cutoff whose events are all pruned: drop the partitions.
        let parts = tx
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'events'::regclass",
                &[],
            )
            .await?;
        let mut dropped = Vec::new();
        let mut writers_done = false;
        for row in &parts {
            let name: String = row.try_get(0)?;
            let Some(day) = day_of_partition(&name) else {
                continue;
            };
            if (day + 1) * DAY_US > cutoff {
                continue;
            }
            let later = |max: Option<i64>| max.is_some_and(|m| m > last.seq);
            let stats = tx.query_one(&format!("SELECT COUNT(*), MAX(seq) FROM {name}"), &[]).await?;
            let (n, max): (i64, Option<i64>) = (stats.try_get(0)?, stats.try_get(1)?);
            if later(max) {
                continue;
            }
            if !writers_done {
                // An ingest in flight may have written an event of this day that the count
                // cannot see (uncommitted, chained after `last`; its batch read the cutoff
                // before this prune commits, so did not find it expired): the drop would wait
                // for it to commit, then take the acknowledged event along. Ingest writes
                // through `events`, so this lock (the one the drop takes first anyway) waits
                // for every ingest that has written and holds off the others until commit;
                // then the partition is read again. No ingest pays for it (ingest takes no
                // extra lock), and it is taken only when a partition is to be dropped.
                //
                // A long report query holds the table too: the lock waits at most
                // PRUNE_LOCK_WAIT for it (every ingest and query queues behind a waiting lock),
                // then this run drops no partition (its rows are deleted below all the same).
                tx.batch_execute(&format!(
                    "SAVEPOINT lock_events; SET LOCAL lock_timeout = '{PRUNE_LOCK_WAIT_MS}ms'"
                ))
                .await?;
                match tx.batch_execute("LOCK TABLE ONLY events IN ACCESS EXCLUSIVE MODE").await {
                    Ok(()) => {
                        tx.batch_execute("SET LOCAL lock_timeout TO DEFAULT; RELEASE SAVEPOINT lock_events")
                            .await?
                    }
                    Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT lock_events").await?;
                        tracing::info!(
                            "retention: the events table stayed busy; day partitions are dropped at a later run"
                        );
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
                writers_done = true;
                let max: Option<i64> =
                    tx.query_one(&format!("SELECT MAX(seq) FROM {name}"), &[]).await?.try_get(0)?;
                // Rows up to `last` can be neither added nor deleted meanwhile (the chain's
                // seqs only grow; other prunes wait on the anchor): the count still holds.
                if later(max) {
                    continue;
                }
            }
            let suffix = day_suffix(day);
            tx.batch_execute(&format!(
                "DROP TABLE events_{suffix}; DROP TABLE IF EXISTS event_records_{suffix}; \
                 DROP TABLE IF EXISTS event_applied_rules_{suffix};"
            ))
            .await?;
            deleted += count(n);
            dropped.push(day);
        }
        // Day partitions of the applied rules' index whose day of events is gone, here or by a
        // replica of a version before V4 (which drops only the events' and records' tables).
        let events_days: HashSet<i64> = parts
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|name| day_of_partition(&name))
            .filter(|day| !dropped.contains(day))
            .collect();
        for (suffix, _) in partitions_of(&tx, "event_applied_rules").await? {
            let day = day_of_partition(&format!("events_{suffix}"));
            if day.is_some_and(|d| (d + 1) * DAY_US <= cutoff && !events_days.contains(&d)) {
                tx.batch_execute(&format!("DROP TABLE event_applied_rules_{suffix}")).await?;
            }
        }
        tx.execute(
            "DELETE FROM event_records WHERE bucket <= $3 AND seq <= $1 AND time_us < $2",
            &[&last.seq, &cutoff, &bucket(last.seq)],
        )
        .await?;
        tx.execute("DELETE FROM event_applied_rules WHERE seq <= $1 AND time_us < $2", &[&last.seq, &cutoff])
            .await?;
        deleted +=
            tx.execute("DELETE FROM events WHERE seq <= $1 AND time_us < $2", &[&last.seq, &cutoff]).await?;
        tx.execute("DELETE FROM event_ids WHERE seq <= $1", &[&last.seq]).await?;
        tx.execute(
            "UPDATE chain_anchor SET seq = $1, hash = $2, \
             pruned_before_us = GREATEST(COALESCE(pruned_before_us, $3), $3) WHERE id = 1",
            &[&last.seq, &last.hash, &pruned_before],
        )
        .await?;
        tx.commit().await?;
        let mut known = self.known_partitions();
        for d in dropped {
            known.remove(&d);
        }
        Ok(deleted)
    }

    pub(crate) async fn insert_alerts(&self, rows: Vec<(String, i64, String)>) -> Result<u64> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut times = Vec::with_capacity(rows.len());
        let mut bodies = Vec::with_capacity(rows.len());
        for (id, t, b) in rows {
            ids.push(id);
            times.push(t);
            bodies.push(b);
        }
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "INSERT INTO alerts (id, time_us, body) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        Ok(client.execute(&st, &[&ids, &times, &bodies]).await?)
    }

    pub(crate) async fn alerts(&self, since: i64, limit: i64) -> Result<Vec<String>> {
        let rows = self
            .limited_query(
                "SELECT body FROM alerts WHERE time_us >= $1 ORDER BY time_us DESC, id DESC LIMIT $2",
                &[&since, &limit],
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }
}
