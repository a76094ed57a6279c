//! The streaming path of [`apply`](crate::apply): one pass over the body that validates it
//! as JSON, copies every byte no path reaches verbatim and rewrites only the values masks
//! select.
//!
//! # Eligible plans
//!
//! A plan is streamed when it has no row filter, every path (records, record id, masks) is
//! simple (names, non-negative indices and wildcards, see [`path`](crate::path)), it has at
//! most [`MAX_ENTRIES`] paths. Anything else goes through the parsed document. Both resolve
//! every mask path against the positions the body has (a `Remove` of an array element does
//! not shift the indices a later mask uses, see [`MaskPass`]).
//!
//! # How
//!
//! Each value is visited with the set of paths that can still reach it or into it (a bit
//! set over the plan's paths). Values no path reaches are skipped with a validating scan
//! that decodes nothing. A value that some mask selects whole is decoded (just that value,
//! numbers wrapped as the parsed document does) and every mask path that reaches it is
//! applied to it in plan order with the very code the parsed document uses, so that the
//! masked text, the counts and the interplay of masks (a later mask seeing an earlier one's
//! result, a removal hiding a value from later masks) are identical. Records are counted
//! where the records path selects them, and record ids are hashed from the original values
//! (the first value the id path selects in each record, as the parsed document does).
//! `Remove` deletes the member or element, with its comma. While every edit keeps the length
//! of what it rewrites (stars over ASCII text, the common case), the body is copied once and
//! the edits are made in the copy; from the first edit of another length on, the output is
//! built piecewise.
//!
//! # Handing over
//!
//! The pass stops and lets the parsed document do the work ([`Stop::Fallback`]) when it
//! meets what it would not handle exactly like it: more records than `max_records` (the cap
//! truncates or refuses), a duplicate key where a path looks (the parsed document keeps the
//! last value at the first position), the last of all 32 noncharacters U+FDD0..=U+FDEF (the
//! parsed document then has no marker for numbers and turns off number preservation, see
//! [`numbers`](crate::numbers)). Fewer of them are noted as they are met and otherwise
//! treated as any other character: copied where the pass skips a string, decoded where it
//! reads one (a decoded value's numbers are wrapped with a marker it does not hold, which
//! masks alike). An escaped lone surrogate is copied as it is where the pass only skips the
//! string, and read as U+FFFD where it decodes it (keys, ids, masked values), as the parsed
//! document reads it. Invalid JSON is reported with the same error
//! kind as the parsed document reports ([`TransformError::NotJson`] or
//! [`TransformError::Truncated`]), at the offending byte; nesting deeper than serde_json's
//! recursion limit is refused as it refuses it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use custos_api::policy::MaskStrategy;
use serde_json::Value;

use crate::apply::{MaskPass, Outcome, TransformError, TransformStats, Transformed, id_hash, keep_hash};
use crate::hash::HashKey;
use crate::mask::{self, Masker};
use crate::numbers;
use crate::path::{self, Step};
use crate::plan::{Compiled, Plan};

/// Containers open at once: serde_json refuses the 128th nested one (its recursion limit),
/// and so does this pass.
const MAX_OPEN: u32 = 128;

/// A set of the plan's paths, one bit each.
type Bits = u64;

/// At most this many paths (records, record id and mask paths together) are streamed: one
/// bit each in a [`Bits`]. A plan with more goes through the parsed document.
pub(crate) const MAX_ENTRIES: usize = Bits::BITS as usize;

/// What one path of the plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A mask path of `plan.masks[class]`.
    Mask { class: usize, strategy: MaskStrategy },
    /// The records path.
    Records,
    /// The record id path, relative to a record.
    Id,
}

/// One path of the plan.
#[derive(Debug)]
struct Entry {
    steps: Vec<Step>,
    role: Role,
}

/// A plan as the streaming pass applies it; built once per plan.
#[derive(Debug)]
pub(crate) struct StreamPlan {
    /// Mask paths in plan order (class, then path), then the records and id paths. Bit `i`
    /// of the sets below stands for `entries[i]`.
    entries: Vec<Entry>,
    /// Paths walked from the root: masks and records.
    root: Bits,
    /// Of those, the paths that select the root itself.
    root_full: Bits,
    /// Mask paths.
    masks: Bits,
    /// The records path (0 when none).
    records: Bits,
    /// The record id path (0 when none).
    id: Bits,
    /// Whether the id path is `$` (the record itself).
    id_is_record: bool,
}

impl StreamPlan {
    /// The streaming form of `plan`, or `None` if the plan is not eligible (row filters are
    /// checked on each call instead).
    pub(crate) fn new(plan: &Plan, compiled: &Compiled) -> Option<Self> {
        let mut entries = Vec::new();
        for (class, (mask, steps)) in plan.masks.iter().zip(&compiled.masks).enumerate() {
            for steps in steps {
                let steps = streamable(steps.as_ref()?)?;
                entries.push(Entry { steps, role: Role::Mask { class, strategy: mask.strategy } });
            }
        }
        if plan.records.is_some() {
            entries.push(Entry { steps: streamable(compiled.records.as_ref()?)?, role: Role::Records });
            if plan.record_id.is_some() {
                entries.push(Entry { steps: streamable(compiled.record_id.as_ref()?)?, role: Role::Id });
            }
        }
        if entries.len() > MAX_ENTRIES {
            return None;
        }
        let bits = |f: &dyn Fn(&Entry) -> bool| {
            entries.iter().enumerate().filter(|(_, e)| f(e)).fold(0 as Bits, |acc, (i, _)| acc | 1 << i)
        };
        let root = bits(&|e| e.role != Role::Id);
        let root_full = bits(&|e| e.role != Role::Id && e.steps.is_empty());
        let masks = bits(&|e| matches!(e.role, Role::Mask { .. }));
        let records = bits(&|e| e.role == Role::Records);
        let id = bits(&|e| e.role == Role::Id);
        let id_is_record = entries.iter().any(|e| e.role == Role::Id && e.steps.is_empty());
        Some(StreamPlan { entries, root, root_full, masks, records, id, id_is_record })
    }
}

