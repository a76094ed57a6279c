//! `custos audit`, run as a user would: the real binary against a real SQLite store (and a
//! real collector on 127.0.0.1) filled with known events.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use custos_api::audit::{AUDIT_SCHEMA_VERSION, AuditUser};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_store::{Alert, AnyStore, Severity};
use custos_transform::HashKey;
use serde_json::Value;

/// The hash key the sidecars would use (the file holds it with a trailing newline).
const KEY: &[u8] = b"audit-test-key-0123456789abcdef";

fn key() -> HashKey {
    HashKey::new(KEY.to_vec())
}

fn h(record_id: &str) -> String {
    key().hash_hex(record_id.as_bytes())
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn ago(minutes: i64) -> DateTime<Utc> {
    Utc::now() - TimeDelta::minutes(minutes)
}

#[allow(clippy::too_many_arguments)]
fn event(
    id: &str,
    time: DateTime<Utc>,
    namespace: &str,
    principal: &str,
    decision: Decision,
    policy: Option<&str>,
    rule: Option<&str>,
    records: u64,
    record_ids: &[&str],
) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: id.into(),
        time: rfc3339(time),
        cluster: None,
        namespace: namespace.into(),
        policy: policy.map(str::to_owned),
        rule: rule.map(str::to_owned),
        mode: Mode::Enforce,
        pod: Some("pod-0".into()),
        caller: None,
        user: principal
            .strip_prefix("user:")
            .map(|id| AuditUser { id: id.into(), attributes: Default::default() }),
        principal: principal.into(),
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}".into(),
        decision,
        reason: "test".into(),
        status: if decision == Decision::Deny { 403 } else { 200 },
        records_returned: records,
        records_filtered: 0,
        records_truncated: 0,
        masked: Default::default(),
        bytes: 100,
        latency_us: 1000,
        trace_id: None,
        record_hashes: record_ids.iter().map(|r| h(r)).collect(),
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

/// The events of the fixture store, in ingest order (seq 1..=5). E1 and E3 carry a dry run of
/// the Audit-mode policy `stricter` (which would deny E1).
fn events() -> Vec<AuditEvent> {
    let mut events = fixture_events();
    for (i, decision) in [(0, Decision::WouldDeny), (2, Decision::Allow)] {
        events[i].dry_runs = vec![custos_api::audit::DryRun {
            policy: "stricter".into(),
            rule: None,
            principal: None,
            decision,
            reason: "default_deny".into(),
            charged: false,
            transform: None,
        }];
    }
    events
}

