//! The sidecar container and its volumes.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::InjectSettings;
use crate::names::{CONFIG_KEY, CONFIG_MAP_NAME, SIDECAR_CONTAINER};

/// Name of the sidecar's proxy port.
pub const PROXY_PORT_NAME: &str = "custos-proxy";
/// Name of the sidecar's admin port ([`InjectSettings::admin_port`]), which the NetworkPolicies
/// and the chart's PodMonitor refer to by name, so pods injected with another port number
/// stay reachable.
pub const ADMIN_PORT_NAME: &str = "custos-admin";
/// Where the `custos-config` ConfigMap is mounted (the config is `<dir>/config.json`).
pub const CONFIG_DIR: &str = "/etc/custos/config";
/// Where the downward API volume is mounted (the pod labels are `<dir>/labels`).
pub const POD_INFO_DIR: &str = "/etc/custos/pod";
/// Where the JWKS Secrets are mounted, one directory per Secret: `<dir>/<secret>/`.
pub const JWKS_DIR: &str = "/etc/custos/jwks";
/// The audit spool (`emptyDir`).
pub const SPOOL_DIR: &str = "/var/run/custos/spool";
/// Where the collector token Secret is mounted.
pub const COLLECTOR_TOKEN_DIR: &str = "/var/run/secrets/custos/collector";
/// Key of the collector token in its Secret (and file name under [`COLLECTOR_TOKEN_DIR`]).
pub const COLLECTOR_TOKEN_KEY: &str = "token";
/// Where the hash key Secret is mounted.
pub const HASH_KEY_DIR: &str = "/var/run/secrets/custos/hash-key";
/// Key of the hash key in its Secret (and file name under [`HASH_KEY_DIR`]).
pub const HASH_KEY_KEY: &str = "key";

const CONFIG_VOLUME: &str = "custos-config";
const POD_INFO_VOLUME: &str = "custos-pod-info";
const SPOOL_VOLUME: &str = "custos-spool";
const COLLECTOR_TOKEN_VOLUME: &str = "custos-collector-token";
const HASH_KEY_VOLUME: &str = "custos-hash-key";
/// File of the pod labels in the downward API volume.
const LABELS_FILE: &str = "labels";

/// What the selecting policies decide about the sidecar.
pub(super) struct SidecarPlan<'a> {
    /// The port the sidecar listens on.
    pub proxy_port: u16,
    /// The app port to forward to, when no policy names it.
    pub upstream_port: Option<u16>,
    /// JWKS Secrets to mount, sorted.
    pub jwks_secrets: &'a [String],
    /// The pod's `terminationGracePeriodSeconds`, when it sets one.
    pub grace_period_seconds: Option<i64>,
}

/// Volume name of the `index`-th JWKS Secret. Secret names can be 253 characters long and
/// volume names only 63, so the name carries the position, not the Secret name.
fn jwks_volume(index: usize) -> String {
    format!("custos-jwks-{index}")
}

