//! `volume`: a principal's records returned per time bucket against its own baseline.
//!
//! Records returned are summed per principal and bucket (default 1 minute). The baseline is an
//! exponentially weighted moving average over the principal's *active* buckets (those with at
//! least one request): idle nights and weekends do not drag it towards zero, so the first
//! busy minute of the morning is compared with busy minutes, not with the night. The detector
//! fires as soon as the running bucket exceeds `factor` × baseline and the absolute `floor`,
//! once the principal has `warmup_buckets` active buckets behind it. Before that (a new
//! principal, e.g. a fresh crawler account) the baseline is taken to be the floor, so it fires
//! above `factor` × `floor`. Independently, any bucket reaching `ceiling` records fires. An anomalous bucket does not enter
//! the baseline, so a crawler cannot teach the detector that crawling is normal.

use serde_json::json;

use crate::config::{DetectorKind, VolumeConfig, format_duration};
use crate::engine::{Finding, rfc3339_ms};
use custos_store::Severity;

/// The detector's settings, in engine units.
#[derive(Clone, Debug)]
pub(crate) struct Volume {
    bucket_ms: i64,
    bucket_label: String,
    factor: f64,
    floor: u64,
    warmup: u32,
    alpha: f64,
    ceiling: u64,
}

/// Per-principal state.
#[derive(Clone, Debug, Default)]
pub(crate) struct VolumeState {
    /// Index of the running bucket (time / bucket length).
    bucket: Option<i64>,
    /// Records in the running bucket.
    count: u64,
    /// The running bucket crossed a threshold: it stays out of the baseline.
    anomalous: bool,
    /// EWMA of records per active bucket.
    baseline: f64,
    /// Normal active buckets that made the baseline (saturating).
    active: u32,
}

impl Volume {
    pub(crate) fn new(c: &VolumeConfig) -> Self {
        Volume {
            bucket_ms: i64::try_from(c.bucket.as_millis()).unwrap_or(i64::MAX).max(1),
            bucket_label: format_duration(c.bucket),
            factor: c.factor,
            floor: c.floor,
            warmup: c.warmup_buckets,
            alpha: c.alpha,
            ceiling: c.ceiling,
        }
    }

    /// Counts `records` at `t_ms` (the principal's monotonic clock).
    pub(crate) fn observe(
        &self,
        st: &mut VolumeState,
        principal: &str,
        t_ms: i64,
        records: u64,
        muted: bool,
    ) -> Option<Finding> {
        let idx = t_ms.div_euclid(self.bucket_ms);
        match st.bucket {
            Some(current) if idx > current => {
                self.close(st);
                st.bucket = Some(idx);
            }
            Some(_) => {}
            None => st.bucket = Some(idx),
        }
        if records == 0 {
            return None;
        }
        st.count = st.count.saturating_add(records);
        let warmed = st.active >= self.warmup;
        // Without enough history the baseline is taken to be the floor: a new principal may
        // not pull `factor` x `floor` records per bucket unnoticed while it warms up.
        let threshold = if warmed {
            (self.floor as f64).max(self.factor * st.baseline)
        } else {
            self.factor * self.floor as f64
        };
        let by_threshold = st.count as f64 > threshold;
        let by_ceiling = self.ceiling > 0 && st.count >= self.ceiling;
        if !(by_threshold || by_ceiling) {
            return None;
        }
        st.anomalous = true;
        if muted {
            return Some(Finding::muted(DetectorKind::Volume));
        }
        let bucket_start = st.bucket.unwrap_or(idx).saturating_mul(self.bucket_ms);
        let count = st.count;
        let critical = by_ceiling || count as f64 >= 10.0 * threshold;
        let start = rfc3339_ms(bucket_start);
        let bucket = &self.bucket_label;
        let (trigger, message) = if by_ceiling {
            (
                "ceiling",
                format!(
                    "{principal} received {count} records in the {bucket} bucket starting {start}: at or \
                     over the ceiling of {} records",
                    self.ceiling
                ),
            )
        } else if warmed {
            (
                "baseline",
                format!(
                    "{principal} received {count} records in the {bucket} bucket starting {start}: over {} x \
                     its baseline of {:.1} records per active bucket (threshold {threshold:.0})",
                    self.factor, st.baseline
                ),
            )
        } else {
            (
                "warmup",
                format!(
                    "{principal} received {count} records in the {bucket} bucket starting {start} with {} \
                     of {} buckets of history: over {} x the floor of {} (threshold {threshold:.0})",
                    st.active, self.warmup, self.factor, self.floor
                ),
            )
        };
        Some(Finding {
            kind: DetectorKind::Volume,
            window_start_ms: bucket_start,
            scope: None,
            severity: if critical { Severity::Critical } else { Severity::Warning },
            message,
            details: json!({
                "trigger": trigger,
                "bucketStart": rfc3339_ms(bucket_start),
                "bucketSeconds": self.bucket_ms / 1000,
                "records": count,
                "baseline": (st.baseline * 10.0).round() / 10.0,
                "activeBuckets": st.active,
                "warmupBuckets": self.warmup,
                "factor": self.factor,
                "floor": self.floor,
                "threshold": threshold.round(),
                "ceiling": self.ceiling,
            }),
            muted: false,
        })
    }

