//! Resolved sidecar settings: what [`start`](crate::start) runs with. The command line
//! ([`SidecarArgs`](crate::SidecarArgs)) is turned into these; tests build them directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default admin address (`/healthz`, `/ready`, `/metrics`): next to the default proxy port
/// 15080, clear of the ports Istio's Envoy (15000-15021, 15053, 15090) and Linkerd's proxy take in
/// the same pod.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15081";

/// Size, time and connection limits of the proxy. Each limit, when hit, gives its own status
/// code and increments `custos_sidecar_limit_rejections_total{limit=...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Maximum size of the request line plus headers, in bytes (431 above).
    pub max_header_bytes: usize,
    /// The longest a client connection may go without starting a request: from its accept
    /// to its first request head, and between requests when kept alive (the connection is
    /// closed). An h2c connection is shut down (GOAWAY) once no stream has been open on it
    /// for this long. Also the admin port's, there at most 5 s.
    pub header_read_timeout: Duration,
    /// Maximum request body forwarded to the app, in bytes (413 above).
    pub max_request_body_bytes: u64,
    /// A request body up to this size is read whole before the app is called, so that a
    /// slow client holds none of the app's connections. One declared larger is forwarded as
    /// it arrives; one of unknown length that outgrows it, after the buffered part (0: every
    /// body as it arrives). See the sidecar README's "Request bodies".
    pub request_buffer_bytes: u64,
    /// Forward JSON and multipart POST bodies not read whole without checking them (the
    /// app's framework reads no `_method` from a body); by default such a body is checked on
    /// its way where another method would be decided otherwise on its path, and refused (413)
    /// when it cannot be (compressed, or in a charset other than UTF-8).
    pub forward_unchecked_bodies: bool,
    /// What all buffered request bodies may hold together; past it, bodies are forwarded as
    /// they arrive.
    pub request_buffer_total_bytes: u64,
    /// The longest a client may pause while its request body is read before the app is
    /// called (408 above). For a body forwarded as it arrives, [`Self::upstream_timeout`]
    /// counts from its last bytes (408 too when the sidecar is then waiting for the client).
    pub request_body_timeout: Duration,
    /// Once [`Self::request_body_timeout`] has passed since a request body started, the
    /// average rate in bytes per second it must keep arriving at: each byte earns its sender
    /// `1 / rate` seconds more, and a client that falls behind gets 408 (0: no minimum).
    /// Without it a client sending a byte before each time-out holds its request for ever.
    pub request_body_min_rate: u64,
    /// Maximum response body the sidecar buffers to transform, in bytes, both as received and
    /// after gzip/deflate decoding (502 above, unless failOpen or Audit mode).
    pub max_response_body_bytes: u64,
    /// What all responses read to be transformed may hold together, as received and decoded
    /// (503 with `Retry-After` past it, unless failOpen or Audit mode), so that concurrent
    /// large responses cannot take the sidecar past its memory limit.
    pub response_buffer_total_bytes: u64,
    /// Time-out for obtaining a connection to the app: waiting for a free one when all
    /// [`Self::upstream_max_connections`] are busy (503 when exceeded), then opening one (502
    /// when exceeded).
    pub upstream_connect_timeout: Duration,
    /// Time-out for the app's response head, and for its body when it must be transformed
    /// (504 when exceeded); counted from the request, or from the last bytes of a request
    /// body forwarded as it arrives.
    pub upstream_timeout: Duration,
    /// The longest a write to a client may wait (the client reading nothing): the connection
    /// is then closed, so that a client that stops reading a streamed response does not hold
    /// the app connection it comes from (`limit="response_send_timeout"`).
    pub response_send_timeout: Duration,
    /// Maximum concurrent client connections (503 and close above). Each costs about 30 KiB
    /// while idle (buffers, hyper's and h2's state), more with requests in flight: the
    /// default 2,048 hold about 60 MiB of the injected sidecar's 128 MiB memory limit.
    pub max_connections: usize,
    /// Maximum connections to the app, shared out among the proxy threads; each carries one
    /// request at a time, and a request waits for a free one (503 after the connect
    /// time-out).
    pub upstream_max_connections: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(30),
            max_request_body_bytes: 16 * 1024 * 1024,
            request_buffer_bytes: 64 * 1024,
            forward_unchecked_bodies: false,
            request_buffer_total_bytes: 32 * 1024 * 1024,
            request_body_timeout: Duration::from_secs(30),
            request_body_min_rate: 500,
            max_response_body_bytes: 16 * 1024 * 1024,
            response_buffer_total_bytes: 32 * 1024 * 1024,
            upstream_connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(30),
            response_send_timeout: Duration::from_secs(60),
            max_connections: 2048,
            upstream_max_connections: 1024,
        }
    }
}

