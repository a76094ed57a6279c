//! Custos collector: streaming leak detectors over ingested audit events, and alert delivery.
//!
//! # Detection
//!
//! [`Detectors`] is a plain synchronous engine: the collector calls
//! [`Detectors::observe_received`] for every event it committed (with the time it received
//! it) and gets back the [`Alert`]s it raises. No I/O and no wall clock: time is each event's
//! `time`, never later than its receipt, so replaying the same events gives the same alerts
//! with the same ids. Five detectors, each can be disabled
//! ([`DetectConfig`], or the `--detect-*` flags of [`DetectArgs`]):
//!
//! | detector | fires when | incident |
//! |---|---|---|
//! | `volume` | a principal's records per bucket exceed `factor` × its own baseline (and a floor), or a ceiling | crawler, bulk export |
//! | `denial_burst` | ≥ N Deny/WouldDeny of one principal within a window | scanning, probing, quota hammering |
//! | `row_filter_burst` | many rows removed by the row filter, or many `out_of_scope` denials, within a window | insider reading other branches |
//! | `first_seen` | a principal new to a (namespace, policy), after a learning period | rented/stolen accounts, new integrations |
//! | `off_hours` | a person reads data outside working hours in a time zone | night-time downloads |
//!
//! Alerts carry counts and thresholds, principal keys, namespaces, policy and rule names only,
//! never field values, record hashes or paths. Alert ids are a hash of detector, principal and
//! window start (plus scope for `first_seen`): re-ingesting or replaying does not duplicate
//! them in the store ([`custos_store::AnyStore::insert_alerts`] is idempotent by id). After an
//! alert the same detector stays silent for the same principal for [`DetectConfig::cooldown`],
//! so a running crawler raises one alert per cool-down, not thousands.
//!
//! Memory is bounded: per-principal state is forgotten after [`DetectConfig::state_ttl`]
//! without activity and at most [`DetectConfig::max_principals`] are tracked (least recently
//! active evicted first; evictions counted in [`DetectStats`]). Events from many sidecars may
//! arrive a little out of order: each principal has its own clock that never goes backwards;
//! an event up to [`DetectConfig::late_tolerance`] older counts in the current bucket/window,
//! an older one is left out of the windowed detectors (counted as late). An event dated after
//! its receipt moves the clock only to the receipt time, so a future date cannot make the
//! principal's next events late. `first_seen` learns from the first receipt time.
//!
//! After a restart the engine is empty; to restore baselines, feed it recent history from the
//! store and discard the alerts (their ids are those already stored).
//!
//! # Delivery
//!
//! [`AlertDispatcher`] (tokio) takes alerts with a non-blocking
//! [`AlertDispatcher::dispatch`], counts them in [`AlertMetrics`], and delivers them in the
//! background to [`AlertRecorder`]s (Kubernetes Events are to be added by the operator behind
//! this trait) and to a webhook (see the [`sink`] module for the payload and retry policy).
//!
//! See `docs/detectors.md` for the operator's view.
//!
//! # Wiring it into the collector
//!
//! ```no_run
//! use std::sync::Mutex;
//!
//! use custos_api::AuditEvent;
//! use custos_detect::{AlertDispatcher, AlertMetrics, DetectConfig, Detectors, SinkConfig};
//!
//! # async fn example(store: custos_store::AnyStore, batch: Vec<AuditEvent>)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! // At start-up (inside the tokio runtime), from the flattened `DetectArgs` / `SinkArgs`:
//! let detectors = Mutex::new(Detectors::new(DetectConfig::default())?);
//! let metrics = AlertMetrics::new();
//! let mut registry = prometheus_client::registry::Registry::default();
//! metrics.register(&mut registry);
//! let dispatcher = AlertDispatcher::start(SinkConfig::default(), metrics.clone())?;
//!
//! // After each committed batch:
//! let outcome = store.ingest(&batch).await?;
//! let (alerts, stats) = {
//!     let mut d = detectors.lock().expect("detector lock poisoned");
//!     (d.observe_all_received(&batch, chrono::Utc::now()), d.stats())
//! };
//! metrics.update_detect_stats(&stats);
//! if !alerts.is_empty() {
//!     store.insert_alerts(&alerts).await?;
//!     dispatcher.dispatch(alerts);
//! }
//! # let _ = outcome;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod config;
mod denial_burst;
mod engine;
mod first_seen;
mod metrics;
mod off_hours;
mod row_filter_burst;
pub mod sink;
mod volume;
mod window;

pub use config::{
    ConfigError, DenialBurstConfig, DetectArgs, DetectConfig, DetectorKind, FirstSeenConfig, OffHoursConfig,
    RowFilterBurstConfig, VolumeConfig, format_duration, parse_duration,
};
pub use custos_store::{Alert, Severity};
pub use engine::{DetectStats, Detectors, alert_id};
pub use metrics::{AlertMetrics, AttemptResult, DeliveryResult};
pub use row_filter_burst::OUT_OF_SCOPE;
pub use sink::{
    AlertDispatcher, AlertRecorder, DispatcherBuilder, RecorderError, SinkArgs, SinkConfig, SinkError,
};
