//! Applying a [`Plan`] to a response body.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use custos_api::policy::{ExceedAction, MaskStrategy};
use serde_json::Value;
use serde_json_path::JsonPath;

use crate::expr::{RecordFilter, Vars, Verdict};
use crate::hash::HashKey;
use crate::mask::{Masker, json_text};
use crate::numbers;
use crate::path::{self, Elem, Step};
use crate::plan::{Compiled, Plan};
use crate::stream;

/// What a transform did, for the audit event and metrics. Never holds values, only counts
/// and keyed hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransformStats {
    /// Records left in the response.
    pub records_returned: u64,
    /// Records the row filter removed (including those it failed to evaluate).
    pub records_filtered: u64,
    /// Records removed by the record cap (`Truncate`).
    pub records_truncated: u64,
    /// Records removed because the row filter failed to evaluate for them (also counted in
    /// `records_filtered`).
    pub filter_errors: u64,
    /// Masked locations by data class (every class of the plan, zero included).
    pub masked: BTreeMap<String, u64>,
    /// Keyed hashes ([`HashKey::hash_hex`]) of the ids of the records returned, in document
    /// order. A record whose id path selects nothing, or something other than a string or a
    /// number, contributes none. At most [`MAX_RECORD_HASHES`]; the others are counted in
    /// `record_hashes_omitted`.
    pub record_hashes: Vec<String>,
    /// Ids of records returned that were not hashed: past [`MAX_RECORD_HASHES`].
    pub record_hashes_omitted: u64,
}

/// Most record hashes one response's stats (and so its audit event) keep: 10,000 are about
/// 650 KB of event. Past them ids are counted, not hashed: an export of millions of records
/// would otherwise make an event of tens of megabytes, held in memory and larger than the
/// collector takes. The event's `recordsReturned` still counts every record.
pub const MAX_RECORD_HASHES: usize = 10_000;

/// Appends `hash` (if any) to `hashes` while they hold fewer than [`MAX_RECORD_HASHES`], else
/// counts it in `omitted`.
pub(crate) fn keep_hash(hashes: &mut Vec<String>, omitted: &mut u64, hash: Option<String>) {
    if let Some(hash) = hash {
        if hashes.len() < MAX_RECORD_HASHES {
            hashes.push(hash);
        } else {
            *omitted += 1;
        }
    }
}

impl TransformStats {
    /// Adds `step`, what `plan` did to a body the plans before it had already transformed
    /// (several policies' plans applied in turn; `first`: none before it): the records
    /// returned as the last plan that selects records counted them (the first plan's, when
    /// none does), the record hashes of the last plan that hashes ids, and every plan's
    /// removed records, filter errors and masked fields summed.
    pub fn then(&mut self, plan: &Plan, step: TransformStats, first: bool) {
        if first || plan.records.is_some() {
            self.records_returned = step.records_returned;
        }
        if first || plan.record_id.is_some() {
            self.record_hashes = step.record_hashes;
            self.record_hashes_omitted = step.record_hashes_omitted;
        }
        self.records_filtered += step.records_filtered;
        self.records_truncated += step.records_truncated;
        self.filter_errors += step.filter_errors;
        if self.masked.is_empty() {
            self.masked = step.masked;
        } else {
            for (class, n) in step.masked {
                *self.masked.entry(class).or_default() += n;
            }
        }
    }
}

/// The transformed response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new body: compact JSON from the parsed-document path; from the streaming path,
    /// the original text with the masked values rewritten and removed members cut.
    Body(Vec<u8>),
    /// The single root record was filtered out (or cut by the record cap): there is nothing
    /// the caller may see.
    RootFiltered,
}

/// The result of [`apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transformed {
    /// The body, or that nothing is left of it.
    pub outcome: Outcome,
    /// What was done.
    pub stats: TransformStats,
}

