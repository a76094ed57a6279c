//! OpenTelemetry trace export of the long-running commands: with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set, `custos collector` and `custos operator` post their spans as OTLP/HTTP protobuf to
//! `<endpoint>/v1/traces` (service name from `OTEL_SERVICE_NAME`), flushed on SIGTERM.
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
        // Recent: an event older than the collector's --max-event-age is not stored.
        (chrono::Utc::now() - chrono::Duration::minutes(5)).format("%Y-%m-%dT%H:%M:%SZ").to_string(),
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

/// `custos operator` with no reachable Kubernetes API (its watches retry in the background):
/// its webhook still answers, and the admission span reaches the OTLP endpoint.
#[test]
fn the_operator_exports_its_admission_spans() {
    let (otlp, received) = mock_otlp();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    std::fs::write(dir.path().join("tls.crt"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &key_pem).unwrap();
    // An API server address nothing listens on.
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: none, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]\n\
         users: [{{name: none, user: {{token: test}}}}]\n\
         contexts: [{{name: none, context: {{cluster: none, user: none}}}}]\ncurrent-context: none\n",
        common::free_port()
    );
    std::fs::write(dir.path().join("kubeconfig"), kubeconfig).unwrap();
    let webhook_port = common::free_port();
    let mut operator = common::custos_command()
        .arg("operator")
        .args(["--admin", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
        .arg("--tls-cert-file")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key-file")
        .arg(dir.path().join("tls.key"))
        .args(["--leader-election", "false"])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_SERVICE_NAME", "custos-operator-otlp-test")
        // The filter applies to exported spans too: `admission` is an info span.
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let review: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../operator/testdata/pod-selected.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let answer: serde_json::Value = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
            .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], webhook_port)))
            .build()
            .unwrap();
        let url = format!("https://localhost:{webhook_port}/mutate-pods");
        for _ in 0..200 {
            if let Ok(response) = client.post(&url).json(&review).send().await {
                return response.json().await.unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the operator's webhook did not answer");
    });
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");

    let status = Command::new("kill").args(["-TERM", &operator.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = operator.wait().unwrap();
    assert!(exit.success(), "operator exit: {exit:?}");
    let received = received.lock().unwrap().clone();
    let traces: Vec<u8> =
        received.iter().filter(|r| r.path == "/v1/traces").flat_map(|r| r.body.clone()).collect();
    assert!(
        contains(&traces, b"custos-operator-otlp-test"),
        "the service name is in the resource: {received:?}"
    );
    assert!(contains(&traces, b"admission"), "the admission span is exported");
}
