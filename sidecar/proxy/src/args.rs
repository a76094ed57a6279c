//! The `custos sidecar` command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::settings::{self, CollectorSettings, ProxyLimits, SidecarSettings};

/// Flags of `custos sidecar`. Every flag can also be set through the environment variable
/// named in its help.
#[derive(clap::Args, Clone, Debug)]
pub struct SidecarArgs {
    /// Compiled sidecar config (JSON, from `custos compile` or the operator's ConfigMap).
    /// Watched: a new valid config applies within 2 s; an invalid one is rejected and the
    /// last good one stays.
    #[arg(long, env = "CUSTOS_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// Proxy listen address (default: `0.0.0.0:<proxyPort of the selected policy>`, or
    /// `0.0.0.0:15080`).
    #[arg(long, env = "CUSTOS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The app (default: `127.0.0.1:<appPort of the selected policy>`).
    #[arg(long, env = "CUSTOS_UPSTREAM", value_name = "ADDR")]
    pub upstream: Option<SocketAddr>,

    /// Labels of this pod, `key=value,...`; they select the policies that apply.
    #[arg(long, env = "CUSTOS_POD_LABELS", value_name = "LABELS", conflicts_with = "pod_labels_file")]
    pub pod_labels: Option<String>,

    /// Labels of this pod as a downward API file (`key="value"` lines).
    #[arg(long, env = "CUSTOS_POD_LABELS_FILE", value_name = "FILE")]
    pub pod_labels_file: Option<PathBuf>,

    /// Name of this pod, recorded in audit events.
    #[arg(long, env = "CUSTOS_POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// Namespace of this pod; the sidecar refuses a config of another namespace
    /// [default: the config's].
    #[arg(long, env = "CUSTOS_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// Proxy threads: each serves its share of the connections on its own single-threaded
    /// runtime and upstream connections (`SO_REUSEPORT`). 0 serves on the process's shared runtime
    /// [default: the number of CPUs available to the process].
    #[arg(long, env = "CUSTOS_PROXY_THREADS", value_name = "N")]
    pub proxy_threads: Option<usize>,

    /// How calling workloads are told apart: `peer-ip` (the peer address, looked up in the
    /// config's identity table), `linkerd` (behind Linkerd's proxy: the client identity it
    /// verified, `l5d-client-id`, on connections from a socket of the pod owned by
    /// `--linkerd-proxy-uid`; the peer address for the others, whose `l5d-client-id` is
    /// removed) or `istio` (behind Istio's sidecar, which connects from
    /// 127.0.0.6: the SPIFFE id of the client certificate Envoy verified, from the last
    /// element of `x-forwarded-client-cert`, for connections from 127.0.0.6 or ::6; the peer
    /// address for the others, whose `x-forwarded-client-cert` is removed). Needs mutual TLS
    /// to the pod (PeerAuthentication STRICT; plain-text callers are anonymous) and the proxy
    /// port read as HTTP by Istio.
    #[arg(long, env = "CUSTOS_CALLER_IDENTITY", value_name = "HOW", value_enum, default_value_t = crate::CallerIdentity::PeerIp)]
    pub caller_identity: crate::CallerIdentity,

    /// The mesh's trust domain (`--caller-identity istio|linkerd`): identities of another
    /// trust domain are anonymous.
    #[arg(long, env = "CUSTOS_TRUST_DOMAIN", value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The user id Linkerd's proxy runs as (`--caller-identity linkerd`): `l5d-client-id` is
    /// believed only on connections from a socket of the pod this user owns.
    #[arg(long, env = "CUSTOS_LINKERD_PROXY_UID", value_name = "UID", default_value_t = crate::mesh::LINKERD_PROXY_UID)]
    pub linkerd_proxy_uid: u32,

    /// The user id Istio's sidecar runs as (`--caller-identity istio`): the
    /// `x-forwarded-client-cert` of a connection from 127.0.0.6 is believed only when a socket
    /// of the pod this user owns made it (another process of the pod could bind that address).
    #[arg(long, env = "CUSTOS_ISTIO_PROXY_UID", value_name = "UID", default_value_t = crate::mesh::ISTIO_PROXY_UID)]
    pub istio_proxy_uid: u32,

    /// Admin address: /healthz, /ready, /metrics.
    #[arg(long, env = "CUSTOS_ADMIN", value_name = "ADDR", default_value = settings::DEFAULT_ADMIN_ADDR)]
    pub admin: SocketAddr,

    /// Collector base URL for audit events and cluster-wide usage; without it audit events
    /// are counted and discarded.
    #[arg(long, env = "CUSTOS_COLLECTOR", value_name = "URL")]
    pub collector: Option<String>,

