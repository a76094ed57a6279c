//! Custos collector: the tamper-evident audit store.
//!
//! One API, [`AnyStore`], over two backends: SQLite (embedded, one file, WAL; the default) and
//! PostgreSQL (tables partitioned by day, pooled connections; for production and for several
//! collector processes). [`open`] picks the backend from a URL and runs the schema migrations.
//!
//! - [`AnyStore::ingest`] stores a batch idempotently by event id, durably, hash-chained (see
//!   [`chain`] for the exact construction and how [`AnyStore::verify`] classifies breaks).
//! - [`AnyStore::query`], [`AnyStore::subject`], [`AnyStore::top`], [`AnyStore::usage`] answer
//!   the investigator's and the sidecars' questions through indexes.
//! - [`AnyStore::prune`] applies retention and leaves an anchor so the rest still verifies.
//! - [`AnyStore::insert_alerts`] / [`AnyStore::alerts`] keep the detectors' alerts.
//!
//! Nothing here logs or returns personal data values: errors name the event by its index in
//! the batch and say what is wrong, never the value.
#![forbid(unsafe_code)]

pub mod chain;
mod postgres;
mod query;
mod sqlite;

use chrono::{DateTime, Utc};
use custos_api::collector::UsageResponse;
use custos_api::{AuditEvent, Decision};
use serde::{Deserialize, Serialize};

pub use chain::{GENESIS_HASH, chain_hash};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use chain::{ChainRow, Link, Walker};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL is neither `sqlite:PATH` nor `postgres://...`.
    #[error("unsupported store URL: expected sqlite:PATH, sqlite::memory: or postgres://...")]
    BadUrl,
    /// An event of the batch cannot be stored; nothing of the batch was stored.
    #[error("event {index} of the batch is invalid: {reason}")]
    InvalidEvent {
        /// Index of the event in the batch.
        index: usize,
        /// What is wrong (never the value).
        reason: String,
    },
    /// An alert cannot be stored; nothing of the call was stored.
    #[error("alert {index} is invalid: {reason}")]
    InvalidAlert {
        /// Index of the alert in the call.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A pagination cursor that this store did not issue.
    #[error("invalid cursor")]
    BadCursor,
    /// The database was migrated by a newer Custos.
    #[error("store schema version {found} is newer than this binary supports ({supported})")]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Latest version this binary knows.
        supported: i64,
    },
    /// Pruning refused: the part of the chain to be pruned does not verify, and pruning it
    /// would destroy the evidence.
    #[error("the chain is broken at seq {} ({:?}); refusing to prune over it", .0.seq, .0.kind)]
    ChainBroken(BrokenLink),
    /// Stored data is not what this store wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// SQLite failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    #[error("PostgreSQL pool: {0}")]
    Pool(String),
    /// A report query (events, subject lookup, top, alerts) ran longer than the store's time
    /// limit ([`AnyStore::with_query_timeout`]) and was stopped by the database.
    #[error("the query ran longer than {0:?} and was stopped")]
    QueryTimeout(std::time::Duration),
    /// A blocking database task failed.
    #[error("store task failed: {0}")]
    Task(String),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The outcome of [`AnyStore::ingest`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IngestOutcome {
    /// Events stored by this call.
    pub accepted: u64,
    /// Events not stored because an event with the same id is already stored (or appears
    /// earlier in the same batch).
    pub duplicates: u64,
    /// Events not stored because they are older than what retention has already pruned
    /// ([`AnyStore::prune`]'s cutoff, never past the newest event it deleted): their ids are
    /// forgotten, so they cannot be told from pruned events sent again (which would be stored
    /// twice, and kept past their retention).
    /// Also the events older than the bound given to [`AnyStore::ingest_listing_new_since`].
    #[serde(default)]
    pub expired: u64,
}

/// The outcome of [`AnyStore::ingest_listing_new`]: the counts, and which events of the batch
/// were newly stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    /// The counts, as [`AnyStore::ingest`] returns them.
    pub outcome: IngestOutcome,
    /// The positions in the batch of the events this call stored, ascending (`outcome.accepted`
    /// of them); the other events were duplicates or expired.
    pub new: Vec<usize>,
}

impl Ingested {
    fn stored(&mut self, index: usize) {
        self.outcome.accepted += 1;
        self.new.push(index);
    }
}

/// A point of the chain: the seq of an event and its hash (seq 0 and [`GENESIS_HASH`] before
/// the first event).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChainHead {
    /// Sequence number.
    pub seq: u64,
    /// Hash of the event at `seq`.
    pub hash: String,
}

/// How a link of the chain is broken.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// A row's content (or its index rows) changed after it was chained.
    Edited,
    /// Rows are missing.
    Deleted,
    /// A row was added that ingest did not chain.
    Inserted,
    /// Rows were swapped.
    Reordered,
}

