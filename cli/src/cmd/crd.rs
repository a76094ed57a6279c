//! `custos crd`: prints the CRD, or the policy reference generated from it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Arguments of `custos crd`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Write to this file instead of standard output.
    #[arg(short = 'o', long = "output-file")]
    output_file: Option<PathBuf>,
    /// Print the policy reference (Markdown, docs/policy-reference.md) instead of the CRD.
    #[arg(long)]
    reference: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let yaml = if args.reference { custos_api::reference::markdown() } else { custos_api::crd_yaml() };
    match args.output_file {
        Some(p) => std::fs::write(&p, yaml).with_context(|| format!("cannot write {}", p.display()))?,
        None => print!("{yaml}"),
    }
    Ok(ExitCode::SUCCESS)
}
