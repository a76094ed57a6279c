//! Custos sidecar: the enforcing reverse proxy in front of a protected app (`custos sidecar`).
//!
//! It listens on the proxy port (HTTP/1.1 and h2c), enforces the compiled config of its
//! namespace on every request, and forwards to the app on `127.0.0.1:<appPort>` over a pooled
//! keep-alive HTTP/1.1 client. See the README's "Sidecar" section for flags and metrics, and
//! `docs/policy-guide.md` for the behaviour callers see.
//!
//! # Per request
//! 1. Hygiene: hop-by-hop headers, those `Connection` names and inbound `x-custos-*` headers
//!    are stripped before anything reads the request; method-override headers
//!    ([`METHOD_OVERRIDE_HEADERS`]) are refused with 400 (a backend honouring them would run a
//!    method the policy never decided); CONNECT and absolute-form targets get 400; request
//!    line plus headers over the limit get 431; a declared body over the limit gets 413 (a
//!    chunked one is cut off and gets 413 too).
//! 2. The target is normalised ([`custos_policy::normalize()`]); a rejected one gets 400 with
//!    the rejection code, never the path. (Fragments never reach the proxy: the HTTP parser
//!    drops them; the forwarded target is rebuilt from the normalised path, so the app sees
//!    exactly the path that was decided.)
//! 3. Identity: the peer IP is looked up in the config's workload table; a `Bearer`
//!    Authorization is verified with the selected policies' identity settings (401 with the
//!    reason on a bad token, 503 when the JWKS is unavailable; no token: anonymous; other
//!    schemes are left to the app).
//! 4. [`Engine::decide`](custos_policy::Engine::decide): Deny is a 403 JSON body naming the
//!    policy, rule and reason, and the app is not called. Exception: when no allow rule
//!    matched (default action Deny), the request carried no Bearer token and the deciding
//!    policy verifies users (`identity.users`), the answer is 401 `missing_token` with
//!    `WWW-Authenticate: Bearer` (an explicit Deny rule stays 403).
//! 5. Quotas of the allowing rule per principal (`user:<id>`, else `workload:<ns>/<sa>`,
//!    else `peer:<ip>`): 429 with `Retry-After`.
//! 6. A request body up to the request buffer size is read before the app is called (408
//!    when the client pauses too long; see `request_body`). Forward with the normalised path
//!    (re-encoded) and the original query, method and end-to-end headers, plus
//!    `x-forwarded-for`.
//! 7. Responses of plans that need the body are read (up to the limit), gzip/deflate
//!    decoded, transformed, and sent identity-encoded with a new `content-length`. Bodies that
//!    cannot be transformed (not JSON, too large, unknown encoding) are a 502 in Enforce mode
//!    unless the policy sets `failOpen`. Other responses stream through untouched.
//! 8. Records are counted against the quotas and one audit event is emitted when the
//!    response body has been sent.
//!
//! In `Audit` mode nothing is refused on behalf of the policy: the request and the response
//! pass untouched and the event records `WouldDeny` and the would-be counts. Request hygiene
//! (1, 2) applies in every mode.
#![forbid(unsafe_code)]

mod args;
mod audit;
mod body;
mod budget;
mod error;
mod event_ids;
mod latency;
mod mesh;
mod method_override;
mod metrics;
mod proxy;
mod quota_clock;
mod request_body;
mod send_timeout;
mod server;
mod settings;
mod socket_owner;
mod stall;
mod state;
mod threads;
mod throttle;
pub mod upstream;
mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use custos_quota::{QuotaSettings, Quotas};
use custos_shipper::{Shipper, ShipperConfig, ShipperMetrics, UsageClient};
use custos_transform::HashKey;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use args::{SidecarArgs, parse_downward_labels, parse_duration, parse_label_list};
pub use error::Error;
pub use mesh::{CallerIdentity, Mesh, MeshIdentity};
pub use proxy::METHOD_OVERRIDE_HEADERS;
pub use settings::{
    CollectorSettings, DEFAULT_ADMIN_ADDR, ProxyLimits, SidecarSettings, default_proxy_threads,
};

use crate::metrics::Metrics;
use crate::proxy::Shared;
use crate::state::{ConfigCell, StateInputs, VerifierCache, build_state, content_hash};

/// Default proxy port when no selected policy names one.
const DEFAULT_PROXY_PORT: u16 = custos_api::policy::DEFAULT_PROXY_PORT;

/// A started sidecar: its bound addresses and the way to stop it.
#[derive(Debug)]
pub struct RunningSidecar {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    trigger: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
}

impl RunningSidecar {
    /// The address the proxy listens on.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The address of the admin server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Graceful shutdown: `/ready` turns 503, the proxy serves on for the shutdown delay, then
    /// stops accepting, in-flight requests finish (bounded by the drain time-out), pending audit
    /// events are delivered or spooled (bounded), then the admin server stops.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.trigger.send(true);
        self.supervisor.await.map_err(|e| Error::Task(e.to_string()))
    }
}

