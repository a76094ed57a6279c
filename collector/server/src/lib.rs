//! Custos collector: the HTTP server in front of the audit store (`custos collector`).
//!
//! - `POST /v1/events`: authenticated batch ingest (NDJSON or a JSON array, optionally gzip),
//!   idempotent by event id, acknowledged only after the store's durable commit
//!   ([`ingest`]).
//! - `GET /v1/events`, `/v1/subjects/{hash}`, `/v1/top`, `/v1/alerts`, `/v1/usage`,
//!   `/v1/verify`: the investigators' and the sidecars' queries.
//! - `/healthz`, `/ready`, `/metrics` ([`metrics`]) without authentication.
//! - Retention in the background, refusing to prune over a broken chain.
//! - `POST /v1/logs`: the same ingest from OTLP/HTTP logs ([`otlp`]).
//! - Leak detectors over newly stored events (custos-detect), their alerts stored, counted and
//!   posted to a webhook, and optional forwarding of stored events to an OTLP/HTTP endpoint,
//!   fed through a post-commit hook ([`observer`]) that never delays the acknowledgement.
//! - Alerts recorded as Kubernetes Events on their DataAccessPolicy when in a cluster
//!   ([`kube_events`]).
//!
//! [`run`] is the `custos collector` command; [`start`] starts a collector from a
//! [`CollectorConfig`] and returns a [`RunningCollector`] (tests, the demo).
//! The wire contract is `docs/collector.md` and [`custos_api::collector`].
#![forbid(unsafe_code)]

mod args;
mod auth;
mod config;
mod duration;
mod error;
pub mod ingest;
pub mod kube_events;
pub mod metrics;
pub mod observer;
pub mod otlp;
mod pipeline;
mod query;
mod retention;
mod server;
mod state;

pub use args::{CollectorArgs, Retention, parse_bytes, parse_retention};
pub use auth::TokenError;
pub use config::{Auth, CollectorConfig, redact_url};
pub use duration::parse_duration;
pub use error::{ApiError, reason};
pub use kube_events::{KubeEventRecorder, KubeEvents};
pub use metrics::CollectorMetrics;
pub use observer::{RecentIds, StoredBatch};
pub use server::{RunningCollector, ShutdownHandle, StartError, router, start};
pub use state::CollectorState;

/// `custos collector`: JSON logs to stderr (`RUST_LOG`, default `info`), starts the collector
/// and serves until SIGTERM or SIGINT, then shuts down gracefully within
/// `--shutdown-timeout`.
pub async fn run(args: CollectorArgs) -> anyhow::Result<()> {
    init_logging();
    let config = args.into_config().map_err(|e| anyhow::anyhow!(e))?;
    let running = start(config).await?;
    wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}

/// JSON logs to stderr, filtered by `RUST_LOG`. Does nothing if a subscriber is already set.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; waiting for SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
