//! Detector settings: [`DetectConfig`] (serde, for files and tests) and [`DetectArgs`] (clap
//! flags `--detect-*`, environment `CUSTOS_DETECT_*`, meant to be flattened into the
//! collector's arguments). Both have the same defaults.

use std::time::Duration;

use chrono::{NaiveTime, Weekday};
use serde::{Deserialize, Serialize};

/// A setting that cannot be used. Names the setting (its config path) and what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid detector setting {field}: {reason}")]
pub struct ConfigError {
    /// The setting, as a config path (e.g. `volume.factor`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError { field, reason: reason.into() }
    }
}

/// The detectors, by name. The name is the `detector` field of their alerts and the
/// `detector` label of `custos_collector_alerts_total`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Records per time bucket against the principal's own baseline.
    #[value(name = "volume")]
    Volume,
    /// Many denials by one principal within a sliding window.
    #[value(name = "denial_burst", alias = "denial-burst")]
    DenialBurst,
    /// Many out-of-scope rows or out-of-scope denials by one principal within a sliding window.
    #[value(name = "row_filter_burst", alias = "row-filter-burst")]
    RowFilterBurst,
    /// A principal new to a (namespace, policy) after the learning period.
    #[value(name = "first_seen", alias = "first-seen")]
    FirstSeen,
    /// Data read outside the configured working hours.
    #[value(name = "off_hours", alias = "off-hours")]
    OffHours,
}

impl DetectorKind {
    /// Every detector, in a fixed order.
    pub const ALL: [DetectorKind; 5] = [
        DetectorKind::Volume,
        DetectorKind::DenialBurst,
        DetectorKind::RowFilterBurst,
        DetectorKind::FirstSeen,
        DetectorKind::OffHours,
    ];

    /// The detector's name, as in alerts and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectorKind::Volume => "volume",
            DetectorKind::DenialBurst => "denial_burst",
            DetectorKind::RowFilterBurst => "row_filter_burst",
            DetectorKind::FirstSeen => "first_seen",
            DetectorKind::OffHours => "off_hours",
        }
    }

    /// The detector with this name.
    pub fn from_name(name: &str) -> Option<DetectorKind> {
        DetectorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of all detectors and of the engine's bookkeeping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DetectConfig {
    /// After an alert, the same detector stays silent for the same principal this long (by
    /// event time).
    #[serde(with = "duration_serde")]
    pub cooldown: Duration,
    /// At most this many principals are tracked; beyond it the least recently active are
    /// forgotten (counted as capacity evictions).
    pub max_principals: usize,
    /// A principal inactive this long (by event time) is forgotten (baseline, windows, the
    /// scopes it was seen in).
    #[serde(with = "duration_serde")]
    pub state_ttl: Duration,
    /// Events up to this much older than the newest event of their principal count in the
    /// current bucket/window; older ones are skipped by the windowed detectors (counted late).
    #[serde(with = "duration_serde")]
    pub late_tolerance: Duration,
    /// How many recent event ids are remembered so that a resent batch is not counted twice
    /// (0: no de-duplication).
    pub dedupe_window: usize,
    /// The `volume` detector.
    pub volume: VolumeConfig,
    /// The `denial_burst` detector.
    pub denial_burst: DenialBurstConfig,
    /// The `row_filter_burst` detector.
    pub row_filter_burst: RowFilterBurstConfig,
    /// The `first_seen` detector.
    pub first_seen: FirstSeenConfig,
    /// The `off_hours` detector.
    pub off_hours: OffHoursConfig,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            cooldown: Duration::from_secs(3600),
            max_principals: 100_000,
            state_ttl: Duration::from_secs(30 * 86_400),
            late_tolerance: Duration::from_secs(300),
            dedupe_window: 65_536,
            volume: VolumeConfig::default(),
            denial_burst: DenialBurstConfig::default(),
            row_filter_burst: RowFilterBurstConfig::default(),
            first_seen: FirstSeenConfig::default(),
            off_hours: OffHoursConfig::default(),
        }
    }
}