/// `steps`, if they hold no negative index (which needs the array's length up front).
fn streamable(steps: &[Step]) -> Option<Vec<Step>> {
    steps.iter().all(|s| !matches!(s, Step::Index(i) if *i < 0)).then(|| steps.to_vec())
}

/// Why the pass stopped early.
#[derive(Debug)]
enum Stop {
    /// The body is not valid JSON: the offending byte (or the body's length, when it ends
    /// too soon), turned into the error at the end of the pass (a small `Err` keeps every
    /// step's result in registers).
    Invalid(usize),
    /// Something the parsed document must decide.
    Fallback,
}

type Res<T> = Result<T, Stop>;

/// Runs the streaming pass: `None` when it handed over to the parsed document.
pub(crate) fn run(
    body: &[u8],
    plan: &Plan,
    stream: &StreamPlan,
    key: &HashKey,
) -> Option<Result<Transformed, TransformError>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Some(Err(TransformError::EmptyBody));
    }
    let mut walker = Walker {
        buf: body,
        pos: 0,
        out: Vec::new(),
        copied: 0,
        in_place: true,
        plan: stream,
        key,
        max_records: plan.max_records,
        records: 0,
        masked: vec![0; plan.masks.len()],
        hashes: Vec::new(),
        hashes_omitted: 0,
        record_depth: 0,
        id_pending: false,
        string_start: 0,
        markers: 0,
        name_steps: Vec::new(),
        key_sets: Vec::new(),
    };
    match walker.document() {
        Ok(()) => {}
        Err(Stop::Invalid(at)) => return Some(Err(error_at(body, at))),
        Err(Stop::Fallback) => return None,
    }
    let mut masked = BTreeMap::new();
    for (class, count) in plan.masks.iter().zip(&walker.masked) {
        *masked.entry(class.class.clone()).or_default() += count;
    }
    let stats = TransformStats {
        records_returned: walker.records,
        masked,
        record_hashes: walker.hashes,
        record_hashes_omitted: walker.hashes_omitted,
        ..TransformStats::default()
    };
    Some(Ok(Transformed { outcome: Outcome::Body(walker.out), stats }))
}

/// The members of one container as kept or removed, to cut removed ones with their commas.
struct Cuts {
    /// Where the first member starts.
    first: usize,
    /// Where the previous member ends.
    prev_end: usize,
    kept_any: bool,
    removed_any: bool,
}

impl Cuts {
    fn new(first: usize) -> Self {
        Cuts { first, prev_end: first, kept_any: false, removed_any: false }
    }
}

/// Keys of an object seen so far, for paths with a wildcard over it.
#[derive(Default)]
struct KeySet<'a> {
    small: Vec<Cow<'a, [u8]>>,
    large: Option<HashSet<Cow<'a, [u8]>>>,
}

impl<'a> KeySet<'a> {
    /// Adds `key`; false if it was there already.
    fn insert(&mut self, key: Cow<'a, [u8]>) -> bool {
        const SMALL: usize = 16;
        if self.small.len() < SMALL {
            if self.small.contains(&key) {
                return false;
            }
            self.small.push(key);
            return true;
        }
        self.large.get_or_insert_with(|| self.small.iter().cloned().collect()).insert(key)
    }
}

struct Walker<'a> {
    buf: &'a [u8],
    /// The next byte to read.
    pos: usize,
    out: Vec<u8>,
    /// Bytes of `buf` before this are written to `out` or cut (when not [`Self::in_place`]).
    copied: usize,
    /// No edit so far has changed the length of what it rewrote: `out` is empty (no edit
    /// yet) or a copy of all of `buf` with the edits made in it, at the same offsets. Most
    /// masks keep the length (stars over ASCII text), so the body is copied once rather than
    /// piecewise between the masked values; the first edit of another length leaves the mode.
    in_place: bool,
    plan: &'a StreamPlan,
    key: &'a HashKey,
    max_records: Option<u64>,
    /// Records seen.
    records: u64,
    /// Masked locations by class index.
    masked: Vec<u64>,
    hashes: Vec<String>,
    /// Ids not hashed: past [`crate::MAX_RECORD_HASHES`].
    hashes_omitted: u64,
    /// Depth of the record being walked.
    record_depth: u32,
    /// Inside a record whose id has not been found yet.
    id_pending: bool,
    /// Where the content of the string last scanned starts.
    string_start: usize,
    /// The marker candidates U+FDD0..=U+FDEF met so far, raw or escaped (bit `k`: U+FDD0 +
    /// `k`): the pass hands over when all are.
    markers: u32,
    /// The name steps of the objects being walked, innermost last (see [`Walker::object`]).
    name_steps: Vec<NameStep<'a>>,
    /// The keys seen so far in each object being walked that a wildcard reaches, innermost
    /// last (kept here rather than in `object`'s frame, which would drop one for every
    /// object).
    key_sets: Vec<KeySet<'a>>,
}

/// A path of the plan that reaches an object's member by name.
#[derive(Clone, Copy)]
struct NameStep<'a> {
    name: &'a [u8],
    bit: Bits,
    /// The path ends at that member.
    last: bool,
}

