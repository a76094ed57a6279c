//! `POST /v1/events` over real TCP: malformed input, idempotency (SQLite and PostgreSQL), the
//! real custos-shipper client, and the post-commit observer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use custos_collector::StoredBatch;
use custos_shipper::{Shipper, ShipperConfig, ShipperMetrics};
use serde_json::{Value, json};

const NDJSON: &str = "application/x-ndjson";
const JSON: &str = "application/json";

/// One malformed request and the answer it must get.
struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    encoding: Option<&'static str>,
    token: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    reason: &'static str,
    /// Fields the answer must carry (e.g. `line`, `index`, `version`).
    fields: Vec<(&'static str, Value)>,
    /// Text the message must contain.
    mentions: Vec<&'static str>,
}

fn case(name: &'static str, body: Vec<u8>, status: u16, reason: &'static str) -> Case {
    Case {
        name,
        content_type: Some(NDJSON),
        encoding: None,
        token: Some(TOKEN),
        body,
        status,
        reason,
        fields: vec![],
        mentions: vec![],
    }
}

/// NDJSON lines: good events, with line `bad_line` (1-based) replaced by `bad`.
fn lines_with(bad_line: usize, bad: &str) -> Vec<u8> {
    let good = events("ok", 4);
    let mut out = Vec::new();
    for (i, e) in good.iter().enumerate() {
        if i + 1 == bad_line {
            out.extend_from_slice(bad.as_bytes());
        } else {
            out.extend_from_slice(&serde_json::to_vec(e).unwrap());
        }
        out.push(b'\n');
    }
    out
}

fn event_json(id: &str) -> Value {
    serde_json::to_value(event(id, t0())).unwrap()
}

