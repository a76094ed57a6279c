//! The shipper against a real collector stand-in on 127.0.0.1: delivery, spooling while the
//! collector is down or misbehaving, restarts, damage on disk, limits, tokens, shutdown, and the
//! usage client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custos_api::collector::{EVENTS_PATH, IngestResponse, RuleUsage, USAGE_PATH, UsageResponse};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_shipper::{
    BatchResult, DropReason, Shipper, ShipperConfig, ShipperError, ShipperMetrics, UsageClient,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// The collector stand-in.

/// How the stand-in answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Store the events, answer 200 with an `IngestResponse`.
    Normal,
    /// Answer this status without storing.
    Status(u16),
    /// Answer this status with a contract error body of this `reason`, without storing.
    Reason(u16, &'static str),
    /// As `Normal`, but a batch holding the event of this index is refused whole with 400
    /// `bad_event`, saying not which (a collector before the pointer).
    BadEvent(usize),
    /// As `BadEvent`, with the refused event's `line`, as the collector answers.
    BadEventAt(usize),
    /// As `BadEventAt`, the event dated ahead of the collector's clock (`clockAhead`).
    ClockAhead(usize),
    /// As `Normal`, but a batch holding the event of this index is refused whole with 403
    /// `wrong_namespace`, as the collector does for an event of another namespace than a
    /// namespace token's.
    WrongNamespace(usize),
    /// As `Normal`, but a batch of more than this many events is refused with 413.
    TooLargeAbove(usize),
    /// As `Normal`, but a batch of more than this many events is answered (503) only after
    /// this long: a collector slow to commit large batches.
    SlowAbove(usize, Duration),
    /// Store nothing and answer 200 with every count 0 (an acknowledgement that covers none of
    /// the batch's events).
    ShortAck,
    /// Never answer.
    Hang,
    /// Wait this long, then as `Normal`.
    Slow(Duration),
    /// Store the events, then close the connection without answering.
    CommitThenDrop,
    /// Answer 200 with a body that is not the contract's.
    Malformed,
    /// Answer 200 with a 2 MiB body (whitespace around the contract's answer).
    Huge,
    /// Acknowledge the batch without storing it, every event `expired` (older than what the
    /// collector's retention already deleted).
    Expired,
}

#[derive(Default)]
struct State {
    /// Event id → number of times it was stored (must stay 1).
    stored: HashMap<String, u32>,
    behaviour: Option<Behaviour>,
    /// Behaviours for the next requests, before `behaviour` applies again.
    next: Vec<Behaviour>,
    expected_token: Option<String>,
    /// `Authorization` header of every request, in order.
    tokens: Vec<Option<String>>,
    event_requests: usize,
    /// The first event id of every batch stored, in the order the batches arrived.
    batch_heads: Vec<String>,
    /// The (decoded) payload size of every batch stored, in the same order.
    batch_bytes: Vec<usize>,
    usage_queries: Vec<String>,
    usage: Option<UsageResponse>,
    /// Answer 400 to `instance`, as collectors before that parameter do.
    refuse_instance: bool,
}

