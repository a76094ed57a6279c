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
/// At most this many usage fetches per round, for each of the two quota tables.
const MAX_FETCHES_PER_ROUND: usize = 2_000;
/// Concurrent usage fetches.
const CONCURRENCY: usize = 8;

/// Runs until `shutdown` turns true.
/// `quotas`: the enforced ones and the dry runs' (Audit-mode policies beside enforcing ones),
/// each merged with the cluster-wide usage of its own active principals (the collector
/// counts a dry run its quotas counted, `charged` in the event, under its rule).
pub(crate) async fn run(
    [quotas, dry_run_quotas]: [Arc<Quotas>; 2],
    client: Option<(Arc<UsageClient>, String)>,
    config: Arc<ConfigCell>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    // Where the last round stopped (all its pairs done, or the deadline cut it): for the
    // enforced quotas and for the dry runs'.
    let mut resume_after: [Option<(String, String)>; 2] = [None, None];
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        // `wait_for`, not `changed`: a shutdown seen (and marked seen) by `sync_round` must
        // still end the loop.
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = ticker.tick() => {}
        }
        let now = crate::quota_clock::quota_time(SystemTime::now());
        quotas.evict_idle(now);
        dry_run_quotas.evict_idle(now);
        let Some((client, instance)) = &client else { continue };
        let Some(namespace) = config.current.load().as_ref().map(|s| s.namespace.clone()) else { continue };
        // A round never runs into the next: a collector that hangs costs one interval. The
        // enforced quotas first, within three quarters of it while dry runs wait their turn
        // (so that a slow collector leaves them a share); the dry runs' with what is left.
        let start = tokio::time::Instant::now();
        let pairs = [&quotas, &dry_run_quotas].map(|table| table.active_principals(now, ACTIVE_WITHIN));
        let enforced_share = if pairs[1].is_empty() { interval } else { interval.mul_f64(0.75) };
        let deadlines = [start + enforced_share, start + interval];
        let mut failures = 0;
        for (i, (table, pairs)) in [&quotas, &dry_run_quotas].into_iter().zip(pairs).enumerate() {
            if pairs.len() > MAX_FETCHES_PER_ROUND {
                tracing::warn!(
                    active = pairs.len(),
                    per_round = MAX_FETCHES_PER_ROUND,
                    "more active principals than one round fetches: cluster usage fetched in turns"
                );
            }
            let pairs = this_round(pairs, resume_after[i].as_ref(), MAX_FETCHES_PER_ROUND);
            let round =
                sync_round(table, client, &namespace, instance, pairs, deadlines[i], &mut shutdown).await;
            if round.resume_after.is_some() {
                resume_after[i] = round.resume_after;
            }
            failures += round.failures;
            if round.cut {
                tracing::warn!("cluster usage round cut at the sync interval: the collector answers slowly");
            }
            if *shutdown.borrow() {
                return;
            }
        }
        if failures > 0 {
            metrics.usage_sync_failures.inc_by(failures);
            tracing::warn!(
                failures,
                "cluster usage fetch failed; enforcing local counts (and the last figures)"
            );
        }
    }
}

/// The (policy, principal) pairs of one round, from the sorted active `pairs`: at most `max`
/// of them, starting after `resume_after` (the last pair the previous round started: its last
/// pair, or the last it reached when its deadline cut it) and wrapping around, so that every
/// active principal has its turn however many there are and however slowly the collector
/// answers: neither a flood of principals nor a slow collector may leave the same ones
/// without cluster figures round after round.
fn this_round(
    pairs: Vec<(String, String)>,
    resume_after: Option<&(String, String)>,
    max: usize,
) -> Vec<(String, String)> {
    let start = resume_after.map_or(0, |last| pairs.partition_point(|p| p <= last));
    let take = max.min(pairs.len());
    pairs.iter().cycle().skip(start).take(take).cloned().collect()
}

/// How a round went.
struct Round {
    /// Fetches that failed.
    failures: u64,
    /// Where the next round starts after: the last pair whose fetch was started (`None`: none
    /// was). A cut round's fetches still in flight have their turn in the next cycle through
    /// the pairs; resuming before them instead would let one slow pair hold every round.
    resume_after: Option<(String, String)>,
    /// The deadline ended the round before every fetch was done.
    cut: bool,
}

