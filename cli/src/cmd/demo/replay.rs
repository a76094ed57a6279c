//! The replay: normal traffic first (within the detectors' learning period), then the four
//! incidents of DESIGN.md side by side, each announced as it starts and ends.

mod bulk;
mod crawler;
mod insider;
mod normal;
mod scanner;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

use super::detection;
use super::phase::{Ctx, Phase};
use super::progress::Progress;

/// The phases, in report order, and when the incidents started.
pub(crate) struct Replay {
    /// Normal traffic, then the four incidents.
    pub(crate) phases: Vec<Phase>,
    /// Events at or after this time belong to the incidents.
    pub(crate) incidents_start: DateTime<Utc>,
}

/// Runs every phase.
pub(crate) async fn run(ctx: &Ctx<'_>, progress: &Progress) -> anyhow::Result<Replay> {
    let started = tokio::time::Instant::now();
    progress.start("normal traffic");
    let normal = normal::run(ctx).await?;
    progress.done("normal traffic", &normal.tally);
    // New principals alert only once the detectors' learning period is over; the incidents
    // start at the beginning of a volume bucket so that each one's burst lands in one bucket.
    let learnt = started + detection::LEARNING + Duration::from_millis(500);
    let wait = learnt.saturating_duration_since(tokio::time::Instant::now());
    let wait = wait + until_next_bucket(wait);
    progress.line(&format!(
        "waiting {:.1}s: the detectors' learning period, then the start of a volume bucket",
        wait.as_secs_f64()
    ));
    tokio::time::sleep(wait).await;
    let incidents_start = Utc::now();
    let (insider, bulk, crawler, scanner) = tokio::join!(
        announced(progress, "incident 1: courier insider", insider::run(ctx)),
        announced(progress, "incident 2: bulk download", bulk::run(ctx)),
        announced(progress, "incident 3: crawler", crawler::run(ctx)),
        announced(progress, "incident 4: infected scanner", scanner::run(ctx)),
    );
    Ok(Replay { phases: vec![normal, insider?, bulk?, crawler?, scanner?], incidents_start })
}

async fn announced(
    progress: &Progress,
    name: &str,
    phase: impl Future<Output = anyhow::Result<Phase>>,
) -> anyhow::Result<Phase> {
    progress.start(name);
    let phase = phase.await?;
    progress.done(name, &phase.tally);
    Ok(phase)
}

/// Time from `after` from now to the start of the next volume bucket (buckets are aligned on
/// the epoch).
fn until_next_bucket(after: Duration) -> Duration {
    let bucket = detection::config().volume.bucket.as_millis().max(1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) + after.as_millis();
    let wait = bucket - now % bucket;
    Duration::from_millis(u64::try_from(wait).unwrap_or(0) + 50)
}
