//! `custos audit tail`: follows new events, oldest first, until ctrl-c.
//!
//! Every `--interval` the events from `max(--since, newest seen - --lookback)` on are fetched
//! (all pages) and those not printed before are printed, in time order. The look-back window
//! catches events stored late with an older time (a sidecar's spool drained after an outage);
//! an event older than the newest seen by more than `--lookback` when it is stored is not
//! shown (`custos audit query` finds it).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_api::AuditEvent;
use custos_store::EventQuery;

use super::client::Source;
use super::query::{EVENT_COLUMNS, event_row};
use super::table::clean;
use super::{Filters, emit, emit_json, parse_duration, parse_time};
use crate::output::OutputFormat;

/// Events per page while polling.
const PAGE: u32 = 1_000;

/// Minimum widths of the text columns (lines are printed as they come, so the widths are
/// fixed rather than fitted).
const WIDTHS: [usize; 7] = [19, 12, 24, 9, 28, 32, 7];

/// Arguments of `custos audit tail`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    filters: Filters,
    /// Start with the events since this time: a duration before now (`15m`) or RFC 3339
    /// (default: now, only new events).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// How often to poll (e.g. `500ms`, `2s`).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// How far behind the newest event seen a late-stored event may be and still be shown.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    lookback: Duration,
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let start = args.since.unwrap_or_else(Utc::now);
    let lookback =
        chrono::TimeDelta::from_std(args.lookback).map_err(|_| anyhow::anyhow!("--lookback is too long"))?;
    let mut newest = start;
    let mut seen: HashMap<String, DateTime<Utc>> = HashMap::new();
    if output == OutputFormat::Text {
        emit(&line(&EVENT_COLUMNS.map(str::to_owned)))?;
    }
    let mut first = true;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let from = start.max(newest - lookback);
        let polled = tokio::select! {
            biased;
            _ = &mut ctrl_c => break,
            polled = poll(source, &args.filters, from) => polled,
        };
        match polled {
            Ok(events) => {
                for event in events.iter().rev() {
                    if seen.contains_key(&event.id) {
                        continue;
                    }
                    match output {
                        OutputFormat::Json => emit_json(event)?,
                        OutputFormat::Text => emit(&line(&event_row(event)))?,
                    }
                    let time =
                        DateTime::parse_from_rfc3339(&event.time).map_or(from, |t| t.with_timezone(&Utc));
                    newest = newest.max(time);
                    seen.insert(event.id.clone(), time);
                }
                // Events before the next window are never fetched again.
                let horizon = start.max(newest - lookback);
                seen.retain(|_, t| *t >= horizon);
            }
            Err(e) if first => return Err(e),
            Err(e) => eprintln!("warning: {e:#}; trying again in {:?}", args.interval),
        }
        first = false;
        tokio::select! {
            biased;
            _ = &mut ctrl_c => break,
            () = tokio::time::sleep(args.interval) => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every event matching the filters at or after `from`, newest first.
async fn poll(source: &Source, filters: &Filters, from: DateTime<Utc>) -> anyhow::Result<Vec<AuditEvent>> {
    let mut query = EventQuery {
        namespace: filters.namespace.clone(),
        policy: filters.policy.clone(),
        principal: filters.principal.clone(),
        decision: filters.decision,
        dry_run_policy: filters.dry_run_policy.clone(),
        dry_run_decision: filters.dry_run_decision,
        since: Some(from),
        until: None,
        limit: PAGE,
        cursor: None,
    };
    let mut events = Vec::new();
    loop {
        let page = source.query(&query).await?;
        events.extend(page.events);
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return Ok(events),
        }
    }
}

/// One text line: the cells padded to [`WIDTHS`], the last (records) aligned right.
fn line(cells: &[String]) -> String {
    let last = cells.len().saturating_sub(1);
    let mut out = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let cell = clean(cell);
        let width = WIDTHS.get(i).copied().unwrap_or(0);
        if i > 0 {
            out.push_str("  ");
        }
        if i == last {
            out.push_str(&format!("{cell:>width$}"));
        } else {
            out.push_str(&format!("{cell:<width$}"));
        }
    }
    out
}
