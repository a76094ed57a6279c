//! What happens after a commit, end to end through HTTP: the leak detectors raise alerts that
//! are stored, served, counted and posted to a webhook; OTLP/HTTP logs are ingested like
//! batches; stored events are forwarded to an OTLP/HTTP endpoint exactly once.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use custos_api::Decision;
use custos_otlp::{ContentType, Message};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A local HTTP endpoint recording every request body (after gzip decoding) and answering
/// 200 with `answer`.
#[derive(Clone, Default)]
struct Recorder {
    bodies: Arc<Mutex<Vec<Request>>>,
}

/// A recorded request: path and body.
type Request = (String, Vec<u8>);

impl Recorder {
    async fn start(answer: &'static str) -> (Recorder, SocketAddr) {
        let recorder = Recorder::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = recorder.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let gz = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
                            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let body = if gz {
                                let mut out = Vec::new();
                                std::io::Read::read_to_end(
                                    &mut flate2::read::GzDecoder::new(&body[..]),
                                    &mut out,
                                )
                                .unwrap();
                                out
                            } else {
                                body
                            };
                            r.bodies.lock().unwrap().push((path, body));
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(answer))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (recorder, addr)
    }

    fn bodies(&self) -> Vec<Request> {
        self.bodies.lock().unwrap().clone()
    }
}

fn denial(id: &str, second: i64) -> custos_api::AuditEvent {
    let mut e = event(id, t0() + chrono::Duration::seconds(second));
    e.principal = "user:mallory".into();
    e.decision = Decision::Deny;
    e.reason = "deny_rule".into();
    e.status = 403;
    e.records_returned = 0;
    e
}

#[tokio::test]
async fn a_denial_burst_is_alerted_stored_counted_and_posted_once() {
    let (webhook, addr) = Recorder::start("ok").await;
    let mut h = Harness::sqlite_with(|c| {
        c.detect = Some(custos_detect::DetectConfig::default());
        c.alerts.webhook = Some(format!("http://{addr}/hooks/custos"));
    })
    .await;
    // 25 denials within 25 s (the default threshold is 20 in 5 minutes), sent twice: the
    // resend stores nothing and raises nothing.
    let burst: Vec<_> = (0..25).map(|i| denial(&format!("d{i:02}"), i)).collect();
    for _ in 0..2 {
        let (status, _) = h.post("application/x-ndjson", ndjson(&burst)).await;
        assert_eq!(status, 200);
    }
    until("the alert to be stored", || async {
        h.get("/v1/alerts").await.1["alerts"].as_array().unwrap().len() == 1
    })
    .await;
    let (_, answer) = h.get("/v1/alerts").await;
    let alert = &answer["alerts"][0];
    assert_eq!(alert["detector"], "denial_burst");
    assert_eq!(alert["principal"], "user:mallory");
    until("the webhook delivery", || async { webhook.bodies().len() == 1 }).await;
    let (path, body) = &webhook.bodies()[0];
    assert_eq!(path, "/hooks/custos");
    let posted: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(posted["id"], alert["id"], "the webhook gets the stored alert: {posted}");
    let (_, metrics) = h.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("custos_collector_alerts_total{")
            && l.contains("detector=\"denial_burst\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );
    h.stop().await;
    assert_eq!(webhook.bodies().len(), 1, "one alert, one delivery");
}

/// Two replicas on one PostgreSQL store, each receiving half of a principal's denials (12 +
/// 12, under the threshold of 20 each): one of them, the holder of the detection lease,
/// follows the store and sees all 24, raising one alert, stored and posted once. Before, each
/// replica saw only its own batches and none raised it. When it stops, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_store_detect_over_every_replicas_events() {
    let Some(store) = Store::postgres().await else { return };
    let Store::Postgres { base, schema } = &store else { unreachable!() };
    let second_store = Store::Postgres { base: base.clone(), schema: schema.clone() };
    let (webhook, addr) = Recorder::start("ok").await;
    let configure = |c: &mut custos_collector::CollectorConfig| {
        c.detect = Some(custos_detect::DetectConfig::default());
        c.alerts.webhook = Some(format!("http://{addr}/hooks/custos"));
    };
    let detecting = |h: &Harness| {
        let h = h.base.clone();
        async move {
            let text = client().get(format!("{h}/metrics")).send().await.unwrap().text().await.unwrap();
            text.lines().any(|l| l == "custos_collector_detecting 1")
        }
    };
    let mut first = Harness::on(store, configure).await;
    until("the first replica to take the detection lease", || detecting(&first)).await;
    let mut second = Harness::on(second_store, configure).await;
    let burst: Vec<_> = (0..24).map(|i| denial(&format!("d{i:02}"), i)).collect();
    assert_eq!(first.post("application/x-ndjson", ndjson(&burst[..12])).await.0, 200);
    assert_eq!(second.post("application/x-ndjson", ndjson(&burst[12..])).await.0, 200);
    until("the alert to be stored", || async {
        first.get("/v1/alerts").await.1["alerts"].as_array().unwrap().len() == 1
    })
    .await;
    until("the webhook delivery", || async { webhook.bodies().len() == 1 }).await;
    let (_, answer) = second.get("/v1/alerts").await;
    assert_eq!(answer["alerts"][0]["detector"], "denial_burst");
    assert!(answer["alerts"][0]["message"].as_str().unwrap().contains("denied 2"), "{answer}");

    // The first replica (the lease holder, started first) stops: the second takes over and
    // detects what comes next.
    assert!(!detecting(&second).await, "one replica detects");
    first.stop().await;
    until("the second replica to take over", || detecting(&second)).await;
    let other = |id: &str, second: i64| {
        let mut e = denial(id, second);
        e.principal = "user:trudy".into();
        e
    };
    let burst: Vec<_> = (0..24).map(|i| other(&format!("t{i:02}"), 100 + i)).collect();
    assert_eq!(second.post("application/x-ndjson", ndjson(&burst)).await.0, 200);
    until("the second replica's alert", || async {
        second.get("/v1/alerts").await.1["alerts"].as_array().unwrap().len() == 2
    })
    .await;
    second.stop().await;
    assert_eq!(webhook.bodies().len(), 2, "each alert posted once");
}

