//! `custos audit`: query and verify the audit trail, through the collector's HTTP API
//! (`--collector URL`) or straight from its store (`--store sqlite:PATH|postgres://...`).
//!
//! Output: an aligned table by default; with `--output json`, JSON Lines (one JSON object per
//! line: an event, an access, an entry, an alert, or the verification report), so that lists
//! stream and pipe into `jq -c`.

mod alerts;
mod client;
mod query;
mod subject;
mod table;
mod tail;
mod top;
mod verify;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use custos_api::Decision;

use crate::output::OutputFormat;

/// Arguments of `custos audit`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    source: SourceArgs,
    /// Output format: `text` (aligned table) or `json` (JSON Lines: one object per line).
    #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
    output: OutputFormat,
    #[command(subcommand)]
    command: AuditCommand,
}

/// Where the audit trail is read from: exactly one of `--collector` and `--store`.
#[derive(clap::Args, Debug)]
pub(crate) struct SourceArgs {
    /// The collector's base URL, e.g. `http://custos-collector.custos-system:8080`.
    #[arg(long, value_name = "URL", global = true)]
    collector: Option<String>,
    /// File holding the collector's bearer token (with `--collector`).
    #[arg(long, value_name = "FILE", env = "CUSTOS_COLLECTOR_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Read the store directly: `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, value_name = "URL", global = true)]
    store: Option<String>,
    /// Time-out of each request to the collector (e.g. `10s`, `1m`).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, global = true)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// List stored events matching filters, newest first.
    Query(query::Args),
    /// Who accessed one data subject: by its record id (hashed locally with the hash key) or by
    /// its keyed hash.
    Subject(subject::Args),
    /// Principals ranked by records returned or by denials.
    Top(top::Args),
    /// Alerts raised by the collector's detectors, newest first.
    Alerts(alerts::Args),
    /// Verify the hash chain of the store; exits 1 naming the first broken link.
    Verify(verify::Args),
    /// Follow new events as they are stored, until interrupted (ctrl-c).
    Tail(tail::Args),
}

/// Filters shared by `query` and `tail`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Filters {
    /// Namespace of the protected workload.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Policy name.
    #[arg(long)]
    policy: Option<String>,
    /// Principal key: `user:<id>`, `workload:<ns>/<sa>` or `peer:<ip>`.
    #[arg(long)]
    principal: Option<String>,
    /// Decision: Allow, Deny or WouldDeny.
    #[arg(long, value_parser = parse_decision)]
    decision: Option<Decision>,
    /// Events carrying a dry run of this Audit-mode policy (it ran beside the deciding one).
    #[arg(long, value_name = "POLICY")]
    dry_run_policy: Option<String>,
    /// Events carrying a dry run with this decision: Allow or WouldDeny (with
    /// --dry-run-policy, that policy's).
    #[arg(long, value_parser = parse_dry_run_decision, value_name = "DECISION")]
    dry_run_decision: Option<Decision>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let source = client::Source::open(&args.source).await?;
        let out = args.output;
        match args.command {
            AuditCommand::Query(a) => query::run(&source, a, out).await,
            AuditCommand::Subject(a) => subject::run(&source, a, out).await,
            AuditCommand::Top(a) => top::run(&source, a, out).await,
            AuditCommand::Alerts(a) => alerts::run(&source, a, out).await,
            AuditCommand::Verify(a) => verify::run(&source, a, out).await,
            AuditCommand::Tail(a) => tail::run(&source, a, out).await,
        }
    })
}

/// Parses `--since` / `--until`: an RFC 3339 time, or a duration before now (`90s`, `15m`,
/// `24h`, `7d`, `2w`).
pub(crate) fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        format!(
            "'{value}' is neither a duration (like 15m, 24h, 7d) nor an RFC 3339 time (like 2025-06-01T12:00:00Z)"
        )
    };
    let d = parse_relative(value).ok_or_else(bad)?;
    let d = chrono::TimeDelta::from_std(d).map_err(|_| bad())?;
    Utc::now().checked_sub_signed(d).ok_or_else(bad)
}

/// `<digits><unit>` with unit s, m, h, d or w.
fn parse_relative(value: &str) -> Option<Duration> {
    let split = value.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = value.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

/// Parses `--interval` / `--timeout`: `500ms`, `2s`, `1m`, `1h`.
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = match value.strip_suffix("ms") {
        Some(ms) => ms.parse::<u64>().ok().map(Duration::from_millis),
        None => parse_relative(value),
    };
    d.filter(|d| !d.is_zero()).ok_or_else(|| format!("'{value}' is not a duration like 500ms, 2s, 1m"))
}

fn parse_dry_run_decision(value: &str) -> Result<Decision, String> {
    parse_decision(value)
        .ok()
        .filter(|d| *d != Decision::Deny)
        .ok_or_else(|| format!("'{value}' is not a dry-run decision: Allow or WouldDeny"))
}

fn parse_decision(value: &str) -> Result<Decision, String> {
    [Decision::Allow, Decision::Deny, Decision::WouldDeny]
        .into_iter()
        .find(|d| d.as_str().eq_ignore_ascii_case(value))
        .ok_or_else(|| format!("'{value}' is not a decision: Allow, Deny or WouldDeny"))
}

/// Writes one line on stdout. A closed pipe (`| head`) ends the program quietly.
pub(crate) fn emit(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` as one JSON line.
pub(crate) fn emit_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    emit(&serde_json::to_string(value)?)
}

/// An event time (RFC 3339) as `YYYY-MM-DD HH:MM:SS` UTC; unparsable times as they are.
pub(crate) fn show_time(time: &str) -> String {
    DateTime::parse_from_rfc3339(time)
        .map(|t| t.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| time.to_owned())
}

/// `policy/rule`, `policy/(default)` when the default action decided, `-` without a policy.
pub(crate) fn policy_rule(policy: Option<&str>, rule: Option<&str>) -> String {
    match (policy, rule) {
        (Some(p), Some(r)) => format!("{p}/{r}"),
        (Some(p), None) => format!("{p}/(default)"),
        (None, _) => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let before = Utc::now();
        let t = parse_time("15m").ok();
        let after = Utc::now();
        let fifteen = chrono::TimeDelta::minutes(15);
        assert!(t.is_some_and(|t| t >= before - fifteen && t <= after - fifteen), "{t:?}");
        assert_eq!(
            parse_time("2025-06-01T12:00:00+02:00").map(|t| t.to_rfc3339()),
            Ok("2025-06-01T10:00:00+00:00".to_owned())
        );
        for bad in ["15", "15x", "m", "", "-5m", "yesterday", "99999999999999999999d"] {
            let err = parse_time(bad).err().unwrap_or_default();
            assert!(err.contains("neither a duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn decisions_and_policy_rule() {
        assert_eq!(parse_decision("wouldDeny"), Ok(Decision::WouldDeny));
        assert!(parse_decision("Maybe").is_err());
        assert_eq!(policy_rule(Some("p"), Some("r")), "p/r");
        assert_eq!(policy_rule(Some("p"), None), "p/(default)");
        assert_eq!(policy_rule(None, Some("r")), "-");
    }
}
