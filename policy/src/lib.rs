//! Custos policy compiler and decision engine, with no Kubernetes I/O and no async:
//! - [`load`] reads DataAccessPolicies from YAML, with field-path errors;
//! - [`compile`] and [`namespace`] turn policies into the sidecar config and NetworkPolicies;
//! - [`normalize`](mod@normalize) and [`glob`] handle request paths and the rule globs;
//! - [`engine`] decides.
#![forbid(unsafe_code)]

pub mod compile;
pub mod engine;
pub mod error;
pub mod glob;
pub mod load;
pub mod namespace;
pub mod netpol;
pub mod normalize;
pub mod selector;

pub use compile::{CompiledPolicy, CompiledRule, compile_policy};
pub use engine::{Engine, Reason, Request, User, Verdict};
pub use error::{FieldError, FieldErrors};
pub use load::{Loaded, load_policies};
pub use namespace::{ConfigError, NamespaceCompilation, PolicyInput, compile_namespace, load_config};
pub use normalize::{NormalizedPath, normalize};