struct Collector {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        Collector::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(addr: SocketAddr) -> Collector {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State { behaviour: Some(Behaviour::Normal), ..State::default() }));
        let shared = Arc::clone(&state);
        let server = tokio::spawn(async move {
            // Connection tasks live in the set: aborting the server closes them all.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Collector { addr, state, server }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = Some(behaviour);
    }

    fn then(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().next.push(behaviour);
    }

    fn stored(&self) -> usize {
        self.state.lock().unwrap().stored.len()
    }

    /// Every stored id was stored exactly once.
    fn assert_stored_once(&self, ids: &[String]) {
        let state = self.state.lock().unwrap();
        for id in ids {
            assert_eq!(state.stored.get(id), Some(&1), "event {id} stored once");
        }
        assert_eq!(state.stored.len(), ids.len(), "nothing else stored");
    }

    fn stop(self) {
        self.server.abort();
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: u16, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Answer, std::io::Error> {
    let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
    let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
    let (behaviour, authorised) = {
        let mut s = state.lock().unwrap();
        s.tokens.push(auth.clone());
        let behaviour =
            if s.next.is_empty() { s.behaviour.unwrap_or(Behaviour::Normal) } else { s.next.remove(0) };
        let authorised =
            s.expected_token.as_ref().is_none_or(|t| auth.as_deref() == Some(&format!("Bearer {t}")));
        (behaviour, authorised)
    };
    if !authorised {
        return Ok(answer(401, "unauthorised"));
    }
    match behaviour {
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(answer(500, ""));
        }
        Behaviour::Status(status) => return Ok(answer(status, "no")),
        Behaviour::Reason(status, reason) => {
            let body = serde_json::json!({"error": "refused", "reason": reason}).to_string();
            return Ok(answer(status, body));
        }
        Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
        Behaviour::Malformed => return Ok(answer(200, "{\"accepted\": \"many\"")),
        Behaviour::Huge => {
            let mut body = vec![b' '; 2 << 20];
            body.extend_from_slice(br#"{"accepted": 0, "duplicates": 0}"#);
            return Ok(answer(200, body));
        }
        Behaviour::Normal
        | Behaviour::CommitThenDrop
        | Behaviour::BadEvent(_)
        | Behaviour::BadEventAt(_)
        | Behaviour::ClockAhead(_)
        | Behaviour::WrongNamespace(_)
        | Behaviour::TooLargeAbove(_)
        | Behaviour::SlowAbove(..)
        | Behaviour::ShortAck
        | Behaviour::Expired => {}
    }
    match req.uri().path() {
        EVENTS_PATH => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let text = if gzip {
                let mut text = String::new();
                flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut text).unwrap();
                text
            } else {
                String::from_utf8(body.to_vec()).unwrap()
            };
            if let Behaviour::TooLargeAbove(n) = behaviour
                && text.lines().count() > n
            {
                return Ok(answer(413, String::new()));
            }
            if let Behaviour::SlowAbove(n, delay) = behaviour
                && text.lines().count() > n
            {
                tokio::time::sleep(delay).await;
                return Ok(answer(503, String::new()));
            }
            let refused = match behaviour {
                Behaviour::BadEvent(i) => Some((i, 400, "bad_event")),
                Behaviour::BadEventAt(i) | Behaviour::ClockAhead(i) => Some((i, 400, "bad_event")),
                Behaviour::WrongNamespace(i) => Some((i, 403, "wrong_namespace")),
                _ => None,
            };
            if let Some((i, status, reason)) = refused {
                let bad = event(i).id;
                if let Some(at) =
                    text.lines().position(|l| serde_json::from_str::<AuditEvent>(l).unwrap().id == bad)
                {
                    let mut body = serde_json::json!({"error": "refused", "reason": reason});
                    if matches!(
                        behaviour,
                        Behaviour::BadEventAt(_) | Behaviour::ClockAhead(_) | Behaviour::WrongNamespace(_)
                    ) {
                        body["line"] = serde_json::json!(at + 1);
                    }
                    if matches!(behaviour, Behaviour::ClockAhead(_)) {
                        body["clockAhead"] = serde_json::json!(true);
                    }
                    return Ok(answer(status, body.to_string()));
                }
            }
            if behaviour == Behaviour::ShortAck {
                return Ok(answer(200, serde_json::to_vec(&IngestResponse::default()).unwrap()));
            }
            if behaviour == Behaviour::Expired {
                let response =
                    IngestResponse { expired: text.lines().count() as u64, ..IngestResponse::default() };
                return Ok(answer(200, serde_json::to_vec(&response).unwrap()));
            }
            let mut response = IngestResponse::default();
            {
                let mut s = state.lock().unwrap();
                s.event_requests += 1;
                if let Some(first) = text.lines().next() {
                    let event: AuditEvent = serde_json::from_str(first).expect("each line is an AuditEvent");
                    s.batch_heads.push(event.id);
                    s.batch_bytes.push(text.len());
                }
                for line in text.lines() {
                    let event: AuditEvent = serde_json::from_str(line).expect("each line is an AuditEvent");
                    let count = s.stored.entry(event.id).or_insert(0);
                    if *count == 0 {
                        *count = 1;
                        response.accepted += 1;
                    } else {
                        response.duplicates += 1;
                    }
                }
            }
            if behaviour == Behaviour::CommitThenDrop {
                // Committed, but the answer is lost: hyper closes the connection.
                return Err(std::io::Error::other("answer lost"));
            }
            Ok(answer(200, serde_json::to_vec(&response).unwrap()))
        }
        USAGE_PATH => {
            let mut s = state.lock().unwrap();
            let query = req.uri().query().unwrap_or_default().to_string();
            s.usage_queries.push(query.clone());
            if s.refuse_instance && query.contains("instance=") {
                return Ok(answer(400, r#"{"error":"bad query","reason":"unknown_parameter"}"#));
            }
            Ok(answer(200, serde_json::to_vec(&s.usage.clone().unwrap_or_default()).unwrap()))
        }
        _ => Ok(answer(404, "")),
    }
}

/// An address where nothing listens (until a collector is started on it).
async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        schema_version: custos_api::audit::AUDIT_SCHEMA_VERSION,
        id: format!("01TESTEVENT{i:08}"),
        time: "2025-01-01T00:00:00Z".to_string(),
        cluster: None,
        namespace: "shop".to_string(),
        policy: Some("customers".to_string()),
        rule: None,
        mode: Mode::Enforce,
        pod: Some("api-0".to_string()),
        caller: None,
        user: None,
        principal: "workload:shop/api".to_string(),
        rule_principal: None,
        method: "GET".to_string(),
        path: "/customers/{id}".to_string(),
        decision: Decision::Allow,
        reason: "default allow".to_string(),
        status: 200,
        records_returned: 1,
        records_filtered: 0,
        records_truncated: 0,
        masked: BTreeMap::new(),
        bytes: 100,
        latency_us: 10,
        trace_id: None,
        record_hashes: Vec::new(),
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| event(i).id).collect()
}

fn config(collector: &str, spool: &Path) -> ShipperConfig {
    ShipperConfig {
        collector: Some(collector.to_string()),
        token_file: None,
        spool_dir: spool.to_path_buf(),
        spool_max_bytes: 1 << 20,
        spool_segment_bytes: 64 << 10,
        batch_max_events: 100,
        batch_max_bytes: 4 << 20,
        flush_interval: Duration::from_millis(20),
        queue_capacity: 10_000,
        queue_max_bytes: 32 << 20,
        request_timeout: Duration::from_millis(500),
        retry_initial_backoff: Duration::from_millis(10),
        retry_max_backoff: Duration::from_millis(50),
        retry_jitter: 0.0,
        gzip: true,
        max_waiting_batches: 4,
    }
}

/// Waits (bounded, as a safety net only) until `condition` holds.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn start(config: ShipperConfig) -> (Shipper, ShipperMetrics) {
    let metrics = ShipperMetrics::new();
    let (shipper, _task) = Shipper::start(config, metrics.clone()).unwrap();
    (shipper, metrics)
}