impl<'a> Walker<'a> {
    fn document(&mut self) -> Res<()> {
        self.out.reserve(self.buf.len() + 64);
        self.ws();
        let (alive, full) = (self.plan.root, self.plan.root_full);
        if full & self.plan.masks != 0 {
            let start = self.pos;
            if let Some(value) = self.masked_value(alive, 0, true)? {
                self.replace(start, self.pos, &value)?;
            }
        } else {
            self.walk(alive, full, 0)?;
        }
        self.ws();
        if self.pos < self.buf.len() {
            return Err(self.fail());
        }
        if !self.in_place {
            self.out.extend_from_slice(&self.buf[self.copied..]);
        } else if self.out.is_empty() {
            self.out.extend_from_slice(self.buf);
        }
        Ok(())
    }

    // ---- output ----------------------------------------------------------------------------

    /// Drops `buf[from..to]` from the output (what is before it and not yet copied is
    /// copied).
    #[inline]
    fn cut(&mut self, from: usize, to: usize) {
        if self.in_place {
            self.leave_in_place(from);
        }
        if from > self.copied {
            self.out.extend_from_slice(&self.buf[self.copied..from]);
        }
        self.copied = self.copied.max(to);
    }

    /// Leaves [`Self::in_place`] at `at`, which no edit made so far lies after: `out` holds
    /// `buf[..at]` as edited, and `copied` is `at`.
    #[cold]
    fn leave_in_place(&mut self, at: usize) {
        if self.out.is_empty() {
            self.out.extend_from_slice(&self.buf[..at]);
        } else {
            self.out.truncate(at);
        }
        self.copied = at;
        self.in_place = false;
    }

    /// Writes `value` in place of `buf[from..to]`.
    fn replace(&mut self, from: usize, to: usize, value: &Value) -> Res<()> {
        self.cut(from, from);
        serde_json::to_writer(&mut self.out, value).map_err(|_| Stop::Fallback)?;
        self.copied = to;
        Ok(())
    }

    /// A member starting at `start` stays: if only removed members came before it, the
    /// comma they left goes.
    #[inline]
    fn keep(&mut self, cuts: &mut Cuts, start: usize) {
        if cuts.removed_any && !cuts.kept_any {
            self.cut(cuts.prev_end, start);
        }
        cuts.kept_any = true;
    }

    /// The member `start..end` goes, with the comma before it (or, if it is the first kept,
    /// with everything before it; the comma after it goes with the next kept member).
    fn remove(&mut self, cuts: &mut Cuts, start: usize, end: usize) {
        if cuts.kept_any {
            self.cut(cuts.prev_end, end);
        } else {
            self.cut(cuts.first.min(start), end);
        }
        cuts.removed_any = true;
    }

    // ---- walking ---------------------------------------------------------------------------

    /// Which step of entry `bit`'s path leads from a node at `depth` to its children.
    fn step_index(&self, bit: Bits, depth: u32) -> usize {
        let depth = if bit == self.plan.id { depth - self.record_depth } else { depth };
        depth as usize
    }