    /// File holding the collector's bearer token.
    #[arg(long, env = "CUSTOS_COLLECTOR_TOKEN_FILE", value_name = "FILE")]
    pub collector_token_file: Option<PathBuf>,

    /// Disk spool for audit events while the collector is unreachable.
    #[arg(long, env = "CUSTOS_SPOOL_DIR", value_name = "DIR", default_value = "/var/run/custos/spool")]
    pub spool_dir: PathBuf,

    /// Maximum spool size in bytes; events beyond it are dropped and counted.
    #[arg(long, env = "CUSTOS_SPOOL_MAX_BYTES", value_name = "BYTES", default_value_t = 256 * 1024 * 1024)]
    pub spool_max_bytes: u64,

    /// How often the cluster-wide usage of active principals is fetched from the collector.
    #[arg(long, env = "CUSTOS_USAGE_SYNC_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub usage_sync_interval: Duration,

    /// Key for `Hash` masks and record-id hashes (the same Secret on every pod, so hashes
    /// join). Without it a random per-process key is used.
    #[arg(long, env = "CUSTOS_HASH_KEY_FILE", value_name = "FILE")]
    pub hash_key_file: Option<PathBuf>,

    /// Where the operator mounts JWKS Secrets: `<dir>/<secretName>/<key or jwks.json>`.
    #[arg(long, env = "CUSTOS_JWKS_DIR", value_name = "DIR", default_value = "/etc/custos/jwks")]
    pub jwks_dir: PathBuf,

    /// Maximum request line plus headers, in bytes (431 above).
    #[arg(long, env = "CUSTOS_MAX_HEADER_BYTES", value_name = "BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// The longest a client connection may go without starting a request: from connecting
    /// to its first request head, and between requests when kept alive; the connection is
    /// then closed (h2c: once no stream has been open for this long, GOAWAY). The admin
    /// port's too, there at most 5s.
    #[arg(long, env = "CUSTOS_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Maximum request body, in bytes (413 above).
    #[arg(long, env = "CUSTOS_MAX_REQUEST_BODY_BYTES", value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_request_body_bytes: u64,

    /// A request body up to this size is read whole before the app is called, so that slow
    /// clients hold none of its connections. One declared larger is forwarded as it arrives;
    /// one of unknown length (chunked, HTTP/2) that outgrows it, after the buffered part (0:
    /// every body as it arrives).
    #[arg(long, env = "CUSTOS_REQUEST_BUFFER_BYTES", value_name = "BYTES", default_value_t = 64 * 1024)]
    pub request_buffer_bytes: u64,

    /// Forward JSON and multipart POST bodies larger than the request buffer without checking
    /// them for a `_method` parameter: for apps whose framework reads none from a body
    /// (Django, Go, Spring Boot, Express without method-override's body getter). By default
    /// such a body is checked on its way to the app where another method would be decided
    /// otherwise on its path, since Rails (Rack) and Laravel run a POST as the method it
    /// names, and refused (413) when compressed or in a charset other than UTF-8.
    #[arg(long, env = "CUSTOS_FORWARD_UNCHECKED_BODIES")]
    pub forward_unchecked_bodies: bool,

    /// What all buffered request bodies may hold together; past it, bodies are forwarded as
    /// they arrive.
    #[arg(long, env = "CUSTOS_REQUEST_BUFFER_TOTAL_BYTES", value_name = "BYTES", default_value_t = 32 * 1024 * 1024)]
    pub request_buffer_total_bytes: u64,

    /// The longest a client may pause while its request body is read before the app is
    /// called (408 above). For a body forwarded as it arrives, `--upstream-timeout` counts
    /// from its last bytes (408 too when the sidecar is then waiting for the client).
    #[arg(long, env = "CUSTOS_REQUEST_BODY_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub request_body_timeout: Duration,