/// Why a body could not be transformed. Messages hold positions and counts, never content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// The body is empty or only whitespace.
    #[error("response body is empty")]
    EmptyBody,
    /// The body is not JSON.
    #[error("response body is not valid JSON (line {line}, column {column})")]
    NotJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// The body ends in the middle of a JSON value.
    #[error("response body is truncated JSON (ends at line {line}, column {column})")]
    Truncated {
        /// 1-based line where the body ends.
        line: usize,
        /// Column where the body ends.
        column: usize,
    },
    /// More records than the cap, with `on_exceed: Deny`.
    #[error("response holds {records} records, more than the {max} allowed per response")]
    RecordCapExceeded {
        /// Records in the response after the row filter.
        records: u64,
        /// The cap.
        max: u64,
    },
    /// The plan has a row filter, and its records path leads to no array or object to take
    /// records from (the response is not shaped as the policy says: another version of the
    /// app, an envelope, an error document). Refused rather than passed unfiltered.
    #[error("the records path finds no array or object in the response: the row filter cannot apply")]
    RecordsNotFound,
    /// The body must be parsed into a document, and the memory that takes was refused (see
    /// [`apply_within`]).
    #[error("no memory for the parsed document ({needed} bytes)")]
    NoRoomForDocument {
        /// The bytes asked for.
        needed: u64,
    },
    /// Serialising the transformed document failed.
    #[error("failed to serialise the transformed body")]
    Serialize,
}

/// Memory asked for, per byte of body, before a body is parsed into a document
/// ([`apply_within`]): a `serde_json::Value` of a list of short members takes about 14 times
/// the text (measured on a 16 MB list of customer records).
pub const DOCUMENT_BYTES_PER_BODY_BYTE: u64 = 16;

/// Applies `plan` to a JSON response body.
///
/// Order: parse, select the records, drop those the row filter rejects (or fails on), apply
/// the record cap, hash the ids of the records returned, mask each class over the remaining
/// document, serialise (compact). Numbers are kept as written even where `f64` cannot hold
/// them (see the crate documentation); object members keep serde_json's order.
///
/// Plans without a row filter whose paths are all simple go through a single streaming pass
/// over the body (see the crate documentation); everything else, and whatever that pass
/// meets that it does not handle exactly like the parsed document, goes through the parsed
/// document. Both give the same stats, outcome and error kinds, and bodies that parse to
/// the same JSON value.
pub fn apply(body: &[u8], plan: &Plan, vars: &Vars, key: &HashKey) -> Result<Transformed, TransformError> {
    apply_lazy(body, plan, || vars, key)
}

/// [`apply`] with the request's CEL variables built by `vars` only when the plan evaluates
/// an expression (a row filter): the request path saves building them for masking-only plans.
pub fn apply_lazy<V: Borrow<Vars>>(
    body: &[u8],
    plan: &Plan,
    vars: impl FnOnce() -> V,
    key: &HashKey,
) -> Result<Transformed, TransformError> {
    apply_within(body, plan, vars, key, |_| true)
}

/// [`apply_lazy`], asking `room` for [`DOCUMENT_BYTES_PER_BODY_BYTE`] times the body's size
/// before parsing it into a document (the streaming pass needs no more than the body and
/// its output): when `room` refuses, [`TransformError::NoRoomForDocument`]. A body may need
/// the document for reasons its content decides (a duplicate key where a path looks, all 32
/// noncharacters U+FDD0..=U+FDEF, more records than the cap), so a caller bounding its memory cannot tell in advance.
pub fn apply_within<V: Borrow<Vars>>(
    body: &[u8],
    plan: &Plan,
    vars: impl FnOnce() -> V,
    key: &HashKey,
    room: impl FnOnce(u64) -> bool,
) -> Result<Transformed, TransformError> {
    let fresh;
    let compiled = match plan.cache.get(plan) {
        Some(compiled) => compiled,
        None => {
            fresh = Compiled::new(plan);
            &fresh
        }
    };
    if plan.row_filter.is_none()
        && let Some(stream) = &compiled.stream
        && let Some(result) = stream::run(body, plan, stream, key)
    {
        return result;
    }
    let needed = (body.len() as u64).saturating_mul(DOCUMENT_BYTES_PER_BODY_BYTE);
    if !room(needed) {
        return Err(TransformError::NoRoomForDocument { needed });
    }
    dom(body, plan, compiled, vars, key)
}

