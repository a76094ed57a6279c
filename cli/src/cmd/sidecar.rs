//! `custos sidecar`: the enforcing proxy in front of a protected app.

use std::process::ExitCode;

/// Arguments of `custos sidecar` (every flag also reads a `CUSTOS_*` environment variable).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    sidecar: custos_sidecar::SidecarArgs,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("custos-sidecar").build()?;
    runtime.block_on(custos_sidecar::run(args.sidecar))?;
    Ok(ExitCode::SUCCESS)
}
