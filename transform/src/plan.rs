//! The response plan of a rule: what [`apply`](crate::apply) does to a response body.

use std::fmt;
use std::sync::{Arc, OnceLock};

use custos_api::policy::{ExceedAction, MaskStrategy};
use serde_json_path::JsonPath;

use crate::expr::Expr;
use crate::path::{self, Step};
use crate::stream::StreamPlan;

/// The masking of one data class.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMask {
    /// Data class name, e.g. `phone`; masked fields are counted under it.
    pub class: String,
    /// Where the class appears: absolute paths from the document root, e.g.
    /// `$.items[*].phone`.
    pub paths: Vec<JsonPath>,
    /// How its values are rewritten.
    pub strategy: MaskStrategy,
}

/// What to do with a response body.
///
/// Steps, in order: select the records (`records`), drop those the row filter does not
/// accept, apply the record cap, hash the ids of the records returned, mask each class (in
/// `masks` order) over what remains of the document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The records of a response, e.g. `$.items[*]`, or `$` for a single record. Row
    /// filters, caps and quotas count these. A row filter without `records` filters the
    /// whole document as one record.
    pub records: Option<JsonPath>,
    /// Keeps a record only when true (compiled for
    /// [`Scope::RowFilter`](crate::expr::Scope::RowFilter), `record` bound to each record).
    /// Records for which it fails to evaluate are dropped and counted.
    pub row_filter: Option<Expr>,
    /// The classes to mask.
    pub masks: Vec<ClassMask>,
    /// At most this many records per response.
    pub max_records: Option<u64>,
    /// What happens above `max_records`: keep the first ones, or refuse the response.
    pub on_exceed: ExceedAction,
    /// The path of a record's id, relative to one record (e.g. `$.id`); keyed hashes of the
    /// ids of the records returned go into the audit event.
    pub record_id: Option<JsonPath>,
    /// What [`apply`](crate::apply) derives from the paths, computed on first use; leave it
    /// `PlanCache::default()`.
    pub cache: PlanCache,
}

/// What a [`Plan`] derives from its paths (their steps, whether the streaming path can apply
/// it), computed once on the plan's first use instead of on every response.
///
/// Clones of a plan share the cache. It remembers the paths it was computed from: a plan
/// whose `records`, `record_id` or `masks` differ from them (changed after first use, or a
/// clone built with other paths) is still applied correctly, only without the cache.
/// A cache never makes two plans unequal.
#[derive(Clone, Default)]
pub struct PlanCache(Arc<OnceLock<Compiled>>);

impl PlanCache {
    /// The derived data of `plan`, if this cache holds (or now computes) it for `plan`'s
    /// paths.
    pub(crate) fn get(&self, plan: &Plan) -> Option<&Compiled> {
        let compiled = self.0.get_or_init(|| Compiled::new(plan));
        compiled.matches(plan).then_some(compiled)
    }
}

impl PartialEq for PlanCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() { "PlanCache(filled)" } else { "PlanCache(empty)" })
    }
}

/// The steps of a plan's paths (`None` where a path is not simple) and its streaming plan.
pub(crate) struct Compiled {
    /// The paths this was computed from, to tell whether it still fits the plan.
    records_path: Option<JsonPath>,
    record_id_path: Option<JsonPath>,
    mask_paths: Vec<(Vec<JsonPath>, MaskStrategy)>,
    /// Steps of `records`.
    pub records: Option<Vec<Step>>,
    /// Steps of `record_id`.
    pub record_id: Option<Vec<Step>>,
    /// Steps of each mask path, by class then path.
    pub masks: Vec<Vec<Option<Vec<Step>>>>,
    /// How the streaming path applies the plan, if it can (row filters aside, which are
    /// checked on each call).
    pub stream: Option<StreamPlan>,
}