/// [`apply`] through the parsed document only (for tests and benchmarks).
#[doc(hidden)]
pub fn apply_dom(
    body: &[u8],
    plan: &Plan,
    vars: &Vars,
    key: &HashKey,
) -> Result<Transformed, TransformError> {
    dom(body, plan, &Compiled::new(plan), || vars, key)
}

/// [`apply`] through the streaming pass only (for tests and benchmarks): `None` when the plan
/// is not eligible or the pass handed over to the parsed document.
#[doc(hidden)]
pub fn apply_streaming(
    body: &[u8],
    plan: &Plan,
    key: &HashKey,
) -> Option<Result<Transformed, TransformError>> {
    if plan.row_filter.is_some() {
        return None;
    }
    let stream = plan.cache.get(plan)?.stream.as_ref()?;
    stream::run(body, plan, stream, key)
}

/// Whether the streaming pass can take `plan` at all (row filter, paths, strategies); it may
/// still hand a given body over to the parsed document.
#[doc(hidden)]
pub fn streaming_eligible(plan: &Plan) -> bool {
    plan.row_filter.is_none() && Compiled::new(plan).stream.is_some()
}

/// The parsed-document path (`vars` is called only for a row filter).
fn dom<V: Borrow<Vars>>(
    body: &[u8],
    plan: &Plan,
    compiled: &Compiled,
    vars: impl FnOnce() -> V,
    key: &HashKey,
) -> Result<Transformed, TransformError> {
    let prepared = numbers::prepare(body);
    let marker = prepared.marker;
    let mut doc = parse(body, &prepared)?;
    let mut stats = TransformStats::default();

    let records = match (&plan.records, &plan.row_filter) {
        (Some(records), _) => Some(Records::of(records, compiled.records.as_deref())),
        (None, Some(_)) => Some(Records::Simple(&[])),
        (None, None) => None,
    };
    let vars = plan.row_filter.as_ref().map(|_| vars());
    if let Some(records) = records {
        let mut pass = RecordPass {
            plan,
            filter: plan
                .row_filter
                .as_ref()
                .zip(vars.as_ref())
                .map(|(f, v)| RecordFilter::new(f, v.borrow(), marker)),
            key,
            marker,
            id_path: plan.record_id.as_ref().map(|p| IdPath::of(p, compiled.record_id.as_deref())),
            passed: 0,
            container_found: false,
            stats: &mut stats,
        };
        let root_kept = match records {
            Records::Simple(steps) => {
                let kept = pass.simple(&mut doc, steps);
                if plan.row_filter.is_some() && !pass.container_found {
                    // `{"items": []}` has the container; `{"results": [...]}` or a top-level
                    // array for `$.items[*]` has not: the filter would silently not apply.
                    return Err(TransformError::RecordsNotFound);
                }
                kept
            }
            Records::General(path) => pass.general(&mut doc, path),
        };
        if plan.on_exceed == ExceedAction::Deny
            && let Some(max) = plan.max_records
            && pass.passed > max
        {
            return Err(TransformError::RecordCapExceeded { records: pass.passed, max });
        }
        if !root_kept {
            return Ok(Transformed { outcome: Outcome::RootFiltered, stats });
        }
    }

    // Every mask path is resolved against the positions before any removal: removals are
    // marked as the masks go and made once all are applied.
    let mut pass = MaskPass::default();
    let mut left: usize = plan.masks.iter().map(|class| class.paths.len()).sum();
    for (class, steps) in plan.masks.iter().zip(&compiled.masks) {
        let masker = Masker { strategy: class.strategy, key, marker };
        let mut count = 0;
        for (path, steps) in class.paths.iter().zip(steps) {
            left -= 1;
            count += mask_path(&mut doc, path, steps.as_deref(), &masker, &mut pass, left > 0);
        }
        *stats.masked.entry(class.class.clone()).or_default() += count;
    }
    pass.finish(&mut doc);

    let mut out = Vec::with_capacity(body.len());
    serde_json::to_writer(&mut out, &doc).map_err(|_| TransformError::Serialize)?;
    if prepared.wrapped > 0 {
        out = numbers::unwrap(out, marker);
    }
    Ok(Transformed { outcome: Outcome::Body(out), stats })
}