impl DetectConfig {
    /// Whether a detector is enabled.
    pub fn enabled(&self, kind: DetectorKind) -> bool {
        match kind {
            DetectorKind::Volume => self.volume.enabled,
            DetectorKind::DenialBurst => self.denial_burst.enabled,
            DetectorKind::RowFilterBurst => self.row_filter_burst.enabled,
            DetectorKind::FirstSeen => self.first_seen.enabled,
            DetectorKind::OffHours => self.off_hours.enabled,
        }
    }

    /// Enables or disables a detector.
    pub fn set_enabled(&mut self, kind: DetectorKind, enabled: bool) {
        match kind {
            DetectorKind::Volume => self.volume.enabled = enabled,
            DetectorKind::DenialBurst => self.denial_burst.enabled = enabled,
            DetectorKind::RowFilterBurst => self.row_filter_burst.enabled = enabled,
            DetectorKind::FirstSeen => self.first_seen.enabled = enabled,
            DetectorKind::OffHours => self.off_hours.enabled = enabled,
        }
    }

    /// Checks every setting (also of disabled detectors, so that enabling one later cannot
    /// fail on a value nobody looked at).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_principals == 0 {
            return Err(ConfigError::new("maxPrincipals", "must be at least 1"));
        }
        positive("stateTtl", self.state_ttl)?;
        if self.state_ttl < Duration::from_secs(60) {
            return Err(ConfigError::new("stateTtl", "must be at least 1m"));
        }
        self.volume.validate()?;
        self.denial_burst.validate()?;
        self.row_filter_burst.validate()?;
        self.first_seen.validate()?;
        self.off_hours.compile()?;
        Ok(())
    }
}

/// Settings of the `volume` detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct VolumeConfig {
    /// Whether the detector runs.
    pub enabled: bool,
    /// Length of a bucket: records returned are summed per principal and bucket.
    #[serde(with = "duration_serde")]
    pub bucket: Duration,
    /// A bucket is anomalous above `factor` × the principal's baseline (and above `floor`).
    pub factor: f64,
    /// Records per bucket below which nothing is anomalous, whatever the baseline.
    pub floor: u64,
    /// Active buckets (with at least one request) a principal needs before its baseline is
    /// trusted.
    pub warmup_buckets: u32,
    /// Weight of the newest bucket in the baseline (exponentially weighted moving average
    /// over active buckets).
    pub alpha: f64,
    /// Records per bucket that alert whatever the baseline, also during warm-up (0: off).
    pub ceiling: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            enabled: true,
            bucket: Duration::from_secs(60),
            factor: 10.0,
            floor: 1_000,
            warmup_buckets: 30,
            alpha: 0.1,
            ceiling: 100_000,
        }
    }
}

