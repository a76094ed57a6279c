//! The router, the accept loop and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use custos_api::collector::{EVENTS_PATH, USAGE_PATH};
use custos_serve::{RequestStarted, first_request_within};
use http::{StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

use crate::auth::{TokenAuth, TokenError};
use crate::config::{Auth, CollectorConfig, redact_url};
use crate::error::{ApiError, reason};
use crate::kube_events::{self, KubeEventRecorder, KubeEvents};
use crate::metrics::CollectorMetrics;
use crate::pipeline;
use crate::state::CollectorState;
use crate::{ingest, query, retention};

/// Time `/ready` gives the store to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration value is unusable.
    #[error("invalid collector configuration: {0}")]
    Config(String),
    /// The token file cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The store cannot be opened or migrated.
    #[error("cannot open the audit store {url}: {source}")]
    Store {
        /// The store URL, password hidden.
        url: String,
        /// The store error.
        #[source]
        source: custos_store::Error,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `--kube-events on` and no Kubernetes client can be built.
    #[error("--kube-events on: cannot build a Kubernetes client (in-cluster config or kubeconfig): {0}")]
    KubeClient(#[source] kube::Error),
}

/// The router of the collector over `state`, with `extra` routes merged into the
/// authenticated `/v1/*` part.
pub fn router(state: CollectorState, extra: Option<Router<CollectorState>>) -> Router {
    let mut v1 = Router::new()
        .route(EVENTS_PATH, get(query::events).post(ingest::post_events))
        .route("/v1/subjects/{hash}", get(query::subject))
        .route("/v1/top", get(query::top))
        .route("/v1/alerts", get(query::alerts))
        .route(USAGE_PATH, get(query::usage))
        .route("/v1/verify", get(query::verify))
        .route(crate::otlp::LOGS_PATH, post(crate::otlp::post_logs));
    if let Some(extra) = extra {
        v1 = v1.merge(extra);
    }
    let v1 = v1.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Bearer check of `/v1/*`. A namespace token reaches ingest and usage only, and carries its
/// [`Scope`](crate::auth::Scope) to them in the request's extensions.
async fn authenticate(State(state): State<CollectorState>, mut request: Request, next: Next) -> Response {
    match state.authorize(request.headers()).await {
        Ok(scope) => {
            if let crate::auth::Scope::Namespace(namespace) = &scope {
                let path = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
                let allowed = matches!(
                    (request.method(), path.as_deref()),
                    (&http::Method::POST, Some(EVENTS_PATH | crate::otlp::LOGS_PATH))
                        | (&http::Method::GET, Some(USAGE_PATH))
                );
                if !allowed {
                    tracing::debug!(%namespace, path = ?path, "a namespace token asked for more than ingest and usage");
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        reason::NAMESPACE_TOKEN_SCOPE,
                        "a namespace token may only send its namespace's events and read its usage",
                    )
                    .into_response();
                }
            }
            request.extensions_mut().insert(scope);
            next.run(request).await
        }
        Err(error) => {
            let is_ingest =
                request.extensions().get::<MatchedPath>().is_some_and(|p| p.as_str() == EVENTS_PATH)
                    && request.method() == http::Method::POST;
            if is_ingest {
                state.metrics().batch_rejected(crate::metrics::static_reason(error.reason()));
            }
            error.into_response()
        }
    }
}

/// `custos_collector_requests_total{endpoint,status}`, endpoint being the route template.
async fn count_requests(State(state): State<CollectorState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.metrics().request(&endpoint, response.status().as_u16());
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<CollectorState>) -> Response {
    if state.is_shutting_down() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason::SHUTTING_DOWN, "shutting down")
            .into_response();
    }
    match tokio::time::timeout(READY_TIMEOUT, state.timed("head", state.store().head())).await {
        Ok(Ok(head)) => axum::Json(
            serde_json::json!({"status": "ready", "backend": state.store().backend(), "head": head}),
        )
        .into_response(),
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::store_unavailable().into_response(),
    }
}

async fn metrics(State(state): State<CollectorState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics().encode(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, reason::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, reason::METHOD_NOT_ALLOWED, "method not allowed here")
}

