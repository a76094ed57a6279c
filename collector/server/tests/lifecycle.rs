//! Probes and metrics, graceful shutdown (in-flight requests finish, bounded by the timeout),
//! extra routes, and retention (pruning keeps the chain verifiable; a broken chain stops it;
//! events older than the pruned part are not stored again).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use chrono::Utc;
use common::*;
use custos_collector::CollectorState;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

const NDJSON: &str = "application/x-ndjson";

#[tokio::test]
async fn probes_and_metrics_need_no_token_and_label_routes_by_template() {
    let h = Harness::sqlite().await;
    assert_eq!(h.get_text("/healthz").await, (200, "ok\n".to_owned()));
    let response = h.client.get(format!("{}/ready", h.base)).send().await.unwrap();
    let (status, ready) = answer(response).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["head"]["seq"], 0);
    assert_eq!(ready["backend"], "sqlite");

    assert_eq!(h.post(NDJSON, ndjson(&events("m", 3))).await.0, 200);
    let subject = "ab".repeat(32);
    assert_eq!(h.get(&format!("/v1/subjects/{subject}")).await.0, 200);
    assert_eq!(h.get("/no/such/path").await.0, 404);
    let response = h.client.get(format!("{}/ready", h.base)).send().await.unwrap();
    assert_eq!(answer(response).await.1["head"]["seq"], 3);

    let (status, metrics) = h.get_text("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "custos_collector_events_ingested_total 3",
        "custos_collector_events_duplicate_total 0",
        "custos_collector_requests_total{endpoint=\"/v1/events\",status=\"200\"} 1",
        "custos_collector_requests_total{endpoint=\"/v1/subjects/{hash}\",status=\"200\"} 1",
        "custos_collector_requests_total{endpoint=\"unmatched\",status=\"404\"} 1",
        "custos_collector_requests_total{endpoint=\"/ready\",status=\"200\"} 2",
        "custos_collector_store_seconds_count{op=\"ingest\"} 1",
        "custos_collector_store_seconds_count{op=\"subject\"} 1",
        "custos_collector_prune_deleted_total 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    assert!(!metrics.contains(&subject), "raw paths are not labels");
}

