//! Alert delivery: [`AlertDispatcher`] takes alerts without blocking and, in the background,
//! hands each to the [`AlertRecorder`]s (e.g. Kubernetes Events, added by the operator) and
//! POSTs it as JSON to the webhook, with retries and capped exponential back-off with jitter.
//!
//! Every alert given to [`AlertDispatcher::dispatch`] is counted in
//! `custos_collector_alerts_total{detector,severity}` and logged (target `custos_alert`). When
//! there is somewhere to deliver to, it is then either handled (its webhook fate counted in
//! `custos_collector_alert_webhook_deliveries_total{result}`), still pending
//! (`custos_collector_alerts_pending`), or counted in `custos_collector_alerts_dropped_total`
//! (queue full, or left over at [`AlertDispatcher::shutdown`]).
//!
//! # Webhook payload
//!
//! `POST <webhook>` with `Content-Type: application/json`, `Idempotency-Key: <alert id>`,
//! `X-Custos-Alert-Id: <alert id>`, `Authorization: Bearer <token>` when a token file is
//! configured, and the [`Alert`] as the body (`id`, `time`, `detector`, `namespace`, `policy`,
//! `principal`, `severity`, `message`, `details`). Any 2xx is success. 5xx, 408, 429 (its
//! `Retry-After` in seconds is honoured, capped), 401 (the token file is read again), time-outs
//! and connection errors are retried; other statuses (4xx, redirects) are not. A retried alert
//! may arrive twice; the id is stable, so receivers de-duplicate by it.

mod webhook;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use custos_store::Alert;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::parse_duration;
use crate::metrics::AlertMetrics;
use webhook::Webhook;

/// Errors starting the dispatcher. They never contain the webhook URL (it may hold a secret).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The webhook URL cannot be used.
    #[error("invalid alert webhook URL: {0}")]
    InvalidWebhook(String),
    /// A setting is out of range.
    #[error("invalid alert delivery setting {field}: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the alert webhook client: {0}")]
    Client(#[source] reqwest::Error),
    /// [`DispatcherBuilder::start`] was called outside a tokio runtime.
    #[error("the alert dispatcher must be started inside a tokio runtime")]
    NoRuntime,
}

/// Settings of alert delivery.
#[derive(Clone)]
pub struct SinkConfig {
    /// Webhook URL (`http://` or `https://`); none: no webhook.
    pub webhook: Option<String>,
    /// File holding a bearer token for the webhook, read before every attempt.
    pub token_file: Option<PathBuf>,
    /// Time-out of one webhook attempt (connect and answer); also bounds each recorder call.
    pub timeout: Duration,
    /// Attempts per alert before giving up.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubled after each, up to `backoff_max` (each wait
    /// is jittered between half and all of it).
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Alerts waiting for delivery; beyond it new alerts are dropped (and counted).
    pub queue_capacity: usize,
    /// Alerts delivered concurrently.
    pub concurrency: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            webhook: None,
            token_file: None,
            timeout: Duration::from_secs(5),
            max_attempts: 8,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            queue_capacity: 1024,
            concurrency: 4,
        }
    }
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's path and query may hold a secret: only scheme and host are shown.
        let webhook = self.webhook.as_deref().map(|u| match reqwest::Url::parse(u) {
            Ok(url) => format!("{}://{}/…", url.scheme(), url.host_str().unwrap_or("?")),
            Err(_) => "<invalid>".to_owned(),
        });
        f.debug_struct("SinkConfig")
            .field("webhook", &webhook)
            .field("token_file", &self.token_file)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("queue_capacity", &self.queue_capacity)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// Alert delivery flags, to flatten into the collector's arguments (environment
