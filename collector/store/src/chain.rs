//! The hash chain: how a stored event is serialised and hashed, the columns derived from it,
//! and the verification walk that finds the first broken link.
//!
//! # Construction
//!
//! Every stored event gets a sequence number `seq` (1, 2, 3, ... in ingest order, one chain per
//! store) and the hash of its predecessor (`prev_hash`; the genesis predecessor is
//! [`GENESIS_HASH`], 64 zeros, or the retention anchor after a prune). The event is stored as
//! its canonical JSON `body`: `serde_json` serialisation of the [`AuditEvent`] with
//! `prev_hash` set (struct field order, maps sorted by key, no whitespace). Then
//!
//! ```text
//! hash = hex(SHA-256(prev_hash as 64 ASCII hex characters || body as UTF-8))
//! ```
//!
//! Verification only ever hashes the stored `body` bytes, so it does not depend on how a later
//! version of this crate would serialise the same event. The indexed columns (principal, time,
//! policy, ...) and the record-hash index are derived from the body and checked against it.
//!
//! # Verification (first broken link)
//!
//! The walk reads rows in `(seq, id)` order, starting from the anchor (genesis or the last
//! pruned event) and ending at the chain head recorded by the last ingest. For each row `r`,
//! with `p` the previous row (or the anchor), `pp` the one before it and `n` the next row:
//!
//! 1. `r.seq <= p.seq` (a second row with an existing seq) or `r.seq > head.seq`: **Inserted**
//!    at `r.seq`.
//! 2. `SHA-256(r.prev_hash || r.body) != r.hash`, the body does not parse, or its id,
//!    `prevHash` or any indexed column differs from the row's columns: **Edited** at `r.seq`.
//! 3. `r.prev_hash == p.hash`: linked. If `r.seq != p.seq + 1` the seq itself was rewritten:
//!    **Edited** at `r.seq`.
//! 4. Otherwise the link is broken:
//!    - `n.prev_hash == p.hash` (the next row links past `r`): if also `r.prev_hash == n.hash`,
//!      `r` and `n` were swapped: **Reordered** at `r.seq`; else `r` is an extra row:
//!      **Inserted** at `r.seq`.
//!    - `r.seq > p.seq + 1` (a gap): **Deleted**, reported at `p.seq + 1`, the first missing seq.
//!    - `r.prev_hash == pp.hash` (`r` links past `p`): `p` was inserted (with a valid hash, rows
//!      renumbered): **Inserted** at `p.seq`.
//!    - else `p` was rewritten with a recomputed hash (or rows were deleted and the rest
//!      renumbered): **Edited** at `p.seq` (at `r.seq` when `p` is the anchor).
//! 5. The record-hash index rows of `r` differ from the [`record_key`]s of its body's
//!    `recordHashes`: **Edited** at `r.seq` (someone hid or planted a subject access).
//!
//! # The record-hash index
//!
//! "Who accessed data subject X" is answered through an index of [`record_key`]s: the first
//! 16 bytes of `SHA-256(record hash)`, whatever the record hash's format. Keys are short (the
//! index stays small) and uniformly spread; two record hashes may share a key, so every hit is
//! checked against the event body, which holds the full record hashes.
//!
//! After the last row: fewer rows than the head's seq means the tail was deleted (**Deleted**
//! at the first missing seq); a last row whose hash differs from the head's hash was rewritten
//! (**Edited**); a row above the head (read in the same snapshot as the head) was appended
//! without going through ingest (**Inserted**).
//!
//! What it cannot catch: an attacker with write access who rewrites the whole chain from some
//! point and the head row consistently. Record [`ChainHead`](crate::ChainHead)s elsewhere
//! (`AnyStore::head`) to detect that.

use std::collections::BTreeMap;

use custos_api::AuditEvent;
use sha2::{Digest, Sha256};

use crate::{BreakKind, BrokenLink, Error};

/// The `prev_hash` of the first event of a fresh store: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A key of the record-hash index: see [`record_key`]. A byte vector rather than an array
/// so that a tampered key of another length reads back (and fails verification).
pub(crate) type RecordKey = Vec<u8>;

/// Bytes of a [`record_key`].
pub(crate) const RECORD_KEY_LEN: usize = 16;

/// The key under which the record-hash index stores `record_hash`: the first 16 bytes of
/// `SHA-256(record_hash)`.
pub(crate) fn record_key(record_hash: &str) -> RecordKey {
    Sha256::digest(record_hash.as_bytes())[..RECORD_KEY_LEN].to_vec()
}

/// Events per bucket of SQLite's record-hash index: `2^14`. The index of both backends is
/// keyed by `(bucket, record_key, seq)`, so a batch writes into the pages of the current
/// bucket only. Smaller buckets make ingest cheaper (fewer pages dirtied per batch) and
/// lookups dearer (one seek per bucket).
pub(crate) const SQLITE_BUCKET_SHIFT: u32 = 14;

/// Events per bucket of PostgreSQL's record-hash index: `2^16`. Each bucket is probed in
/// every day partition of the range, and a probe costs more than in SQLite: at 10 M events,
/// 2^14 gave a subject p50 of 60 ms (610 buckets), 2^16 a quarter of the probes.
pub(crate) const POSTGRES_BUCKET_SHIFT: u32 = 16;