/// An extra route whose handler reports that it started and then waits to be released.
fn gated_route(
    entered: mpsc::Sender<()>,
    release: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
) -> Router<CollectorState> {
    Router::new().route(
        "/v1/slow",
        post(move || {
            let entered = entered.clone();
            let release = release.lock().unwrap().take();
            async move {
                let _ = entered.send(()).await;
                if let Some(release) = release {
                    let _ = release.await;
                }
                "done"
            }
        }),
    )
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    let (entered_tx, mut entered) = mpsc::channel(1);
    let (release_tx, release_rx) = oneshot::channel();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let mut h = Harness::sqlite_with(|c| {
        c.extra_routes = Some(gated_route(entered_tx, release));
        c.shutdown_timeout = Duration::from_secs(30);
    })
    .await;

    // Extra routes are authenticated like the rest of /v1.
    let response = h.client.post(format!("{}/v1/slow", h.base)).send().await.unwrap();
    assert_eq!(answer(response).await, (401, json!({"error": "unauthorized", "reason": "missing_token"})));

    let request = h.client.post(format!("{}/v1/slow", h.base)).bearer_auth(TOKEN).send();
    let in_flight = tokio::spawn(request);
    tokio::time::timeout(Duration::from_secs(30), entered.recv()).await.unwrap().unwrap();

    let running = h.running.take().unwrap();
    let addr = running.addr();
    running.shutdown_handle().trigger();
    let stopped = tokio::spawn(running.wait());
    until("the listener to close", || async { tokio::net::TcpStream::connect(addr).await.is_err() }).await;
    assert!(!stopped.is_finished(), "waits for the in-flight request");

    release_tx.send(()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(30), stopped).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_is_bounded_by_its_timeout() {
    let (entered_tx, mut entered) = mpsc::channel(1);
    // Never released.
    let (_release_tx, release_rx) = oneshot::channel();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let mut h = Harness::sqlite_with(|c| {
        c.extra_routes = Some(gated_route(entered_tx, release));
        c.shutdown_timeout = Duration::from_millis(200);
    })
    .await;
    let in_flight = tokio::spawn(h.client.post(format!("{}/v1/slow", h.base)).bearer_auth(TOKEN).send());
    tokio::time::timeout(Duration::from_secs(30), entered.recv()).await.unwrap().unwrap();
    h.stop().await;
    let result = tokio::time::timeout(Duration::from_secs(30), in_flight).await.unwrap().unwrap();
    assert!(result.is_err(), "the connection of the unfinished request was closed");
}

fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[tokio::test]
async fn retention_prunes_old_events_and_the_chain_still_verifies() {
    let h = Harness::sqlite_with(|c| {
        c.retention = Some(Duration::from_secs(30 * 86_400));
        c.prune_interval = Duration::from_millis(100);
    })
    .await;
    let now = Utc::now();
    let old: Vec<_> = (0..10)
        .map(|i| event(&format!("old{i}"), now - chrono::Duration::days(60) + chrono::Duration::seconds(i)))
        .collect();
    let recent: Vec<_> = (0..5)
        .map(|i| event(&format!("new{i}"), now - chrono::Duration::days(1) + chrono::Duration::seconds(i)))
        .collect();
    assert_eq!(h.post(NDJSON, ndjson(&old)).await.0, 200);
    assert_eq!(h.post(NDJSON, ndjson(&recent)).await.0, 200);

    until("retention to prune the old events", || async {
        let (_, metrics) = h.get_text("/metrics").await;
        metric_value(&metrics, "custos_collector_prune_deleted_total") == Some(10.0)
    })
    .await;
    assert_exactly(&h.stored_ids().await, &ids(&recent));
    let (status, report) = h.get("/v1/verify").await;
    assert_eq!(status, 200);
    assert!(report["firstBroken"].is_null(), "{report}");
    assert_eq!(report["start"]["seq"], 10, "verifies from the anchor left by pruning");
    assert_eq!(report["checked"], 5);
    let (_, metrics) = h.get_text("/metrics").await;
    assert!(metric_value(&metrics, "custos_collector_prune_runs_total{result=\"ok\"}").unwrap() >= 1.0);

    // A sender resending the pruned events (a spool delivered late) is acknowledged, and
    // nothing is stored again: the ids are gone, the events would only be pruned again.
    let (status, body) = h.post(NDJSON, ndjson(&old)).await;
    assert_eq!((status, body), (200, serde_json::json!({"accepted": 0, "duplicates": 0, "expired": 10})));
    assert_exactly(&h.stored_ids().await, &ids(&recent));
    let (_, metrics) = h.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, "custos_collector_events_expired_total"), Some(10.0));
}

/// `--max-event-age`: events dated longer ago than it are acknowledged as expired and not
/// stored, event by event (the rest of the batch is stored), whether retention is set or not.
#[tokio::test]
async fn events_older_than_the_max_event_age_are_expired_not_stored() {
    let h = Harness::sqlite_with(|c| c.max_event_age = Some(Duration::from_secs(7 * 86_400))).await;
    let now = Utc::now();
    let batch = vec![
        event("fresh", now - chrono::Duration::minutes(5)),
        event("epoch", chrono::DateTime::from_timestamp(0, 0).unwrap()),
        event("spooled", now - chrono::Duration::days(6)),
        event("stale", now - chrono::Duration::days(8)),
    ];
    let (status, body) = h.post(NDJSON, ndjson(&batch)).await;
    assert_eq!((status, body), (200, serde_json::json!({"accepted": 2, "duplicates": 0, "expired": 2})));
    assert_exactly(&h.stored_ids().await, &["fresh".to_owned(), "spooled".to_owned()]);
    let (_, metrics) = h.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, "custos_collector_events_expired_total"), Some(2.0));
}