/// `CUSTOS_ALERT_*`). Defaults are those of [`SinkConfig::default`].
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Alert delivery")]
pub struct SinkArgs {
    /// Webhook to POST each alert to as JSON (http or https).
    #[arg(
        id = "alert_webhook",
        long = "alert-webhook",
        env = "CUSTOS_ALERT_WEBHOOK",
        value_name = "URL",
        hide_env_values = true
    )]
    pub webhook: Option<String>,

    /// File with a bearer token for the webhook (read before every attempt).
    #[arg(
        id = "alert_webhook_token_file",
        long = "alert-webhook-token-file",
        env = "CUSTOS_ALERT_WEBHOOK_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,

    /// Time-out of one webhook attempt.
    #[arg(id = "alert_webhook_timeout", long = "alert-webhook-timeout", env = "CUSTOS_ALERT_WEBHOOK_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Attempts per alert before giving up.
    #[arg(
        id = "alert_webhook_max_attempts",
        long = "alert-webhook-max-attempts",
        env = "CUSTOS_ALERT_WEBHOOK_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 8
    )]
    pub max_attempts: u32,

    /// Wait after the first failed attempt (doubles after each, jittered).
    #[arg(id = "alert_webhook_backoff", long = "alert-webhook-backoff", env = "CUSTOS_ALERT_WEBHOOK_BACKOFF", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub backoff_initial: Duration,

    /// Longest wait between attempts.
    #[arg(id = "alert_webhook_backoff_max", long = "alert-webhook-backoff-max", env = "CUSTOS_ALERT_WEBHOOK_BACKOFF_MAX", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// Alerts waiting for delivery before new ones are dropped.
    #[arg(
        id = "alert_queue_capacity",
        long = "alert-queue-capacity",
        env = "CUSTOS_ALERT_QUEUE_CAPACITY",
        value_name = "N",
        default_value_t = 1024
    )]
    pub queue_capacity: usize,

    /// Alerts delivered concurrently.
    #[arg(
        id = "alert_concurrency",
        long = "alert-concurrency",
        env = "CUSTOS_ALERT_CONCURRENCY",
        value_name = "N",
        default_value_t = 4
    )]
    pub concurrency: usize,
}

impl std::fmt::Debug for SinkArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.clone().into_config(), f)
    }
}

impl SinkArgs {
    /// The settings these flags describe (checked when the dispatcher starts).
    pub fn into_config(self) -> SinkConfig {
        SinkConfig {
            webhook: self.webhook.filter(|u| !u.trim().is_empty()),
            token_file: self.token_file,
            timeout: self.timeout,
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            queue_capacity: self.queue_capacity,
            concurrency: self.concurrency,
        }
    }
}

/// What a recorder may fail with. Its `Display` is logged: no personal data in it.
pub type RecorderError = Box<dyn std::error::Error + Send + Sync>;

/// Somewhere besides the webhook that alerts go, e.g. Kubernetes Events (implemented by the
/// operator with kube; this crate has no Kubernetes dependency). Implement with `async fn`:
///
/// ```
/// use custos_detect::{AlertRecorder, RecorderError};
/// use custos_store::Alert;
///
/// struct Log;
/// impl AlertRecorder for Log {
///     fn name(&self) -> &'static str {
///         "log"
///     }
///     async fn record(&self, alert: &Alert) -> Result<(), RecorderError> {
///         println!("{} {}", alert.detector, alert.message);
///         Ok(())
///     }
/// }
/// ```
///
/// Each call is bounded by [`SinkConfig::timeout`]; a failure is logged and counted in
/// `custos_collector_alert_recordings_total{recorder,result="error"}`, not retried.
pub trait AlertRecorder: Send + Sync + 'static {
    /// A short name for logs and the `recorder` metric label (e.g. `kubernetes_events`).
    fn name(&self) -> &'static str;

    /// Records one alert.
    fn record(&self, alert: &Alert) -> impl Future<Output = Result<(), RecorderError>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`AlertRecorder`] in a form that can be kept as a trait object.
trait DynRecorder: Send + Sync {
    fn name(&self) -> &'static str;
    fn record_boxed<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<(), RecorderError>>;
}

impl<R: AlertRecorder> DynRecorder for R {
    fn name(&self) -> &'static str {
        AlertRecorder::name(self)
    }

    fn record_boxed<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<(), RecorderError>> {
        Box::pin(self.record(alert))
    }
}

