//! The query endpoints through HTTP: events (filters, cursor paging), subjects, top, alerts,
//! usage (with the sidecar's real `UsageClient`), verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use custos_api::{AuditEvent, Decision};
use custos_shipper::UsageClient;
use custos_store::{Alert, Severity};
use serde_json::{Value, json};

const NDJSON: &str = "application/x-ndjson";

fn hash(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// 30 events: decisions cycle Allow/Deny/WouldDeny, principals alice/bob/carol by thirds,
/// namespaces shop (even) / bank (odd), one second apart from t0.
fn corpus() -> Vec<AuditEvent> {
    (0..30)
        .map(|i| {
            let mut e = event(&format!("q{i:03}"), t0() + chrono::Duration::seconds(i as i64));
            e.decision = [Decision::Allow, Decision::Deny, Decision::WouldDeny][i % 3];
            let who = ["alice", "bob", "carol"][i / 10];
            e.principal = format!("user:{who}");
            e.namespace = if i % 2 == 0 { "shop".into() } else { "bank".into() };
            e.records_returned = (i as u64) + 1;
            if i % 4 == 0 {
                e.record_hashes = vec![hash(7)];
            }
            if i % 3 == 0 {
                // Allowed, with a stricter policy dry-run beside the deciding one: it would deny
                // every other one.
                let decision = if i % 6 == 0 { Decision::WouldDeny } else { Decision::Allow };
                e.dry_runs = vec![custos_api::audit::DryRun {
                    policy: "stricter".into(),
                    rule: None,
                    principal: None,
                    decision,
                    reason: "default_deny".into(),
                    charged: false,
                    transform: None,
                }];
            }
            e
        })
        .collect()
}

fn event_ids(answer: &Value) -> Vec<String> {
    answer["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

async fn loaded() -> Harness {
    let h = Harness::sqlite().await;
    let (status, body) = h.post(NDJSON, ndjson(&corpus())).await;
    assert_eq!(status, 200, "{body}");
    h
}

#[tokio::test]
async fn events_filters_and_cursor_paging() {
    let h = loaded().await;
    let all = corpus();

    let (status, page) = h.get("/v1/events?namespace=shop&decision=Deny").await;
    assert_eq!(status, 200, "{page}");
    let want: Vec<String> = all
        .iter()
        .rev()
        .filter(|e| e.namespace == "shop" && e.decision == Decision::Deny)
        .map(|e| e.id.clone())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(event_ids(&page), want, "filtered, newest first");
    assert!(page["nextCursor"].is_null());
    assert!(page["events"][0]["prevHash"].is_string(), "events come back as stored, chained");

    // What the stricter policy's dry runs would deny.
    let (status, page) = h.get("/v1/events?dryRunPolicy=stricter&dryRunDecision=wouldDeny").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(event_ids(&page), ["q024", "q018", "q012", "q006", "q000"]);
    let (_, page) = h.get("/v1/events?dryRunPolicy=stricter&namespace=bank").await;
    assert_eq!(event_ids(&page), ["q027", "q021", "q015", "q009", "q003"]);

    let (_, page) = h.get("/v1/events?principal=user%3Abob&decision=wouldDeny").await;
    let want: Vec<String> = all
        .iter()
        .rev()
        .filter(|e| e.principal == "user:bob" && e.decision == Decision::WouldDeny)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(event_ids(&page), want);

    // Time range: [t0+10s, t0+20s).
    let since = rfc3339(t0() + chrono::Duration::seconds(10)).replace('+', "%2B");
    let until = rfc3339(t0() + chrono::Duration::seconds(20)).replace('+', "%2B");
    let (_, page) = h.get(&format!("/v1/events?since={since}&until={until}&limit=100")).await;
    let want: Vec<String> = (10..20).rev().map(|i| format!("q{i:03}")).collect();
    assert_eq!(event_ids(&page), want);

    // Paging through everything, 7 at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=7&cursor={c}"),
            None => "/v1/events?limit=7".to_owned(),
        };
        let (status, page) = h.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(event_ids(&page));
        pages += 1;
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 5);
    let want: Vec<String> = all.iter().rev().map(|e| e.id.clone()).collect();
    assert_eq!(seen, want, "every event once, newest first");

    // Relative times: an event 30 minutes ago is within `since=1h`, one 2 hours ago is not.
    let now = Utc::now();
    let recent = vec![
        event("recent", now - chrono::Duration::minutes(30)),
        event("older", now - chrono::Duration::hours(2)),
    ];
    assert_eq!(h.post(NDJSON, ndjson(&recent)).await.0, 200);
    let (_, page) = h.get("/v1/events?since=1h").await;
    assert_eq!(event_ids(&page), vec!["recent".to_owned()]);
    let (_, page) = h.get("/v1/events?since=3h&until=1h").await;
    assert_eq!(event_ids(&page), vec!["older".to_owned()]);
}

#[tokio::test]
async fn bad_query_parameters_are_named() {
    let h = loaded().await;
    for (query, parameter) in [
        ("/v1/events?decision=Maybe", "decision"),
        ("/v1/events?dryRunDecision=Deny", "dryRunDecision"),
        ("/v1/events?limit=0", "limit"),
        ("/v1/events?limit=abc", "limit"),
        ("/v1/events?since=yesterday", "since"),
        ("/v1/events?until=5x", "until"),
        ("/v1/events?since=1h&until=2h", "until"),
        ("/v1/events?cursor=not-a-cursor", "cursor"),
        ("/v1/events?namespce=shop", "namespce"),
        ("/v1/events?policy=a&policy=b", "policy"),
        ("/v1/top?by=bytes", "by"),
        ("/v1/alerts?limit=-1", "limit"),
        ("/v1/usage?principal=user%3Aalice", "policy"),
        ("/v1/usage?policy=customers", "principal"),
        ("/v1/verify?from=0", "from"),
        ("/v1/verify?from=x", "from"),
    ] {
        let (status, body) = h.get(query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["reason"], "bad_query", "{query}: {body}");
        assert_eq!(body["parameter"], parameter, "{query}: {body}");
    }
    for bad in ["abc", &"AB".repeat(32), &"ab".repeat(31), &"zz".repeat(32)] {
        let (status, body) = h.get(&format!("/v1/subjects/{bad}")).await;
        assert_eq!((status, &body["reason"]), (400, &json!("bad_subject_hash")), "{bad}");
    }
    let response = h.client.get(format!("{}/v1/events", h.base)).send().await.unwrap();
    let (status, body) = answer(response).await;
    assert_eq!((status, &body["reason"]), (401, &json!("missing_token")));
    let (status, body) = h.get("/v1/nothing-here").await;
    assert_eq!((status, &body["reason"]), (404, &json!("not_found")));
}

#[tokio::test]
async fn subjects_top_alerts_and_verify() {
    let h = loaded().await;
    let all = corpus();

    let (status, answer) = h.get(&format!("/v1/subjects/{}", hash(7))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["subject"], hash(7));
    let got: Vec<&str> =
        answer["accesses"].as_array().unwrap().iter().map(|a| a["eventId"].as_str().unwrap()).collect();
    let want: Vec<String> =
        all.iter().rev().filter(|e| !e.record_hashes.is_empty()).map(|e| e.id.clone()).collect();
    assert_eq!(got, want);
    let (_, answer) = h.get(&format!("/v1/subjects/{}?limit=2", hash(7))).await;
    assert_eq!(answer["accesses"].as_array().unwrap().len(), 2);
    let (_, answer) = h.get(&format!("/v1/subjects/{}", hash(8))).await;
    assert_eq!(answer["accesses"], json!([]));

    // Records: carol (sum 21..=30 = 255) > bob (11..=20 = 155) > alice (1..=10 = 55).
    let (status, answer) = h.get("/v1/top?by=records").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["by"], "records");
    assert_eq!(
        answer["entries"],
        json!([
            {"principal": "user:carol", "count": 255},
            {"principal": "user:bob", "count": 155},
            {"principal": "user:alice", "count": 55}
        ])
    );
    let (_, answer) = h.get("/v1/top?by=denials&limit=1").await;
    assert_eq!(answer["by"], "denials");
    assert_eq!(answer["entries"].as_array().unwrap().len(), 1);
    let deny_count =
        |who: &str| all.iter().filter(|e| e.principal == who && e.decision == Decision::Deny).count() as u64;
    let top = &answer["entries"][0];
    assert_eq!(top["count"], json!(deny_count(top["principal"].as_str().unwrap())));

    // Alerts, inserted the way the detectors will.
    let alert = |id: &str, minutes_ago: i64| Alert {
        id: id.into(),
        time: rfc3339(Utc::now() - chrono::Duration::minutes(minutes_ago)),
        detector: "volume".into(),
        namespace: Some("shop".into()),
        policy: Some("customers".into()),
        principal: Some("user:carol".into()),
        severity: Severity::Warning,
        message: "records far above baseline".into(),
        details: json!({"records": 255}),
    };
    h.store().insert_alerts(&[alert("al-old", 180), alert("al-new", 5)]).await.unwrap();
    let (status, answer) = h.get("/v1/alerts").await;
    assert_eq!(status, 200, "{answer}");
    let got: Vec<&str> =
        answer["alerts"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec!["al-new", "al-old"]);
    assert_eq!(answer["alerts"][0]["severity"], "Warning");
    let (_, answer) = h.get("/v1/alerts?since=1h").await;
    assert_eq!(answer["alerts"].as_array().unwrap().len(), 1);

    let (status, report) = h.get("/v1/verify").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["checked"], 30);
    assert!(report["firstBroken"].is_null(), "{report}");
    assert_eq!(report["head"]["seq"], 30);
    let (_, report) = h.get("/v1/verify?from=11").await;
    assert_eq!(report["checked"], 20);
    assert!(report["firstBroken"].is_null());
    // From just past the head: nothing to check; further: a bad query, not a broken chain
    // (a review's probe got "Deleted at 49" on an intact chain).
    let (status, report) = h.get("/v1/verify?from=31").await;
    assert_eq!((status, report["checked"].as_u64()), (200, Some(0)), "{report}");
    assert!(report["firstBroken"].is_null(), "{report}");
    // Against a head recorded earlier (`custos audit verify --expect SEQ:HASH`).
    let head = report["head"]["hash"].as_str().unwrap().to_owned();
    let (status, report) = h.get(&format!("/v1/verify?expect=30:{head}")).await;
    assert_eq!(status, 200, "{report}");
    assert!(report["firstBroken"].is_null(), "{report}");
    let (_, report) = h.get(&format!("/v1/verify?expect=40:{head}")).await;
    assert_eq!(report["firstBroken"]["kind"], "Deleted", "{report}");
    for bad in ["30", "x:abc", &format!("30:{}", head.to_uppercase())] {
        let (status, body) = h.get(&format!("/v1/verify?expect={bad}")).await;
        assert_eq!((status, &body["parameter"]), (400, &json!("expect")), "{bad}: {body}");
    }
    let (status, body) = h.get("/v1/verify?from=50").await;
    assert_eq!(
        (status, &body["reason"], &body["parameter"]),
        (400, &json!("bad_query"), &json!("from")),
        "{body}"
    );
    assert!(body["error"].as_str().unwrap().contains("past the chain head (seq 30)"), "{body}");
}