    /// Once --request-body-timeout has passed since a request body started, the average
    /// rate in bytes per second it must keep arriving at; each byte earns 1/rate seconds
    /// more, and a client that falls behind gets 408 (0: no minimum).
    #[arg(
        long,
        env = "CUSTOS_REQUEST_BODY_MIN_RATE",
        value_name = "BYTES_PER_SECOND",
        default_value_t = 500
    )]
    pub request_body_min_rate: u64,

    /// Maximum response body the sidecar buffers to transform, in bytes (502 above unless
    /// failOpen).
    #[arg(long, env = "CUSTOS_MAX_RESPONSE_BODY_BYTES", value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_response_body_bytes: u64,

    /// What all responses read to be transformed may hold together, in bytes, as received and
    /// decoded; past it, 503 with Retry-After (unless failOpen or Audit mode). At least twice
    /// --max-response-body-bytes.
    #[arg(long, env = "CUSTOS_RESPONSE_BUFFER_TOTAL_BYTES", value_name = "BYTES", default_value_t = 32 * 1024 * 1024)]
    pub response_buffer_total_bytes: u64,

    /// Time-out for obtaining a connection to the app: waiting for a free one when all
    /// `--upstream-max-connections` are busy (503), then connecting (502).
    #[arg(long, env = "CUSTOS_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Time-out for the app's response (504), counted from the request, or from the last
    /// bytes of a request body forwarded as it arrives.
    #[arg(long, env = "CUSTOS_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// The longest a write to a client may wait while it reads nothing; the connection is then
    /// closed (as nginx's `send_timeout`), so that a client that stops reading a streamed
    /// response does not hold the app connection it comes from.
    #[arg(long, env = "CUSTOS_RESPONSE_SEND_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub response_send_timeout: Duration,

    /// Maximum concurrent client connections (503 above). Each costs about 30 KiB while idle,
    /// more with requests in flight: the default holds about 60 MiB of the injected sidecar's
    /// 128 MiB memory limit; raise it with the limit.
    #[arg(long, env = "CUSTOS_MAX_CONNECTIONS", value_name = "N", default_value_t = 2048)]
    pub max_connections: usize,

    /// Maximum connections to the app (requests in flight to it), shared out among the proxy
    /// threads; more requests wait for a free connection.
    #[arg(long, env = "CUSTOS_UPSTREAM_MAX_CONNECTIONS", value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_max_connections: u32,

    /// How long to keep accepting and serving after SIGTERM, with /ready answering 503, before
    /// draining: the time the cluster takes to stop routing new connections to a terminating
    /// pod (e.g. 5s for a sidecar that stops together with its app; 0 for a native sidecar,
    /// which Kubernetes stops after the app).
    #[arg(long, env = "CUSTOS_SHUTDOWN_DELAY", value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// How long in-flight requests may take to finish on SIGTERM.
    #[arg(long, env = "CUSTOS_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Cluster name, recorded in audit events.
    #[arg(long, env = "CUSTOS_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
}

impl SidecarArgs {
    /// Resolves the flags into settings: reads the pod labels file and the hash key.
    pub fn into_settings(self) -> Result<SidecarSettings, Error> {
        let pod_labels = match (&self.pod_labels, &self.pod_labels_file) {
            (Some(list), _) => parse_label_list(list)?,
            (None, Some(file)) => {
                let text = read_file(file, "pod labels file")?;
                parse_downward_labels(&text)?
            }
            (None, None) => BTreeMap::new(),
        };
        let hash_key = match &self.hash_key_file {
            Some(file) => {
                let bytes = std::fs::read(file).map_err(|e| Error::File {
                    what: "hash key file",
                    path: file.clone(),
                    source: e,
                })?;
                let trimmed = trim_ascii_end(&bytes);
                if trimmed.len() < 16 {
                    return Err(Error::Invalid(format!(
                        "hash key file {} holds {} bytes; at least 16 are required",
                        file.display(),
                        trimmed.len()
                    )));
                }
                Some(trimmed.to_vec())
            }
            None => None,
        };
        if self.request_body_timeout.is_zero() {
            return Err(Error::Invalid("--request-body-timeout must be longer than 0s".into()));
        }
        if self.response_buffer_total_bytes < self.max_response_body_bytes.saturating_mul(2) {
            return Err(Error::Invalid(format!(
                "--response-buffer-total-bytes ({}) must be at least twice --max-response-body-bytes ({}): a compressed response is held as received and decoded, and one that large could never be transformed",
                self.response_buffer_total_bytes, self.max_response_body_bytes
            )));
        }
        if self.header_read_timeout.is_zero() {
            return Err(Error::Invalid("--header-read-timeout must be longer than 0s".into()));
        }
        if self.response_send_timeout.is_zero() {
            return Err(Error::Invalid("--response-send-timeout must be longer than 0s".into()));
        }
        let domain = &self.trust_domain;
        if domain.is_empty()
            || !domain.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(Error::Invalid(
                "--trust-domain must be a SPIFFE trust domain name (letters, digits, '.', '-', '_'), e.g. cluster.local"
                    .into(),
            ));
        }
        let collector = self.collector.map(|url| CollectorSettings {
            token_file: self.collector_token_file.clone(),
            spool_max_bytes: self.spool_max_bytes,
            usage_sync_interval: Some(self.usage_sync_interval).filter(|d| !d.is_zero()),
            ..CollectorSettings::new(url, self.spool_dir.clone())
        });
        Ok(SidecarSettings {
            listen: self.listen,
            upstream: self.upstream,
            pod_labels,
            pod_name: self.pod_name,
            namespace: self.namespace,
            admin: self.admin,
            collector,
            hash_key,
            jwks_dir: self.jwks_dir,
            limits: ProxyLimits {
                max_header_bytes: self.max_header_bytes,
                header_read_timeout: self.header_read_timeout,
                max_request_body_bytes: self.max_request_body_bytes,
                request_buffer_bytes: self.request_buffer_bytes,
                forward_unchecked_bodies: self.forward_unchecked_bodies,
                request_buffer_total_bytes: self.request_buffer_total_bytes,
                request_body_timeout: self.request_body_timeout,
                request_body_min_rate: self.request_body_min_rate,
                max_response_body_bytes: self.max_response_body_bytes,
                response_buffer_total_bytes: self.response_buffer_total_bytes,
                upstream_connect_timeout: self.upstream_connect_timeout,
                upstream_timeout: self.upstream_timeout,
                response_send_timeout: self.response_send_timeout,
                max_connections: self.max_connections.max(1),
                upstream_max_connections: self.upstream_max_connections as usize,
            },
            cluster: self.cluster,
            shutdown_delay: self.shutdown_delay,
            drain_timeout: self.drain_timeout,
            proxy_threads: self.proxy_threads.unwrap_or_else(crate::settings::default_proxy_threads),
            mesh: match self.caller_identity {
                crate::CallerIdentity::PeerIp => None,
                crate::CallerIdentity::Istio => Some(crate::MeshIdentity {
                    mesh: crate::Mesh::Istio { proxy_uid: self.istio_proxy_uid },
                    trust_domain: self.trust_domain,
                }),
                crate::CallerIdentity::Linkerd => Some(crate::MeshIdentity {
                    mesh: crate::Mesh::Linkerd { proxy_uid: self.linkerd_proxy_uid },
                    trust_domain: self.trust_domain,
                }),
            },
            ..SidecarSettings::new(self.config)
        })
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::File { what, path: path.to_path_buf(), source: e })
}