/// An event dated more than 10 minutes ahead is refused with a pointer at it and
/// `clockAhead`, which tells a sender to keep it for later rather than drop it (a node clock
/// ahead made every event of it dropped); other refusals say nothing of the kind.
#[tokio::test]
async fn an_event_from_a_clock_ahead_is_refused_as_such() {
    let mut h = Harness::sqlite_with(|_| {}).await;
    let now = chrono::Utc::now();
    let fine = event("fine", now);
    let ahead = event("ahead", now + chrono::Duration::minutes(20));
    let (status, body) = h.post("application/x-ndjson", ndjson(&[fine.clone(), ahead])).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("bad_event")), "{body}");
    assert_eq!((body["line"].as_u64(), body["clockAhead"].as_bool()), (Some(2), Some(true)), "{body}");
    let mut long = event("long", now);
    long.principal = "x".repeat(2_000);
    let (status, body) = h.post("application/x-ndjson", ndjson(&[fine, long])).await;
    assert_eq!(
        (status, body["reason"].as_str(), body["line"].as_u64()),
        (400, Some("bad_event"), Some(2)),
        "{body}"
    );
    assert!(body.get("clockAhead").is_none(), "{body}");
    // A batch over 33 days is the batch's fault: no pointer at the (valid) event that brought
    // in the 33rd day, so that a sender splits it rather than drop that event.
    let days: Vec<_> =
        (0..33).map(|d| event(&format!("day{d:02}"), now - chrono::Duration::days(d))).collect();
    let (status, body) = h.post("application/x-ndjson", ndjson(&days)).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("bad_event")), "{body}");
    assert!(body.get("line").is_none() && body.get("index").is_none(), "{body}");
    let (status, body) = h.post("application/x-ndjson", ndjson(&days[..32])).await;
    assert_eq!(status, 200, "{body}");
    h.stop().await;
}