fn emit(shipper: &Shipper, range: std::ops::Range<usize>) {
    for i in range {
        shipper.emit(event(i));
    }
}

/// The highest spool depth (records) seen, sampled every 2 ms until `done` holds.
async fn max_spool_records_until(metrics: &ShipperMetrics, mut done: impl FnMut() -> bool) -> u64 {
    let mut max = 0;
    for _ in 0..5000 {
        max = max.max(metrics.spool_records());
        if done() {
            return max;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("not done within 10 s");
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn delivers_batches_to_a_healthy_collector() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..250);
    until("all stored", || collector.stored() == 250).await;
    until("all acknowledged", || metrics.events_delivered() == 250).await;
    collector.assert_stored_once(&ids(0..250));
    assert!(metrics.batches_sent(BatchResult::Ok) >= 3, "batches of at most 100");
    assert_eq!(metrics.events_emitted(), 250);
    assert_eq!(metrics.events_dropped_total(), 0);
    assert_eq!(metrics.spool_records(), 0);
    let report = shipper.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.spooled_events, 0);
    assert!(!report.deadline_exceeded);
}

#[tokio::test]
async fn plain_ndjson_without_gzip_and_a_partial_batch_flushes_on_the_interval() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(ShipperConfig { gzip: false, ..config(&collector.url(), spool.path()) });
    emit(&shipper, 0..7);
    until("flushed by the interval", || collector.stored() == 7).await;
    until("acknowledged", || metrics.events_delivered() == 7).await;
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn collector_down_then_up_delivers_everything_exactly_once() {
    let addr = free_addr().await;
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&format!("http://{addr}"), spool.path()));
    emit(&shipper, 0..300);
    until("spooled", || metrics.spool_events() == 300).await;
    assert!(metrics.spool_bytes() > 0);
    assert!(metrics.spool_records() >= 3);
    assert!(metrics.batches_sent(BatchResult::TransportError) >= 1);

    let collector = Collector::start_on(addr).await;
    emit(&shipper, 300..350); // arrives during the drain: queued behind the backlog
    until("all delivered", || metrics.events_delivered() == 350).await;
    until("spool empty", || metrics.spool_records() == 0).await;
    collector.assert_stored_once(&ids(0..350));
    assert_eq!(metrics.spool_bytes(), 0);
    assert_eq!(metrics.spool_events(), 0);
    assert_eq!(metrics.events_dropped_total(), 0);
    assert!(segment_files(spool.path()).is_empty(), "spent segments deleted");
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn server_errors_and_throttling_are_retried_from_the_spool() {
    let collector = Collector::start().await;
    collector.then(Behaviour::Status(503));
    collector.then(Behaviour::Status(429));
    collector.then(Behaviour::Malformed);
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..40);
    until("delivered", || metrics.events_delivered() == 40).await;
    collector.assert_stored_once(&ids(0..40));
    assert_eq!(metrics.batches_sent(BatchResult::ServerError), 1);
    assert_eq!(metrics.batches_sent(BatchResult::Throttled), 1);
    assert_eq!(metrics.batches_sent(BatchResult::MalformedResponse), 1);
    assert_eq!(metrics.events_dropped_total(), 0);
    until("spool empty", || metrics.spool_records() == 0).await;
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// A shipper whose one batch of 100 events the collector first answers with `behaviour`,
/// once the batch is acknowledged (with the spool directory, kept for the test's life).
async fn one_batch_answered(behaviour: Behaviour) -> (Collector, Shipper, ShipperMetrics, tempfile::TempDir) {
    let collector = Collector::start().await;
    collector.then(behaviour);
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..100); // exactly one batch
    until("acknowledged", || metrics.events_delivered() == 100).await;
    (collector, shipper, metrics, spool)
}

