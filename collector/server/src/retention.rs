//! Retention: a background task that prunes events older than `--retention` every
//! `--prune-interval` (first run at start).
//!
//! [`AnyStore::prune`] verifies the part of the chain it is about to delete and leaves an
//! anchor so that the rest still verifies. When that part does not verify
//! ([`custos_store::Error::ChainBroken`]), deleting it would destroy the evidence of tampering:
//! the task logs an error, sets `custos_collector_retention_halted` to 1 and stops pruning until
//! the collector is restarted (after an investigation). Other failures are retried at the next
//! interval.

use std::time::{Duration, Instant};

use chrono::Utc;
use custos_store::AnyStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::CollectorMetrics;

/// Starts the retention task; it ends when `stop` turns true (abandoning a prune in progress,
/// which the store rolls back) or when the chain is found broken.
pub(crate) fn spawn(
    store: AnyStore,
    metrics: CollectorMetrics,
    retention: Duration,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The time the last run measured ages from, and when (monotonic): what this process
        // vouches for at the next run without trusting the wall clock.
        let mut measured: Option<(chrono::DateTime<Utc>, Instant)> = None;
        loop {
            tokio::select! {
                () = crate::server::stopped(&mut stop) => return,
                _ = ticker.tick() => {}
            }
            let keep_running = tokio::select! {
                () = crate::server::stopped(&mut stop) => return,
                keep = prune_once(&store, &metrics, retention, &mut measured) => keep,
            };
            if !keep_running {
                return;
            }
        }
    })
}

/// One retention run; returns whether retention may continue. `measured`: when the last run
/// measured ages from, and when it ran (updated).
///
/// Ages are measured from the wall clock, but not beyond the later of the newest stored event
/// and what this process can vouch for: the time its first run measured from (at most the
/// newest event) plus what the monotonic clock counted since. A clock that jumps ahead cannot
/// delete the trail, and retention still deletes what ages while no events arrive.
async fn prune_once(
    store: &AnyStore,
    metrics: &CollectorMetrics,
    retention: Duration,
    measured: &mut Option<(chrono::DateTime<Utc>, Instant)>,
) -> bool {
    let now = Utc::now();
    let Some(cutoff) = chrono::TimeDelta::from_std(retention).ok().and_then(|r| now.checked_sub_signed(r))
    else {
        // Validated at start; nothing can be older than the beginning of time.
        return true;
    };
    let vouched = measured.and_then(|(base, at)| {
        chrono::TimeDelta::from_std(at.elapsed()).ok().and_then(|d| base.checked_add_signed(d))
    });
    let started = Instant::now();
    let result = store.prune_measured(cutoff, now, vouched).await;
    metrics.store_op("prune", started.elapsed());
    let result = result.map(|(report, base)| {
        *measured = Some((base, started));
        report
    });
    match result {
        Ok(report) => {
            metrics.prune_run("ok");
            metrics.pruned(report.deleted);
            if report.deleted > 0 {
                tracing::info!(
                    deleted = report.deleted,
                    anchor_seq = report.anchor.seq,
                    cutoff = %cutoff.to_rfc3339(),
                    "retention: old audit events pruned"
                );
            } else {
                tracing::debug!(cutoff = %cutoff.to_rfc3339(), "retention: nothing to prune");
            }
            true
        }
        Err(custos_store::Error::ChainBroken(broken)) => {
            metrics.prune_run("chain_broken");
            metrics.retention_halted();
            tracing::error!(
                seq = broken.seq,
                kind = ?broken.kind,
                event_id = broken.event_id.as_deref().unwrap_or(""),
                detail = %broken.detail,
                "AUDIT CHAIN BROKEN in the part retention would delete: pruning is stopped to \
                 preserve the evidence. Run `custos audit verify`, investigate, then restart the \
                 collector to resume retention."
            );
            false
        }
        Err(error) => {
            metrics.prune_run("error");
            tracing::warn!(%error, "retention: pruning failed; retrying at the next interval");
            true
        }
    }
}
