//! The quota state of one (policy, rule, principal) key and its decisions.

use std::time::Duration;

use custos_api::collector::RuleUsage;
use custos_api::policy::Limits;

use crate::window::{DAY, HOUR, MINUTE_MS, REQUESTS, SECOND_MS, Spec, Window};
use crate::{Exceeded, LimitKind};

/// Bucket units per token. A bucket of `requestsPerMinute = L` holds up to `L * TOKEN` units
/// and refills `L` units per millisecond, i.e. `L` tokens per minute, in exact integers.
pub(crate) const TOKEN: u64 = MINUTE_MS;

/// The limits that concern this crate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Configured {
    pub rpm: Option<u32>,
    pub per_hour: Option<u64>,
    pub per_day: Option<u64>,
}

impl Configured {
    pub(crate) fn from_limits(limits: &Limits) -> Configured {
        Configured {
            rpm: limits.requests_per_minute,
            per_hour: limits.records_per_hour,
            per_day: limits.records_per_day,
        }
    }

    pub(crate) fn is_empty(self) -> bool {
        self.rpm.is_none() && self.per_hour.is_none() && self.per_day.is_none()
    }

    pub(crate) fn counts_records(self) -> bool {
        self.per_hour.is_some() || self.per_day.is_some()
    }
}

/// The request token bucket, in [`TOKEN`] units, as of `at` (ms).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: u64,
    at: u64,
}

/// The other replicas' usage, derived from the collector's cluster-wide figures as of `as_of`
/// (ms): cluster figure minus this replica's own count of the same window, floored at zero, or
/// the figure without this replica's events where that is larger (see the crate docs).
#[derive(Clone, Copy, Debug)]
struct Others {
    as_of: u64,
    requests: u64,
    hour: u64,
    day: u64,
}

impl Others {
    fn fresh(&self, spec: Spec, now: u64) -> bool {
        self.as_of.saturating_add(spec.length) > now
    }

    fn requests(&self, now: u64) -> u64 {
        if self.fresh(REQUESTS, now) { self.requests } else { 0 }
    }

    fn records(&self, spec: Spec, now: u64) -> u64 {
        let n = if spec.length == HOUR.length { self.hour } else { self.day };
        if self.fresh(spec, now) { n } else { 0 }
    }

    /// Whether any of the figures still counts at `now`.
    fn live(&self, now: u64) -> bool {
        self.requests(now) > 0 || self.records(HOUR, now) > 0 || self.records(DAY, now) > 0
    }
}

/// Everything one replica knows about one key.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Last admit/record (ms); 0 for a key only known from cluster usage.
    pub last_seen: u64,
    /// The limits of the last admit/record.
    limits: Configured,
    bucket: Option<Bucket>,
    /// Requests admitted here (only while `requestsPerMinute` is configured).
    requests: Window,
    /// Records returned here (only while `recordsPerHour` is configured).
    hour: Window,
    /// Records returned here (only while `recordsPerDay` is configured).
    day: Window,
    others: Option<Others>,
}

/// The bucket's level at `now` (pure): refilled at `limit - others` units/ms while the other
/// replicas' requests count, at `limit` units/ms after, capped at `limit * TOKEN`. A clock
/// going backwards refills nothing.
fn level_at(bucket: &Bucket, rpm: u32, others: Option<&Others>, now: u64) -> u64 {
    let limit = u64::from(rpm);
    let cap = limit.saturating_mul(TOKEN);
    let mut level = bucket.level.min(cap);
    if now <= bucket.at {
        return level;
    }
    let mut t = bucket.at;
    if let Some(o) = others {
        let until = o.as_of.saturating_add(REQUESTS.length);
        if o.requests > 0 && until > t {
            let end = until.min(now);
            let rate = limit.saturating_sub(o.requests);
            level = level.saturating_add(rate.saturating_mul(end - t)).min(cap);
            t = end;
        }
    }
    level.saturating_add(limit.saturating_mul(now - t)).min(cap)
}

