//! Custos sidecar: audit event batching to the collector, with a checksummed disk spool while it
//! is unreachable.
//!
//! The request path calls [`Shipper::emit`], which never blocks: it puts the event in a bounded
//! in-memory queue (`try_send`). A background task batches events (up to
//! [`ShipperConfig::batch_max_events`] or [`ShipperConfig::batch_max_bytes`], or whatever arrived within
//! [`ShipperConfig::flush_interval`]) and posts each batch as NDJSON to the collector's
//! `POST /v1/events` with `Authorization: Bearer <token>`. The task is woken every few dozen
//! queued events and on its flush tick, never per event: the request path pays no
//! cross-thread wake-up.
//!
//! # Delivery guarantee
//!
//! Every emitted event is either stored exactly once by the collector, or counted in
//! `custos_audit_events_dropped_total{reason}` (see [`ShipperMetrics`] and [`DropReason`]).
//! Exactly-once is at-least-once delivery plus the collector's idempotency by event id: a batch
//! is forgotten only after a 200 carrying a valid [`IngestResponse`](custos_api::collector::IngestResponse)
//! (sent by the collector after a durable commit); any doubt (connection reset, time-out, 5xx,
//! 429, 401, malformed answer) means the batch is kept and resent, and a batch the collector had
//! committed before its answer was lost comes back as duplicates, which it does not store again
//! (counted in `custos_audit_events_duplicate_total`).
//!
//! A batch that could not be delivered is written to the disk spool and delivered from there in
//! FIFO order, with capped exponential back-off and jitter between failed attempts. At most one
//! request is in flight; batches completed meanwhile wait in memory (up to
//! [`ShipperConfig::max_waiting_batches`]) and are sent next, in order. A batch completed while
//! that room is full, while the spool is not empty or while the collector is failing is spooled,
//! and when a delivery fails the batches waiting in memory are spooled behind it, so nothing
//! overtakes the backlog (ordering is best-effort: a failed direct batch is spooled behind those
//! spooled during its attempt). The spool
//! survives restarts; records torn by a crash or failing their checksum are counted as dropped
//! (`corrupt`), every fully written record is delivered. Place the spool directory on a volume
//! that outlives the container (an `emptyDir` outlives container restarts, not the pod): events
//! still spooled when the pod is deleted are reported by [`Shipper::shutdown`] and logged.
//!
//! # The spool
//!
//! A directory of segment files (`segment-<id>.log`, a new one every
//! [`ShipperConfig::spool_segment_bytes`] and at every start) holding records
//! `[magic "\xC5CS"][version u8][payload length u32][event count u32][CRC-32 u32][NDJSON payload]`
//! (little-endian; the CRC covers length, count and payload), each written and fsync'd before the
//! batch counts as spooled, plus an `ack` file with the position of the oldest unacknowledged
//! record. Records are removed only after the collector's 200 (or a 4xx rejection); segments are
//! deleted once every record in them is. On start, every pending record is verified: damaged ones
//! are skipped (resynchronising on the next valid record) and a torn last record is truncated;
//! both are counted as dropped (`corrupt`). Spool depth gauges are restored from disk.
//!
//! # Losses, all counted
//!
//! - `queue_full`: the in-memory queue was full, by count ([`ShipperConfig::queue_capacity`]) or by
//!   the estimated memory of its events ([`ShipperConfig::queue_max_bytes`], reached by events
//!   carrying many record hashes). The request path never waits and never writes to disk itself;
//!   size [`ShipperConfig::queue_capacity`] for the burst rate times the time a spool write takes.
//! - `spool_full`: a batch could not be delivered and the spool had reached
//!   [`ShipperConfig::spool_max_bytes`]; `spool_error`: writing it failed.
//! - `rejected`: the collector answered 400 (`empty_batch`, `bad_encoding`, or an unknown
//!   reason), 410, 422 or another 4xx about the batch: it is malformed for it and resending
//!   cannot help. 401 is retried: the token file may be rotated. A 400 `bad_event` naming the
//!   event (`line` or `index`, as the collector answers) drops that event and queues the rest of
//!   the batch as one; one that does not say, and 413, split the batch in two and queue both
//!   halves, so that only the event refused is dropped (a single event refused is `rejected`).
//!   403 (`wrong_namespace` too: every event of a sidecar has its one namespace, so the token is
//!   for another; only an event recorded before the sidecar knew its namespace, with none, is
//!   dropped alone), 404, 405, 415, 421, 400 `unsupported_schema_version` and a 400 `bad_event`
//!   with `clockAhead` (an event dated more than 10 minutes ahead of the collector's clock:
//!   this node's clock ran ahead) say nothing against the batch (a wrong URL, an authorisation
//!   layer in front, a collector older than the sidecar during a rollout, clocks that
//!   disagree): the events stay spooled and are retried (batches refused for `wrong_namespace`
//!   or `clockAhead` behind the others, which may pass meanwhile)
//!   (`custos_audit_batches_sent_total{result="refused"}`), as while the collector is down.
//! - `corrupt`: damaged spool records. `shutdown`: emitted after [`Shipper::shutdown`].
//! - `unacknowledged`: a collector (or something in front of it) answered 200 with counts
//!   that cover fewer events than the batch held. The batch is sent again (the collector stores
//!   each event id once, so what it had stored comes back as duplicates and what it lacked is
//!   stored), so that it is sent at most [`MAX_SHORT_ACKS`] times in all
//!   (`custos_audit_batches_sent_total{result="short_ack"}` for each resend); after the last
//!   short acknowledgement the shortfall is counted here and the batch forgotten.
//!
//! # A process killed outright
//!
//! A stop with SIGTERM (a rollout, a scale-down, a pod eviction) flushes or spools everything
//! ([`Shipper::shutdown`]). A process killed without it (SIGKILL, the OOM killer, a failed
//! liveness probe past its grace period) loses what was only in memory, uncounted: the events
//! queued and not yet batched (at most [`ShipperConfig::queue_capacity`] and
//! [`ShipperConfig::queue_max_bytes`], in practice about one [`ShipperConfig::flush_interval`]
//! of traffic), the batch being built, the batch in flight and up to
//! [`ShipperConfig::max_waiting_batches`] waiting behind it. Spooled records
//! survive (each is synced before it counts as spooled). Such kills are visible as container
//! restarts with a `Error`/`OOMKilled` reason; the operations guide has the alert.
//!
//! # Without a collector
//!
//! When [`ShipperConfig::collector`] is `None` (log-only mode), events are counted in
//! `custos_audit_events_emitted_total`, logged at debug level (target `custos_audit`) and
//! discarded: nothing is queued, spooled or counted as dropped, since there is nowhere to deliver
//! to by configuration.
//!
//! # TLS
//!
//! Plain `http://` needs no TLS. For `https://`, the rustls ring provider is installed as the
//! process default (unless another one is) and the collector's certificate is verified against
//! the platform's trust store.
#![forbid(unsafe_code)]

