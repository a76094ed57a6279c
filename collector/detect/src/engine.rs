//! The engine: per-principal state, the clock, de-duplication, cool-down, eviction, and the
//! alerts built from the detectors' findings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use chrono::{DateTime, SecondsFormat, Utc};
use custos_api::AuditEvent;
use custos_store::{Alert, Severity};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, DetectConfig, DetectorKind};
use crate::denial_burst::DenialBurst;
use crate::first_seen::{FirstSeen, Scope};
use crate::off_hours::OffHours;
use crate::row_filter_burst::{RowFilterBurst, RowFilterState};
use crate::volume::{Volume, VolumeState};
use crate::window::SlidingSum;

/// What a detector found; the engine turns it into an [`Alert`] unless the cool-down holds.
#[derive(Clone, Debug)]
pub(crate) struct Finding {
    pub(crate) kind: DetectorKind,
    /// Start of the bucket/window concerned (ms since the epoch); part of the alert id.
    pub(crate) window_start_ms: i64,
    /// A further part of the alert id (first_seen: the scope).
    pub(crate) scope: Option<String>,
    pub(crate) severity: Severity,
    pub(crate) message: String,
    pub(crate) details: serde_json::Value,
    /// The detector is in its cool-down for this principal: the finding only counts as
    /// suppressed (message and details were not built).
    pub(crate) muted: bool,
}

impl Finding {
    /// A finding during the cool-down: nothing to describe.
    pub(crate) fn muted(kind: DetectorKind) -> Self {
        Finding {
            kind,
            window_start_ms: 0,
            scope: None,
            severity: Severity::Info,
            message: String::new(),
            details: serde_json::Value::Null,
            muted: true,
        }
    }
}

/// Counters of the engine since it was created.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DetectStats {
    /// Events given to [`Detectors::observe`].
    pub events: u64,
    /// Of those, events whose id was seen recently (resent batches): ignored.
    pub duplicates: u64,
    /// Of those, events that could not be used (time not RFC 3339, empty principal): ignored.
    pub invalid: u64,
    /// Of those, events older than their principal's clock minus the late tolerance: skipped
    /// by the windowed detectors (volume, denial_burst, row_filter_burst).
    pub late: u64,
    /// Alerts returned.
    pub alerts: u64,
    /// Findings silenced by the cool-down.
    pub suppressed: u64,
    /// Principals forgotten after the state TTL without activity.
    pub evicted_idle: u64,
    /// Principals forgotten because [`DetectConfig::max_principals`] was reached (least
    /// recently active first).
    pub evicted_capacity: u64,
    /// Principals tracked now.
    pub tracked_principals: usize,
}

/// Per-principal state of every detector.
#[derive(Debug, Default)]
struct PrincipalState {
    /// The newest event time of this principal (ms); never goes backwards.
    clock: i64,
    volume: VolumeState,
    denials: SlidingSum,
    rows: RowFilterState,
    scopes: Vec<Scope>,
    /// Per detector: silent until this time (ms).
    cooled_until: [Option<i64>; DetectorKind::ALL.len()],
}