#[tokio::test]
async fn verify_reports_a_tampered_chain_with_200() {
    let h = loaded().await;
    let Store::Sqlite { path } = &h.store_env else { unreachable!() };
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(
        "UPDATE events SET body = replace(body, 'rule read allows', 'rule read allowz') WHERE seq = 12",
    )
    .unwrap();
    let (status, report) = h.get("/v1/verify").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["firstBroken"]["seq"], 12, "{report}");
    assert_eq!(report["firstBroken"]["kind"], "Edited", "{report}");
}

#[tokio::test]
async fn usage_answers_the_sidecars_usage_client() {
    let h = Harness::sqlite().await;
    let now = Utc::now();
    let mut batch = Vec::new();
    for i in 0..5 {
        let mut e = event(&format!("u{i}"), now - chrono::Duration::seconds(10 + i));
        e.records_returned = 3;
        batch.push(e);
    }
    let mut other = event("u-bank", now - chrono::Duration::seconds(5));
    other.namespace = "bank".into();
    batch.push(other);
    let mut old = event("u-old", now - chrono::Duration::minutes(30));
    old.records_returned = 100;
    batch.push(old);
    assert_eq!(h.post(NDJSON, ndjson(&batch)).await.0, 200);

    let client =
        UsageClient::new(h.base.clone(), Some(h.token_file.clone()), Duration::from_secs(10)).unwrap();
    let usage = client.fetch("shop", "customers", "user:alice", None).await.unwrap();
    assert_eq!(usage.policy, "customers");
    assert_eq!(usage.principal, "user:alice");
    let read = usage.rules.get("read").expect("rule read counted");
    assert_eq!(read.requests_last_minute, 5);
    assert_eq!(read.records_last_hour, 115);
    assert_eq!(read.records_last_day, 115);

    // Without a namespace: every namespace counts.
    let usage = client.fetch("", "customers", "user:alice", None).await.unwrap();
    assert_eq!(usage.rules["read"].requests_last_minute, 6);
    let usage = client.fetch("shop", "customers", "user:nobody", None).await.unwrap();
    assert!(usage.rules.is_empty());

    // With `instance`: the counts are also given without the events of that sidecar process
    // (their ids carry its tag); another process's are counted in both.
    let tag = "0123ABCD";
    let mut own = event(&format!("01J0000000{tag}EFGHJKMN"), now - chrono::Duration::seconds(3));
    own.records_returned = 7;
    let mut others = event("01J00000009876WXYZEFGHJKMN", now - chrono::Duration::seconds(3));
    others.records_returned = 11;
    assert_eq!(h.post(NDJSON, ndjson(&[own, others])).await.0, 200);
    let usage = client.fetch("shop", "customers", "user:alice", Some(tag)).await.unwrap();
    assert_eq!(usage.instance.as_deref(), Some(tag));
    assert_eq!((usage.rules["read"].requests_last_minute, usage.rules["read"].records_last_hour), (7, 133));
    let without = &usage.rules_without_instance.as_ref().unwrap()["read"];
    assert_eq!((without.requests_last_minute, without.records_last_hour), (6, 126));
    let usage = client.fetch("shop", "customers", "user:alice", None).await.unwrap();
    assert_eq!((usage.instance, usage.rules_without_instance), (None, None));
    assert_eq!((usage.rules["read"].requests_last_minute, usage.rules["read"].records_last_hour), (7, 133));
    for bad in ["0123abcd", "0123ABC", "0123ABCDE", "0123ABCI", "%00"] {
        let (status, body) =
            h.get(&format!("/v1/usage?policy=customers&principal=user:alice&instance={bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.to_string().contains("instance"), "{bad}: {body}");
    }

    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-token").unwrap();
    let client =
        UsageClient::new(h.base.clone(), Some(wrong.path().to_path_buf()), Duration::from_secs(10)).unwrap();
    assert!(matches!(
        client.fetch("shop", "customers", "user:alice", None).await,
        Err(custos_shipper::ShipperError::Unauthorized)
    ));
}

/// A second connection holding an exclusive lock on `events` until dropped: every query of the
/// table waits behind it, as behind an investigator's scan of months of events.
async fn lock_events(store: &Store) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&store.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // Should the test fail while the lock is held, the server ends the session after 20 s
    // rather than leave the schema's teardown waiting for ever.
    client
        .batch_execute(
            "SET idle_in_transaction_session_timeout = '20s'; \
             BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn report_queries_are_bounded_in_time_and_in_number_postgres() {
    let Some(store) = Store::postgres().await else { return };
    let h = Harness::on(store, |c| {
        c.query_timeout = Duration::from_millis(300);
        c.max_concurrent_queries = 1;
    })
    .await;
    assert_eq!(h.post(NDJSON, ndjson(&corpus())).await.0, 200);
    let (_, before) = h.get("/v1/top?by=records").await;

    // A query that runs past --query-timeout is stopped by the database: 504, and the
    // connection serves the next query.
    let lock = lock_events(&h.store_env).await;
    let (status, body) = h.get("/v1/top?by=records").await;
    assert_eq!((status, body["reason"].as_str()), (504, Some("query_timeout")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("--query-timeout"), "{body}");
    assert_eq!(h.get("/v1/events?limit=5").await.0, 504);

    // A verification (not time-limited: it walks the whole chain) holds the only slot while
    // it waits; the next report query waits --query-timeout for the slot, then 503.
    let verify = {
        let (client, url) = (h.client.clone(), format!("{}/v1/verify", h.base));
        tokio::spawn(async move { answer(client.get(url).bearer_auth(TOKEN).send().await.unwrap()).await })
    };
    until("the verification holds the query slot", || async {
        let (status, body) = h.get("/v1/alerts").await;
        status == 503 && body["reason"] == "queries_busy"
    })
    .await;
    assert_eq!(h.get_text("/ready").await.0, 200, "/ready does not wait for report queries");
    // Its client giving up does not free the slot while the database still works on it.
    verify.abort();
    let aborted = h
        .client
        .get(format!("{}/v1/events", h.base))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(aborted.is_err(), "the second query waits for the slot");
    for _ in 0..3 {
        let (status, body) = h.get("/v1/alerts").await;
        assert_eq!((status, body["reason"].as_str()), (503, Some("queries_busy")), "{body}");
    }
    drop(lock);
    until("the verification is done and frees its slot", || async { h.get("/v1/alerts").await.0 == 200 })
        .await;
    assert_eq!(h.get("/v1/top?by=records").await, (200, before));

    let (_, metrics) = h.get_text("/metrics").await;
    for line in [
        "custos_collector_requests_total{endpoint=\"/v1/top\",status=\"504\"} 1",
        "custos_collector_requests_total{endpoint=\"/v1/alerts\",status=\"503\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}
