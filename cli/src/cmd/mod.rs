//! Subcommands of `custos`.

mod audit;
mod check;
mod collector;
mod compile;
mod crd;
mod demo;
mod explain;
mod operator;
mod sidecar;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Custos: data-access policies for services that hold personal data.
#[derive(Parser, Debug)]
#[command(name = "custos", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate DataAccessPolicy files offline; exits 1 listing every error with its field path.
    Check(check::Args),
    /// Compile the policies of one namespace into the sidecar config (and NetworkPolicies).
    Compile(compile::Args),
    /// Explain the decision for one request: decision, rule, reason and the response plan.
    Explain(explain::Args),
    /// Print the DataAccessPolicy CustomResourceDefinition (YAML).
    Crd(crd::Args),
    /// Run the operator: reconcile DataAccessPolicies, inject the sidecar, validate policies.
    Operator(Box<operator::Args>),
    /// Run the enforcing proxy in front of a protected app (one per pod).
    Sidecar(Box<sidecar::Args>),
    /// Run the audit collector: batch ingest from sidecars, the audit store, queries, retention.
    Collector(Box<collector::Args>),
    /// Query and verify the audit trail (events, data subjects, top principals, alerts, chain).
    Audit(Box<audit::Args>),
    /// Replay the four incidents against the example policies in one process: synthetic
    /// services, sidecars and a collector; prints what was blocked, masked, throttled and alerted.
    Demo(demo::Args),
}

/// Runs the parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(a) => check::run(a),
        Command::Compile(a) => compile::run(a),
        Command::Explain(a) => explain::run(a),
        Command::Crd(a) => crd::run(a),
        Command::Operator(a) => operator::run(*a),
        Command::Sidecar(a) => sidecar::run(*a),
        Command::Collector(a) => collector::run(*a),
        Command::Audit(a) => audit::run(*a),
        Command::Demo(a) => demo::run(a),
    }
}