/// The record-hash index bucket of the event at `seq`, with `2^shift` events per bucket.
pub(crate) fn bucket_of(seq: i64, shift: u32) -> i64 {
    seq >> shift
}

/// The last seq of the bucket of `seq`.
pub(crate) fn bucket_end_of(seq: i64, shift: u32) -> i64 {
    (bucket_of(seq, shift) + 1).checked_mul(1 << shift).map_or(i64::MAX, |t| t - 1)
}

/// The distinct keys of `record_hashes`, sorted.
pub(crate) fn record_keys(record_hashes: &[String]) -> Vec<RecordKey> {
    let mut keys: Vec<RecordKey> = record_hashes.iter().map(|h| record_key(h)).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Microseconds in a day.
pub(crate) const DAY_US: i64 = 86_400_000_000;

/// The columns of `events` that `verify` reads, in the order both backends select them.
pub(crate) const CHAIN_COLUMNS: &str = "seq, id, time_us, namespace, policy, rule, principal, user_id, decision, path, records_returned, prev_hash, hash, body, rule_principal";

/// `hex(SHA-256(prev_hash || body))`.
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(body.as_bytes());
    // `hex::encode` collects the digits through a `char` iterator (about 1,600 instructions
    // for 32 bytes, on every stored event); pushed from a table, they take a fraction.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in h.finalize() {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Parses an RFC 3339 time into microseconds since the Unix epoch.
pub(crate) fn parse_time_us(time: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(time).ok().map(|t| t.timestamp_micros())
}

/// Formats microseconds since the epoch as RFC 3339 UTC.
pub(crate) fn format_time_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// The indexed columns of an event, derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Columns {
    pub id: String,
    pub time_us: i64,
    pub namespace: String,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub principal: String,
    pub user_id: Option<String>,
    pub decision: String,
    pub path: String,
    pub records_returned: i64,
    /// The principal the deciding rule counted by where it is not `principal`
    /// (`rulePrincipal`): usage counts that rule under it instead (SQLite V4, PostgreSQL V5).
    pub rule_principal: Option<String>,
}

impl Columns {
    /// Derives the columns; `None` with a reason when the event cannot be stored.
    pub(crate) fn of(e: &AuditEvent) -> Result<Columns, &'static str> {
        if e.id.is_empty() {
            return Err("id is empty");
        }
        let time_us = parse_time_us(&e.time).ok_or("time is not RFC 3339")?;
        let records_returned =
            i64::try_from(e.records_returned).map_err(|_| "recordsReturned is out of range")?;
        Ok(Columns {
            id: e.id.clone(),
            time_us,
            namespace: e.namespace.clone(),
            policy: e.policy.clone(),
            rule: e.rule.clone(),
            principal: e.principal.clone(),
            user_id: e.user.as_ref().map(|u| u.id.clone()),
            decision: e.decision.as_str().to_owned(),
            path: e.path.clone(),
            records_returned,
            rule_principal: e.rule_principal.clone(),
        })
    }
}

/// One event ready to be written: its place in the chain and everything stored.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    pub seq: i64,
    pub cols: Columns,
    pub prev_hash: String,
    pub hash: String,
    pub body: String,
    /// Distinct [`record_key`]s of the event's record hashes, sorted.
    pub records: Vec<RecordKey>,
    /// The rows of the event's other applied rules ([`AppliedRow::of`]).
    pub applied: Vec<AppliedRow>,
}

/// A rule whose quotas an event's request was charged to under another key than the
/// event's own (policy, rule, principal), as the usage index keeps it: the deciding rule when
/// its policy counts by another principal (`rulePrincipal`: charged as the deciding rule is
/// from `events`), a rule of another enforcing policy that applied (`alsoApplied`:
/// admitted unless the event is a `Deny`, charged the records returned, as the deciding rule
/// is) or an Audit-mode policy's dry run its quotas counted (`dryRuns` entries with
/// `charged`: admitted, charged the records its plan would have returned). The index is
/// derived from the stored bodies (like the record-hash index) and read only by usage
/// queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppliedRow {
    pub policy: String,
    pub rule: String,
    /// The entry's principal, else the event's.
    pub principal: String,
    /// Whether the request counts under the rule's requests per minute.
    pub admitted: bool,
    /// Records charged to the rule's record quotas.
    pub records: i64,
}

impl AppliedRow {
    /// The rows of `e`'s `rulePrincipal`, `alsoApplied` and charged `dryRuns` (after
    /// [`admissible`]: counts fit).
    pub(crate) fn of(e: &AuditEvent) -> Vec<AppliedRow> {
        let principal = |p: &Option<String>| p.clone().unwrap_or_else(|| e.principal.clone());
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let deciding = match (&e.rule_principal, &e.policy, &e.rule) {
            (Some(principal), Some(policy), Some(rule)) => Some(AppliedRow {
                policy: policy.clone(),
                rule: rule.clone(),
                principal: principal.clone(),
                admitted: e.decision != custos_api::Decision::Deny,
                records: count(e.records_returned),
            }),
            _ => None,
        };
        let also = e.also_applied.iter().map(|a| AppliedRow {
            policy: a.policy.clone(),
            rule: a.rule.clone(),
            principal: principal(&a.principal),
            admitted: e.decision != custos_api::Decision::Deny,
            records: count(e.records_returned),
        });
        let dry_runs = e.dry_runs.iter().filter(|d| d.charged).filter_map(|d| {
            Some(AppliedRow {
                policy: d.policy.clone(),
                rule: d.rule.clone()?,
                principal: principal(&d.principal),
                admitted: true,
                records: count(d.transform.as_ref().map_or(0, |t| t.records_returned)),
            })
        });
        deciding.into_iter().chain(also).chain(dry_runs).collect()
    }
}