mod metrics;
mod queue;
mod spool;
mod transport;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use custos_api::AuditEvent;
use tokio::sync::oneshot;

/// How many times in all a batch is sent while the collector acknowledges fewer of its events
/// than it held (so `MAX_SHORT_ACKS - 1` resends), before the shortfall is counted as dropped
/// (`unacknowledged`).
pub const MAX_SHORT_ACKS: u32 = 3;

pub use metrics::{BatchResult, DropReason, ShipperMetrics};
pub use transport::UsageClient;

/// Errors of the shipper and the usage client. They never contain token contents or response
/// bodies.
#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    /// The collector URL cannot be used.
    #[error("invalid collector URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid shipper configuration: {0}")]
    Config(String),
    /// The spool directory cannot be opened or recovered.
    #[error("cannot open the audit spool in {path}: {source}")]
    Spool {
        /// The spool directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file cannot be read.
    #[error("cannot read the collector token file {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file's content cannot be used as a bearer token.
    #[error("the collector token file {path} {reason}")]
    InvalidToken {
        /// The token file.
        path: PathBuf,
        /// What is wrong (never the content).
        reason: &'static str,
    },
    /// The HTTP client cannot be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// [`Shipper::start`] was called outside a Tokio runtime.
    #[error("the audit shipper must be started within a Tokio runtime")]
    NoRuntime,
    /// The collector did not answer within the time-out.
    #[error("the collector did not answer in time")]
    Timeout,
    /// The request failed below HTTP (connection refused or reset, DNS, TLS).
    #[error("request to the collector failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// The collector refused the token (401).
    #[error("the collector refused the token (HTTP 401)")]
    Unauthorized,
    /// The collector answered another unexpected status.
    #[error("the collector answered HTTP {0}")]
    Status(u16),
    /// The collector's 200 answer is not what the contract says.
    #[error("the collector's answer is malformed: {0}")]
    MalformedResponse(String),
}