impl Compiled {
    pub(crate) fn new(plan: &Plan) -> Self {
        let mut compiled = Compiled {
            records_path: plan.records.clone(),
            record_id_path: plan.record_id.clone(),
            mask_paths: plan.masks.iter().map(|m| (m.paths.clone(), m.strategy)).collect(),
            records: plan.records.as_ref().and_then(path::simple),
            record_id: plan.record_id.as_ref().and_then(path::simple),
            masks: plan.masks.iter().map(|m| m.paths.iter().map(path::simple).collect()).collect(),
            stream: None,
        };
        compiled.stream = StreamPlan::new(plan, &compiled);
        compiled
    }

    fn matches(&self, plan: &Plan) -> bool {
        self.records_path == plan.records
            && self.record_id_path == plan.record_id
            && self.mask_paths.len() == plan.masks.len()
            && self
                .mask_paths
                .iter()
                .zip(&plan.masks)
                .all(|((paths, strategy), m)| *strategy == m.strategy && *paths == m.paths)
    }
}

impl Plan {
    /// Whether applying the plan can change the body or needs to count its records; when
    /// false the sidecar streams the response untouched.
    pub fn needs_body(&self) -> bool {
        self.records.is_some() || self.row_filter.is_some() || self.masks.iter().any(|m| !m.paths.is_empty())
    }
}

/// A plan cut in the parts that apply one phase at a time when several policies' plans apply
/// to one response: every plan's row filter first (each over the app's own values, none over
/// another's masks), then every plan's record cap (over the records all the filters kept),
/// then every plan's record id hashing (over the records returned, before any mask), then
/// every plan's masks (over those records only). Each part selects the plan's `records`, so
/// each counts them.
#[derive(Clone, Debug, Default)]
pub struct PhasedPlan {
    /// `records` and `row_filter`; none without a row filter.
    pub filter: Option<Arc<Plan>>,
    /// `records`, `max_records` and `on_exceed`; none without `records` (a cap counts nothing
    /// without them).
    pub cap: Option<Arc<Plan>>,
    /// `records` and `record_id`; none without a record id.
    pub hash: Option<Arc<Plan>>,
    /// `records` and `masks`; none without a mask path.
    pub mask: Option<Arc<Plan>>,
}

impl PhasedPlan {
    /// The parts of `plan`.
    pub fn of(plan: &Plan) -> PhasedPlan {
        let records = || plan.records.clone();
        let part = |p: Plan| Some(Arc::new(p)).filter(|p| p.needs_body());
        PhasedPlan {
            filter: plan.row_filter.as_ref().and_then(|f| {
                part(Plan { records: records(), row_filter: Some(f.clone()), ..Plan::default() })
            }),
            cap: part(Plan {
                records: records(),
                max_records: plan.max_records,
                on_exceed: plan.on_exceed,
                ..Plan::default()
            }),
            hash: plan.record_id.as_ref().and_then(|id| {
                part(Plan { records: records(), record_id: Some(id.clone()), ..Plan::default() })
            }),
            mask: part(Plan { records: records(), masks: plan.masks.clone(), ..Plan::default() })
                .filter(|_| plan.masks.iter().any(|m| !m.paths.is_empty())),
        }
    }

    /// The part of `phase`.
    pub fn part(&self, phase: Phase) -> Option<&Arc<Plan>> {
        match phase {
            Phase::Filter => self.filter.as_ref(),
            Phase::Cap => self.cap.as_ref(),
            Phase::Hash => self.hash.as_ref(),
            Phase::Mask => self.mask.as_ref(),
        }
    }
}

