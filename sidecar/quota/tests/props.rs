//! Property tests: the token bucket against its closed form, and the record windows.
#![allow(clippy::unwrap_used)]

mod support;

use custos_quota::{LimitKind, QuotaSettings, Quotas};
use proptest::prelude::*;
use support::*;

/// One token in bucket units: a bucket of `L` requests per minute refills `L` units per ms.
const TOKEN: u64 = 60_000;

/// Whether a token bucket (capacity `l`, `l` per minute, full at the start) that admitted
/// requests at `admitted` (ms, in order) has a token at `t`: for every admitted request `j`,
/// `l + l·(t − a_j)/60 s − #admitted since a_j ≥ 1`.
fn bucket_has_token(l: u64, admitted: &[u64], t: u64) -> bool {
    admitted.iter().enumerate().all(|(j, &a)| {
        let since = (admitted.len() - j) as u64;
        l * TOKEN + l * (t - a) >= (since + 1) * TOKEN
    })
}

/// Records served in the window of `length` ms ending at `t`, and the size of the last
/// non-empty response in it.
fn window(log: &[(u64, u64)], length: u64, t: u64) -> (u64, u64) {
    let mut inside = log.iter().filter(|&&(at, _)| at <= t && at + length > t);
    let sum = inside.clone().map(|&(_, n)| n).sum();
    let last = inside.rfind(|&&(_, n)| n > 0).map_or(0, |&(_, n)| n);
    (sum, last)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Admission matches the closed form of a token bucket exactly, and Retry-After is at
    /// least 1 s and at most the time to refill one token.
    #[test]
    fn bucket_matches_closed_form(
        l in 1u32..8,
        steps in proptest::collection::vec((0u64..40_000, 1usize..5), 1..60),
    ) {
        let q = Quotas::new(QuotaSettings::default());
        let k = key("user:alice");
        let lim = limits(Some(l), None, None);
        let mut admitted = Vec::new();
        let mut t = 0;
        for (dt, burst) in steps {
            t += dt;
            for _ in 0..burst {
                let expected = bucket_has_token(u64::from(l), &admitted, t);
                match q.admit(&k, &lim, at_ms(t)) {
                    Ok(a) => {
                        prop_assert!(expected, "admitted at {t} after {admitted:?}");
                        prop_assert_eq!(a.records_remaining, None);
                        admitted.push(t);
                    }
                    Err(e) => {
                        prop_assert!(!expected, "refused at {t} after {admitted:?}");
                        prop_assert_eq!(e.limit, LimitKind::RequestsPerMinute);
                        let wait = e.retry_after.as_millis() as u64;
                        prop_assert!(wait >= 1_000 && wait <= (60_000u64).div_ceil(u64::from(l)).div_ceil(1_000) * 1_000);
                        // Retry-After is enough: a token is there then.
                        prop_assert!(bucket_has_token(u64::from(l), &admitted, t + wait));
                    }
                }
            }
        }
    }

    /// Callers that cut responses to `records_remaining` never exceed a limit in any rolling
    /// hour or day; callers that do not exceed it by less than their last response.
    #[test]
    fn record_windows_hold(
        per_hour in 1u64..60,
        per_day in 1u64..200,
        truncate in any::<bool>(),
        steps in proptest::collection::vec((0u64..1_500_000, 0u64..25), 1..120),
    ) {
        let q = Quotas::new(QuotaSettings::default());
        let k = key("user:alice");
        let lim = limits(None, Some(per_hour), Some(per_day));
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut t = 0;
        for (dt, want) in steps {
            t += dt;
            let Ok(a) = q.admit(&k, &lim, at_ms(t)) else { continue };
            let left = a.records_remaining.unwrap();
            prop_assert!(left >= 1);
            let n = if truncate { want.min(left) } else { want };
            q.record(&k, &lim, n, at_ms(t));
            log.push((t, n));
            for (length, limit) in [(3_600_000, per_hour), (86_400_000, per_day)] {
                let (sum, last) = window(&log, length, t);
                if truncate {
                    prop_assert!(sum <= limit, "{sum} > {limit} in {length} ms to {t}: {log:?}");
                } else {
                    prop_assert!(sum < limit + last.max(1), "{sum} vs {limit} + {last} in {length} ms to {t}");
                }
            }
        }
    }

    /// Three replicas, a crawler hopping between them, usage reported before every request:
    /// the cluster never serves more than the limit in any exact rolling hour or day.
    #[test]
    fn replicas_hold_the_limit_together(
        per_hour in 1u64..60,
        per_day in 1u64..200,
        steps in proptest::collection::vec((0u64..1_500_000, 0usize..3, 0u64..25), 1..100),
    ) {
        let replicas: Vec<Quotas> = (0..3).map(|_| Quotas::new(QuotaSettings::default())).collect();
        let mut collector = Collector::default();
        let k = key("user:alice");
        let lim = limits(None, Some(per_hour), Some(per_day));
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut t = 0;
        for (dt, r, want) in steps {
            t += dt;
            let now = at_ms(t);
            let usage = collector.usage("customer-api", "user:alice", now);
            for replica in &replicas {
                replica.apply_cluster_usage("customer-api", "user:alice", &usage, now, now);
            }
            let Ok(a) = replicas[r].admit(&k, &lim, now) else { continue };
            let n = want.min(a.records_remaining.unwrap());
            replicas[r].record(&k, &lim, n, now);
            collector.records("read", n, now);
            log.push((t, n));
            for (length, limit) in [(3_600_000, per_hour), (86_400_000, per_day)] {
                let (sum, _) = window(&log, length, t);
                prop_assert!(sum <= limit, "{sum} > {limit} in {length} ms to {t}");
            }
        }
    }
}