/// Longest event id accepted (ULIDs have 26 characters): ids are kept, indexed and deduplicated.
pub const MAX_ID_BYTES: usize = 128;
/// Longest principal accepted: indexed (PostgreSQL refuses btree entries over 2,704 bytes).
pub const MAX_PRINCIPAL_BYTES: usize = 1024;
/// Longest namespace, policy or rule name accepted (Kubernetes names are at most 253).
pub const MAX_NAME_BYTES: usize = 253;
/// Most other applied rules one event may name (one per enforcing policy selecting the pod).
pub use custos_api::audit::MAX_ALSO_APPLIED;
/// Most dry runs one event may carry (one per Audit-mode policy selecting the pod).
pub use custos_api::audit::MAX_DRY_RUNS;
/// Most record hashes one event may carry: what the sidecar's transform keeps of one response
/// (past them it counts ids without hashing them), about 650 KB of event.
pub use custos_transform::MAX_RECORD_HASHES;
/// Longest `method` or `path` accepted. The sidecar's path is normalised to at most 8 KiB
/// (`custos_policy::normalize::MAX_PATH_LEN`); its method is the request's, bounded by its
/// request-head buffer (twice `--max-header-bytes`: 32 KiB by default, a hostile method of a
/// request it refuses).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Longest `reason` accepted (the sidecar's are reason codes with a short note, under 100
/// bytes).
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest `time` accepted (RFC 3339 with nanoseconds and an offset is 35 bytes; chrono
/// would take any number of fraction digits).
pub const MAX_TIME_BYTES: usize = 64;
/// Longest `traceId` accepted (W3C trace ids are 32 hex digits).
pub const MAX_TRACE_ID_BYTES: usize = 256;
/// Longest user attribute value accepted (the sidecar refuses a token whose mapped claim is
/// longer than 1 KiB).
pub const MAX_ATTRIBUTE_BYTES: usize = 4096;
/// Most entries of `user.attributes` (one per attribute a policy maps, at most 64).
pub const MAX_MAP_ENTRIES: usize = 256;
/// Most entries of `masked` and of each dry run's `masked`: one per data class (at most 64 a
/// policy) of every policy that applies to a response (the deciding one and at most
/// [`MAX_ALSO_APPLIED`] others).
pub const MAX_MASKED_CLASSES: usize = 64 * (MAX_ALSO_APPLIED + 1);
/// Largest event accepted, as stored (its canonical JSON): the fields' own bounds allow more
/// in combination. The sidecar's largest events, with [`MAX_RECORD_HASHES`], are about 700 KB.
pub const MAX_EVENT_BYTES: usize = 2 << 20;
/// How far in the future an event's time may be (clock skew between nodes): a later time
/// would hold back retention and blind the detectors' windows.
pub const MAX_FUTURE_SKEW_US: i64 = 10 * 60 * 1_000_000;
/// The [`Error::InvalidEvent`] reason of an event dated more than [`MAX_FUTURE_SKEW_US`] ahead
/// of the store's clock: a matter of clocks, not of the event, which may pass later.
pub const TIME_AHEAD: &str = "time is more than 10 minutes ahead of the collector's clock";
/// Records one response may claim (per counter): sums over many events must fit in 64 bits.
pub const MAX_RECORDS_PER_EVENT: u64 = u32::MAX as u64;
/// Distinct days one batch may span: PostgreSQL creates a day's partitions in the ingest
/// transaction. A sender splits a refused batch, so its events still arrive.
pub const MAX_DAYS_PER_BATCH: usize = 32;
/// The [`Error::InvalidEvent`] reason of a batch spanning more than [`MAX_DAYS_PER_BATCH`]
/// days: the batch's, not its event's (the one that brought in a day too many is valid).
pub const TOO_MANY_DAYS: &str = "the batch spans more than 32 days; send it in smaller batches";

/// Validates a batch up front (so that a bad event rejects the batch before anything is
/// written) and returns the columns of each event. Beyond what makes an event storable
/// ([`Columns::of`], which verification also applies to stored rows), an event ingested now
/// must be admissible ([`admissible`]). The days spanned are counted over the events at or
/// after `oldest_us` (the others will not be stored).
pub(crate) fn validate(events: &[AuditEvent], oldest_us: Option<i64>) -> Result<Vec<Columns>, Error> {
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut days = std::collections::BTreeSet::new();
    events
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let invalid = |reason: &str| Error::InvalidEvent { index, reason: reason.to_owned() };
            let columns = Columns::of(e).map_err(invalid)?;
            admissible(e, &columns, now_us).map_err(invalid)?;
            if oldest_us.is_none_or(|o| columns.time_us >= o) {
                days.insert(columns.time_us.div_euclid(86_400_000_000));
            }
            if days.len() > MAX_DAYS_PER_BATCH {
                return Err(invalid(TOO_MANY_DAYS));
            }
            Ok(columns)
        })
        .collect()
}