/// The first broken link found by [`AnyStore::verify`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BrokenLink {
    /// Seq at which the chain breaks (for `Deleted`, the first missing seq).
    pub seq: u64,
    /// Id of the offending row, when there is a row (not for `Deleted`).
    pub event_id: Option<String>,
    /// What happened.
    pub kind: BreakKind,
    /// How it was detected, in words.
    pub detail: String,
}

/// The result of [`AnyStore::verify`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Rows verified as correctly linked before the walk stopped.
    pub checked: u64,
    /// Where the walk started: the anchor (genesis or the last pruned event) or the row
    /// before `from`.
    pub start: ChainHead,
    /// The chain head recorded by the last ingest.
    pub head: ChainHead,
    /// The first broken link, if any.
    pub first_broken: Option<BrokenLink>,
}

impl VerifyReport {
    /// Whether the chain verified.
    pub fn is_ok(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// Filters for [`AnyStore::query`]. Results are newest first (event time, then seq).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Namespace of the protected workload.
    pub namespace: Option<String>,
    /// Policy name.
    pub policy: Option<String>,
    /// Principal key (`user:<id>`, `workload:<ns>/<sa>`, `peer:<ip>`).
    pub principal: Option<String>,
    /// Decision.
    pub decision: Option<Decision>,
    /// Events carrying a dry run of this Audit-mode policy (`dryRuns`: it did not decide).
    pub dry_run_policy: Option<String>,
    /// Events carrying a dry run with this decision (`Allow` or `WouldDeny`); with
    /// [`Self::dry_run_policy`], that policy's dry run.
    pub dry_run_decision: Option<Decision>,
    /// Events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Events strictly before this time.
    pub until: Option<DateTime<Utc>>,
    /// Page size: 0 means [`DEFAULT_LIMIT`]; capped at [`MAX_LIMIT`].
    pub limit: u32,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Page size when none is given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size.
pub const MAX_LIMIT: u32 = 10_000;

pub(crate) fn effective_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 { DEFAULT_LIMIT } else { limit.min(MAX_LIMIT) })
}

/// One page of [`AnyStore::query`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// The events as stored (with `prev_hash`), newest first.
    pub events: Vec<AuditEvent>,
    /// Cursor of the next page; none on the last page.
    pub next_cursor: Option<String>,
}

/// One access to a data subject, from [`AnyStore::subject`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubjectAccess {
    /// The event.
    pub event_id: String,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// Namespace of the protected workload.
    pub namespace: String,
    /// Principal key.
    pub principal: String,
    /// The end user's id, when a token was verified.
    pub user_id: Option<String>,
    /// The policy that decided.
    pub policy: Option<String>,
    /// The rule that decided.
    pub rule: Option<String>,
    /// The decision.
    pub decision: Decision,
    /// The normalised request path.
    pub path: String,
}

/// What [`AnyStore::top`] ranks principals by.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum TopBy {
    /// Records returned.
    Records,
    /// Denied requests.
    Denials,
}

/// One principal in [`AnyStore::top`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopEntry {
    /// Principal key.
    pub principal: String,
    /// Records returned or denials.
    pub count: u64,
}

/// A place in the chain: after the event `id` of `seq` (the default: before every event).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorePosition {
    /// The seq of the event.
    pub seq: i64,
    /// Its id.
    pub id: String,
}

/// A lease from [`AnyStore::try_lease`], held until dropped.
pub struct Lease {
    /// PostgreSQL: the connection whose session holds the advisory lock.
    connection: Option<deadpool_postgres::ClientWrapper>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("session", &self.connection.is_some()).finish()
    }
}

impl Lease {
    /// Whether the lease is still held: its connection is open and answers within `timeout`
    /// (a lost connection has lost the lock to whoever takes it next).
    pub async fn held(&self, timeout: std::time::Duration) -> bool {
        match &self.connection {
            None => true,
            Some(c) => {
                !c.is_closed()
                    && tokio::time::timeout(timeout, c.simple_query("SELECT 1"))
                        .await
                        .is_ok_and(|r| r.is_ok())
            }
        }
    }

    /// Whether the lease's connection is known closed (no round trip).
    pub fn lost(&self) -> bool {
        self.connection.as_ref().is_some_and(|c| c.is_closed())
    }
}

/// The result of [`AnyStore::prune`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    /// Events deleted by this call.
    pub deleted: u64,
    /// The anchor the remaining chain verifies from.
    pub anchor: ChainHead,
}

/// Severity of an alert.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Likely misuse.
    Warning,
    /// Act now.
    Critical,
}

