//! The exporter: stored events → the user's OTLP/HTTP logs endpoint.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custos_api::AuditEvent;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::encode::{encode_logs_protobuf, logs_endpoint};
use crate::{ContentType, ExportLogsPartialSuccess};

/// Settings of an [`OtlpExporter`].
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// The user's OTLP/HTTP endpoint: a base URL (`http://otel-collector:4318`, to which
    /// `/v1/logs` is added) or the full logs URL.
    pub endpoint: String,
    /// Extra request headers (e.g. `authorization`, `x-api-key`). Values are never logged.
    pub headers: Vec<(String, String)>,
    /// Resource attributes of every request (e.g. `service.name`, `k8s.cluster.name`).
    pub resource: Vec<(String, String)>,
    /// Events per request.
    pub batch_size: usize,
    /// Events waiting to be sent; beyond it [`OtlpExporter::try_send`] drops (and counts).
    pub queue_capacity: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
    /// Time-out of one request (connect included).
    pub timeout: Duration,
    /// First delay before a retry; doubled after each failure.
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
    /// How long one batch is retried before it is dropped (counted as `retries_exhausted`).
    pub max_retry_time: Duration,
    /// Compress request bodies with gzip (`Content-Encoding: gzip`).
    pub gzip: bool,
}

impl ExporterConfig {
    /// Defaults for `endpoint`: batches of 512, a queue of 10 000 events, flush every second,
    /// 10 s time-out, back-off from 500 ms to 30 s, a batch given up after 5 minutes, no gzip,
    /// resource `service.name=custos-collector`.
    pub fn new(endpoint: impl Into<String>) -> ExporterConfig {
        ExporterConfig {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            resource: vec![("service.name".into(), "custos-collector".into())],
            batch_size: 512,
            queue_capacity: 10_000,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_time: Duration::from_secs(300),
            gzip: false,
        }
    }
}

/// Errors of the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The configuration is unusable (endpoint URL, header names, sizes).
    #[error("OTLP exporter configuration: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("OTLP exporter HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The exporter was shut down.
    #[error("the OTLP exporter is shut down")]
    Closed,
}

/// [`OtlpExporter::try_send`] found the queue full (or the exporter shut down): `dropped`
/// events were not queued (and are counted in `custos_otlp_export_events_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the OTLP export queue is full: {dropped} events dropped")]
pub struct QueueFull {
    /// Events not queued.
    pub dropped: usize,
}

type Label = [(&'static str, &'static str); 1];

/// Prometheus metrics of the exporter.
///
/// Accounting: every event offered is either dropped with reason `queue_full` or
/// `shutdown` (not queued), or counted in `events_queued`; a queued event ends up in
/// `events_exported`, `events_rejected` (the endpoint refused it) or `events_dropped` with
/// reason `retries_exhausted` / `shutdown`, or is still in the queue (`queue_events`) or in
/// flight.
#[derive(Clone, Debug, Default)]
pub struct ExporterMetrics {
    events_queued: Counter,
    events_exported: Counter,
    events_rejected: Counter,
    events_dropped: Family<Label, Counter>,
    requests: Family<Label, Counter>,
    queue_events: Gauge,
}

impl ExporterMetrics {
    /// Registers the metrics (names start with `custos_otlp_export_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "custos_otlp_export_events_queued",
            "Audit events queued for export to the OTLP endpoint",
            self.events_queued.clone(),
        );
        registry.register(
            "custos_otlp_export_events_exported",
            "Audit events the OTLP endpoint accepted",
            self.events_exported.clone(),
        );
        registry.register(
            "custos_otlp_export_events_rejected",
            "Audit events the OTLP endpoint refused (4xx other than 429, or partial success)",
            self.events_rejected.clone(),
        );
        registry.register(
            "custos_otlp_export_events_dropped",
            "Audit events not exported, by reason (queue_full, retries_exhausted, shutdown)",
            self.events_dropped.clone(),
        );
        registry.register(
            "custos_otlp_export_requests",
            "OTLP export requests, by result (ok, retryable_status, transport_error, rejected)",
            self.requests.clone(),
        );
        registry.register(
            "custos_otlp_export_queue_events",
            "Audit events waiting in the export queue",
            self.queue_events.clone(),
        );
    }

    /// Events queued so far.
    pub fn queued(&self) -> u64 {
        self.events_queued.get()
    }

    /// Events the endpoint accepted so far.
    pub fn exported(&self) -> u64 {
        self.events_exported.get()
    }

    /// Events the endpoint refused so far.
    pub fn rejected(&self) -> u64 {
        self.events_rejected.get()
    }

    /// Events dropped so far for `reason` (`queue_full`, `retries_exhausted`, `shutdown`).
    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.events_dropped.get_or_create(&[("reason", reason)]).get()
    }

    /// Requests so far with `result` (`ok`, `retryable_status`, `transport_error`, `rejected`).
    pub fn requests(&self, result: &'static str) -> u64 {
        self.requests.get_or_create(&[("result", result)]).get()
    }

    fn drop_events(&self, reason: &'static str, n: usize) {
        self.events_dropped.get_or_create(&[("reason", reason)]).inc_by(n as u64);
    }

    fn request(&self, result: &'static str) {
        self.requests.get_or_create(&[("result", result)]).inc();
    }
}

