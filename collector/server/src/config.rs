//! The collector's configuration, built from [`CollectorArgs`](crate::CollectorArgs) or by hand
//! (tests, the demo, the lead's wiring of detectors and OTLP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use tokio::sync::mpsc;

use crate::ingest::IngestLimits;
use crate::kube_events::KubeEvents;
use crate::metrics::CollectorMetrics;
use crate::observer::StoredBatch;
use crate::state::CollectorState;

/// How `/v1/*` requests are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <token>` with the token held in this file (re-read when it
    /// changes).
    TokenFile(PathBuf),
    /// No authentication (`--allow-unauthenticated`): anyone who reaches the port can write
    /// and read the audit trail. Logged as a warning at start.
    Unauthenticated,
}

/// Everything [`start`](crate::start) needs.
#[derive(Clone)]
pub struct CollectorConfig {
    /// Address to listen on (port 0: any free port, see
    /// [`RunningCollector::addr`](crate::RunningCollector::addr)).
    pub listen: SocketAddr,
    /// Store URL: `sqlite:PATH` or `postgres://...` (see [`custos_store::open`]).
    pub store_url: String,
    /// Authentication of `/v1/*`.
    pub auth: Auth,
    /// Batch size limits.
    pub limits: IngestLimits,
    /// Batches read, decoded and committed at the same time; further ones wait.
    pub max_concurrent_batches: usize,
    /// Report queries (`/v1/events`, `/v1/subjects`, `/v1/top`, `/v1/alerts`, `/v1/verify`)
    /// run at the same time; further ones wait up to [`Self::query_timeout`], then get 503
    /// `queries_busy`. Ingest and `/v1/usage` never wait for them.
    pub max_concurrent_queries: usize,
    /// How long a report query may run before the database stops it (504 `query_timeout`).
    pub query_timeout: Duration,
    /// Events older than this are pruned; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// Events dated more than this before their receipt are acknowledged as `expired` and not
    /// stored (`--max-event-age`); `None`: no bound. The store already refuses times more than
    /// 10 minutes ahead.
    pub max_event_age: Option<Duration>,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// How long shutdown waits for in-flight requests before closing their connections.
    pub shutdown_timeout: Duration,
    /// The longest a client connection may go without starting a request (from connecting,
    /// and between requests when kept alive over HTTP/1.1); it is then closed.
    pub header_read_timeout: Duration,
    /// Post-commit hook: every committed batch with at least one new event is offered here with
    /// `try_send` (see [`observer`](crate::observer)).
    pub observer: Option<mpsc::Sender<StoredBatch>>,
    /// Metrics to update and serve (e.g. built with [`CollectorMetrics::new_in`] over a
    /// registry holding other metrics too); `None`: a fresh set.
    pub metrics: Option<CollectorMetrics>,
    /// More authenticated routes, merged into `/v1/*` (e.g. `POST /v1/logs`). They get the
    /// bearer check, request metrics and graceful shutdown; handlers use
    /// [`CollectorState::commit`] to store events.
    pub extra_routes: Option<Router<CollectorState>>,
    /// Leak detection over newly stored events; `None`: off.
    pub detect: Option<custos_detect::DetectConfig>,
    /// Where alerts go besides the store and the metrics (webhook).
    pub alerts: custos_detect::SinkConfig,
    /// Forward newly stored events to an OTLP/HTTP logs endpoint; `None`: off.
    pub otlp_export: Option<custos_otlp::ExporterConfig>,
    /// Record alerts as Kubernetes Events on their DataAccessPolicy
    /// ([`kube_events`](crate::kube_events)).
    pub kube_events: KubeEvents,
}

impl std::fmt::Debug for CollectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorConfig")
            .field("listen", &self.listen)
            .field("store", &redact_url(&self.store_url))
            .field("auth", &self.auth)
            .field("limits", &self.limits)
            .field("max_concurrent_batches", &self.max_concurrent_batches)
            .field("retention", &self.retention)
            .field("max_event_age", &self.max_event_age)
            .field("prune_interval", &self.prune_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("observer", &self.observer.is_some())
            .field("extra_routes", &self.extra_routes.is_some())
            .field("detect", &self.detect.is_some())
            .field("otlp_export", &self.otlp_export.is_some())
            .field("kube_events", &self.kube_events)
            .finish_non_exhaustive()
    }
}