/// Builds an [`AlertDispatcher`]: [`AlertDispatcher::builder`].
pub struct DispatcherBuilder {
    config: SinkConfig,
    metrics: Option<AlertMetrics>,
    recorders: Vec<Arc<dyn DynRecorder>>,
}

impl DispatcherBuilder {
    /// Metrics to count in (default: new ones, reachable with [`AlertDispatcher::metrics`]).
    pub fn metrics(mut self, metrics: AlertMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Adds a recorder; every alert goes to each, in the order added, before the webhook.
    pub fn recorder<R: AlertRecorder>(mut self, recorder: R) -> Self {
        self.recorders.push(Arc::new(recorder));
        self
    }

    /// Checks the settings and starts the background delivery task (inside a tokio runtime).
    pub fn start(self) -> Result<AlertDispatcher, SinkError> {
        let c = &self.config;
        let config_error = |field, reason| Err(SinkError::Config { field, reason });
        if c.timeout.is_zero() {
            return config_error("timeout", "must be greater than 0");
        }
        if c.max_attempts == 0 {
            return config_error("max_attempts", "must be at least 1");
        }
        if c.queue_capacity == 0 {
            return config_error("queue_capacity", "must be at least 1");
        }
        if c.concurrency == 0 {
            return config_error("concurrency", "must be at least 1");
        }
        let webhook = match &c.webhook {
            Some(url) => Some(Webhook::new(
                webhook::parse_url(url)?,
                c.token_file.clone(),
                c.timeout,
                c.max_attempts,
                c.backoff_initial,
                c.backoff_max,
            )?),
            None => None,
        };
        let metrics = self.metrics.unwrap_or_default();
        let delivering = webhook.is_some() || !self.recorders.is_empty();
        let shared = Arc::new(Shared {
            webhook,
            recorders: self.recorders,
            metrics: metrics.clone(),
            pending: AtomicI64::new(0),
            recorder_timeout: c.timeout,
            stop: watch::Sender::new(false),
        });
        let (tx, worker) = if delivering {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| SinkError::NoRuntime)?;
            let (tx, rx) = mpsc::channel(c.queue_capacity);
            let worker = runtime.spawn(run(rx, shared.clone(), c.concurrency));
            (Some(tx), Some(worker))
        } else {
            (None, None)
        };
        Ok(AlertDispatcher { tx: Mutex::new(tx), worker: Mutex::new(worker), shared, delivering })
    }
}

struct Shared {
    webhook: Option<Webhook>,
    recorders: Vec<Arc<dyn DynRecorder>>,
    metrics: AlertMetrics,
    /// Alerts queued or being handled (mirrored in the `pending` gauge).
    pending: AtomicI64,
    recorder_timeout: Duration,
    /// Set to true to tell the worker to give up.
    stop: watch::Sender<bool>,
}

impl Shared {
    /// Moves the pending count by `delta` (never below zero); the gauge moves by what was
    /// applied.
    fn pending_changed(&self, delta: i64) {
        let update = |v: i64| Some((v + delta).max(0));
        let before = self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, update).unwrap_or(0);
        let applied = (before + delta).max(0) - before;
        self.metrics.pending_add(applied);
    }

    async fn handle(&self, alert: Alert) {
        for r in &self.recorders {
            let ok = match tokio::time::timeout(self.recorder_timeout, r.record_boxed(&alert)).await {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    tracing::warn!(recorder = r.name(), alert = %alert.id, %error, "alert recorder failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(recorder = r.name(), alert = %alert.id, "alert recorder timed out");
                    false
                }
            };
            self.metrics.recording(r.name(), ok);
        }
        if let Some(w) = &self.webhook {
            let result = w.deliver(&alert, &self.metrics).await;
            self.metrics.delivery(result);
        }
    }
}

/// One alert being handled: releases its pending count when done, and counts it as dropped
/// when its delivery was aborted (at shutdown) before it finished.
struct InFlight {
    shared: Arc<Shared>,
    done: bool,
}

