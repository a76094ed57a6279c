//! The `custos collector` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Auth, CollectorConfig};
use crate::duration::parse_duration;
use crate::ingest::IngestLimits;
use crate::kube_events::KubeEvents;

/// Flags of `custos collector`. Every flag can also be set through the `CUSTOS_COLLECTOR_*`
/// environment variable named in its help.
#[derive(clap::Args, Clone, Debug)]
pub struct CollectorArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, env = "CUSTOS_COLLECTOR_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// The audit store: `sqlite:PATH` (one file, WAL; created if missing) or
    /// `postgres://USER@HOST:PORT/DB` (tables partitioned by day).
    #[arg(
        long,
        env = "CUSTOS_COLLECTOR_STORE",
        value_name = "URL",
        default_value = "sqlite:custos-audit.db"
    )]
    pub store: String,

    /// File holding the bearer token that sidecars and `custos audit` present; re-read when it
    /// changes. Required unless --allow-unauthenticated.
    #[arg(
        long,
        env = "CUSTOS_COLLECTOR_TOKEN_FILE",
        value_name = "FILE",
        required_unless_present = "allow_unauthenticated",
        conflicts_with = "allow_unauthenticated"
    )]
    pub token_file: Option<PathBuf>,

    /// Serve /v1/* without authentication (development only: anyone who reaches the port can
    /// write and read the audit trail).
    #[arg(long, env = "CUSTOS_COLLECTOR_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Largest batch body, as sent and after gzip decompression (e.g. 16MiB, 512KiB, 1000000).
    #[arg(long, env = "CUSTOS_COLLECTOR_MAX_BATCH_BYTES", value_name = "BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_batch_bytes: usize,

    /// Most events in one batch.
    #[arg(long, env = "CUSTOS_COLLECTOR_MAX_BATCH_EVENTS", value_name = "N", default_value_t = 10_000)]
    pub max_batch_events: usize,

    /// Batches decoded and stored at the same time (bounds memory: each may take a few times
    /// --max-batch-bytes); further ones wait. Bodies still arriving share a budget of this many
    /// times --max-batch-bytes and hold no slot.
    #[arg(long, env = "CUSTOS_COLLECTOR_MAX_CONCURRENT_BATCHES", value_name = "N", default_value_t = 4)]
    pub max_concurrent_batches: usize,

    /// Report queries (/v1/events, /v1/subjects, /v1/top, /v1/alerts, /v1/verify) run at the
    /// same time; further ones wait up to --query-timeout, then get 503 `queries_busy`. Ingest
    /// and /v1/usage never wait for them.
    #[arg(long, env = "CUSTOS_COLLECTOR_MAX_CONCURRENT_QUERIES", value_name = "N", default_value_t = 2)]
    pub max_concurrent_queries: usize,

    /// How long a report query (/v1/events, /v1/subjects, /v1/top, /v1/alerts) may run before
    /// the database stops it: 504 `query_timeout`, asking for a narrower query.
    #[arg(long, env = "CUSTOS_COLLECTOR_QUERY_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub query_timeout: Duration,

    /// Delete events older than this (e.g. 30d, 12w); `none` keeps them forever. The chain
    /// stays verifiable from an anchor.
    #[arg(long, env = "CUSTOS_COLLECTOR_RETENTION", value_name = "DURATION", default_value = "none", value_parser = parse_retention)]
    pub retention: Retention,

    /// Events dated more than this before they arrive (e.g. 7d, 30d) are acknowledged as
    /// `expired` and not stored, as events older than what retention deleted are; `none`
    /// stores events of any age. Measured from the newest stored event when the clock is
    /// later. A sidecar's spool delivers events late after an outage: keep this longer than
    /// the outages its events must survive.
    #[arg(long, env = "CUSTOS_COLLECTOR_MAX_EVENT_AGE", value_name = "DURATION", default_value = "30d", value_parser = parse_retention)]
    pub max_event_age: Retention,

    /// How often retention runs (the first run is at start).
    #[arg(long, env = "CUSTOS_COLLECTOR_PRUNE_INTERVAL", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub prune_interval: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may take before their connections are
    /// closed.
    #[arg(long, env = "CUSTOS_COLLECTOR_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// The longest a client connection may go without starting a request: from connecting,
    /// and between requests when kept alive over HTTP/1.1; it is then closed.
    #[arg(long, env = "CUSTOS_COLLECTOR_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Turn the leak detectors off (they run by default; see the --detect-* flags).
    #[arg(long, env = "CUSTOS_COLLECTOR_NO_DETECT")]
    pub no_detect: bool,

    /// Leak detectors.
    #[command(flatten)]
    pub detect: custos_detect::DetectArgs,

    /// Alert delivery.
    #[command(flatten)]
    pub alerts: custos_detect::SinkArgs,

    /// Record each alert as a Kubernetes Event on the DataAccessPolicy it concerns: `auto` in a
    /// cluster (KUBERNETES_SERVICE_HOST set), `on` (fail to start without a Kubernetes
    /// client), `off`. Needs RBAC: get dataaccesspolicies.custos.dev, create/patch
    /// events.k8s.io events.
    #[arg(
        long,
        env = "CUSTOS_COLLECTOR_KUBE_EVENTS",
        value_name = "MODE",
        value_enum,
        default_value_t = KubeEvents::Auto
    )]
    pub kube_events: KubeEvents,

    /// Forward every newly stored event to this OTLP/HTTP logs endpoint (a base URL such as
    /// http://otel-collector:4318, or the full /v1/logs URL): the path to Kafka, ClickHouse or
    /// any OpenTelemetry pipeline.
    #[arg(long, env = "CUSTOS_COLLECTOR_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Extra header of the OTLP export requests, `name=value` (repeatable; values are never
    /// logged), e.g. an API key.
    #[arg(
        long = "otlp-header",
        env = "CUSTOS_COLLECTOR_OTLP_HEADERS",
        value_name = "NAME=VALUE",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub otlp_headers: Vec<String>,

    /// Compress OTLP export requests with gzip.
    #[arg(long, env = "CUSTOS_COLLECTOR_OTLP_GZIP")]
    pub otlp_gzip: bool,
}