impl VolumeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("volume.bucket", self.bucket)?;
        if self.bucket < Duration::from_secs(1) {
            return Err(ConfigError::new("volume.bucket", "must be at least 1s"));
        }
        if !self.factor.is_finite() || self.factor <= 1.0 {
            return Err(ConfigError::new("volume.factor", "must be a number greater than 1"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 || self.alpha > 1.0 {
            return Err(ConfigError::new("volume.alpha", "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Settings of the `denial_burst` detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DenialBurstConfig {
    /// Whether the detector runs.
    pub enabled: bool,
    /// The sliding window.
    #[serde(with = "duration_serde")]
    pub window: Duration,
    /// Deny and WouldDeny decisions within the window that raise an alert.
    pub threshold: u64,
}

impl Default for DenialBurstConfig {
    fn default() -> Self {
        DenialBurstConfig { enabled: true, window: Duration::from_secs(300), threshold: 20 }
    }
}

impl DenialBurstConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        window("denialBurst.window", self.window)?;
        if self.threshold == 0 {
            return Err(ConfigError::new("denialBurst.threshold", "must be at least 1"));
        }
        Ok(())
    }
}

/// Settings of the `row_filter_burst` detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RowFilterBurstConfig {
    /// Whether the detector runs.
    pub enabled: bool,
    /// The sliding window.
    #[serde(with = "duration_serde")]
    pub window: Duration,
    /// Rows removed by the row filter within the window that raise an alert (0: off)...
    pub rows: u64,
    /// ...when they are at least this share of the rows the principal asked for (filtered /
    /// (filtered + returned), 0 to 1).
    pub min_ratio: f64,
    /// `out_of_scope` denials (Deny or WouldDeny) within the window that raise an alert (0:
    /// off).
    pub denials: u64,
}

impl Default for RowFilterBurstConfig {
    fn default() -> Self {
        RowFilterBurstConfig {
            enabled: true,
            window: Duration::from_secs(600),
            rows: 500,
            min_ratio: 0.5,
            denials: 10,
        }
    }
}

impl RowFilterBurstConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        window("rowFilterBurst.window", self.window)?;
        if !self.min_ratio.is_finite() || !(0.0..=1.0).contains(&self.min_ratio) {
            return Err(ConfigError::new("rowFilterBurst.minRatio", "must be between 0 and 1"));
        }
        if self.rows == 0 && self.denials == 0 {
            return Err(ConfigError::new(
                "rowFilterBurst",
                "rows and denials are both 0: disable the detector instead",
            ));
        }
        Ok(())
    }
}

/// Settings of the `first_seen` detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FirstSeenConfig {
    /// Whether the detector runs.
    pub enabled: bool,
    /// From the first event this engine observed, principals are learnt without alerting for
    /// this long.
    #[serde(with = "duration_serde")]
    pub learning: Duration,
    /// Principal key prefixes considered (`peer:<ip>` keys change with pod IPs and are left
    /// out by default).
    pub prefixes: Vec<String>,
}

impl Default for FirstSeenConfig {
    fn default() -> Self {
        FirstSeenConfig {
            enabled: true,
            learning: Duration::from_secs(7 * 86_400),
            prefixes: vec!["user:".into(), "workload:".into()],
        }
    }
}

impl FirstSeenConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        prefixes("firstSeen.prefixes", &self.prefixes)
    }
}

/// Settings of the `off_hours` detector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OffHoursConfig {
    /// Whether the detector runs.
    pub enabled: bool,
    /// IANA time zone of the working hours (e.g. `Asia/Shanghai`).
    pub time_zone: String,
    /// Start of the working window, `HH:MM` local time.
    pub start: String,
    /// End of the working window, `HH:MM` local time (before `start`: the window runs over
    /// midnight).
    pub end: String,
    /// Working days: `Mon-Fri`, `Mon,Wed,Sat`, `Sun-Thu`, or `all`. For windows over
    /// midnight, the day on which the window starts.
    pub days: String,
    /// Principal key prefixes considered.
    pub prefixes: Vec<String>,
}

impl Default for OffHoursConfig {
    fn default() -> Self {
        OffHoursConfig {
            enabled: true,
            time_zone: "UTC".into(),
            start: "08:00".into(),
            end: "19:00".into(),
            days: "Mon-Fri".into(),
            prefixes: vec!["user:".into()],
        }
    }
}

/// The working window in a usable form.
#[derive(Clone, Debug)]
pub(crate) struct WorkingHours {
    pub(crate) tz: chrono_tz::Tz,
    pub(crate) start: NaiveTime,
    pub(crate) end: NaiveTime,
    /// Indexed by `Weekday::num_days_from_monday`.
    pub(crate) days: [bool; 7],
}

