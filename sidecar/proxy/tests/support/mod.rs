//! Test fixtures: an upstream app, a collector, config files, the sidecar, HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custos_api::collector::{IngestResponse, RuleUsage, UsageResponse};
use custos_api::config::WorkloadIdentity;
use custos_api::policy::DataAccessPolicySpec;
use custos_policy::{PolicyInput, compile_namespace};
use custos_sidecar::{RunningSidecar, SidecarSettings};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const NAMESPACE: &str = "shop";

/// The upstream's customer list. Names and phones are the "personal data" the tests look for.
pub fn customers() -> Value {
    json!({"items": [
        {"id": 1, "name": "Alice Example", "phone": "+8613800001111", "branch": "north"},
        {"id": 2, "name": "Bob Example", "phone": "+8613800002222", "branch": "south"},
        {"id": 3, "name": "Carol Example", "phone": "+8613800003333", "branch": "north"},
        {"id": 4, "name": "Dan Example", "phone": "+8613800004444", "branch": "north"}
    ]})
}

pub const PERSONAL: [&str; 8] = [
    "Alice Example",
    "Bob Example",
    "Carol Example",
    "Dan Example",
    "+8613800001111",
    "+8613800002222",
    "+8613800003333",
    "+8613800004444",
];

/// A request the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
    /// The body's bytes once the app read it to its end; none while it reads, or when the
    /// body stopped short (the connection closed mid-body: no framework runs a handler then).
    pub body: Option<Bytes>,
}