/// An alert raised by a detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Unique id; storing the same id twice stores it once.
    pub id: String,
    /// When it was raised, RFC 3339 UTC.
    pub time: String,
    /// The detector's name.
    pub detector: String,
    /// Namespace concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Policy concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Principal concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Severity.
    pub severity: Severity,
    /// One line for humans.
    pub message: String,
    /// Detector-specific figures.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// A store: SQLite or PostgreSQL, behind one API.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// Embedded SQLite.
    Sqlite(SqliteStore),
    /// PostgreSQL.
    Postgres(PostgresStore),
}

/// How long a report query (events, subject lookup, top, alerts) may run before the database
/// stops it, unless [`AnyStore::with_query_timeout`] says otherwise.
pub const DEFAULT_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a store and migrates its schema: `sqlite:PATH` (a file, created if missing),
/// `sqlite::memory:` (tests) or `postgres://USER@HOST:PORT/DB[?options=-csearch_path%3DSCHEMA]`.
pub async fn open(url: &str) -> Result<AnyStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(AnyStore::Postgres(PostgresStore::open(url).await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(Error::BadUrl);
        }
        Ok(AnyStore::Sqlite(SqliteStore::open(path).await?))
    } else {
        Err(Error::BadUrl)
    }
}

/// Rows fetched per round trip by the verification walk.
const VERIFY_PAGE: i64 = 2_000;

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