/// Whether an event may be ingested now (`now_us`): bounded fields (the stores index some,
/// and PostgreSQL refuses NUL characters, which SQLite would take, so a batch must not be
/// refused by one and stored by the other), record hashes that are hashes, and a time not
/// ahead of the clock. The reason names the field, never its value.
pub(crate) fn admissible(e: &AuditEvent, columns: &Columns, now_us: i64) -> Result<(), &'static str> {
    if e.id.len() > MAX_ID_BYTES {
        return Err("id is longer than 128 bytes");
    }
    if e.time.len() > MAX_TIME_BYTES {
        return Err("time is longer than 64 bytes");
    }
    if e.principal.len() > MAX_PRINCIPAL_BYTES {
        return Err("principal is longer than 1024 bytes");
    }
    if e.rule_principal.as_ref().is_some_and(|p| p.len() > MAX_PRINCIPAL_BYTES) {
        return Err("rulePrincipal is longer than 1024 bytes");
    }
    if e.rule_principal.is_some() && e.rule.is_none() {
        return Err("rulePrincipal needs the rule it counts for (rule)");
    }
    if e.rule_principal.as_ref() == Some(&e.principal) {
        // One form for one meaning (the sidecar leaves it out then).
        return Err("rulePrincipal must differ from principal (leave it out when they are the same)");
    }
    admissible_sizes(e)?;
    for (value, reason) in [
        (Some(&e.namespace), "namespace is longer than 253 bytes"),
        (e.policy.as_ref(), "policy is longer than 253 bytes"),
        (e.rule.as_ref(), "rule is longer than 253 bytes"),
        (e.pod.as_ref(), "pod is longer than 253 bytes"),
        (e.cluster.as_ref(), "cluster is longer than 253 bytes"),
    ] {
        if value.is_some_and(|v| v.len() > MAX_NAME_BYTES) {
            return Err(reason);
        }
    }
    if e.also_applied.len() > MAX_ALSO_APPLIED {
        return Err("alsoApplied has more than 64 entries");
    }
    if e.also_applied.iter().any(|a| a.policy.len() > MAX_NAME_BYTES || a.rule.len() > MAX_NAME_BYTES) {
        return Err("an alsoApplied policy or rule is longer than 253 bytes");
    }
    if e.also_applied.iter().any(|a| a.principal.as_ref().is_some_and(|p| p.len() > MAX_PRINCIPAL_BYTES)) {
        return Err("an alsoApplied principal is longer than 1024 bytes");
    }
    if e.dry_runs.iter().any(|d| d.principal.as_ref().is_some_and(|p| p.len() > MAX_PRINCIPAL_BYTES)) {
        return Err("a dryRuns principal is longer than 1024 bytes");
    }
    if e.dry_runs.iter().any(|d| d.charged && d.rule.is_none()) {
        return Err("a charged dryRuns entry must name its rule");
    }
    let mut charged_policies: Vec<&str> = e
        .also_applied
        .iter()
        .map(|a| a.policy.as_str())
        .chain(e.dry_runs.iter().filter(|d| d.charged).map(|d| d.policy.as_str()))
        .collect();
    charged_policies.sort_unstable();
    if charged_policies.windows(2).any(|w| w[0] == w[1])
        || e.policy.as_deref().is_some_and(|p| charged_policies.binary_search(&p).is_ok())
    {
        // Each policy's rule is charged once: usage must not count a request twice.
        return Err("alsoApplied and charged dryRuns must name each policy once, and not the deciding one");
    }
    if e.dry_runs.len() > MAX_DRY_RUNS {
        return Err("dryRuns has more than 64 entries");
    }
    if e.dry_runs
        .iter()
        .any(|d| d.policy.len() > MAX_NAME_BYTES || d.rule.as_ref().is_some_and(|r| r.len() > MAX_NAME_BYTES))
    {
        return Err("a dryRuns policy or rule is longer than 253 bytes");
    }
    let dry_run_words = e
        .dry_runs
        .iter()
        .flat_map(|d| std::iter::once(&d.reason).chain(d.transform.iter().flat_map(|t| t.masked.keys())));
    if dry_run_words.into_iter().any(|w| w.len() > MAX_NAME_BYTES) {
        return Err("a dryRuns reason or masked class is longer than 253 bytes");
    }
    if has_nul(e) {
        return Err("a string field holds a NUL character (U+0000)");
    }
    if !e.record_hashes.iter().all(|h| custos_api::audit::is_hex_digest(h)) {
        return Err("recordHashes must be 64 lowercase hex digits each (keyed hashes, never raw ids)");
    }
    let dry_run_counts = e
        .dry_runs
        .iter()
        .filter_map(|d| d.transform.as_ref())
        .flat_map(|t| [t.records_returned, t.records_filtered, t.records_truncated]);
    if [e.records_returned, e.records_filtered, e.records_truncated]
        .into_iter()
        .chain(dry_run_counts)
        .any(|n| n > MAX_RECORDS_PER_EVENT)
    {
        return Err("a records count is above 4294967295");
    }
    if columns.time_us > now_us.saturating_add(MAX_FUTURE_SKEW_US) {
        return Err(TIME_AHEAD);
    }
    Ok(())
}