/// The app behind the sidecar.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(app(req, log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.target).collect()
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn app(req: Request<Incoming>, log: Arc<Mutex<Vec<Seen>>>) -> Response<AppBody> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let at = {
        let mut log = log.lock().unwrap();
        log.push(Seen {
            method: req.method().to_string(),
            target: target.clone(),
            headers: req.headers().clone(),
            body: None,
        });
        log.len() - 1
    };
    let path = req.uri().path().to_string();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (if_none_match, range) = (header("if-none-match"), header("range"));
    let announced_trailer = header("trailer");
    let collected = req.into_body().collect().await.ok();
    let read_whole = collected.is_some();
    let trailer_names: Vec<String> = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .map_or(Vec::new(), |t| t.keys().map(|k| k.to_string()).collect());
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    if read_whole {
        log.lock().unwrap()[at].body = Some(body.clone());
    }
    let json_body = serde_json::to_vec(&customers()).unwrap();
    let full = |status: u16, ct: &str, bytes: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .header("x-custos-internal", "leak")
            .body(Full::new(Bytes::from(bytes)).boxed())
            .unwrap()
    };
    if path == "/open/cached" {
        // A page the app lets every cache keep.
        let mut r = full(200, "application/json", json_body.clone());
        for (name, value) in [
            ("cache-control", "public, max-age=60"),
            ("cdn-cache-control", "max-age=600"),
            ("surrogate-control", "max-age=600"),
        ] {
            r.headers_mut().insert(name, value.parse().unwrap());
        }
        return r;
    }
    if path.starts_with("/chunked/") {
        let chunks = json_body.chunks(17).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect();
        return Response::builder()
            .header("content-type", "application/json")
            .body(Frames(chunks).boxed())
            .unwrap();
    }
    if path.starts_with("/gzip/") {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&json_body).unwrap();
        let mut r = full(200, "application/json", e.finish().unwrap());
        r.headers_mut().insert("content-encoding", "gzip".parse().unwrap());
        return r;
    }
    if path.starts_with("/ranged/") {
        // A file server: validators, and byte ranges when asked.
        let etag = "\"v1-5f3c\"";
        if if_none_match.as_deref() == Some(etag) {
            return Response::builder()
                .status(304)
                .header("etag", etag)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap();
        }
        let mut r = match range.and_then(|r| parse_range(&r, json_body.len())) {
            Some((start, end)) => {
                let mut r = full(206, "application/json", json_body[start..=end].to_vec());
                let range = format!("bytes {start}-{end}/{}", json_body.len());
                r.headers_mut().insert("content-range", range.parse().unwrap());
                r
            }
            None => full(200, "application/json", json_body.clone()),
        };
        for (name, value) in [
            ("etag", etag),
            ("accept-ranges", "bytes"),
            ("content-digest", "sha-256=:AAAA:"),
            ("cache-control", "public, max-age=300"),
        ] {
            r.headers_mut().insert(name, value.parse().unwrap());
        }
        return r;
    }
    if path.starts_with("/partial/") {
        // An app that answers with a slice unasked: the first phone number, as a JSON string.
        let text = String::from_utf8(json_body.clone()).unwrap();
        let start = text.find("\"+86").unwrap();
        let mut r = full(206, "application/json", json_body[start..start + 16].to_vec());
        let range = format!("bytes {start}-{}/{}", start + 15, json_body.len());
        r.headers_mut().insert("content-range", range.parse().unwrap());
        return r;
    }
    if path.starts_with("/html/") {
        let mut r = full(200, "text/html", b"<html>Alice Example +8613800001111</html>".to_vec());
        if path == "/html/cached" {
            r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
            r.headers_mut().insert("cdn-cache-control", "max-age=600".parse().unwrap());
        }
        return r;
    }
    if path.starts_with("/shape/") {
        // The customers under another key than the policy's records path says.
        let items = customers()["items"].clone();
        return full(200, "application/json", serde_json::to_vec(&json!({"results": items})).unwrap());
    }
    if path.starts_with("/single/") {
        let record = customers()["items"][1].clone();
        return full(200, "application/json", serde_json::to_vec(&record).unwrap());
    }
    if path.starts_with("/dribble/") {
        // The customers in four parts, 150 ms apart.
        let parts: Vec<Bytes> =
            json_body.chunks(json_body.len().div_ceil(4)).map(Bytes::copy_from_slice).collect();
        return Response::builder()
            .header("content-type", "application/json")
            .body(Dribble { parts: parts.into(), wait: None, gaps: vec![150; 4].into() }.boxed())
            .unwrap();
    }
    if path.starts_with("/stall/") {
        // The customers' first half at once, the rest 2 s later.
        let half = json_body.len() / 2;
        let parts = [Bytes::copy_from_slice(&json_body[..half]), Bytes::copy_from_slice(&json_body[half..])];
        return Response::builder()
            .header("content-type", "application/json")
            .body(Dribble { parts: parts.into(), wait: None, gaps: vec![0, 2000].into() }.boxed())
            .unwrap();
    }
    if path.starts_with("/delay/") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if path.starts_with("/slow/") {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    if path.starts_with("/huge/") {
        // 32 MiB passed through: more than the sockets between a client and the app hold.
        return full(200, "application/octet-stream", vec![b'x'; 32 << 20]);
    }
    if path.starts_with("/many/") {
        // More records than one event keeps hashes of: 10,050 small ones.
        let items: Vec<Value> = (0..10_050).map(|i| json!({"id": i})).collect();
        return full(200, "application/json", serde_json::to_vec(&json!({"items": items})).unwrap());
    }
    if path.starts_with("/big/") {
        let items: Vec<Value> = (0..2000).map(|i| json!({"id": i, "phone": "+8613800001111"})).collect();
        return full(200, "application/json", serde_json::to_vec(&json!({"items": items})).unwrap());
    }
    if path.starts_with("/mirror/") {
        return full(200, "application/octet-stream", body.to_vec());
    }
    if path.starts_with("/trailers/") {
        // The customers, what arrived of the request (its trailer fields too), and a trailer
        // field of its own: hyper sends it only to a request that said `TE: trailers`.
        let mut doc = customers();
        doc["received"] = json!(body.len());
        doc["trailers"] = json!(trailer_names);
        doc["announced"] = json!(announced_trailer);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let frames = [Frame::data(Bytes::from(serde_json::to_vec(&doc).unwrap())), Frame::trailers(trailers)];
        return Response::builder()
            .header("content-type", "application/json")
            .header("trailer", "x-checksum")
            .body(Frames(frames.into_iter().collect()).boxed())
            .unwrap();
    }
    if path.starts_with("/echo/") {
        return full(200, "application/json", serde_json::to_vec(&json!({"received": body.len()})).unwrap());
    }
    full(200, "application/json", json_body)
}