    /// The entries of `alive` (at a node of `depth`) that reach the child with `key` (object
    /// member) or at `index` (array element), and those of them that select it. A name
    /// matched a second time in the object is a duplicate key: handed over.
    fn child_bits(
        &self,
        alive: Bits,
        depth: u32,
        key: Option<&[u8]>,
        index: usize,
        seen: &mut Bits,
    ) -> Res<(Bits, Bits)> {
        let (mut child, mut full) = (0, 0);
        let mut bits = alive;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= bits - 1;
            // A record id already found is looked for no further, but a later duplicate of a
            // key on its way would still change which value the parsed document reads.
            let found_id = bit == self.plan.id && !self.id_pending;
            let entry = &self.plan.entries[bit.trailing_zeros() as usize];
            let k = self.step_index(bit, depth);
            let hit = match (entry.steps.get(k), key) {
                (Some(Step::Wildcard), _) => true,
                (Some(Step::Name(name)), Some(key)) if name.as_bytes() == key => {
                    if *seen & bit != 0 {
                        return Err(Stop::Fallback);
                    }
                    *seen |= bit;
                    true
                }
                (Some(Step::Index(i)), None) => usize::try_from(*i).is_ok_and(|i| i == index),
                _ => false,
            };
            if hit && !found_id {
                child |= bit;
                if entry.steps.len() == k + 1 {
                    full |= bit;
                }
            }
        }
        Ok((child, full))
    }

    /// Whether a path of `alive` (at a node of `depth`) has a wildcard into its children.
    fn has_wildcard(&self, alive: Bits, depth: u32) -> bool {
        let mut bits = alive;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= bits - 1;
            let entry = &self.plan.entries[bit.trailing_zeros() as usize];
            if matches!(entry.steps.get(self.step_index(bit, depth)), Some(Step::Wildcard)) {
                return true;
            }
        }
        false
    }

    /// The value at `pos`, reached by the paths of `alive`, selected whole by those of `full`
    /// (none of them a mask).
    fn walk(&mut self, mut alive: Bits, mut full: Bits, depth: u32) -> Res<()> {
        let record = full & self.plan.records != 0;
        if record {
            self.count_records(1)?;
            if self.plan.id != 0 {
                self.record_depth = depth;
                self.id_pending = true;
                alive |= self.plan.id;
                if self.plan.id_is_record {
                    full |= self.plan.id;
                }
            }
        }
        let rest = alive & !full;
        let result = if full & self.plan.id != 0 && self.id_pending {
            self.id_pending = false;
            self.record_id(rest, depth)
        } else {
            self.descend(rest, depth)
        };
        if record {
            self.id_pending = false;
        }
        result
    }

    /// Into the value at `pos` for the paths of `rest`, or over it if none reaches further.
    fn descend(&mut self, rest: Bits, depth: u32) -> Res<()> {
        match self.peek() {
            Some(b'{') if rest != 0 => self.object(rest, depth),
            Some(b'[') if rest != 0 => self.array(rest, depth),
            _ => self.skip_value(depth),
        }
    }

    /// The value at `pos` is the id of the current record: strings and numbers are hashed.
    fn record_id(&mut self, rest: Bits, depth: u32) -> Res<()> {
        let start = self.pos;
        match self.peek() {
            Some(b'"') => {
                // as a `Value::String` holds it (the parsed document's marker is one the body
                // does not hold: no string of the body stands for a number)
                let text = self.string_text()?;
                let hash = self.key.hash_hex(text.as_bytes());
                keep_hash(&mut self.hashes, &mut self.hashes_omitted, Some(hash));
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                let token = &self.buf[start..self.pos];
                let hash = if is_plain_integer(token) {
                    // serde_json writes such an integer back exactly as written
                    Some(self.key.hash_hex(token))
                } else {
                    id_hash(&number_value(token)?, self.key, Some(numbers::SENTINEL))
                };
                keep_hash(&mut self.hashes, &mut self.hashes_omitted, hash);
                Ok(())
            }
            _ => self.descend(rest, depth),
        }
    }

    /// Counts records; more than the cap: handed over (the parsed document truncates or
    /// refuses).
    fn count_records(&mut self, n: u64) -> Res<()> {
        self.records += n;
        match self.max_records {
            Some(max) if self.records > max => Err(Stop::Fallback),
            _ => Ok(()),
        }
    }

    fn object(&mut self, alive: Bits, depth: u32) -> Res<()> {
        self.open(depth)?;
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        let buf = self.buf;
        let mut seen = 0;
        let mut cuts = Cuts::new(self.pos);
        // The steps into this object's members, sorted out once rather than for each member:
        // wildcards reach every member, names are compared with each key, and the record id
        // (whose step depends on where its record started) goes through `child_bits`.
        let plan = self.plan;
        let frame = self.name_steps.len();
        let (mut wild_child, mut wild_full, mut by_id) = (0, 0, 0);
        let mut bits = alive;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= bits - 1;
            if bit == plan.id {
                by_id = bit;
                continue;
            }
            let entry = &plan.entries[bit.trailing_zeros() as usize];
            let k = depth as usize;
            let last = entry.steps.len() == k + 1;
            match entry.steps.get(k) {
                Some(Step::Wildcard) => {
                    wild_child |= bit;
                    if last {
                        wild_full |= bit;
                    }
                }
                Some(Step::Name(name)) => self.name_steps.push(NameStep { name: name.as_bytes(), bit, last }),
                _ => {}
            }
        }
        let names = frame..self.name_steps.len();
        // Duplicate keys matter (handed over) when a wildcard reaches every member.
        let wildcard = wild_child != 0 || (by_id != 0 && self.has_wildcard(by_id, depth));
        if wildcard {
            self.key_sets.push(KeySet::default());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.fail());
            }
            let start = self.pos;
            let escaped = self.string()?;
            let key: Cow<'a, [u8]> = if escaped {
                let key = decode_escaped(&buf[start..self.pos]).ok_or(Stop::Fallback)?;
                Cow::Owned(key.into_bytes())
            } else {
                Cow::Borrowed(&buf[start + 1..self.pos - 1])
            };
            self.ws();
            if self.peek() != Some(b':') {
                return Err(self.fail());
            }
            self.pos += 1;
            self.ws();
            let (mut child, mut full) = (wild_child, wild_full);
            for step in &self.name_steps[names.clone()] {
                if step.name == &*key {
                    if seen & step.bit != 0 {
                        return Err(Stop::Fallback);
                    }
                    seen |= step.bit;
                    child |= step.bit;
                    if step.last {
                        full |= step.bit;
                    }
                }
            }
            if by_id != 0 {
                let (c, f) = self.child_bits(by_id, depth, Some(&key), 0, &mut seen)?;
                child |= c;
                full |= f;
            }
            if wildcard && !self.key_sets.last_mut().is_some_and(|keys| keys.insert(key)) {
                return Err(Stop::Fallback);
            }
            if child == 0 {
                // What `member` does for a value no path reaches, without the call: most
                // members are such.
                self.keep(&mut cuts, start);
                self.skip_value(depth + 1)?;
                cuts.prev_end = self.pos;
            } else {
                self.member(child, full, depth + 1, start, &mut cuts)?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    self.name_steps.truncate(frame);
                    if wildcard {
                        self.key_sets.pop();
                    }
                    return Ok(());
                }
                _ => return Err(self.fail()),
            }
        }
    }

    fn array(&mut self, alive: Bits, depth: u32) -> Res<()> {
        self.open(depth)?;
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        let mut cuts = Cuts::new(self.pos);
        let mut seen = 0;
        let mut index = 0;
        // As in `object`: the wildcard steps reach every element and are sorted out once;
        // indices and the record id go through `child_bits` for each element.
        let plan = self.plan;
        let (mut wild_child, mut wild_full, mut by_element) = (0, 0, 0);
        let mut bits = alive;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= bits - 1;
            let steps = &plan.entries[bit.trailing_zeros() as usize].steps;
            match steps.get(depth as usize) {
                _ if bit == plan.id => by_element |= bit,
                Some(Step::Wildcard) => {
                    wild_child |= bit;
                    if steps.len() == depth as usize + 1 {
                        wild_full |= bit;
                    }
                }
                Some(Step::Index(_)) => by_element |= bit,
                _ => {}
            }
        }
        loop {
            let start = self.pos;
            let (mut child, mut full) = (wild_child, wild_full);
            if by_element != 0 {
                let (c, f) = self.child_bits(by_element, depth, None, index, &mut seen)?;
                child |= c;
                full |= f;
            }
            self.member(child, full, depth + 1, start, &mut cuts)?;
            index += 1;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        return Err(self.fail());
                    }
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.fail()),
            }
        }
    }

    /// One member (starting at `start`, its value at `pos`) of a container: skipped, walked,
    /// masked or removed.
    fn member(&mut self, alive: Bits, full: Bits, depth: u32, start: usize, cuts: &mut Cuts) -> Res<()> {
        if alive == 0 {
            self.keep(cuts, start);
            self.skip_value(depth)?;
        } else if full & self.plan.masks != 0 {
            let value_start = self.pos;
            if self.masked_plain_string(alive, depth, cuts, start)? {
                cuts.prev_end = self.pos;
                return Ok(());
            }
            match self.masked_value(alive, depth, false)? {
                Some(value) => {
                    self.keep(cuts, start);
                    self.replace(value_start, self.pos, &value)?;
                }
                None => self.remove(cuts, start, self.pos),
            }
        } else {
            self.keep(cuts, start);
            self.walk(alive, full, depth)?;
        }
        cuts.prev_end = self.pos;
        Ok(())
    }

    /// The common case of [`Self::masked_value`], written straight to the output without a
    /// decoded value or the serialiser: a string without escapes, selected whole by exactly
    /// one mask that keeps part of it (`ShowLast4`, `ShowFirst1`), at a node where no record
    /// or id is taken. `false`: not that case, nothing consumed.
    fn masked_plain_string(&mut self, alive: Bits, depth: u32, cuts: &mut Cuts, start: usize) -> Res<bool> {
        let plan = self.plan;
        let bits = alive & plan.masks;
        if self.peek() != Some(b'"') || alive & (plan.records | plan.id) != 0 || bits.count_ones() != 1 {
            return Ok(false);
        }
        let entry = &plan.entries[bits.trailing_zeros() as usize];
        let Role::Mask { class, strategy } = entry.role else { return Ok(false) };
        if entry.steps.len() != depth as usize || !mask::keeps_part(strategy) {
            return Ok(false);
        }
        let value_start = self.pos;
        let (escaped, ascii) = self.scan_string()?;
        if escaped {
            self.pos = value_start;
            return Ok(false);
        }
        let buf = self.buf;
        let (text_start, end) = (self.string_start, self.pos - 1);
        let text = &buf[text_start..end];
        if !ascii && std::str::from_utf8(text).is_err() {
            return Err(Stop::Invalid(end));
        }
        self.keep(cuts, start);
        if ascii {
            // One star for each character: the masked literal is as long as the original, so
            // the stars go over the original in the copy of the body, or over the original
            // copied with what comes before it.
            let at = if self.in_place {
                if self.out.is_empty() {
                    self.out.extend_from_slice(buf);
                }
                text_start
            } else {
                self.cut(self.pos, self.pos);
                self.out.len() - (self.pos - text_start)
            };
            mask::star_ascii(&mut self.out[at..at + text.len()], strategy);
        } else {
            self.cut(value_start, value_start);
            mask::write_partial(&mut self.out, text, ascii, strategy);
            self.copied = self.pos;
        }
        self.masked[class] += 1;
        Ok(true)
    }

    /// The value at `pos`, which a mask selects whole: decoded, records and ids taken from
    /// it, then every mask path that reaches it applied in plan order. `None`: removed.
    /// (Not inlined: its frame would weigh on every member.)
    #[inline(never)]
    fn masked_value(&mut self, alive: Bits, depth: u32, root: bool) -> Res<Option<Value>> {
        let plan = self.plan;
        // `marker`: what strings standing for numbers start with, in this value
        let (mut value, marker) = if self.peek() == Some(b'"') {
            (Value::String(self.string_text()?.into_owned()), None)
        } else {
            let start = self.pos;
            self.skip_value(depth)?;
            decode(&self.buf[start..self.pos]).ok_or(Stop::Fallback)?
        };
        let depth = depth as usize;

        // records and their ids, from the original value
        let id_steps = plan.entries.iter().find(|e| e.role == Role::Id).map(|e| e.steps.as_slice());
        if alive & plan.records != 0 {
            let entry = &plan.entries[plan.records.trailing_zeros() as usize];
            let (mut count, mut hashes, mut omitted) = (0, std::mem::take(&mut self.hashes), 0);
            let key = self.key;
            path::for_each_mut(&mut value, &entry.steps[depth..], &mut |record| {
                count += 1;
                if let Some(id) = id_steps.and_then(|steps| path::first(record, steps)) {
                    keep_hash(&mut hashes, &mut omitted, id_hash(id, key, marker));
                }
            });
            self.hashes = hashes;
            self.hashes_omitted += omitted;
            self.count_records(count)?;
        }
        if self.id_pending
            && alive & plan.id != 0
            && let Some(steps) = id_steps
            && let Some(id) = path::first(&value, &steps[depth - self.record_depth as usize..])
        {
            let hash = id_hash(id, self.key, marker);
            keep_hash(&mut self.hashes, &mut self.hashes_omitted, hash);
            self.id_pending = false;
        }

        // masks, in plan order, each against the positions before any removal (as the
        // parsed document applies them)
        let mut pass = MaskPass::default();
        let mut bits = alive & plan.masks;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= bits - 1;
            let entry = &plan.entries[bit.trailing_zeros() as usize];
            let Role::Mask { class, strategy } = entry.role else { continue };
            let rest = &entry.steps[depth..];
            if rest.is_empty() && strategy == MaskStrategy::Remove && !root {
                self.masked[class] += 1;
                return Ok(None);
            }
            let masker = Masker { strategy, key: self.key, marker };
            self.masked[class] += pass.steps(&mut value, rest, &masker, bits & plan.masks != 0);
        }
        pass.finish(&mut value);
        Ok(Some(value))
    }

    // ---- validation ------------------------------------------------------------------------

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// The byte at `pos` is wrong, or missing.
    fn fail(&self) -> Stop {
        Stop::Invalid(self.pos)
    }

    /// A container at `depth` opens at `pos`: refused where serde_json's recursion limit
    /// refuses it.
    fn open(&self, depth: u32) -> Res<()> {
        if depth + 1 >= MAX_OPEN { Err(self.fail()) } else { Ok(()) }
    }

    /// Validates and skips the value at `pos` (a node at `depth`), without decoding it.
    #[inline]
    fn skip_value(&mut self, depth: u32) -> Res<()> {
        match self.peek() {
            Some(b'{' | b'[') => self.skip_container(depth),
            _ => self.scalar(),
        }
    }

    #[inline]
    fn scalar(&mut self) -> Res<()> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.fail()),
        }
    }

    /// Skips a container and everything in it, iteratively (bit `i` of `objects`: the
    /// container `i` levels in is an object).
    fn skip_container(&mut self, depth: u32) -> Res<()> {
        let mut objects: u128 = 0;
        let mut level: u32 = 0;
        loop {
            // at a value
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    self.open(depth + level)?;
                    let object = open == b'{';
                    if object {
                        objects |= 1 << level;
                    } else {
                        objects &= !(1 << level);
                    }
                    level += 1;
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(if object { b'}' } else { b']' }) {
                        self.pos += 1;
                        level -= 1;
                    } else {
                        if object {
                            self.key_and_colon()?;
                        }
                        continue;
                    }
                }
                _ => self.scalar()?,
            }
            // after a value
            loop {
                if level == 0 {
                    return Ok(());
                }
                self.ws();
                let object = objects & (1 << (level - 1)) != 0;
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.ws();
                        if object {
                            self.key_and_colon()?;
                        } else if self.peek() == Some(b']') {
                            return Err(self.fail());
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.pos += 1;
                        level -= 1;
                    }
                    Some(b']') if !object => {
                        self.pos += 1;
                        level -= 1;
                    }
                    _ => return Err(self.fail()),
                }
            }
        }
    }

    /// An object key and its colon, leaving `pos` at the value.
    fn key_and_colon(&mut self) -> Res<()> {
        if self.peek() != Some(b'"') {
            return Err(self.fail());
        }
        self.string()?;
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.fail());
        }
        self.pos += 1;
        self.ws();
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Res<()> {
        for &b in word {
            if self.peek() != Some(b) {
                return Err(self.fail());
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Res<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.fail()),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.fail());
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.fail());
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    /// Validates the string whose opening quote is at `pos` (escapes, control characters,
    /// UTF-8) and moves past it; returns whether it holds escapes.
    #[inline(always)]
    fn string(&mut self) -> Res<bool> {
        let (escaped, ascii) = self.scan_string()?;
        if !ascii && std::str::from_utf8(&self.buf[self.string_start..self.pos - 1]).is_err() {
            // serde_json reports it at the closing quote
            return Err(Stop::Invalid(self.pos - 1));
        }
        Ok(escaped)
    }

    /// The string whose opening quote is at `pos`, validated: its content (without quotes).
    fn string_text(&mut self) -> Res<Cow<'a, str>> {
        let buf = self.buf;
        let (escaped, ascii) = self.scan_string()?;
        let (start, end) = (self.string_start, self.pos - 1);
        if escaped {
            // serde_json decodes escapes (and checks UTF-8) as the parsed document does
            return match decode_escaped(&buf[start - 1..=end]) {
                Some(text) => Ok(Cow::Owned(text)),
                None if !ascii && std::str::from_utf8(&buf[start..end]).is_err() => Err(Stop::Invalid(end)),
                None => Err(Stop::Fallback),
            };
        }
        match std::str::from_utf8(&buf[start..end]) {
            Ok(text) => Ok(Cow::Borrowed(text)),
            Err(_) => Err(Stop::Invalid(end)),
        }
    }

    /// Scans the string whose opening quote is at `pos` and moves past it, checking all but
    /// UTF-8; its content starts at `string_start`. Returns whether it holds escapes and
    /// whether its raw bytes are all ASCII.
    ///
    /// Most strings of a response are keys and values of printable ASCII: they are scanned
    /// here, eight bytes at a time, without the bookkeeping for escapes and non-ASCII text,
    /// which [`Self::scan_string_rest`] takes over from the first byte that is not plain.
    #[inline]
    fn scan_string(&mut self) -> Res<(bool, bool)> {
        let start = self.pos + 1;
        self.string_start = start;
        let buf = self.buf;
        let mut i = start;
        loop {
            let Some(word) = buf.get(i..i + 8) else {
                while i < buf.len() && PLAIN_ASCII[usize::from(buf[i])] {
                    i += 1;
                }
                break;
            };
            let mut bytes = [0; 8];
            bytes.copy_from_slice(word);
            let stops = ascii_stops(u64::from_le_bytes(bytes));
            if stops != 0 {
                i += (stops.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        if buf.get(i) == Some(&b'"') {
            self.pos = i + 1;
            return Ok((false, true));
        }
        self.scan_string_rest(i)
    }

    /// The rest of [`Self::scan_string`] from `i`, all bytes before which are plain ASCII.
    #[inline(never)]
    fn scan_string_rest(&mut self, mut i: usize) -> Res<(bool, bool)> {
        let mut escaped = false;
        let mut ascii = true;
        loop {
            let (stop, plain_ascii) = skip_plain(self.buf, i);
            ascii &= plain_ascii;
            i = stop;
            match self.buf.get(i) {
                None => {
                    self.pos = i;
                    return Err(self.fail());
                }
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok((escaped, ascii));
                }
                Some(b'\\') => {
                    escaped = true;
                    i = self.escape(i + 1)?;
                }
                Some(0xEF) => {
                    if let Some(k) = numbers::raw_marker(self.buf, i) {
                        self.marker_met(k)?;
                    }
                    ascii = false;
                    i += 1;
                }
                Some(_) => return Err(Stop::Invalid(i)),
            }
        }
    }

    /// The escape whose backslash is just before `i`; returns where the string goes on.
    fn escape(&mut self, i: usize) -> Res<usize> {
        match self.buf.get(i) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 1),
            Some(b'u') => match self.hex4(i + 1)? {
                // a marker candidate: noted
                code @ 0xFDD0..=0xFDEF => {
                    if let Some(k) = numbers::escaped_marker(code) {
                        self.marker_met(k)?;
                    }
                    Ok(i + 5)
                }
                // a pair: both escapes
                0xD800..=0xDBFF
                    if self.buf.get(i + 5..i + 7) == Some(&b"\\u"[..])
                        && matches!(self.hex4(i + 7), Ok(0xDC00..=0xDFFF)) =>
                {
                    Ok(i + 11)
                }
                // anything else, lone surrogates included (read as U+FFFD where the string is
                // decoded, see `decode_escaped`; copied as they are where it is skipped)
                _ => Ok(i + 5),
            },
            None => {
                self.pos = i;
                Err(self.fail())
            }
            Some(_) => Err(Stop::Invalid(i)),
        }
    }

    /// Marker candidate `k` (U+FDD0 + `k`) is in the body: once all are, the parsed document
    /// has no marker for numbers and turns off number preservation (handed over).
    fn marker_met(&mut self, k: u32) -> Res<()> {
        self.markers |= 1 << k;
        if self.markers == u32::MAX { Err(Stop::Fallback) } else { Ok(()) }
    }

    /// Four hex digits at `at`.
    fn hex4(&self, at: usize) -> Res<u32> {
        let Some(digits) = self.buf.get(at..at + 4) else {
            return Err(Stop::Invalid(self.buf.len()));
        };
        digits.iter().try_fold(0, |n, &d| match char::from(d).to_digit(16) {
            Some(d) => Ok(n << 4 | d),
            None => Err(Stop::Invalid(at + 3)),
        })
    }
}

