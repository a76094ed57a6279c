//! Custos operator core: the pure steps of `custos operator`, with no Kubernetes client.
//!
//! - [`desired`]: a namespace's policies, the pods the operator sees and the namespace's
//!   NetworkPolicies → the desired `custos-config` ConfigMap, one NetworkPolicy per policy, the
//!   stale objects to delete, each policy's status and the Events to record.
//! - [`inject`]: a Pod and the policies of its namespace → the Pod with the Custos sidecar
//!   injected (or why not).
//! - [`validate`]: a DataAccessPolicy → admitted (with warnings) or denied with field paths.
//!
//! The `custos-operator` crate feeds these from watches and admission requests and applies
//! what they compute.
#![forbid(unsafe_code)]

pub mod desired;
pub mod inject;
pub mod names;
pub mod selector;
pub mod validate;
