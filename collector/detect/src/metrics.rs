//! Prometheus metrics of detection and alert delivery.

use std::sync::{Arc, Mutex, PoisonError};

use custos_store::{Alert, Severity};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::DetectorKind;
use crate::engine::DetectStats;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The final fate of one alert at the webhook; the `result` label of
/// `custos_collector_alert_webhook_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryResult {
    /// A 2xx answer.
    Delivered,
    /// Every attempt failed with a retryable error (5xx, 408, 429, 401, time-out, connection
    /// error); the alert was given up.
    Failed,
    /// The webhook refused the alert (another 4xx, or a redirect): retrying cannot help.
    Rejected,
}

impl DeliveryResult {
    /// Every result, in label order.
    pub const ALL: [DeliveryResult; 3] =
        [DeliveryResult::Delivered, DeliveryResult::Failed, DeliveryResult::Rejected];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryResult::Delivered => "delivered",
            DeliveryResult::Failed => "failed",
            DeliveryResult::Rejected => "rejected",
        }
    }
}

/// The outcome of one POST to the webhook; the `result` label of
/// `custos_collector_alert_webhook_attempts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptResult {
    /// 2xx.
    Ok,
    /// 5xx.
    ServerError,
    /// 408 or 429.
    Throttled,
    /// 401: the token file is read again before the next attempt.
    Unauthorized,
    /// Another 4xx, or a 1xx/3xx status (redirects are not followed).
    Rejected,
    /// No answer within the time-out.
    Timeout,
    /// Connection refused or reset, TLS failure, or another transport error.
    TransportError,
    /// The token file could not be read; nothing was sent.
    TokenError,
}

impl AttemptResult {
    /// Every result, in label order.
    pub const ALL: [AttemptResult; 8] = [
        AttemptResult::Ok,
        AttemptResult::ServerError,
        AttemptResult::Throttled,
        AttemptResult::Unauthorized,
        AttemptResult::Rejected,
        AttemptResult::Timeout,
        AttemptResult::TransportError,
        AttemptResult::TokenError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::ServerError => "server_error",
            AttemptResult::Throttled => "throttled",
            AttemptResult::Unauthorized => "unauthorized",
            AttemptResult::Rejected => "rejected",
            AttemptResult::Timeout => "timeout",
            AttemptResult::TransportError => "transport_error",
            AttemptResult::TokenError => "token_error",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

/// Metrics of detection and delivery. Cheap to clone (clones share the values).
///
/// | name | type | meaning |
/// |---|---|---|
/// | `custos_collector_alerts_total{detector,severity}` | counter | alerts raised (handed to [`AlertDispatcher::dispatch`](crate::AlertDispatcher::dispatch)) |
/// | `custos_collector_alerts_dropped_total` | counter | alerts not delivered because the delivery queue was full or the dispatcher had stopped |
/// | `custos_collector_alerts_pending` | gauge | alerts queued or being delivered |
/// | `custos_collector_alert_webhook_deliveries_total{result}` | counter | alerts by final webhook outcome ([`DeliveryResult`]) |
/// | `custos_collector_alert_webhook_attempts_total{result}` | counter | webhook POSTs by outcome ([`AttemptResult`]) |
/// | `custos_collector_alert_recordings_total{recorder,result}` | counter | [`AlertRecorder`](crate::AlertRecorder) calls, `result` = `ok` or `error` |
/// | `custos_collector_detect_principals` | gauge | principals tracked by the detectors |
/// | `custos_collector_detect_evictions_total{reason}` | counter | principals forgotten: `idle` or `capacity` |
/// | `custos_collector_detect_events_skipped_total{reason}` | counter | events not (fully) used: `duplicate`, `invalid`, `late` |
/// | `custos_collector_detect_alerts_suppressed_total` | counter | findings silenced by the cool-down |
///
/// The `detect_*` series follow [`DetectStats`] given to [`AlertMetrics::update_detect_stats`].
#[derive(Clone, Debug)]
pub struct AlertMetrics {
    alerts: Family<Labels2, Counter>,
    dropped: Counter,
    pending: Gauge,
    deliveries: Family<Labels1, Counter>,
    attempts: Family<Labels1, Counter>,
    attempts_by_result: [Counter; AttemptResult::ALL.len()],
    recordings: Family<Labels2, Counter>,
    principals: Gauge,
    evictions: Family<Labels1, Counter>,
    skipped: Family<Labels1, Counter>,
    suppressed: Counter,
    detecting: Gauge,
    last_stats: Arc<Mutex<DetectStats>>,
}

impl Default for AlertMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AlertMetrics {
    /// New metrics, all zero; every label combination exists from the start.
    pub fn new() -> Self {
        let alerts: Family<Labels2, Counter> = Family::default();
        for kind in DetectorKind::ALL {
            for s in SEVERITIES {
                let _ = alerts.get_or_create(&[("detector", kind.as_str()), ("severity", severity_label(s))]);
            }
        }
        let deliveries: Family<Labels1, Counter> = Family::default();
        for r in DeliveryResult::ALL {
            let _ = deliveries.get_or_create(&[("result", r.as_str())]);
        }
        let attempts: Family<Labels1, Counter> = Family::default();
        let attempts_by_result =
            AttemptResult::ALL.map(|r| attempts.get_or_create(&[("result", r.as_str())]).clone());
        let evictions: Family<Labels1, Counter> = Family::default();
        for r in ["idle", "capacity"] {
            let _ = evictions.get_or_create(&[("reason", r)]);
        }
        let skipped: Family<Labels1, Counter> = Family::default();
        for r in ["duplicate", "invalid", "late"] {
            let _ = skipped.get_or_create(&[("reason", r)]);
        }
        AlertMetrics {
            alerts,
            dropped: Counter::default(),
            pending: Gauge::default(),
            deliveries,
            attempts,
            attempts_by_result,
            recordings: Family::default(),
            principals: Gauge::default(),
            evictions,
            skipped,
            suppressed: Counter::default(),
            detecting: Gauge::default(),
            last_stats: Arc::new(Mutex::new(DetectStats::default())),
        }
    }

    /// Registers every metric in `registry` (names in the type's documentation).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "custos_collector_alerts",
            "Alerts raised by the detectors, by detector and severity",
            self.alerts.clone(),
        );
        registry.register(
            "custos_collector_alerts_dropped",
            "Alerts not delivered: the delivery queue was full or the dispatcher had stopped",
            self.dropped.clone(),
        );
        registry.register(
            "custos_collector_alerts_pending",
            "Alerts queued for delivery or being delivered",
            self.pending.clone(),
        );
        registry.register(
            "custos_collector_alert_webhook_deliveries",
            "Alerts by final outcome at the webhook",
            self.deliveries.clone(),
        );
        registry.register(
            "custos_collector_alert_webhook_attempts",
            "POSTs of alerts to the webhook, by outcome",
            self.attempts.clone(),
        );
        registry.register(
            "custos_collector_alert_recordings",
            "Alerts given to recorders (e.g. Kubernetes Events), by recorder and outcome",
            self.recordings.clone(),
        );
        registry.register(
            "custos_collector_detect_principals",
            "Principals tracked by the detectors",
            self.principals.clone(),
        );
        registry.register(
            "custos_collector_detect_evictions",
            "Principals forgotten by the detectors, by reason (idle, capacity)",
            self.evictions.clone(),
        );
        registry.register(
            "custos_collector_detect_events_skipped",
            "Events the detectors ignored (duplicate, invalid) or left out of windows (late)",
            self.skipped.clone(),
        );
        registry.register(
            "custos_collector_detect_alerts_suppressed",
            "Detector findings silenced by the per-principal cool-down",
            self.suppressed.clone(),
        );
        registry.register(
            "custos_collector_detecting",
            "1 while this replica runs the detectors (on PostgreSQL: over every replica's events, one replica at a time), else 0",
            self.detecting.clone(),
        );
    }