/// What an exporter did over its life, returned by [`OtlpExporter::shutdown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Events the endpoint accepted.
    pub exported: u64,
    /// Events the endpoint refused.
    pub rejected: u64,
    /// Events given up after retrying, or still queued when the shutdown deadline passed.
    pub dropped: u64,
}

/// Forwards audit events to the user's OTLP/HTTP logs endpoint, in the background.
///
/// Events are queued (bounded: [`ExporterConfig::queue_capacity`]) and sent by one task in
/// batches of [`ExporterConfig::batch_size`] (a partial batch after
/// [`ExporterConfig::flush_interval`]) as protobuf `ExportLogsServiceRequest`s
/// ([`encode_logs`](crate::encode_logs)). A batch is retried with exponential back-off (and the
/// server's `Retry-After`) on connection errors and on 429, 502, 503 and 504, as the OTLP
/// specification asks, for at most [`ExporterConfig::max_retry_time`]; other answers refuse
/// the batch. An OTLP partial success counts the records the endpoint rejected.
///
/// The events are already in the store: what cannot be exported is counted, never lost from
/// the audit trail.
#[derive(Debug)]
pub struct OtlpExporter {
    tx: mpsc::Sender<AuditEvent>,
    shutdown: watch::Sender<Option<Instant>>,
    task: Mutex<Option<JoinHandle<ExportSummary>>>,
    metrics: ExporterMetrics,
}