/// Recently seen event ids (hashed), first in first out.
#[derive(Debug, Default)]
struct Dedupe {
    capacity: usize,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Dedupe {
    /// Whether `id` was seen; remembers it otherwise.
    fn seen_before(&mut self, id: &str) -> bool {
        if self.capacity == 0 || id.is_empty() {
            return false;
        }
        // DefaultHasher::new() has fixed keys: the same id hashes the same in every run.
        let mut h = DefaultHasher::new();
        id.hash(&mut h);
        let key = h.finish();
        if !self.set.insert(key) {
            return true;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        false
    }
}

/// The detectors over a stream of audit events.
///
/// Synchronous and deterministic: no I/O and no wall clock. Time comes from each event's
/// `time`, bounded by the receipt time the collector gives
/// ([`Detectors::observe_received`]): the same events in the same order (and receipt times)
/// give the same alerts with the same ids. Feed it events roughly in time order (modest
/// disorder across sidecars is tolerated, see [`DetectConfig::late_tolerance`]); call
/// [`Detectors::observe_received`] (or [`Detectors::observe`] for a replay) once per event
/// stored.
#[derive(Debug)]
pub struct Detectors {
    config: DetectConfig,
    volume: Option<Volume>,
    denial_burst: Option<DenialBurst>,
    row_filter_burst: Option<RowFilterBurst>,
    first_seen: Option<FirstSeen>,
    off_hours: Option<OffHours>,
    principals: HashMap<String, PrincipalState>,
    dedupe: Dedupe,
    /// The newest event time seen (ms).
    watermark: Option<i64>,
    /// The start of first_seen's learning period (ms): the first receipt time given
    /// ([`Detectors::observe_received`]), else the first event time seen.
    origin: Option<i64>,
    next_sweep: i64,
    cooldown_ms: i64,
    ttl_ms: i64,
    late_ms: i64,
    stats: DetectStats,
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `t_ms` as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339_ms(t_ms: i64) -> String {
    DateTime::from_timestamp_millis(t_ms)
        .map_or_else(|| t_ms.to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The deterministic id of an alert: detector, principal, window start and scope, hashed.
pub fn alert_id(detector: &str, principal: &str, window_start_ms: i64, scope: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(b"custos-alert-v1\x1f");
    h.update(detector.as_bytes());
    h.update(b"\x1f");
    h.update(principal.as_bytes());
    h.update(b"\x1f");
    h.update(window_start_ms.to_string().as_bytes());
    h.update(b"\x1f");
    h.update(scope.unwrap_or("").as_bytes());
    hex::encode(&h.finalize()[..16])
}

impl Detectors {
    /// An engine with these settings (validated).
    pub fn new(config: DetectConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let off_hours = if config.off_hours.enabled { Some(OffHours::new(&config.off_hours)?) } else { None };
        Ok(Detectors {
            volume: config.volume.enabled.then(|| Volume::new(&config.volume)),
            denial_burst: config.denial_burst.enabled.then(|| DenialBurst::new(&config.denial_burst)),
            row_filter_burst: config
                .row_filter_burst
                .enabled
                .then(|| RowFilterBurst::new(&config.row_filter_burst)),
            first_seen: config.first_seen.enabled.then(|| FirstSeen::new(&config.first_seen)),
            off_hours,
            principals: HashMap::new(),
            dedupe: Dedupe { capacity: config.dedupe_window, ..Dedupe::default() },
            watermark: None,
            origin: None,
            next_sweep: i64::MIN,
            cooldown_ms: millis(config.cooldown),
            ttl_ms: millis(config.state_ttl),
            late_ms: millis(config.late_tolerance),
            stats: DetectStats::default(),
            config,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DetectConfig {
        &self.config
    }

    /// Counters since creation.
    pub fn stats(&self) -> DetectStats {
        DetectStats { tracked_principals: self.principals.len(), ..self.stats }
    }

    /// Principals tracked now (at most [`DetectConfig::max_principals`]).
    pub fn tracked_principals(&self) -> usize {
        self.principals.len()
    }

    /// Observes every event of a batch, in order; the alerts of all of them.
    pub fn observe_all<'a>(&mut self, events: impl IntoIterator<Item = &'a AuditEvent>) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for e in events {
            alerts.extend(self.observe(e));
        }
        alerts
    }

    /// Observes every event of a batch the collector received at `received` (its own clock),
    /// in order; the alerts of all of them. See [`Self::observe_received`].
    pub fn observe_all_received<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a AuditEvent>,
        received: DateTime<Utc>,
    ) -> Vec<Alert> {
        let cap = received.timestamp_millis();
        let mut alerts = Vec::new();
        for e in events {
            alerts.extend(self.observe_capped(e, cap));
        }
        alerts
    }

    /// Observes one event the collector received at `received` (its own clock); the alerts it
    /// raises. An event dated after `received` (a sender's clock ahead, or a forged time: the
    /// store takes up to 10 minutes of skew) counts as if dated `received`: it moves its
    /// principal's clock and the watermark no further, so it cannot make the principal's
    /// next events late and keep them out of the windowed detectors. `off_hours` still judges
    /// the event's own time.
    pub fn observe_received(&mut self, event: &AuditEvent, received: DateTime<Utc>) -> Vec<Alert> {
        self.observe_capped(event, received.timestamp_millis())
    }

    /// Observes one event; the alerts it raises (usually none). Its time is taken as it is:
    /// for events received now, prefer [`Self::observe_received`].
    pub fn observe(&mut self, event: &AuditEvent) -> Vec<Alert> {
        self.observe_capped(event, i64::MAX)
    }

    /// [`Self::observe`], the event's time taken as at most `cap_ms` for the clocks.
    fn observe_capped(&mut self, event: &AuditEvent, cap_ms: i64) -> Vec<Alert> {
        self.stats.events += 1;
        if self.dedupe.seen_before(&event.id) {
            self.stats.duplicates += 1;
            return Vec::new();
        }
        let Some(t) = DateTime::parse_from_rfc3339(&event.time).ok().map(|t| t.timestamp_millis()) else {
            self.stats.invalid += 1;
            return Vec::new();
        };
        if event.principal.is_empty() {
            self.stats.invalid += 1;
            return Vec::new();
        }
        // The time that moves the clocks: never ahead of the receipt.
        let t_clock = t.min(cap_ms);
        // first_seen learns from the first receipt (the collector's start), not from an
        // event's own time: an old event must not end the learning period at once.
        self.origin.get_or_insert(if cap_ms == i64::MAX { t } else { cap_ms });
        let now = self.advance(t_clock);
        let learning_over = match (&self.first_seen, self.origin) {
            (Some(f), Some(origin)) => now >= origin.saturating_add(f.learning_ms),
            _ => false,
        };
        if !self.principals.contains_key(event.principal.as_str()) {
            self.make_room();
            self.principals
                .insert(event.principal.clone(), PrincipalState { clock: t_clock, ..Default::default() });
        }
        let Some(st) = self.principals.get_mut(event.principal.as_str()) else {
            return Vec::new();
        };
        let late = t_clock < st.clock.saturating_sub(self.late_ms);
        let t_eff = t_clock.max(st.clock);
        st.clock = t_eff;

        let cooled = st.cooled_until;
        let muted = |kind: DetectorKind| cooled[kind.index()].is_some_and(|until| t_eff < until);
        let mut findings: Vec<Finding> = Vec::new();
        if late {
            self.stats.late += 1;
        } else {
            if let Some(v) = &self.volume {
                let m = muted(DetectorKind::Volume);
                findings.extend(v.observe(
                    &mut st.volume,
                    &event.principal,
                    t_eff,
                    event.records_returned,
                    m,
                ));
            }
            if let Some(d) = &self.denial_burst {
                findings.extend(d.observe(&mut st.denials, event, t_eff, muted(DetectorKind::DenialBurst)));
            }
            if let Some(r) = &self.row_filter_burst {
                findings.extend(r.observe(&mut st.rows, event, t_eff, muted(DetectorKind::RowFilterBurst)));
            }
        }
        if let Some(f) = &self.first_seen {
            findings.extend(f.observe(&mut st.scopes, event, learning_over, muted(DetectorKind::FirstSeen)));
        }
        if let Some(o) = &self.off_hours {
            findings.extend(o.observe(event, t, muted(DetectorKind::OffHours)));
        }

        let mut alerts = Vec::new();
        for f in findings {
            if f.muted {
                self.stats.suppressed += 1;
                continue;
            }
            st.cooled_until[f.kind.index()] = Some(t_eff.saturating_add(self.cooldown_ms));
            let mut details = f.details;
            if let serde_json::Value::Object(map) = &mut details {
                map.insert("cooldownSeconds".into(), (self.cooldown_ms / 1000).into());
            }
            alerts.push(Alert {
                id: alert_id(f.kind.as_str(), &event.principal, f.window_start_ms, f.scope.as_deref()),
                time: rfc3339_ms(t_eff),
                detector: f.kind.as_str().to_owned(),
                namespace: Some(event.namespace.clone()),
                policy: event.policy.clone(),
                principal: Some(event.principal.clone()),
                severity: f.severity,
                message: f.message,
                details,
            });
        }
        self.stats.alerts += alerts.len() as u64;
        alerts
    }

    /// Moves the watermark to `t` (never backwards), sweeping idle principals now and then;
    /// the watermark.
    fn advance(&mut self, t: i64) -> i64 {
        let now = self.watermark.map_or(t, |w| w.max(t));
        self.watermark = Some(now);
        if now >= self.next_sweep {
            self.sweep_idle(now);
            let interval = (self.ttl_ms / 10).clamp(60_000, 3_600_000);
            self.next_sweep = now.saturating_add(interval);
        }
        now
    }

    fn sweep_idle(&mut self, now: i64) {
        let cutoff = now.saturating_sub(self.ttl_ms);
        let before = self.principals.len();
        self.principals.retain(|_, s| s.clock >= cutoff);
        self.stats.evicted_idle += (before - self.principals.len()) as u64;
    }

    /// Makes room for one more principal: idle ones first, then the least recently active
    /// sixteenth (ties broken by key, so that eviction is deterministic).
    fn make_room(&mut self) {
        let cap = self.config.max_principals;
        if self.principals.len() < cap {
            return;
        }
        if let Some(now) = self.watermark {
            self.sweep_idle(now);
        }
        if self.principals.len() < cap {
            return;
        }
        let excess = self.principals.len() + 1 - cap;
        let k = (cap / 16).max(excess).min(self.principals.len());
        let mut by_age: Vec<(i64, &String)> = self.principals.iter().map(|(key, s)| (s.clock, key)).collect();
        if k < by_age.len() {
            by_age.select_nth_unstable(k - 1);
            by_age.truncate(k);
        }
        let victims: Vec<String> = by_age.into_iter().map(|(_, key)| key.clone()).collect();
        for key in &victims {
            self.principals.remove(key);
        }
        self.stats.evicted_capacity += victims.len() as u64;
    }
}
