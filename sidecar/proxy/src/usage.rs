//! Cluster-wide quotas: every few seconds, the usage of the principals active here is fetched
//! from the collector and merged into the local quotas, so that N replicas cannot be farmed.
//! The same task evicts idle quota keys.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use custos_quota::{Quotas, Timestamp};
use custos_shipper::UsageClient;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::state::ConfigCell;

/// Principals active within this window get their cluster usage fetched.
const ACTIVE_WITHIN: Duration = Duration::from_secs(600);
/// At most this many usage fetches per round.
const MAX_FETCHES_PER_ROUND: usize = 2_000;
/// Concurrent usage fetches.
const CONCURRENCY: usize = 8;

/// Runs until `shutdown` turns true.
pub(crate) async fn run(
    quotas: Arc<Quotas>,
    client: Option<Arc<UsageClient>>,
    config: Arc<ConfigCell>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        // `wait_for`, not `changed`: a shutdown seen (and marked seen) by `sync_round` must
        // still end the loop.
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = ticker.tick() => {}
        }
        let now = Timestamp::from(SystemTime::now());
        quotas.evict_idle(now);
        let Some(client) = &client else { continue };
        let Some(namespace) = config.current.load().as_ref().map(|s| s.namespace.clone()) else { continue };
        let mut pairs = quotas.active_principals(now, ACTIVE_WITHIN);
        if pairs.len() > MAX_FETCHES_PER_ROUND {
            tracing::warn!(
                active = pairs.len(),
                "too many active principals: cluster usage fetched for the first ones only"
            );
            pairs.truncate(MAX_FETCHES_PER_ROUND);
        }
        let failures = sync_round(&quotas, client, &namespace, pairs, &mut shutdown).await;
        if failures > 0 {
            metrics.usage_sync_failures.inc_by(failures);
            tracing::warn!(
                failures,
                "cluster usage fetch failed; enforcing local counts (and the last figures)"
            );
        }
    }
}

/// Fetches and applies the usage of `pairs`; returns the number of failed fetches.
async fn sync_round(
    quotas: &Arc<Quotas>,
    client: &Arc<UsageClient>,
    namespace: &str,
    pairs: Vec<(String, String)>,
    shutdown: &mut watch::Receiver<bool>,
) -> u64 {
    let mut failures = 0;
    let mut tasks = JoinSet::new();
    let mut pending = pairs.into_iter();
    loop {
        while tasks.len() < CONCURRENCY {
            let Some((policy, principal)) = pending.next() else { break };
            let (client, quotas, namespace) = (client.clone(), quotas.clone(), namespace.to_string());
            tasks.spawn(async move {
                let usage = client.fetch(&namespace, &policy, &principal).await.map_err(|e| e.to_string())?;
                let as_of = chrono::DateTime::parse_from_rfc3339(&usage.as_of)
                    .map_err(|_| "usage asOf is not RFC 3339".to_string())?;
                let as_of = Timestamp::from_millis(u64::try_from(as_of.timestamp_millis()).unwrap_or(0));
                quotas.apply_cluster_usage(
                    &policy,
                    &principal,
                    &usage,
                    as_of,
                    Timestamp::from(SystemTime::now()),
                );
                Ok::<(), String>(())
            });
        }
        let joined = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {
                tasks.abort_all();
                return failures;
            }
            joined = tasks.join_next() => joined,
        };
        match joined {
            None => return failures,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                tracing::debug!(error = %e, "cluster usage fetch failed");
                failures += 1;
            }
            Some(Err(_)) => failures += 1,
        }
    }
}