fn parse(body: &[u8], prepared: &numbers::Prepared<'_>) -> Result<Value, TransformError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(TransformError::EmptyBody);
    }
    match serde_json::from_slice::<Value>(&prepared.body) {
        Ok(doc) if prepared.wrapped == 0 || !has_marked_key(&doc, prepared.marker) => Ok(doc),
        // A number rewritten where only a string is valid (an object key) made an invalid
        // body parse: the original tells what is wrong with it.
        Ok(_) => serde_json::from_slice::<Value>(body).map_err(not_json),
        // Wrapping moves columns: report them as in the original body.
        Err(e) => {
            let column = prepared.original_column(e.line(), e.column());
            Err(not_json_at(&e, e.line(), column))
        }
    }
}

fn not_json(e: serde_json::Error) -> TransformError {
    not_json_at(&e, e.line(), e.column())
}

fn not_json_at(e: &serde_json::Error, line: usize, column: usize) -> TransformError {
    if e.is_eof() {
        TransformError::Truncated { line, column }
    } else {
        TransformError::NotJson { line, column }
    }
}

/// Whether a key of `v` starts with `marker`: a wrapped number where only a string is valid.
fn has_marked_key(v: &Value, marker: Option<char>) -> bool {
    let Some(marker) = marker else {
        return false;
    };
    match v {
        Value::Object(map) => {
            map.iter().any(|(k, v)| k.starts_with(marker) || has_marked_key(v, Some(marker)))
        }
        Value::Array(items) => items.iter().any(|v| has_marked_key(v, Some(marker))),
        _ => false,
    }
}

/// How records are found.
enum Records<'a> {
    Simple(&'a [Step]),
    General(&'a JsonPath),
}

impl<'a> Records<'a> {
    /// `steps`: those of `path`, if it is simple.
    fn of(path: &'a JsonPath, steps: Option<&'a [Step]>) -> Self {
        match steps {
            Some(steps) => Records::Simple(steps),
            None => Records::General(path),
        }
    }
}

/// The record id path, relative to a record.
enum IdPath<'a> {
    Simple(&'a [Step]),
    General(&'a JsonPath),
}

impl<'a> IdPath<'a> {
    /// `steps`: those of `path`, if it is simple.
    fn of(path: &'a JsonPath, steps: Option<&'a [Step]>) -> Self {
        match steps {
            Some(steps) => IdPath::Simple(steps),
            None => IdPath::General(path),
        }
    }

    fn find<'v>(&self, record: &'v Value) -> Option<&'v Value> {
        match self {
            IdPath::Simple(steps) => path::first(record, steps),
            IdPath::General(path) => path.query(record).first(),
        }
    }
}

/// Decides record by record: row filter, cap, id hash.
struct RecordPass<'a> {
    plan: &'a Plan,
    filter: Option<RecordFilter<'a>>,
    key: &'a HashKey,
    /// The body's [`numbers::Prepared::marker`].
    marker: Option<char>,
    id_path: Option<IdPath<'a>>,
    /// Records the row filter accepted so far.
    passed: u64,
    /// A simple records path reached a container to take records from.
    container_found: bool,
    stats: &'a mut TransformStats,
}