/// The phases of [`PhasedPlan`], in the order they apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Row filters.
    Filter,
    /// Record caps (and the quota cut of the records a principal has left).
    Cap,
    /// Record id hashing.
    Hash,
    /// Masks.
    Mask,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 4] = [Phase::Filter, Phase::Cap, Phase::Hash, Phase::Mask];
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::expr::Scope;

    #[test]
    fn needs_body() {
        assert!(!Plan::default().needs_body());
        let path = JsonPath::parse("$.items[*]").unwrap();
        assert!(Plan { records: Some(path.clone()), ..Plan::default() }.needs_body());
        let filter = Expr::compile("true", Scope::RowFilter).unwrap();
        assert!(Plan { row_filter: Some(filter), ..Plan::default() }.needs_body());
        let mask = |paths| ClassMask { class: "phone".into(), paths, strategy: MaskStrategy::Redact };
        assert!(!Plan { masks: vec![mask(vec![])], ..Plan::default() }.needs_body());
        assert!(Plan { masks: vec![mask(vec![path])], ..Plan::default() }.needs_body());
        // a cap or a record id alone counts nothing without records
        assert!(!Plan { max_records: Some(1), ..Plan::default() }.needs_body());
    }

    #[test]
    fn phased_parts() {
        let items = JsonPath::parse("$.items[*]").unwrap();
        let phone = ClassMask {
            class: "phone".into(),
            paths: vec![JsonPath::parse("$.items[*].phone").unwrap()],
            strategy: MaskStrategy::ShowLast4,
        };
        let full = Plan {
            records: Some(items.clone()),
            row_filter: Some(Expr::compile("record.branch == 'north'", Scope::RowFilter).unwrap()),
            masks: vec![phone.clone()],
            max_records: Some(5),
            on_exceed: ExceedAction::Deny,
            record_id: Some(JsonPath::parse("$.id").unwrap()),
            cache: PlanCache::default(),
        };
        let parts = PhasedPlan::of(&full);
        let filter = parts.part(Phase::Filter).unwrap();
        assert!(filter.row_filter.is_some() && filter.masks.is_empty() && filter.max_records.is_none());
        assert!(filter.record_id.is_none());
        let cap = parts.part(Phase::Cap).unwrap();
        assert_eq!((cap.max_records, cap.on_exceed), (Some(5), ExceedAction::Deny));
        assert!(cap.record_id.is_none() && cap.row_filter.is_none() && cap.masks.is_empty());
        let hash = parts.part(Phase::Hash).unwrap();
        assert!(hash.record_id.is_some() && hash.max_records.is_none() && hash.masks.is_empty());
        let mask = parts.part(Phase::Mask).unwrap();
        assert_eq!(mask.masks, vec![phone.clone()]);
        assert!(mask.row_filter.is_none() && mask.max_records.is_none() && mask.record_id.is_none());
        assert!([filter, cap, hash, mask].iter().all(|p| p.records == Some(items.clone())));

        // Masks alone (no records): one part.
        let masks_only = PhasedPlan::of(&Plan { masks: vec![phone], ..Plan::default() });
        assert!(masks_only.filter.is_none() && masks_only.cap.is_none() && masks_only.hash.is_none());
        assert!(masks_only.mask.as_ref().is_some_and(|m| m.records.is_none()));
        // Records alone: counted in the cap phase.
        let counted = PhasedPlan::of(&Plan { records: Some(items), ..Plan::default() });
        assert!(counted.filter.is_none() && counted.cap.is_some() && counted.mask.is_none());
        assert!(Phase::ALL.iter().all(|p| PhasedPlan::of(&Plan::default()).part(*p).is_none()));
    }

    #[test]
    fn cache_follows_the_paths() {
        let plan = Plan { records: Some(JsonPath::parse("$.items[*]").unwrap()), ..Plan::default() };
        let compiled = plan.cache.get(&plan).unwrap();
        assert_eq!(compiled.records, Some(vec![Step::Name("items".into()), Step::Wildcard]));
        assert!(compiled.stream.is_some());
        // a clone shares it; equal plans stay equal whether their caches are filled or not
        let clone = plan.clone();
        assert!(std::ptr::eq(clone.cache.get(&clone).unwrap(), compiled));
        assert_eq!(plan, Plan { records: plan.records.clone(), ..Plan::default() });
        // other paths: the cache does not apply
        let other = Plan { records: Some(JsonPath::parse("$.rows[*]").unwrap()), ..plan.clone() };
        assert!(other.cache.get(&other).is_none());
        assert!(format!("{:?}", plan.cache).contains("filled"));
    }
}