    /// Ends the running bucket: a normal bucket with requests enters the baseline.
    fn close(&self, st: &mut VolumeState) {
        if !st.anomalous {
            let x = st.count as f64;
            st.baseline = if st.active == 0 { x } else { self.alpha * x + (1.0 - self.alpha) * st.baseline };
            st.active = st.active.saturating_add(1);
        }
        st.count = 0;
        st.anomalous = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Volume {
        Volume::new(&VolumeConfig { warmup_buckets: 3, ..VolumeConfig::default() })
    }

    #[test]
    fn fires_after_warmup_above_factor_and_floor() {
        let v = volume();
        let mut st = VolumeState::default();
        for minute in 0..3 {
            assert!(v.observe(&mut st, "user:1", minute * 60_000, 200, false).is_none());
        }
        // Bucket 3 opens: 3 normal buckets made the baseline (200).
        assert!(v.observe(&mut st, "user:1", 3 * 60_000, 1_500, false).is_none(), "under 10 x 200");
        let f = v.observe(&mut st, "user:1", 3 * 60_000 + 1, 600, false).expect("2100 > 2000");
        assert_eq!(f.window_start_ms, 3 * 60_000);
        assert_eq!(f.details["records"], 2_100);
        assert_eq!(f.details["threshold"], 2_000.0);
        // The anomalous bucket stays out of the baseline.
        v.observe(&mut st, "user:1", 4 * 60_000, 200, false);
        assert_eq!(st.baseline, 200.0);
        assert_eq!(st.active, 3);
    }

    #[test]
    fn floor_protects_quiet_principals() {
        let v = volume();
        let mut st = VolumeState::default();
        for minute in 0..10 {
            v.observe(&mut st, "user:1", minute * 60_000, 1, false);
        }
        assert!(v.observe(&mut st, "user:1", 11 * 60_000, 900, false).is_none());
        assert!(v.observe(&mut st, "user:1", 12 * 60_000, 1_001, false).is_some());
    }

    #[test]
    fn ceiling_fires_during_warmup() {
        let v = volume();
        let mut st = VolumeState::default();
        let f = v.observe(&mut st, "user:1", 0, 100_000, false).expect("ceiling");
        assert_eq!(f.details["trigger"], "ceiling");
        assert_eq!(f.severity, Severity::Critical);
    }

    #[test]
    fn new_principals_are_held_to_factor_times_floor() {
        let v = volume();
        let mut st = VolumeState::default();
        assert!(v.observe(&mut st, "user:1", 0, 10_000, false).is_none());
        let f = v.observe(&mut st, "user:1", 1, 1, false).expect("10001 > 10 x 1000");
        assert_eq!(f.details["trigger"], "warmup");
        assert_eq!(f.severity, Severity::Warning);
        // The anomalous bucket does not count towards the warm-up.
        v.observe(&mut st, "user:1", 60_000, 1, false);
        assert_eq!(st.active, 0);
    }
}
