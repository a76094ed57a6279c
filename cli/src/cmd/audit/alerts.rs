//! `custos audit alerts`: alerts raised by the collector's detectors.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use custos_store::Alert;

use super::client::Source;
use super::table::Table;
use super::{emit_json, parse_time, show_time};
use crate::output::OutputFormat;

/// Arguments of `custos audit alerts`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Alerts raised at or after this time: a duration before now (`1h`, `24h`, `7d`) or RFC
    /// 3339 (default: all).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// At most this many, newest first (1 to 10000; default 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(custos_store::MAX_LIMIT)))]
    limit: Option<u32>,
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let alerts = source.alerts(args.since, args.limit.unwrap_or(0)).await?;
    match output {
        OutputFormat::Json => {
            for a in &alerts {
                emit_json(a)?;
            }
        }
        OutputFormat::Text if alerts.is_empty() => eprintln!("no alerts"),
        OutputFormat::Text => {
            let mut table = Table::new(&["TIME (UTC)", "SEVERITY", "DETECTOR", "CONCERNS", "MESSAGE"]);
            for a in &alerts {
                table.row(vec![
                    show_time(&a.time),
                    format!("{:?}", a.severity),
                    a.detector.clone(),
                    concerns(a),
                    a.message.clone(),
                ]);
            }
            table.print()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `namespace/policy principal`, the parts the alert names.
fn concerns(a: &Alert) -> String {
    let scope = match (&a.namespace, &a.policy) {
        (Some(ns), Some(p)) => Some(format!("{ns}/{p}")),
        (Some(ns), None) => Some(ns.clone()),
        (None, Some(p)) => Some(p.clone()),
        (None, None) => None,
    };
    let parts: Vec<String> = scope.into_iter().chain(a.principal.clone()).collect();
    if parts.is_empty() { "-".to_owned() } else { parts.join(" ") }
}
