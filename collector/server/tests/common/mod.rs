//! Test harness: a collector on 127.0.0.1 (ephemeral port) over a SQLite file in a temporary
//! directory, or over a fresh schema of the PostgreSQL database named by
//! `CUSTOS_TEST_POSTGRES_URL` (dropped afterwards); an HTTP client with the token.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use custos_api::audit::{AUDIT_SCHEMA_VERSION, AuditUser};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_collector::{Auth, CollectorConfig, RunningCollector};
use custos_store::{AnyStore, ChainHead, MAX_LIMIT};
use serde_json::Value;

pub const TOKEN: &str = "test-token-0123456789";
pub const POSTGRES_ENV: &str = "CUSTOS_TEST_POSTGRES_URL";

pub enum Store {
    Sqlite { path: PathBuf },
    Postgres { base: String, schema: String },
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static NOTICE: AtomicBool = AtomicBool::new(false);

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

impl Store {
    /// A fresh schema in the test PostgreSQL, or `None` (with a notice) when not configured.
    pub async fn postgres() -> Option<Store> {
        let Ok(base) = std::env::var(POSTGRES_ENV) else {
            if !NOTICE.swap(true, Ordering::Relaxed) {
                let _ = writeln!(
                    std::io::stderr(),
                    "NOTICE: {POSTGRES_ENV} is not set: PostgreSQL tests skipped"
                );
            }
            return None;
        };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let schema = format!(
            "custos_collector_test_{}_{}_{}",
            std::process::id(),
            nanos,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        pg_connect(&base).await.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
        Some(Store::Postgres { base, schema })
    }

    pub fn url(&self) -> String {
        match self {
            Store::Sqlite { path } => format!("sqlite:{}", path.display()),
            Store::Postgres { base, schema } => {
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options=-csearch_path%3D{schema}")
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Postgres { base, schema } = self {
            let (base, schema) = (base.clone(), schema.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let _ =
                        pg_connect(&base).await.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
                });
            })
            .join();
        }
    }
}

/// A running collector and a client for it.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub token_file: PathBuf,
    pub running: Option<RunningCollector>,
    pub base: String,
    pub client: reqwest::Client,
    pub store_env: Store,
}

pub fn client() -> reqwest::Client {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

impl Harness {
    /// A collector over a new SQLite file.
    pub async fn sqlite() -> Harness {
        Harness::sqlite_with(|_| {}).await
    }

    pub async fn sqlite_with(configure: impl FnOnce(&mut CollectorConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Sqlite { path: dir.path().join("audit.db") };
        Harness::start(dir, store, configure).await
    }

    pub async fn on(store: Store, configure: impl FnOnce(&mut CollectorConfig)) -> Harness {
        Harness::start(tempfile::tempdir().unwrap(), store, configure).await
    }

    pub async fn start(
        dir: tempfile::TempDir,
        store_env: Store,
        configure: impl FnOnce(&mut CollectorConfig),
    ) -> Harness {
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let mut config = CollectorConfig::new(store_env.url(), Auth::TokenFile(token_file.clone()));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.shutdown_timeout = Duration::from_secs(5);
        configure(&mut config);
        let running = custos_collector::start(config).await.unwrap();
        let base = format!("http://{}", running.addr());
        Harness { dir, token_file, running: Some(running), base, client: client(), store_env }
    }

    pub fn running(&self) -> &RunningCollector {
        self.running.as_ref().unwrap()
    }

    pub fn store(&self) -> &AnyStore {
        self.running().store()
    }

    /// `POST /v1/events` with the token.
    pub async fn post(&self, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        self.post_with(Some(content_type), None, Some(TOKEN), body).await
    }

    pub async fn post_with(
        &self,
        content_type: Option<&str>,
        encoding: Option<&str>,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self.client.post(format!("{}/v1/events", self.base)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        if let Some(enc) = encoding {
            request = request.header("content-encoding", enc);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request.send().await.unwrap()).await
    }

    /// `GET` with the token.
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let request = self.client.get(format!("{}{path_and_query}", self.base)).bearer_auth(TOKEN);
        answer(request.send().await.unwrap()).await
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The chain head.
    pub async fn head(&self) -> ChainHead {
        self.store().head().await.unwrap()
    }

    /// Every stored event id, in query order.
    pub async fn stored_ids(&self) -> Vec<String> {
        stored_ids(self.store()).await
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), running.shutdown())
                .await
                .expect("shutdown in time");
        }
    }
}

pub async fn stored_ids(store: &AnyStore) -> Vec<String> {
    let mut ids = Vec::new();
    let mut q = custos_store::EventQuery { limit: MAX_LIMIT, ..Default::default() };
    loop {
        let page = store.query(&q).await.unwrap();
        ids.extend(page.events.into_iter().map(|e| e.id));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return ids,
        }
    }
}

pub async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// 2025-06-01T12:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// An Allow by `user:alice` under policy `customers`, rule `read`, in namespace `shop`.
pub fn event(id: &str, time: DateTime<Utc>) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: id.to_owned(),
        time: rfc3339(time),
        cluster: None,
        namespace: "shop".into(),
        policy: Some("customers".into()),
        rule: Some("read".into()),
        mode: Mode::Enforce,
        pod: Some("customers-0".into()),
        caller: None,
        user: Some(AuditUser {
            id: "alice".into(),
            attributes: BTreeMap::from([("branch".into(), "north".into())]),
        }),
        principal: "user:alice".into(),
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
        bytes: 120,
        latency_us: 900,
        trace_id: None,
        record_hashes: vec![],
        also_applied: Vec::new(),
        dry_runs: Vec::new(),
        prev_hash: None,
    }
}

/// `n` events `<prefix>000..`, one second apart from `t0`.
pub fn events(prefix: &str, n: usize) -> Vec<AuditEvent> {
    (0..n).map(|i| event(&format!("{prefix}{i:03}"), t0() + chrono::Duration::seconds(i as i64))).collect()
}

pub fn ndjson(events: &[AuditEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        serde_json::to_writer(&mut out, e).unwrap();
        out.push(b'\n');
    }
    out
}

pub fn json_array(events: &[AuditEvent]) -> Vec<u8> {
    serde_json::to_vec(events).unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub fn ids(events: &[AuditEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Asserts that `stored` holds each of `expected` exactly once and nothing else.
pub fn assert_exactly(stored: &[String], expected: &[String]) {
    let set: HashSet<&String> = stored.iter().collect();
    assert_eq!(set.len(), stored.len(), "an event id is stored twice");
    let want: HashSet<&String> = expected.iter().collect();
    assert_eq!(set, want, "stored ids differ from the expected ones");
}

/// Polls `condition` every 20 ms; panics after 30 s (a hang guard, not a timing assertion).
pub async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
