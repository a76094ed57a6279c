//! OpenTelemetry trace export of the long-running commands: with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set, `custos collector` posts its spans as OTLP/HTTP protobuf to `<endpoint>/v1/traces`
//! (service name from `OTEL_SERVICE_NAME`), flushed on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// One request the mock OTLP receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// A minimal HTTP/1.1 server answering 200 to everything and recording the requests.
fn mock_otlp() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let sink = sink.clone();
            std::thread::spawn(move || serve(stream, &sink));
        }
    });
    (addr, received)
}

fn serve(stream: TcpStream, sink: &Mutex<Vec<Received>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_string();
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        sink.lock().unwrap().push(Received { path, content_type, body });
        let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs a collector exporting to `otel_endpoint`, posts one batch, stops it with SIGTERM.
fn run_collector(otel_endpoint: String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "otlp-test-token\n").unwrap();
    let mut collector = common::spawn_collector(
        dir.path(),
        &["--no-detect"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otel_endpoint.as_str()), ("OTEL_SERVICE_NAME", "custos-otlp-test")],
    );
    let addr = collector.addr;

    let event = common::sample_event(
        "01JOTLPTRACE0000000000000A".into(),
        "2026-01-01T00:00:00Z".into(),
        "workload:shop/client".into(),
    );
    let body = serde_json::to_string(&event).unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer otlp-test-token\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let status = Command::new("kill").args(["-TERM", &collector.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = collector.child.wait().unwrap();
    assert!(exit.success(), "collector exit: {exit:?}");
}

#[test]
fn spans_are_exported_as_otlp_protobuf_and_flushed_on_sigterm() {
    let (otlp, received) = mock_otlp();
    run_collector(format!("http://{otlp}"));
    let received = received.lock().unwrap().clone();
    let traces: Vec<_> = received.iter().filter(|r| r.path == "/v1/traces").collect();
    assert!(!traces.is_empty(), "no POST /v1/traces: {received:?}");
    assert!(traces.iter().all(|r| r.content_type == "application/x-protobuf"), "{traces:?}");
    let all: Vec<u8> = traces.iter().flat_map(|r| r.body.clone()).collect();
    assert!(contains(&all, b"custos-otlp-test"), "the service name is in the resource");
    assert!(contains(&all, b"ingest_batch"), "the ingest span is exported");
}