/// Milliseconds until the bucket (at `level` now) admits a request: its level must reach
/// `(others + 1)` tokens while the others' requests count, one token after.
fn rpm_wait(level: u64, rpm: u32, others: Option<&Others>, now: u64) -> u64 {
    let limit = u64::from(rpm);
    if limit == 0 {
        return REQUESTS.length;
    }
    let cap = limit.saturating_mul(TOKEN);
    let mut level = level;
    let mut t = now;
    if let Some(o) = others {
        let until = o.as_of.saturating_add(REQUESTS.length);
        if o.requests > 0 && until > now {
            let target = o.requests.saturating_add(1).saturating_mul(TOKEN);
            if level >= target {
                return 0;
            }
            let rate = limit.saturating_sub(o.requests);
            if rate > 0 && target <= cap {
                let wait = (target - level).div_ceil(rate);
                if wait <= until - now {
                    return wait;
                }
            }
            level = level.saturating_add(rate.saturating_mul(until - now)).min(cap);
            t = until;
        }
    }
    let after = if level >= TOKEN { 0 } else { (TOKEN - level).div_ceil(limit) };
    (t - now).saturating_add(after)
}

/// Milliseconds until at least one record is free under `limit`, given the local buckets and
/// the others' figure (which counts until `others_expiry`).
fn records_wait(window: &Window, spec: Spec, limit: u64, others: u64, others_expiry: u64, now: u64) -> u64 {
    if limit == 0 {
        return spec.length;
    }
    let used = window.used(spec, now).saturating_add(others);
    let need = used.saturating_sub(limit).saturating_add(1);
    let mut events: Vec<(u64, u64)> = window.expiries(spec, now).collect();
    if others > 0 {
        events.push((others_expiry, others));
    }
    events.sort_unstable();
    let mut freed = 0u64;
    for (at, count) in events {
        freed = freed.saturating_add(count);
        if freed >= need {
            return at.saturating_sub(now);
        }
    }
    // Unreachable while `limit >= 1`: once everything has expired, nothing is used.
    spec.length
}

/// Whole seconds, rounded up, at least one.
fn retry_after(ms: u64) -> Duration {
    Duration::from_secs(ms.div_ceil(SECOND_MS).max(1))
}

fn keep_longest(refusal: &mut Option<Exceeded>, limit: LimitKind, wait_ms: u64) {
    let candidate = Exceeded { limit, retry_after: retry_after(wait_ms) };
    match refusal {
        Some(r) if r.retry_after >= candidate.retry_after => {}
        _ => *refusal = Some(candidate),
    }
}

impl Entry {
    pub(crate) fn new(last_seen: u64) -> Entry {
        Entry {
            last_seen,
            limits: Configured::default(),
            bucket: None,
            requests: Window::default(),
            hour: Window::default(),
            day: Window::default(),
            others: None,
        }
    }

    fn touch(&mut self, limits: Configured, now: u64) {
        self.limits = limits;
        self.last_seen = self.last_seen.max(now);
        self.prune(now);
    }

    fn prune(&mut self, now: u64) {
        self.requests.prune(REQUESTS, now);
        self.hour.prune(HOUR, now);
        self.day.prune(DAY, now);
    }

    /// Brings the bucket to `now` under the current figures.
    fn settle(&mut self, now: u64) {
        if let (Some(rpm), Some(bucket)) = (self.limits.rpm, self.bucket.as_mut()) {
            bucket.level = level_at(bucket, rpm, self.others.as_ref(), now);
            bucket.at = bucket.at.max(now);
        }
    }