/// The volumes the sidecar mounts.
pub(super) fn volumes(jwks_secrets: &[String], settings: &InjectSettings) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: CONFIG_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: CONFIG_MAP_NAME.to_string(),
                items: Some(vec![KeyToPath {
                    key: CONFIG_KEY.to_string(),
                    path: CONFIG_KEY.to_string(),
                    mode: None,
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: POD_INFO_VOLUME.to_string(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: LABELS_FILE.to_string(),
                    field_ref: Some(field("metadata.labels")),
                    ..DownwardAPIVolumeFile::default()
                }]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: SPOOL_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    for (index, secret) in jwks_secrets.iter().enumerate() {
        volumes.push(secret_volume(jwks_volume(index), secret, None));
    }
    if let Some(secret) = &settings.collector_token_secret {
        volumes.push(secret_volume(COLLECTOR_TOKEN_VOLUME.to_string(), secret, Some(COLLECTOR_TOKEN_KEY)));
    }
    if let Some(secret) = &settings.hash_key_secret {
        volumes.push(secret_volume(HASH_KEY_VOLUME.to_string(), secret, Some(HASH_KEY_KEY)));
    }
    volumes
}

fn secret_volume(name: String, secret: &str, only_key: Option<&str>) -> Volume {
    Volume {
        name,
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: only_key
                .map(|key| vec![KeyToPath { key: key.to_string(), path: key.to_string(), mode: None }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn field(path: &str) -> ObjectFieldSelector {
    ObjectFieldSelector { field_path: path.to_string(), api_version: None }
}

fn env_value(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value), value_from: None }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource { field_ref: Some(field(path)), ..EnvVarSource::default() }),
    }
}

fn mount(name: impl Into<String>, path: impl Into<String>) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn http_probe(path: &str, admin_port: u16, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(admin_port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Environment of the sidecar container for its allocator (mimalloc): arenas committed on
/// demand instead of eagerly. Measured with `make bench-sidecar`: peak RSS under load 33 MB
/// with eager commit, 24 MB without, throughput unchanged. The image sets the same (Dockerfile).
pub const ALLOCATOR_ENV: [(&str, &str); 1] = [("MIMALLOC_ARENA_EAGER_COMMIT", "0")];

/// Shutdown delay, in seconds, of a sidecar injected as a regular container
/// (`CUSTOS_SHUTDOWN_DELAY`). It gets SIGTERM together with the app while the cluster still
/// routes new connections to the pod for a few seconds (until the endpoints are updated
/// everywhere), so it keeps serving, unready, this long before it stops accepting. A native
/// sidecar is stopped after the app and gets none. `--shutdown-delay` among the extra
/// arguments overrides it (a flag beats its environment variable), which is why it is not in
/// [`MANAGED_ENV`]. See [`shutdown_delay_seconds`] for pods with a short grace period.
pub const SHUTDOWN_DELAY_SECONDS: i64 = 5;

/// The shutdown delay for a pod whose `terminationGracePeriodSeconds` is `grace` (the
/// Kubernetes default, 30, when unset): [`SHUTDOWN_DELAY_SECONDS`], but at most a quarter of
/// the grace period, so that the drain and the flush of audit events that follow it still fit
/// before the kubelet kills the sidecar. 0: none.
pub fn shutdown_delay_seconds(grace: Option<i64>) -> i64 {
    (grace.unwrap_or(30) / 4).clamp(0, SHUTDOWN_DELAY_SECONDS)
}

/// How long the sidecar flushes its audit events after the drain (its shipper's time-out).
const EVENT_FLUSH_SECONDS: i64 = 5;

/// The sidecar's own drain time-out when nothing constrains it (`--drain-timeout`'s default).
const DRAIN_SECONDS: i64 = 20;

/// The drain time-out (`CUSTOS_DRAIN_TIMEOUT`) for a pod whose `terminationGracePeriodSeconds`
/// is `grace` (30 when unset) and whose shutdown delay is `delay`: what the grace period leaves
/// after the delay, the event flush and a second of margin, between 1 s and the sidecar's
/// default 20 s, so that the kubelet does not kill the sidecar mid-drain and lose the events
/// of the requests still in flight. `--drain-timeout` among the extra arguments overrides it.
pub fn drain_timeout_seconds(grace: Option<i64>, delay: i64) -> i64 {
    grace.unwrap_or(30).saturating_sub(delay).saturating_sub(EVENT_FLUSH_SECONDS + 1).clamp(1, DRAIN_SECONDS)
}

/// The `custos sidecar` settings the injection sets, as environment variables. The flag of
/// the same name (`CUSTOS_HASH_KEY_FILE`: `--hash-key-file`) would override one, so extra
/// arguments may not name them ([`is_managed_flag`]).
pub const MANAGED_ENV: [&str; 13] = [
    "CUSTOS_CONFIG",
    "CUSTOS_POD_LABELS_FILE",
    "CUSTOS_POD_NAME",
    "CUSTOS_NAMESPACE",
    "CUSTOS_LISTEN",
    "CUSTOS_ADMIN",
    "CUSTOS_SPOOL_DIR",
    "CUSTOS_JWKS_DIR",
    "CUSTOS_UPSTREAM",
    "CUSTOS_COLLECTOR",
    "CUSTOS_COLLECTOR_TOKEN_FILE",
    "CUSTOS_HASH_KEY_FILE",
    "CUSTOS_PROXY_THREADS",
];

/// Whether the `custos sidecar` flag `name` (e.g. `--config`) sets one of [`MANAGED_ENV`].
pub fn is_managed_flag(name: &str) -> bool {
    let Some(flag) = name.strip_prefix("--") else { return false };
    MANAGED_ENV.iter().any(|env| {
        let setting = &env["CUSTOS_".len()..];
        setting.len() == flag.len()
            && setting
                .bytes()
                .zip(flag.bytes())
                .all(|(e, f)| if e == b'_' { f == b'-' } else { e.to_ascii_lowercase() == f })
    })
}

/// The sidecar container.
pub(super) fn container(plan: &SidecarPlan<'_>, settings: &InjectSettings) -> Container {
    let mut env = vec![
        env_value("CUSTOS_CONFIG", format!("{CONFIG_DIR}/{CONFIG_KEY}")),
        env_value("CUSTOS_POD_LABELS_FILE", format!("{POD_INFO_DIR}/{LABELS_FILE}")),
        env_field("CUSTOS_POD_NAME", "metadata.name"),
        env_field("CUSTOS_NAMESPACE", "metadata.namespace"),
        env_value("CUSTOS_LISTEN", format!("0.0.0.0:{}", plan.proxy_port)),
        env_value("CUSTOS_ADMIN", format!("0.0.0.0:{}", settings.admin_port)),
        env_value("CUSTOS_SPOOL_DIR", SPOOL_DIR.to_string()),
        env_value("CUSTOS_JWKS_DIR", JWKS_DIR.to_string()),
        env_value("CUSTOS_PROXY_THREADS", settings.proxy_threads.to_string()),
    ];
    env.extend(ALLOCATOR_ENV.iter().map(|(name, value)| env_value(name, (*value).to_string())));
    if let Some(port) = plan.upstream_port {
        env.push(env_value("CUSTOS_UPSTREAM", format!("127.0.0.1:{port}")));
    }
    if let Some(url) = &settings.collector_url {
        env.push(env_value("CUSTOS_COLLECTOR", url.clone()));
    }
    if settings.collector_token_secret.is_some() {
        env.push(env_value(
            "CUSTOS_COLLECTOR_TOKEN_FILE",
            format!("{COLLECTOR_TOKEN_DIR}/{COLLECTOR_TOKEN_KEY}"),
        ));
    }
    if settings.hash_key_secret.is_some() {
        env.push(env_value("CUSTOS_HASH_KEY_FILE", format!("{HASH_KEY_DIR}/{HASH_KEY_KEY}")));
    }
    let delay = if settings.native_sidecar { 0 } else { shutdown_delay_seconds(plan.grace_period_seconds) };
    if delay > 0 {
        env.push(env_value("CUSTOS_SHUTDOWN_DELAY", format!("{delay}s")));
    }
    let drain = drain_timeout_seconds(plan.grace_period_seconds, delay);
    env.push(env_value("CUSTOS_DRAIN_TIMEOUT", format!("{drain}s")));

    let mut mounts = vec![
        mount(CONFIG_VOLUME, CONFIG_DIR),
        mount(POD_INFO_VOLUME, POD_INFO_DIR),
        VolumeMount { read_only: Some(false), ..mount(SPOOL_VOLUME, SPOOL_DIR) },
    ];
    for (index, secret) in plan.jwks_secrets.iter().enumerate() {
        mounts.push(mount(jwks_volume(index), format!("{JWKS_DIR}/{secret}")));
    }
    if settings.collector_token_secret.is_some() {
        mounts.push(mount(COLLECTOR_TOKEN_VOLUME, COLLECTOR_TOKEN_DIR));
    }
    if settings.hash_key_secret.is_some() {
        mounts.push(mount(HASH_KEY_VOLUME, HASH_KEY_DIR));
    }

    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    };
    let mut args = vec!["sidecar".to_string()];
    args.extend(settings.extra_args.iter().cloned());
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![port(PROXY_PORT_NAME, plan.proxy_port), port(ADMIN_PORT_NAME, settings.admin_port)]),
        readiness_probe: Some(http_probe("/ready", settings.admin_port, 5)),
        liveness_probe: Some(http_probe("/healthz", settings.admin_port, 10)),
        resources: Some(settings.resources.clone()),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(settings.run_as_user),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        restart_policy: settings.native_sidecar.then(|| "Always".to_string()),
        ..Container::default()
    }
}