/// The bounds of the event's free-form strings and lists (beyond the names and counts
/// [`admissible`] checks itself): an event as large as a batch would be held whole in every
/// reader's memory (the detectors' warm-up reads pages of thousands).
fn admissible_sizes(e: &AuditEvent) -> Result<(), &'static str> {
    if e.record_hashes.len() > MAX_RECORD_HASHES {
        return Err("recordHashes has more than 10000 entries");
    }
    if e.path.len() > MAX_TEXT_BYTES {
        return Err("path is longer than 65536 bytes");
    }
    if e.method.len() > MAX_TEXT_BYTES {
        return Err("method is longer than 65536 bytes");
    }
    if e.reason.len() > MAX_REASON_BYTES {
        return Err("reason is longer than 1024 bytes");
    }
    if e.trace_id.as_ref().is_some_and(|t| t.len() > MAX_TRACE_ID_BYTES) {
        return Err("traceId is longer than 256 bytes");
    }
    if let Some(c) = &e.caller
        && (c.namespace.len() > MAX_NAME_BYTES || c.service_account.len() > MAX_NAME_BYTES)
    {
        return Err("caller namespace or serviceAccount is longer than 253 bytes");
    }
    if let Some(u) = &e.user {
        if u.id.len() > MAX_PRINCIPAL_BYTES {
            return Err("user.id is longer than 1024 bytes");
        }
        if u.attributes.len() > MAX_MAP_ENTRIES {
            return Err("user.attributes has more than 256 entries");
        }
        if u.attributes.keys().any(|k| k.len() > MAX_NAME_BYTES) {
            return Err("a user.attributes name is longer than 253 bytes");
        }
        if u.attributes.values().any(|v| v.len() > MAX_ATTRIBUTE_BYTES) {
            return Err("a user.attributes value is longer than 4096 bytes");
        }
    }
    if e.masked.len() > MAX_MASKED_CLASSES {
        return Err("masked has more than 4160 entries");
    }
    if e.masked.keys().any(|k| k.len() > MAX_NAME_BYTES) {
        return Err("a masked class is longer than 253 bytes");
    }
    if e.dry_runs.iter().filter_map(|d| d.transform.as_ref()).any(|t| t.masked.len() > MAX_MASKED_CLASSES) {
        return Err("a dryRuns masked has more than 4160 entries");
    }
    Ok(())
}

/// Whether any string of the event holds U+0000.
fn has_nul(e: &AuditEvent) -> bool {
    let nul = |s: &str| s.contains('\0');
    let user = e
        .user
        .iter()
        .flat_map(|u| std::iter::once(&u.id).chain(u.attributes.iter().flat_map(|(k, v)| [k, v])));
    let caller = e.caller.iter().flat_map(|c| [&c.namespace, &c.service_account]);
    let dry_runs = e
        .dry_runs
        .iter()
        .flat_map(|d| std::iter::once(&d.policy).chain(&d.rule).chain(&d.principal).chain([&d.reason]));
    let also_applied =
        e.also_applied.iter().flat_map(|a| [&a.policy, &a.rule].into_iter().chain(&a.principal));
    [&e.id, &e.time, &e.namespace, &e.principal, &e.method, &e.path, &e.reason]
        .into_iter()
        .chain([&e.cluster, &e.policy, &e.rule, &e.rule_principal, &e.pod, &e.trace_id].into_iter().flatten())
        .chain(user)
        .chain(caller)
        .chain(dry_runs)
        .chain(also_applied)
        .chain(e.masked.keys())
        .chain(e.dry_runs.iter().filter_map(|d| d.transform.as_ref()).flat_map(|t| t.masked.keys()))
        .any(|s| nul(s))
}

/// An event serialised for storage, everything but its place in the chain: prepared before
/// the write lock is taken.
#[derive(Clone, Debug)]
pub(crate) struct Unlinked {
    pub cols: Columns,
    /// The canonical body without `prevHash` and without its closing brace.
    open_body: String,
    /// Distinct [`record_key`]s of the event's record hashes, sorted.
    pub records: Vec<RecordKey>,
    /// The rows of the event's other applied rules.
    pub applied: Vec<AppliedRow>,
}

impl Unlinked {
    /// Serialises `event` (its own `prev_hash` ignored).
    pub(crate) fn of(event: &AuditEvent, cols: Columns) -> Result<Unlinked, Error> {
        // serde_json's bytes, written by the sidecar's encoder (`custos_api::audit::json`)
        let mut json = Vec::with_capacity(1024);
        custos_api::audit::json::write_event_open(&mut json, event);
        let open_body =
            String::from_utf8(json).map_err(|_| Error::Corrupt("an event could not be serialised".into()))?;
        Ok(Unlinked {
            cols,
            open_body,
            records: record_keys(&event.record_hashes),
            applied: AppliedRow::of(event),
        })
    }

