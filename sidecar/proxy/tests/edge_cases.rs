//! End-to-end edge cases over real TCP on 127.0.0.1 (upstream app and collector from
//! `support`): missing and bad JWTs through the proxy, collector outages and sidecar restarts
//! (the disk spool), cluster-wide quotas, and Audit mode.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custos_api::collector::RuleUsage;
use custos_sidecar::{CollectorSettings, SidecarSettings};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;

const ISSUER: &str = "https://sso.example.test";
const AUDIENCE: &str = "customer-api";
const POLICY: &str = "customer-api";
const KID: &str = "rsa-1";

// ---------------------------------------------------------------------------------------
// Tokens, with the test-only keys of sidecar/jwt/testdata (helpers adapted from
// sidecar/jwt/tests/common/mod.rs).

fn testdata(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jwt/testdata").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The key the JWKS publishes under [`KID`].
fn rsa_a() -> EncodingKey {
    EncodingKey::from_rsa_der(&testdata("test-only-rsa-a.pkcs1.der"))
}

/// Another RSA key ("wrong key").
fn rsa_b() -> EncodingKey {
    EncodingKey::from_rsa_der(&testdata("test-only-rsa-b.pkcs1.der"))
}

fn jwks() -> String {
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&rsa_a(), Algorithm::RS256).unwrap()).unwrap();
    jwk["kid"] = json!(KID);
    json!({"keys": [jwk]}).to_string()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Valid claims of a north-branch clerk.
fn claims(sub: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now - 10, "exp": now + 600,
        "branch": "north", "role": "clerk",
    })
}

