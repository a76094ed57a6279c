//! Alert delivery against a real HTTP server on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custos_detect::{
    Alert, AlertDispatcher, AlertMetrics, AlertRecorder, AttemptResult, DeliveryResult, RecorderError,
    Severity, SinkConfig, SinkError, alert_id,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

fn mk_alert(detector: &str, principal: &str, severity: Severity) -> Alert {
    Alert {
        id: alert_id(detector, principal, 1_709_517_600_000, None),
        time: "2024-03-04T02:00:00.000Z".into(),
        detector: detector.into(),
        namespace: Some("logistics".into()),
        policy: Some("customer-api".into()),
        principal: Some(principal.into()),
        severity,
        message: format!("{principal} did something"),
        details: serde_json::json!({"records": 72_000, "threshold": 1_000.0}),
    }
}

/// Authorization, Content-Type and Idempotency-Key headers, and the body, of one request.
type Received = (Option<String>, Option<String>, Option<String>, Bytes);

#[derive(Default)]
struct Seen {
    /// (authorization, content-type, idempotency-key, body) of every request.
    requests: Vec<Received>,
    /// Statuses for the next requests (then 200).
    statuses: Vec<(u16, Option<&'static str>)>,
}

struct Hook {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    server: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start(statuses: Vec<(u16, Option<&'static str>)>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen { statuses, ..Seen::default() }));
        let shared = seen.clone();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let seen = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(seen.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Hook { addr, seen, server }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/custos", self.addr)
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().requests.len()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    seen: Arc<Mutex<Seen>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (auth, ctype, key) = (header("authorization"), header("content-type"), header("idempotency-key"));
    let body = req.into_body().collect().await.map_err(std::io::Error::other)?.to_bytes();
    let (status, retry_after) = {
        let mut s = seen.lock().unwrap();
        s.requests.push((auth, ctype, key, body));
        if s.statuses.is_empty() { (200, None) } else { s.statuses.remove(0) }
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(v) = retry_after {
        response.headers_mut().insert("retry-after", v.parse().unwrap());
    }
    Ok(response)
}

fn fast(url: Option<String>) -> SinkConfig {
    SinkConfig {
        webhook: url,
        timeout: Duration::from_secs(5),
        max_attempts: 5,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..SinkConfig::default()
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for: {what}");
}

fn encode(metrics: &AlertMetrics) -> String {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_twice_then_accepting_gets_the_alert_once() {
    let hook = Hook::start(vec![(500, None), (503, None)]).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let config = SinkConfig { token_file: Some(token), ..fast(Some(hook.url())) };
    let dispatcher = AlertDispatcher::start(config, AlertMetrics::new()).unwrap();
    let alert = mk_alert("volume", "user:clerk-3", Severity::Critical);
    dispatcher.dispatch(vec![alert.clone()]);
    let m = dispatcher.metrics().clone();
    until("delivered", || m.webhook_deliveries(DeliveryResult::Delivered) == 1).await;
    assert!(dispatcher.shutdown(Duration::from_secs(5)).await);

    assert_eq!(hook.requests(), 3);
    for (auth, ctype, key, body) in &hook.seen.lock().unwrap().requests {
        assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
        assert_eq!(ctype.as_deref(), Some("application/json"));
        assert_eq!(key.as_deref(), Some(alert.id.as_str()));
        assert_eq!(serde_json::from_slice::<Alert>(body).unwrap(), alert);
    }
    assert_eq!(m.webhook_attempts(AttemptResult::ServerError), 2);
    assert_eq!(m.webhook_attempts(AttemptResult::Ok), 1);
    assert_eq!(m.webhook_deliveries(DeliveryResult::Failed), 0);
    assert_eq!((m.alerts_dropped(), m.alerts_pending()), (0, 0));
    assert_eq!(m.alerts("volume", Severity::Critical), 1);
    let text = encode(&m);
    for line in [
        "custos_collector_alerts_total{detector=\"volume\",severity=\"critical\"} 1",
        "custos_collector_alerts_total{detector=\"first_seen\",severity=\"info\"} 0",
        "custos_collector_alert_webhook_deliveries_total{result=\"delivered\"} 1",
        "custos_collector_alert_webhook_attempts_total{result=\"server_error\"} 2",
        "custos_collector_alerts_dropped_total 0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_and_client_errors_are_not() {
    let hook = Hook::start(vec![(429, Some("0")), (400, None)]).await;
    let dispatcher = AlertDispatcher::start(fast(Some(hook.url())), AlertMetrics::new()).unwrap();
    dispatcher.dispatch(vec![mk_alert("denial_burst", "user:a", Severity::Warning)]);
    let m = dispatcher.metrics().clone();
    until("rejected", || m.webhook_deliveries(DeliveryResult::Rejected) == 1).await;
    assert!(dispatcher.shutdown(Duration::from_secs(5)).await);
    assert_eq!(hook.requests(), 2, "429 retried once, 400 not retried");
    assert_eq!(m.webhook_attempts(AttemptResult::Throttled), 1);
    assert_eq!(m.webhook_attempts(AttemptResult::Rejected), 1);
    assert_eq!(m.webhook_deliveries(DeliveryResult::Delivered), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_webhook_gives_up_after_max_attempts() {
    // A port nothing listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = SinkConfig { max_attempts: 3, ..fast(Some(format!("http://{addr}/"))) };
    let dispatcher = AlertDispatcher::start(config, AlertMetrics::new()).unwrap();
    dispatcher.dispatch(vec![mk_alert("off_hours", "user:owl", Severity::Warning)]);
    let m = dispatcher.metrics().clone();
    until("failed", || m.webhook_deliveries(DeliveryResult::Failed) == 1).await;
    assert_eq!(m.webhook_attempts(AttemptResult::TransportError), 3);
    assert!(dispatcher.shutdown(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_does_not_block_dispatch_and_every_alert_is_accounted_for() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let black_hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let config = SinkConfig {
        timeout: Duration::from_secs(60),
        queue_capacity: 4,
        concurrency: 1,
        ..fast(Some(format!("http://{addr}/")))
    };
    let dispatcher = AlertDispatcher::start(config, AlertMetrics::new()).unwrap();
    let alerts: Vec<Alert> =
        (0..100).map(|i| mk_alert("volume", &format!("user:u{i}"), Severity::Warning)).collect();
    // dispatch is synchronous and only queues: it returns with the queue full.
    dispatcher.dispatch(alerts);
    let m = dispatcher.metrics().clone();
    let dropped = m.alerts_dropped();
    assert!((95..=96).contains(&dropped), "4 queued, at most 1 in flight: {dropped} dropped");
    assert_eq!(m.alerts("volume", Severity::Warning), 100);
    assert_eq!(m.alerts_pending(), 100 - dropped as i64);

    // Shutting down gives up on the rest and counts it.
    assert!(!dispatcher.shutdown(Duration::from_millis(200)).await);
    assert_eq!((m.alerts_dropped(), m.alerts_pending()), (100, 0));
    assert_eq!(m.webhook_deliveries(DeliveryResult::Delivered), 0);
    // After shutdown, alerts are still counted, and dropped.
    dispatcher.dispatch(vec![mk_alert("volume", "user:late", Severity::Warning)]);
    assert_eq!(m.alerts_dropped(), 101);
    black_hole.abort();
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl AlertRecorder for Collect {
    fn name(&self) -> &'static str {
        "collect"
    }

    async fn record(&self, alert: &Alert) -> Result<(), RecorderError> {
        self.0.lock().unwrap().push(alert.id.clone());
        Ok(())
    }
}

struct Broken;

impl AlertRecorder for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    async fn record(&self, _alert: &Alert) -> Result<(), RecorderError> {
        Err("the API server said no".into())
    }
}

#[tokio::test]
async fn recorders_get_every_alert_and_their_failures_are_counted() {
    let collect = Collect::default();
    let dispatcher =
        AlertDispatcher::builder(fast(None)).recorder(collect.clone()).recorder(Broken).start().unwrap();
    let alerts: Vec<Alert> =
        ["user:a", "user:b", "user:c"].iter().map(|p| mk_alert("first_seen", p, Severity::Info)).collect();
    dispatcher.dispatch(alerts.clone());
    assert!(dispatcher.shutdown(Duration::from_secs(5)).await, "drains the queue");
    let mut got = collect.0.lock().unwrap().clone();
    got.sort();
    let mut want: Vec<String> = alerts.iter().map(|a| a.id.clone()).collect();
    want.sort();
    assert_eq!(got, want);
    let m = dispatcher.metrics();
    assert_eq!((m.recordings("collect", true), m.recordings("broken", false)), (3, 3));
    assert_eq!(m.alerts("first_seen", Severity::Info), 3);
}

#[tokio::test]
async fn without_a_destination_alerts_are_only_counted() {
    let dispatcher = AlertDispatcher::start(fast(None), AlertMetrics::new()).unwrap();
    dispatcher.dispatch(vec![mk_alert("row_filter_burst", "user:i", Severity::Critical)]);
    let m = dispatcher.metrics();
    assert_eq!(m.alerts("row_filter_burst", Severity::Critical), 1);
    assert_eq!((m.alerts_dropped(), m.alerts_pending()), (0, 0));
    assert!(dispatcher.shutdown(Duration::from_secs(1)).await);
}

#[test]
fn bad_settings_are_refused_clearly() {
    let secret_url = "ftp://hooks.example.com/T0/SECRET".to_owned();
    let e = AlertDispatcher::start(fast(Some(secret_url)), AlertMetrics::new()).unwrap_err();
    assert!(matches!(e, SinkError::InvalidWebhook(_)), "{e}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
    assert!(!format!("{:?}", fast(Some("https://hooks.example.com/T0/SECRET".into()))).contains("SECRET"));
    let e = AlertDispatcher::start(SinkConfig { queue_capacity: 0, ..fast(None) }, AlertMetrics::new())
        .unwrap_err();
    assert!(e.to_string().contains("queue_capacity"), "{e}");
    // Delivery needs a runtime for its task.
    let e =
        AlertDispatcher::start(fast(Some("http://127.0.0.1:9/".into())), AlertMetrics::new()).unwrap_err();
    assert!(matches!(e, SinkError::NoRuntime), "{e}");
}
