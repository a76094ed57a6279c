//! Shared by the process-level tests of `custos`: a command with a clean environment, a
//! collector child process that reports its address, a free port, and a sample audit event.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use custos_api::audit::AUDIT_SCHEMA_VERSION;
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use serde_json::Value;

/// A port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `custos` without any `CUSTOS_*` or `OTEL_*` variable of the test's environment.
pub fn custos_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_custos"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CUSTOS_") || key.starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command
}

/// A `custos collector` child process; killed when dropped.
pub struct Collector {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `custos collector` on a free port with the SQLite store `<dir>/audit.db` and the
/// token file `<dir>/token`, plus `extra_args` and `envs`; returns once its log says where it
/// listens.
pub fn spawn_collector(dir: &Path, extra_args: &[&str], envs: &[(&str, &str)]) -> Collector {
    let mut command = custos_command();
    command
        .arg("collector")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("sqlite:{}", dir.join("audit.db").display()))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(extra_args)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn custos collector");
    // The log says where it listens (port 0 = any free port); keep draining it afterwards.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["fields"]["message"] == "custos collector listening"
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Collector { child, addr: addr.parse().unwrap() },
        Err(_) => {
            let _ = child.kill();
            panic!("the collector did not report its address: {:?}", child.wait());
        }
    }
}

/// An allowed read of one record by `principal` under policy `customers`, rule `read`.
pub fn sample_event(id: String, time: String, principal: String) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id,
        time,
        cluster: None,
        namespace: "shop".into(),
        policy: Some("customers".into()),
        rule: Some("read".into()),
        mode: Mode::Enforce,
        pod: None,
        caller: None,
        user: None,
        principal,
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}".into(),
        decision: Decision::Allow,
        reason: "rule read allows".into(),
        status: 200,
        records_returned: 1,
        records_filtered: 0,
        records_truncated: 0,
        masked: BTreeMap::new(),
        bytes: 10,
        latency_us: 100,
        trace_id: None,
        record_hashes: vec![],
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}