/// `bytes=a-b` within `len`, as (a, b).
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let (a, b) = range.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse::<usize>().ok()?.min(len - 1));
    (a <= b).then_some((a, b))
}

/// A body of these frames (data and trailers), with no length: hyper uses chunked encoding.
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

/// A body sent in parts, each after its gap (milliseconds).
struct Dribble {
    parts: std::collections::VecDeque<Bytes>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    gaps: std::collections::VecDeque<u64>,
}

impl hyper::body::Body for Dribble {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.parts.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let gap = this.gaps.front().copied().unwrap_or(0);
        let wait = this.wait.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(gap))));
        std::task::ready!(std::future::Future::poll(wait.as_mut(), cx));
        this.wait = None;
        this.gaps.pop_front();
        std::task::Poll::Ready(this.parts.pop_front().map(|p| Ok(Frame::data(p))))
    }
}

/// Usage the test collector reports for one (policy, principal): the other replicas' figures
/// per rule, to which it adds what this sidecar sent it (as a real collector would).
type UsageBase = BTreeMap<(String, String), BTreeMap<String, RuleUsage>>;

/// What the test collector holds.
#[derive(Default)]
struct CollectorState {
    /// Every event line received, in order, resends included.
    events: Mutex<Vec<Value>>,
    /// Usage reported by `GET /v1/usage`, by (policy, principal).
    usage: Mutex<UsageBase>,
    /// `GET /v1/usage` requests, by (policy, principal).
    usage_hits: Mutex<BTreeMap<(String, String), usize>>,
    /// How long `GET /v1/usage` takes to answer.
    usage_delay: Mutex<Duration>,
    /// Why the audit store refused events received (the real collector's rules).
    refused: Mutex<Vec<String>>,
}

/// The audit collector: stores every NDJSON line it receives and answers `/v1/usage`.
pub struct Collector {
    pub addr: SocketAddr,
    state: Arc<CollectorState>,
}

