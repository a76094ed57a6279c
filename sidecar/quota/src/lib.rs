//! Custos sidecar: per-principal request and record quotas, local windows merged with
//! cluster-wide usage.
//!
//! Pure and synchronous: no I/O, no clock, no async. Every call takes the current time as a
//! [`Timestamp`] (milliseconds since the Unix epoch), so decisions are deterministic.
//!
//! # Keys
//!
//! Usage is counted per [`QuotaKey`] = (policy, rule, principal), with the limits of the rule
//! ([`custos_api::policy::Limits`]). The principal is `user:<id>`, `workload:<ns>/<sa>` or
//! `peer:<ip>` (see docs/policy-guide.md, "Limits and principals"); two rules never share
//! counters. A rule with none of `requestsPerMinute`, `recordsPerHour`, `recordsPerDay` costs
//! nothing: [`Quotas::admit`] returns `records_remaining: None` and tracks nothing.
//! `maxRecordsPerResponse` is applied by the response transform, not here.
//!
//! # `requestsPerMinute = L`: a token bucket
//!
//! Capacity `L` tokens, refilled continuously at `L` tokens per minute (`L/60` per second),
//! full when the key is first seen. Each admitted request takes one token; a request finding
//! less than one token is refused with [`LimitKind::RequestsPerMinute`] and does not take
//! one. So exactly `L` requests pass in a burst, the next is refused, and Retry-After is the
//! time until one token is back (`60/L` seconds after a burst), rounded up to whole seconds,
//! at least 1 s. Arithmetic is exact (integers, 1 token = 60,000 units refilled `L` units per
//! millisecond). Refused requests cost nothing, under any limit.
//!
//! # `recordsPerHour`, `recordsPerDay`: rolling windows
//!
//! Records passed to [`Quotas::record`] are counted in time buckets: one-minute buckets for the
//! hour, fifteen-minute buckets for the day. A bucket's records count until one window length
//! after the bucket's *end*: a record counts for at least one hour (day) and at most 1 h 1 min
//! (24 h 15 min) — the windows never let a record go early. [`Quotas::admit`] refuses with
//! [`LimitKind::RecordsPerHour`] / [`LimitKind::RecordsPerDay`] when nothing is left in a window;
//! Retry-After is the time until enough of the oldest buckets expire to free at least one
//! record. Otherwise it returns, in [`Admission::records_remaining`], the smaller of what is
//! left in the two windows, and the sidecar cuts the response to that many records. A caller
//! that does so never takes a principal past its limit (in one replica, one request at a
//! time); one that does not overshoots by at most its last response. Counts saturate, they
//! never wrap.
//!
//! When several limits refuse a request, the error names the one with the longest wait, so
//! that Retry-After is when the request can pass (unless other usage arrives meanwhile).
//!
//! # Cluster-wide usage
//!
//! Each replica counts its own requests and records. Every few seconds the sidecar fetches,
//! for the [`Quotas::active_principals`], the collector's cluster-wide figures per rule as of
//! `asOf` (requests in the minute, records in the hour and day ending at `asOf`; these include
//! this replica's own events up to `asOf`), and passes them to [`Quotas::apply_cluster_usage`].
//! For each window, the *other replicas' usage* is
//!
//! ```text
//! others = max(0, cluster(asOf) - local(asOf))
//! ```
//!
//! where `local(asOf)` is this replica's own count of the same window ending at `asOf` (from
//! its buckets, which are kept a little past the window for that purpose). A collector that
//! can also count without this replica's own events (the sidecar names its instance tag,
//! which its event ids carry; the answer's `rulesWithoutInstance`) gives `without_own`, and
//!
//! ```text
//! others = max(cluster(asOf) - local(asOf), without_own(asOf))
//! ```
//!
//! `without_own` is not lowered by this replica's events the collector does not have yet
//! (queued, spooled), which `cluster - local` is; `cluster - local` still holds this replica's
//! delivered events that its own counts no longer do (a key evicted, a limit added by a
//! reload, a request counted in the other of the two tables), which `without_own` does not. `others` is held
//! until `asOf + window length` or until a more recent report replaces it. Then:
//!
//! - **records**: `used(now) = local(now) + others`, i.e. the cluster figure plus what this
//!   replica counted after `asOf` (minus its own records that expired since). It is never
//!   less than the local count, and with one replica (`cluster <= local`) `others = 0`: the
//!   replica behaves exactly as without a collector.
//! - **requests**: the other replicas' `others` requests of the last minute hold `others`
//!   tokens of this replica's bucket (a request needs `others + 1` tokens present, and takes
//!   one), and the bucket refills at `L - others` tokens per minute instead of `L` while they
//!   count. A crawler spread over N replicas is then held, once the figures arrive, to about
//!   what a single bucket allows cluster-wide — a burst of `L`, then `L` per minute — give or
//!   take what the replicas admit between two reports. With one replica `others = 0` and
//!   nothing changes.
//!
//! Reports are applied only if more recent than the one held; `asOf` later than `now` (clock
//! skew) is taken as `now`. A figure whose window has passed (`asOf + length <= now`) is
//! ignored: requests after one minute, records after one hour / day. While the collector is
//! unreachable, the last figures keep counting until they age out that way, then each
//! replica enforces its own counts only.
//!
//! Precision: `local(asOf)` counts whole buckets (one second for requests), so `others` may
//! miss up to two boundary buckets of this replica's own events — it errs towards the local
//! count. Figures reported more than 15 s (requests), 15 min (hour), 1 h (day) late, or
//! computed on a clock far off this one, can make `others` too large (stricter). The collector
//! is expected to count, as requests, the requests admitted under the rule (not the ones
//! refused), and records as the sidecar reports them: for the deciding rule and for every
//! other rule the event names as applied beside it (`alsoApplied`, each charged the same
//! request and records under its own principal); an Audit-mode policy's dry run beside an
//! enforcing one is counted in a table of its own, which the sidecar merges with the usage the
//! collector reports for its (policy, principal) pairs: the dry runs marked `charged`, and the
//! requests that policy decided on pods where no enforcing policy selects it (its usage as a
//! whole, as it will count once enforced).
//!
//! # Concurrency and memory
//!
//! [`Quotas`] is `Send + Sync`; keys are spread over independent `Mutex<HashMap>` shards, so
//! requests of different principals rarely contend. Requests of one principal in flight at
//! the same time are each told the same `records_remaining`; they may together overshoot the
//! record limit by what they return concurrently (likewise replicas between two usage
//! reports). A request under several rules is admitted by [`Quotas::admit_all`] with the
//! shards of all its keys locked at once (always in the same order), so it is counted under
//! every rule or under none, whatever runs concurrently. A poisoned shard lock is recovered
//! (the counters are always consistent).
//!
//! At most [`QuotaSettings::max_tracked`] keys are kept. [`Quotas::evict_idle`] drops keys idle
//! for [`QuotaSettings::idle_after`] whose state is *lossless* to forget (bucket full, nothing
//! in any window, no cluster figure still counting), so it never resets a principal. When a
//! shard is full and a new key arrives, a few keys are evicted at once, in this order: lossless
//! ones, then keys with usage that are not refused, then keys that are currently refused;
//! least recently seen first within each. A principal at its limit is thus only forgotten if
//! the shard holds nothing but refused principals (a flood of more than `max_tracked`
//! distinct principals each at its limit); it then starts again with a fresh quota. Per key,
//! memory is a few hundred bytes, up to about 4 KB for a principal active every second for a
//! day.
#![forbid(unsafe_code)]