impl OffHoursConfig {
    pub(crate) fn compile(&self) -> Result<WorkingHours, ConfigError> {
        let tz = self.time_zone.trim().parse::<chrono_tz::Tz>().map_err(|_| {
            ConfigError::new("offHours.timeZone", "is not an IANA time zone name (e.g. Europe/Berlin)")
        })?;
        let start = parse_time_of_day(&self.start).map_err(|r| ConfigError::new("offHours.start", r))?;
        let end = parse_time_of_day(&self.end).map_err(|r| ConfigError::new("offHours.end", r))?;
        if start == end {
            return Err(ConfigError::new("offHours.end", "equals the start: the working window is empty"));
        }
        let days = parse_days(&self.days).map_err(|r| ConfigError::new("offHours.days", r))?;
        prefixes("offHours.prefixes", &self.prefixes)?;
        Ok(WorkingHours { tz, start, end, days })
    }
}

fn positive(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be greater than 0"));
    }
    Ok(())
}

fn window(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    positive(field, d)?;
    if d < Duration::from_secs(1) {
        return Err(ConfigError::new(field, "must be at least 1s"));
    }
    Ok(())
}

fn prefixes(field: &'static str, list: &[String]) -> Result<(), ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::new(field, "is empty: disable the detector instead"));
    }
    if list.iter().any(|p| p.trim().is_empty()) {
        return Err(ConfigError::new(field, "holds an empty prefix (it would match every principal)"));
    }
    Ok(())
}

/// Parses `HH:MM` (24 h).
fn parse_time_of_day(s: &str) -> Result<NaiveTime, String> {
    let s = s.trim();
    let (h, m) = s.split_once(':').ok_or_else(|| format!("'{s}' is not HH:MM"))?;
    let h: u32 = h.parse().map_err(|_| format!("'{s}' is not HH:MM"))?;
    let m: u32 = m.parse().map_err(|_| format!("'{s}' is not HH:MM"))?;
    if h == 24 && m == 0 {
        // 24:00 as an end of day.
        return NaiveTime::from_hms_milli_opt(23, 59, 59, 999).ok_or_else(|| "unreachable".into());
    }
    NaiveTime::from_hms_opt(h, m, 0).ok_or_else(|| format!("'{s}' is not a time of day"))
}

/// Parses `Mon-Fri`, `Sat,Sun`, `Mon-Wed,Fri`, `Fri-Mon` (wrapping), `all`.
fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let s = s.trim();
    let mut days = [false; 7];
    if s.eq_ignore_ascii_case("all") {
        return Ok([true; 7]);
    }
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("'{s}' has an empty item"));
        }
        let parse = |d: &str| {
            d.trim().parse::<Weekday>().map_err(|_| format!("'{}' is not a day (Mon, Tue, ...)", d.trim()))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                let mut d = a;
                loop {
                    days[d.num_days_from_monday() as usize] = true;
                    if d == b {
                        break;
                    }
                    d = d.succ();
                }
            }
            None => days[parse(item)?.num_days_from_monday() as usize] = true,
        }
    }
    Ok(days)
}