impl AnyStore {
    /// Stops report queries ([`Self::query`], [`Self::subject`], [`Self::top`],
    /// [`Self::alerts`]) that run longer than `limit` ([`Error::QueryTimeout`]), so that an
    /// investigation over months of events cannot hold a database connection indefinitely
    /// (default [`DEFAULT_QUERY_TIMEOUT`]). On SQLite every read is limited so (each page of a
    /// verification is one read); on PostgreSQL it is the statement time-out of those
    /// queries. A limit of zero stops every SQLite read at its first progress check (after
    /// 1,000 virtual machine steps) and every PostgreSQL query after a millisecond, the
    /// shortest statement time-out it takes (zero there means none).
    #[must_use]
    pub fn with_query_timeout(self, limit: std::time::Duration) -> AnyStore {
        match self {
            AnyStore::Sqlite(s) => AnyStore::Sqlite(s.with_query_timeout(limit)),
            AnyStore::Postgres(s) => AnyStore::Postgres(s.with_query_timeout(limit)),
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }

    /// Stores a batch: each event not already stored (by id) gets the next seq and is chained,
    /// all in one transaction, durable when this returns. A resent batch stores nothing twice.
    /// An invalid event rejects the whole batch ([`Error::InvalidEvent`]) before anything is
    /// written. The events' own `prev_hash` is ignored and replaced.
    pub async fn ingest(&self, events: &[AuditEvent]) -> Result<IngestOutcome> {
        Ok(self.ingest_listing_new(events).await?.outcome)
    }

    /// [`Self::ingest`], also telling which events of the batch were newly stored (the others
    /// were already stored, or repeated earlier in the batch): what a consumer of stored events
    /// should see once, however often a sender resends.
    pub async fn ingest_listing_new(&self, events: &[AuditEvent]) -> Result<Ingested> {
        self.ingest_listing_new_since(events, None).await
    }

    /// [`Self::ingest_listing_new`], also acknowledging without storing the events dated
    /// before `oldest` (the collector's `--max-event-age`): counted in
    /// [`IngestOutcome::expired`], as events older than what retention has pruned are. Such
    /// events are still validated (an invalid one rejects the batch), but they do not count
    /// towards [`chain::MAX_DAYS_PER_BATCH`] and no PostgreSQL partition is made for them.
    pub async fn ingest_listing_new_since(
        &self,
        events: &[AuditEvent],
        oldest: Option<DateTime<Utc>>,
    ) -> Result<Ingested> {
        if events.is_empty() {
            return Ok(Ingested::default());
        }
        let oldest_us = oldest.map(|t| t.timestamp_micros());
        let batch = chain::unlinked(events, chain::validate(events, oldest_us)?)?;
        chain::check_sizes(&batch)?;
        let too_old = |u: &chain::Unlinked| oldest_us.is_some_and(|o| u.cols.time_us < o);
        if !batch.iter().any(too_old) {
            return match self {
                AnyStore::Sqlite(s) => s.ingest(batch).await,
                AnyStore::Postgres(s) => s.ingest(events, batch).await,
            };
        }
        // The rest goes through as a batch of its own; positions are mapped back.
        let mut kept = Vec::with_capacity(batch.len());
        let mut kept_events = Vec::with_capacity(batch.len());
        let mut rest = Vec::with_capacity(batch.len());
        for (index, (event, u)) in events.iter().zip(batch).enumerate() {
            if !too_old(&u) {
                kept.push(index);
                kept_events.push(event.clone());
                rest.push(u);
            }
        }
        let mut ingested = if rest.is_empty() {
            Ingested::default()
        } else {
            match self {
                AnyStore::Sqlite(s) => s.ingest(rest).await?,
                AnyStore::Postgres(s) => s.ingest(&kept_events, rest).await?,
            }
        };
        for position in &mut ingested.new {
            *position = kept[*position];
        }
        ingested.outcome.expired += (events.len() - kept.len()) as u64;
        Ok(ingested)
    }

    /// Stores a batch as versions before 2026-12-06 did, without [`chain::admissible`]'s
    /// checks (bounded fields, hex record hashes, times not ahead of the clock): only for tests
    /// of the conversion of stores those versions wrote, which may hold such events.
    #[doc(hidden)]
    pub async fn ingest_as_before_admission_checks(&self, events: &[AuditEvent]) -> Result<IngestOutcome> {
        let columns = events
            .iter()
            .enumerate()
            .map(|(index, e)| {
                chain::Columns::of(e)
                    .map_err(|reason| Error::InvalidEvent { index, reason: reason.to_owned() })
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = chain::unlinked(events, columns)?;
        let ingested = match self {
            AnyStore::Sqlite(s) => s.ingest(batch).await,
            AnyStore::Postgres(s) => s.ingest(events, batch).await,
        };
        Ok(ingested?.outcome)
    }

    /// The chain head: the seq and hash of the last ingested event.
    pub async fn head(&self) -> Result<ChainHead> {
        let (head, _) = dispatch!(self, s => s.head_and_anchor().await)?;
        Ok(to_head(&head))
    }

    /// The retention anchor: the seq and hash of the last pruned event (genesis before any).
    pub async fn anchor(&self) -> Result<ChainHead> {
        let (_, anchor) = dispatch!(self, s => s.head_and_anchor().await)?;
        Ok(to_head(&anchor))
    }

    /// Walks the chain in seq order from the anchor (or from seq `from`, trusting the row
    /// before it) to the head, recomputing every hash, and reports the first broken link.
    /// See [`chain`] for the exact rules.
    pub async fn verify(&self, from: Option<u64>) -> Result<VerifyReport> {
        self.verify_expecting(from, None).await
    }

    /// [`AnyStore::verify`], and then, when the chain is intact, that the row at `expect.0`
    /// still has the hash `expect.1`: a head recorded outside the store earlier (a log, a
    /// ticket, another system). A chain cut back and re-grown, or rewritten from some row on
    /// with every hash recomputed and `chain_head` updated, verifies on its own; it does not
    /// match a hash published before. A seq below the retention anchor cannot be checked (its
    /// row is gone) and passes.
    pub async fn verify_expecting(
        &self,
        from: Option<u64>,
        expect: Option<(u64, String)>,
    ) -> Result<VerifyReport> {
        let mut report = self.verify_walk(from).await?;
        if let (None, Some((seq, hash))) = (&report.first_broken, expect) {
            report.first_broken = self.check_expected(seq, &hash).await?;
        }
        Ok(report)
    }

    /// Whether the row at `seq` has `hash` (see [`AnyStore::verify_expecting`]).
    async fn check_expected(&self, seq: u64, hash: &str) -> Result<Option<BrokenLink>> {
        let (head, anchor) = dispatch!(self, s => s.head_and_anchor().await)?;
        let at = i64::try_from(seq).unwrap_or(i64::MAX);
        let found = if at > head.seq {
            return Ok(Some(BrokenLink {
                seq,
                event_id: None,
                kind: BreakKind::Deleted,
                detail: format!(
                    "the chain ends at seq {} before the expected seq {seq}: its tail was cut",
                    head.seq
                ),
            }));
        } else if at < anchor.seq {
            return Ok(None);
        } else if at == anchor.seq {
            Some(anchor.hash.clone())
        } else {
            let rows = self.chain_page((at - 1, None), at, 1, at - 1).await?.0;
            rows.into_iter().find(|r| r.seq == at).map(|r| r.hash)
        };
        Ok(match found {
            Some(h) if h == hash => None,
            Some(_) => Some(BrokenLink {
                seq,
                event_id: None,
                kind: BreakKind::Edited,
                detail:
                    "the row's hash differs from the expected one: the chain was rewritten from here, or cut \
                         and grown again"
                        .into(),
            }),
            None => Some(BrokenLink {
                seq,
                event_id: None,
                kind: BreakKind::Deleted,
                detail: "the expected row is missing".into(),
            }),
        })
    }

    async fn verify_walk(&self, from: Option<u64>) -> Result<VerifyReport> {
        // A prune by another process while walking deletes rows the walk had still to read:
        // when the anchor moved meanwhile, the walk is done again from the new one.
        let mut attempts = 0;
        loop {
            let report = self.verify_once(from).await?;
            attempts += 1;
            let anchor = Link {
                seq: i64::try_from(report.start.seq).unwrap_or(i64::MAX),
                hash: report.start.hash.clone(),
            };
            if report.first_broken.is_none()
                || from.is_some()
                || attempts == 3
                || self.moved_anchor(&anchor).await?.is_none()
            {
                return Ok(report);
            }
        }
    }

    async fn verify_once(&self, from: Option<u64>) -> Result<VerifyReport> {
        let (head, anchor) = dispatch!(self, s => s.head_and_anchor().await)?;
        let start = match from.map(|f| i64::try_from(f).unwrap_or(i64::MAX)) {
            Some(f) if f - 1 > anchor.seq => {
                let rows = self.chain_page((f - 2, None), f - 1, 1, f - 1).await?.0;
                match rows.into_iter().next() {
                    Some(r) if r.seq == f - 1 => Link { seq: r.seq, hash: r.hash },
                    _ => {
                        return Ok(VerifyReport {
                            checked: 0,
                            start: to_head(&anchor),
                            head: to_head(&head),
                            first_broken: Some(BrokenLink {
                                seq: u64::try_from(f - 1).unwrap_or(0),
                                event_id: None,
                                kind: BreakKind::Deleted,
                                detail: "the row before the starting seq is missing".into(),
                            }),
                        });
                    }
                }
            }
            _ => anchor.clone(),
        };
        let (checked, first_broken, last, _) = self.walk(start.clone(), head.seq).await?;
        let mut first_broken = first_broken;
        if first_broken.is_none() {
            if last.seq < head.seq {
                first_broken = Some(BrokenLink {
                    seq: u64::try_from(last.seq + 1).unwrap_or(0),
                    event_id: None,
                    kind: BreakKind::Deleted,
                    detail: format!("rows {}..={} are missing", last.seq + 1, head.seq),
                });
            } else if last.hash != head.hash {
                first_broken = Some(BrokenLink {
                    seq: u64::try_from(last.seq).unwrap_or(0),
                    event_id: None,
                    kind: BreakKind::Edited,
                    detail: "the last row's hash differs from the recorded chain head".into(),
                });
            } else if let Some((seq, id)) = dispatch!(self, s => s.first_outside_chain().await)? {
                let detail = if seq > head.seq {
                    "row above the chain head".to_string()
                } else {
                    format!(
                        "row at or below the retention anchor (seq {}), which retention deleted",
                        anchor.seq
                    )
                };
                first_broken = Some(BrokenLink {
                    seq: u64::try_from(seq).unwrap_or(0),
                    event_id: Some(id),
                    kind: BreakKind::Inserted,
                    detail,
                });
            } else if let Some(seq) = dispatch!(self, s => s.first_applied_outside_chain().await)? {
                first_broken = Some(BrokenLink {
                    seq: u64::try_from(seq).unwrap_or(0),
                    event_id: None,
                    kind: BreakKind::Inserted,
                    detail: "a usage index row of no event of the chain".into(),
                });
            }
        }
        Ok(VerifyReport { checked, start: to_head(&start), head: to_head(&head), first_broken })
    }

    /// Walks from `start` up to seq `bound`; returns rows checked, the first break, the last
    /// good link and the latest event time of the rows checked (none if none).
    async fn walk(&self, start: Link, bound: i64) -> Result<(u64, Option<BrokenLink>, Link, Option<i64>)> {
        let mut walker = Walker::new(start.clone(), bound);
        let mut after: (i64, Option<String>) = (start.seq, None);
        let mut buf: Vec<ChainRow> = Vec::new();
        let mut records = std::collections::BTreeMap::new();
        // The record-hash index rows of every seq up to here are in `records`.
        let mut records_to = start.seq;
        let mut exhausted = false;
        let mut newest: Option<i64> = None;
        let mut i = 0;
        loop {
            // Keep at least one row of look-ahead in the buffer.
            if i + 1 >= buf.len() && !exhausted {
                let (rows, recs, to) = self.chain_page(after.clone(), bound, VERIFY_PAGE, records_to).await?;
                records_to = records_to.max(to);
                if (rows.len() as i64) < VERIFY_PAGE {
                    exhausted = true;
                }
                if let Some(last) = rows.last() {
                    after = (last.seq, Some(last.cols.id.clone()));
                }
                buf.drain(..i);
                i = 0;
                buf.extend(rows);
                chain::merge_indexed(&mut records, recs);
            }
            let Some(r) = buf.get(i) else { break };
            let empty = chain::Indexed::default();
            let indexed = records.get(&r.seq).unwrap_or(&empty);
            if let Some(b) = walker.step(r, buf.get(i + 1), indexed) {
                return Ok((walker.checked, Some(b), walker.last().clone(), newest));
            }
            newest = newest.max(Some(r.cols.time_us));
            records.remove(&r.seq);
            i += 1;
        }
        Ok((walker.checked, None, walker.last().clone(), newest))
    }

    /// Rows after `after` in `(seq, id)` order (a `None` id: after every row of that seq) and
    /// `seq <= bound`, in order; the record-hash index rows of the seqs above `records_after`
    /// up to at least the last row's, grouped by seq; and the seq up to which they were read.
    async fn chain_page(
        &self,
        after: (i64, Option<String>),
        bound: i64,
        limit: i64,
        records_after: i64,
    ) -> Result<(Vec<ChainRow>, chain::RecordsBySeq, i64)> {
        dispatch!(self, s => s.chain_page(after, bound, limit, records_after).await)
    }

    /// One page of events matching the filters, newest first.
    pub async fn query(&self, q: &EventQuery) -> Result<Page> {
        self.query_within(q, usize::MAX).await
    }

    /// [`Self::query`], the page also ending at the event whose stored body (canonical JSON)
    /// brings the page's bodies to `max_bytes` or more: a page holds at least one event, and
    /// its bodies at most `max_bytes` plus one event's ([`chain::MAX_EVENT_BYTES`]). Its
    /// `next_cursor` is then set (the next page may be empty). What a reader that must keep its
    /// memory bounded asks, whatever the events' sizes.
    pub async fn query_within(&self, q: &EventQuery, max_bytes: usize) -> Result<Page> {
        let limit = effective_limit(q.limit);
        let cursor = q.cursor.as_deref().map(query::parse_cursor).transpose()?;
        let (mut rows, cut): (Vec<(i64, i64, String)>, bool) =
            dispatch!(self, s => s.query(q, cursor, limit + 1, max_bytes.max(1)).await)?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(usize::try_from(limit).unwrap_or(0));
            rows.last().map(|(t, seq, _)| query::make_cursor(*t, *seq))
        } else if cut {
            rows.last().map(|(t, seq, _)| query::make_cursor(*t, *seq))
        } else {
            None
        };
        let events = rows.iter().map(|(_, _, body)| chain::parse_body(body)).collect::<Result<Vec<_>>>()?;
        Ok(Page { events, next_cursor })
    }

    /// Who accessed the data subject whose keyed record hash is `record_hash`, newest first,
    /// in `[since, until)`, at most `limit` (0: [`DEFAULT_LIMIT`]). Found through the
    /// record-hash index (see [`chain`]) and checked against each event's body.
    pub async fn subject(
        &self,
        record_hash: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<SubjectAccess>> {
        let range = query::TimeRange::new(since, until);
        let limit = effective_limit(limit);
        dispatch!(self, s => s.subject(record_hash, range, limit).await)
    }

    /// Principals ranked by records returned or by denials since `since` (all time if none),
    /// at most `limit` (0: [`DEFAULT_LIMIT`]).
    pub async fn top(&self, by: TopBy, since: Option<DateTime<Utc>>, limit: u32) -> Result<Vec<TopEntry>> {
        let since = since.map_or(i64::MIN, |t| t.timestamp_micros());
        let limit = effective_limit(limit);
        dispatch!(self, s => s.top(by, since, limit).await)
    }

    /// A principal's usage under a policy, per rule, over windows ending at `now`: admitted
    /// requests (Allow or WouldDeny) in `(now - 60 s, now]`, records returned in the last hour
    /// and the last 24 hours. Events without a rule (the default action) are not counted.
    /// With `instance`, the counts are also given without the events whose ids carry that
    /// instance tag (one sidecar process's, [`custos_api::collector::instance_of_event_id`]):
    /// [`UsageResponse::rules_without_instance`].
    pub async fn usage(
        &self,
        namespace: Option<&str>,
        policy: &str,
        principal: &str,
        now: DateTime<Utc>,
        instance: Option<&str>,
    ) -> Result<UsageResponse> {
        let now_us = now.timestamp_micros();
        let rows = dispatch!(self, s => s.usage(namespace, policy, principal, now_us, instance).await)?;
        let without =
            instance.map(|_| rows.iter().map(|(rule, _, without)| (rule.clone(), *without)).collect());
        Ok(UsageResponse {
            policy: policy.to_owned(),
            principal: principal.to_owned(),
            as_of: chain::format_time_us(now_us),
            rules: rows.into_iter().map(|(rule, all, _)| (rule, all)).collect(),
            instance: instance.map(str::to_owned),
            rules_without_instance: without,
        })
    }

    /// The stored events after `after` in chain order (seq, then id), at most `limit`, the page
    /// ending at the event whose stored body brings its bodies to `max_bytes` (at least one
    /// event), each with its position: every replica's events, as a reader following the
    /// store reads them (a batch's events become visible together, in seq order, when it
    /// commits).
    pub async fn events_after(
        &self,
        after: &StorePosition,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<(StorePosition, AuditEvent)>> {
        let limit = i64::from(limit.max(1));
        let max_bytes = i64::try_from(max_bytes.max(1)).unwrap_or(i64::MAX);
        let (seq, id) = (after.seq, after.id.clone());
        let rows = dispatch!(self, s => s.events_after(seq, id, limit, max_bytes).await)?;
        rows.into_iter()
            .map(|(seq, id, body)| Ok((StorePosition { seq, id }, chain::parse_body(&body)?)))
            .collect()
    }

    /// The position of the last stored event (the start of the store when it holds none).
    pub async fn last_position(&self) -> Result<StorePosition> {
        let last = dispatch!(self, s => s.last_position().await)?;
        Ok(last.map_or_else(StorePosition::default, |(seq, id)| StorePosition { seq, id }))
    }

    /// Takes the lease `name` if no other process holds it: on PostgreSQL a session advisory
    /// lock on a connection of its own, released when the [`Lease`] is dropped or its
    /// connection is lost ([`Lease::held`] tells); on SQLite (one process per file) always
    /// granted. So that of several collector replicas on one store, one does a job for all.
    pub async fn try_lease(&self, name: &str) -> Result<Option<Lease>> {
        match self {
            AnyStore::Sqlite(_) => Ok(Some(Lease { connection: None })),
            AnyStore::Postgres(s) => Ok(s.try_lease(name).await?.map(|c| Lease { connection: Some(c) })),
        }
    }

    /// The time of the newest stored event (`None`: no events).
    pub async fn newest_event_time(&self) -> Result<Option<DateTime<Utc>>> {
        let newest = dispatch!(self, s => s.newest_time().await)?;
        Ok(newest.and_then(DateTime::from_timestamp_micros))
    }

    /// Retention: deletes the events older than `older_than` (the clock now minus the
    /// retention) while keeping the rest verifiable; [`AnyStore::prune_as_of`] with this
    /// machine's clock, which says how far the clock is trusted.
    pub async fn prune(&self, older_than: DateTime<Utc>) -> Result<PruneReport> {
        self.prune_as_of(older_than, Utc::now()).await
    }

    /// Retention with the clock reading `now` (`older_than` is `now` minus the retention).
    ///
    /// The age of an event is measured from the newest stored event when that is older than
    /// `now`: the cutoff is `older_than` moved back by as much as the newest event is behind
    /// `now` (`min(now, newest) - retention`). A clock that jumped ahead by more than the
    /// retention would otherwise delete the whole trail; the price is that a store receiving
    /// no events keeps the retention's worth before its newest event until events come again.
    ///
    /// Only a prefix of the chain is deleted: the events up to the last seq before the first
    /// event at or after the cutoff (an old event ingested late stays until everything
    /// chained before it is old too). The pruned part is verified first
    /// ([`Error::ChainBroken`] if it does not verify: pruning would destroy the evidence);
    /// then its last link becomes the anchor that [`AnyStore::verify`] starts from. Ingest
    /// then refuses as expired ([`IngestOutcome::expired`]) the events older than the cutoff,
    /// but never one after the newest event deleted: nothing after it was deleted, and a
    /// cutoff ahead of the real time would drop every new event.
    pub async fn prune_as_of(&self, older_than: DateTime<Utc>, now: DateTime<Utc>) -> Result<PruneReport> {
        self.prune_measured(older_than, now, None).await.map(|(report, _)| report)
    }

    /// [`Self::prune_as_of`], the age measured from the later of the newest stored event and
    /// `vouched` (a time the caller vouches for without the wall clock: the time this returned
    /// at an earlier run plus what its monotonic clock counted since), never later than
    /// `now`. So retention stays a maximum while no events arrive, as long as the caller runs,
    /// and a clock that jumps ahead meanwhile still cannot delete the trail. Returns the time
    /// the age was measured from.
    pub async fn prune_measured(
        &self,
        older_than: DateTime<Utc>,
        now: DateTime<Utc>,
        vouched: Option<DateTime<Utc>>,
    ) -> Result<(PruneReport, DateTime<Utc>)> {
        let newest = dispatch!(self, s => s.newest_time().await)?;
        let trusted = newest.max(vouched.map(|v| v.timestamp_micros()));
        let now_us = now.timestamp_micros();
        let base = trusted.map_or(now_us, |t| t.min(now_us));
        let measured_from = DateTime::from_timestamp_micros(base).unwrap_or(now);
        let report = self.prune_from(older_than, now_us, base).await?;
        Ok((report, measured_from))
    }

    /// Prunes with the age measured from `base` (µs; `older_than` is `now_us` minus the
    /// retention).
    async fn prune_from(&self, older_than: DateTime<Utc>, now_us: i64, base: i64) -> Result<PruneReport> {
        let cutoff = retention_cutoff(older_than.timestamp_micros(), now_us, Some(base));
        let (head, anchor) = dispatch!(self, s => s.head_and_anchor().await)?;
        let target = dispatch!(self, s => s.prune_target(cutoff).await)?.unwrap_or(head.seq);
        if target <= anchor.seq {
            return Ok(PruneReport { deleted: 0, anchor: to_head(&anchor) });
        }
        let (_, broken, last, pruned_newest) = self.walk(anchor.clone(), target).await?;
        let broken = broken.or_else(|| {
            (last.seq != target).then(|| BrokenLink {
                seq: u64::try_from(last.seq + 1).unwrap_or(0),
                event_id: None,
                kind: BreakKind::Deleted,
                detail: format!("rows {}..={} are missing", last.seq + 1, target),
            })
        });
        if let Some(b) = broken {
            // Another process pruned while this one walked (two collector replicas on one
            // PostgreSQL store): the rows it deleted are not a break.
            if let Some(moved) = self.moved_anchor(&anchor).await? {
                return Ok(PruneReport { deleted: 0, anchor: to_head(&moved) });
            }
            return Err(Error::ChainBroken(b));
        }
        // Every deleted event is older than `pruned_newest`'s successor: from there on, nothing
        // was deleted, so nothing needs to be refused.
        let pruned_before = pruned_newest.map_or(cutoff, |t| cutoff.min(t.saturating_add(1)));
        match dispatch!(self, s => s.prune_to(&anchor, &last, cutoff, pruned_before).await) {
            Ok(deleted) => Ok(PruneReport { deleted, anchor: to_head(&last) }),
            Err(e) => match self.moved_anchor(&anchor).await? {
                Some(moved) => Ok(PruneReport { deleted: 0, anchor: to_head(&moved) }),
                None => Err(e),
            },
        }
    }

    /// The retention anchor now, when it is no longer `anchor`: another process pruned.
    async fn moved_anchor(&self, anchor: &Link) -> Result<Option<Link>> {
        let (_, now) = dispatch!(self, s => s.head_and_anchor().await)?;
        Ok((now != *anchor).then_some(now))
    }

    /// Stores alerts, idempotently by id; returns how many were new.
    pub async fn insert_alerts(&self, alerts: &[Alert]) -> Result<u64> {
        let mut rows = Vec::with_capacity(alerts.len());
        for (index, a) in alerts.iter().enumerate() {
            let invalid = |reason: &str| Error::InvalidAlert { index, reason: reason.to_owned() };
            if a.id.is_empty() {
                return Err(invalid("id is empty"));
            }
            let time_us = chain::parse_time_us(&a.time).ok_or_else(|| invalid("time is not RFC 3339"))?;
            let body = serde_json::to_string(a).map_err(|_| invalid("not serialisable"))?;
            rows.push((a.id.clone(), time_us, body));
        }
        if rows.is_empty() {
            return Ok(0);
        }
        dispatch!(self, s => s.insert_alerts(rows).await)
    }

    /// Alerts raised at or after `since`, newest first, at most `limit` (0:
    /// [`DEFAULT_LIMIT`]).
    pub async fn alerts(&self, since: Option<DateTime<Utc>>, limit: u32) -> Result<Vec<Alert>> {
        let since = since.map_or(i64::MIN, |t| t.timestamp_micros());
        let limit = effective_limit(limit);
        let bodies = dispatch!(self, s => s.alerts(since, limit).await)?;
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str(b).map_err(|_| Error::Corrupt("a stored alert does not parse".into()))
            })
            .collect()
    }
}

/// The cutoff of a retention run, in µs: `older_than` as of the clock reading `now`, moved
/// back by as much as the newest stored event (`newest`, none in an empty store) is behind
/// `now`, so that the age of events is never measured from a time the events do not reach.
fn retention_cutoff(older_than: i64, now: i64, newest: Option<i64>) -> i64 {
    let lag = newest.map_or(0, |n| now.saturating_sub(n).max(0));
    older_than.saturating_sub(lag)
}

fn to_head(l: &Link) -> ChainHead {
    ChainHead { seq: u64::try_from(l.seq).unwrap_or(0), hash: l.hash.clone() }
}