impl Collector {
    pub async fn start() -> Collector {
        Collector::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// A collector on `addr` (e.g. a port reserved with [`reserve_port`]).
    pub async fn start_on(addr: SocketAddr) -> Collector {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(CollectorState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(collector(req, &shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every event line received so far, resends included. Panics if the audit store
    /// refused any of them: a real collector would have answered 400 and lost it.
    pub fn events(&self) -> Vec<Value> {
        let refused = self.state.refused.lock().unwrap().clone();
        assert!(refused.is_empty(), "the audit store refused events a sidecar sent: {refused:?}");
        self.state.events.lock().unwrap().clone()
    }

    /// How many times each event id was received.
    pub fn receipts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in self.events() {
            *counts.entry(e["id"].as_str().unwrap().to_string()).or_insert(0) += 1;
        }
        counts
    }

    /// Waits (bounded) until at least `n` events arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("collector got {} events, expected {n}", self.events().len());
    }

    /// Waits (bounded) until events of at least `n` distinct ids arrived.
    pub async fn wait_for_distinct(&self, n: usize) -> BTreeMap<String, usize> {
        for _ in 0..400 {
            let receipts = self.receipts();
            if receipts.len() >= n {
                return receipts;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("collector got {} distinct events, expected {n}", self.receipts().len());
    }

    /// Reports, for `principal` under `policy`, that other replicas used `usage` under `rule`.
    pub fn set_other_replicas_usage(&self, policy: &str, principal: &str, rule: &str, usage: RuleUsage) {
        self.state
            .usage
            .lock()
            .unwrap()
            .entry((policy.to_string(), principal.to_string()))
            .or_default()
            .insert(rule.to_string(), usage);
    }

    /// Makes `GET /v1/usage` answer after `delay` (counted as a hit on arrival).
    pub fn set_usage_delay(&self, delay: Duration) {
        *self.state.usage_delay.lock().unwrap() = delay;
    }

    /// How many `GET /v1/usage` asked about `principal` under `policy`.
    pub fn usage_hits(&self, policy: &str, principal: &str) -> usize {
        let hits = self.state.usage_hits.lock().unwrap();
        hits.get(&(policy.to_string(), principal.to_string())).copied().unwrap_or(0)
    }
}

/// A free port on 127.0.0.1: bound, then released, so that nothing listens there until a
/// test starts something on it.
pub fn reserve_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn collector(req: Request<Incoming>, state: &CollectorState) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
    let query = req.uri().query().unwrap_or("").to_string();
    let raw = req.into_body().collect().await.unwrap().to_bytes();
    if path == "/v1/usage" {
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let policy = params.get("policy").cloned().unwrap_or_default();
        let principal = params.get("principal").cloned().unwrap_or_default();
        let pair = (policy.clone(), principal.clone());
        *state.usage_hits.lock().unwrap().entry(pair.clone()).or_insert(0) += 1;
        let delay = *state.usage_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let base = state.usage.lock().unwrap().get(&pair).cloned().unwrap_or_default();
        // The cluster figures: the other replicas' plus what this sidecar reported, counted
        // once per event id, as the collector counts them (admitted requests, records
        // returned) under the deciding rule, the rules in `alsoApplied` and the charged dry
        // runs, each under its own principal (the event's unless it names one), as of now.
        let as_of = chrono::Utc::now();
        let mut rules = base.clone();
        // With `instance`: also without the asking sidecar process's own events.
        let mut without = base;
        let mut seen = std::collections::BTreeSet::new();
        let instance = params.get("instance").cloned();
        for e in state.events.lock().unwrap().iter() {
            if !seen.insert(e["id"].as_str().unwrap_or("").to_string()) {
                continue;
            }
            let id = e["id"].as_str().unwrap_or("");
            let mine =
                instance.is_some() && custos_api::collector::instance_of_event_id(id) == instance.as_deref();
            let admitted = e["decision"] != "Deny";
            let records = e["recordsReturned"].as_u64().unwrap_or(0);
            let event_principal = e["principal"].as_str().unwrap_or("");
            let own = |entry: &'_ Value| -> String {
                entry["principal"].as_str().unwrap_or(event_principal).to_owned()
            };
            // (policy, rule, principal, admitted, records)
            let mut charges: Vec<(&str, &str, String, bool, u64)> = Vec::new();
            if let (Some(p), Some(rule)) = (e["policy"].as_str(), e["rule"].as_str()) {
                charges.push((p, rule, own(&Value::Null), admitted, records));
            }
            for a in e["alsoApplied"].as_array().into_iter().flatten() {
                let (Some(p), Some(rule)) = (a["policy"].as_str(), a["rule"].as_str()) else { continue };
                charges.push((p, rule, own(a), admitted, records));
            }
            for d in e["dryRuns"].as_array().into_iter().flatten().filter(|d| d["charged"] == true) {
                let (Some(p), Some(rule)) = (d["policy"].as_str(), d["rule"].as_str()) else { continue };
                let would = d["transform"]["recordsReturned"].as_u64().unwrap_or(0);
                charges.push((p, rule, own(d), true, would));
            }
            for (p, rule, who, admitted, records) in charges {
                if p != policy || who != principal.as_str() {
                    continue;
                }
                for (table, counts) in [(&mut rules, true), (&mut without, !mine)] {
                    let Some(u) = table.get_mut(rule).filter(|_| counts) else { continue };
                    u.requests_last_minute += u64::from(admitted);
                    u.records_last_hour += records;
                    u.records_last_day += records;
                }
            }
        }
        let body = UsageResponse {
            policy,
            principal,
            as_of: as_of.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            rules,
            rules_without_instance: instance.as_ref().map(|_| without),
            instance,
        };
        return Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())));
    }
    let text = if gzip {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut s).unwrap();
        s
    } else {
        String::from_utf8(raw.to_vec()).unwrap()
    };
    // The store's own ingest rules, one event at a time (a batch is refused whole).
    let store = custos_store::open("sqlite::memory:").await.unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let refused = match serde_json::from_str::<custos_api::AuditEvent>(line) {
            Ok(event) => store.ingest(&[event]).await.err().map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = refused {
            state.refused.lock().unwrap().push(why);
        }
    }
    let mut events = state.events.lock().unwrap();
    let (mut accepted, mut duplicates) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).unwrap();
        if events.iter().any(|e| e["id"] == event["id"]) {
            duplicates += 1;
        } else {
            accepted += 1;
        }
        events.push(event);
    }
    let body = IngestResponse { accepted, duplicates, expired: 0 };
    Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Compiles policies (name, spec JSON) of [`NAMESPACE`] into a config file.