/// Events with many record hashes (a large page with `audit.recordId`) close batches by size:
/// each batch stays under the limit but for its last event, and every event arrives once.
#[tokio::test]
async fn batches_are_closed_by_size_as_well_as_by_count() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let limit = 256 << 10;
    // A spool that holds what waits while a batch is in flight (40 events of ~67 KB).
    let (shipper, metrics) = start(ShipperConfig {
        batch_max_bytes: limit,
        spool_max_bytes: 16 << 20,
        spool_segment_bytes: 1 << 20,
        ..config(&collector.url(), spool.path())
    });
    let event_of = |i: usize| {
        let mut e = event(i);
        e.record_hashes = (0..1_000).map(|k| format!("{:064x}", i * 10_000 + k)).collect();
        e
    };
    let size = serde_json::to_string(&event_of(0)).unwrap().len() + 1;
    for i in 0..40 {
        shipper.emit(event_of(i));
    }
    until("acknowledged", || metrics.events_delivered() == 40 || metrics.events_dropped_total() > 0).await;
    assert_eq!(metrics.events_dropped_total(), 0);
    collector.assert_stored_once(&ids(0..40));
    let sizes = collector.state.lock().unwrap().batch_bytes.clone();
    assert!(sizes.len() >= 40 * size / (limit + size), "{} batches of {sizes:?}", sizes.len());
    for bytes in &sizes {
        assert!(*bytes < limit + size, "a batch of {bytes} bytes, the limit {limit}, an event {size}");
    }
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn answer_lost_after_commit_is_resent_and_stored_once() {
    let (collector, shipper, metrics, _spool) = one_batch_answered(Behaviour::CommitThenDrop).await;
    collector.assert_stored_once(&ids(0..100));
    assert_eq!(metrics.events_duplicate(), 100, "the resent batch was all duplicates");
    assert_eq!(collector.state.lock().unwrap().event_requests, 2);
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// Events the collector acknowledges as expired (older than its retention) are settled like
/// delivered ones, not resent, and counted apart.
#[tokio::test]
async fn events_the_collector_reports_expired_are_settled_and_counted() {
    let (collector, shipper, metrics, _spool) = one_batch_answered(Behaviour::Expired).await;
    assert_eq!(metrics.events_expired(), 100);
    assert_eq!(metrics.events_duplicate(), 0);
    until("spool empty", || metrics.spool_records() == 0).await;
    assert!(collector.state.lock().unwrap().stored.is_empty(), "nothing stored");
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn restart_with_the_collector_down_loses_nothing() {
    let addr = free_addr().await;
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&format!("http://{addr}"), spool.path()));
    emit(&shipper, 0..230);
    let report = shipper.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.spooled_events, 230);
    assert_eq!(report.dropped, 0);
    assert_eq!(metrics.events_dropped_total(), 0);

    // The next process: spool depth is known before anything is delivered.
    let (shipper, metrics) = start(config(&format!("http://{addr}"), spool.path()));
    assert_eq!(metrics.spool_events(), 230);
    assert!(metrics.spool_bytes() > 0);
    let collector = Collector::start_on(addr).await;
    until("delivered", || metrics.events_delivered() == 230).await;
    until("spool empty", || metrics.spool_records() == 0).await;
    collector.assert_stored_once(&ids(0..230));
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn torn_last_record_is_counted_and_earlier_records_delivered() {
    let addr = free_addr().await;
    let spool = tempfile::tempdir().unwrap();
    let cfg = ShipperConfig { batch_max_events: 10, ..config(&format!("http://{addr}"), spool.path()) };
    let (shipper, metrics) = start(cfg.clone());
    for batch in 0..3 {
        emit(&shipper, batch * 10..batch * 10 + 10);
        until("batch spooled", || metrics.spool_records() == batch as u64 + 1).await;
    }
    shipper.shutdown(Duration::from_secs(1)).await;
    // A crash in the middle of writing the last record.
    let file = segment_files(spool.path()).pop().unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 5).unwrap();

    let (shipper, metrics) = start(cfg);
    assert_eq!(metrics.events_dropped(DropReason::Corrupt), 10);
    assert_eq!(metrics.spool_corrupt_records(), 1);
    assert_eq!(metrics.spool_events(), 20);
    let collector = Collector::start_on(addr).await;
    until("delivered", || metrics.events_delivered() == 20).await;
    collector.assert_stored_once(&ids(0..20));
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// Emits 200 events in batches of 10 while the collector is down, each batch spooled or
/// dropped before the next.
async fn fill_spool(shipper: &Shipper, metrics: &ShipperMetrics) {
    for batch in 0..20 {
        emit(shipper, batch * 10..batch * 10 + 10);
        until("batch settled", || {
            metrics.spool_events() + metrics.events_dropped_total() == (batch as u64 + 1) * 10
        })
        .await;
    }
}