#[tokio::test]
async fn malformed_batches_are_refused_with_a_reason_and_store_nothing() {
    let h = Harness::sqlite_with(|c| {
        c.limits.max_batch_bytes = 64 << 10;
        c.limits.max_batch_events = 50;
    })
    .await;
    // Something stored first, so that "unchanged" is not just "empty".
    let (status, _) = h.post(NDJSON, ndjson(&events("base", 3))).await;
    assert_eq!(status, 200);
    let head_before = h.head().await;

    let full = serde_json::to_string(&event_json("trunc")).unwrap();
    let mut wrong_type = event_json("wt");
    wrong_type["status"] = json!("PRIVATE-VALUE-1");
    let mut missing = event_json("mf");
    missing.as_object_mut().unwrap().remove("principal");
    let mut future = event_json("fv");
    future["schemaVersion"] = json!(99);
    future["brandNewField"] = json!({"x": 1});
    let mut bad_time = event_json("bt");
    bad_time["time"] = json!("yesterday");
    let mut bad_decision = event_json("bd");
    bad_decision["decision"] = json!("PRIVATE-VALUE-2");
    let mut array = vec![event_json("a0"), event_json("a1"), event_json("a2")];
    array[2]["records_returned_typo"] = json!(1);
    array[2]["recordsReturned"] = json!(-5);

    let big_line = {
        let mut e = event("big", t0());
        e.reason = "x".repeat(1000);
        serde_json::to_string(&e).unwrap()
    };
    let oversize: Vec<u8> = std::iter::repeat_n(format!("{big_line}\n"), 80).collect::<String>().into_bytes();
    let bomb = gzip(&oversize);
    assert!(bomb.len() < 64 << 10, "the compressed body itself is under the limit");

    let cases = vec![
        case("empty body", vec![], 400, "empty_batch"),
        case("blank lines only", b"\n \r\n\n".to_vec(), 400, "empty_batch"),
        Case {
            fields: vec![("line", json!(1))],
            ..case("not JSON", b"hello there\n".to_vec(), 400, "bad_event")
        },
        Case {
            fields: vec![("line", json!(3))],
            mentions: vec!["line 3", "truncated"],
            ..case("truncated line 3", lines_with(3, &full[..full.len() / 2]), 400, "bad_event")
        },
        Case {
            fields: vec![("line", json!(2))],
            mentions: vec!["line 2", "field `status`", "expected u16"],
            ..case("wrong field type", lines_with(2, &wrong_type.to_string()), 400, "bad_event")
        },
        Case {
            fields: vec![("line", json!(4))],
            mentions: vec!["missing field `principal`"],
            ..case("missing required field", lines_with(4, &missing.to_string()), 400, "bad_event")
        },
        Case {
            fields: vec![("line", json!(1))],
            mentions: vec!["field `decision`", "WouldDeny"],
            ..case("unknown enum value", lines_with(1, &bad_decision.to_string()), 400, "bad_event")
        },
        Case {
            fields: vec![("line", json!(2)), ("version", json!(99)), ("supported", json!([1]))],
            ..case(
                "unknown schema version",
                lines_with(2, &future.to_string()),
                400,
                "unsupported_schema_version",
            )
        },
        Case {
            fields: vec![("line", json!(3))],
            mentions: vec!["time is not RFC 3339"],
            ..case("time refused by the store", lines_with(3, &bad_time.to_string()), 400, "bad_event")
        },
        Case {
            content_type: Some(JSON),
            fields: vec![("index", json!(2))],
            mentions: vec!["index 2", "field `recordsReturned`"],
            ..case("array with a bad element", serde_json::to_vec(&array).unwrap(), 400, "bad_event")
        },
        Case {
            content_type: Some(JSON),
            fields: vec![("index", json!(1))],
            ..case(
                "array truncated in element 1",
                {
                    let text = serde_json::to_string(&vec![event_json("t0"), event_json("t1")]).unwrap();
                    text.as_bytes()[..text.len() - 40].to_vec()
                },
                400,
                "bad_event",
            )
        },
        Case {
            content_type: Some(JSON),
            mentions: vec!["not a JSON array"],
            ..case(
                "JSON object instead of an array",
                event_json("o").to_string().into_bytes(),
                400,
                "bad_event",
            )
        },
        Case {
            content_type: Some("text/plain"),
            ..case("wrong content type", ndjson(&events("ct", 2)), 415, "unsupported_media_type")
        },
        Case {
            content_type: None,
            ..case("no content type", ndjson(&events("nc", 2)), 415, "unsupported_media_type")
        },
        Case {
            encoding: Some("br"),
            ..case("unsupported encoding", ndjson(&events("br", 2)), 415, "unsupported_media_type")
        },
        Case {
            encoding: Some("gzip"),
            ..case("corrupt gzip", b"\x1f\x8b\x08\x00garbage-not-deflate".to_vec(), 400, "bad_encoding")
        },
        Case {
            encoding: Some("gzip"),
            ..case(
                "truncated gzip",
                {
                    let g = gzip(&ndjson(&events("tg", 5)));
                    g[..g.len() - 10].to_vec()
                },
                400,
                "bad_encoding",
            )
        },
        Case {
            fields: vec![("limit", json!(64 << 10)), ("unit", json!("bytes"))],
            ..case("oversize body", oversize.clone(), 413, "batch_too_large")
        },
        Case { encoding: Some("gzip"), ..case("oversize once decompressed", bomb, 413, "batch_too_large") },
        Case {
            fields: vec![("limit", json!(50)), ("unit", json!("events"))],
            ..case("too many events", ndjson(&events("many", 51)), 413, "batch_too_large")
        },
        Case {
            content_type: Some(JSON),
            ..case("too many events in an array", json_array(&events("manya", 51)), 413, "batch_too_large")
        },
        Case { token: None, ..case("missing token", ndjson(&events("nt", 2)), 401, "missing_token") },
        Case {
            token: Some("wrong-token"),
            ..case("wrong token", ndjson(&events("wt", 2)), 401, "invalid_token")
        },
    ];

    for c in cases {
        let (status, body) = h.post_with(c.content_type, c.encoding, c.token, c.body).await;
        assert_eq!(status, c.status, "{}: {body}", c.name);
        assert_eq!(body["reason"], json!(c.reason), "{}: {body}", c.name);
        assert!(body["error"].is_string(), "{}: {body}", c.name);
        for (key, value) in &c.fields {
            assert_eq!(&body[*key], value, "{}: field {key} of {body}", c.name);
        }
        let message = body["error"].as_str().unwrap();
        for needle in &c.mentions {
            assert!(message.contains(needle), "{}: {message:?} should mention {needle:?}", c.name);
        }
        assert!(!message.contains("PRIVATE-VALUE"), "{}: the message echoes a value: {message}", c.name);
        assert_eq!(h.head().await, head_before, "{}: the store changed", c.name);
    }
    assert_exactly(&h.stored_ids().await, &ids(&events("base", 3)));

    // The same limits accept a batch just within them.
    let (status, body) = h.post(NDJSON, ndjson(&events("fits", 50))).await;
    assert_eq!((status, &body["accepted"]), (200, &json!(50)), "{body}");
    let (_, metrics) = h.get_text("/metrics").await;
    assert!(metrics.contains("custos_collector_batches_rejected_total{reason=\"bad_event\"}"), "{metrics}");
    assert!(
        metrics.contains("custos_collector_batches_rejected_total{reason=\"missing_token\"} 1"),
        "{metrics}"
    );
}