/// The maximum age is measured from the newest event known when the clock is later: a
/// collector whose clock ran 60 days ahead of its senders (here: a store whose newest event is
/// 60 days old, as such a collector sees it) still stores what they send now; only what is
/// older than the maximum age before that is expired.
#[tokio::test]
async fn the_max_event_age_follows_the_events_not_a_clock_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let url = format!("sqlite:{}", path.display());
    let now = Utc::now();
    {
        let store = custos_store::open(&url).await.unwrap();
        store.ingest(&[event("before", now - chrono::Duration::days(60))]).await.unwrap();
    }
    let h = Harness::start(dir, Store::Sqlite { path }, |c| {
        c.max_event_age = Some(Duration::from_secs(30 * 86_400))
    })
    .await;
    // The senders' "now" is 45 days before the collector's.
    let batch = vec![
        event("current", now - chrono::Duration::days(45)),
        event("spooled", now - chrono::Duration::days(70)),
        event("too-old", now - chrono::Duration::days(80)),
    ];
    let (status, body) = h.post(NDJSON, ndjson(&batch)).await;
    assert_eq!((status, body), (200, serde_json::json!({"accepted": 2, "duplicates": 0, "expired": 1})));
    assert_exactly(&h.stored_ids().await, &["before".to_owned(), "current".to_owned(), "spooled".to_owned()]);
    // A later batch of spooled events alone is measured from the newest stored ("current").
    let (status, body) = h.post(NDJSON, ndjson(&[event("late", now - chrono::Duration::days(72))])).await;
    assert_eq!((status, body), (200, serde_json::json!({"accepted": 1, "duplicates": 0})));
}

#[tokio::test]
async fn retention_stops_instead_of_pruning_over_a_broken_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let url = format!("sqlite:{}", path.display());
    let now = Utc::now();
    let old: Vec<_> = (0..10).map(|i| event(&format!("old{i}"), now - chrono::Duration::days(60))).collect();
    let recent: Vec<_> = (0..3).map(|i| event(&format!("new{i}"), now)).collect();
    {
        let store = custos_store::open(&url).await.unwrap();
        store.ingest(&old).await.unwrap();
        store.ingest(&recent).await.unwrap();
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(
        "UPDATE events SET body = replace(body, 'rule read allows', 'rule read allowz') WHERE seq = 4",
    )
    .unwrap();
    drop(conn);

    let h = Harness::start(dir, Store::Sqlite { path }, |c| {
        c.retention = Some(Duration::from_secs(30 * 86_400));
        c.prune_interval = Duration::from_millis(50);
    })
    .await;
    until("retention to find the broken chain", || async {
        let (_, metrics) = h.get_text("/metrics").await;
        metric_value(&metrics, "custos_collector_retention_halted") == Some(1.0)
    })
    .await;
    let (_, metrics) = h.get_text("/metrics").await;
    assert_eq!(
        metric_value(&metrics, "custos_collector_prune_runs_total{result=\"chain_broken\"}"),
        Some(1.0)
    );
    assert_eq!(metric_value(&metrics, "custos_collector_prune_deleted_total"), Some(0.0));
    let mut all = ids(&old);
    all.extend(ids(&recent));
    assert_exactly(&h.stored_ids().await, &all);
    let (_, report) = h.get("/v1/verify").await;
    assert_eq!(report["firstBroken"]["seq"], 4, "{report}");
}

/// A connection that starts no request within `--header-read-timeout` is closed, whether it
/// sent nothing, part of the h2c preface (hyper-util's protocol detection has no timer of its
/// own) or part of an HTTP/1.1 head; one that sends its request in time is answered.
#[tokio::test]
async fn connections_without_a_request_are_closed_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::sqlite_with(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let addr = h.running().addr();
    let mut stalled = Vec::new();
    for head in ["", "PRI * HTTP/2.0\r\n", "GET /healthz HTTP/1.1\r\nHost: a\r\n"] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        stalled.push((head, c));
    }
    let mut prompt = tokio::net::TcpStream::connect(addr).await.unwrap();
    prompt.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), prompt.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for (head, mut c) in stalled {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a connection that sent {head:?} is still open");
        assert!(rest.is_empty() || !rest.starts_with(b"HTTP/1.1 200"), "{head:?}");
    }
}