/// Configuration of the [`Shipper`].
#[derive(Clone, Debug, PartialEq)]
pub struct ShipperConfig {
    /// Base URL of the collector, e.g. `http://custos-collector.custos-system:8080`. `None`:
    /// log-only mode (events counted and discarded, see the crate docs).
    pub collector: Option<String>,
    /// File holding the bearer token (e.g. a projected service account token); re-read whenever
    /// it changes and after a 401. `None`: no `Authorization` header.
    pub token_file: Option<PathBuf>,
    /// Directory of the disk spool; created if missing.
    pub spool_dir: PathBuf,
    /// Bound on the disk used by the spool (default 64 MiB).
    pub spool_max_bytes: u64,
    /// Size at which a spool segment file is closed and a new one started (default 8 MiB).
    /// Acknowledged records are reclaimed a segment at a time, so keep it well below
    /// `spool_max_bytes`.
    pub spool_segment_bytes: u64,
    /// Most events in one batch (default 1000).
    pub batch_max_events: usize,
    /// A batch is closed once its NDJSON payload reaches this many bytes (default 4 MiB; the
    /// event that crosses it is in it), so that events carrying many record hashes do not make
    /// batches larger than the collector takes (16 MiB).
    pub batch_max_bytes: usize,
    /// A batch that is not full is sent this long after the previous flush (default 1 s).
    pub flush_interval: Duration,
    /// Capacity of the in-memory queue between [`Shipper::emit`] and the shipper (default 10 000).
    pub queue_capacity: usize,
    /// Bound on the memory the queued events hold, as estimated when each is emitted (about
    /// 1 KiB plus its variable strings, and 88 bytes per record hash); default 32 MiB. The
    /// count alone does not bound memory: an event may carry up to 10 000 record hashes
    /// (about 880 KB), and 10 000 of them queued while the spool or the collector lags would
    /// take gigabytes, far beyond the sidecar container's memory limit. 10 000 events without
    /// record hashes take about 10 MiB, so in ordinary traffic the count binds first. An event
    /// that would take the queue past it is dropped and counted as `queue_full`.
    pub queue_max_bytes: usize,
    /// Time-out of one request to the collector, connection included (default 5 s). When the
    /// collector accepted the connection but answered none of two sends in a row within it (a
    /// database slow to commit), a batch of more than 64 events is split in two before the
    /// next send, so that smaller batches pass instead of the same one being sent for ever.
    pub request_timeout: Duration,
    /// First wait before retrying after a failed delivery (default 500 ms); doubled after each
    /// further failure up to `retry_max_backoff`, reset by a success.
    pub retry_initial_backoff: Duration,
    /// Longest wait between retries (default 30 s).
    pub retry_max_backoff: Duration,
    /// Fraction (0 to 1) of each back-off that is randomly taken off, so that sidecars do not
    /// retry in lockstep (default 0.2). 0 makes back-off deterministic.
    pub retry_jitter: f64,
    /// Compress request bodies with gzip (default true).
    pub gzip: bool,
    /// Full batches kept in memory while another is being delivered (default 8): at high
    /// event rates batches complete faster than one delivery takes, and without this room each
    /// of them would go through the spool (a write, an fsync and a read back) although the
    /// collector is up. 0: every such batch is spooled.
    pub max_waiting_batches: usize,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            collector: None,
            token_file: None,
            spool_dir: PathBuf::from("/var/lib/custos/spool"),
            spool_max_bytes: 64 << 20,
            spool_segment_bytes: 8 << 20,
            batch_max_events: 1000,
            batch_max_bytes: 4 << 20,
            flush_interval: Duration::from_secs(1),
            queue_capacity: 10_000,
            queue_max_bytes: 32 << 20,
            request_timeout: Duration::from_secs(5),
            retry_initial_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(30),
            retry_jitter: 0.2,
            gzip: true,
            max_waiting_batches: 8,
        }
    }
}

