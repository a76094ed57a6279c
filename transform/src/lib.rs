//! Custos response transform: row filters, field masking and record caps over JSON response
//! bodies, plus the CEL expressions that rules use ([`expr`]).
//!
//! The policy compiler turns each Allow rule into a [`Plan`]; the sidecar builds the
//! request's [`Vars`](expr::Vars) once and calls [`apply`] on each JSON response the plan
//! [needs](Plan::needs_body).
//!
//! # Numbers, strings and member order
//!
//! The body is parsed into a `serde_json::Value` and written back compactly:
//!
//! - Strings are kept exactly (escapes are written in serde_json's canonical form, e.g.
//!   `"\u00e9"` comes back as `"é"`). Strings with invalid UTF-8 or lone surrogate escapes
//!   make the body [not JSON](TransformError::NotJson).
//! - Numbers keep their value; those that `f64`/`i64`/`u64` cannot hold exactly (big
//!   integers, decimals with more than 15 significant digits, exponents beyond `f64`) are
//!   kept as written, byte for byte. serde_json's `arbitrary_precision` is not used: features
//!   unify across the workspace, and it breaks numbers deserialised through
//!   `#[serde(flatten)]` and untagged or internally tagged enums, which kube relies on. See
//!   [`numbers`](crate#numbers) below for how.
//! - Object members keep their order (the workspace enables serde_json's `preserve_order`);
//!   a duplicate key keeps the position of its first occurrence and the last value.
//!
//! # Numbers
//!
//! Before parsing, one pass over the body finds number tokens that would not survive a round
//! trip through `serde_json::Value` and wraps each into a string starting with the Unicode
//! noncharacter U+FDD0; after serialising they are unwrapped back into the original tokens.
//! Masks treat them as numbers (by their text) and row filters see them as `double`. A body
//! that itself contains U+FDD0 is parsed as is, and such numbers then lose precision.

#![forbid(unsafe_code)]

mod apply;
pub mod expr;
mod hash;
mod mask;
mod numbers;
mod path;
mod plan;

pub use apply::{Outcome, TransformError, TransformStats, Transformed, apply};
pub use hash::HashKey;
pub use mask::REDACTED;
pub use plan::{ClassMask, Plan};