fn with(claims: &Value, members: Value) -> Value {
    let mut c = claims.clone();
    for (k, v) in members.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(key: &EncodingKey, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(KID.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn valid_token(sub: &str) -> String {
    sign(&rsa_a(), Algorithm::RS256, &claims(sub))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Unpadded base64url.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A token with header `{"alg": alg}` and valid claims, "signed" with `signature`.
fn unsigned(alg: &str, signature: &str) -> String {
    let header = json!({"alg": alg, "typ": "JWT", "kid": KID});
    format!(
        "{}.{}.{signature}",
        b64(header.to_string().as_bytes()),
        b64(claims("u-1").to_string().as_bytes())
    )
}

// ---------------------------------------------------------------------------------------
// The policy and the sidecar.

const MASK: &str = r#"{"phone": "ShowLast4", "name": "Redact"}"#;

fn spec(mode: &str) -> Value {
    let mask: Value = serde_json::from_str(MASK).unwrap();
    json!({
        "workload": {"selector": {"matchLabels": {"app": "customer-api"}}, "appPort": 1},
        "mode": mode,
        "defaultAction": "Deny",
        "identity": {"users": {
            "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksSecretRef": {"name": "sso-jwks"}},
            "attributes": {"branch": "branch", "role": "role"}
        }},
        "dataClasses": [
            {"name": "phone", "paths": ["$.items[*].phone"]},
            {"name": "name", "paths": ["$.items[*].name"]}
        ],
        "audit": {"recordId": "$.id"},
        "rules": [
            {"name": "no-export", "action": "Deny", "to": {"paths": ["/customers/export"]}},
            {"name": "list", "action": "Allow",
             "to": {"methods": ["GET"], "paths": ["/customers", "/chunked/customers", "/gzip/customers"]},
             "records": "$.items[*]", "mask": mask},
            {"name": "branch", "action": "Allow", "from": {"users": {"role": ["clerk"]}},
             "to": {"methods": ["GET"], "paths": ["/branch/customers"]},
             "records": "$.items[*]", "rowFilter": "record.branch == user.branch"},
            {"name": "crawl", "action": "Allow", "to": {"paths": ["/crawl/**"]},
             "limits": {"requestsPerMinute": 10}},
            {"name": "records", "action": "Allow", "to": {"paths": ["/records/customers"]},
             "records": "$.items[*]", "mask": mask, "limits": {"recordsPerHour": 20}},
            {"name": "open", "action": "Allow", "to": {"paths": ["/open/**"]}}
        ],
    })
}

/// Starts the sidecar over one policy named [`POLICY`], with the test JWKS mounted.
async fn start(spec: Value, tweak: impl FnOnce(&mut SidecarSettings)) -> Fixture {
    fixture(&[(POLICY, spec)], Vec::new(), |s| {
        let dir = s.jwks_dir.join("sso-jwks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("jwks.json"), jwks()).unwrap();
        tweak(s);
    })
    .await
}

/// Collector settings for tests: quick flushes and retries, no usage sync.
fn collector_settings(url: impl Into<String>, spool: impl Into<PathBuf>) -> CollectorSettings {
    let mut c = CollectorSettings::new(url, spool);
    c.flush_interval = Duration::from_millis(20);
    c.usage_sync_interval = None;
    c.retry_initial_backoff = Duration::from_millis(20);
    c.retry_max_backoff = Duration::from_millis(100);
    c.request_timeout = Duration::from_secs(2);
    c
}

/// The value of an unlabelled metric (0 when absent).
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = admin_get(admin, "/metrics").await.text();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// Waits (bounded) until the metric `name` is `value`.
async fn wait_for_metric(admin: SocketAddr, name: &str, value: f64) {
    let mut last = 0.0;
    for _ in 0..400 {
        last = metric(admin, name).await;
        if last == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} stayed at {last}, expected {value}");
}

fn event<'e>(events: &'e [Value], path: &str, status: u64) -> &'e Value {
    events
        .iter()
        .find(|e| e["path"] == path && e["status"] == status)
        .unwrap_or_else(|| panic!("no event {path} {status}: {events:#?}"))
}

// ---------------------------------------------------------------------------------------
// 1. Missing token.

#[tokio::test]
async fn missing_token_is_401_where_no_allow_rule_matched_and_users_are_verified() {
    let collector = Collector::start().await;
    let url = collector.url();
    let mut f = start(spec("Enforce"), |s| {
        s.collector = Some(collector_settings(url, s.jwks_dir.with_file_name("spool")))
    })
    .await;
    // Only clerks may read /branch/customers: an anonymous caller is asked for a token.
    let reply = get(f.proxy(), "/branch/customers").await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let body = reply.json();
    assert_eq!(body["error"], "unauthenticated");
    assert_eq!(body["reason"], "missing_token");
    assert_eq!(body["policy"], POLICY);
    // Another scheme is no bearer token either.
    let reply = get_with(f.proxy(), "/branch/customers", &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["reason"], "missing_token");

    // An explicit Deny rule is 403, with or without a token.
    let token = bearer(&valid_token("u-1"));
    for headers in [vec![], vec![("authorization", token.as_str())]] {
        let reply = get_with(f.proxy(), "/customers/export", &headers).await;
        assert_eq!(reply.status, 403);
        assert_eq!(reply.json()["reason"], "deny_rule");
        assert!(reply.headers.get("www-authenticate").is_none());
    }
    // A token would not help here: a verified user no rule allows gets 403.
    let reply = get_with(f.proxy(), "/nowhere", &[("authorization", &token)]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["reason"], "default_deny");
    // Rules open to anonymous callers need no token.
    assert_eq!(get(f.proxy(), "/open/x").await.status, 200);
    assert_eq!(f.upstream.targets(), ["/open/x"]);

    let metrics = admin_get(f.admin(), "/metrics").await.text();
    let needle = r#"custos_sidecar_requests_total{decision="Deny",policy="customer-api",rule="",reason="missing_token"} 2"#;
    assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    f.stop().await;

    let events = collector.wait_for(6).await;
    let missing = event(&events, "/branch/customers", 401);
    assert_eq!(missing["decision"], "Deny");
    assert_eq!(missing["reason"], "missing_token");
    assert_eq!(missing["policy"], POLICY);
    assert_eq!(missing["rule"], Value::Null);
    assert_eq!(missing["principal"], "peer:127.0.0.1");
    assert_eq!(event(&events, "/nowhere", 403)["reason"], "default_deny");

    // Without `identity.users` there is no token to ask for: default deny stays 403.
    let mut anonymous = spec("Enforce");
    anonymous.as_object_mut().unwrap().remove("identity");
    anonymous["rules"] = json!([{"name": "open", "action": "Allow", "to": {"paths": ["/open/**"]}}]);
    let mut f = start(anonymous, |_| {}).await;
    let reply = get(f.proxy(), "/nowhere").await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["reason"], "default_deny");
    assert_eq!(f.upstream.count(), 0);
    f.stop().await;
    // Audit mode: see `audit_mode_changes_no_byte_and_reports_what_it_would_have_done`.
}

// ---------------------------------------------------------------------------------------
// 2. JWT edge cases.

#[tokio::test]
async fn jwt_edge_cases_are_401_with_their_reason_and_never_reach_the_app() {
    // Room in the headers for a token over the verifier's size limit.
    let mut f = start(spec("Enforce"), |s| s.limits.max_header_bytes = 64 * 1024).await;
    let now = now();
    let valid = claims("u-1");
    let good = valid_token("u-1");
    let p: Vec<&str> = good.split('.').collect();
    let rsa = |c: &Value| sign(&rsa_a(), Algorithm::RS256, c);
    let public_pem = testdata("test-only-rsa-a.pub.pem");
    let hmac = sign(&EncodingKey::from_secret(&public_pem), Algorithm::HS256, &valid);
    let tampered = b64(with(&valid, json!({"role": "admin"})).to_string().as_bytes());
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("expired", Some(rsa(&with(&valid, json!({"exp": now - 3600})))), "expired"),
        (
            "not yet valid",
            Some(rsa(&with(&valid, json!({"nbf": now + 3600, "exp": now + 7200})))),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            Some(rsa(&with(&valid, json!({"iss": "https://evil.example.test"})))),
            "invalid_issuer",
        ),
        ("wrong audience", Some(rsa(&with(&valid, json!({"aud": "other-api"})))), "invalid_audience"),
        ("wrong key, same kid", Some(sign(&rsa_b(), Algorithm::RS256, &valid)), "invalid_signature"),
        ("alg none", Some(unsigned("none", "")), "unsupported_alg"),
        ("alg NONE with a signature", Some(unsigned("NONE", "c2ln")), "unsupported_alg"),
        ("HS256 signed with the RSA public key", Some(hmac), "unsupported_alg"),
        ("tampered payload", Some(format!("{}.{tampered}.{}", p[0], p[2])), "invalid_signature"),
        ("malformed: not a JWT", Some("not-a-jwt".into()), "malformed_token"),
        ("malformed: two segments", Some(format!("{}.{}", p[0], p[1])), "malformed_token"),
        ("malformed: four segments", Some(format!("{good}.x")), "malformed_token"),
        ("malformed: header not base64url", Some(format!("!!!.{}.{}", p[1], p[2])), "malformed_token"),
        (
            "malformed: header not JSON",
            Some(format!("{}.{}.{}", b64(b"not json"), p[1], p[2])),
            "malformed_token",
        ),
        ("malformed: payload not base64url", Some(format!("{}.@@.{}", p[0], p[2])), "malformed_token"),
        ("malformed: signature not base64url", Some(format!("{}.{}.###", p[0], p[1])), "malformed_token"),
        ("malformed: empty payload", Some(format!("{}..{}", p[0], p[2])), "malformed_token"),
        ("empty", Some(String::new()), "empty_token"),
        ("oversized", Some("a".repeat(20 * 1024)), "token_too_large"),
        ("missing", None, "missing_token"),
    ];
    let mut failures = Vec::new();
    for (name, token, code) in &cases {
        let value = token.as_deref().map(bearer);
        let headers: Vec<(&str, &str)> = value.iter().map(|v| ("authorization", v.as_str())).collect();
        let reply = get_with(f.proxy(), "/branch/customers", &headers).await;
        let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let leaked = token.as_ref().is_some_and(|t| t.len() > 8 && reply.text().contains(t.as_str()));
        if reply.status != 401
            || body["reason"] != *code
            || !reply.headers.contains_key("www-authenticate")
            || leaked
        {
            failures.push(format!("{name}: expected 401 {code}, got {} {}", reply.status, reply.text()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(f.upstream.count(), 0, "a refused request reached the app");

    // The valid token passes, with the user's row filter.
    let reply = get_with(f.proxy(), "/branch/customers", &[("authorization", &bearer(&good))]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let items = reply.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["branch"] == "north"));
    assert_eq!(f.upstream.count(), 1);

    let metrics = admin_get(f.admin(), "/metrics").await.text();
    let needle = format!(r#"reason="invalid_token"}} {}"#, cases.len() - 1);
    assert!(metrics.contains(&needle), "{needle} missing in\n{metrics}");
    f.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Collector outages.

#[tokio::test]
async fn collector_outage_spools_events_and_delivers_each_exactly_once() {
    const N: usize = 50;
    let collector_addr = reserve_port();
    let url = format!("http://{collector_addr}");
    let mut f = start(spec("Enforce"), |s| {
        s.collector = Some(collector_settings(url, s.jwks_dir.with_file_name("spool")))
    })
    .await;
    // The collector is down: requests are served all the same.
    for i in 0..N {
        assert_eq!(get(f.proxy(), &format!("/open/outage/{i}")).await.status, 200);
    }
    wait_for_metric(f.admin(), "custos_audit_spool_events", N as f64).await;
    assert_eq!(metric(f.admin(), "custos_audit_events_delivered_total").await, 0.0);

    let collector = Collector::start_on(collector_addr).await;
    collector.wait_for_distinct(N).await;
    wait_for_metric(f.admin(), "custos_audit_spool_events", 0.0).await;
    wait_for_metric(f.admin(), "custos_audit_events_delivered_total", N as f64).await;
    f.stop().await;

    let receipts = collector.receipts();
    assert_eq!(receipts.len(), N);
    assert!(receipts.values().all(|n| *n == 1), "events received more than once: {receipts:?}");
    let paths: BTreeSet<String> =
        collector.events().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect();
    let sent: BTreeSet<String> = (0..N).map(|i| format!("/open/outage/{i}")).collect();
    assert_eq!(paths, sent);
}

#[tokio::test]
async fn events_spooled_by_a_stopped_sidecar_are_delivered_by_the_next_one() {
    const N: usize = 20;
    let collector_addr = reserve_port();
    let url = format!("http://{collector_addr}");
    let spool = tempfile::tempdir().unwrap();
    let settings = |s: &mut SidecarSettings| s.collector = Some(collector_settings(&url, spool.path()));

    let mut first = start(spec("Enforce"), settings).await;
    for i in 0..N {
        assert_eq!(get(first.proxy(), &format!("/open/restart/{i}")).await.status, 200);
    }
    wait_for_metric(first.admin(), "custos_audit_spool_events", N as f64).await;
    first.stop().await;

    // A new sidecar on the same spool finds the events, and delivers them once the collector
    // is back.
    let mut second = start(spec("Enforce"), settings).await;
    assert_eq!(metric(second.admin(), "custos_audit_spool_events").await, N as f64);
    let collector = Collector::start_on(collector_addr).await;
    collector.wait_for_distinct(N).await;
    wait_for_metric(second.admin(), "custos_audit_spool_events", 0.0).await;
    second.stop().await;

    let receipts = collector.receipts();
    assert_eq!(receipts.len(), N);
    assert!(receipts.values().all(|n| *n == 1), "events received more than once: {receipts:?}");
    let paths: BTreeSet<String> =
        collector.events().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect();
    let sent: BTreeSet<String> = (0..N).map(|i| format!("/open/restart/{i}")).collect();
    assert_eq!(paths, sent);
}

// ---------------------------------------------------------------------------------------
// 4. Cluster-wide quotas.

/// Waits (bounded) until the collector holds `events` events and a usage report computed
/// after that has been applied by the sidecar: the collector answers from what it holds at
/// the time of the request, and the sidecar's next fetch for the principal only starts once
/// the previous round has been applied.
async fn settle(collector: &Collector, principal: &str, events: usize) {
    collector.wait_for_distinct(events).await;
    let seen = collector.usage_hits(POLICY, principal);
    for _ in 0..400 {
        if collector.usage_hits(POLICY, principal) >= seen + 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no usage sync for {principal}");
}

#[tokio::test]
async fn cluster_usage_makes_replicas_refuse_together() {
    let collector = Collector::start().await;
    // Other replicas served user u-1 7 requests under `crawl` (limit 10 per minute) and
    // 14 records under `records` (limit 20 per hour).
    let crowded = "user:u-1";
    let requests = RuleUsage { requests_last_minute: 7, ..RuleUsage::default() };
    collector.set_other_replicas_usage(POLICY, crowded, "crawl", requests);
    let records = RuleUsage { records_last_hour: 14, records_last_day: 14, ..RuleUsage::default() };
    collector.set_other_replicas_usage(POLICY, crowded, "records", records);
    let url = collector.url();
    let mut f = start(spec("Enforce"), |s| {
        let mut c = collector_settings(url, s.jwks_dir.with_file_name("spool"));
        c.usage_sync_interval = Some(Duration::from_millis(20));
        s.collector = Some(c);
    })
    .await;
    let u1 = bearer(&valid_token("u-1"));
    let u1 = [("authorization", u1.as_str())];
    let mut sent = 0;

    // One request of each kind here, then the cluster figures arrive.
    assert_eq!(get_with(f.proxy(), "/crawl/x", &u1).await.status, 200);
    let reply = get_with(f.proxy(), "/records/customers", &u1).await;
    assert_eq!(reply.json()["items"].as_array().unwrap().len(), 4);
    sent += 2;
    settle(&collector, crowded, sent).await;

    // Records: 20 per hour, 14 used elsewhere and 4 here: the response is cut to 2, then 429.
    let reply = get_with(f.proxy(), "/records/customers", &u1).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["items"].as_array().unwrap().len(), 2);
    sent += 1;
    settle(&collector, crowded, sent).await;
    let reply = get_with(f.proxy(), "/records/customers", &u1).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["limit"], "recordsPerHour");
    sent += 1;

    // Requests: 10 per minute, 7 made elsewhere and 1 here: 2 more pass (3 if the first
    // figures took over 6 s to arrive, the bucket having refilled meanwhile), not 9.
    let mut passed = 0;
    loop {
        let reply = get_with(f.proxy(), "/crawl/x", &u1).await;
        sent += 1;
        if reply.status == 429 {
            assert_eq!(reply.json()["limit"], "requestsPerMinute");
            break;
        }
        assert_eq!(reply.status, 200);
        passed += 1;
        assert!(passed <= 3, "the cluster usage was not applied");
        settle(&collector, crowded, sent).await;
    }
    assert!((2..=3).contains(&passed), "{passed}");

    // Alone (no usage elsewhere), user u-2 gets the whole of both limits.
    let u2 = bearer(&valid_token("u-2"));
    let u2 = [("authorization", u2.as_str())];
    for i in 0..10 {
        assert_eq!(get_with(f.proxy(), "/crawl/x", &u2).await.status, 200, "request {i}");
    }
    assert_eq!(get_with(f.proxy(), "/crawl/x", &u2).await.status, 429);
    for i in 0..5 {
        let reply = get_with(f.proxy(), "/records/customers", &u2).await;
        assert_eq!(reply.json()["items"].as_array().unwrap().len(), 4, "request {i}");
    }
    assert_eq!(get_with(f.proxy(), "/records/customers", &u2).await.status, 429);
    f.stop().await;
}

/// Regression: a shutdown that arrived while a usage fetch was in flight was marked seen by
/// the fetch loop and the sync task then never stopped, so `shutdown` hung.
#[tokio::test]
async fn shutdown_during_a_usage_fetch_completes() {
    let collector = Collector::start().await;
    collector.set_usage_delay(Duration::from_millis(500));
    let url = collector.url();
    let mut f = start(spec("Enforce"), |s| {
        let mut c = collector_settings(url, s.jwks_dir.with_file_name("spool"));
        c.usage_sync_interval = Some(Duration::from_millis(20));
        s.collector = Some(c);
    })
    .await;
    assert_eq!(get(f.proxy(), "/crawl/x").await.status, 200);
    for _ in 0..400 {
        if collector.usage_hits(POLICY, "peer:127.0.0.1") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(collector.usage_hits(POLICY, "peer:127.0.0.1"), 1, "no usage fetch in flight");
    tokio::time::timeout(Duration::from_secs(5), f.stop()).await.expect("shutdown hung");
}

// ---------------------------------------------------------------------------------------
// 5. Audit mode.

#[tokio::test]
async fn audit_mode_changes_no_byte_and_reports_what_it_would_have_done() {
    let collector = Collector::start().await;
    let url = collector.url();
    let mut f = start(spec("Audit"), |s| {
        s.collector = Some(collector_settings(url, s.jwks_dir.with_file_name("spool")))
    })
    .await;
    // What the app sends (see support::app).
    let plain = serde_json::to_vec(&customers()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gzipped = gz.finish().unwrap();

    let bad = bearer(&sign(&rsa_b(), Algorithm::RS256, &claims("u-1")));
    let cases: Vec<(&str, Option<&str>, &[u8])> = vec![
        ("/customers", None, &plain),
        ("/chunked/customers", None, &plain),
        ("/gzip/customers", None, &gzipped),
        ("/customers/export", None, &plain),
        ("/branch/customers", None, &plain),
        ("/branch/customers", Some(&bad), &plain),
    ];
    for (path, auth, expected) in &cases {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let reply = get_with(f.proxy(), path, &headers).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(&reply.body[..], *expected, "{path}: audit mode changed the body");
    }
    // 20 records per hour: 5 full responses, then a sixth the quota would refuse.
    for i in 0..6 {
        let reply = get(f.proxy(), "/records/customers").await;
        assert_eq!(reply.status, 200, "request {i}");
        assert_eq!(reply.body, plain, "request {i}");
    }
    assert_eq!(f.upstream.count(), cases.len() + 6);
    let metrics = admin_get(f.admin(), "/metrics").await.text();
    assert!(!metrics.contains("custos_sidecar_masked_fields_total{"), "Audit mode masked:\n{metrics}");
    f.stop().await;

    let events = collector.wait_for(cases.len() + 6).await;
    assert!(events.iter().all(|e| e["mode"] == "Audit" && e["status"] == 200), "{events:#?}");
    for path in ["/customers", "/chunked/customers", "/gzip/customers"] {
        let e = event(&events, path, 200);
        assert_eq!(e["decision"], "Allow");
        assert_eq!(e["recordsReturned"], 4);
        assert_eq!(e["masked"], json!({"name": 4, "phone": 4}), "{path}");
    }
    let would_deny = |reason: &str| {
        events
            .iter()
            .filter(|e| e["decision"] == "WouldDeny" && e["reason"].as_str().unwrap().starts_with(reason))
            .collect::<Vec<_>>()
    };
    let export = would_deny("deny_rule");
    assert_eq!(export.len(), 1);
    assert_eq!(export[0]["path"], "/customers/export");
    assert_eq!(export[0]["rule"], "no-export");
    // No token where only clerks are allowed: Enforce would answer 401, Audit records it.
    let anonymous = would_deny("default_deny");
    assert_eq!(anonymous.len(), 1);
    assert_eq!(anonymous[0]["path"], "/branch/customers");
    let bad_token = would_deny("invalid_token");
    assert_eq!(bad_token.len(), 1);
    assert_eq!(bad_token[0]["path"], "/branch/customers");
    // The quota: five allowed, masked responses, and the sixth would have been refused; the
    // event still holds what the masks would have done.
    let records: Vec<&Value> = events.iter().filter(|e| e["path"] == "/records/customers").collect();
    assert_eq!(records.len(), 6);
    assert_eq!(records.iter().filter(|e| e["decision"] == "Allow").count(), 5);
    let over = would_deny("quota_exceeded");
    assert_eq!(over.len(), 1);
    assert_eq!(over[0]["path"], "/records/customers");
    assert_eq!(over[0]["rule"], "records");
    assert_eq!(over[0]["masked"], json!({"name": 4, "phone": 4}));
    assert_eq!(over[0]["recordsReturned"], 4);
}