/// Fetches and applies the usage of `pairs`, until `deadline`.
async fn sync_round(
    quotas: &Arc<Quotas>,
    client: &Arc<UsageClient>,
    namespace: &str,
    instance: &str,
    pairs: Vec<(String, String)>,
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Round {
    let mut round = Round { failures: 0, resume_after: None, cut: false };
    let mut tasks = JoinSet::new();
    let mut pending = pairs.into_iter();
    loop {
        while tasks.len() < CONCURRENCY {
            let Some((policy, principal)) = pending.next() else { break };
            round.resume_after = Some((policy.clone(), principal.clone()));
            let (client, quotas, namespace) = (client.clone(), quotas.clone(), namespace.to_string());
            let instance = instance.to_owned();
            tasks.spawn(async move {
                let mut usage = client
                    .fetch(&namespace, &policy, &principal, Some(&instance))
                    .await
                    .map_err(|e| e.to_string())?;
                // Figures without this process's events only for its own tag.
                if usage.instance.as_deref() != Some(instance.as_str()) {
                    usage.rules_without_instance = None;
                }
                let as_of = chrono::DateTime::parse_from_rfc3339(&usage.as_of)
                    .map_err(|_| "usage asOf is not RFC 3339".to_string())?;
                let as_of = Timestamp::from_millis(u64::try_from(as_of.timestamp_millis()).unwrap_or(0));
                quotas.apply_cluster_usage(
                    &policy,
                    &principal,
                    &usage,
                    as_of,
                    crate::quota_clock::quota_time(SystemTime::now()),
                );
                Ok::<(), String>(())
            });
        }
        let joined = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {
                tasks.abort_all();
                return round;
            }
            () = tokio::time::sleep_until(deadline) => {
                tasks.abort_all();
                round.cut = true;
                return round;
            }
            joined = tasks.join_next() => joined,
        };
        match joined {
            None => return round,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                tracing::debug!(error = %e, "cluster usage fetch failed");
                round.failures += 1;
            }
            Some(Err(_)) => round.failures += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pairs(n: usize) -> Vec<(String, String)> {
        (0..n).map(|i| ("p".to_string(), format!("user:{i:03}"))).collect()
    }

    /// A collector that accepts and never answers costs a round no more than its deadline
    /// (the client's own time-out here is far longer).
    #[tokio::test]
    async fn a_round_ends_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let client = Arc::new(UsageClient::new(url, None, Duration::from_secs(60)).unwrap());
        let quotas = Arc::new(Quotas::new(custos_quota::QuotaSettings::default()));
        let (_stop, mut shutdown) = watch::channel(false);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        let round = tokio::time::timeout(
            Duration::from_secs(30),
            sync_round(&quotas, &client, "shop", "01ABCDEF", pairs(20), deadline, &mut shutdown),
        )
        .await
        .expect("the round ended at its deadline, not at the client's time-out");
        assert!(round.cut);
        assert_eq!(round.resume_after, Some(("p".to_string(), "user:007".to_string())), "8 at a time");
        holder.abort();
    }

    /// A collector that answers each `/v1/usage` after `delay`, echoing the pair asked about
    /// with no usage; returns its address and the principals it answered, in order.
    async fn slow_collector(delay: Duration) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = answered.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (read, mut write) = conn.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let Some(target) = line.strip_prefix("GET ") else { continue };
                        let principal = target
                            .split(['?', '&', ' '])
                            .find_map(|kv| kv.strip_prefix("principal="))
                            .unwrap()
                            .replace("%3A", ":");
                        while let Ok(Some(header)) = lines.next_line().await {
                            if header.is_empty() {
                                break;
                            }
                        }
                        tokio::time::sleep(delay).await;
                        let body = serde_json::json!({
                            "policy": "p", "principal": principal,
                            "asOf": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            "rules": {}
                        })
                        .to_string();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        log.lock().unwrap().push(principal);
                        if write.write_all((head + &body).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, answered)
    }

    /// A collector too slow for one round to fetch every active pair: the next round starts
    /// after the last pair it started, so that rounds take turns through all of them (before,
    /// each round started at the first pair again and the same ones were never fetched).
    #[tokio::test]
    async fn rounds_cut_by_a_slow_collector_take_turns() {
        let (url, answered) = slow_collector(Duration::from_millis(150)).await;
        let client = Arc::new(UsageClient::new(url, None, Duration::from_secs(60)).unwrap());
        let quotas = Arc::new(Quotas::new(custos_quota::QuotaSettings::default()));
        let (_stop, mut shutdown) = watch::channel(false);
        let all = pairs(40);
        let mut resume_after = None;
        for _ in 0..8 {
            let round_pairs = this_round(all.clone(), resume_after.as_ref(), MAX_FETCHES_PER_ROUND);
            // Room for one wave of 8 fetches, not two.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
            let round =
                sync_round(&quotas, &client, "shop", "01ABCDEF", round_pairs, deadline, &mut shutdown).await;
            assert!(round.cut);
            if round.resume_after.is_some() {
                resume_after = round.resume_after;
            }
        }
        let answered: std::collections::BTreeSet<String> = answered.lock().unwrap().iter().cloned().collect();
        let missing: Vec<_> = all.iter().filter(|(_, principal)| !answered.contains(principal)).collect();
        assert!(missing.is_empty(), "never fetched: {missing:?}");
    }

    /// Past the per-round cap, rounds take turns through every active pair, and a pair set
    /// that changed between rounds resumes after the last pair started.
    #[test]
    fn rounds_take_turns_through_every_active_principal() {
        assert_eq!(this_round(pairs(3), None, 5), pairs(3), "all fit");
        let three = pairs(3);
        assert_eq!(
            this_round(three.clone(), Some(&three[0]), 5),
            [&three[1..], &three[..1]].concat(),
            "all fit, resumed after the first"
        );
        let all = pairs(10);
        let first = this_round(all.clone(), None, 4);
        assert_eq!(first, all[0..4]);
        let second = this_round(all.clone(), first.last(), 4);
        assert_eq!(second, all[4..8]);
        let third = this_round(all.clone(), second.last(), 4);
        assert_eq!(third, [&all[8..10], &all[0..2]].concat(), "wraps around");
        // The pair the last round ended on is gone: resume after where it sorted.
        let mut fewer = all.clone();
        fewer.remove(5);
        let gone = ("p".to_string(), "user:005".to_string());
        assert_eq!(this_round(fewer.clone(), Some(&gone), 4), fewer[5..9]);
        // Every pair is visited within ceil(n / max) rounds.
        let mut seen = std::collections::BTreeSet::new();
        let mut last = None;
        for _ in 0..3 {
            let round = this_round(all.clone(), last.as_ref(), 4);
            last = round.last().cloned();
            seen.extend(round);
        }
        assert_eq!(seen.len(), 10);
    }
}