impl ShipperConfig {
    /// The defaults, with the given collector and spool directory.
    pub fn new(collector: Option<String>, spool_dir: PathBuf) -> Self {
        ShipperConfig { collector, spool_dir, ..ShipperConfig::default() }
    }

    /// Checks that every value is usable.
    pub fn validate(&self) -> Result<(), ShipperError> {
        let fail = |what: &str| Err(ShipperError::Config(what.to_string()));
        if self.batch_max_events == 0 || self.batch_max_events > u32::MAX as usize {
            return fail("batch_max_events must be between 1 and 2^32-1");
        }
        if self.batch_max_bytes == 0 {
            return fail("batch_max_bytes must be at least 1");
        }
        if self.queue_capacity == 0 {
            return fail("queue_capacity must be at least 1");
        }
        if self.queue_max_bytes < QUEUED_EVENT_BASE_BYTES {
            return fail("queue_max_bytes must be at least 1024 (one event without record hashes)");
        }
        if self.flush_interval.is_zero() || self.request_timeout.is_zero() {
            return fail("flush_interval and request_timeout must be positive");
        }
        if self.retry_initial_backoff.is_zero() || self.retry_initial_backoff > self.retry_max_backoff {
            return fail("retry_initial_backoff must be positive and at most retry_max_backoff");
        }
        if !(0.0..=1.0).contains(&self.retry_jitter) {
            return fail("retry_jitter must be between 0 and 1");
        }
        if self.spool_max_bytes == 0 || self.spool_segment_bytes == 0 {
            return fail("spool_max_bytes and spool_segment_bytes must be positive");
        }
        Ok(())
    }
}

/// The fixed part of [`queued_bytes`]: the `AuditEvent` itself (about 500 bytes) and the heap
/// blocks of its short strings (id, time, namespace, method...), with the allocator's rounding.
const QUEUED_EVENT_BASE_BYTES: usize = 1024;

/// [`queued_bytes`] per record hash: a `String` (24 bytes) and its 64 hex digits.
const QUEUED_RECORD_HASH_BYTES: usize = 88;

/// [`queued_bytes`] per `also_applied`, `dry_runs` or `masked` entry or user attribute, besides
/// the lengths of its strings: the entry itself and its heap blocks.
const QUEUED_ENTRY_BYTES: usize = 128;

/// An estimate of the memory `event` holds while queued, charged against
/// [`ShipperConfig::queue_max_bytes`]. Cheap, as it runs on the request path: no serialisation,
/// record hashes counted at a fixed size, and the lengths of the strings that can be long (the
/// short fixed ones are in the base). `also_applied` and `dry_runs` have at most 64 entries each.
fn queued_bytes(event: &AuditEvent) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let mut bytes = QUEUED_EVENT_BASE_BYTES
        .saturating_add(event.record_hashes.len().saturating_mul(QUEUED_RECORD_HASH_BYTES))
        .saturating_add(event.path.len())
        .saturating_add(event.reason.len())
        .saturating_add(event.principal.len())
        .saturating_add(opt(&event.policy))
        .saturating_add(opt(&event.rule))
        .saturating_add(opt(&event.pod));
    if let Some(user) = &event.user {
        bytes = bytes.saturating_add(user.id.len());
        for (name, value) in &user.attributes {
            bytes = bytes.saturating_add(QUEUED_ENTRY_BYTES + name.len() + value.len());
        }
    }
    bytes = bytes.saturating_add(event.masked.len().saturating_mul(QUEUED_ENTRY_BYTES));
    for applied in &event.also_applied {
        bytes = bytes.saturating_add(
            QUEUED_ENTRY_BYTES + applied.policy.len() + applied.rule.len() + opt(&applied.principal),
        );
    }
    for dry_run in &event.dry_runs {
        bytes = bytes.saturating_add(
            QUEUED_ENTRY_BYTES
                + dry_run.policy.len()
                + opt(&dry_run.rule)
                + opt(&dry_run.principal)
                + dry_run.reason.len(),
        );
    }
    bytes
}