pub fn write_config(path: &Path, policies: &[(&str, Value)], workloads: Vec<WorkloadIdentity>) {
    let inputs: Vec<PolicyInput> = policies
        .iter()
        .map(|(name, spec)| PolicyInput {
            name: name.to_string(),
            generation: Some(1),
            spec: serde_json::from_value::<DataAccessPolicySpec>(spec.clone()).unwrap(),
        })
        .collect();
    let compiled = compile_namespace(NAMESPACE, &inputs, workloads);
    assert!(compiled.is_clean(), "{:?}", compiled.errors);
    // Write-then-rename, as a ConfigMap volume swaps its content atomically.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&compiled.config).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A running sidecar with its upstream and temp dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub upstream: Upstream,
    pub sidecar: Option<RunningSidecar>,
    pub config: PathBuf,
}

impl Fixture {
    pub fn proxy(&self) -> SocketAddr {
        self.sidecar.as_ref().unwrap().proxy_addr()
    }

    pub fn admin(&self) -> SocketAddr {
        self.sidecar.as_ref().unwrap().admin_addr()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.sidecar.take() {
            s.shutdown().await.unwrap();
        }
    }
}

/// Base settings for a test sidecar on ephemeral ports.
pub fn settings(config: &Path, dir: &Path) -> SidecarSettings {
    let mut s = SidecarSettings::new(config);
    s.listen = Some("127.0.0.1:0".parse().unwrap());
    s.admin = "127.0.0.1:0".parse().unwrap();
    s.namespace = Some(NAMESPACE.to_string());
    s.pod_labels = BTreeMap::from([("app".to_string(), "customer-api".to_string())]);
    s.pod_name = Some("customer-api-0".to_string());
    s.hash_key = Some(b"test-hash-key-0123456789abcdef".to_vec());
    s.jwks_dir = dir.join("jwks");
    s.reload_interval = Duration::from_millis(50);
    s.drain_timeout = Duration::from_secs(2);
    s.shipper_shutdown_timeout = Duration::from_secs(2);
    s
}

/// Starts an upstream and a sidecar over `policies`; `tweak` adjusts the settings.
pub async fn fixture(
    policies: &[(&str, Value)],
    workloads: Vec<WorkloadIdentity>,
    tweak: impl FnOnce(&mut SidecarSettings),
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let config = dir.path().join("config.json");
    let policies: Vec<(&str, Value)> = policies
        .iter()
        .map(|(n, spec)| {
            let mut spec = spec.clone();
            spec["workload"]["appPort"] = json!(upstream.addr.port());
            (*n, spec)
        })
        .collect();
    write_config(&config, &policies, workloads);
    let mut s = settings(&config, dir.path());
    tweak(&mut s);
    let sidecar = custos_sidecar::start(s).await.unwrap();
    Fixture { dir, upstream, sidecar: Some(sidecar), config }
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// GET `path` with extra headers.
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "customer-api");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(Full::new(Bytes::new())).unwrap()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    get_with(addr, path, &[]).await
}

/// Writes `raw` on a new connection and returns the status code of the answer (`None` when
/// the connection closed without one) and the whole answer.
pub async fn raw(addr: SocketAddr, raw: &[u8]) -> (Option<u16>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    answer(stream).await
}

/// Reads what is left on `stream` until the server closes it: the status code of the answer
/// (`None` when there was none) and the whole text.
pub async fn answer(mut stream: TcpStream) -> (Option<u16>, String) {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.expect("answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok());
    (status, text)
}

/// Waits (bounded: 5 s) until `done` holds.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting until {what}");
}

/// Polls `url` on the admin server.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Reply {
    get(addr, path).await
}