    /// Whether this replica runs the detectors now.
    pub fn set_detecting(&self, detecting: bool) {
        self.detecting.set(i64::from(detecting));
    }

    /// Mirrors the engine's counters (call after observing a batch); counters move by the
    /// difference with the previous call.
    pub fn update_detect_stats(&self, stats: &DetectStats) {
        let mut last = self.last_stats.lock().unwrap_or_else(PoisonError::into_inner);
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        self.evictions
            .get_or_create(&[("reason", "idle")])
            .inc_by(delta(stats.evicted_idle, last.evicted_idle));
        self.evictions
            .get_or_create(&[("reason", "capacity")])
            .inc_by(delta(stats.evicted_capacity, last.evicted_capacity));
        self.skipped
            .get_or_create(&[("reason", "duplicate")])
            .inc_by(delta(stats.duplicates, last.duplicates));
        self.skipped.get_or_create(&[("reason", "invalid")]).inc_by(delta(stats.invalid, last.invalid));
        self.skipped.get_or_create(&[("reason", "late")]).inc_by(delta(stats.late, last.late));
        self.suppressed.inc_by(delta(stats.suppressed, last.suppressed));
        self.principals.set(i64::try_from(stats.tracked_principals).unwrap_or(i64::MAX));
        *last = *stats;
    }

    pub(crate) fn alert_raised(&self, alert: &Alert) {
        let detector = DetectorKind::from_name(&alert.detector).map_or("other", DetectorKind::as_str);
        self.alerts
            .get_or_create(&[("detector", detector), ("severity", severity_label(alert.severity))])
            .inc();
    }

    pub(crate) fn dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    pub(crate) fn pending_add(&self, n: i64) {
        self.pending.inc_by(n);
    }

    pub(crate) fn delivery(&self, r: DeliveryResult) {
        self.deliveries.get_or_create(&[("result", r.as_str())]).inc();
    }

    pub(crate) fn attempt(&self, r: AttemptResult) {
        self.attempts_by_result[r.index()].inc();
    }

    pub(crate) fn recording(&self, recorder: &'static str, ok: bool) {
        self.recordings
            .get_or_create(&[("recorder", recorder), ("result", if ok { "ok" } else { "error" })])
            .inc();
    }

    /// Alerts raised by `detector` (a [`DetectorKind`] name) with `severity`.
    pub fn alerts(&self, detector: &str, severity: Severity) -> u64 {
        let detector = DetectorKind::from_name(detector).map_or("other", DetectorKind::as_str);
        self.alerts.get_or_create(&[("detector", detector), ("severity", severity_label(severity))]).get()
    }

    /// Alerts dropped.
    pub fn alerts_dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Alerts queued or being delivered.
    pub fn alerts_pending(&self) -> i64 {
        self.pending.get()
    }

    /// Alerts with this final webhook outcome.
    pub fn webhook_deliveries(&self, r: DeliveryResult) -> u64 {
        self.deliveries.get_or_create(&[("result", r.as_str())]).get()
    }

    /// Webhook POSTs with this outcome.
    pub fn webhook_attempts(&self, r: AttemptResult) -> u64 {
        self.attempts_by_result[r.index()].get()
    }

    /// Recorder calls of `recorder` that succeeded (`ok`) or failed.
    pub fn recordings(&self, recorder: &'static str, ok: bool) -> u64 {
        self.recordings
            .get_or_create(&[("recorder", recorder), ("result", if ok { "ok" } else { "error" })])
            .get()
    }
}