    /// Links the event after `prev_hash`. `prevHash` is the last field of [`AuditEvent`], so
    /// appending it to the body serialised without it gives exactly the serialisation of the
    /// event with `prev_hash` set.
    pub(crate) fn link(self, seq: i64, prev_hash: &str) -> Result<Prepared, Error> {
        let quoted = serde_json::to_string(prev_hash)
            .map_err(|_| Error::Corrupt("a chain hash could not be serialised".into()))?;
        let mut body = self.open_body;
        body.reserve(quoted.len() + 13);
        body.push_str(",\"prevHash\":");
        body.push_str(&quoted);
        body.push('}');
        let hash = chain_hash(prev_hash, &body);
        Ok(Prepared {
            seq,
            cols: self.cols,
            prev_hash: prev_hash.to_owned(),
            hash,
            body,
            records: self.records,
            applied: self.applied,
        })
    }
}

/// Serialises every event of a validated batch.
pub(crate) fn unlinked(events: &[AuditEvent], cols: Vec<Columns>) -> Result<Vec<Unlinked>, Error> {
    events.iter().zip(cols).map(|(e, c)| Unlinked::of(e, c)).collect()
}

/// Refuses a serialised event larger than [`MAX_EVENT_BYTES`] as stored
/// ([`Error::InvalidEvent`] with its index in the batch).
pub(crate) fn check_sizes(batch: &[Unlinked]) -> Result<(), Error> {
    // The body as stored adds `,"prevHash":"<64 hex>"}` (79 bytes) to what is serialised.
    match batch.iter().position(|u| u.open_body.len() + 79 > MAX_EVENT_BYTES) {
        Some(index) => Err(Error::InvalidEvent {
            index,
            reason: "the event is larger than 2 MiB (2097152 bytes) as stored".into(),
        }),
        None => Ok(()),
    }
}

/// Serialises `event` as stored after `prev_hash` and links it.
#[cfg(test)]
pub(crate) fn link(event: &AuditEvent, cols: Columns, seq: i64, prev_hash: &str) -> Result<Prepared, Error> {
    Unlinked::of(event, cols)?.link(seq, prev_hash)
}

/// Parses a stored body.
pub(crate) fn parse_body(body: &str) -> Result<AuditEvent, Error> {
    serde_json::from_str(body).map_err(|_| Error::Corrupt("a stored event body does not parse".into()))
}

/// The record hashes of a stored body, read without the rest of the event.
#[derive(serde::Deserialize)]
struct BodyRecords {
    #[serde(default, rename = "recordHashes")]
    record_hashes: Vec<String>,
}

/// Whether the stored `body` lists `record_hash` among its record hashes (the check behind
/// every record-hash index hit, since keys may collide).
pub(crate) fn names_record(body: &str, record_hash: &str) -> Result<bool, Error> {
    let b: BodyRecords = serde_json::from_str(body)
        .map_err(|_| Error::Corrupt("a stored event body does not parse".into()))?;
    Ok(b.record_hashes.iter().any(|h| h == record_hash))
}

/// A row of the chain as read back for verification.
#[derive(Clone, Debug)]
pub(crate) struct ChainRow {
    pub seq: i64,
    pub cols: Columns,
    pub prev_hash: String,
    pub hash: String,
    pub body: String,
}

/// A point of the chain: a seq and the hash there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub seq: i64,
    pub hash: String,
}

fn broken(seq: i64, event_id: Option<&str>, kind: BreakKind, detail: String) -> BrokenLink {
    BrokenLink { seq: u64::try_from(seq).unwrap_or(0), event_id: event_id.map(str::to_owned), kind, detail }
}

/// The stateful verification walk (see the module documentation for the rules).
pub(crate) struct Walker {
    /// The previous row (or the anchor).
    prev: Link,
    prev_id: Option<String>,
    /// The row before `prev`, when there is one.
    prev_prev: Option<Link>,
    /// Highest seq the walk may see (the head, or the prune target).
    bound: i64,
    /// Rows checked.
    pub checked: u64,
}

impl Walker {
    pub(crate) fn new(start: Link, bound: i64) -> Walker {
        Walker { prev: start, prev_id: None, prev_prev: None, bound, checked: 0 }
    }

    /// The last accepted link.
    pub(crate) fn last(&self) -> &Link {
        &self.prev
    }