fn trim_ascii_end(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Parses a duration such as `500ms`, `2s`, `1m` or `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid duration '{s}' (e.g. 500ms, 2s, 1m)"))?;
    let factor = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration unit in '{s}' (use ms, s, m or h)")),
    };
    let secs = value * factor;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `key=value,key2=value2` (whitespace around items is ignored).
pub fn parse_label_list(list: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("pod label '{item}' is not key=value")))?;
        if k.trim().is_empty() {
            return Err(Error::Invalid("pod label with an empty key".into()));
        }
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// Parses a downward API labels file: one `key="value"` per line, values quoted as Go's `%q`.
pub fn parse_downward_labels(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || Error::Invalid(format!("pod labels file line {}: expected key=\"value\"", n + 1));
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let value = unquote(v.trim()).ok_or_else(bad)?;
        if k.trim().is_empty() {
            return Err(bad());
        }
        labels.insert(k.trim().to_string(), value);
    }
    Ok(labels)
}

/// Undoes Go's `%q` quoting (the escapes label values can need).
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sidecar: SidecarArgs,
    }

    fn settings(flags: &[&str]) -> Result<SidecarSettings, String> {
        use clap::Parser;
        let argv = ["custos-sidecar", "--config", "/dev/null"].iter().chain(flags);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.sidecar.into_settings().map_err(|e| e.to_string())
    }

    #[test]
    fn request_buffer_flags_and_their_defaults() {
        let limits = settings(&[]).unwrap().limits;
        assert_eq!(limits.request_buffer_bytes, 64 * 1024);
        assert_eq!(limits.request_buffer_total_bytes, 32 * 1024 * 1024);
        assert_eq!(limits.request_body_timeout, Duration::from_secs(30));
        assert_eq!(limits.request_body_min_rate, 500);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(30));
        assert_eq!(limits, ProxyLimits { max_connections: 2048, ..ProxyLimits::default() });
        let limits = settings(&[
            "--request-buffer-bytes=0",
            "--request-buffer-total-bytes",
            "1048576",
            "--request-body-timeout=1500ms",
            "--request-body-min-rate=0",
        ])
        .unwrap()
        .limits;
        assert_eq!(limits.request_buffer_bytes, 0);
        assert_eq!(limits.request_buffer_total_bytes, 1 << 20);
        assert_eq!(limits.request_body_timeout, Duration::from_millis(1500));
        assert_eq!(limits.request_body_min_rate, 0, "0 turns the minimum off");
        let err = settings(&["--request-body-timeout=0s"]).unwrap_err();
        assert!(err.contains("--request-body-timeout must be longer than 0s"), "{err}");
        let limits = settings(&["--response-buffer-total-bytes", "33554432"]).unwrap().limits;
        assert_eq!(limits.response_buffer_total_bytes, 32 << 20);
        let err = settings(&["--response-buffer-total-bytes=1000"]).unwrap_err();
        assert!(
            err.contains(
                "--response-buffer-total-bytes (1000) must be at least twice --max-response-body-bytes (16777216)"
            ),
            "{err}"
        );
        let err =
            settings(&["--response-buffer-total-bytes=1999", "--max-response-body-bytes=1000"]).unwrap_err();
        assert!(err.contains("at least twice"), "{err}");
        let limits = settings(&["--response-buffer-total-bytes=2000", "--max-response-body-bytes=1000"])
            .unwrap()
            .limits;
        assert_eq!(limits.response_buffer_total_bytes, 2000);
        let err = settings(&["--header-read-timeout=0"]).unwrap_err();
        assert!(err.contains("--header-read-timeout must be longer than 0s"), "{err}");
        let limits = settings(&["--header-read-timeout", "45s"]).unwrap().limits;
        assert_eq!(limits.header_read_timeout, Duration::from_secs(45));
        let err = settings(&["--request-buffer-bytes=64KiB"]).unwrap_err();
        assert!(err.contains("--request-buffer-bytes"), "{err}");
    }

    #[test]
    fn caller_identity_flags() {
        assert_eq!(settings(&[]).unwrap().mesh, None, "the peer address by default");
        let mesh = settings(&["--caller-identity", "istio"]).unwrap().mesh;
        assert_eq!(
            mesh,
            Some(crate::MeshIdentity {
                mesh: crate::Mesh::Istio { proxy_uid: crate::mesh::ISTIO_PROXY_UID },
                trust_domain: "cluster.local".into()
            })
        );
        let mesh = settings(&["--caller-identity=istio", "--trust-domain=prod.example"]).unwrap().mesh;
        assert_eq!(mesh.unwrap().trust_domain, "prod.example");
        let mesh = settings(&["--caller-identity=istio", "--istio-proxy-uid=1000650000"]).unwrap().mesh;
        assert_eq!(mesh.unwrap().mesh, crate::Mesh::Istio { proxy_uid: 1_000_650_000 });
        assert_eq!(settings(&["--caller-identity=peer-ip"]).unwrap().mesh, None);
        let mesh = settings(&["--caller-identity=linkerd"]).unwrap().mesh.unwrap();
        assert_eq!(mesh.mesh, crate::Mesh::Linkerd { proxy_uid: 2102 });
        let mesh =
            settings(&["--caller-identity=linkerd", "--linkerd-proxy-uid=2200"]).unwrap().mesh.unwrap();
        assert_eq!(mesh.mesh, crate::Mesh::Linkerd { proxy_uid: 2200 });
        let err = settings(&["--caller-identity=linkerd", "--linkerd-proxy-uid=-1"]).unwrap_err();
        assert!(err.contains("--linkerd-proxy-uid"), "{err}");
        let err = settings(&["--caller-identity=consul"]).unwrap_err();
        assert!(
            err.contains("--caller-identity") && err.contains("istio") && err.contains("linkerd"),
            "{err}"
        );
        for bad in ["", "spiffe://cluster.local", "cluster.local/ns"] {
            let err = settings(&["--caller-identity=istio", "--trust-domain", bad]).unwrap_err();
            assert!(err.contains("--trust-domain must be a SPIFFE trust domain name"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn label_lists() {
        let l = parse_label_list("app=customer-api, tier = backend,").unwrap();
        assert_eq!(l.get("app").map(String::as_str), Some("customer-api"));
        assert_eq!(l.get("tier").map(String::as_str), Some("backend"));
        assert!(parse_label_list("app").is_err());
    }

    #[test]
    fn downward_api_file() {
        let text = "app=\"customer-api\"\npod-template-hash=\"7d9f\"\nnote=\"a \\\"b\\\"\"\n";
        let l = parse_downward_labels(text).unwrap();
        assert_eq!(l["app"], "customer-api");
        assert_eq!(l["pod-template-hash"], "7d9f");
        assert_eq!(l["note"], "a \"b\"");
        assert!(parse_downward_labels("app=customer-api").is_err());
    }
}