impl CollectorConfig {
    /// The defaults (listen on 0.0.0.0:8080, 16 MiB / 10 000 events per batch, no retention,
    /// no maximum event age, prune every hour, 30 s shutdown, 30 s to start a request, no
    /// detectors, no webhook, no OTLP export, no Kubernetes Events) for `store_url` and
    /// `auth`. `custos collector` turns the detectors on by default, Kubernetes Events to
    /// `auto` and the maximum event age to 7 days.
    pub fn new(store_url: impl Into<String>, auth: Auth) -> Self {
        CollectorConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            store_url: store_url.into(),
            auth,
            limits: IngestLimits::default(),
            max_concurrent_batches: 4,
            max_concurrent_queries: 2,
            query_timeout: custos_store::DEFAULT_QUERY_TIMEOUT,
            retention: None,
            max_event_age: None,
            prune_interval: Duration::from_secs(3_600),
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            observer: None,
            metrics: None,
            extra_routes: None,
            detect: None,
            alerts: custos_detect::SinkConfig::default(),
            otlp_export: None,
            kube_events: KubeEvents::Off,
        }
    }

    /// Checks that the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.limits.max_batch_bytes == 0 || self.limits.max_batch_events == 0 {
            return Err("--max-batch-bytes and --max-batch-events must be positive".into());
        }
        if self.max_concurrent_batches == 0 {
            return Err("--max-concurrent-batches must be positive".into());
        }
        if self.max_concurrent_queries == 0 {
            return Err("--max-concurrent-queries must be positive".into());
        }
        if self.query_timeout.is_zero() || self.query_timeout > Duration::from_secs(86_400) {
            // PostgreSQL's statement_timeout takes at most 2^31 - 1 ms (24.8 days).
            return Err("--query-timeout must be longer than 0s and at most 24h".into());
        }
        if self.retention.is_some_and(|r| r.is_zero()) {
            return Err("--retention must be positive (or `none`)".into());
        }
        if self.retention.is_some_and(|r| chrono::TimeDelta::from_std(r).is_err()) {
            return Err("--retention is out of range".into());
        }
        if self.max_event_age.is_some_and(|a| a.is_zero()) {
            return Err("--max-event-age must be positive (or `none`)".into());
        }
        if self.max_event_age.is_some_and(|a| chrono::TimeDelta::from_std(a).is_err()) {
            return Err("--max-event-age is out of range".into());
        }
        if self.prune_interval.is_zero() {
            return Err("--prune-interval must be positive".into());
        }
        Ok(())
    }
}

/// A store URL for logs: the password of a `postgres://user:password@host` URL is hidden, and
/// the query string (which may hold options) is dropped.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let rest = rest.split('?').next().unwrap_or_default();
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn report_query_bounds_are_checked() {
        let config = |f: &dyn Fn(&mut CollectorConfig)| {
            let mut c = CollectorConfig::new("sqlite::memory:", Auth::Unauthenticated);
            f(&mut c);
            c.validate()
        };
        assert_eq!(config(&|_| {}), Ok(()));
        assert_eq!(config(&|c| c.query_timeout = Duration::from_secs(86_400)), Ok(()));
        for timeout in [Duration::ZERO, Duration::from_secs(86_401), Duration::from_secs(30 * 86_400)] {
            let err = config(&|c| c.query_timeout = timeout).unwrap_err();
            assert!(err.contains("--query-timeout must be longer than 0s and at most 24h"), "{err}");
        }
        let err = config(&|c| c.max_concurrent_queries = 0).unwrap_err();
        assert!(err.contains("--max-concurrent-queries must be positive"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/audit?sslmode=require"),
            "postgres://u:***@db:5432/audit"
        );
        assert_eq!(redact_url("postgres://db/audit"), "postgres://db/audit");
        assert_eq!(redact_url("sqlite:/var/lib/custos/audit.db"), "sqlite:/var/lib/custos/audit.db");
    }
}