    /// Checks row `r` given its successor `next` and the record-hash index rows of `r`.
    pub(crate) fn step(
        &mut self,
        r: &ChainRow,
        next: Option<&ChainRow>,
        indexed: &Indexed,
    ) -> Option<BrokenLink> {
        let p = &self.prev;
        let id = Some(r.cols.id.as_str());
        // 1. Extra rows.
        if r.seq <= p.seq {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Inserted,
                format!("a second row with seq {} (or out of order)", r.seq),
            ));
        }
        if r.seq > self.bound {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Inserted,
                format!("row above the chain head (seq {})", self.bound),
            ));
        }
        // 2. The row against its own content.
        if chain_hash(&r.prev_hash, &r.body) != r.hash {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Edited,
                "the row's content does not match its hash".into(),
            ));
        }
        let event = match serde_json::from_str::<AuditEvent>(&r.body) {
            Ok(e) => e,
            Err(_) => {
                return Some(broken(r.seq, id, BreakKind::Edited, "the stored body does not parse".into()));
            }
        };
        if event.prev_hash.as_deref() != Some(r.prev_hash.as_str()) {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Edited,
                "the prev_hash column differs from the stored body".into(),
            ));
        }
        match Columns::of(&event) {
            Ok(c) if c == r.cols => {}
            _ => {
                return Some(broken(
                    r.seq,
                    id,
                    BreakKind::Edited,
                    "an indexed column differs from the stored body".into(),
                ));
            }
        }
        // 3./4. The link to the predecessor.
        if r.prev_hash == p.hash {
            if r.seq != p.seq + 1 {
                return Some(broken(
                    r.seq,
                    id,
                    BreakKind::Edited,
                    format!("seq rewritten: the row links to seq {}", p.seq),
                ));
            }
        } else if let Some(n) = next.filter(|n| n.prev_hash == p.hash) {
            if r.prev_hash == n.hash {
                return Some(broken(
                    r.seq,
                    id,
                    BreakKind::Reordered,
                    format!("rows {} and {} are swapped", r.seq, n.seq),
                ));
            }
            return Some(broken(r.seq, id, BreakKind::Inserted, "the next row links past this one".into()));
        } else if r.seq > p.seq + 1 {
            return Some(broken(
                p.seq + 1,
                None,
                BreakKind::Deleted,
                format!("rows {}..={} are missing", p.seq + 1, r.seq - 1),
            ));
        } else if self.prev_prev.as_ref().is_some_and(|pp| pp.hash == r.prev_hash) {
            return Some(broken(
                p.seq,
                self.prev_id.as_deref(),
                BreakKind::Inserted,
                format!("row {} links past row {}", r.seq, p.seq),
            ));
        } else if let Some(prev_id) = self.prev_id.as_deref() {
            return Some(broken(
                p.seq,
                Some(prev_id),
                BreakKind::Edited,
                format!(
                    "the row's hash differs from the prev_hash recorded by row {} (rewritten, \
                     or rows after it deleted and renumbered)",
                    r.seq
                ),
            ));
        } else {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Edited,
                "the row does not link to the chain's anchor".into(),
            ));
        }
        // 5. The record-hash index: the event's keys, each at the event's time (subject
        // lookups select by the index's time: one moved there would hide the access).
        if record_keys(&event.record_hashes) != indexed.keys
            || indexed.times.iter().any(|&t| t != r.cols.time_us)
        {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Edited,
                "the record-hash index differs from the event's record hashes".into(),
            ));
        }
        // 6. The usage index of the rules besides the deciding one (quotas count from it: a
        // row removed lifts a principal's quota, one added locks it out).
        if IndexedApplied::of(&event, &r.cols) != indexed.applied {
            return Some(broken(
                r.seq,
                id,
                BreakKind::Edited,
                "the usage index differs from the event's alsoApplied and charged dryRuns".into(),
            ));
        }
        self.prev_prev = Some(std::mem::replace(&mut self.prev, Link { seq: r.seq, hash: r.hash.clone() }));
        self.prev_id = Some(r.cols.id.clone());
        self.checked += 1;
        None
    }
}

/// Record-hash index rows grouped by seq: the sorted, distinct keys of each.
pub(crate) type RecordsBySeq = BTreeMap<i64, Indexed>;

/// The index rows of one event: the record-hash index's distinct keys, sorted, and the
/// distinct times its rows give; the usage index's rows of its other charged rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Indexed {
    pub keys: Vec<RecordKey>,
    pub times: Vec<i64>,
    pub applied: Vec<IndexedApplied>,
}

/// A row of the usage index of rules besides the deciding one (`event_applied_rules`), its
/// seq aside.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct IndexedApplied {
    pub principal: String,
    pub policy: String,
    pub rule: String,
    pub time_us: i64,
    pub namespace: String,
    pub admitted: bool,
    pub records: i64,
}

impl IndexedApplied {
    /// The rows `event` (stored with `cols`) must have in the usage index, sorted, one per
    /// (principal, policy, rule) as the index keeps them.
    pub(crate) fn of(event: &AuditEvent, cols: &Columns) -> Vec<IndexedApplied> {
        let mut rows: Vec<IndexedApplied> = AppliedRow::of(event)
            .into_iter()
            .map(|a| IndexedApplied {
                principal: a.principal,
                policy: a.policy,
                rule: a.rule,
                time_us: cols.time_us,
                namespace: cols.namespace.clone(),
                admitted: a.admitted,
                records: a.records,
            })
            .collect();
        rows.sort();
        rows.dedup_by(|a, b| (&a.principal, &a.policy, &a.rule) == (&b.principal, &b.policy, &b.rule));
        rows
    }
}

/// Adds usage index rows `(seq, row)` to `map`.
pub(crate) fn group_applied(map: &mut RecordsBySeq, rows: Vec<(i64, IndexedApplied)>) {
    for (seq, row) in rows {
        map.entry(seq).or_default().applied.push(row);
    }
    for v in map.values_mut() {
        v.applied.sort();
    }
}

/// Merges the index rows of a later page into `into` (a seq's rows may come in two pages:
/// record keys by bucket, usage rows by the page's seqs).
pub(crate) fn merge_indexed(into: &mut RecordsBySeq, page: RecordsBySeq) {
    for (seq, ix) in page {
        let e = into.entry(seq).or_default();
        e.keys.extend(ix.keys);
        e.keys.sort();
        e.keys.dedup();
        for t in ix.times {
            if !e.times.contains(&t) {
                e.times.push(t);
            }
        }
        e.applied.extend(ix.applied);
        e.applied.sort();
    }
}