mod entry;
mod time;
mod window;

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use custos_api::collector::UsageResponse;
use custos_api::policy::Limits;

use crate::entry::{Configured, Entry};
pub use crate::time::{SteadyClock, Timestamp};

/// What quotas are counted by: a rule of a policy, and a principal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaKey {
    /// The policy name.
    pub policy: String,
    /// The rule name.
    pub rule: String,
    /// `user:<id>`, `workload:<namespace>/<serviceAccount>` or `peer:<ip>`.
    pub principal: String,
}

impl QuotaKey {
    /// A key from its parts.
    pub fn new(policy: impl Into<String>, rule: impl Into<String>, principal: impl Into<String>) -> QuotaKey {
        QuotaKey { policy: policy.into(), rule: rule.into(), principal: principal.into() }
    }
}

/// Tuning of [`Quotas`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaSettings {
    /// [`Quotas::evict_idle`] drops a key only after it has been neither admitted nor recorded
    /// for this long (and only if forgetting it is lossless). Default 5 minutes.
    pub idle_after: Duration,
    /// Most keys tracked at once (at least 1); see the crate docs for what is evicted when
    /// full. Default 10,000.
    pub max_tracked: usize,
    /// Number of independently locked shards (at least 1, at most `max_tracked`). Each shard
    /// holds at most `max_tracked / shards` keys. Default 16.
    pub shards: usize,
}

