//! The response plan of a rule: what [`apply`](crate::apply) does to a response body.

use custos_api::policy::{ExceedAction, MaskStrategy};
use serde_json_path::JsonPath;

use crate::expr::Expr;

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
}

impl Plan {
    /// Whether applying the plan can change the body or needs to count its records; when
    /// false the sidecar streams the response untouched.
    pub fn needs_body(&self) -> bool {
        self.records.is_some() || self.row_filter.is_some() || self.masks.iter().any(|m| !m.paths.is_empty())
    }
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
}
