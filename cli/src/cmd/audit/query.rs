//! `custos audit query`: events matching filters, newest first.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use custos_api::AuditEvent;
use custos_store::EventQuery;

use super::client::Source;
use super::table::Table;
use super::{Filters, emit_json, parse_time, policy_rule, show_time};
use crate::output::OutputFormat;

/// Arguments of `custos audit query`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    filters: Filters,
    /// Events at or after this time: a duration before now (`15m`, `24h`, `7d`) or RFC 3339.
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Events before this time: a duration before now or RFC 3339.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Events per page (1 to 10000; default 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(custos_store::MAX_LIMIT)))]
    limit: Option<u32>,
    /// Fetch every page, not only the first.
    #[arg(long)]
    all: bool,
    /// Continue after a previous page (the cursor printed with it).
    #[arg(long, conflicts_with = "all")]
    cursor: Option<String>,
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    if let (Some(s), Some(u)) = (args.since, args.until)
        && s >= u
    {
        anyhow::bail!("--until must be later than --since");
    }
    let mut query = EventQuery {
        namespace: args.filters.namespace,
        policy: args.filters.policy,
        principal: args.filters.principal,
        decision: args.filters.decision,
        dry_run_policy: args.filters.dry_run_policy,
        dry_run_decision: args.filters.dry_run_decision,
        since: args.since,
        until: args.until,
        limit: args.limit.unwrap_or(0),
        cursor: args.cursor,
    };
    let mut table = event_table();
    let mut count = 0usize;
    loop {
        let page = source.query(&query).await?;
        count += page.events.len();
        for event in &page.events {
            match output {
                OutputFormat::Json => emit_json(event)?,
                OutputFormat::Text => table.row(event_row(event)),
            }
        }
        match page.next_cursor {
            Some(cursor) if args.all => query.cursor = Some(cursor),
            Some(cursor) => {
                if output == OutputFormat::Text {
                    table.print()?;
                }
                eprintln!("more events: add --cursor {cursor} for the next page, or --all for every page");
                return Ok(ExitCode::SUCCESS);
            }
            None => break,
        }
    }
    if output == OutputFormat::Text {
        if table.is_empty() {
            eprintln!("no events match");
        } else {
            table.print()?;
            eprintln!("{count} event{}", if count == 1 { "" } else { "s" });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The columns of an event line.
pub(crate) const EVENT_COLUMNS: [&str; 7] =
    ["TIME (UTC)", "NAMESPACE", "PRINCIPAL", "DECISION", "POLICY/RULE", "PATH", "RECORDS"];

/// An empty table of events.
pub(crate) fn event_table() -> Table {
    Table::new(&EVENT_COLUMNS).right(6)
}

/// The cells of one event.
pub(crate) fn event_row(e: &AuditEvent) -> Vec<String> {
    vec![
        show_time(&e.time),
        e.namespace.clone(),
        e.principal.clone(),
        e.decision.to_string(),
        policy_rule(e.policy.as_deref(), e.rule.as_deref()),
        format!("{} {}", e.method, e.path),
        e.records_returned.to_string(),
    ]
}
