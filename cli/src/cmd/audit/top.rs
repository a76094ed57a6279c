//! `custos audit top`: principals ranked by records returned or by denials.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use custos_store::TopBy;

use super::client::Source;
use super::table::Table;
use super::{emit_json, parse_time};
use crate::output::OutputFormat;

/// What to rank by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum By {
    /// Records returned.
    #[default]
    Records,
    /// Denied requests (Deny decisions).
    Denials,
}

/// Arguments of `custos audit top`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Rank by records returned or by denials.
    #[arg(long, value_enum, default_value_t)]
    by: By,
    /// Count since this time: a duration before now (`1h`, `24h`, `7d`) or RFC 3339 (default:
    /// all time).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// How many principals (1 to 10000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=i64::from(custos_store::MAX_LIMIT)))]
    limit: u32,
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let (by, column) = match args.by {
        By::Records => (TopBy::Records, "RECORDS"),
        By::Denials => (TopBy::Denials, "DENIALS"),
    };
    let entries = source.top(by, args.since, args.limit).await?;
    match output {
        OutputFormat::Json => {
            for e in &entries {
                emit_json(e)?;
            }
        }
        OutputFormat::Text if entries.is_empty() => eprintln!("no {}", column.to_ascii_lowercase()),
        OutputFormat::Text => {
            let mut table = Table::new(&["RANK", "PRINCIPAL", column]).right(0).right(2);
            for (i, e) in entries.iter().enumerate() {
                table.row(vec![(i + 1).to_string(), e.principal.clone(), e.count.to_string()]);
            }
            table.print()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
