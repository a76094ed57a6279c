//! `custos demo`: the whole story in one process. Synthetic customer and parcel services, one
//! sidecar per example policy (compiled as `custos compile` does), the collector with its
//! SQLite store and detectors; normal traffic, then the four incidents of DESIGN.md replayed
//! with signed user tokens and per-workload source addresses; then a report of what was
//! blocked, masked, throttled and alerted, who accessed one sample customer, and the chain
//! verification. Exits 0 when every step of the story happened, 1 naming what did not.
//!
//! See `docs/demo.md` for how to read the report.

mod app;
mod audit;
mod client;
mod data;
mod detection;
mod identity;
mod phase;
mod policies;
mod progress;
mod replay;
mod report;
mod stack;
mod story;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use custos_transform::HashKey;

use crate::output::OutputFormat;
use app::{Apps, JWKS_PATH, Service};
use data::{Dataset, SAMPLE_CUSTOMER};
use identity::Issuer;
use phase::Ctx;
use progress::Progress;
use stack::{Files, Stack};

/// Arguments of `custos demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Keep the audit store (`audit.db`), the compiled configs and the keys in DIR (created if
    /// missing; must not hold an audit store already). Default: a temporary directory, removed
    /// at the end.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Print the report only, without progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Report format: `text` (aligned) or `json` (one document).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: OutputFormat,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: Args) -> anyhow::Result<ExitCode> {
    let progress = Progress::new(args.quiet);
    let temp;
    let dir: &Path = match &args.keep {
        Some(dir) => {
            if dir.join("audit.db").exists() {
                bail!(
                    "{} already holds an audit store; give an empty or new directory to --keep",
                    dir.display()
                );
            }
            dir
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("custos-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path()
        }
    };

    progress.line("starting the synthetic services, the collector and five sidecars");
    let issuer = Issuer::generate()?;
    let jwks = issuer.jwks()?;
    let apps = Apps::start(Arc::new(Dataset::build()?), jwks.clone()).await?;
    let jwks_uri = format!("http://{}{JWKS_PATH}", apps.addr(Service::PickupSearch));
    let policies = policies::compile(&jwks_uri, &identity::workload_table(), chrono::Utc::now())?;
    let hash_key = stack::random_hex(32).into_bytes();
    let files = Files::write(dir, &policies, &jwks, &hash_key)?;
    let stack = Stack::start(&files, &apps).await?;
    stack.ready().await?;
    let store = stack.store();

    let replay = {
        let ctx = Ctx { issuer: &issuer, stack: &stack };
        replay::run(&ctx, &progress).await?
    };
    let requests: u64 = replay.phases.iter().map(|p| p.tally.requests).sum();
    progress.line("stopping the sidecars (they flush their audit events) and the collector");
    let stored = stack.stop(requests).await?;
    progress.line(&format!("{stored} of {requests} events stored; reading the audit trail"));
    drop(apps);

    let sample_hash = HashKey::new(hash_key).hash_hex(SAMPLE_CUSTOMER.as_bytes());
    let findings = audit::read(&store, &replay.phases, replay.incidents_start, &sample_hash).await?;
    let mut report = report::build(replay.phases, findings, (SAMPLE_CUSTOMER, &sample_hash));
    report.egress = policies
        .namespaces
        .get(Service::ParcelScan.namespace())
        .and_then(|c| c.network_policies.first())
        .map(policies::egress_summary)
        .unwrap_or_default();
    report.adjustments = policies.adjustments;
    report.events_stored = stored;
    report.kept = args.keep.as_ref().map(|d| d.display().to_string());
    report.failures = story::check(&report);

    match args.output {
        OutputFormat::Text => print!("{}", report.text()),
        OutputFormat::Json => crate::output::print_json(&report)?,
    }
    Ok(if report.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