impl InFlight {
    fn complete(&mut self) {
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.pending_changed(-1);
        if !self.done {
            self.shared.metrics.dropped(1);
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Alert>, shared: Arc<Shared>, concurrency: usize) {
    let mut tasks = JoinSet::new();
    let spawn = |tasks: &mut JoinSet<()>, alert: Alert| {
        let mut flight = InFlight { shared: shared.clone(), done: false };
        tasks.spawn(async move {
            flight.shared.clone().handle(alert).await;
            flight.complete();
        });
    };
    let mut stop = shared.stop.subscribe();
    // Take alerts while there is room in flight, until the senders are gone or a stop.
    let mut stopped = loop {
        if tasks.len() >= concurrency {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break true,
                _ = tasks.join_next() => continue,
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break true,
            alert = rx.recv() => match alert {
                Some(alert) => spawn(&mut tasks, alert),
                None => break false,
            },
        }
    };
    // Finish what is in flight, unless told to stop.
    while !stopped && !tasks.is_empty() {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => stopped = true,
            _ = tasks.join_next() => {}
        }
    }
    if stopped {
        rx.close();
        while rx.try_recv().is_ok() {
            shared.pending_changed(-1);
            shared.metrics.dropped(1);
        }
        // Aborts the deliveries in flight; their guards count them as dropped.
        tasks.shutdown().await;
    }
}

/// Takes alerts from the detectors and delivers them in the background. Share it with an
/// `Arc`; [`AlertDispatcher::dispatch`] never waits.
pub struct AlertDispatcher {
    tx: Mutex<Option<mpsc::Sender<Alert>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    delivering: bool,
}

impl std::fmt::Debug for AlertDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertDispatcher")
            .field("webhook", &self.shared.webhook.is_some())
            .field("recorders", &self.shared.recorders.iter().map(|r| r.name()).collect::<Vec<_>>())
            .finish()
    }
}

impl AlertDispatcher {
    /// A builder, to add metrics and recorders.
    pub fn builder(config: SinkConfig) -> DispatcherBuilder {
        DispatcherBuilder { config, metrics: None, recorders: Vec::new() }
    }

    /// Starts a dispatcher with these settings and metrics and no recorder.
    pub fn start(config: SinkConfig, metrics: AlertMetrics) -> Result<AlertDispatcher, SinkError> {
        Self::builder(config).metrics(metrics).start()
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &AlertMetrics {
        &self.shared.metrics
    }

    /// Counts and logs the alerts and queues them for delivery, without waiting: alerts that
    /// find the queue full (or the dispatcher shut down) are dropped and counted.
    pub fn dispatch(&self, alerts: Vec<Alert>) {
        for a in &alerts {
            self.shared.metrics.alert_raised(a);
            tracing::warn!(
                target: "custos_alert",
                alert = %a.id,
                detector = %a.detector,
                severity = ?a.severity,
                principal = a.principal.as_deref().unwrap_or("-"),
                namespace = a.namespace.as_deref().unwrap_or("-"),
                policy = a.policy.as_deref().unwrap_or("-"),
                "{}",
                a.message
            );
        }
        if !self.delivering || alerts.is_empty() {
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            self.shared.metrics.dropped(alerts.len() as u64);
            return;
        };
        let mut dropped = 0u64;
        for a in alerts {
            self.shared.pending_changed(1);
            if tx.try_send(a).is_err() {
                self.shared.pending_changed(-1);
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.shared.metrics.dropped(dropped);
            tracing::warn!(
                dropped,
                "alert delivery queue full: alerts dropped (they are still stored and counted)"
            );
        }
    }

    /// Stops taking alerts and waits up to `grace` for queued ones to be delivered; what is
    /// left then is abandoned and counted as dropped. True when everything was handled.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        drop(self.tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        let worker = self.worker.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut worker) = worker else { return true };
        if tokio::time::timeout(grace, &mut worker).await.is_ok() {
            return true;
        }
        // The worker drops the queue and aborts deliveries in flight, counting them; it does
        // not wait for the network to do so.
        self.shared.stop.send_replace(true);
        let _ = worker.await;
        tracing::warn!("alert dispatcher stopped with alerts undelivered (counted as dropped)");
        false
    }
}