/// Parses a duration: a number and a unit among `ms`, `s`, `m`, `h`, `d` (a bare number is
/// seconds), e.g. `500ms`, `90s`, `5m`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("invalid duration '{s}' (e.g. 500ms, 30s, 5m, 1h, 7d)"))?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("invalid duration unit in '{s}' (use ms, s, m, h or d)")),
    };
    let secs = value * factor;
    if !secs.is_finite() || !(0.0..=86_400.0 * 3660.0).contains(&secs) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration in the largest unit that divides it (`90s`, `5m`, `7d`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Serde for durations as strings such as `5m` (see [`parse_duration`]).
mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// The detectors' flags, to flatten into the collector's arguments. Every flag also reads a
/// `CUSTOS_DETECT_*` environment variable. Defaults are those of [`DetectConfig::default`].
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Detectors")]
pub struct DetectArgs {
    /// Detectors to turn off (comma-separated: volume, denial_burst, row_filter_burst,
    /// first_seen, off_hours).
    #[arg(
        long = "detect-disable",
        env = "CUSTOS_DETECT_DISABLE",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub disable: Vec<DetectorKind>,

    /// After an alert, the same detector is silent for the same principal this long.
    #[arg(long = "detect-cooldown", env = "CUSTOS_DETECT_COOLDOWN", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub cooldown: Duration,

    /// Most principals tracked at once (the least recently active are forgotten beyond it).
    #[arg(
        long = "detect-max-principals",
        env = "CUSTOS_DETECT_MAX_PRINCIPALS",
        value_name = "N",
        default_value_t = 100_000
    )]
    pub max_principals: usize,

    /// A principal inactive this long is forgotten.
    #[arg(long = "detect-state-ttl", env = "CUSTOS_DETECT_STATE_TTL", value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    pub state_ttl: Duration,

    /// Out-of-order tolerance: older events are skipped by the windowed detectors.
    #[arg(long = "detect-late-tolerance", env = "CUSTOS_DETECT_LATE_TOLERANCE", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub late_tolerance: Duration,

    /// Recent event ids remembered to ignore resent events (0: off).
    #[arg(
        long = "detect-dedupe-window",
        env = "CUSTOS_DETECT_DEDUPE_WINDOW",
        value_name = "N",
        default_value_t = 65_536
    )]
    pub dedupe_window: usize,

    /// volume: bucket length.
    #[arg(long = "detect-volume-bucket", env = "CUSTOS_DETECT_VOLUME_BUCKET", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub volume_bucket: Duration,

    /// volume: alert above this multiple of the principal's baseline.
    #[arg(
        long = "detect-volume-factor",
        env = "CUSTOS_DETECT_VOLUME_FACTOR",
        value_name = "X",
        default_value_t = 10.0
    )]
    pub volume_factor: f64,

    /// volume: records per bucket below which nothing alerts.
    #[arg(
        long = "detect-volume-floor",
        env = "CUSTOS_DETECT_VOLUME_FLOOR",
        value_name = "RECORDS",
        default_value_t = 1_000
    )]
    pub volume_floor: u64,

    /// volume: active buckets before a principal's baseline is trusted.
    #[arg(
        long = "detect-volume-warmup",
        env = "CUSTOS_DETECT_VOLUME_WARMUP",
        value_name = "BUCKETS",
        default_value_t = 30
    )]
    pub volume_warmup: u32,

    /// volume: weight of the newest bucket in the baseline (EWMA), in (0, 1].
    #[arg(
        long = "detect-volume-alpha",
        env = "CUSTOS_DETECT_VOLUME_ALPHA",
        value_name = "A",
        default_value_t = 0.1
    )]
    pub volume_alpha: f64,

    /// volume: records per bucket that alert whatever the baseline (0: off).
    #[arg(
        long = "detect-volume-ceiling",
        env = "CUSTOS_DETECT_VOLUME_CEILING",
        value_name = "RECORDS",
        default_value_t = 100_000
    )]
    pub volume_ceiling: u64,

    /// denial_burst: sliding window.
    #[arg(long = "detect-denial-window", env = "CUSTOS_DETECT_DENIAL_WINDOW", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub denial_window: Duration,

    /// denial_burst: denials within the window that alert.
    #[arg(
        long = "detect-denial-threshold",
        env = "CUSTOS_DETECT_DENIAL_THRESHOLD",
        value_name = "N",
        default_value_t = 20
    )]
    pub denial_threshold: u64,

    /// row_filter_burst: sliding window.
    #[arg(long = "detect-row-filter-window", env = "CUSTOS_DETECT_ROW_FILTER_WINDOW", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub row_filter_window: Duration,

    /// row_filter_burst: rows dropped by the row filter within the window that alert (0: off).
    #[arg(
        long = "detect-row-filter-rows",
        env = "CUSTOS_DETECT_ROW_FILTER_ROWS",
        value_name = "ROWS",
        default_value_t = 500
    )]
    pub row_filter_rows: u64,

    /// row_filter_burst: least share of filtered rows among the rows asked for (0 to 1).
    #[arg(
        long = "detect-row-filter-min-ratio",
        env = "CUSTOS_DETECT_ROW_FILTER_MIN_RATIO",
        value_name = "RATIO",
        default_value_t = 0.5
    )]
    pub row_filter_min_ratio: f64,

    /// row_filter_burst: out_of_scope denials within the window that alert (0: off).
    #[arg(
        long = "detect-row-filter-denials",
        env = "CUSTOS_DETECT_ROW_FILTER_DENIALS",
        value_name = "N",
        default_value_t = 10
    )]
    pub row_filter_denials: u64,

    /// first_seen: learning period from the first event observed.
    #[arg(long = "detect-first-seen-learning", env = "CUSTOS_DETECT_FIRST_SEEN_LEARNING", value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    pub first_seen_learning: Duration,

    /// first_seen: principal prefixes considered (comma-separated).
    #[arg(
        long = "detect-first-seen-prefixes",
        env = "CUSTOS_DETECT_FIRST_SEEN_PREFIXES",
        value_name = "LIST",
        default_value = "user:,workload:"
    )]
    pub first_seen_prefixes: String,

    /// off_hours: IANA time zone of the working hours.
    #[arg(
        long = "detect-off-hours-tz",
        env = "CUSTOS_DETECT_OFF_HOURS_TZ",
        value_name = "ZONE",
        default_value = "UTC"
    )]
    pub off_hours_tz: String,

    /// off_hours: start of the working window (HH:MM).
    #[arg(
        long = "detect-off-hours-start",
        env = "CUSTOS_DETECT_OFF_HOURS_START",
        value_name = "HH:MM",
        default_value = "08:00"
    )]
    pub off_hours_start: String,

    /// off_hours: end of the working window (HH:MM).
    #[arg(
        long = "detect-off-hours-end",
        env = "CUSTOS_DETECT_OFF_HOURS_END",
        value_name = "HH:MM",
        default_value = "19:00"
    )]
    pub off_hours_end: String,

    /// off_hours: working days (Mon-Fri, Sat,Sun, all).
    #[arg(
        long = "detect-off-hours-days",
        env = "CUSTOS_DETECT_OFF_HOURS_DAYS",
        value_name = "DAYS",
        default_value = "Mon-Fri"
    )]
    pub off_hours_days: String,

    /// off_hours: principal prefixes considered (comma-separated).
    #[arg(
        long = "detect-off-hours-prefixes",
        env = "CUSTOS_DETECT_OFF_HOURS_PREFIXES",
        value_name = "LIST",
        default_value = "user:"
    )]
    pub off_hours_prefixes: String,
}

