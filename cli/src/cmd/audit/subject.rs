//! `custos audit subject`: who accessed one data subject.
//!
//! The store keeps no record ids, only their keyed hashes (HMAC-SHA256 with the sidecars' hash
//! key). Given the record id and the key file, the hash is computed here, exactly as the
//! sidecar computes it, and only the hash is sent or printed: the raw id never leaves this
//! process.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use custos_transform::HashKey;

use super::client::Source;
use super::table::Table;
use super::{emit, emit_json, parse_time, policy_rule, show_time};
use crate::output::OutputFormat;

/// The shortest key the sidecar accepts (`--hash-key-file`).
const MIN_KEY_BYTES: usize = 16;

/// Arguments of `custos audit subject`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The record id as the app returns it at the policy's `recordId` path (a number as its
    /// JSON text, e.g. 42). `-` reads it from the first line of standard input, which keeps it
    /// out of shell history and the process list. Hashed locally; never sent or printed.
    #[arg(
        value_name = "RECORD_ID",
        required_unless_present = "hash",
        conflicts_with = "hash",
        requires = "key_file"
    )]
    record_id: Option<String>,
    /// The hash key file the sidecars read (`--hash-key-file`): same bytes, trailing
    /// whitespace ignored.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The keyed record hash itself (64 hex characters), instead of RECORD_ID.
    #[arg(long, value_name = "HEX")]
    hash: Option<String>,
    /// Accesses at or after this time: a duration before now (`24h`, `7d`) or RFC 3339.
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Accesses before this time.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// At most this many accesses, newest first (1 to 10000; default 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(custos_store::MAX_LIMIT)))]
    limit: Option<u32>,
}

pub(crate) async fn run(source: &Source, args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let hash = match (&args.hash, &args.record_id, &args.key_file) {
        (Some(hex), _, _) => normalise_hash(hex)?,
        (None, Some(id), Some(key_file)) => {
            let key = read_key(key_file)?;
            let id = if id == "-" { read_stdin_id()? } else { id.clone() };
            key.hash_hex(id.as_bytes())
        }
        _ => bail!("give RECORD_ID with --key-file FILE, or --hash HEX"),
    };
    if let (Some(s), Some(u)) = (args.since, args.until)
        && s >= u
    {
        bail!("--until must be later than --since");
    }
    let accesses = source.subject(&hash, args.since, args.until, args.limit.unwrap_or(0)).await?;
    match output {
        OutputFormat::Json => {
            for a in &accesses {
                emit_json(a)?;
            }
        }
        OutputFormat::Text => {
            emit(&format!(
                "subject {hash}: {} access{}",
                accesses.len(),
                if accesses.len() == 1 { "" } else { "es" }
            ))?;
            if !accesses.is_empty() {
                let mut table =
                    Table::new(&["TIME (UTC)", "NAMESPACE", "PRINCIPAL", "DECISION", "POLICY/RULE", "PATH"]);
                for a in &accesses {
                    table.row(vec![
                        show_time(&a.time),
                        a.namespace.clone(),
                        a.principal.clone(),
                        a.decision.to_string(),
                        policy_rule(a.policy.as_deref(), a.rule.as_deref()),
                        a.path.clone(),
                    ]);
                }
                table.print()?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The key as the sidecar reads it: the file's bytes without trailing ASCII whitespace, at
/// least [`MIN_KEY_BYTES`] of them (custos-sidecar `SidecarArgs::into_settings`).
fn read_key(path: &Path) -> anyhow::Result<HashKey> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the hash key file {}", path.display()))?;
    let key = bytes.trim_ascii_end();
    if key.len() < MIN_KEY_BYTES {
        bail!(
            "hash key file {} holds {} bytes; at least {MIN_KEY_BYTES} are required (the sidecar refuses it too)",
            path.display(),
            key.len()
        );
    }
    Ok(HashKey::new(key.to_vec()))
}

/// The record id from the first line of standard input, without its line ending.
fn read_stdin_id() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the record id from standard input")?;
    let id = line.strip_suffix('\n').unwrap_or(&line);
    let id = id.strip_suffix('\r').unwrap_or(id);
    if id.is_empty() {
        bail!("no record id on standard input");
    }
    Ok(id.to_owned())
}

/// A keyed hash as the store indexes it: 64 lowercase hex characters.
fn normalise_hash(hex: &str) -> anyhow::Result<String> {
    let hash = hex.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--hash must be 64 hex characters (a keyed record hash, HMAC-SHA256)");
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_normalised() {
        let upper = "AB".repeat(32);
        assert_eq!(normalise_hash(&upper).ok(), Some("ab".repeat(32)));
        assert!(normalise_hash("abc").is_err());
        assert!(normalise_hash(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn key_files_are_read_as_the_sidecar_reads_them() {
        let dir = std::env::temp_dir().join(format!("custos-audit-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let with_newline = dir.join("a");
        let without = dir.join("b");
        std::fs::write(&with_newline, b"0123456789abcdef-secret\n").ok();
        std::fs::write(&without, b"0123456789abcdef-secret").ok();
        let a = read_key(&with_newline).map(|k| k.hash_hex(b"C1001")).ok();
        let b = read_key(&without).map(|k| k.hash_hex(b"C1001")).ok();
        assert!(a.is_some());
        assert_eq!(a, b);
        std::fs::write(&without, b"short\n").ok();
        let err = read_key(&without).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("holds 5 bytes; at least 16"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