async fn idempotent_reingest(h: &Harness) {
    let batch = events("idem", 20);
    let (status, body) = h.post(NDJSON, ndjson(&batch)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 20, "duplicates": 0}));
    let head = h.head().await;
    assert_eq!(head.seq, 20);

    // The same batch again, gzip-compressed this time, and once more as a JSON array.
    let (status, body) = h.post_with(Some(NDJSON), Some("gzip"), Some(TOKEN), gzip(&ndjson(&batch))).await;
    assert_eq!((status, body), (200, json!({"accepted": 0, "duplicates": 20})));
    let (status, body) = h.post(JSON, json_array(&batch)).await;
    assert_eq!((status, body), (200, json!({"accepted": 0, "duplicates": 20})));
    assert_eq!(h.head().await, head, "nothing chained by the resends");

    // A batch overlapping the stored one: only the new events are stored; an id repeated
    // within the batch is stored once.
    let mut overlap = events("idem", 25);
    overlap.push(overlap[24].clone());
    let (status, body) = h.post(NDJSON, ndjson(&overlap)).await;
    assert_eq!((status, body), (200, json!({"accepted": 5, "duplicates": 21})));
    assert_exactly(&h.stored_ids().await, &ids(&events("idem", 25)));
    assert!(h.store().verify(None).await.unwrap().is_ok());
}

#[tokio::test]
async fn reingesting_a_batch_stores_nothing_twice_sqlite() {
    let h = Harness::sqlite().await;
    idempotent_reingest(&h).await;
}