/// Where and how audit events are shipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectorSettings {
    /// Base URL of the collector, e.g. `http://custos-collector.custos-system:8080`.
    pub url: String,
    /// File holding the bearer token for the collector (re-read by the shipper).
    pub token_file: Option<PathBuf>,
    /// Directory of the disk spool used while the collector is unreachable.
    pub spool_dir: PathBuf,
    /// Maximum size of the spool; events beyond it are dropped and counted.
    pub spool_max_bytes: u64,
    /// Maximum events per batch.
    pub batch_max_events: usize,
    /// How often a partial batch is sent.
    pub flush_interval: Duration,
    /// In-memory queue between the request path and the shipper.
    pub queue_capacity: usize,
    /// Time-out of one collector request.
    pub request_timeout: Duration,
    /// How often the usage of active principals is fetched from the collector (cluster-wide
    /// quotas); `None` disables the sync.
    pub usage_sync_interval: Option<Duration>,
    /// First wait before retrying the collector after a failed delivery; doubled after each
    /// further failure up to [`retry_max_backoff`](Self::retry_max_backoff), reset by a
    /// success.
    pub retry_initial_backoff: Duration,
    /// Longest wait between two delivery attempts while the collector is unreachable.
    pub retry_max_backoff: Duration,
}

impl CollectorSettings {
    /// Settings for `url` with the defaults of the command line.
    pub fn new(url: impl Into<String>, spool_dir: impl Into<PathBuf>) -> Self {
        CollectorSettings {
            url: url.into(),
            token_file: None,
            spool_dir: spool_dir.into(),
            spool_max_bytes: 256 * 1024 * 1024,
            batch_max_events: 500,
            flush_interval: Duration::from_secs(1),
            queue_capacity: 10_000,
            request_timeout: Duration::from_secs(5),
            usage_sync_interval: Some(Duration::from_secs(5)),
            retry_initial_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(30),
        }
    }
}

/// Everything the sidecar needs to run.
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    /// The compiled config file (JSON), watched for changes.
    pub config_path: PathBuf,
    /// Proxy listen address; `None`: `0.0.0.0:<proxyPort>` of the selected policies (15080
    /// when none selects the pod).
    pub listen: Option<SocketAddr>,
    /// The app; `None`: `127.0.0.1:<appPort>` of the selected policies.
    pub upstream: Option<SocketAddr>,
    /// Labels of this pod (which policies apply).
    pub pod_labels: BTreeMap<String, String>,
    /// Name of this pod, recorded in audit events.
    pub pod_name: Option<String>,
    /// Namespace of this pod; the config must be of the same namespace. `None`: take the
    /// config's.
    pub namespace: Option<String>,
    /// Admin address.
    pub admin: SocketAddr,
    /// Audit event shipping; `None`: events are counted and discarded.
    pub collector: Option<CollectorSettings>,
    /// Key of `Hash` masks and record-id hashes; `None`: a random per-process key (hashes
    /// then do not join across pods or restarts).
    pub hash_key: Option<Vec<u8>>,
    /// Where the operator mounts JWKS Secrets: `<dir>/<secretName>/<key>`.
    pub jwks_dir: PathBuf,
    /// Refresh period of JWKS fetched from a `jwksUri`.
    pub jwks_refresh: Duration,
    /// Time-out of one JWKS fetch.
    pub jwks_timeout: Duration,
    /// Size, time and connection limits.
    pub limits: ProxyLimits,
    /// Cluster name, recorded in audit events.
    pub cluster: Option<String>,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
    /// How long the proxy keeps accepting and serving after a shutdown is asked for, with
    /// `/ready` answering 503, before it stops accepting and drains: the time Kubernetes takes
    /// to take a terminating pod out of its Services' endpoints, during which new connections
    /// still arrive. Zero: stop accepting at once.
    pub shutdown_delay: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// How long pending audit events may take to be flushed or spooled on shutdown.
    pub shipper_shutdown_timeout: Duration,
    /// Proxy threads, each with its own single-threaded runtime, its own listening socket
    /// (`SO_REUSEPORT`, the kernel spreads connections) and its own upstream connection pool,
    /// so that a request never crosses threads. `0`: serve on the caller's runtime instead.
    pub proxy_threads: usize,
    /// Callers behind a service mesh's proxy, known by its client certificate (see
    /// [`crate::MeshIdentity`]); `None`: by the peer address only.
    pub mesh: Option<crate::MeshIdentity>,
}

/// One proxy thread per CPU the process may use (at least 1).
pub fn default_proxy_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

impl SidecarSettings {
    /// Settings with the command line defaults, for `config_path`.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        SidecarSettings {
            config_path: config_path.into(),
            listen: None,
            upstream: None,
            pod_labels: BTreeMap::new(),
            pod_name: None,
            namespace: None,
            admin: SocketAddr::from(([0, 0, 0, 0], 15081)),
            collector: None,
            hash_key: None,
            jwks_dir: PathBuf::from("/etc/custos/jwks"),
            jwks_refresh: Duration::from_secs(300),
            jwks_timeout: Duration::from_secs(5),
            limits: ProxyLimits::default(),
            cluster: None,
            reload_interval: Duration::from_millis(500),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(20),
            shipper_shutdown_timeout: Duration::from_secs(5),
            proxy_threads: default_proxy_threads(),
            mesh: None,
        }
    }
}