impl RecordPass<'_> {
    /// Whether `record` stays in the response.
    fn keep(&mut self, record: &Value) -> bool {
        if let Some(filter) = &mut self.filter {
            match filter.verdict(record) {
                Verdict::Keep => {}
                Verdict::Drop => {
                    self.stats.records_filtered += 1;
                    return false;
                }
                Verdict::Error => {
                    self.stats.records_filtered += 1;
                    self.stats.filter_errors += 1;
                    return false;
                }
            }
        }
        self.passed += 1;
        if let Some(max) = self.plan.max_records
            && self.passed > max
        {
            // with Deny the whole response is refused once all records are counted
            if self.plan.on_exceed == ExceedAction::Truncate {
                self.stats.records_truncated += 1;
            }
            return false;
        }
        self.stats.records_returned += 1;
        if let Some(id_path) = &self.id_path
            && let Some(id) = id_path.find(record)
        {
            let hash = id_hash(id, self.key, self.marker);
            keep_hash(&mut self.stats.record_hashes, &mut self.stats.record_hashes_omitted, hash);
        }
        true
    }

    /// Records of a simple path: removed from their parent as they are decided. Returns
    /// whether the root is still there.
    fn simple(&mut self, doc: &mut Value, steps: &[Step]) -> bool {
        let Some((last, parent)) = steps.split_last() else {
            self.container_found = true;
            return self.keep(doc);
        };
        path::for_each_mut(doc, parent, &mut |container| match (last, container) {
            (Step::Wildcard, Value::Array(items)) => {
                self.container_found = true;
                items.retain(|r| self.keep(r));
            }
            (Step::Wildcard, Value::Object(map)) => {
                self.container_found = true;
                map.retain(|_, r| self.keep(r));
            }
            (Step::Name(name), Value::Object(map)) => {
                self.container_found = true;
                if let Some(record) = map.get(name.as_str())
                    && !self.keep(record)
                {
                    path::remove_member(map, name);
                }
            }
            (Step::Index(index), Value::Array(items)) => {
                self.container_found = true;
                if let Some(i) = path::resolve_index(*index, items.len())
                    && !self.keep(&items[i])
                {
                    items.remove(i);
                }
            }
            _ => {}
        });
        true
    }

    /// Records of any other path: decided in the order the path selects them (the body's,
    /// for wildcards and filters), then those dropped removed all at once
    /// ([`path::remove_all`]).
    fn general(&mut self, doc: &mut Value, records: &JsonPath) -> bool {
        let mut removed: Vec<Vec<Elem>> = Vec::new();
        for location in path::locations_in_query_order(records, doc) {
            let keep = match path::get_mut(doc, &location) {
                Some(record) => self.keep(record),
                None => true,
            };
            if !keep {
                if location.is_empty() {
                    return false;
                }
                removed.push(location);
            }
        }
        path::remove_all(doc, &removed);
        true
    }
}

/// The keyed hash of a record id: strings by their text, numbers by their JSON text (as
/// written; strings starting with `marker` stand for numbers); anything else has none.
pub(crate) fn id_hash(id: &Value, key: &HashKey, marker: Option<char>) -> Option<String> {
    match id {
        Value::String(s) => {
            let text = numbers::number_text(s, marker).unwrap_or(s);
            Some(key.hash_hex(text.as_bytes()))
        }
        Value::Number(_) => Some(key.hash_hex(&json_text(id, marker))),
        _ => None,
    }
}

/// Masks what `path` selects (`steps`: its steps, if it is simple) with `pass`, as one of
/// the plan's mask paths in turn (`later`: others follow it); returns how many locations
/// were masked.
fn mask_path(
    doc: &mut Value,
    path: &JsonPath,
    steps: Option<&[Step]>,
    masker: &Masker<'_>,
    pass: &mut MaskPass,
    later: bool,
) -> u64 {
    if let Some(steps) = steps {
        return pass.steps(doc, steps, masker, later);
    }
    let mut locations = path::locations(path, doc);
    if !pass.direct(masker, later) {
        locations.retain(|location| !pass.removed.covers(location));
        return pass.at(doc, &locations, masker);
    }
    if masker.strategy == MaskStrategy::Remove {
        // All at once (each container filtered once); the root, if selected, last.
        let mut count = path::remove_all(doc, &locations);
        if locations.iter().any(Vec::is_empty) {
            mask_root(doc, masker);
            count += 1;
        }
        return count;
    }
    let mut count = 0;
    // Last to first: a subtree is masked after what it contains.
    for location in locations.iter().rev() {
        if location.is_empty() {
            mask_root(doc, masker);
            count += 1;
        } else if let Some(value) = path::get_mut(doc, location) {
            masker.apply(value);
            count += 1;
        }
    }
    count
}

/// A plan's mask paths applied in turn to one document (or one value of it), each resolved
/// against the positions the document had before any of them removed something: a `Remove`
/// marks what it selects, which later paths then neither select nor count, and the marked
/// nodes are removed all at once by [`MaskPass::finish`]. So `Remove $.a[0]` followed by
/// `Redact $.a[1]` redacts the element that was second, not the one that moved into its
/// place. A mask over a node with marks inside it first makes those removals (it reads the
/// node as they leave it: `Hash`), then replaces the node whole. General paths are queried
/// over the document with the marked nodes still in it (so also their filters see them), and
/// what they select in a marked node is dropped.
#[derive(Default)]
pub(crate) struct MaskPass {
    removed: path::Removal,
}

