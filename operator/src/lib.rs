//! Custos operator (`custos operator`): reconciles DataAccessPolicies into each namespace's
//! compiled sidecar config and NetworkPolicies, keeps the workload identity table current,
//! injects the sidecar into selected pods and validates policies at admission.
//!
//! - [`controller`]: a kube-runtime controller, compute-then-apply: the pure step is
//!   [`custos_operator_core::desired`]; the thin I/O step server-side applies its output, only
//!   while this replica is the leader.
//! - [`webhook`]: `/mutate-pods`, `/validate-policies` and `/validate-pods` over TLS ([`tls`]).
//! - [`leader`]: leader election on a coordination.k8s.io Lease.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` ([`metrics`]).
//! - [`start`] wires them: every replica serves the webhooks from its caches ([`view`]); the
//!   leader also runs the controller.
#![forbid(unsafe_code)]

pub mod admin;
pub mod args;
pub mod context;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod rbac;
mod start;
pub mod tls;
pub mod view;
pub mod webhook;

pub use error::Error;
pub use metrics::OperatorMetrics;
pub use start::{RunningOperator, StartError, start, start_with_client};