impl OtlpExporter {
    /// Validates the configuration and starts the sending task (on the current tokio
    /// runtime).
    pub fn start(config: ExporterConfig, metrics: ExporterMetrics) -> Result<OtlpExporter, ExportError> {
        if config.batch_size == 0 || config.queue_capacity == 0 {
            return Err(ExportError::Config("batch size and queue capacity must be at least 1".into()));
        }
        let url = logs_endpoint(&config.endpoint).map_err(ExportError::Config)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let header = HeaderName::try_from(name.as_str())
                .map_err(|_| ExportError::Config(format!("invalid header name {name:?}")))?;
            let mut value = HeaderValue::try_from(value.as_str())
                .map_err(|_| ExportError::Config(format!("invalid value for header {name:?}")))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(ContentType::Protobuf.as_str()));
        ensure_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .default_headers(headers)
            .user_agent(concat!("custos-otlp-exporter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ExportError::Client(e.without_url()))?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (shutdown, shutdown_rx) = watch::channel(None);
        let worker = Worker { config, url, client, metrics: metrics.clone(), rx, shutdown: shutdown_rx };
        let task = tokio::spawn(worker.run());
        Ok(OtlpExporter { tx, shutdown, task: Mutex::new(Some(task)), metrics })
    }

    /// Queues as many of `events` as there is room for, without waiting; the rest are dropped
    /// and counted (`queue_full`, or `shutdown` after [`OtlpExporter::shutdown`]).
    pub fn try_send(&self, events: &[AuditEvent]) -> Result<(), QueueFull> {
        for (i, event) in events.iter().enumerate() {
            match self.tx.try_send(event.clone()) {
                Ok(()) => {
                    self.metrics.events_queued.inc();
                }
                Err(e) => {
                    let dropped = events.len() - i;
                    let reason = match e {
                        mpsc::error::TrySendError::Full(_) => "queue_full",
                        mpsc::error::TrySendError::Closed(_) => "shutdown",
                    };
                    self.metrics.drop_events(reason, dropped);
                    self.update_queue_gauge();
                    return Err(QueueFull { dropped });
                }
            }
        }
        self.update_queue_gauge();
        Ok(())
    }

    /// Queues `events`, waiting for room when the queue is full.
    pub async fn send(&self, events: Vec<AuditEvent>) -> Result<(), ExportError> {
        let n = events.len();
        for (i, event) in events.into_iter().enumerate() {
            if self.tx.send(event).await.is_err() {
                self.metrics.drop_events("shutdown", n - i);
                return Err(ExportError::Closed);
            }
            self.metrics.events_queued.inc();
            self.update_queue_gauge();
        }
        Ok(())
    }

    /// The exporter's metrics.
    pub fn metrics(&self) -> &ExporterMetrics {
        &self.metrics
    }

    /// Stops accepting events and sends what is queued, retrying until `grace` has passed;
    /// what is still unsent then is dropped (counted `shutdown`). Returns the totals. A second
    /// call returns the totals at once.
    pub async fn shutdown(&self, grace: Duration) -> ExportSummary {
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        let _ = self.shutdown.send(Some(Instant::now() + grace));
        match task {
            Some(task) => task.await.unwrap_or_else(|_| self.summary()),
            None => self.summary(),
        }
    }

    fn summary(&self) -> ExportSummary {
        ExportSummary {
            exported: self.metrics.exported(),
            rejected: self.metrics.rejected(),
            dropped: self.metrics.dropped("retries_exhausted") + self.metrics.dropped("shutdown"),
        }
    }

    fn update_queue_gauge(&self) {
        let queued = self.tx.max_capacity() - self.tx.capacity();
        self.metrics.queue_events.set(i64::try_from(queued).unwrap_or(i64::MAX));
    }
}

/// Installs rustls' ring provider as the process default unless one is installed already
/// (reqwest is built with `rustls-no-provider`, see custos-shipper's transport).
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in between: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

struct Worker {
    config: ExporterConfig,
    url: reqwest::Url,
    client: reqwest::Client,
    metrics: ExporterMetrics,
    rx: mpsc::Receiver<AuditEvent>,
    shutdown: watch::Receiver<Option<Instant>>,
}

/// How one attempt went.
enum Attempt {
    /// Accepted; the number of records the endpoint rejected in a partial success.
    Accepted { rejected: u64 },
    /// Worth retrying, after at least this long when the server said so.
    Retry { after: Option<Duration> },
    /// Refused for good.
    Refused,
}

impl Worker {
    async fn run(mut self) -> ExportSummary {
        let mut batch: Vec<AuditEvent> = Vec::with_capacity(self.config.batch_size);
        let mut tick = tokio::time::interval(self.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                event = self.rx.recv() => match event {
                    Some(event) => {
                        batch.push(event);
                        self.update_gauge();
                        if batch.len() >= self.config.batch_size {
                            self.deliver(std::mem::take(&mut batch)).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.deliver(std::mem::take(&mut batch)).await;
                    }
                }
            }
        }
        // Shutting down: no more events; send what is queued until the deadline.
        self.rx.close();
        while let Ok(event) = self.rx.try_recv() {
            batch.push(event);
            if batch.len() >= self.config.batch_size {
                self.deliver(std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            self.deliver(batch).await;
        }
        self.update_gauge();
        ExportSummary {
            exported: self.metrics.exported(),
            rejected: self.metrics.rejected(),
            dropped: self.metrics.dropped("retries_exhausted") + self.metrics.dropped("shutdown"),
        }
    }

    fn update_gauge(&self) {
        self.metrics.queue_events.set(i64::try_from(self.rx.len()).unwrap_or(i64::MAX));
    }

    /// The shutdown deadline, once shutdown was asked for.
    fn deadline(&self) -> Option<Instant> {
        *self.shutdown.borrow()
    }

    /// Sends one batch, retrying as configured.
    async fn deliver(&mut self, batch: Vec<AuditEvent>) {
        let n = batch.len();
        let body = encode_logs_protobuf(&batch, &self.config.resource);
        let (body, gzipped) = match self.config.gzip.then(|| gzip(&body)).flatten() {
            Some(compressed) => (compressed, true),
            None => (body, false),
        };
        let give_up = Instant::now() + self.config.max_retry_time;
        let mut backoff = self.config.initial_backoff;
        loop {
            if self.deadline().is_some_and(|d| Instant::now() >= d) {
                self.metrics.drop_events("shutdown", n);
                tracing::warn!(events = n, "OTLP export: shutdown deadline passed; batch dropped");
                return;
            }
            match self.attempt(body.clone(), gzipped, n).await {
                Attempt::Accepted { rejected } => {
                    let rejected = rejected.min(n as u64);
                    self.metrics.events_exported.inc_by(n as u64 - rejected);
                    self.metrics.events_rejected.inc_by(rejected);
                    return;
                }
                Attempt::Refused => {
                    self.metrics.events_rejected.inc_by(n as u64);
                    return;
                }
                Attempt::Retry { after } => {
                    let wait = after.unwrap_or(jitter(backoff)).min(self.config.max_backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    let wake = Instant::now() + wait;
                    if wake > give_up {
                        self.metrics.drop_events("retries_exhausted", n);
                        tracing::warn!(
                            events = n,
                            "OTLP export: batch given up after {:?} of retries",
                            self.config.max_retry_time
                        );
                        return;
                    }
                    self.sleep_until(wake).await;
                }
            }
        }
    }

    /// Sleeps until `wake`, or until the shutdown deadline when that comes first.
    async fn sleep_until(&mut self, wake: Instant) {
        loop {
            let until = match self.deadline() {
                Some(d) => wake.min(d),
                None => wake,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                changed = self.shutdown.changed() => {
                    if changed.is_err() {
                        // The exporter handle is gone: sleep out the delay.
                        tokio::time::sleep_until(until).await;
                        return;
                    }
                }
            }
        }
    }

    async fn attempt(&self, body: Vec<u8>, gzipped: bool, n: usize) -> Attempt {
        let mut request = self.client.post(self.url.clone()).body(body);
        if gzipped {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.request("transport_error");
                tracing::warn!(events = n, error = %e.without_url(), "OTLP export: request failed");
                return Attempt::Retry { after: None };
            }
        };
        let status = response.status();
        if status.is_success() {
            self.metrics.request("ok");
            let is_json = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(ContentType::from_header)
                == Some(ContentType::Json);
            let bytes = response.bytes().await.unwrap_or_default();
            let rejected = partial_success(&bytes, is_json).map_or(0, |p| {
                if p.rejected_log_records > 0 {
                    tracing::warn!(
                        rejected = p.rejected_log_records,
                        "OTLP export: the endpoint rejected part of a batch: {}",
                        p.error_message
                    );
                }
                u64::try_from(p.rejected_log_records).unwrap_or(0)
            });
            return Attempt::Accepted { rejected };
        }
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        ) {
            self.metrics.request("retryable_status");
            let after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            tracing::warn!(events = n, status = status.as_u16(), "OTLP export: endpoint busy; will retry");
            return Attempt::Retry { after };
        }
        self.metrics.request("rejected");
        tracing::warn!(events = n, status = status.as_u16(), "OTLP export: the endpoint refused a batch");
        Attempt::Refused
    }
}

/// The partial success of an export answer (empty bodies and unreadable answers: none).
fn partial_success(bytes: &[u8], is_json: bool) -> Option<ExportLogsPartialSuccess> {
    if bytes.is_empty() {
        return None;
    }
    if is_json {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let partial = value.get("partialSuccess")?;
        let rejected = match partial.get("rejectedLogRecords") {
            Some(serde_json::Value::String(s)) => s.parse().ok()?,
            Some(serde_json::Value::Number(n)) => n.as_i64()?,
            _ => 0,
        };
        let error_message =
            partial.get("errorMessage").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        Some(ExportLogsPartialSuccess { rejected_log_records: rejected, error_message })
    } else {
        ExportLogsServiceResponse::decode(bytes).ok()?.partial_success
    }
}

/// `d` plus up to 25 % (from the clock's sub-second nanoseconds: enough to spread senders).
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// `bytes` gzipped; `None` if compression failed (it writes to memory: not expected), in
/// which case the body is sent uncompressed.
fn gzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).ok()?;
    encoder.finish().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_success_in_both_encodings() {
        let json = br#"{"partialSuccess":{"rejectedLogRecords":"2","errorMessage":"no"}}"#;
        let p = partial_success(json, true).unwrap_or_default();
        assert_eq!((p.rejected_log_records, p.error_message.as_str()), (2, "no"));
        let proto = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: 3,
                error_message: "x".into(),
            }),
        }
        .encode_to_vec();
        assert_eq!(partial_success(&proto, false).map(|p| p.rejected_log_records), Some(3));
        assert_eq!(partial_success(b"", false), None);
        assert_eq!(partial_success(b"{}", true), None);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let d = Duration::from_millis(400);
        let j = jitter(d);
        assert!(j >= d && j <= d + Duration::from_millis(100));
    }
}