#[tokio::test]
async fn reingesting_a_batch_stores_nothing_twice_postgres() {
    let Some(store) = Store::postgres().await else { return };
    let mut h = Harness::on(store, |_| {}).await;
    idempotent_reingest(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn the_shipper_delivers_every_event_exactly_once() {
    let h = Harness::sqlite().await;
    let spool = tempfile::tempdir().unwrap();
    let mut config = ShipperConfig::new(Some(h.base.clone()), spool.path().to_path_buf());
    config.token_file = Some(h.token_file.clone());
    config.batch_max_events = 7;
    config.flush_interval = Duration::from_millis(20);
    config.retry_initial_backoff = Duration::from_millis(20);
    config.retry_max_backoff = Duration::from_millis(200);
    assert!(config.gzip, "the shipper compresses by default");
    let metrics = ShipperMetrics::new();
    let (shipper, task) = Shipper::start(config, metrics).unwrap();
    let batch: Vec<_> = (0..120)
        .map(|i| {
            let mut e = event(&format!("ship{i:04}"), t0() + chrono::Duration::milliseconds(i));
            e.record_hashes = vec![format!("{:064x}", i % 5)];
            e
        })
        .collect();
    for e in &batch {
        shipper.emit(e.clone());
    }
    // Emitted twice (as after a sidecar crash between send and acknowledgement).
    for e in &batch[..10] {
        shipper.emit(e.clone());
    }
    until("the shipper's events to be stored", || async { h.head().await.seq >= 120 }).await;
    let report = shipper.shutdown(Duration::from_secs(10)).await;
    task.await.unwrap();
    assert_eq!(report.dropped, 0);
    assert_eq!(report.spooled_events, 0);
    assert_exactly(&h.stored_ids().await, &ids(&batch));
    assert_eq!(h.head().await.seq, 120);
    let (_, metrics) = h.get_text("/metrics").await;
    assert!(metrics.contains("custos_collector_events_ingested_total 120"), "{metrics}");
    assert!(metrics.contains("custos_collector_events_duplicate_total 10"), "{metrics}");
}

#[tokio::test]
async fn rotated_token_file_takes_effect_without_restart() {
    let h = Harness::sqlite().await;
    let (status, _) = h.post(NDJSON, ndjson(&events("r", 1))).await;
    assert_eq!(status, 200);
    let next = h.dir.path().join("token.next");
    std::fs::write(&next, "rotated-token-42\n").unwrap();
    std::fs::rename(&next, &h.token_file).unwrap();
    let (status, body) = h.post(NDJSON, ndjson(&events("r", 2))).await;
    assert_eq!((status, &body["reason"]), (401, &json!("invalid_token")));
    let (status, body) =
        h.post_with(Some(NDJSON), None, Some("rotated-token-42"), ndjson(&events("r", 2))).await;
    assert_eq!((status, body), (200, json!({"accepted": 1, "duplicates": 1})));
}

/// A namespace token (what the operator gives a namespace's sidecars) sends its namespace's
/// events and reads its usage, nothing else (a review's probe: the one shared token let a
/// namespace's sidecars write events claiming another namespace and read everyone's audit
/// trail). The collector token still does everything.
#[tokio::test]
async fn a_namespace_token_sends_its_namespace_events_and_reads_its_usage_only() {
    let h = Harness::sqlite().await;
    let shop = custos_api::collector::namespace_token(TOKEN, "shop");
    let (status, body) = h.post_with(Some(NDJSON), None, Some(&shop), ndjson(&events("ns", 3))).await;
    assert_eq!((status, body), (200, json!({"accepted": 3, "duplicates": 0})));

    // Another namespace's event in the batch: refused whole, pointing at it.
    let mut mixed = events("mx", 3);
    mixed[1].namespace = "billing".into();
    let (status, body) = h.post_with(Some(NDJSON), None, Some(&shop), ndjson(&mixed)).await;
    assert_eq!(
        (status, &body["reason"], &body["line"]),
        (403, &json!("wrong_namespace"), &json!(2)),
        "{body}"
    );
    assert_eq!(h.stored_ids().await.len(), 3, "nothing of the refused batch stored");

    let get = |path: &str, token: &str| {
        h.client.get(format!("{}{path}", h.base)).bearer_auth(token.to_owned()).send()
    };
    let usage = "/v1/usage?policy=customers&principal=user%3Aalice";
    let (status, body) = answer(get(usage, &shop).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = answer(get(&format!("{usage}&namespace=billing"), &shop).await.unwrap()).await;
    assert_eq!((status, &body["reason"]), (403, &json!("wrong_namespace")), "{body}");
    for path in [
        "/v1/events",
        "/v1/subjects/00000000000000000000000000000000000000000000000000000000000000aa",
        "/v1/top",
        "/v1/alerts",
        "/v1/verify",
    ] {
        let (status, body) = answer(get(path, &shop).await.unwrap()).await;
        assert_eq!((status, &body["reason"]), (403, &json!("namespace_token_scope")), "{path}: {body}");
    }
    // Forged or of another collector token: 401.
    let forged = format!("{}0", &shop[..shop.len() - 1]);
    for bad in [
        forged.as_str(),
        &custos_api::collector::namespace_token("another-token", "shop"),
        "custos-ns.shop.xyz",
    ] {
        let (status, body) = h.post_with(Some(NDJSON), None, Some(bad), ndjson(&events("f", 1))).await;
        assert_eq!((status, &body["reason"]), (401, &json!("invalid_token")), "{bad}");
    }
    // The collector token: everything.
    assert_eq!(h.get("/v1/events").await.0, 200);
    let (status, _) = h.post(NDJSON, ndjson(&mixed)).await;
    assert_eq!(status, 200);
    // A rotated collector token rotates the namespace tokens with it.
    let next = h.dir.path().join("token.next");
    std::fs::write(&next, "rotated-token-42\n").unwrap();
    std::fs::rename(&next, &h.token_file).unwrap();
    let (status, _) = h.post_with(Some(NDJSON), None, Some(&shop), ndjson(&events("ns", 3))).await;
    assert_eq!(status, 401);
    let rotated = custos_api::collector::namespace_token("rotated-token-42", "shop");
    assert_eq!(h.post_with(Some(NDJSON), None, Some(&rotated), ndjson(&events("ns", 3))).await.0, 200);
}

/// Senders trickling their bodies do not hold the batch slots (a review's finding: four slow
/// uploads, one per slot, stalled every other sender for up to a minute each).
#[tokio::test]
async fn slow_uploads_do_not_hold_the_batch_slots() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::sqlite().await;
    let addr = h.base.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n{{\"id\""
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Well within the 60 s the slow bodies may take: a guard against the stall, not a timing.
    let sent = tokio::time::timeout(Duration::from_secs(30), h.post(NDJSON, ndjson(&events("fast", 2))))
        .await
        .expect("a batch waited behind slow uploads");
    assert_eq!(sent, (200, json!({"accepted": 2, "duplicates": 0})));
    drop(slow);
}

#[tokio::test]
async fn unauthenticated_mode_accepts_requests_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = custos_collector::CollectorConfig::new(
        format!("sqlite:{}", dir.path().join("a.db").display()),
        custos_collector::Auth::Unauthenticated,
    );
    config.listen = "127.0.0.1:0".parse().unwrap();
    let running = custos_collector::start(config).await.unwrap();
    let response = client()
        .post(format!("http://{}/v1/events", running.addr()))
        .header("content-type", NDJSON)
        .body(ndjson(&events("u", 2)))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(response).await, (200, json!({"accepted": 2, "duplicates": 0})));
    running.shutdown().await;
}

#[tokio::test]
async fn committed_batches_reach_the_observer_without_blocking_the_ack() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<StoredBatch>(1);
    let h = Harness::sqlite_with(|c| c.observer = Some(tx)).await;

    let first = events("obs", 4);
    assert_eq!(h.post(NDJSON, ndjson(&first)).await.0, 200);
    let got = rx.try_recv().expect("offered before the answer");
    assert_eq!(got.duplicates, 0);
    assert_eq!(ids(&got.events), ids(&first));

    // A pure resend stores nothing: nothing is offered.
    assert_eq!(h.post(NDJSON, ndjson(&first)).await.0, 200);
    assert!(rx.try_recv().is_err());

    // Of a partial resend, only what was stored is offered; a resent id whose fields differ
    // from the stored event's is not offered either (the detectors would count a forgery).
    let mut overlap = events("obs", 6);
    overlap[1].principal = "spiffe://cluster.local/ns/other/sa/forged".into();
    assert_eq!(h.post(NDJSON, ndjson(&overlap)).await.1, json!({"accepted": 2, "duplicates": 4}));
    let got = rx.try_recv().unwrap();
    assert_eq!(got.duplicates, 4);
    assert_eq!(ids(&got.events), vec!["obs004".to_owned(), "obs005".to_owned()]);

    // A full channel does not delay the acknowledgement: the batch is counted as dropped.
    assert_eq!(h.post(NDJSON, ndjson(&events("full", 3))).await.0, 200);
    assert_eq!(h.post(NDJSON, ndjson(&events("over", 5))).await.1, json!({"accepted": 5, "duplicates": 0}));
    let (_, metrics) = h.get_text("/metrics").await;
    assert!(metrics.contains("custos_collector_observer_dropped_events_total 5"), "{metrics}");
    assert_eq!(ids(&rx.try_recv().unwrap().events), ids(&events("full", 3)));
    assert_eq!(h.head().await.seq, 14, "the dropped batch is stored all the same");
}