/// An event dated ahead of the collector's clock (accepted within the store's 10 minutes of
/// skew) counts as received: the principal's later events, dated now, still reach the
/// windowed detectors. Before, it made them late for minutes: a bulk export behind it raised
/// no volume alert.
#[tokio::test]
async fn a_future_dated_event_does_not_blind_the_detectors() {
    let mut h = Harness::sqlite_with(|c| c.detect = Some(custos_detect::DetectConfig::default())).await;
    let now = chrono::Utc::now();
    let mut ahead = event("ahead", now + chrono::Duration::minutes(9));
    ahead.principal = "user:mallory".into();
    ahead.records_returned = 0;
    assert_eq!(h.post("application/x-ndjson", ndjson(&[ahead])).await.0, 200);
    let export: Vec<_> = (0..50)
        .map(|i| {
            let mut e = event(&format!("x{i:02}"), now + chrono::Duration::milliseconds(i * 10));
            e.principal = "user:mallory".into();
            e.records_returned = 10_000;
            e
        })
        .collect();
    assert_eq!(h.post("application/x-ndjson", ndjson(&export)).await.0, 200);
    until("the volume alert to be stored", || async {
        h.get("/v1/alerts").await.1["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["detector"] == "volume" && a["principal"] == "user:mallory")
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn without_detectors_nothing_is_alerted() {
    let mut h = Harness::sqlite().await;
    let burst: Vec<_> = (0..25).map(|i| denial(&format!("d{i:02}"), i)).collect();
    assert_eq!(h.post("application/x-ndjson", ndjson(&burst)).await.0, 200);
    assert_eq!(h.get("/v1/alerts").await.1["alerts"].as_array().unwrap().len(), 0);
    h.stop().await;
}

async fn post_logs(h: &Harness, content_type: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut request =
        h.client.post(format!("{}/v1/logs", h.base)).header("content-type", content_type).body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn otlp_logs_are_ingested_like_batches() {
    let mut h = Harness::sqlite().await;
    let sent = events("otlp-", 12);
    let body = custos_otlp::encode_logs_protobuf(&sent, &[("service.name".into(), "custos-sidecar".into())]);
    let (status, answer) = post_logs(&h, "application/x-protobuf", Some(TOKEN), body.clone()).await;
    assert_eq!(status, 200);
    let answer = custos_otlp::ExportLogsServiceResponse::decode(&answer[..]).unwrap();
    assert!(answer.partial_success.is_none_or(|p| p.rejected_log_records == 0));
    // Idempotent like /v1/events.
    assert_eq!(post_logs(&h, "application/x-protobuf", Some(TOKEN), body).await.0, 200);
    assert_exactly(&h.stored_ids().await, &ids(&sent));

    // The OTLP/JSON fixture: 2 audit events and 3 records that are not.
    let fixture = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../otlp/testdata/logs.json")).unwrap();
    let expected = custos_otlp::decode_logs(&fixture, ContentType::Json).unwrap();
    let (status, answer) = post_logs(&h, "application/json", Some(TOKEN), fixture).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    // OTLP/JSON writes 64-bit integers as strings.
    assert_eq!(answer["partialSuccess"]["rejectedLogRecords"], "3", "{answer}");
    let mut want = ids(&sent);
    want.extend(ids(&expected.events));
    assert_exactly(&h.stored_ids().await, &want);

    // Errors: no token, wrong media type, malformed protobuf; nothing stored.
    assert_eq!(post_logs(&h, "application/x-protobuf", None, vec![]).await.0, 401);
    assert_eq!(post_logs(&h, "text/plain", Some(TOKEN), b"x".to_vec()).await.0, 415);
    let (status, answer) = post_logs(&h, "application/x-protobuf", Some(TOKEN), vec![0xff, 0xff, 0xff]).await;
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["reason"], "bad_body");
    assert_exactly(&h.stored_ids().await, &want);
    h.stop().await;
}

#[tokio::test]
async fn stored_events_are_forwarded_over_otlp_once() {
    let (sink, addr) = Recorder::start("").await;
    let mut h = Harness::sqlite_with(|c| {
        let mut export = custos_otlp::ExporterConfig::new(format!("http://{addr}"));
        export.flush_interval = Duration::from_millis(50);
        c.otlp_export = Some(export);
    })
    .await;
    let first = events("fwd-a", 30);
    let second = events("fwd-b", 5);
    assert_eq!(h.post("application/x-ndjson", ndjson(&first)).await.0, 200);
    // A resend (all duplicates) and a partial resend forward only what is new.
    assert_eq!(h.post("application/x-ndjson", ndjson(&first)).await.0, 200);
    let mut mixed = first[..10].to_vec();
    mixed.extend(second.clone());
    assert_eq!(h.post("application/json", json_array(&mixed)).await.0, 200);
    h.stop().await;
    let mut forwarded = Vec::new();
    for (path, body) in sink.bodies() {
        assert_eq!(path, "/v1/logs");
        forwarded.extend(custos_otlp::decode_logs(&body, ContentType::Protobuf).unwrap().events);
    }
    let mut want = ids(&first);
    want.extend(ids(&second));
    assert_exactly(&ids(&forwarded), &want);
}