    /// Counts one request (unless `count` is false) if every limit allows it; see the crate
    /// docs.
    pub(crate) fn admit(
        &mut self,
        limits: Configured,
        now: u64,
        count: bool,
    ) -> Result<Option<u64>, Exceeded> {
        self.touch(limits, now);
        let mut refusal = None;
        if let Some(rpm) = limits.rpm {
            let full = u64::from(rpm).saturating_mul(TOKEN);
            self.bucket.get_or_insert(Bucket { level: full, at: now });
            self.settle(now);
            let level = self.bucket.map_or(0, |b| b.level);
            let others = self.others.map_or(0, |o| o.requests(now));
            if rpm == 0 || level < others.saturating_add(1).saturating_mul(TOKEN) {
                keep_longest(
                    &mut refusal,
                    LimitKind::RequestsPerMinute,
                    rpm_wait(level, rpm, self.others.as_ref(), now),
                );
            }
        }
        let mut remaining: Option<u64> = None;
        for (limit, kind, window, spec) in [
            (limits.per_hour, LimitKind::RecordsPerHour, &self.hour, HOUR),
            (limits.per_day, LimitKind::RecordsPerDay, &self.day, DAY),
        ] {
            let Some(limit) = limit else { continue };
            let (others, others_expiry) =
                self.others.map_or((0, 0), |o| (o.records(spec, now), o.as_of.saturating_add(spec.length)));
            let left = limit.saturating_sub(window.used(spec, now).saturating_add(others));
            if left == 0 {
                keep_longest(
                    &mut refusal,
                    kind,
                    records_wait(window, spec, limit, others, others_expiry, now),
                );
            }
            remaining = Some(remaining.map_or(left, |r| r.min(left)));
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        if !count {
            return Ok(remaining);
        }
        if let Some(bucket) = self.bucket.as_mut().filter(|_| limits.rpm.is_some()) {
            bucket.level = bucket.level.saturating_sub(TOKEN);
            self.requests.add(REQUESTS, now, 1);
        }
        Ok(remaining)
    }

    /// Counts `records` returned at `now` in the configured record windows.
    pub(crate) fn record(&mut self, limits: Configured, records: u64, now: u64) {
        self.touch(limits, now);
        if limits.per_hour.is_some() {
            self.hour.add(HOUR, now, records);
        }
        if limits.per_day.is_some() {
            self.day.add(DAY, now, records);
        }
    }

    /// Whether `usage` as of `as_of` has anything that would count at `now`.
    pub(crate) fn usage_counts(usage: &RuleUsage, as_of: u64, now: u64) -> bool {
        let as_of = as_of.min(now);
        let fresh = |spec: Spec| as_of.saturating_add(spec.length) > now;
        (fresh(REQUESTS) && usage.requests_last_minute > 0)
            || (fresh(HOUR) && usage.records_last_hour > 0)
            || (fresh(DAY) && usage.records_last_day > 0)
    }

    /// Replaces the others' figures with those derived from `usage` (cluster-wide, as of
    /// `as_of`), unless the usage held is as recent or this one is stale in every window.
    pub(crate) fn apply(
        &mut self,
        usage: &RuleUsage,
        without_own: Option<&RuleUsage>,
        as_of: u64,
        now: u64,
    ) -> bool {
        let as_of = as_of.min(now);
        if self.others.is_some_and(|o| o.as_of >= as_of) {
            return false;
        }
        let fresh = |spec: Spec| as_of.saturating_add(spec.length) > now;
        if !fresh(REQUESTS) && !fresh(HOUR) && !fresh(DAY) {
            return false;
        }
        // The bucket refilled at the old rate until now; the new figures apply from now on.
        self.settle(now);
        self.prune(now);
        // The cluster's figure less what this replica counted by `as_of`; or, where the
        // collector also gave the figure without this replica's own events, the larger of the
        // two: the latter is not lowered by this replica's events it does not have yet, the
        // former still holds its own events that this replica no longer counts (an entry
        // evicted, a limit added since, a table it was not counted in).
        let others = |spec: Spec, cluster: u64, without_own: Option<u64>, local: &Window| {
            if !fresh(spec) {
                return 0;
            }
            cluster.saturating_sub(local.used_at(spec, as_of)).max(without_own.unwrap_or(0))
        };
        self.others = Some(Others {
            as_of,
            requests: others(
                REQUESTS,
                usage.requests_last_minute,
                without_own.map(|w| w.requests_last_minute),
                &self.requests,
            ),
            hour: others(HOUR, usage.records_last_hour, without_own.map(|w| w.records_last_hour), &self.hour),
            day: others(DAY, usage.records_last_day, without_own.map(|w| w.records_last_day), &self.day),
        });
        true
    }

    /// Whether forgetting this entry changes no future decision: a full bucket, nothing in any
    /// window (retention included), no cluster figure that still counts.
    pub(crate) fn is_lossless(&self, now: u64) -> bool {
        let bucket_full = match (self.limits.rpm, &self.bucket) {
            (Some(rpm), Some(bucket)) => {
                level_at(bucket, rpm, self.others.as_ref(), now) >= u64::from(rpm).saturating_mul(TOKEN)
            }
            _ => true,
        };
        bucket_full
            && self.requests.is_clear(REQUESTS, now)
            && self.hour.is_clear(HOUR, now)
            && self.day.is_clear(DAY, now)
            && !self.others.is_some_and(|o| o.live(now))
    }

    /// Whether a request now would be refused (by the limits of the last admit/record).
    pub(crate) fn is_exhausted(&self, now: u64) -> bool {
        if let (Some(rpm), Some(bucket)) = (self.limits.rpm, &self.bucket) {
            let others = self.others.map_or(0, |o| o.requests(now));
            if level_at(bucket, rpm, self.others.as_ref(), now)
                < others.saturating_add(1).saturating_mul(TOKEN)
            {
                return true;
            }
        }
        [(self.limits.per_hour, &self.hour, HOUR), (self.limits.per_day, &self.day, DAY)].into_iter().any(
            |(limit, window, spec)| {
                limit.is_some_and(|limit| {
                    let others = self.others.map_or(0, |o| o.records(spec, now));
                    window.used(spec, now).saturating_add(others) >= limit
                })
            },
        )
    }

    /// Eviction rank under memory pressure, lowest evicted first: 0 = nothing to lose,
    /// 1 = has usage, 2 = currently refused.
    pub(crate) fn rank(&self, now: u64) -> u8 {
        if self.is_lossless(now) {
            0
        } else if self.is_exhausted(now) {
            2
        } else {
            1
        }
    }

    /// Drops expired buckets and gives back spare memory.
    pub(crate) fn compact(&mut self, now: u64) {
        self.prune(now);
        self.requests.shrink();
        self.hour.shrink();
        self.day.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_wait_without_others() {
        // rpm 3: one token every 20 s.
        assert_eq!(rpm_wait(0, 3, None, 0), 20_000);
        assert_eq!(rpm_wait(TOKEN - 3, 3, None, 0), 1);
        assert_eq!(rpm_wait(TOKEN, 3, None, 0), 0);
        assert_eq!(rpm_wait(0, 0, None, 0), MINUTE_MS);
    }

    #[test]
    fn rpm_wait_with_others() {
        let o = Others { as_of: 0, requests: 2, hour: 0, day: 0 };
        // limit 6, others 2: refill at 4 units/ms, need 3 tokens.
        assert_eq!(rpm_wait(0, 6, Some(&o), 0), 3 * TOKEN / 4);
        // limit 2, others 2: no refill while the others count; after 60 s need one token at 2/ms.
        assert_eq!(rpm_wait(0, 2, Some(&o), 0), MINUTE_MS + TOKEN / 2);
        let b = Bucket { level: 0, at: 0 };
        assert_eq!(level_at(&b, 2, Some(&o), MINUTE_MS), 0);
        assert_eq!(level_at(&b, 2, Some(&o), MINUTE_MS + 1_000), 2_000);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after(0), Duration::from_secs(1));
        assert_eq!(retry_after(1), Duration::from_secs(1));
        assert_eq!(retry_after(20_000), Duration::from_secs(20));
        assert_eq!(retry_after(20_001), Duration::from_secs(21));
    }
}