#[tokio::test]
async fn full_spool_drops_and_counts_without_blocking() {
    let addr = free_addr().await;
    let spool = tempfile::tempdir().unwrap();
    let cfg = ShipperConfig {
        batch_max_events: 10,
        spool_max_bytes: 8 << 10, // a few batches of ~10 events
        ..config(&format!("http://{addr}"), spool.path())
    };
    let (shipper, metrics) = start(cfg);
    fill_spool(&shipper, &metrics).await;
    let dropped = metrics.events_dropped(DropReason::SpoolFull);
    let spooled = metrics.spool_events();
    assert!(dropped > 0, "some batches did not fit");
    assert!(spooled > 0, "some did");
    assert!(metrics.spool_bytes() <= 8 << 10);
    assert_eq!(dropped + spooled, 200);

    let collector = Collector::start_on(addr).await;
    until("spool delivered", || metrics.events_delivered() == spooled).await;
    assert_eq!(collector.stored() as u64, spooled);
    assert_eq!(metrics.events_emitted(), metrics.events_delivered() + metrics.events_dropped_total());
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// A 200 whose counts cover fewer events than were sent is not a delivery: the batch is sent
/// again and stored once (twice short, then normal); past MAX_SHORT_ACKS short answers in a
/// row, the shortfall is counted as dropped, never as delivered.
#[tokio::test]
async fn short_acknowledgements_are_sent_again_then_counted() {
    let collector = Collector::start().await;
    collector.then(Behaviour::ShortAck);
    collector.then(Behaviour::ShortAck);
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..10);
    until("delivered", || metrics.events_delivered() == 10).await;
    collector.assert_stored_once(&ids(0..10));
    assert_eq!(metrics.batches_sent(BatchResult::ShortAck), 2);
    assert_eq!(metrics.events_dropped_total(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;

    let collector = Collector::start().await;
    collector.set(Behaviour::ShortAck);
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..10);
    until("counted as dropped", || metrics.events_dropped(DropReason::Unacknowledged) == 10).await;
    assert_eq!(metrics.batches_sent(BatchResult::ShortAck), u64::from(custos_shipper::MAX_SHORT_ACKS - 1));
    assert_eq!(metrics.events_delivered(), 0);
    assert_eq!(metrics.events_emitted(), metrics.events_delivered() + metrics.events_dropped_total());
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// Splitting a spooled batch the collector refuses as too large does not need free room: the
/// halves take the original's, so a full spool loses nothing to the split.
#[tokio::test]
async fn a_full_spool_still_splits_what_the_collector_refuses_as_too_large() {
    let addr = free_addr().await;
    let spool = tempfile::tempdir().unwrap();
    let cfg = ShipperConfig {
        batch_max_events: 10,
        spool_max_bytes: 8 << 10,
        spool_segment_bytes: 2 << 10,
        ..config(&format!("http://{addr}"), spool.path())
    };
    let (shipper, metrics) = start(cfg);
    fill_spool(&shipper, &metrics).await;
    let dropped = metrics.events_dropped(DropReason::SpoolFull);
    let spooled = metrics.spool_events();
    assert!(dropped > 0 && spooled > 0, "the spool is full");

    // A collector that takes at most two events a batch: every spooled record is split, down
    // to pairs, while the spool is full.
    let collector = Collector::start_on(addr).await;
    collector.set(Behaviour::TooLargeAbove(2));
    until("spool delivered", || metrics.events_delivered() == spooled).await;
    assert_eq!(collector.stored() as u64, spooled);
    assert_eq!(metrics.events_dropped(DropReason::SpoolFull), dropped, "no event lost to a split");
    assert!(metrics.batches_sent(BatchResult::TooLarge) > 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn full_queue_drops_and_counts_and_emit_never_waits() {
    let collector = Collector::start().await;
    collector.set(Behaviour::Hang);
    let spool = tempfile::tempdir().unwrap();
    let cfg = ShipperConfig { queue_capacity: 5, ..config(&collector.url(), spool.path()) };
    let (shipper, metrics) = start(cfg);
    // Synchronous burst: the shipper task cannot run in between on this current-thread runtime.
    emit(&shipper, 0..50);
    assert_eq!(metrics.events_emitted(), 50);
    assert_eq!(metrics.events_dropped(DropReason::QueueFull), 45);
    let report = shipper.shutdown(Duration::from_millis(400)).await;
    assert_eq!(report.spooled_events + report.delivered, 5);
}

#[tokio::test]
async fn rejected_batches_are_dropped_and_counted_not_retried() {
    let collector = Collector::start().await;
    collector.then(Behaviour::Status(400));
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..100);
    until("rejected", || metrics.events_dropped(DropReason::Rejected) == 100).await;
    emit(&shipper, 100..150);
    until("next batch delivered", || metrics.events_delivered() == 50).await;
    collector.assert_stored_once(&ids(100..150));
    assert_eq!(metrics.batches_sent(BatchResult::Rejected), 1);
    assert_eq!(metrics.spool_records(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn rotated_token_is_picked_up_and_401_keeps_events_until_it_is() {
    let collector = Collector::start().await;
    collector.state.lock().unwrap().expected_token = Some("token-one".to_string());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "token-one\n").unwrap();
    let spool = dir.path().join("spool");
    let (shipper, metrics) =
        start(ShipperConfig { token_file: Some(token.clone()), ..config(&collector.url(), &spool) });
    emit(&shipper, 0..10);
    until("first batch", || metrics.events_delivered() == 10).await;

    // The collector now wants the rotated token; the file still holds the old one.
    collector.state.lock().unwrap().expected_token = Some("token-number-two".to_string());
    emit(&shipper, 10..20);
    until("refused and spooled", || {
        metrics.batches_sent(BatchResult::Unauthorized) >= 1 && metrics.spool_events() == 10
    })
    .await;
    std::fs::write(&token, "token-number-two\n").unwrap();
    until("delivered with the new token", || metrics.events_delivered() == 20).await;
    collector.assert_stored_once(&ids(0..20));
    let tokens = collector.state.lock().unwrap().tokens.clone();
    assert_eq!(tokens.first().unwrap().as_deref(), Some("Bearer token-one"));
    assert_eq!(tokens.last().unwrap().as_deref(), Some("Bearer token-number-two"));
    assert_eq!(metrics.events_dropped_total(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_respects_its_deadline_with_a_hanging_collector_and_keeps_the_events() {
    let collector = Collector::start().await;
    collector.set(Behaviour::Hang);
    let spool = tempfile::tempdir().unwrap();
    let cfg =
        ShipperConfig { request_timeout: Duration::from_secs(30), ..config(&collector.url(), spool.path()) };
    let (shipper, metrics) = start(cfg.clone());
    emit(&shipper, 0..150); // one batch in flight (hanging), the rest queued or building
    until("a request is in flight", || !collector.state.lock().unwrap().tokens.is_empty()).await;
    let report = tokio::time::timeout(Duration::from_secs(10), shipper.shutdown(Duration::from_millis(400)))
        .await
        .expect("shutdown finishes");
    assert!(report.deadline_exceeded);
    assert_eq!(report.spooled_events, 150);
    assert_eq!(metrics.events_dropped_total(), 0);

    // Nothing lost: the next start delivers them.
    collector.set(Behaviour::Normal);
    let (shipper, metrics) = start(cfg);
    until("delivered after restart", || metrics.events_delivered() == 150).await;
    collector.assert_stored_once(&ids(0..150));
    shipper.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_flushes_queued_events_to_a_healthy_collector() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let cfg =
        ShipperConfig { flush_interval: Duration::from_secs(60), ..config(&collector.url(), spool.path()) };
    let (shipper, metrics) = start(cfg);
    emit(&shipper, 0..42); // below a batch, and the interval is far away
    let report = shipper.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.delivered, 42);
    assert_eq!(report.spooled_events, 0);
    collector.assert_stored_once(&ids(0..42));
    assert_eq!(metrics.events_delivered(), 42);
}

#[tokio::test]
async fn full_batches_leave_at_once_and_a_partial_one_waits_for_the_interval() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    // The worker is woken every few dozen events, not per event: 250 events with batches of
    // 100 are two full batches sent at once and 50 that wait for the (far) interval.
    let cfg =
        ShipperConfig { flush_interval: Duration::from_secs(60), ..config(&collector.url(), spool.path()) };
    let (shipper, metrics) = start(cfg);
    emit(&shipper, 0..250);
    until("two full batches stored", || collector.stored() == 200).await;
    until("two full batches acknowledged", || metrics.events_delivered() == 200).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(collector.stored(), 200, "the partial batch left before its interval");
    let report = shipper.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.delivered, 50);
    collector.assert_stored_once(&ids(0..250));
}

#[tokio::test]
async fn batches_completed_during_a_slow_delivery_wait_in_memory_not_in_the_spool() {
    // Each delivery takes 150 ms; five full batches arrive at once: one is sent, four wait
    // in memory and follow in order. With no room in memory (0), the same four are spooled.
    for (room, spooled) in [(4, false), (0, true)] {
        let collector = Collector::start().await;
        collector.set(Behaviour::Slow(Duration::from_millis(150)));
        let spool = tempfile::tempdir().unwrap();
        let cfg = ShipperConfig { max_waiting_batches: room, ..config(&collector.url(), spool.path()) };
        let (shipper, metrics) = start(cfg);
        emit(&shipper, 0..500);
        let max_spooled = max_spool_records_until(&metrics, || metrics.events_delivered() == 500).await;
        assert_eq!(max_spooled > 0, spooled, "room for {room}: spool depth reached {max_spooled}");
        collector.assert_stored_once(&ids(0..500));
        let heads = collector.state.lock().unwrap().batch_heads.clone();
        let mut sorted = heads.clone();
        sorted.sort();
        assert_eq!(heads, sorted, "room for {room}: batches delivered out of order");
        assert_eq!(metrics.events_dropped_total(), 0);
        shipper.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn a_failed_delivery_sends_the_batches_waiting_in_memory_to_the_spool_behind_it() {
    // The first delivery hangs until its time-out while two more batches wait in memory. They
    // must go to the spool behind the failed one, not be sent from memory before it.
    let collector = Collector::start().await;
    collector.then(Behaviour::Hang);
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..300);
    let max_spooled = max_spool_records_until(&metrics, || metrics.events_delivered() == 300).await;
    assert!(max_spooled >= 1, "nothing was spooled after the failure");
    assert_eq!(metrics.batches_sent(BatchResult::Timeout), 1);
    collector.assert_stored_once(&ids(0..300));
    let heads = collector.state.lock().unwrap().batch_heads.clone();
    assert_eq!(heads, ["01TESTEVENT00000000", "01TESTEVENT00000100", "01TESTEVENT00000200"]);
    shipper.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn dropping_every_handle_delivers_what_was_queued() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let metrics = ShipperMetrics::new();
    let cfg =
        ShipperConfig { flush_interval: Duration::from_secs(60), ..config(&collector.url(), spool.path()) };
    let (shipper, task) = Shipper::start(cfg, metrics.clone()).unwrap();
    let other = shipper.clone();
    emit(&shipper, 0..30);
    drop(shipper);
    emit(&other, 30..42);
    drop(other);
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    collector.assert_stored_once(&ids(0..42));
    assert_eq!(metrics.events_delivered(), 42);
}

#[tokio::test]
async fn events_after_shutdown_are_counted_as_dropped() {
    let collector = Collector::start().await;
    let spool = tempfile::tempdir().unwrap();
    let metrics = ShipperMetrics::new();
    let (shipper, task) = Shipper::start(config(&collector.url(), spool.path()), metrics.clone()).unwrap();
    let other = shipper.clone();
    shipper.shutdown(Duration::from_secs(1)).await;
    task.await.unwrap();
    other.emit(event(0));
    assert_eq!(metrics.events_dropped(DropReason::Shutdown), 1);
    assert_eq!(other.shutdown(Duration::from_secs(1)).await, Default::default());
}

#[tokio::test]
async fn log_only_mode_counts_and_discards() {
    let spool = tempfile::tempdir().unwrap();
    let metrics = ShipperMetrics::new();
    let cfg = ShipperConfig { collector: None, ..config("http://unused", spool.path()) };
    let (shipper, task) = Shipper::start(cfg, metrics.clone()).unwrap();
    emit(&shipper, 0..3);
    assert_eq!(metrics.events_emitted(), 3);
    assert_eq!(metrics.events_dropped_total(), 0);
    assert_eq!(shipper.shutdown(Duration::from_secs(1)).await, Default::default());
    task.await.unwrap();
}

#[tokio::test]
async fn start_refuses_bad_configuration() {
    let spool = tempfile::tempdir().unwrap();
    let bad = [
        ShipperConfig { batch_max_events: 0, ..config("http://127.0.0.1:1", spool.path()) },
        ShipperConfig { retry_jitter: 2.0, ..config("http://127.0.0.1:1", spool.path()) },
        config("ftp://127.0.0.1:1", spool.path()),
    ];
    for cfg in bad {
        assert!(Shipper::start(cfg, ShipperMetrics::new()).is_err());
    }
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let spool = tempfile::tempdir().unwrap();
    let result = Shipper::start(config("http://127.0.0.1:1", spool.path()), ShipperMetrics::new());
    assert!(matches!(result, Err(ShipperError::NoRuntime)));
}

// ---------------------------------------------------------------------------------------------
// Usage client.

#[tokio::test]
async fn usage_client_fetches_with_the_token_and_maps_errors() {
    let collector = Collector::start().await;
    let usage = UsageResponse {
        policy: "customers".to_string(),
        principal: "user:42".to_string(),
        as_of: "2025-01-01T00:00:00Z".to_string(),
        rules: BTreeMap::from([(
            "per-user".to_string(),
            RuleUsage { requests_last_minute: 3, records_last_hour: 40, records_last_day: 500 },
        )]),
        instance: None,
        rules_without_instance: None,
    };
    {
        let mut s = collector.state.lock().unwrap();
        s.usage = Some(usage.clone());
        s.expected_token = Some("secret".to_string());
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "secret").unwrap();
    let client = UsageClient::new(collector.url(), Some(token.clone()), Duration::from_millis(300)).unwrap();

    assert_eq!(client.fetch("shop", "customers", "user:42", None).await.unwrap(), usage);
    assert_eq!(
        collector.state.lock().unwrap().usage_queries.last().unwrap(),
        "policy=customers&principal=user%3A42&namespace=shop"
    );

    std::fs::write(&token, "stale-token").unwrap();
    assert!(matches!(
        client.fetch("shop", "customers", "user:42", None).await,
        Err(ShipperError::Unauthorized)
    ));
    std::fs::write(&token, "secret").unwrap();

    collector.then(Behaviour::Malformed);
    assert!(matches!(
        client.fetch("shop", "customers", "user:42", None).await,
        Err(ShipperError::MalformedResponse(_))
    ));

    collector.then(Behaviour::Status(503));
    assert!(matches!(
        client.fetch("shop", "customers", "user:42", None).await,
        Err(ShipperError::Status(503))
    ));

    // An answer larger than any the collector gives is not read whole.
    collector.then(Behaviour::Huge);
    match client.fetch("shop", "customers", "user:42", None).await {
        Err(ShipperError::MalformedResponse(detail)) => assert!(detail.contains("larger than"), "{detail}"),
        other => panic!("{other:?}"),
    }

    collector.then(Behaviour::Hang);
    assert!(matches!(client.fetch("shop", "customers", "user:42", None).await, Err(ShipperError::Timeout)));

    assert_eq!(client.fetch("", "customers", "user:42", None).await.unwrap(), usage);
    assert_eq!(
        collector.state.lock().unwrap().usage_queries.last().unwrap(),
        "policy=customers&principal=user%3A42"
    );

    // `instance` is sent; a collector from before that parameter refuses it (400): asked again
    // without it, and not sent again for a while (ten minutes).
    assert_eq!(client.fetch("shop", "customers", "user:42", Some("0123ABCD")).await.unwrap(), usage);
    assert!(collector.state.lock().unwrap().usage_queries.last().unwrap().ends_with("&instance=0123ABCD"));
    collector.state.lock().unwrap().refuse_instance = true;
    let asked = collector.state.lock().unwrap().usage_queries.len();
    assert_eq!(client.fetch("shop", "customers", "user:42", Some("0123ABCD")).await.unwrap(), usage);
    assert_eq!(client.fetch("shop", "customers", "user:42", Some("0123ABCD")).await.unwrap(), usage);
    let queries = collector.state.lock().unwrap().usage_queries[asked..].to_vec();
    assert_eq!(queries.len(), 3, "one refused, then once without it each: {queries:?}");
    assert!(
        queries[0].contains("instance=")
            && !queries[1].contains("instance=")
            && !queries[2].contains("instance=")
    );

    collector.stop();
    assert!(matches!(
        client.fetch("shop", "customers", "user:42", None).await,
        Err(ShipperError::Transport(_))
    ));
}

#[tokio::test]
async fn usage_client_reports_an_unreadable_token_file() {
    let client = UsageClient::new(
        "http://127.0.0.1:1".to_string(),
        Some(PathBuf::from("/nonexistent/token")),
        Duration::from_secs(1),
    )
    .unwrap();
    let error = client.fetch("ns", "p", "user:1", None).await.unwrap_err();
    assert!(matches!(error, ShipperError::TokenFile { .. }));
}

#[tokio::test]
async fn too_large_batches_are_split_until_they_pass() {
    let collector = Collector::start().await;
    collector.then(Behaviour::Status(413));
    collector.then(Behaviour::Status(413));
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..100);
    until("delivered", || metrics.events_delivered() == 100).await;
    until("spool empty", || metrics.spool_records() == 0).await;
    collector.assert_stored_once(&ids(0..100));
    assert_eq!(metrics.batches_sent(BatchResult::TooLarge), 2);
    assert_eq!(metrics.events_dropped_total(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// An event the collector refuses (400 `bad_event`) is dropped alone, the rest delivered.
/// Without a pointer (a collector before it), the batch is split until the event stands
/// alone; with `line`, that event is dropped and the rest of its batch sent again at once: one
/// refusal, one spool write, not a split per halving (a systematic refusal cost about two
/// requests and two fsyncs per event of a batch).
#[tokio::test]
async fn an_event_the_collector_refuses_is_dropped_alone() {
    // The halves holding event 37: 100 → 50 (0..50) → 25 (25..50) → 13 (37..50) → 6 (37..43)
    // → 3 (37..40) → 1: six splits, then the event alone is rejected.
    for (refusal, bad_event_batches, rejected_batches) in
        [(Behaviour::BadEvent(37), 6, 1), (Behaviour::BadEventAt(37), 1, 0)]
    {
        let collector = Collector::start().await;
        collector.set(refusal);
        let spool = tempfile::tempdir().unwrap();
        let (shipper, metrics) = start(config(&collector.url(), spool.path()));
        emit(&shipper, 0..100);
        until("all but one delivered", || {
            metrics.events_delivered() == 99 && metrics.events_dropped(DropReason::Rejected) == 1
        })
        .await;
        until("spool empty", || metrics.spool_records() == 0).await;
        collector.assert_stored_once(&[ids(0..37), ids(38..100)].concat());
        assert_eq!(metrics.batches_sent(BatchResult::BadEvent), bad_event_batches, "{refusal:?}");
        assert_eq!(metrics.batches_sent(BatchResult::Rejected), rejected_batches, "{refusal:?}");
        assert_eq!(metrics.events_dropped_total(), 1);
        shipper.shutdown(Duration::from_secs(1)).await;
    }
}

/// A batch refused for an event dated ahead of the collector's clock is kept behind the
/// batches that may pass: events dated after the node's clock was set right are delivered
/// meanwhile (a review's HIGH: kept at the head, it held up everything behind it until the
/// collector's clock caught up, and the spool filled).
#[tokio::test]
async fn a_batch_from_a_clock_ahead_does_not_hold_up_the_later_ones() {
    let collector = Collector::start().await;
    collector.set(Behaviour::ClockAhead(3));
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..100);
    until("the first batch refused", || metrics.batches_sent(BatchResult::Refused) >= 1).await;
    emit(&shipper, 100..300);
    // Delivered counts once the spool has forgotten the batch (stored alone may come first).
    until("the later batches delivered", || metrics.events_delivered() == 200).await;
    collector.assert_stored_once(&ids(100..300));
    // (Moved behind the backlog, it is briefly in the spool twice: its copy is written before
    // the original is forgotten.)
    until("the refused batch kept", || metrics.spool_events() == 100).await;
    collector.set(Behaviour::Normal);
    until("all delivered", || metrics.events_delivered() == 300).await;
    collector.assert_stored_once(&[ids(100..300), ids(0..100)].concat());
    assert_eq!(metrics.events_dropped_total(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// An event recorded before the sidecar knew its namespace (empty), refused by a namespace
/// token as `wrong_namespace`, is dropped alone; one of a real namespace is kept (the token is
/// for another: a setup error; `refusals_that_are_not_the_batchs_keep_the_events`).
#[tokio::test]
async fn an_event_without_a_namespace_refused_by_a_namespace_token_is_dropped_alone() {
    let collector = Collector::start().await;
    collector.set(Behaviour::WrongNamespace(3));
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    for i in 0..10 {
        let mut e = event(i);
        if i == 3 {
            e.namespace = String::new();
        }
        shipper.emit(e);
    }
    until("all but one delivered", || {
        metrics.events_delivered() == 9 && metrics.events_dropped(DropReason::Rejected) == 1
    })
    .await;
    collector.assert_stored_once(&[ids(0..3), ids(4..10)].concat());
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// A collector that takes longer than the request time-out with a large batch (its database
/// slow to commit) gets it split after two such sends in a row, and the halves pass; before,
/// the same batch was sent for ever and the spool behind it filled.
#[tokio::test]
async fn a_batch_the_collector_is_too_slow_with_is_split() {
    let collector = Collector::start().await;
    collector.set(Behaviour::SlowAbove(60, Duration::from_secs(2)));
    let spool = tempfile::tempdir().unwrap();
    let (shipper, metrics) = start(config(&collector.url(), spool.path()));
    emit(&shipper, 0..100);
    until("delivered", || metrics.events_delivered() == 100).await;
    collector.assert_stored_once(&ids(0..100));
    // Two sends of the whole batch, then its halves (which pass; more only on a loaded machine
    // where even they time out).
    assert!(metrics.batches_sent(BatchResult::Timeout) >= 2);
    assert_eq!(metrics.events_dropped_total(), 0);
    shipper.shutdown(Duration::from_secs(1)).await;
}

/// Refusals that say nothing against the batch (a wrong path, a proxy or authorisation layer
/// in front, a collector older than the sidecar, a namespace token for another namespace, an
/// event from a clock ahead of the collector's) keep the events until they pass.
#[tokio::test]
async fn refusals_that_are_not_the_batchs_keep_the_events() {
    for refusal in [
        Behaviour::Status(403),
        Behaviour::Status(404),
        Behaviour::Status(405),
        Behaviour::Status(415),
        Behaviour::Reason(400, "unsupported_schema_version"),
        Behaviour::WrongNamespace(3),
        Behaviour::ClockAhead(3),
    ] {
        let collector = Collector::start().await;
        collector.set(refusal);
        let spool = tempfile::tempdir().unwrap();
        let (shipper, metrics) = start(config(&collector.url(), spool.path()));
        emit(&shipper, 0..10);
        until("refused and spooled", || {
            metrics.batches_sent(BatchResult::Refused) >= 2 && metrics.spool_events() == 10
        })
        .await;
        collector.set(Behaviour::Normal);
        until("delivered", || metrics.events_delivered() == 10).await;
        collector.assert_stored_once(&ids(0..10));
        assert_eq!(metrics.events_dropped_total(), 0, "{refusal:?}");
        shipper.shutdown(Duration::from_secs(1)).await;
    }
}