impl Default for QuotaSettings {
    fn default() -> QuotaSettings {
        QuotaSettings { idle_after: Duration::from_secs(300), max_tracked: 10_000, shards: 16 }
    }
}

/// The limit that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitKind {
    /// `requestsPerMinute`.
    RequestsPerMinute,
    /// `recordsPerHour`.
    RecordsPerHour,
    /// `recordsPerDay`.
    RecordsPerDay,
}

impl LimitKind {
    /// The policy field name, e.g. `requestsPerMinute` (for 429 bodies and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requestsPerMinute",
            LimitKind::RecordsPerHour => "recordsPerHour",
            LimitKind::RecordsPerDay => "recordsPerDay",
        }
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request allowed by the quotas (and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// How many records the response may still carry: the smaller of what is left in the
    /// hour and the day (at least 1), or `None` when the rule limits neither.
    pub records_remaining: Option<u64>,
}

/// A request refused by a quota (HTTP 429). Names the limit, never the principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: {limit}; retry after {} s", .retry_after.as_secs())]
pub struct Exceeded {
    /// The limit that refused the request (the one with the longest wait if several did).
    pub limit: LimitKind,
    /// When the request would pass, barring other usage: whole seconds, at least 1.
    pub retry_after: Duration,
}

impl Exceeded {
    /// [`Exceeded::retry_after`] in seconds, for the `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs()
    }
}

type Shard = Mutex<HashMap<QuotaKey, Entry>>;