/// Triggers the shutdown of a [`RunningCollector`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    stop: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown: stop accepting, finish in-flight requests within the
    /// shutdown timeout. Idempotent.
    pub fn trigger(&self) {
        self.stop.send_replace(true);
    }
}

/// A started collector. It runs until [`RunningCollector::shutdown`], a
/// [`ShutdownHandle::trigger`], or until it and every [`ShutdownHandle`] are dropped (then it
/// shuts down gracefully in the background).
#[derive(Debug)]
pub struct RunningCollector {
    addr: SocketAddr,
    state: CollectorState,
    shutdown: ShutdownHandle,
    task: JoinHandle<()>,
}

impl RunningCollector {
    /// The address the collector listens on (the actual port when the configured one was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state: store, metrics.
    pub fn state(&self) -> &CollectorState {
        &self.state
    }

    /// The audit store.
    pub fn store(&self) -> &custos_store::AnyStore {
        self.state.store()
    }

    /// The metrics (e.g. to count alerts with [`CollectorMetrics::alert_raised`]).
    pub fn metrics(&self) -> &CollectorMetrics {
        self.state.metrics()
    }

    /// A handle that triggers shutdown from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Waits until the collector has stopped (after a [`ShutdownHandle::trigger`]).
    pub async fn wait(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the collector task failed");
        }
    }

    /// Shuts down gracefully and waits until done: no new connections, in-flight requests
    /// finish (at most the shutdown timeout; then their connections are closed), retention
    /// stops.
    pub async fn shutdown(self) {
        self.shutdown.trigger();
        self.wait().await;
    }
}

/// The Kubernetes Events recorder `mode` asks for: `auto` in a cluster (a warning and none
/// if no client can be built there), `on` (an error if no client can be built), `off`.
async fn kube_event_recorder(mode: KubeEvents) -> Result<Option<KubeEventRecorder>, StartError> {
    let in_cluster = kube_events::in_cluster();
    if !mode.wanted(in_cluster) {
        return Ok(None);
    }
    match kube_events::default_client().await {
        Ok(client) => {
            tracing::info!(mode = ?mode, "alerts are recorded as Kubernetes Events on their DataAccessPolicy");
            Ok(Some(KubeEventRecorder::new(client)))
        }
        Err(e) if mode == KubeEvents::Auto => {
            tracing::warn!(
                error = %e,
                "--kube-events auto: in a cluster but no Kubernetes client can be built; alerts are not \
                 recorded as Kubernetes Events"
            );
            Ok(None)
        }
        Err(e) => Err(StartError::KubeClient(e)),
    }
}