/// Starts the sidecar: loads the config, binds the proxy and admin addresses, and spawns the
/// proxy, the admin server, the config watcher, the audit shipper and the usage sync. Returns
/// once both addresses are bound.
///
/// An unreadable config file is an error; a readable but invalid one starts the sidecar
/// unready (every request gets 503, `/ready` shows why) until a valid config appears.
pub async fn start(settings: SidecarSettings) -> Result<RunningSidecar, Error> {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let shipper_metrics = ShipperMetrics::new();
    shipper_metrics.register(&mut registry);

    let bytes = tokio::fs::read(&settings.config_path).await.map_err(|e| Error::File {
        what: "config file",
        path: settings.config_path.clone(),
        source: e,
    })?;
    let inputs = StateInputs {
        config_path: settings.config_path.clone(),
        namespace: settings.namespace.clone(),
        pod_labels: settings.pod_labels.clone(),
        upstream: settings.upstream,
        jwks_dir: settings.jwks_dir.clone(),
        jwks_refresh: settings.jwks_refresh,
        jwks_timeout: settings.jwks_timeout,
    };
    let mut cache = VerifierCache::default();
    let config = Arc::new(ConfigCell::new());
    let mut proxy_port = None;
    match build_state(&bytes, &inputs, &mut cache, None) {
        Ok(state) => {
            let mut ports: Vec<u16> = state.engine.policies().iter().map(|p| p.proxy_port).collect();
            ports.sort_unstable();
            ports.dedup();
            if ports.len() > 1 && settings.listen.is_none() {
                return Err(Error::Invalid(format!(
                    "the policies selecting this pod name different proxyPorts ({ports:?}); set --listen"
                )));
            }
            proxy_port = ports.first().copied();
            if state.engine.policies().is_empty() {
                tracing::warn!(namespace = %state.namespace, "no policy of the config selects this pod: requests pass unchecked (but audited)");
            }
            tracing::info!(config_hash = %state.hash, policies = state.engine.policies().len(), upstream = %state.upstream, "config loaded");
            config.install(state);
        }
        Err(message) => {
            tracing::error!(error = %message, "initial config rejected: not ready until a valid config appears");
            metrics.config_reloads.get_or_create(&metrics::ResultLabels { result: "failure" }).inc();
            config.reject(message);
        }
    }
    let initially_rejected = config.current.load().is_none();

    let hash_key = match &settings.hash_key {
        Some(key) => HashKey::new(key.clone()),
        None => {
            tracing::warn!(
                "no --hash-key-file: using a random per-process key; Hash masks and record hashes will not join across pods or restarts"
            );
            HashKey::new(random_key())
        }
    };

    let shipper_config = match &settings.collector {
        Some(c) => ShipperConfig {
            token_file: c.token_file.clone(),
            spool_max_bytes: c.spool_max_bytes,
            // At most an eighth of the spool, so that acknowledged segments are reclaimed
            // long before it is full.
            spool_segment_bytes: (c.spool_max_bytes / 8).clamp(4 * 1024, 8 << 20),
            batch_max_events: c.batch_max_events,
            // Batches that a spool segment holds, and at most 4 MiB (the collector takes 16).
            batch_max_bytes: usize::try_from(c.spool_max_bytes / 8)
                .unwrap_or(usize::MAX)
                .clamp(64 * 1024, 4 << 20),
            flush_interval: c.flush_interval,
            queue_capacity: c.queue_capacity,
            request_timeout: c.request_timeout,
            retry_initial_backoff: c.retry_initial_backoff,
            retry_max_backoff: c.retry_max_backoff,
            ..ShipperConfig::new(Some(c.url.clone()), c.spool_dir.clone())
        },
        None => ShipperConfig::new(None, std::env::temp_dir()),
    };
    let (shipper, shipper_task) =
        Shipper::start(shipper_config, shipper_metrics).map_err(|e| Error::Shipper(e.to_string()))?;
    let usage_client = match &settings.collector {
        Some(c) if c.usage_sync_interval.is_some() => Some(Arc::new(
            UsageClient::new(c.url.clone(), c.token_file.clone(), c.request_timeout)
                .map_err(|e| Error::Shipper(e.to_string()))?,
        )),
        _ => None,
    };
    let usage_interval =
        settings.collector.as_ref().and_then(|c| c.usage_sync_interval).unwrap_or(Duration::from_secs(60));

    let quotas = Arc::new(Quotas::new(QuotaSettings::default()));
    let dry_run_quotas = Arc::new(Quotas::new(QuotaSettings::default()));
    let event_ids = Arc::new(event_ids::EventIds::new());
    let shared = Arc::new(Shared {
        config: config.clone(),
        metrics: metrics.clone(),
        quotas: quotas.clone(),
        dry_run_quotas: dry_run_quotas.clone(),
        event_ids: event_ids.clone(),
        shipper: shipper.clone(),
        upstream: proxy::upstream(&settings.limits, 1, &metrics),
        counters: Arc::new(metrics::ThreadCounters::new(&metrics)),
        hash_key,
        limits: settings.limits.clone(),
        pod_name: settings.pod_name.clone(),
        namespace: settings.namespace.clone(),
        cluster: settings.cluster.clone(),
        mesh: settings.mesh.clone(),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(settings.limits.max_connections)),
        response_buffers: budget::BufferBudget::new(
            settings.limits.response_buffer_total_bytes,
            metrics.response_buffer_bytes.clone(),
            metrics.response_buffer_exhausted.clone(),
        ),
        dry_run_buffers: budget::BufferBudget::new(
            settings.limits.response_buffer_total_bytes / 4,
            metrics.dry_run_buffer_bytes.clone(),
            metrics.dry_run_buffer_exhausted.clone(),
        ),
        request_buffers: budget::BufferBudget::new(
            settings.limits.request_buffer_total_bytes,
            metrics.request_buffer_bytes.clone(),
            metrics.request_buffer_exhausted.clone(),
        ),
    });

    let listen = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], proxy_port.unwrap_or(DEFAULT_PROXY_PORT))));
    let (listener, listeners) = if settings.proxy_threads == 0 {
        (Some(TcpListener::bind(listen).await.map_err(|e| Error::Bind { addr: listen, source: e })?), vec![])
    } else {
        (None, threads::bind(listen, settings.proxy_threads)?)
    };
    let proxy_addr = match (&listener, listeners.first()) {
        (Some(l), _) => l.local_addr(),
        (None, Some(l)) => l.local_addr(),
        (None, None) => Err(std::io::Error::other("no proxy listener")),
    }
    .map_err(|e| Error::Bind { addr: listen, source: e })?;
    let admin_listener = TcpListener::bind(settings.admin)
        .await
        .map_err(|e| Error::Bind { addr: settings.admin, source: e })?;
    let admin_addr =
        admin_listener.local_addr().map_err(|e| Error::Bind { addr: settings.admin, source: e })?;

    // `trigger` asks for the shutdown; `stop` stops the proxy and the background tasks after
    // the shutdown delay.
    let (trigger, mut trigger_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let proxy_task = match listener {
        Some(listener) => threads::ProxyTask::Local(tokio::spawn(server::serve_proxy(
            listener,
            shared.clone(),
            stop_rx.clone(),
            settings.drain_timeout,
        ))),
        None => threads::spawn(listeners, &shared, &stop_rx, settings.drain_timeout)?,
    };
    let reload_task = tokio::spawn(state::watch_config(
        config.clone(),
        metrics.clone(),
        inputs,
        cache,
        state::LastRead { hash: content_hash(&bytes), rejected: initially_rejected },
        settings.reload_interval,
        stop_rx.clone(),
    ));
    let usage_task = tokio::spawn(usage::run(
        [quotas, dry_run_quotas],
        usage_client.map(|client| (client, event_ids.instance().to_owned())),
        config.clone(),
        metrics.clone(),
        usage_interval,
        stop_rx,
    ));
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin = Arc::new(server::Admin {
        registry,
        config: config.clone(),
        metrics: metrics.clone(),
        header_read_timeout: settings.limits.header_read_timeout,
    });
    let admin_task = tokio::spawn(server::serve_admin(admin_listener, admin, admin_stop_rx));
    tracing::info!(%proxy_addr, %admin_addr, "custos sidecar started");

    let shipper_deadline = settings.shipper_shutdown_timeout;
    let shutdown_delay = settings.shutdown_delay;
    let supervisor = tokio::spawn(async move {
        // Stops when triggered, or when the handle is dropped.
        let _ = trigger_rx.wait_for(|s| *s).await;
        config.shutting_down();
        if !shutdown_delay.is_zero() {
            tracing::info!(delay = ?shutdown_delay, "shutting down: unready, still serving for the shutdown delay");
            tokio::time::sleep(shutdown_delay).await;
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop.send(true);
        proxy_task.wait().await;
        let _ = reload_task.await;
        let _ = usage_task.await;
        drop(shared);
        let report = shipper.shutdown(shipper_deadline).await;
        let _ = shipper_task.await;
        tracing::info!(
            delivered = report.delivered,
            spooled = report.spooled_events,
            dropped = report.dropped,
            deadline_exceeded = report.deadline_exceeded,
            "audit shipper stopped"
        );
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
    });
    Ok(RunningSidecar { proxy_addr, admin_addr, trigger, supervisor })
}

/// 40 random bytes (four ULIDs' 80 random bits each, from the OS-seeded generator of the
/// `ulid` crate) mixed with the time.
fn random_key() -> Vec<u8> {
    let mut key = Vec::with_capacity(80);
    for _ in 0..4 {
        key.extend_from_slice(&ulid::Ulid::new().0.to_be_bytes());
    }
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    key.extend_from_slice(&nanos.to_be_bytes());
    key
}