/// Groups `(seq, record_key)` rows into sorted, distinct lists per seq.
pub(crate) fn group_records(rows: Vec<(i64, RecordKey, i64)>) -> RecordsBySeq {
    let mut map: RecordsBySeq = BTreeMap::new();
    for (seq, h, time_us) in rows {
        let indexed = map.entry(seq).or_default();
        indexed.keys.push(h);
        if !indexed.times.contains(&time_us) {
            indexed.times.push(time_us);
        }
    }
    for v in map.values_mut() {
        v.keys.sort();
        v.keys.dedup();
    }
    map
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use custos_api::policy::Mode;
    use custos_api::{AuditEvent, Decision};

    use super::*;

    fn event(id: &str) -> AuditEvent {
        AuditEvent {
            schema_version: 1,
            id: id.into(),
            time: "2025-06-01T12:00:00Z".into(),
            cluster: None,
            namespace: "shop".into(),
            policy: None,
            rule: None,
            mode: Mode::Enforce,
            pod: None,
            caller: None,
            user: None,
            principal: "user:a".into(),
            rule_principal: None,
            method: "GET".into(),
            path: "/x".into(),
            decision: Decision::Allow,
            reason: "ok".into(),
            status: 200,
            records_returned: 0,
            records_filtered: 0,
            records_truncated: 0,
            masked: Default::default(),
            bytes: 0,
            latency_us: 0,
            trace_id: None,
            record_hashes: vec![],
            also_applied: Vec::new(),
            dry_runs: Vec::new(),
            prev_hash: None,
        }
    }

    fn chain(n: i64) -> Vec<ChainRow> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let e = event(&format!("e{seq}"));
                let p = link(&e, Columns::of(&e).unwrap(), seq, &prev).unwrap();
                prev = p.hash.clone();
                ChainRow { seq, cols: p.cols, prev_hash: p.prev_hash, hash: p.hash, body: p.body }
            })
            .collect()
    }

    fn walk(rows: &[ChainRow]) -> Option<BrokenLink> {
        let mut w = Walker::new(Link { seq: 0, hash: GENESIS_HASH.into() }, rows.len() as i64);
        (0..rows.len()).find_map(|i| w.step(&rows[i], rows.get(i + 1), &Indexed::default()))
    }

    /// Re-serialises row `i` with `f` applied and a recomputed (valid) hash.
    fn rehash(rows: &mut [ChainRow], i: usize, f: impl FnOnce(&mut AuditEvent)) {
        let mut e: AuditEvent = serde_json::from_str(&rows[i].body).unwrap();
        f(&mut e);
        let prev = rows[i].prev_hash.clone();
        let p = link(&e, Columns::of(&e).unwrap(), rows[i].seq, &prev).unwrap();
        rows[i].cols = p.cols;
        rows[i].hash = p.hash;
        rows[i].body = p.body;
    }

    #[test]
    fn clean_chain_verifies() {
        assert_eq!(walk(&chain(5)), None);
    }

    #[test]
    fn a_rewritten_row_with_a_recomputed_hash_is_an_edit_of_that_row() {
        let mut rows = chain(5);
        rehash(&mut rows, 2, |e| e.principal = "user:mallory".into());
        let b = walk(&rows).unwrap();
        assert_eq!((b.kind, b.seq), (BreakKind::Edited, 3));
        assert_eq!(b.event_id.as_deref(), Some("e3"));
    }

    #[test]
    fn a_rewritten_first_row_is_found() {
        // Row 2 no longer links to row 1, which itself links to the anchor.
        let mut rows = chain(3);
        rehash(&mut rows, 0, |e| e.status = 500);
        let b = walk(&rows).unwrap();
        assert_eq!((b.kind, b.seq), (BreakKind::Edited, 1));
    }

    #[test]
    fn a_duplicate_seq_is_an_insert() {
        let mut rows = chain(4);
        let mut extra = rows[1].clone();
        extra.cols.id = "zz".into();
        rows.insert(2, extra);
        let b = walk(&rows).unwrap();
        assert_eq!((b.kind, b.seq), (BreakKind::Inserted, 2));
    }

    #[test]
    fn the_linked_body_is_the_serialisation_of_the_event_with_its_prev_hash() {
        let mut e = event("e1");
        e.record_hashes = vec!["b".repeat(64), "a".repeat(64)];
        e.masked.insert("phone".into(), 2);
        e.trace_id = Some("t\"1".into());
        e.prev_hash = Some("ignored".into());
        let p = link(&e, Columns::of(&e).unwrap(), 7, GENESIS_HASH).unwrap();
        e.prev_hash = Some(GENESIS_HASH.into());
        assert_eq!(p.body, serde_json::to_string(&e).unwrap());
        assert_eq!(p.hash, chain_hash(GENESIS_HASH, &p.body));
        assert_eq!(p.records, record_keys(&e.record_hashes));
        assert_eq!(parse_body(&p.body).unwrap(), e);
    }

    #[test]
    fn hash_is_sha256_of_prev_hash_and_body() {
        // echo -n "0000...0000{}" | sha256sum
        let h = chain_hash(GENESIS_HASH, "{}");
        let mut d = Sha256::new();
        d.update(format!("{GENESIS_HASH}{{}}"));
        assert_eq!(h, hex::encode(d.finalize()));
    }
}