/// What [`Shipper::shutdown`] achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Events acknowledged by the collector during shutdown.
    pub delivered: u64,
    /// Events dropped during shutdown (e.g. the spool was full).
    pub dropped: u64,
    /// Events left in the spool (delivered by the next start on the same spool directory).
    pub spooled_events: u64,
    /// Records left in the spool.
    pub spooled_records: u64,
    /// The collector did not answer within the deadline; what could not be sent was spooled.
    pub deadline_exceeded: bool,
}

pub(crate) struct ShutdownRequest {
    pub(crate) deadline: Duration,
    pub(crate) reply: oneshot::Sender<ShutdownReport>,
}

struct Inner {
    /// `None` in log-only mode.
    tx: Option<queue::QueueSender<AuditEvent>>,
    shutdown: Mutex<Option<oneshot::Sender<ShutdownRequest>>>,
    metrics: ShipperMetrics,
}

/// Handle to the audit shipper; cheap to clone. The background task stops at
/// [`Shipper::shutdown`], or when every handle is dropped (then flushing within the request
/// time-out).
#[derive(Clone)]
pub struct Shipper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("log_only", &self.inner.tx.is_none()).finish_non_exhaustive()
    }
}

impl Shipper {
    /// Opens and recovers the spool, then starts the background task (which immediately begins
    /// delivering what the spool holds). Must be called within a Tokio runtime. The returned
    /// task ends after [`Shipper::shutdown`].
    pub fn start(
        config: ShipperConfig,
        metrics: ShipperMetrics,
    ) -> Result<(Shipper, tokio::task::JoinHandle<()>), ShipperError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ShipperError::NoRuntime)?;
        let Some(collector) = config.collector.clone() else {
            tracing::warn!("no collector configured: audit events are counted and discarded");
            let inner = Inner { tx: None, shutdown: Mutex::new(None), metrics };
            return Ok((Shipper { inner: Arc::new(inner) }, runtime.spawn(async {})));
        };
        let transport = transport::Transport::new(
            &collector,
            config.token_file.clone(),
            config.request_timeout,
            config.gzip,
        )?;
        let (spool, recovery) = spool::Spool::open(
            &config.spool_dir,
            config.spool_max_bytes,
            config.spool_segment_bytes,
            metrics.clone(),
        )
        .map_err(|source| ShipperError::Spool { path: config.spool_dir.clone(), source })?;
        if recovery.records > 0 || recovery.corrupt_records > 0 {
            tracing::info!(
                records = recovery.records,
                events = recovery.events,
                corrupt_records = recovery.corrupt_records,
                corrupt_events = recovery.corrupt_events,
                "audit spool recovered"
            );
        }
        let wake_at = queue::wake_threshold(config.batch_max_events, config.queue_capacity);
        let (tx, rx) = queue::channel(config.queue_capacity, config.queue_max_bytes, wake_at);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let worker = worker::Worker::new(&config, rx, shutdown_rx, transport, spool, metrics.clone());
        let handle = runtime.spawn(worker.run());
        let inner = Inner { tx: Some(tx), shutdown: Mutex::new(Some(shutdown_tx)), metrics };
        Ok((Shipper { inner: Arc::new(inner) }, handle))
    }

    /// Hands one event to the shipper. Never blocks and never awaits: counter increments, an
    /// estimate of the event's memory (a few lengths, no serialisation) and a `try_send` (an
    /// atomic add against the byte bound; waking the background task only every few dozen
    /// events). When the queue is full (by count, or by [`ShipperConfig::queue_max_bytes`]) the
    /// event is dropped and counted (`queue_full`); after shutdown it is counted as `shutdown`.
    pub fn emit(&self, event: AuditEvent) {
        let metrics = &self.inner.metrics;
        metrics.emitted();
        let Some(tx) = &self.inner.tx else {
            // Codes and counts only: the event's path, principal and user attributes stay out of
            // the logs, as they do everywhere else.
            tracing::debug!(
                target: "custos_audit",
                id = %event.id,
                policy = event.policy.as_deref().unwrap_or(""),
                rule = event.rule.as_deref().unwrap_or(""),
                decision = event.decision.as_str(),
                reason = %event.reason,
                status = event.status,
                records_returned = event.records_returned,
                "audit event (no collector configured)"
            );
            return;
        };
        let bytes = queued_bytes(&event);
        match tx.try_send(event, bytes) {
            Ok(()) => {}
            Err(queue::Refused::Full) => {
                let total = metrics.dropped(DropReason::QueueFull, 1);
                if total.is_power_of_two() {
                    tracing::warn!(dropped_total = total, "audit queue full: event dropped");
                }
            }
            Err(queue::Refused::Closed) => {
                let total = metrics.dropped(DropReason::Shutdown, 1);
                if total.is_power_of_two() {
                    tracing::warn!(dropped_total = total, "audit shipper stopped: event dropped");
                }
            }
        }
    }

    /// Stops the shipper: the queued events are sent to the collector or, failing that, written
    /// to the spool, and the spool is drained while the collector answers, all within `deadline`
    /// (in-flight requests are abandoned at the deadline; their batches were spooled first or are
    /// spooled then). Events emitted afterwards through other handles are counted as dropped
    /// (`shutdown`). A second call returns an empty report.
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        let sender = self.inner.shutdown.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(sender) = sender else { return ShutdownReport::default() };
        let (reply, answer) = oneshot::channel();
        if sender.send(ShutdownRequest { deadline, reply }).is_err() {
            return ShutdownReport::default();
        }
        match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(report)) => report,
            Ok(Err(_)) => ShutdownReport::default(),
            Err(_) => ShutdownReport { deadline_exceeded: true, ..ShutdownReport::default() },
        }
    }

    /// The metrics this shipper updates.
    pub fn metrics(&self) -> &ShipperMetrics {
        &self.inner.metrics
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use custos_api::audit::{AppliedRule, AuditUser, DryRun};
    use custos_api::policy::Mode;
    use custos_api::{AuditEvent, Decision};

    use super::*;

    /// An event as the proxy emits for most requests: no record hashes.
    fn small_event(i: usize) -> AuditEvent {
        AuditEvent {
            schema_version: custos_api::audit::AUDIT_SCHEMA_VERSION,
            id: format!("01TESTEVENT{i:015}"),
            time: "2025-01-01T00:00:00.000000Z".to_string(),
            cluster: Some("prod-eu-1".to_string()),
            namespace: "shop".to_string(),
            policy: Some("customers".to_string()),
            rule: Some("branch-staff-read".to_string()),
            mode: Mode::Enforce,
            pod: Some("api-7d9f8c6b5-x2x4q".to_string()),
            caller: None,
            user: Some(AuditUser {
                id: "alice".to_string(),
                attributes: BTreeMap::from([("branch".to_string(), "north".to_string())]),
            }),
            principal: "user:alice".to_string(),
            rule_principal: None,
            method: "GET".to_string(),
            path: "/customers/{id}".to_string(),
            decision: Decision::Allow,
            reason: "rule branch-staff-read allows".to_string(),
            status: 200,
            records_returned: 1,
            records_filtered: 0,
            records_truncated: 0,
            masked: BTreeMap::from([("pii".to_string(), 2)]),
            bytes: 100,
            latency_us: 10,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".to_string()),
            record_hashes: Vec::new(),
            also_applied: Vec::new(),
            dry_runs: Vec::new(),
            prev_hash: None,
        }
    }

    /// An event for a bulk read: 10 000 record hashes (64 hex digits each).
    fn large_event(i: usize) -> AuditEvent {
        AuditEvent { record_hashes: vec!["ab".repeat(32); 10_000], ..small_event(i) }
    }

    #[test]
    fn the_estimate_counts_record_hashes_and_variable_parts() {
        let small = queued_bytes(&small_event(0));
        assert!((QUEUED_EVENT_BASE_BYTES..2 * QUEUED_EVENT_BASE_BYTES).contains(&small), "{small}");
        let large = queued_bytes(&large_event(0));
        assert_eq!(large, small + 10_000 * QUEUED_RECORD_HASH_BYTES);
        // The in-memory size of a record hash, which the estimate takes as fixed.
        assert!(QUEUED_RECORD_HASH_BYTES >= size_of::<String>() + 64);
        let long_path = AuditEvent { path: "/x".repeat(4000), ..small_event(0) };
        assert_eq!(queued_bytes(&long_path), small + 8000 - "/customers/{id}".len());
        let applied = AppliedRule { policy: "p".repeat(10), rule: "r".repeat(10), principal: None };
        let dry_run = DryRun {
            policy: "q".repeat(10),
            rule: None,
            principal: Some("user:bob".to_string()),
            decision: Decision::WouldDeny,
            reason: "quota_exceeded".to_string(),
            charged: false,
            transform: None,
        };
        let both = AuditEvent { also_applied: vec![applied], dry_runs: vec![dry_run], ..small_event(0) };
        assert_eq!(queued_bytes(&both), small + 2 * QUEUED_ENTRY_BYTES + 20 + 10 + 8 + 14);
    }

    #[test]
    fn queue_max_bytes_below_one_event_is_refused() {
        let config = ShipperConfig { queue_max_bytes: 1023, ..ShipperConfig::default() };
        assert!(matches!(config.validate(), Err(ShipperError::Config(_))));
        let config = ShipperConfig { queue_max_bytes: 1024, ..ShipperConfig::default() };
        config.validate().unwrap();
    }

    /// A shipper whose worker cannot run until the test awaits (current-thread runtime), so
    /// that nothing is taken out of the queue during a synchronous burst of `emit`s.
    fn start(config: ShipperConfig) -> (Shipper, tokio::task::JoinHandle<()>) {
        Shipper::start(config, ShipperMetrics::new()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn emit_drops_large_events_past_the_byte_bound_as_queue_full_but_not_small_ones() {
        let spool = tempfile::tempdir().unwrap();
        // Nothing listens on port 1: whatever is queued ends in the spool at shutdown.
        let config = ShipperConfig {
            // Small, so that shutting down does not write tens of megabytes.
            spool_max_bytes: 1 << 20,
            spool_segment_bytes: 64 << 10,
            ..ShipperConfig::new(Some("http://127.0.0.1:1".to_string()), spool.path().join("a"))
        };
        assert_eq!(config.queue_max_bytes, 32 << 20);

        // 40 events of 10 000 record hashes (about 35 MB) against the default 32 MiB.
        let (shipper, _task) = start(config.clone());
        let large = large_event(0);
        let fit = (32 << 20) / queued_bytes(&large);
        assert_eq!(fit, 38);
        for _ in 0..40 {
            shipper.emit(large.clone());
        }
        let metrics = shipper.metrics().clone();
        assert_eq!(metrics.events_emitted(), 40);
        assert_eq!(metrics.events_dropped(DropReason::QueueFull), 40 - fit as u64);
        drop(large);
        shipper.shutdown(Duration::from_millis(200)).await;

        // A queue's worth of events without record hashes is not refused by the byte bound.
        let config = ShipperConfig { spool_dir: spool.path().join("b"), ..config };
        let (shipper, _task) = start(config);
        for i in 0..10_000 {
            shipper.emit(small_event(i));
        }
        let metrics = shipper.metrics().clone();
        assert_eq!(metrics.events_dropped(DropReason::QueueFull), 0);
        // The count binds first.
        shipper.emit(small_event(10_000));
        assert_eq!(metrics.events_dropped(DropReason::QueueFull), 1);
        shipper.shutdown(Duration::from_millis(200)).await;
    }
}