/// The bytes a JSON string holds as they are and [`skip_plain`] passes over that are ASCII:
/// `0x20..=0x7F` but `"` and `\`.
static PLAIN_ASCII: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x20;
    while b < 0x80 {
        table[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    table
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

// The word masks below work on eight bytes read little-endian: the high bit of a byte is set
// at the first byte that qualifies, and possibly at later ones (borrows), never at earlier
// ones; so the lowest set bit, of one mask or of several or-ed, is exact.

/// The bytes of `w` equal to `b`.
fn bytes_equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The bytes of `w` that end or interrupt every JSON string scan: below 0x20, `"`, `\`.
fn string_stops(w: u64) -> u64 {
    (w.wrapping_sub(ONES * 0x20) & !w & HIGHS) | bytes_equal(w, b'"') | bytes_equal(w, b'\\')
}

/// The bytes of `w` that are not [`PLAIN_ASCII`]: [`string_stops`] and 0x80 and above.
fn ascii_stops(w: u64) -> u64 {
    string_stops(w) | (w & HIGHS)
}

/// The error for the byte at `at` (`NotJson`), or for the end of the body (`Truncated`),
/// positioned as serde_json positions it: line and column (in bytes) of that byte, or of the
/// last byte at the end.
fn error_at(buf: &[u8], at: usize) -> TransformError {
    let end = (at + 1).min(buf.len());
    let line_start = buf[..end].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = 1 + buf[..line_start].iter().filter(|&&b| b == b'\n').count();
    let column = end - line_start;
    if at >= buf.len() {
        TransformError::Truncated { line, column }
    } else {
        TransformError::NotJson { line, column }
    }
}

/// The position of the first `"`, `\`, control character or `0xEF` byte (the first byte of
/// U+FDD0..=U+FDEF) at or after `i`, or the length of `buf`, and whether the bytes before it are all
/// ASCII: eight bytes at a time, then byte by byte.
fn skip_plain(buf: &[u8], mut i: usize) -> (usize, bool) {
    let mut high = 0;
    while let Some(chunk) = buf.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(bytes);
        let hits = string_stops(w) | bytes_equal(w, 0xEF);
        if hits != 0 {
            let at = hits.trailing_zeros() / 8;
            // the bytes before the stop
            let before = if at == 0 { 0 } else { w & (u64::MAX >> (64 - 8 * at)) };
            return (i + at as usize, (high | before) & HIGHS == 0);
        }
        high |= w;
        i += 8;
    }
    while i < buf.len() && !matches!(buf[i], b'"' | b'\\' | 0x00..=0x1F | 0xEF) {
        high |= u64::from(buf[i] & 0x80);
        i += 1;
    }
    (i, high & HIGHS == 0)
}

/// Whether a valid number token is an integer that serde_json writes back as written: no
/// fraction or exponent, not `-0` (which becomes `-0.0`), and within `i64`/`u64`.
fn is_plain_integer(token: &[u8]) -> bool {
    token.iter().all(|b| b.is_ascii_digit() || *b == b'-') && token != b"-0" && numbers::is_exact(token)
}

/// A number token as the parsed document holds it: a `Value` number, or a string of
/// [`numbers::SENTINEL`] and the token where `Value` cannot hold it exactly.
fn number_value(token: &[u8]) -> Res<Value> {
    if numbers::is_exact(token) {
        serde_json::from_slice(token).map_err(|_| Stop::Fallback)
    } else {
        let text = std::str::from_utf8(token).map_err(|_| Stop::Fallback)?;
        Ok(Value::String(format!("{}{text}", numbers::SENTINEL)))
    }
}

/// A string literal with escapes (quotes included), decoded as the parsed document decodes
/// it: an escaped lone surrogate is read as U+FFFD ([`numbers::prepare`]). `None` if it is
/// not a valid JSON string.
fn decode_escaped(raw: &[u8]) -> Option<String> {
    serde_json::from_slice(&numbers::prepare(raw).body).ok()
}

/// A validated value as the parsed document holds it (numbers wrapped where needed), and the
/// marker its strings standing for numbers start with: one the value does not hold, which
/// masks and hashes as the body's marker does in the parsed document. `None` if it holds
/// all the candidates (the pass hands over then anyway).
fn decode(raw: &[u8]) -> Option<(Value, Option<char>)> {
    match raw.first()? {
        b'-' | b'0'..=b'9' => Some((number_value(raw).ok()?, Some(numbers::SENTINEL))),
        b'{' | b'[' => {
            let prepared = numbers::prepare(raw);
            let marker = prepared.marker?;
            Some((serde_json::from_slice(&prepared.body).ok()?, Some(marker)))
        }
        _ => Some((serde_json::from_slice(raw).ok()?, None)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ascii_stops_finds_the_first_byte_that_is_not_plain() {
        for b in 0..=255u8 {
            let w = u64::from_le_bytes([b; 8]);
            assert_eq!(ascii_stops(w) != 0, !PLAIN_ASCII[usize::from(b)], "{b:#x}");
            for at in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[at] = b;
                let stops = ascii_stops(u64::from_le_bytes(bytes));
                if PLAIN_ASCII[usize::from(b)] {
                    assert_eq!(stops, 0, "{b:#x} at {at}");
                } else {
                    assert_eq!(stops.trailing_zeros() / 8, at as u32, "{b:#x} at {at}");
                }
                // a stop before it wins, whatever follows
                bytes[..at].fill(b'"');
                if at > 0 {
                    assert_eq!(ascii_stops(u64::from_le_bytes(bytes)).trailing_zeros() / 8, 0);
                }
            }
        }
    }

    #[test]
    fn skip_plain_finds_every_stop() {
        for stop in [b'"', b'\\', 0xEF, 0x00, 0x1F, b'\n'] {
            for at in 0..24 {
                let mut buf = vec![b'a'; 24];
                buf[at] = stop;
                for from in 0..=at {
                    assert_eq!(skip_plain(&buf, from), (at, true), "{stop:#x} at {at} from {from}");
                }
                assert_eq!(skip_plain(&buf, at + 1), (24, true));
            }
        }
        // bytes that are not stops: 0x20, high bytes other than 0xEF
        let buf = [0x20, 0x7F, 0x80, 0xE4, 0xBD, 0xA0, 0xEE, 0xF0, 0xFF, 0x21];
        assert_eq!(skip_plain(&buf, 0), (buf.len(), false));
        // a high byte before the stop, at every place, in words and in the tail
        for len in [8, 16, 21] {
            for high in 0..len {
                for stop in high + 1..=len {
                    let mut buf = vec![b'a'; len];
                    buf[high] = 0xC3;
                    if stop < len {
                        buf[stop] = b'"';
                    }
                    assert_eq!(skip_plain(&buf, 0), (stop, false), "{len} {high} {stop}");
                    // a high byte after the stop does not count
                    if stop + 1 < len {
                        assert_eq!(skip_plain(&buf, 0).0, stop);
                        let mut after = vec![b'a'; len];
                        after[stop] = b'"';
                        after[stop + 1] = 0xC3;
                        assert_eq!(skip_plain(&after, 0), (stop, true), "{len} {stop}");
                    }
                }
            }
        }
    }

    #[test]
    fn errors_are_positioned_like_serde_json() {
        for (body, at) in [("{\"a\":1,\n \"b\": 1x}", 15), ("[1,\n\n  2 3]", 9), ("x", 0)] {
            let expected = serde_json::from_str::<Value>(body).unwrap_err();
            let TransformError::NotJson { line, column } = error_at(body.as_bytes(), at) else { panic!() };
            assert_eq!((line, column), (expected.line(), expected.column()), "{body}");
        }
        let body = "{\"a\":\n [1,";
        let expected = serde_json::from_str::<Value>(body).unwrap_err();
        let TransformError::Truncated { line, column } = error_at(body.as_bytes(), body.len()) else {
            panic!()
        };
        assert_eq!((line, column), (expected.line(), expected.column()));
    }

    #[test]
    fn plain_integers() {
        for t in ["0", "7", "-5", "18446744073709551615", "-9223372036854775808"] {
            assert!(is_plain_integer(t.as_bytes()), "{t}");
            let v: Value = serde_json::from_str(t).unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), t);
        }
        for t in ["-0", "1.0", "1e2", "18446744073709551616", "-9223372036854775809"] {
            assert!(!is_plain_integer(t.as_bytes()), "{t}");
        }
    }

    #[test]
    fn key_set_switches_to_hashing() {
        let mut keys = KeySet::default();
        for i in 0..100u32 {
            assert!(keys.insert(Cow::Owned(i.to_string().into_bytes())));
        }
        for i in [0u32, 15, 16, 99] {
            assert!(!keys.insert(Cow::Owned(i.to_string().into_bytes())), "{i}");
        }
    }
}