impl MaskPass {
    /// Whether a mask path can be applied to the document directly, as if alone: nothing is
    /// marked, and it removes nothing or no path follows it (`later`).
    fn direct(&self, masker: &Masker<'_>, later: bool) -> bool {
        self.removed.is_empty() && (masker.strategy != MaskStrategy::Remove || !later)
    }

    /// Masks what the simple `steps` select (`later`: other mask paths follow); returns how
    /// many locations were masked.
    pub(crate) fn steps(&mut self, doc: &mut Value, steps: &[Step], masker: &Masker<'_>, later: bool) -> u64 {
        if self.direct(masker, later) {
            return mask_steps(doc, steps, masker);
        }
        let mut locations = Vec::new();
        self.removed.for_each_kept(doc, steps, &mut Vec::new(), &mut |at| locations.push(at.to_vec()));
        self.at(doc, &locations, masker)
    }

    /// Masks the nodes at `locations` (none of them marked or in a marked node; sorted, an
    /// ancestor before what it contains); returns how many were there.
    fn at(&mut self, doc: &mut Value, locations: &[Vec<Elem>], masker: &Masker<'_>) -> u64 {
        if masker.strategy == MaskStrategy::Remove {
            for location in locations.iter().filter(|l| !l.is_empty()) {
                self.removed.mark(location);
            }
            if locations.iter().any(Vec::is_empty) {
                // the whole document: `null`, nothing left to remove in it
                self.removed = path::Removal::default();
                mask_root(doc, masker);
            }
            return locations.len() as u64;
        }
        let mut count = 0;
        // Last to first: a subtree is masked after what it contains.
        for location in locations.iter().rev() {
            let pending = self.removed.take_below(location);
            if let Some(value) = path::get_mut(doc, location) {
                if let Some(pending) = pending {
                    pending.sweep(value);
                }
                masker.apply(value);
                count += 1;
            }
        }
        count
    }

    /// Makes the marked removals.
    pub(crate) fn finish(self, doc: &mut Value) {
        if !self.removed.is_empty() {
            self.removed.sweep(doc);
        }
    }
}

/// Masks what a simple path selects; returns how many locations were masked.
pub(crate) fn mask_steps(doc: &mut Value, steps: &[Step], masker: &Masker<'_>) -> u64 {
    let Some((last, parent)) = steps.split_last() else {
        mask_root(doc, masker);
        return 1;
    };
    let remove = masker.strategy == MaskStrategy::Remove;
    let mut count = 0;
    path::for_each_mut(doc, parent, &mut |container| {
        count += mask_child(container, last, masker, remove);
    });
    count
}

/// The whole document is masked; `Remove` leaves `null`.
fn mask_root(doc: &mut Value, masker: &Masker<'_>) {
    masker.apply(doc);
}

fn mask_child(container: &mut Value, step: &Step, masker: &Masker<'_>, remove: bool) -> u64 {
    match (step, container) {
        (Step::Name(name), Value::Object(map)) => {
            if remove {
                u64::from(path::remove_member(map, name))
            } else if let Some(value) = map.get_mut(name.as_str()) {
                masker.apply(value);
                1
            } else {
                0
            }
        }
        (Step::Index(index), Value::Array(items)) => {
            let Some(i) = path::resolve_index(*index, items.len()) else {
                return 0;
            };
            if remove {
                items.remove(i);
            } else {
                masker.apply(&mut items[i]);
            }
            1
        }
        (Step::Wildcard, Value::Array(items)) => {
            let n = items.len() as u64;
            if remove {
                items.clear();
            } else {
                for value in items.iter_mut() {
                    masker.apply(value);
                }
            }
            n
        }
        (Step::Wildcard, Value::Object(map)) => {
            let n = map.len() as u64;
            if remove {
                map.clear();
            } else {
                for value in map.values_mut() {
                    masker.apply(value);
                }
            }
            n
        }
        _ => 0,
    }
}
