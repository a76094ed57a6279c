//! The collector's detector settings for the demo: windows of seconds instead of hours, so that
//! the incidents, replayed in a few seconds, fire, while the normal traffic stays below every
//! threshold.

use std::time::Duration;

use custos_detect::DetectConfig;

/// How long the `first_seen` detector learns the population before new principals alert. Every
/// normal caller makes its first request to each service at the start of the normal traffic,
/// well within it (with room for a loaded machine); the incidents start after it.
pub(crate) const LEARNING: Duration = Duration::from_secs(5);

/// The settings.
pub(crate) fn config() -> DetectConfig {
    let mut c = DetectConfig { cooldown: Duration::from_secs(600), ..DetectConfig::default() };
    // Volume: a fresh principal pulling 200 records within a 10-second bucket (a crawler, a
    // bulk download) alerts whatever its baseline; normal callers take a few dozen.
    c.volume.bucket = Duration::from_secs(10);
    c.volume.ceiling = 200;
    // Denials: 15 within a minute (probing export endpoints, hammering past a quota).
    c.denial_burst.window = Duration::from_secs(60);
    c.denial_burst.threshold = 15;
    // Out-of-scope rows: 100 rows filtered within a minute when they are most of what was
    // asked for, or 10 out-of-scope denials (reading other branches' records by id).
    c.row_filter_burst.window = Duration::from_secs(60);
    c.row_filter_burst.rows = 100;
    c.row_filter_burst.min_ratio = 0.5;
    c.row_filter_burst.denials = 10;
    c.first_seen.learning = LEARNING;
    // The demo runs at any hour: working hours would make the normal traffic alert at night.
    c.off_hours.enabled = false;
    c
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_settings_are_valid() {
        assert_eq!(super::config().validate(), Ok(()));
    }
}