impl DetectArgs {
    /// The settings these flags describe, validated.
    pub fn into_config(self) -> Result<DetectConfig, ConfigError> {
        let mut config = DetectConfig {
            cooldown: self.cooldown,
            max_principals: self.max_principals,
            state_ttl: self.state_ttl,
            late_tolerance: self.late_tolerance,
            dedupe_window: self.dedupe_window,
            volume: VolumeConfig {
                enabled: true,
                bucket: self.volume_bucket,
                factor: self.volume_factor,
                floor: self.volume_floor,
                warmup_buckets: self.volume_warmup,
                alpha: self.volume_alpha,
                ceiling: self.volume_ceiling,
            },
            denial_burst: DenialBurstConfig {
                enabled: true,
                window: self.denial_window,
                threshold: self.denial_threshold,
            },
            row_filter_burst: RowFilterBurstConfig {
                enabled: true,
                window: self.row_filter_window,
                rows: self.row_filter_rows,
                min_ratio: self.row_filter_min_ratio,
                denials: self.row_filter_denials,
            },
            first_seen: FirstSeenConfig {
                enabled: true,
                learning: self.first_seen_learning,
                prefixes: parse_list(&self.first_seen_prefixes),
            },
            off_hours: OffHoursConfig {
                enabled: true,
                time_zone: self.off_hours_tz,
                start: self.off_hours_start,
                end: self.off_hours_end,
                days: self.off_hours_days,
                prefixes: parse_list(&self.off_hours_prefixes),
            },
        };
        for kind in self.disable {
            config.set_enabled(kind, false);
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        detect: DetectArgs,
    }

    #[test]
    fn flag_defaults_equal_config_defaults() {
        let cli = Cli::try_parse_from(["custos"]).unwrap();
        assert_eq!(cli.detect.into_config().unwrap(), DetectConfig::default());
        DetectConfig::default().validate().unwrap();
    }

    #[test]
    fn flags_disable_and_set() {
        let cli = Cli::try_parse_from([
            "custos",
            "--detect-disable",
            "off_hours,first-seen",
            "--detect-volume-factor",
            "5",
            "--detect-off-hours-tz",
            "Asia/Shanghai",
            "--detect-cooldown",
            "30m",
        ])
        .unwrap();
        let c = cli.detect.into_config().unwrap();
        assert!(!c.enabled(DetectorKind::OffHours));
        assert!(!c.enabled(DetectorKind::FirstSeen));
        assert!(c.enabled(DetectorKind::Volume));
        assert_eq!(c.volume.factor, 5.0);
        assert_eq!(c.off_hours.time_zone, "Asia/Shanghai");
        assert_eq!(c.cooldown, Duration::from_secs(1800));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let cli = Cli::try_parse_from(["custos", "--detect-off-hours-tz", "Mars/Olympus_Mons"]).unwrap();
        assert_eq!(cli.detect.into_config().unwrap_err().field, "offHours.timeZone");
        let cli = Cli::try_parse_from(["custos", "--detect-volume-factor", "0.5"]).unwrap();
        assert_eq!(cli.detect.into_config().unwrap_err().field, "volume.factor");
        let cli = Cli::try_parse_from(["custos", "--detect-off-hours-days", "Mon-Funday"]).unwrap();
        let e = cli.detect.into_config().unwrap_err();
        assert_eq!(e.field, "offHours.days");
        assert!(e.reason.contains("Funday"), "{e}");
        assert!(Cli::try_parse_from(["custos", "--detect-disable", "nope"]).is_err());
        assert!(Cli::try_parse_from(["custos", "--detect-cooldown", "5 fortnights"]).is_err());
    }

    #[test]
    fn days_and_times_parse() {
        assert_eq!(parse_days("Mon-Fri").unwrap(), [true, true, true, true, true, false, false]);
        assert_eq!(parse_days("Fri-Mon").unwrap(), [true, false, false, false, true, true, true]);
        assert_eq!(parse_days("Sat, Sun").unwrap(), [false, false, false, false, false, true, true]);
        assert_eq!(parse_days("all").unwrap(), [true; 7]);
        assert!(parse_days("Mon,,Tue").is_err());
        assert_eq!(parse_time_of_day("08:30").unwrap(), NaiveTime::from_hms_opt(8, 30, 0).unwrap());
        assert!(parse_time_of_day("25:00").is_err());
        assert!(parse_time_of_day("8").is_err());
    }

    #[test]
    fn config_round_trips_through_json_with_readable_durations() {
        let c = DetectConfig::default();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["cooldown"], "1h");
        assert_eq!(json["stateTtl"], "30d");
        assert_eq!(json["volume"]["bucket"], "1m");
        let back: DetectConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        let partial: DetectConfig =
            serde_json::from_str(r#"{"volume": {"factor": 4}, "offHours": {"enabled": false}}"#).unwrap();
        assert_eq!(partial.volume.factor, 4.0);
        assert_eq!(partial.volume.floor, 1_000);
        assert!(!partial.off_hours.enabled);
        assert!(serde_json::from_str::<DetectConfig>(r#"{"volume": {"facter": 4}}"#).is_err());
        assert!(serde_json::from_str::<DetectConfig>(r#"{"cooldown": "soon"}"#).is_err());
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert!(parse_duration("-1s").is_err());
    }
}
