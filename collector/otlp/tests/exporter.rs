//! The OTLP exporter against a local OTLP/HTTP endpoint stand-in (real TCP on 127.0.0.1).
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custos_api::audit::AUDIT_SCHEMA_VERSION;
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_otlp::{
    ContentType, ExportLogsPartialSuccess, ExportLogsServiceResponse, ExporterConfig, ExporterMetrics,
    Message, OtlpExporter, QueueFull, decode_logs,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the stand-in answers one request.
#[derive(Clone, Debug)]
enum Answer {
    /// 200 with an ExportLogsServiceResponse (protobuf) rejecting this many records.
    Ok { rejected: i64 },
    /// This status, nothing stored.
    Status(u16),
    /// Wait for `release` before answering 200.
    Hold,
}

#[derive(Default)]
struct State {
    /// Answers for the next requests; when empty, `Ok { rejected: 0 }`.
    script: VecDeque<Answer>,
    /// Event ids of accepted requests, in order.
    stored: Vec<String>,
    requests: usize,
    paths: BTreeSet<String>,
    gzipped: usize,
}

struct Endpoint {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    received: Arc<Notify>,
    release: Arc<Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start(script: Vec<Answer>) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State { script: script.into(), ..State::default() }));
        let received = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, r, l) = (Arc::clone(&state), Arc::clone(&received), Arc::clone(&release));
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, r, l) = (Arc::clone(&s), Arc::clone(&r), Arc::clone(&l));
                connections.spawn(async move {
                    let service =
                        service_fn(move |req| handle(Arc::clone(&s), Arc::clone(&r), Arc::clone(&l), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Endpoint { addr, state, received, release, server }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stored(&self) -> Vec<String> {
        self.state.lock().unwrap().stored.clone()
    }

    /// Waits (bounded) until `n` events are stored.
    async fn wait_stored(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.stored().len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("only {} of {n} events arrived", self.stored().len()));
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    received: Arc<Notify>,
    release: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let gzipped = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await?.to_bytes();
    let body = if gzipped {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out).unwrap();
        out
    } else {
        body.to_vec()
    };
    let answer = {
        let mut s = state.lock().unwrap();
        s.requests += 1;
        s.paths.insert(path);
        s.gzipped += usize::from(gzipped);
        s.script.pop_front().unwrap_or(Answer::Ok { rejected: 0 })
    };
    received.notify_one();
    assert_eq!(content_type.as_deref(), Some("application/x-protobuf"));
    let rejected = match answer {
        Answer::Status(code) => {
            return Ok(Response::builder().status(code).body(Full::new(Bytes::new())).unwrap());
        }
        Answer::Hold => {
            release.notified().await;
            0
        }
        Answer::Ok { rejected } => rejected,
    };
    let decoded = decode_logs(&body, ContentType::Protobuf).unwrap();
    assert!(decoded.rejected.is_empty());
    state.lock().unwrap().stored.extend(decoded.events.iter().map(|e| e.id.clone()));
    let partial_success = (rejected > 0)
        .then(|| ExportLogsPartialSuccess { rejected_log_records: rejected, error_message: "bad".into() });
    let body = ExportLogsServiceResponse { partial_success }.encode_to_vec();
    Ok(Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(body.into()))
        .unwrap())
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: format!("01EXPORT{i:08}"),
        time: "2025-06-01T12:00:00Z".into(),
        cluster: None,
        namespace: "shop".into(),
        policy: Some("customers".into()),
        rule: None,
        mode: Mode::Enforce,
        pod: None,
        caller: None,
        user: None,
        principal: "workload:shop/portal".into(),
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}".into(),
        decision: Decision::Allow,
        reason: "allowed".into(),
        status: 200,
        records_returned: 1,
        records_filtered: 0,
        records_truncated: 0,
        masked: Default::default(),
        bytes: 10,
        latency_us: 100,
        trace_id: None,
        record_hashes: vec![],
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

fn config(url: &str) -> ExporterConfig {
    ExporterConfig {
        batch_size: 10,
        flush_interval: Duration::from_millis(20),
        timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..ExporterConfig::new(url)
    }
}

#[tokio::test]
async fn a_failed_request_is_retried_and_every_event_is_delivered_once() {
    let endpoint = Endpoint::start(vec![Answer::Status(503)]).await;
    let metrics = ExporterMetrics::default();
    let exporter =
        OtlpExporter::start(ExporterConfig { gzip: true, ..config(&endpoint.url()) }, metrics.clone())
            .unwrap();
    let events: Vec<AuditEvent> = (0..25).map(event).collect();
    exporter.send(events.clone()).await.unwrap();
    endpoint.wait_stored(25).await;
    let summary = exporter.shutdown(Duration::from_secs(5)).await;

    let mut stored = endpoint.stored();
    stored.sort();
    let sent: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(stored, sent, "each event exactly once");
    assert_eq!((summary.exported, summary.rejected, summary.dropped), (25, 0, 0));
    assert_eq!(metrics.requests("retryable_status"), 1);
    assert!(metrics.requests("ok") >= 3);
    assert_eq!(metrics.queued(), 25);
    let state = endpoint.state.lock().unwrap();
    assert_eq!(state.paths, BTreeSet::from(["/v1/logs".to_owned()]));
    assert_eq!(state.gzipped, state.requests);
}

#[tokio::test]
async fn a_refused_batch_is_counted_and_not_retried() {
    let endpoint = Endpoint::start(vec![Answer::Status(400)]).await;
    let metrics = ExporterMetrics::default();
    let exporter = OtlpExporter::start(config(&endpoint.url()), metrics.clone()).unwrap();
    exporter.try_send(&(0..3).map(event).collect::<Vec<_>>()).unwrap();
    let summary = exporter.shutdown(Duration::from_secs(5)).await;
    assert_eq!((summary.exported, summary.rejected, summary.dropped), (0, 3, 0));
    assert_eq!(metrics.requests("rejected"), 1);
    assert_eq!(endpoint.state.lock().unwrap().requests, 1);
}

#[tokio::test]
async fn a_partial_success_counts_the_rejected_records() {
    let endpoint = Endpoint::start(vec![Answer::Ok { rejected: 2 }]).await;
    let metrics = ExporterMetrics::default();
    let exporter = OtlpExporter::start(config(&endpoint.url()), metrics.clone()).unwrap();
    exporter.send((0..5).map(event).collect()).await.unwrap();
    let summary = exporter.shutdown(Duration::from_secs(5)).await;
    assert_eq!((summary.exported, summary.rejected), (3, 2));
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_the_excess() {
    let endpoint = Endpoint::start(vec![Answer::Hold]).await;
    let metrics = ExporterMetrics::default();
    let cfg = ExporterConfig { batch_size: 1, queue_capacity: 2, ..config(&endpoint.url()) };
    let exporter = OtlpExporter::start(cfg, metrics.clone()).unwrap();
    exporter.try_send(&[event(0)]).unwrap();
    // The sender is now blocked on the held request: the queue fills up.
    tokio::time::timeout(Duration::from_secs(10), endpoint.received.notified()).await.unwrap();
    let err = exporter.try_send(&[event(1), event(2), event(3)]).unwrap_err();
    assert_eq!(err, QueueFull { dropped: 1 });
    assert_eq!(metrics.dropped("queue_full"), 1);
    endpoint.release.notify_one();
    let summary = exporter.shutdown(Duration::from_secs(5)).await;
    assert_eq!(summary.exported, 3);
    let mut stored = endpoint.stored();
    stored.sort();
    assert_eq!(stored, vec![event(0).id, event(1).id, event(2).id]);
    // After shutdown nothing is queued any more.
    assert_eq!(exporter.try_send(&[event(4)]), Err(QueueFull { dropped: 1 }));
    assert_eq!(metrics.dropped("shutdown"), 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_drops_at_the_shutdown_deadline() {
    // A port where nothing listens.
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let metrics = ExporterMetrics::default();
    let exporter = OtlpExporter::start(config(&format!("http://{addr}")), metrics.clone()).unwrap();
    exporter.send((0..4).map(event).collect()).await.unwrap();
    let summary = exporter.shutdown(Duration::from_millis(300)).await;
    assert_eq!((summary.exported, summary.dropped), (0, 4));
    assert!(metrics.requests("transport_error") >= 1);
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let err = OtlpExporter::start(ExporterConfig::new("ftp://x"), ExporterMetrics::default()).unwrap_err();
    assert!(err.to_string().contains("scheme"), "{err}");
    let cfg = ExporterConfig {
        headers: vec![("bad header".into(), "v".into())],
        ..ExporterConfig::new("http://x")
    };
    let err = OtlpExporter::start(cfg, ExporterMetrics::default()).unwrap_err();
    assert!(err.to_string().contains("invalid header name"), "{err}");
}

#[test]
fn metrics_register_under_their_names() {
    let mut registry = prometheus_client::registry::Registry::default();
    ExporterMetrics::default().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        "custos_otlp_export_events_queued_total",
        "custos_otlp_export_events_exported_total",
        "custos_otlp_export_events_rejected_total",
        "custos_otlp_export_queue_events",
    ] {
        assert!(text.contains(name), "{name} missing in\n{text}");
    }
}
