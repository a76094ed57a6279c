//! `custos audit verify`: walks the hash chain; exit 0 when intact, 1 at the first broken link.

use std::process::ExitCode;

use super::client::Source;
use super::{emit, emit_json};
use crate::output::OutputFormat;

/// Arguments of `custos audit verify`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Start at this seq (trusting the row before it) instead of the retention anchor.
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..))]
    from: Option<u64>,

    /// Also check that the row at SEQ still has HASH: a head recorded earlier, outside the
    /// store (from this command's output, say). A chain cut back and grown again, or rewritten
    /// with every hash recomputed, verifies on its own but not against a hash published before.
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_expect)]
    expect: Option<(u64, String)>,
}

fn parse_expect(text: &str) -> Result<(u64, String), String> {
    custos_api::collector::parse_expected_link(text).map_err(str::to_owned)
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let report = source.verify(args.from, args.expect).await?;
    match output {
        OutputFormat::Json => emit_json(&report)?,
        OutputFormat::Text => match &report.first_broken {
            None => emit(&format!(
                "chain intact: {} event{} verified (after seq {}, up to the head at seq {}, hash {})",
                report.checked,
                if report.checked == 1 { "" } else { "s" },
                report.start.seq,
                report.head.seq,
                report.head.hash
            ))?,
            Some(b) => {
                emit(&format!("chain BROKEN at seq {}: {:?}: {}", b.seq, b.kind, b.detail))?;
                if let Some(id) = &b.event_id {
                    emit(&format!("event: {id}"))?;
                }
                emit(&format!(
                    "{} event{} verified before the break (walk started after seq {}; head at seq {})",
                    report.checked,
                    if report.checked == 1 { "" } else { "s" },
                    report.start.seq,
                    report.head.seq
                ))?;
            }
        },
    }
    Ok(if report.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