/// Opens the store (migrating its schema), loads the token, binds the listener and starts
/// serving and retention in the background.
pub async fn start(config: CollectorConfig) -> Result<RunningCollector, StartError> {
    config.validate().map_err(StartError::Config)?;
    let auth = match &config.auth {
        Auth::TokenFile(path) => Some(TokenAuth::load(path.clone())?),
        Auth::Unauthenticated => {
            tracing::warn!(
                "--allow-unauthenticated: /v1/* accepts requests without a token; anyone who \
                 reaches this port can write and read the audit trail"
            );
            None
        }
    };
    let store = custos_store::open(&config.store_url)
        .await
        .map_err(|source| StartError::Store { url: redact_url(&config.store_url), source })?
        .with_query_timeout(config.query_timeout);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;

    // Detectors, alert delivery and OTLP export share the registry served at /metrics.
    let kube_events = kube_event_recorder(config.kube_events).await?;
    let detectors = pipeline::detectors(config.detect.as_ref()).map_err(StartError::Config)?;
    let alert_metrics = custos_detect::AlertMetrics::new();
    let export_metrics = custos_otlp::ExporterMetrics::default();
    let metrics = match config.metrics.clone() {
        Some(m) => m,
        None => {
            let mut registry = prometheus_client::registry::Registry::default();
            alert_metrics.register(&mut registry);
            if let Some(recorder) = &kube_events {
                recorder.register(&mut registry);
            }
            if config.otlp_export.is_some() {
                export_metrics.register(&mut registry);
            }
            CollectorMetrics::new_in(registry)
        }
    };
    let mut alerts = custos_detect::AlertDispatcher::builder(config.alerts.clone()).metrics(alert_metrics);
    if let Some(recorder) = kube_events {
        alerts = alerts.recorder(recorder);
    }
    let dispatcher = alerts.start().map_err(|e| StartError::Config(format!("alert delivery: {e}")))?;
    let exporter = match &config.otlp_export {
        Some(c) => Some(
            custos_otlp::OtlpExporter::start(c.clone(), export_metrics)
                .map_err(|e| StartError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (observer, pipeline) = match (&config.observer, detectors.is_some() || exporter.is_some()) {
        (Some(observer), _) => (Some(observer.clone()), None),
        (None, true) => {
            let (tx, rx) = tokio::sync::mpsc::channel(pipeline::CHANNEL_CAPACITY);
            let sinks = pipeline::Sinks { detectors, dispatcher, exporter };
            let p =
                pipeline::Pipeline::start(store.clone(), sinks, rx, stop_rx.clone(), config.shutdown_timeout);
            (Some(tx), Some(p))
        }
        (None, false) => (None, None),
    };
    let state = CollectorState::new(
        store.clone(),
        metrics.clone(),
        auth,
        (config.limits, config.max_event_age),
        config.max_concurrent_batches,
        (config.max_concurrent_queries, config.query_timeout),
        observer,
    );
    let app = router(state.clone(), config.extra_routes.clone());
    let retention_task = config.retention.map(|retention| {
        retention::spawn(store.clone(), metrics.clone(), retention, config.prune_interval, stop_rx.clone())
    });
    tracing::info!(
        %addr,
        backend = store.backend(),
        store = %redact_url(&config.store_url),
        authenticated = matches!(config.auth, Auth::TokenFile(_)),
        retention = ?config.retention,
        max_event_age = ?config.max_event_age,
        max_batch_bytes = config.limits.max_batch_bytes,
        max_batch_events = config.limits.max_batch_events,
        "custos collector listening"
    );

    let shutdown_timeout = config.shutdown_timeout;
    let header_read_timeout = config.header_read_timeout;
    let serve_state = state.clone();
    let task = tokio::spawn(async move {
        serve(
            listener,
            app,
            stop_rx,
            Timeouts { drain: shutdown_timeout, header_read: header_read_timeout },
            serve_state,
        )
        .await;
        if let Some(task) = retention_task {
            let _ = task.await;
        }
        if let Some(p) = pipeline {
            p.finished().await;
        }
        tracing::info!("custos collector stopped");
    });
    Ok(RunningCollector { addr, state, shutdown: ShutdownHandle { stop: Arc::new(stop_tx) }, task })
}

/// Resolves when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by `wait_for` is not Send: drop it here.
    let _ = stop.wait_for(|s| *s).await;
}

/// The server's connection time-outs.
struct Timeouts {
    /// How long in-flight requests may take once shutdown begins.
    drain: Duration,
    /// How long a connection may go without starting a request.
    header_read: Duration,
}

/// Accepts connections until `stop` turns true, then drains in-flight requests for at most
/// `timeouts.drain` and closes what remains.
async fn serve(
    listener: TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    timeouts: Timeouts,
    state: CollectorState,
) {
    let drain_timeout = timeouts.drain;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header_read);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(64);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let started = RequestStarted::new();
        let marker = started.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            marker.mark();
            app.clone().oneshot(request.map(axum::body::Body::new))
        });
        let conn = graceful
            .watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned());
        // hyper-util's protocol detection has no timer: without this, a client that connects
        // and sends nothing holds its connection until it hangs up.
        let conn = first_request_within(conn, started, timeouts.header_read);
        connections.spawn(async move {
            match conn.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "client connection ended with an error"),
                Err(error) => tracing::debug!(%error, "client connection closed"),
            }
        });
        // Reap finished connection tasks.
        while connections.try_join_next().is_some() {}
    }
    state.set_shutting_down();
    drop(listener);
    tracing::info!(in_flight_connections = connections.len(), "shutting down: draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("in-flight requests drained"),
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(timeout = ?drain_timeout, "shutdown timeout: closing the remaining connections");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
