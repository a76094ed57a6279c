//! Custos response transform: row filters, field masking and record caps over JSON response
//! bodies, plus the CEL expressions that rules use ([`expr`]).
//!
//! The policy compiler turns each Allow rule into a [`Plan`]; the sidecar builds the
//! request's [`Vars`](expr::Vars) once and calls [`apply`] on each JSON response the plan
//! [needs](Plan::needs_body). What a plan derives from its paths is computed once, on its
//! first use ([`PlanCache`]).
//!
//! # Two paths
//!
//! [`apply`] takes one of two paths; both give the same [`TransformStats`], the same
//! [`Outcome`] kind, errors of the same kind, and bodies that parse to the same JSON value:
//!
//! - **Streaming** (plans without a row filter whose paths are all simple: names,
//!   non-negative indices, wildcards; any mask strategy; a record cap). One pass over the
//!   body validates it as JSON, skips what no path reaches without decoding it, and copies
//!   every byte it does not rewrite verbatim: formatting, escapes and number spellings stay
//!   as the upstream wrote them. Only the values a mask selects are decoded and rewritten,
//!   with the same masking code as the parsed document. It hands over to the parsed document
//!   when a body needs what only that can do exactly: more records than the cap, a duplicate
//!   key where a path looks, all 32 noncharacters U+FDD0..=U+FDEF (see
//!   [below](crate#numbers); fewer of them are read and copied as any other character). An
//!   escaped lone surrogate is copied as it is where no path looks, and read as U+FFFD where
//!   one does. Nesting deeper than serde_json's recursion limit (127 containers) is refused
//!   on both paths.
//! - **Parsed document** (everything else). The body is parsed into a `serde_json::Value`,
//!   transformed and written back compactly, as described below.
//!
//! # Numbers, strings and member order
//!
//! On the parsed-document path, the body is written back compactly:
//!
//! - Strings are kept exactly (escapes are written in serde_json's canonical form, e.g.
//!   `"\u00e9"` comes back as `"é"`). Strings with invalid UTF-8 make the body
//!   [not JSON](TransformError::NotJson) (on both paths). An escaped lone surrogate (valid in
//!   the JSON grammar, and what JavaScript and Python serialisers write for a string that
//!   arrived with one) is read as U+FFFD, the replacement character: a user who stored one in
//!   a field cannot make every response holding their record untransformable.
//! - Numbers keep their value; those that `f64`/`i64`/`u64` cannot hold exactly (big
//!   integers, decimals with more than 15 significant digits, exponents beyond `f64`) are
//!   kept as written, byte for byte. serde_json's `arbitrary_precision` is not used: features
//!   unify across the workspace, and it breaks numbers deserialised through
//!   `#[serde(flatten)]` and untagged or internally tagged enums, which kube relies on. See
//!   [`numbers`](crate#numbers) below for how.
//! - Object members keep their order (the workspace enables serde_json's `preserve_order`);
//!   a duplicate key keeps the position of its first occurrence and the last value.
//!
//! Masks read a masked number, object or array by its JSON text as the parsed document
//! writes it, on both paths (`1.50` masks as `1.5`; big numbers as written).
//!
//! # Numbers
//!
//! Before parsing, one pass over the body finds number tokens that would not survive a round
//! trip through `serde_json::Value` and wraps each into a string starting with a marker, a
//! Unicode noncharacter of U+FDD0..=U+FDEF that the body does not contain (raw or escaped):
//! the first free one, so a user's U+FDD0 in a field costs no one their numbers. After
//! serialising they are unwrapped back into the original tokens. Masks treat them as numbers
//! (by their text) and row filters see them as `double`. Only a body that contains all 32 of
//! these noncharacters is parsed as is, and such numbers then lose precision.

#![forbid(unsafe_code)]

mod apply;
pub mod expr;
mod hash;
mod mask;
mod numbers;
mod path;
mod plan;
mod stream;

pub use apply::{
    DOCUMENT_BYTES_PER_BODY_BYTE, MAX_RECORD_HASHES, Outcome, TransformError, TransformStats, Transformed,
    apply, apply_lazy, apply_within,
};
#[doc(hidden)]
pub use apply::{apply_dom, apply_streaming, streaming_eligible};
pub use hash::HashKey;
pub use mask::REDACTED;
pub use plan::{ClassMask, Phase, PhasedPlan, Plan, PlanCache};
