//! The whole pipeline as local processes on 127.0.0.1: policy YAML → `custos compile` →
//! `custos sidecar` → an app → `custos collector` → detectors → `custos audit` queries; a
//! policy change reaches enforcement within 5 s; a collector outage during traffic loses
//! nothing; a sidecar restart (with the collector down) loses nothing. "Nothing lost" means:
//! every request the sidecar answered is stored exactly once (counted by event id).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PARCELS: &str = include_str!("../../examples/data/parcel-page.json");

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.0.wait().unwrap();
        assert!(exit.success(), "exit after SIGTERM: {exit:?}");
    }
}

fn custos() -> Command {
    let mut command = common::custos_command();
    command.env("RUST_LOG", "warn");
    command
}

fn run_custos(args: &[&str]) -> Output {
    custos().args(args).stdin(Stdio::null()).output().unwrap()
}

/// The app: serves the parcel page on every GET, keep-alive, until the test ends.
fn start_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_app(stream));
        }
    });
    addr
}

fn serve_app(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header.trim_end().is_empty() {
                break;
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{PARCELS}",
            PARCELS.len()
        );
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request, `Connection: close`; the status and the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    out
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
fn within<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scenario's files and processes: policy, compiled config, token, hash key, store, spool.
struct Stack {
    dir: tempfile::TempDir,
    app: SocketAddr,
    proxy: SocketAddr,
    admin: SocketAddr,
    collector_addr: SocketAddr,
    token: String,
}

fn policy_yaml(app_port: u16, search_action: &str) -> String {
    format!(
        r#"apiVersion: custos.dev/v1alpha1
kind: DataAccessPolicy
metadata: {{name: parcels, namespace: shop}}
spec:
  workload: {{selector: {{matchLabels: {{app: parcel-api}}}}, appPort: {app_port}}}
  defaultAction: Deny
  dataClasses:
    - {{name: phone, paths: ["$.items[*].sender.phone", "$.items[*].recipient.phone"]}}
    - {{name: name, paths: ["$.items[*].sender.name", "$.items[*].recipient.name"]}}
  rules:
    - name: no-export
      action: Deny
      to: {{paths: ["/parcels/export"]}}
    - name: search
      action: {search_action}
      to: {{methods: [GET], paths: ["/parcels/search"]}}
{allow_extras}
  audit: {{recordId: "$.id"}}
"#,
        allow_extras = if search_action == "Allow" {
            "      records: \"$.items[*]\"\n      mask: {phone: ShowLast4, name: ShowFirst1}"
        } else {
            ""
        }
    )
}

impl Stack {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = "pipeline-test-token-0123456789".to_string();
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        std::fs::write(dir.path().join("hash.key"), "pipeline-hash-key-0123456789abcdef\n").unwrap();
        let app = start_app();
        let stack = Self {
            dir,
            app,
            proxy: SocketAddr::from(([127, 0, 0, 1], common::free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], common::free_port())),
            collector_addr: SocketAddr::from(([127, 0, 0, 1], common::free_port())),
            token,
        };
        stack.compile("Allow");
        stack
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the policy and compiles it into config.json (atomically, as a ConfigMap update
    /// lands).
    fn compile(&self, search_action: &str) {
        std::fs::write(self.path("policy.yaml"), policy_yaml(self.app.port(), search_action)).unwrap();
        let tmp = self.path("config.json.tmp");
        let out = run_custos(&[
            "compile",
            "-n",
            "shop",
            self.path("policy.yaml").to_str().unwrap(),
            "-o",
            tmp.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "compile: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::rename(&tmp, self.path("config.json")).unwrap();
    }

    fn start_collector(&self) -> Proc {
        let child = custos()
            .arg("collector")
            .args(["--listen", &self.collector_addr.to_string()])
            .arg("--store")
            .arg(format!("sqlite:{}", self.path("audit.db").display()))
            .arg("--token-file")
            .arg(self.path("token"))
            .args(["--kube-events", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proc = Proc(child);
        within(Duration::from_secs(30), "the collector answers /healthz", || {
            get(self.collector_addr, "/healthz", None).ok().filter(|(s, _)| *s == 200)
        });
        proc
    }

    fn start_sidecar(&self) -> Proc {
        let child = custos()
            .arg("sidecar")
            .arg("--config")
            .arg(self.path("config.json"))
            .args(["--namespace", "shop", "--pod-labels", "app=parcel-api", "--pod-name", "parcel-api-0"])
            .args(["--listen", &self.proxy.to_string(), "--upstream", &self.app.to_string()])
            .args(["--admin", &self.admin.to_string()])
            .args(["--collector", &format!("http://{}", self.collector_addr)])
            .arg("--collector-token-file")
            .arg(self.path("token"))
            .arg("--spool-dir")
            .arg(self.path("spool"))
            .arg("--hash-key-file")
            .arg(self.path("hash.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proc = Proc(child);
        within(Duration::from_secs(30), "the sidecar is ready", || {
            get(self.admin, "/ready", None).ok().filter(|(s, _)| *s == 200)
        });
        proc
    }

    /// Every stored event id, checking none is stored twice.
    fn stored_ids(&self) -> Option<HashSet<String>> {
        let (status, body) = get(self.collector_addr, "/v1/events?limit=10000", Some(&self.token)).ok()?;
        if status != 200 {
            return None;
        }
        let page: Value = serde_json::from_slice(&body).ok()?;
        let ids: Vec<String> =
            page["events"].as_array()?.iter().filter_map(|e| e["id"].as_str().map(str::to_string)).collect();
        let unique: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(unique.len(), ids.len(), "an event is stored twice");
        Some(unique)
    }

    /// Waits until exactly `count` events are stored.
    fn expect_stored(&self, count: usize, limit: Duration) {
        within(limit, &format!("{count} events stored"), || {
            self.stored_ids().filter(|ids| ids.len() == count)
        });
        // And no more arrive (a duplicate delivery would show up here).
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(self.stored_ids().unwrap().len(), count, "more events than requests");
    }

    fn audit(&self, args: &[&str]) -> Output {
        let collector = format!("http://{}", self.collector_addr);
        let token = self.path("token");
        let mut all = vec!["audit", "--collector", &collector, "--token-file", token.to_str().unwrap()];
        all.extend_from_slice(args);
        custos().args(&all).output().unwrap()
    }
}

fn assert_no_personal_data(bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for value in ["Wang Fang", "Li Wei", "138 0013 8000", "139 2211 4455"] {
        assert!(!text.contains(value), "{what} holds personal data");
    }
}

#[test]
fn policy_to_enforcement_to_audit_trail_and_alerts() {
    let stack = Stack::new();
    let _collector = stack.start_collector();
    let _sidecar = stack.start_sidecar();

    // Allowed, masked.
    let (status, body) = get(stack.proxy, "/parcels/search", None).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_no_personal_data(&body, "the masked response");
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["items"][0]["sender"]["phone"].as_str().map(|p| p.ends_with("8000")), Some(true));
    // Denied; the app is not called for it (the sidecar answers 403 itself).
    let (status, _) = get(stack.proxy, "/parcels/export", None).unwrap();
    assert_eq!(status, 403);
    // A burst of denials: the detector's pattern.
    for _ in 0..40 {
        assert_eq!(get(stack.proxy, "/parcels/export", None).unwrap().0, 403);
    }
    stack.expect_stored(42, Duration::from_secs(30));

    let out = stack.audit(&["query", "--decision", "Deny", "--limit", "100", "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_no_personal_data(&out.stdout, "audit query");
    // One JSON event per line.
    let denied: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(denied.len(), 41);
    assert!(denied.iter().all(|e| e["decision"] == "Deny" && e["rule"] == "no-export"), "{denied:?}");

    // Who accessed parcel SP20240001: the one allowed search returned it.
    let out = stack.audit(&[
        "subject",
        "SP20240001",
        "--key-file",
        stack.path("hash.key").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/parcels/search"), "{text}");
    assert!(!text.contains("SP20240001"), "the raw record id is never printed");

    let alerts = within(Duration::from_secs(20), "a denial burst alert", || {
        let out = stack.audit(&["alerts", "--output", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("denial_burst").then_some(text)
    });
    assert_no_personal_data(alerts.as_bytes(), "alerts");

    let out = stack.audit(&["verify"]);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_policy_change_reaches_enforcement_within_5_s() {
    let stack = Stack::new();
    let _collector = stack.start_collector();
    let _sidecar = stack.start_sidecar();
    assert_eq!(get(stack.proxy, "/parcels/search", None).unwrap().0, 200);
    stack.compile("Deny");
    let changed = Instant::now();
    within(Duration::from_secs(5), "the new policy denies the search", || {
        (get(stack.proxy, "/parcels/search", None).unwrap().0 == 403).then_some(())
    });
    eprintln!("policy change enforced after {:?}", changed.elapsed());
    // And back.
    stack.compile("Allow");
    within(Duration::from_secs(5), "the search is allowed again", || {
        (get(stack.proxy, "/parcels/search", None).unwrap().0 == 200).then_some(())
    });
}

fn traffic(proxy: SocketAddr, n: usize) {
    for i in 0..n {
        let path = if i % 3 == 0 { "/parcels/export" } else { "/parcels/search" };
        let (status, _) = get(proxy, path, None).unwrap();
        assert!(status == 200 || status == 403, "{path}: {status}");
    }
}

#[test]
fn a_collector_outage_during_traffic_loses_nothing() {
    let stack = Stack::new();
    let collector = stack.start_collector();
    let _sidecar = stack.start_sidecar();
    traffic(stack.proxy, 20);
    stack.expect_stored(20, Duration::from_secs(30));

    // Killed, not stopped: whatever it had not acknowledged, the sidecar still holds.
    drop(collector);
    traffic(stack.proxy, 60);
    let _collector = stack.start_collector();
    stack.expect_stored(80, Duration::from_secs(60));
}

#[test]
fn a_sidecar_restart_loses_nothing() {
    let stack = Stack::new();
    // Collector down: the events go to the disk spool.
    let sidecar = stack.start_sidecar();
    traffic(stack.proxy, 30);
    sidecar.stop();
    assert!(spool_holds_records(&stack.path("spool")), "the stopped sidecar left its events in the spool");

    // The next sidecar delivers the previous one's spool, and its own events.
    let _sidecar = stack.start_sidecar();
    traffic(stack.proxy, 10);
    let _collector = stack.start_collector();
    stack.expect_stored(40, Duration::from_secs(60));
}

fn spool_holds_records(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)))
        .unwrap_or(false)
}