/// Quota state of every tracked key; see the crate docs for the semantics.
pub struct Quotas {
    shards: Box<[Shard]>,
    hasher: RandomState,
    per_shard: usize,
    idle_after_ms: u64,
    pressure_evictions: AtomicU64,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("tracked", &self.tracked())
            .finish_non_exhaustive()
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<QuotaKey, Entry>> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Quotas {
    /// An empty quota table.
    pub fn new(settings: QuotaSettings) -> Quotas {
        let max = settings.max_tracked.max(1);
        let shards = settings.shards.clamp(1, max);
        Quotas {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: max / shards,
            idle_after_ms: time::duration_millis(settings.idle_after),
            pressure_evictions: AtomicU64::new(0),
        }
    }

    fn shard_index(&self, key: &QuotaKey) -> usize {
        let n = self.shards.len();
        let i = usize::try_from(self.hasher.hash_one(key) % n as u64).unwrap_or(0);
        i.min(n - 1)
    }

    fn shard(&self, key: &QuotaKey) -> &Shard {
        &self.shards[self.shard_index(key)]
    }

    /// Runs `f` on the key's entry, creating it (with `last_seen`) if `create` and it is
    /// missing; `None` if missing and not created.
    fn with_entry<R>(
        &self,
        key: &QuotaKey,
        now: u64,
        create: Option<u64>,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Option<R> {
        let mut map = lock(self.shard(key));
        if let Some(entry) = map.get_mut(key) {
            return Some(f(entry));
        }
        let last_seen = create?;
        self.make_room(&mut map, now, &[]);
        let mut entry = Entry::new(last_seen);
        let result = f(&mut entry);
        map.insert(key.clone(), entry);
        Some(result)
    }

    /// Before a new key goes into a full shard: evicts about 1/16 of it, lowest rank first
    /// (lossless, then not refused, then refused), least recently seen first within a rank.
    /// Keys in `keep` are not evicted (a joint admission's keys, counted or about to be).
    fn make_room(&self, map: &mut HashMap<QuotaKey, Entry>, now: u64, keep: &[(&QuotaKey, &Limits)]) {
        if map.len() < self.per_shard {
            return;
        }
        let target = self.per_shard.saturating_sub((self.per_shard / 16).max(1));
        let excess = map.len() - target;
        let mut ranked: Vec<(u8, u64, &QuotaKey)> = map
            .iter()
            .filter(|(key, _)| !keep.iter().any(|(kept, _)| kept == key))
            .map(|(key, entry)| (entry.rank(now), entry.last_seen, key))
            .collect();
        if excess < ranked.len() {
            ranked.select_nth_unstable_by_key(excess, |&(rank, seen, _)| (rank, seen));
        }
        let mut lossy = 0u64;
        let victims: Vec<QuotaKey> = ranked
            .iter()
            .take(excess)
            .map(|&(rank, _, key)| {
                lossy += u64::from(rank > 0);
                key.clone()
            })
            .collect();
        for key in &victims {
            map.remove(key);
        }
        self.pressure_evictions.fetch_add(lossy, Ordering::Relaxed);
    }

    /// Before forwarding a request under `key`'s rule: counts it and says how many records
    /// the response may carry, or refuses it (nothing counted).
    pub fn admit(&self, key: &QuotaKey, limits: &Limits, now: Timestamp) -> Result<Admission, Exceeded> {
        self.admission(key, limits, now)
    }

    /// Admits one request under several rules at once, all or nothing: with the shards of
    /// every key locked (in a fixed order, so concurrent calls cannot deadlock), each key is
    /// checked as [`Quotas::admit`] would, and only if every one allows the request is it
    /// counted under each. Returns the admissions in the order of `requests`, or the position
    /// of the first key that refuses with its refusal (nothing counted under any key). The keys
    /// must be distinct (a key given twice would be checked once for two requests).
    ///
    /// Checking every key first and then admitting each in turn is not the same: a
    /// concurrent request can take the last token of a later key in between, after an
    /// earlier key has already counted a request that is then refused.
    pub fn admit_all(
        &self,
        requests: &[(&QuotaKey, &Limits)],
        now: Timestamp,
    ) -> Result<Vec<Admission>, (usize, Exceeded)> {
        debug_assert!(
            requests.iter().enumerate().all(|(i, (key, _))| requests[..i].iter().all(|(k, _)| k != key)),
            "admit_all takes distinct keys"
        );
        let now = now.as_millis();
        let configured: Vec<Configured> = requests.iter().map(|(_, l)| Configured::from_limits(l)).collect();
        let shard_of: Vec<usize> = requests.iter().map(|(key, _)| self.shard_index(key)).collect();
        let mut locked: Vec<usize> =
            shard_of.iter().zip(&configured).filter(|(_, c)| !c.is_empty()).map(|(&s, _)| s).collect();
        locked.sort_unstable();
        locked.dedup();
        let mut guards: Vec<MutexGuard<'_, HashMap<QuotaKey, Entry>>> =
            locked.iter().map(|&i| lock(&self.shards[i])).collect();
        let map_of = |i: usize| locked.binary_search(&shard_of[i]).unwrap_or_default();
        for (i, ((key, _), limits)) in requests.iter().zip(&configured).enumerate() {
            if limits.is_empty() {
                continue;
            }
            let map = &mut guards[map_of(i)];
            // A key not tracked yet is checked as the fresh entry admitting it would make.
            let checked = match map.get_mut(*key) {
                Some(entry) => entry.admit(*limits, now, false),
                None => Entry::new(now).admit(*limits, now, false),
            };
            if let Err(exceeded) = checked {
                return Err((i, exceeded));
            }
        }
        let mut admissions = Vec::with_capacity(requests.len());
        for (i, ((key, _), limits)) in requests.iter().zip(&configured).enumerate() {
            if limits.is_empty() {
                admissions.push(Admission { records_remaining: None });
                continue;
            }
            let map = &mut guards[map_of(i)];
            if !map.contains_key(*key) {
                self.make_room(map, now, requests);
            }
            let entry = map.entry((*key).clone()).or_insert_with(|| Entry::new(now));
            // Under the same locks and the same `now` as the check, this admits.
            let records_remaining = entry.admit(*limits, now, true).map_err(|exceeded| (i, exceeded))?;
            admissions.push(Admission { records_remaining });
        }
        Ok(admissions)
    }

    fn admission(&self, key: &QuotaKey, limits: &Limits, now: Timestamp) -> Result<Admission, Exceeded> {
        let limits = Configured::from_limits(limits);
        if limits.is_empty() {
            return Ok(Admission { records_remaining: None });
        }
        let now = now.as_millis();
        let result = self.with_entry(key, now, Some(now), |entry| entry.admit(limits, now, true));
        match result {
            Some(Ok(records_remaining)) => Ok(Admission { records_remaining }),
            Some(Err(exceeded)) => Err(exceeded),
            // `with_entry` always runs `f` when asked to create.
            None => Ok(Admission { records_remaining: None }),
        }
    }

    /// After the response: counts the `records` actually returned under `key`'s rule (a no-op
    /// unless the rule has `recordsPerHour` or `recordsPerDay`).
    pub fn record(&self, key: &QuotaKey, limits: &Limits, records: u64, now: Timestamp) {
        let limits = Configured::from_limits(limits);
        if !limits.counts_records() {
            return;
        }
        let now = now.as_millis();
        self.with_entry(key, now, Some(now), |entry| entry.record(limits, records, now));
    }

    /// Merges the collector's cluster-wide usage of `principal` under `policy`, computed as
    /// of `as_of`, into every rule it names (see the crate docs), with its figures without this
    /// replica's own events when it holds them (`rules_without_instance`: the caller passes
    /// those only for its own instance tag). Rules not tracked here are
    /// added if their usage still counts. Returns how many rules took the figures: usage
    /// about another policy or principal than asked, stale usage and usage older than the
    /// figures already held are ignored.
    pub fn apply_cluster_usage(
        &self,
        policy: &str,
        principal: &str,
        usage: &UsageResponse,
        as_of: Timestamp,
        now: Timestamp,
    ) -> usize {
        if usage.policy != policy || usage.principal != principal {
            return 0;
        }
        let (as_of, now) = (as_of.as_millis(), now.as_millis());
        usage
            .rules
            .iter()
            .filter(|(rule, rule_usage)| {
                let key = QuotaKey::new(policy, rule.as_str(), principal);
                // Known only from the collector: never "seen" here, first to go under pressure.
                let create = Entry::usage_counts(rule_usage, as_of, now).then_some(0);
                // A rule absent from the figures without this replica's events: all of it is
                // this replica's.
                let without_own = usage
                    .rules_without_instance
                    .as_ref()
                    .map(|m| m.get(rule.as_str()).copied().unwrap_or_default());
                self.with_entry(&key, now, create, |entry| {
                    entry.apply(rule_usage, without_own.as_ref(), as_of, now)
                }) == Some(true)
            })
            .count()
    }

    /// The distinct (policy, principal) pairs admitted or recorded here within `within`
    /// before `now`, sorted: those whose cluster usage the sidecar should fetch.
    pub fn active_principals(&self, now: Timestamp, within: Duration) -> Vec<(String, String)> {
        let since = now.saturating_sub(within).as_millis();
        let mut pairs = BTreeSet::new();
        for shard in self.shards.iter() {
            let map = lock(shard);
            let active = map.iter().filter(|(_, e)| e.last_seen >= since && e.last_seen > 0);
            pairs.extend(active.map(|(key, _)| (key.policy.clone(), key.principal.clone())));
        }
        pairs.into_iter().collect()
    }

    /// Drops the keys idle for at least [`QuotaSettings::idle_after`] whose state is lossless
    /// to forget, compacts the others, and returns how many were dropped. Call it
    /// periodically (e.g. every minute).
    pub fn evict_idle(&self, now: Timestamp) -> usize {
        let now = now.as_millis();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, entry| {
                let idle = now.saturating_sub(entry.last_seen) >= self.idle_after_ms;
                if idle && entry.is_lossless(now) {
                    return false;
                }
                entry.compact(now);
                true
            });
            dropped += before - map.len();
            if map.capacity() > 2 * map.len() + 16 {
                map.shrink_to_fit();
            }
        }
        dropped
    }

    /// How many keys are tracked.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// How many keys holding usage were forgotten because the table was full (a metric: a
    /// non-zero value means `max_tracked` is too small for the traffic, or a flood of
    /// principals).
    pub fn pressure_evictions(&self) -> u64 {
        self.pressure_evictions.load(Ordering::Relaxed)
    }
}