fn fixture_events() -> Vec<AuditEvent> {
    vec![
        event(
            "E1-alice",
            ago(120),
            "shop",
            "user:alice",
            Decision::Allow,
            Some("customers"),
            Some("read"),
            2,
            &["C1001", "C1002"],
        ),
        event(
            "E2-bob",
            ago(60),
            "shop",
            "user:bob",
            Decision::Deny,
            Some("customers"),
            Some("no-export"),
            0,
            &[],
        ),
        event(
            "E3-alice",
            ago(10),
            "logistics",
            "user:alice",
            Decision::Allow,
            Some("parcels"),
            Some("list"),
            5,
            &["C1002", "C2000"],
        ),
        event(
            "E4-crawler",
            ago(3 * 24 * 60),
            "shop",
            "workload:shop/crawler",
            Decision::WouldDeny,
            Some("customers"),
            None,
            1,
            &["C1001"],
        ),
        event("E5-peer", ago(20), "shop", "peer:10.0.0.9", Decision::Deny, None, None, 0, &[]),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A store file with the fixture events and two alerts, a key file and a token file.
struct Fixture {
    dir: tempfile::TempDir,
    db: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        std::fs::write(dir.path().join("hash.key"), [KEY, b"\n"].concat()).unwrap();
        std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
        let url = format!("sqlite:{}", db.display());
        runtime().block_on(async {
            let store = custos_store::open(&url).await.unwrap();
            let outcome = store.ingest(&events()).await.unwrap();
            assert_eq!(outcome.accepted, 5);
            store
                .insert_alerts(&[
                    alert("A1", ago(60), Severity::Warning),
                    alert("A2", ago(3 * 24 * 60), Severity::Info),
                ])
                .await
                .unwrap();
        });
        Fixture { dir, db }
    }

    fn store(&self) -> String {
        format!("sqlite:{}", self.db.display())
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `custos audit --store <db> ARGS...`
    fn audit(&self, args: &[&str]) -> Output {
        let store = self.store();
        let mut all = vec!["audit", "--store", store.as_str()];
        all.extend_from_slice(args);
        custos(&all, None)
    }

    async fn open(&self) -> AnyStore {
        custos_store::open(&self.store()).await.unwrap()
    }
}

fn alert(id: &str, time: DateTime<Utc>, severity: Severity) -> Alert {
    Alert {
        id: id.into(),
        time: rfc3339(time),
        detector: "volume".into(),
        namespace: Some("shop".into()),
        policy: Some("customers".into()),
        principal: Some("user:alice".into()),
        severity,
        message: format!("alert {id}"),
        details: serde_json::json!({"records": 500}),
    }
}

fn custos(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_custos"));
    cmd.args(args)
        .env_remove("CUSTOS_COLLECTOR_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("custos runs");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON lines of stdout.
fn json_lines(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "exit {:?}, stderr: {}", out.status.code(), text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `field` of each JSON line, as a set of strings.
fn field_set(lines: &[Value], field: &str) -> BTreeSet<String> {
    lines
        .iter()
        .map(|v| v[field].as_str().unwrap_or_else(|| panic!("no {field} in {v}")).to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// --store

#[test]
fn query_filters_select_the_right_events() {
    let f = Fixture::new();
    let ids = |args: &[&str]| {
        let mut all = vec!["query", "-o", "json"];
        all.extend_from_slice(args);
        field_set(&json_lines(&f.audit(&all)), "id")
    };
    assert_eq!(ids(&[]), set(&["E1-alice", "E2-bob", "E3-alice", "E4-crawler", "E5-peer"]));
    assert_eq!(ids(&["--principal", "user:alice"]), set(&["E1-alice", "E3-alice"]));
    assert_eq!(ids(&["--decision", "Deny"]), set(&["E2-bob", "E5-peer"]));
    assert_eq!(ids(&["--decision", "wouldDeny"]), set(&["E4-crawler"]));
    assert_eq!(ids(&["-n", "logistics"]), set(&["E3-alice"]));
    assert_eq!(ids(&["--policy", "customers", "--decision", "Allow"]), set(&["E1-alice"]));
    assert_eq!(ids(&["--since", "90m"]), set(&["E2-bob", "E3-alice", "E5-peer"]));
    assert_eq!(ids(&["--since", "3h", "--until", "45m"]), set(&["E1-alice", "E2-bob"]));
    let since = rfc3339(ago(15));
    assert_eq!(ids(&["--since", &since]), set(&["E3-alice"]));
    assert_eq!(ids(&["--principal", "user:nobody"]), BTreeSet::new());
    assert_eq!(ids(&["--dry-run-policy", "stricter"]), set(&["E1-alice", "E3-alice"]));
    assert_eq!(ids(&["--dry-run-policy", "stricter", "--dry-run-decision", "wouldDeny"]), set(&["E1-alice"]));
    let refused = f.audit(&["query", "--dry-run-decision", "Deny"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("not a dry-run decision: Allow or WouldDeny"),
        "{}",
        text(&refused.stderr)
    );

    // Newest first, events as stored (with their chain link).
    let lines = json_lines(&f.audit(&["query", "-o", "json", "--principal", "user:alice"]));
    assert_eq!(lines[0]["id"], "E3-alice");
    assert_eq!(lines[0]["recordsReturned"], 5);
    assert!(lines[0]["prevHash"].as_str().is_some_and(|h| h.len() == 64));
}

#[test]
fn query_prints_an_aligned_table() {
    let f = Fixture::new();
    let out = f.audit(&["query", "--principal", "user:alice"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("TIME (UTC)"), "{stdout}");
    for col in ["NAMESPACE", "PRINCIPAL", "DECISION", "POLICY/RULE", "PATH", "RECORDS"] {
        assert!(lines[0].contains(col), "{stdout}");
    }
    assert!(lines[1].contains("logistics") && lines[1].contains("parcels/list"), "{stdout}");
    assert!(lines[2].contains("customers/read") && lines[2].contains("GET /customers/{id}"), "{stdout}");
    // Aligned: every column starts at the same offset on every line.
    let at = |line: &str, needle: &str| line.find(needle).unwrap();
    assert_eq!(at(lines[1], "user:alice"), at(lines[0], "PRINCIPAL"));
    assert_eq!(at(lines[2], "Allow"), at(lines[0], "DECISION"));
    assert!(lines[1].ends_with('5') && lines[2].ends_with('2'), "{stdout}");
    assert!(text(&out.stderr).contains("2 events"));

    let out = f.audit(&["query", "--decision", "Deny"]);
    assert!(text(&out.stdout).contains("-  "), "no policy shows as -: {}", text(&out.stdout));
}

#[test]
fn query_pages_with_cursor_and_all() {
    let f = Fixture::new();
    let out = f.audit(&["query", "--limit", "2", "-o", "json"]);
    let first = json_lines(&out);
    assert_eq!(first.len(), 2);
    let stderr = text(&out.stderr);
    let cursor = stderr
        .split("--cursor ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stderr}"));
    let second = json_lines(&f.audit(&["query", "--limit", "2", "--cursor", cursor, "-o", "json"]));
    assert_eq!(second.len(), 2);
    let all = json_lines(&f.audit(&["query", "--limit", "2", "--all", "-o", "json"]));
    assert_eq!(all.len(), 5);
    let ids: Vec<&str> = all.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..2], &[first[0]["id"].as_str().unwrap(), first[1]["id"].as_str().unwrap()]);
    assert_eq!(ids[2], second[0]["id"].as_str().unwrap());
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 5, "no event twice");
}

#[test]
fn subject_hashes_the_record_id_locally_and_finds_exactly_its_accesses() {
    let f = Fixture::new();
    let key_file = f.path("hash.key");
    let accesses = |id: &str| {
        let out = f.audit(&["subject", id, "--key-file", &key_file, "-o", "json"]);
        assert!(!text(&out.stdout).contains(id) && !text(&out.stderr).contains(id), "the raw id was printed");
        field_set(&json_lines(&out), "eventId")
    };
    assert_eq!(accesses("C1001"), set(&["E1-alice", "E4-crawler"]));
    assert_eq!(accesses("C1002"), set(&["E1-alice", "E3-alice"]));
    assert_eq!(accesses("C2000"), set(&["E3-alice"]));
    assert_eq!(accesses("C9999"), BTreeSet::new());

    // The same key without the trailing newline: the same hashes (the sidecar trims it too).
    let bare = f.path("bare.key");
    std::fs::write(&bare, KEY).unwrap();
    let out = f.audit(&["subject", "C1001", "--key-file", &bare, "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "eventId"), set(&["E1-alice", "E4-crawler"]));

    // Another key finds nothing.
    let other = f.path("other.key");
    std::fs::write(&other, "another-key-0123456789\n").unwrap();
    let out = f.audit(&["subject", "C1001", "--key-file", &other, "-o", "json"]);
    assert_eq!(json_lines(&out).len(), 0);

    // From standard input, kept out of argv.
    let store = f.store();
    let out = custos(
        &["audit", "--store", &store, "subject", "-", "--key-file", &key_file, "-o", "json"],
        Some("C1002\n"),
    );
    assert_eq!(field_set(&json_lines(&out), "eventId"), set(&["E1-alice", "E3-alice"]));

    // By the hash itself (upper case is accepted).
    let out = f.audit(&["subject", "--hash", &h("C2000").to_uppercase(), "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "eventId"), set(&["E3-alice"]));

    // Text: the hash and a table, never the id.
    let out = f.audit(&["subject", "C1001", "--key-file", &key_file]);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&format!("subject {}: 2 accesses", h("C1001"))), "{stdout}");
    assert!(stdout.contains("workload:shop/crawler") && stdout.contains("customers/(default)"), "{stdout}");
    assert!(!stdout.contains("C1001"));

    // A time window.
    let out = f.audit(&["subject", "C1001", "--key-file", &key_file, "--since", "1d", "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "eventId"), set(&["E1-alice"]));
}

#[test]
fn subject_argument_errors_are_clear() {
    let f = Fixture::new();
    let out = f.audit(&["subject", "C1001"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--key-file"), "{}", text(&out.stderr));
    let short = f.path("short.key");
    std::fs::write(&short, "short\n").unwrap();
    let out = f.audit(&["subject", "C1001", "--key-file", &short]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("holds 5 bytes; at least 16"), "{}", text(&out.stderr));
    let out = f.audit(&["subject", "--hash", "xyz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--hash must be 64 hex characters"), "{}", text(&out.stderr));
}

#[test]
fn top_ranks_principals() {
    let f = Fixture::new();
    let lines = json_lines(&f.audit(&["top", "--by", "records", "-o", "json"]));
    let ranked: Vec<(String, u64)> = lines
        .iter()
        .map(|v| (v["principal"].as_str().unwrap().to_owned(), v["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranked, vec![("user:alice".to_owned(), 7), ("workload:shop/crawler".to_owned(), 1)]);

    let lines = json_lines(&f.audit(&["top", "--by", "records", "--since", "1d", "-o", "json"]));
    assert_eq!(lines.len(), 1);

    let lines = json_lines(&f.audit(&["top", "--by", "denials", "-o", "json"]));
    assert_eq!(field_set(&lines, "principal"), set(&["user:bob", "peer:10.0.0.9"]));

    let out = f.audit(&["top"]);
    let stdout = text(&out.stdout);
    let rows: Vec<&str> = stdout.lines().collect();
    assert!(rows[0].starts_with("RANK") && rows[0].contains("RECORDS"), "{stdout}");
    assert!(rows[1].contains("user:alice") && rows[1].ends_with('7'), "{stdout}");
}

#[test]
fn alerts_are_listed_newest_first() {
    let f = Fixture::new();
    let lines = json_lines(&f.audit(&["alerts", "-o", "json"]));
    assert_eq!(lines.iter().map(|v| v["id"].as_str().unwrap()).collect::<Vec<_>>(), vec!["A1", "A2"]);
    let lines = json_lines(&f.audit(&["alerts", "--since", "24h", "-o", "json"]));
    assert_eq!(field_set(&lines, "id"), set(&["A1"]));
    let out = f.audit(&["alerts"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Warning")
            && stdout.contains("shop/customers user:alice")
            && stdout.contains("alert A1"),
        "{stdout}"
    );
}

#[test]
fn verify_passes_then_names_the_tampered_seq() {
    let f = Fixture::new();
    let out = f.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("chain intact: 5 events verified"), "{}", text(&out.stdout));
    let report = json_lines(&f.audit(&["verify", "-o", "json"]));
    assert_eq!(report.len(), 1);
    assert_eq!(report[0]["checked"], 5);
    assert!(report[0]["firstBroken"].is_null());

    // An attacker with file access edits the third event.
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(conn.execute("UPDATE events SET records_returned = 0 WHERE seq = 3", []).unwrap(), 1);
    drop(conn);

    let out = f.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("chain BROKEN at seq 3: Edited: "), "{stdout}");
    assert!(stdout.contains("event: E3-alice"), "{stdout}");

    let out = f.audit(&["verify", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["firstBroken"]["seq"], 3);
    assert_eq!(report["firstBroken"]["kind"], "Edited");
    assert_eq!(report["checked"], 2);

    // From seq 4 on, the rest still verifies.
    let out = f.audit(&["verify", "--from", "4"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn verify_names_a_deleted_row() {
    let f = Fixture::new();
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("DELETE FROM event_records WHERE seq = 2; DELETE FROM events WHERE seq = 2;").unwrap();
    drop(conn);
    let out = f.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("chain BROKEN at seq 2: Deleted"), "{}", text(&out.stdout));
}

#[test]
fn usage_errors_are_clear() {
    let f = Fixture::new();
    let out = custos(&["audit", "query"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--collector URL (with --token-file FILE) or --store URL"),
        "{}",
        text(&out.stderr)
    );

    let store = f.store();
    let out = custos(&["audit", "--store", &store, "--collector", "http://127.0.0.1:1", "query"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not both"), "{}", text(&out.stderr));

    let out = f.audit(&["query", "--since", "15x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("'15x' is neither a duration (like 15m, 24h, 7d) nor an RFC 3339 time"),
        "{}",
        text(&out.stderr)
    );

    let out = f.audit(&["query", "--since", "1h", "--until", "2h"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--until must be later than --since"), "{}", text(&out.stderr));

    let missing = f.path("nope.db");
    let out = custos(&["audit", "--store", &format!("sqlite:{missing}"), "verify"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no SQLite store at"), "{}", text(&out.stderr));
    assert!(!Path::new(&missing).exists(), "a mistyped path must not create a store");

    let out = custos(&["audit", "--store", "mysql://x", "verify"], None);
    assert!(text(&out.stderr).contains("--store takes sqlite:PATH or postgres://"), "{}", text(&out.stderr));

    let out = custos(&["audit", "--collector", "http://127.0.0.1:1", "verify"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--collector needs the bearer token"), "{}", text(&out.stderr));
}

#[test]
fn an_unreachable_collector_is_named() {
    let f = Fixture::new();
    // A port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let token = f.path("token");
    let out =
        custos(&["audit", "--collector", &url, "--token-file", &token, "--timeout", "5s", "verify"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("cannot reach the collector at {url}/")), "{stderr}");
}

/// Reads stdout lines of a running child on a thread, so that waits can time out.
fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(30)).expect("a line from custos audit tail within 30 s")
}

#[test]
fn tail_prints_new_events_once_until_interrupted() {
    let f = Fixture::new();
    let store = f.store();
    let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["audit", "--store", &store, "tail", "--since", "15m", "--interval", "100ms", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = line_reader(child.stdout.take().unwrap());
    // Only the fixture event of the last 15 minutes.
    let first: Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(first["id"], "E3-alice");

    // New events, one stored late with an older time (within the look-back).
    runtime().block_on(async {
        let store = f.open().await;
        let mut late = event(
            "E7-late",
            ago(5),
            "shop",
            "user:carol",
            Decision::Allow,
            Some("customers"),
            Some("read"),
            1,
            &[],
        );
        late.path = "/late".into();
        store
            .ingest(&[event(
                "E6-new",
                Utc::now(),
                "shop",
                "user:dave",
                Decision::Allow,
                Some("customers"),
                Some("read"),
                1,
                &[],
            )])
            .await
            .unwrap();
        store.ingest(&[late]).await.unwrap();
    });
    let mut got = BTreeSet::new();
    got.insert(serde_json::from_str::<Value>(&next_line(&rx)).unwrap()["id"].as_str().unwrap().to_owned());
    got.insert(serde_json::from_str::<Value>(&next_line(&rx)).unwrap()["id"].as_str().unwrap().to_owned());
    assert_eq!(got, set(&["E6-new", "E7-late"]));

    // Several more polls: nothing is printed twice.
    std::thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "an event was printed twice");

    // ctrl-c ends it cleanly.
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().unwrap();
        let _ = done_tx.send(());
        status
    });
    done_rx.recv_timeout(Duration::from_secs(30)).expect("tail exits on SIGINT");
    assert!(waiter.join().unwrap().success());
}

// ---------------------------------------------------------------------------------------------
// --collector

/// A real collector on 127.0.0.1 over the fixture store, with the fixture's token.
struct RunningCollector {
    rt: tokio::runtime::Runtime,
    collector: Option<custos_collector::RunningCollector>,
    url: String,
}

impl RunningCollector {
    fn start(f: &Fixture) -> RunningCollector {
        let rt = runtime();
        let mut config = custos_collector::CollectorConfig::new(
            f.store(),
            custos_collector::Auth::TokenFile(PathBuf::from(f.path("token"))),
        );
        config.listen = "127.0.0.1:0".parse().unwrap();
        let collector = rt.block_on(custos_collector::start(config)).unwrap();
        let url = format!("http://{}", collector.addr());
        RunningCollector { rt, collector: Some(collector), url }
    }
}

impl Drop for RunningCollector {
    fn drop(&mut self) {
        if let Some(c) = self.collector.take() {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await.ok() });
        }
    }
}

fn via_collector(c: &RunningCollector, token: &str, args: &[&str]) -> Output {
    let mut all = vec!["audit", "--collector", c.url.as_str(), "--token-file", token];
    all.extend_from_slice(args);
    custos(&all, None)
}

#[test]
fn collector_mode_answers_like_the_store() {
    let f = Fixture::new();
    let c = RunningCollector::start(&f);
    let token = f.path("token");

    let out =
        via_collector(&c, &token, &["query", "--principal", "user:alice", "--since", "3h", "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "id"), set(&["E1-alice", "E3-alice"]));
    let out = via_collector(&c, &token, &["query", "--decision", "Deny", "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "id"), set(&["E2-bob", "E5-peer"]));
    let out = via_collector(&c, &token, &["query", "--limit", "2", "--all", "-o", "json"]);
    assert_eq!(json_lines(&out).len(), 5);
    let dry = ["query", "--dry-run-policy", "stricter", "--dry-run-decision", "WouldDeny", "-o", "json"];
    assert_eq!(field_set(&json_lines(&via_collector(&c, &token, &dry)), "id"), set(&["E1-alice"]));

    let key_file = f.path("hash.key");
    let out = via_collector(&c, &token, &["subject", "C1001", "--key-file", &key_file, "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "eventId"), set(&["E1-alice", "E4-crawler"]));

    let out = via_collector(&c, &token, &["top", "--by", "denials", "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "principal"), set(&["user:bob", "peer:10.0.0.9"]));
    let out = via_collector(&c, &token, &["alerts", "--since", "1d", "-o", "json"]);
    assert_eq!(field_set(&json_lines(&out), "id"), set(&["A1"]));

    let out = via_collector(&c, &token, &["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("chain intact: 5 events verified"));

    let conn = rusqlite::Connection::open(&f.db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 4", []).unwrap();
    drop(conn);
    let out = via_collector(&c, &token, &["verify", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["firstBroken"]["seq"], 4);
}

#[test]
fn collector_mode_reports_a_refused_token() {
    let f = Fixture::new();
    let c = RunningCollector::start(&f);
    let wrong = f.path("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = via_collector(&c, &wrong, &["query"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("the collector refused the token (invalid_token)"), "{stderr}");
    assert!(!stderr.contains("not-the-token"), "the token was printed: {stderr}");

    // The token from the environment variable.
    let store_token = f.path("token");
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["audit", "--collector", &c.url, "verify"])
        .env("CUSTOS_COLLECTOR_TOKEN_FILE", &store_token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