/// The `--retention` and `--max-event-age` values: a duration, or `none` (no bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

/// Parses `--retention` or `--max-event-age`: `none` (also `off`, `forever`) or a positive
/// duration.
pub fn parse_retention(text: &str) -> Result<Retention, String> {
    if matches!(text.trim().to_ascii_lowercase().as_str(), "none" | "off" | "forever") {
        return Ok(Retention(None));
    }
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("the duration must be positive, or `none`".into());
    }
    Ok(Retention(Some(d)))
}

/// Parses a size: a number of bytes with an optional unit `B`, `KiB`, `MiB`, `GiB` (also
/// `K`/`KB`, `M`/`MB`, `G`/`GB`, taken as powers of 1024).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: u64 =
        number.parse().map_err(|_| "a size is a number with an optional unit, e.g. 16MiB".to_owned())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err("unknown size unit (use B, KiB, MiB or GiB)".into()),
    };
    let bytes = value.checked_mul(factor).ok_or_else(|| "size out of range".to_owned())?;
    if bytes == 0 {
        return Err("size must be positive".into());
    }
    usize::try_from(bytes).map_err(|_| "size out of range".to_owned())
}

impl CollectorArgs {
    /// The configuration these flags describe.
    pub fn into_config(self) -> Result<CollectorConfig, String> {
        let auth = match (self.token_file, self.allow_unauthenticated) {
            (Some(path), false) => Auth::TokenFile(path),
            (None, true) => Auth::Unauthenticated,
            (Some(_), true) => {
                return Err("--token-file and --allow-unauthenticated exclude each other".into());
            }
            (None, false) => return Err("--token-file is required (or --allow-unauthenticated)".into()),
        };
        let mut config = CollectorConfig::new(self.store, auth);
        config.listen = self.listen;
        config.limits =
            IngestLimits { max_batch_bytes: self.max_batch_bytes, max_batch_events: self.max_batch_events };
        config.max_concurrent_batches = self.max_concurrent_batches;
        config.max_concurrent_queries = self.max_concurrent_queries;
        config.query_timeout = self.query_timeout;
        config.retention = self.retention.0;
        config.max_event_age = self.max_event_age.0;
        config.prune_interval = self.prune_interval;
        config.shutdown_timeout = self.shutdown_timeout;
        if self.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be longer than 0s".into());
        }
        config.header_read_timeout = self.header_read_timeout;
        if !self.no_detect {
            config.detect = Some(self.detect.into_config().map_err(|e| e.to_string())?);
        }
        config.alerts = self.alerts.into_config();
        config.kube_events = self.kube_events;
        if let Some(endpoint) = self.otlp_endpoint {
            let mut export = custos_otlp::ExporterConfig::new(endpoint);
            for header in self.otlp_headers {
                let (name, value) =
                    header.split_once('=').ok_or_else(|| "--otlp-header must be NAME=VALUE".to_owned())?;
                export.headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
            export.gzip = self.otlp_gzip;
            config.otlp_export = Some(export);
        } else if !self.otlp_headers.is_empty() || self.otlp_gzip {
            return Err("--otlp-header and --otlp-gzip need --otlp-endpoint".into());
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: CollectorArgs,
    }

    #[test]
    fn defaults_and_flags() {
        let cli = Cli::try_parse_from(["c", "--token-file", "/t"]).unwrap();
        let config = cli.args.into_config().unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.store_url, "sqlite:custos-audit.db");
        assert_eq!(config.auth, Auth::TokenFile("/t".into()));
        assert_eq!(config.limits, IngestLimits { max_batch_bytes: 16 << 20, max_batch_events: 10_000 });
        assert_eq!(config.retention, None);
        assert_eq!(config.max_event_age, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.prune_interval, Duration::from_secs(3600));
        assert_eq!(config.kube_events, KubeEvents::Auto);

        let cli = Cli::try_parse_from([
            "c",
            "--allow-unauthenticated",
            "--retention",
            "30d",
            "--prune-interval",
            "10m",
            "--max-batch-bytes",
            "512KiB",
            "--shutdown-timeout",
            "5s",
            "--header-read-timeout",
            "10s",
            "--max-event-age",
            "none",
        ])
        .unwrap();
        let config = cli.args.into_config().unwrap();
        assert_eq!(config.auth, Auth::Unauthenticated);
        assert_eq!(config.max_event_age, None);
        assert_eq!(config.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.limits.max_batch_bytes, 512 << 10);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        let cli = Cli::try_parse_from(["c", "--token-file", "/t", "--header-read-timeout", "0s"]).unwrap();
        let err = cli.args.into_config().unwrap_err();
        assert!(err.contains("--header-read-timeout"), "{err}");

        for (value, mode) in [("auto", KubeEvents::Auto), ("on", KubeEvents::On), ("off", KubeEvents::Off)] {
            let cli = Cli::try_parse_from(["c", "--token-file", "/t", "--kube-events", value]).unwrap();
            assert_eq!(cli.args.into_config().unwrap().kube_events, mode);
        }
        assert!(Cli::try_parse_from(["c", "--token-file", "/t", "--kube-events", "maybe"]).is_err());
    }

    #[test]
    fn token_or_explicit_opt_out_is_required() {
        assert!(Cli::try_parse_from(["c"]).is_err());
        assert!(Cli::try_parse_from(["c", "--token-file", "/t", "--allow-unauthenticated"]).is_err());
        assert!(Cli::try_parse_from(["c", "--token-file", "/t", "--retention", "0d"]).is_err());
        assert!(Cli::try_parse_from(["c", "--token-file", "/t", "--max-event-age", "0s"]).is_err());
        assert!(Cli::try_parse_from(["c", "--token-file", "/t", "--max-batch-bytes", "0"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_bytes("2g").unwrap(), 2 << 30);
        assert!(parse_bytes("1.5MiB").is_err());
        assert!(parse_bytes("12XB").is_err());
        assert_eq!(parse_retention("none").unwrap(), Retention(None));
        assert_eq!(parse_retention("7d").unwrap(), Retention(Some(Duration::from_secs(7 * 86_400))));
    }
}
