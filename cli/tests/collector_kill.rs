//! `custos collector` killed with SIGKILL while batches stream in, then restarted on the same
//! SQLite store: every acknowledged event is stored, no event is stored twice, a resent batch
//! is stored whole or not at all, and the chain verifies. Finally SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sample_event, spawn_collector};
use serde_json::Value;

const TOKEN: &str = "kill-test-token";
const EVENTS_PER_BATCH: usize = 20;
const CLIENTS: usize = 2;

/// One HTTP/1.1 request on a fresh connection; `Err` when the connection fails or the answer
/// is incomplete.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: collector\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        head.push_str(&format!("Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let incomplete = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "incomplete answer");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(incomplete)?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 =
        headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(incomplete)?;
    let mut payload = raw[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload).ok_or_else(incomplete)?;
    } else if let Some(len) = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if payload.len() < len {
            return Err(incomplete());
        }
        payload.truncate(len);
    }
    let value = serde_json::from_slice(&payload).map_err(|_| incomplete())?;
    Ok((status, value))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn event_id(batch: usize, i: usize) -> String {
    format!("b{batch:05}-e{i:02}")
}

/// The hour the events are dated in: the last full hour, the same for every batch of the run
/// (a resent batch is the same batch), recent enough for the collector's `--max-event-age`.
static HOUR: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    (chrono::Utc::now() - chrono::Duration::hours(1)).format("%Y-%m-%dT%H").to_string()
});

fn batch_body(batch: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..EVENTS_PER_BATCH {
        let event = sample_event(
            event_id(batch, i),
            format!("{}:{:02}:{:02}Z", *HOUR, (batch / 60) % 60, batch % 60),
            format!("workload:shop/client-{}", batch % CLIENTS),
        );
        serde_json::to_writer(&mut out, &event).unwrap();
        out.push(b'\n');
    }
    out
}

/// `(accepted, duplicates)` of a 200 answer.
fn ingest(addr: SocketAddr, batch: usize) -> std::io::Result<(u16, u64, u64)> {
    let (status, body) = http(addr, "POST", "/v1/events", Some(&batch_body(batch)))?;
    Ok((
        status,
        body["accepted"].as_u64().unwrap_or(u64::MAX),
        body["duplicates"].as_u64().unwrap_or(u64::MAX),
    ))
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_event_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let mut collector = spawn_collector(dir.path(), &["--shutdown-timeout", "5s"], &[]);
    let addr = collector.addr;

    // Clients stream numbered batches until a request fails (the collector is gone).
    let acked: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let attempted: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acked, attempted, stop) = (acked.clone(), attempted.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut batch = c;
                while !stop.load(Ordering::Relaxed) {
                    attempted.lock().unwrap().insert(batch);
                    match ingest(addr, batch) {
                        Ok((200, accepted, duplicates)) => {
                            assert_eq!((accepted, duplicates), (EVENTS_PER_BATCH as u64, 0), "batch {batch}");
                            acked.lock().unwrap().insert(batch);
                        }
                        Ok((status, _, _)) => panic!("batch {batch}: HTTP {status}"),
                        Err(_) => return,
                    }
                    batch += CLIENTS;
                }
            })
        })
        .collect();

    wait_for("30 acknowledged batches", || acked.lock().unwrap().len() >= 30);
    collector.child.kill().unwrap(); // SIGKILL
    let status = collector.child.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }
    drop(collector);

    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    let unacked: Vec<usize> = attempted.difference(&acked).copied().collect();
    assert!(!unacked.is_empty(), "each client's last attempt failed");

    // Restart on the same store; resend what was not acknowledged, and some that was.
    let collector = spawn_collector(dir.path(), &["--shutdown-timeout", "5s"], &[]);
    let addr = collector.addr;
    for &batch in &unacked {
        let (status, accepted, duplicates) = ingest(addr, batch).unwrap();
        assert_eq!(status, 200);
        assert_eq!(accepted + duplicates, EVENTS_PER_BATCH as u64, "batch {batch}");
        assert!(
            accepted == 0 || duplicates == 0,
            "batch {batch} was stored in part: {accepted}/{duplicates}"
        );
    }
    for &batch in acked.iter().step_by(4) {
        assert_eq!(ingest(addr, batch).unwrap(), (200, 0, EVENTS_PER_BATCH as u64), "resent batch {batch}");
    }

    // Every stored id once; every acknowledged event there; nothing else.
    let mut stored = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=10000&cursor={c}"),
            None => "/v1/events?limit=10000".to_owned(),
        };
        let (status, page) = http(addr, "GET", &path, None).unwrap();
        assert_eq!(status, 200, "{page}");
        stored
            .extend(page["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event id is stored twice");
    let expected: HashSet<String> =
        attempted.iter().flat_map(|&b| (0..EVENTS_PER_BATCH).map(move |i| event_id(b, i))).collect();
    for &batch in &acked {
        for i in 0..EVENTS_PER_BATCH {
            assert!(unique.contains(&event_id(batch, i)), "acknowledged event {} lost", event_id(batch, i));
        }
    }
    assert_eq!(unique, expected.iter().collect::<HashSet<_>>(), "exactly the attempted batches are stored");

    let (status, report) = http(addr, "GET", "/v1/verify", None).unwrap();
    assert_eq!(status, 200);
    assert!(report["firstBroken"].is_null(), "{report}");
    assert_eq!(report["checked"].as_u64(), Some(stored.len() as u64));

    // SIGTERM: a clean exit.
    let mut collector = collector;
    let pid = collector.child.id().to_string();
    if Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success()) {
        wait_for("the collector to exit after SIGTERM", || collector.child.try_wait().unwrap().is_some());
        let status = collector.child.wait().unwrap();
        assert!(status.success(), "graceful exit on SIGTERM: {status:?}");
    }
}
