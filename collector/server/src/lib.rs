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
//! [`start`] starts a collector from a [`CollectorConfig`] (built from [`CollectorArgs`] by
//! `custos collector`, or by hand in tests) and returns a [`RunningCollector`].
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
pub use observer::StoredBatch;
pub use server::{RunningCollector, ShutdownHandle, StartError, router, start};
pub use state::CollectorState;
