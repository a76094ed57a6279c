//! Sidecar injection: a Pod being created, the namespace it is created in and the
//! DataAccessPolicies of that namespace → the Pod with the Custos sidecar added, or the reason
//! it is left alone.
//!
//! # When a pod gets the sidecar
//!
//! In this order:
//!
//! 1. A pod that already has a `custos-sidecar` container is [`SkipReason::AlreadyInjected`]:
//!    injecting is idempotent (re-admission of an injected pod changes nothing).
//! 2. The pod annotation `custos.dev/inject: "false"` opts the pod out; the namespace label
//!    `custos.dev/injection=disabled` opts every pod of the namespace out (e.g. the operator's
//!    own namespace).
//! 3. The pod is *selected* by every policy of its namespace whose mode is not `Disabled`,
//!    that is not being deleted, and whose `spec.workload.selector` (matchLabels and
//!    matchExpressions) matches the pod's labels. A pod no policy selects is injected only when
//!    its namespace carries the label `custos.dev/injection=enabled`; otherwise it is
//!    [`SkipReason::NotSelected`].
//! 4. Pods the sidecar cannot serve are skipped with the reason: host network (the sidecar's
//!    ports would be the node's), Windows pods, policies that disagree on the ports, a port or
//!    volume name of ours the pod already uses, a container named `custos-sidecar` that is
//!    not the sidecar.
//! 5. A skipped pod that a policy in `Enforce` mode selects is refused instead
//!    ([`Refusal::Unprotected`]): it would hold the policy's data with nothing enforcing it. A
//!    pod whose containers mount one of the sidecar's volumes is refused
//!    ([`Refusal::SidecarVolumeMounted`]).
//!
//! Once the pod runs, [`check_update`] keeps its sidecar as injected: no image swap, no
//! debug container in its volumes or its process namespace (see `inject/update.rs`).
//!
//! # Namespace-label injection without a selecting policy
//!
//! The sidecar is injected with no policy to enforce: it forwards every request to the app
//! unchecked (but audited) and picks up a policy from the namespace's hot-reloaded
//! `custos-config` ConfigMap as soon as one selects the pod. Since no policy names the app's
//! port, the sidecar is told it explicitly (`CUSTOS_UPSTREAM=127.0.0.1:<port>`): the first
//! TCP `containerPort` the app containers declare, in order. A pod that declares no port is skipped
//! ([`SkipReason::NoAppPort`]): the sidecar would have nothing to forward to. The
//! `custos.dev/injected` annotation is then present with an empty value. The ConfigMap volume
//! is not optional: the kubelet holds the pod in `ContainerCreating` until the namespace's
//! `custos-config` exists, rather than start a sidecar without its config.
//!
//! # The sidecar
//!
//! See [`InjectSettings`] for what is configurable. The injected container:
//!
//! - runs `<image> sidecar <extra args>` (the image's entrypoint is the `custos` binary);
//! - reads its config from the `custos-config` ConfigMap mounted read-only at
//!   [`CONFIG_DIR`] (a directory mount, so ConfigMap updates reach it), its pod labels from a
//!   downward API file, its pod name and namespace from `fieldRef` environment variables;
//! - spools audit events on an `emptyDir` at [`SPOOL_DIR`];
//! - runs [`InjectSettings::proxy_threads`] proxy threads (`CUSTOS_PROXY_THREADS`);
//! - finds the JWKS Secret of each selecting policy mounted read-only at
//!   `/etc/custos/jwks/<secret>`; the collector token and the hash key at fixed paths when
//!   their Secrets are configured;
//! - listens on the selecting policies' `proxyPort` (port `custos-proxy`, default 15080) and
//!   on [`InjectSettings::admin_port`] (`custos-admin`, default 15081): readiness `GET /ready`,
//!   liveness `GET /healthz`;
//! - runs as a non-root user with a read-only root filesystem, no privilege escalation, all
//!   capabilities dropped and the runtime's default seccomp profile.
//!
//! The app containers and their ports are not touched. The pod is annotated
//! `custos.dev/injected=<selecting policies, comma-separated>` and labelled
//! `custos.dev/sidecar=injected`, which the chart's PodMonitor selects the sidecars by.

mod selection;
mod sidecar;
mod update;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use custos_api::DataAccessPolicy;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::names::{
    DEFAULT_SIDECAR_ADMIN_PORT, INJECT_ANNOTATION, INJECTED_ANNOTATION, NAMESPACE_INJECTION_LABEL,
    SIDECAR_CONTAINER, SIDECAR_LABEL, SIDECAR_LABEL_VALUE,
};

pub use crate::selector::selector_matches;
pub use sidecar::{
    ADMIN_PORT_NAME, COLLECTOR_TOKEN_DIR, COLLECTOR_TOKEN_KEY, CONFIG_DIR, HASH_KEY_DIR, HASH_KEY_KEY,
    JWKS_DIR, MANAGED_ENV, POD_INFO_DIR, PROXY_PORT_NAME, SHUTDOWN_DELAY_SECONDS, SPOOL_DIR,
    drain_timeout_seconds, is_managed_flag, shutdown_delay_seconds,
};
pub use update::{UpdateRefusal, check_update};

/// Value of the namespace label [`NAMESPACE_INJECTION_LABEL`] that turns injection on for
/// every pod of the namespace.
pub const NAMESPACE_INJECTION_ENABLED: &str = "enabled";
/// Value of the namespace label [`NAMESPACE_INJECTION_LABEL`] that turns injection off for
/// every pod of the namespace, even the ones a policy selects.
pub const NAMESPACE_INJECTION_DISABLED: &str = "disabled";

/// Proxy threads of an injected sidecar without a CPU limit: two, as Istio gave its Envoy
/// sidecars before it took their number from the CPU limit (as [`proxy_threads_for_cpu_limit`]
/// does when there is one), so that one busy connection does not hold up the others.
pub const DEFAULT_PROXY_THREADS: u16 = 2;

/// Most proxy threads the injection gives a sidecar, whatever its CPU limit.
pub const MAX_PROXY_THREADS: u16 = 64;

/// Proxy threads for a sidecar whose CPU limit is `limit` (a Kubernetes quantity such as
/// `500m`, `1`, `1.5`): the CPUs it may use, rounded up, from 1 to [`MAX_PROXY_THREADS`], so
/// that its threads cannot together run past the limit and be throttled. Without a limit,
/// [`DEFAULT_PROXY_THREADS`]. `None` when `limit` is not a CPU quantity.
pub fn proxy_threads_for_cpu_limit(limit: Option<&str>) -> Option<u16> {
    let Some(limit) = limit else { return Some(DEFAULT_PROXY_THREADS) };
    let millicores = cpu_millicores(limit)?;
    let threads = millicores.div_ceil(1000).clamp(1, u64::from(MAX_PROXY_THREADS));
    u16::try_from(threads).ok()
}

/// A CPU quantity in millicores, rounded up: `250m` → 250, `1.5` → 1500, `2` → 2000,
/// `0.0001` → 1; decimal suffixes (`k`, `M`, `G`, `T`) multiply. `None` for anything else
/// (binary suffixes, exponents, signs, empty parts).
fn cpu_millicores(quantity: &str) -> Option<u64> {
    let digits_end = quantity.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(digits_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // the number in thousandths, rounded up
    let parse = |s: &str| if s.is_empty() { Some(0) } else { s.parse::<u64>().ok() };
    let whole = parse(whole)?;
    let (kept, rest) = fraction.split_at(fraction.len().min(3));
    let thousandths = parse(&format!("{kept:0<3}"))? + u64::from(rest.bytes().any(|b| b != b'0'));
    let scaled = whole.checked_mul(1000)?.checked_add(thousandths)?;
    let millicores = match suffix {
        "m" => scaled.div_ceil(1000),
        "" => scaled,
        "k" => scaled.checked_mul(1_000)?,
        "M" => scaled.checked_mul(1_000_000)?,
        "G" => scaled.checked_mul(1_000_000_000)?,
        "T" => scaled.checked_mul(1_000_000_000_000)?,
        _ => return None,
    };
    Some(millicores)
}

/// How the sidecar is built. Every field is public; [`Default`] gives the values documented
/// on each field.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectSettings {
    /// The Custos image (its entrypoint is the `custos` binary). Default
    /// `ghcr.io/custos-dev/custos:<this crate's version>`.
    pub image: String,
    /// `imagePullPolicy` of the sidecar. Default `IfNotPresent`.
    pub image_pull_policy: String,
    /// CPU and memory of the sidecar. Default: requests 50m CPU and 64Mi memory, limit 256Mi
    /// memory (no CPU limit: throttling the proxy slows every request).
    pub resources: ResourceRequirements,
    /// Collector base URL (`CUSTOS_COLLECTOR`). Default none: the sidecar counts and discards
    /// audit events.
    pub collector_url: Option<String>,
    /// Secret, in the pod's namespace, holding the collector's bearer token under the key
    /// [`COLLECTOR_TOKEN_KEY`]; mounted read-only at [`COLLECTOR_TOKEN_DIR`]
    /// (`CUSTOS_COLLECTOR_TOKEN_FILE`). Default none.
    pub collector_token_secret: Option<String>,
    /// Secret, in the pod's namespace, holding the key of `Hash` masks and record-id hashes
    /// under the key [`HASH_KEY_KEY`]; mounted read-only at [`HASH_KEY_DIR`]
    /// (`CUSTOS_HASH_KEY_FILE`). Default none: a random key per sidecar process.
    pub hash_key_secret: Option<String>,
    /// UID the sidecar runs as (`runAsUser`, with `runAsNonRoot`). Default 65532.
    pub run_as_user: i64,
    /// Proxy threads of the sidecar (`CUSTOS_PROXY_THREADS`; 0 serves on one shared runtime).
    /// Default 2, or [`proxy_threads_for_cpu_limit`] of the operator's CPU limit when it sets
    /// one. Left to itself, the sidecar would start one thread per CPU of the node, however
    /// little CPU the container requests (64 on a 64-CPU node, each with its own share of the
    /// connections to the app).
    pub proxy_threads: u16,
    /// Port of the sidecar's admin server (`/healthz`, `/ready`, `/metrics`; container port
    /// `custos-admin`). Default [`DEFAULT_SIDECAR_ADMIN_PORT`] (15081), clear of the ports
    /// Istio's and Linkerd's proxies take in the same pod. A policy whose `proxyPort` is this
    /// port cannot be served ([`SkipReason::ProxyPortIsAdminPort`]).
    pub admin_port: u16,
    /// Extra arguments after `sidecar` (e.g. `--max-connections=2000`). Default none.
    pub extra_args: Vec<String>,
    /// Inject as a native sidecar (an init container with `restartPolicy: Always`, Kubernetes
    /// 1.29+): the sidecar starts before and stops after the app containers, and Jobs still
    /// complete. Default false: a regular container appended to `spec.containers`, which works
    /// on every Kubernetes version.
    pub native_sidecar: bool,
}

impl Default for InjectSettings {
    fn default() -> Self {
        let quantity = |s: &str| Quantity(s.to_string());
        InjectSettings {
            image: format!("ghcr.io/custos-dev/custos:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".to_string(),
            resources: ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), quantity("50m")),
                    ("memory".to_string(), quantity("64Mi")),
                ])),
                limits: Some(BTreeMap::from([("memory".to_string(), quantity("256Mi"))])),
                ..ResourceRequirements::default()
            },
            collector_url: None,
            collector_token_secret: None,
            hash_key_secret: None,
            run_as_user: 65532,
            proxy_threads: DEFAULT_PROXY_THREADS,
            admin_port: DEFAULT_SIDECAR_ADMIN_PORT,
            extra_args: Vec::new(),
            native_sidecar: false,
        }
    }
}

/// The outcome of [`inject`].
#[derive(Clone, Debug, PartialEq)]
pub enum Injection {
    /// The pod with the sidecar added.
    Inject {
        /// The mutated pod.
        pod: Box<Pod>,
        /// Names of the policies that select the pod, sorted (empty when the namespace label
        /// alone asked for injection).
        policies: Vec<String>,
    },
    /// The pod is left unchanged.
    Skip(SkipReason),
    /// The pod must not be admitted (see [`Refusal`]).
    Refuse(Refusal),
}

/// Why a pod is refused admission (fail closed, as Custos is in Enforce).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A policy in `Enforce` mode selects the pod, but it would run without a working
    /// sidecar: opted out, a foreign `custos-sidecar` container, host network, Windows,
    /// conflicting policies, a port or volume name of ours in use. Admitting it would leave
    /// its data unprotected (a process of the app's own could listen on the proxy port that
    /// the policy's NetworkPolicy opens).
    Unprotected {
        /// Why the sidecar cannot be injected.
        reason: SkipReason,
        /// The enforced policies selecting the pod.
        enforced_by: Vec<String>,
    },
    /// A container other than the sidecar mounts one of the sidecar's volumes (the audit
    /// spool, the collector token, the hash key, the config): it could erase audit events
    /// before they are shipped or act with the sidecar's credentials.
    SidecarVolumeMounted {
        /// The container.
        container: String,
        /// The volume.
        volume: String,
    },
}

impl Refusal {
    /// Short, stable name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unprotected { reason, .. } => reason.label(),
            Refusal::SidecarVolumeMounted { .. } => "sidecar-volume-mounted",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unprotected { reason, enforced_by } => write!(
                f,
                "DataAccessPolicy {} (mode Enforce) selects the pod, but the sidecar cannot be injected: {reason}",
                enforced_by.join(", ")
            ),
            Refusal::SidecarVolumeMounted { container, volume } => write!(
                f,
                "container {container} mounts {volume}, a volume only the {SIDECAR_CONTAINER} container may mount"
            ),
        }
    }
}

/// Why a pod is not injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The pod already has the `custos-sidecar` container (the configured image running
    /// `sidecar`): it was injected before.
    AlreadyInjected,
    /// The pod has a container named `custos-sidecar` that is not the Custos sidecar (another
    /// image, or not running `sidecar`).
    ForeignSidecar {
        /// Its image.
        image: String,
    },
    /// The pod is annotated `custos.dev/inject: "false"`.
    OptedOut {
        /// Policies that select the pod nevertheless (their NetworkPolicies still apply).
        selected_by: Vec<String>,
    },
    /// The namespace is labelled `custos.dev/injection=disabled`.
    NamespaceDisabled {
        /// Policies that select the pod nevertheless (their NetworkPolicies still apply).
        selected_by: Vec<String>,
    },
    /// No policy selects the pod and its namespace is not labelled
    /// `custos.dev/injection=enabled`.
    NotSelected,
    /// The pod uses the host's network namespace: the sidecar's ports would be the node's.
    HostNetwork {
        /// Policies that select the pod.
        selected_by: Vec<String>,
    },
    /// The pod runs Windows; the sidecar image is Linux-only.
    WindowsPod {
        /// Policies that select the pod.
        selected_by: Vec<String>,
    },
    /// The selecting policies disagree on a port: one sidecar cannot serve them all.
    ConflictingPolicies {
        /// The selecting policies.
        policies: Vec<String>,
        /// The field they disagree on (`proxyPort` or `appPort`).
        field: &'static str,
        /// The distinct values.
        ports: Vec<u16>,
    },
    /// The selecting policies' `spec.workload.proxyPort` is the sidecar's admin port
    /// ([`InjectSettings::admin_port`]): the sidecar could not listen on both.
    ProxyPortIsAdminPort {
        /// The port.
        port: u16,
        /// The selecting policies.
        policies: Vec<String>,
    },
    /// A container of the pod already declares a port the sidecar needs.
    PortInUse {
        /// The port.
        port: u16,
        /// The container declaring it.
        container: String,
    },
    /// A container of the pod already names a port as the sidecar names its own
    /// (`custos-proxy`, `custos-admin`); the NetworkPolicies refer to them by name.
    PortNameInUse {
        /// The port name.
        name: String,
        /// The container declaring it.
        container: String,
    },
    /// The pod already has a volume with a name the sidecar needs.
    VolumeNameInUse {
        /// The volume name.
        name: String,
    },
    /// Namespace-label injection without a selecting policy, and the pod declares no TCP
    /// port to forward to.
    NoAppPort,
    /// Namespace-label injection, but the namespace has no DataAccessPolicy yet, so no
    /// `custos-config` ConfigMap exists for the sidecar to mount: the pod would wait in
    /// `ContainerCreating`. Pods created after the first policy are injected.
    NoConfigInNamespace,
}

impl SkipReason {
    /// Short, stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::AlreadyInjected => "already-injected",
            SkipReason::ForeignSidecar { .. } => "foreign-sidecar",
            SkipReason::OptedOut { .. } => "opted-out",
            SkipReason::NamespaceDisabled { .. } => "namespace-disabled",
            SkipReason::NotSelected => "not-selected",
            SkipReason::HostNetwork { .. } => "host-network",
            SkipReason::WindowsPod { .. } => "windows",
            SkipReason::ConflictingPolicies { .. } => "conflicting-policies",
            SkipReason::ProxyPortIsAdminPort { .. } => "proxy-port-is-admin-port",
            SkipReason::PortInUse { .. } => "port-in-use",
            SkipReason::PortNameInUse { .. } => "port-name-in-use",
            SkipReason::VolumeNameInUse { .. } => "volume-name-in-use",
            SkipReason::NoAppPort => "no-app-port",
            SkipReason::NoConfigInNamespace => "no-config-in-namespace",
        }
    }

    /// Whether a pod skipped for this reason would run without a working sidecar although a
    /// policy selects it (refused when one of them is enforced).
    pub fn unprotects(&self) -> bool {
        !matches!(
            self,
            SkipReason::AlreadyInjected
                | SkipReason::NotSelected
                | SkipReason::NoAppPort
                | SkipReason::NoConfigInNamespace
        )
    }

    /// A warning for whoever creates the pod, when skipping leaves a pod that should be
    /// protected without its sidecar (or an injection request unanswered); `None` for the
    /// ordinary cases (already injected, not selected, opted out with no selecting policy).
    pub fn warning(&self) -> Option<String> {
        match self {
            SkipReason::AlreadyInjected | SkipReason::NotSelected => None,
            SkipReason::OptedOut { selected_by } | SkipReason::NamespaceDisabled { selected_by }
                if selected_by.is_empty() =>
            {
                None
            }
            other => Some(format!("custos: sidecar not injected: {other}")),
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::AlreadyInjected => write!(f, "the pod already has a {SIDECAR_CONTAINER} container"),
            SkipReason::ForeignSidecar { image } => write!(
                f,
                "the pod has a container named {SIDECAR_CONTAINER} (image {image}) that is not the Custos sidecar; \
                 remove it from the pod template, the webhook injects the sidecar"
            ),
            SkipReason::OptedOut { selected_by } if selected_by.is_empty() => {
                write!(f, "the pod opts out with {INJECT_ANNOTATION}=false")
            }
            SkipReason::OptedOut { selected_by } => write!(
                f,
                "the pod opts out with {INJECT_ANNOTATION}=false although DataAccessPolicy {} selects it \
                 (its NetworkPolicy still closes the app port)",
                selected_by.join(", ")
            ),
            SkipReason::NamespaceDisabled { selected_by } => write!(
                f,
                "the namespace is labelled {NAMESPACE_INJECTION_LABEL}={NAMESPACE_INJECTION_DISABLED}{}",
                selected(selected_by)
            ),
            SkipReason::NotSelected => write!(
                f,
                "no DataAccessPolicy selects the pod and the namespace is not labelled \
                 {NAMESPACE_INJECTION_LABEL}={NAMESPACE_INJECTION_ENABLED}"
            ),
            SkipReason::HostNetwork { selected_by } => {
                write!(f, "the pod uses hostNetwork{}", selected(selected_by))
            }
            SkipReason::WindowsPod { selected_by } => {
                write!(f, "the pod runs Windows and the sidecar is Linux-only{}", selected(selected_by))
            }
            SkipReason::ConflictingPolicies { policies, field, ports } => write!(
                f,
                "DataAccessPolicies {} select the pod with different spec.workload.{field} values {ports:?}",
                policies.join(", ")
            ),
            SkipReason::ProxyPortIsAdminPort { port, policies } => write!(
                f,
                "DataAccessPolicy {} sets spec.workload.proxyPort {port}, which is the sidecars' admin port \
                 (operator flag --sidecar-admin-port); choose another proxyPort",
                policies.join(", ")
            ),
            SkipReason::PortInUse { port, container } => {
                write!(f, "container {container} already declares port {port}, which the sidecar needs")
            }
            SkipReason::PortNameInUse { name, container } => {
                write!(
                    f,
                    "container {container} already declares a port named {name}, which the sidecar's port is named"
                )
            }
            SkipReason::VolumeNameInUse { name } => {
                write!(f, "the pod already has a volume named {name}, which the sidecar needs")
            }
            SkipReason::NoAppPort => write!(
                f,
                "the namespace is labelled for injection but no DataAccessPolicy selects the pod and it \
                 declares no TCP containerPort for the sidecar to forward to"
            ),
            SkipReason::NoConfigInNamespace => write!(
                f,
                "the namespace is labelled for injection but has no DataAccessPolicy yet, so there is no \
                 {} ConfigMap for the sidecar; pods created after the first policy get the sidecar",
                crate::names::CONFIG_MAP_NAME
            ),
        }
    }
}

fn selected(policies: &[String]) -> String {
    if policies.is_empty() {
        String::new()
    } else {
        format!(" (selected by DataAccessPolicy {})", policies.join(", "))
    }
}

/// Decides whether `pod`, being created in `namespace` (labelled `namespace_labels`), gets the
/// sidecar, given the DataAccessPolicies of the namespace, and builds the injected pod. Pure;
/// see the [module documentation](self) for the rules. `policies` may be owned policies or
/// shared ones (`Arc<DataAccessPolicy>`, as a reflector store holds them).
pub fn inject<P: Borrow<DataAccessPolicy>>(
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[P],
    settings: &InjectSettings,
) -> Injection {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let selecting = selection::selecting_policies(policies, namespace, labels);
    match decide(pod, namespace_labels, policies, &selecting, settings) {
        Injection::Skip(reason) if reason.unprotects() => {
            let enforced_by: Vec<String> = selecting
                .iter()
                .filter(|p| p.spec.mode == custos_api::policy::Mode::Enforce)
                .map(|p| p.metadata.name.clone().unwrap_or_default())
                .collect();
            if enforced_by.is_empty() {
                Injection::Skip(reason)
            } else {
                Injection::Refuse(Refusal::Unprotected { reason, enforced_by })
            }
        }
        other => other,
    }
}

/// [`inject`] without the refusal of unprotected pods an enforced policy selects.
fn decide<P: Borrow<DataAccessPolicy>>(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[P],
    selecting: &[&DataAccessPolicy],
    settings: &InjectSettings,
) -> Injection {
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init_containers = spec.and_then(|s| s.init_containers.as_deref()).unwrap_or_default();
    if let Some(c) = containers.iter().chain(init_containers).find(|c| c.name == SIDECAR_CONTAINER) {
        let genuine = c.image.as_deref() == Some(settings.image.as_str())
            && c.command.is_none()
            && c.args.as_ref().and_then(|a| a.first()).is_some_and(|a| a == "sidecar");
        // A pod that arrives with the sidecar (re-submitted, or written so) is left as it is,
        // but no other container of it may mount the sidecar's volumes (the audit spool, the
        // collector token, the hash key), as for a pod this webhook injects.
        if genuine && let Some(refusal) = mounts_of_sidecar_volumes(spec, c) {
            return Injection::Refuse(refusal);
        }
        return Injection::Skip(if genuine {
            SkipReason::AlreadyInjected
        } else {
            SkipReason::ForeignSidecar { image: c.image.clone().unwrap_or_default() }
        });
    }

    let names: Vec<String> = selecting.iter().map(|p| p.metadata.name.clone().unwrap_or_default()).collect();

    let annotation = pod.metadata.annotations.as_ref().and_then(|a| a.get(INJECT_ANNOTATION));
    if annotation.is_some_and(|v| v.trim().eq_ignore_ascii_case("false")) {
        return Injection::Skip(SkipReason::OptedOut { selected_by: names });
    }
    let namespace_label = namespace_labels.get(NAMESPACE_INJECTION_LABEL).map(String::as_str);
    if namespace_label == Some(NAMESPACE_INJECTION_DISABLED) {
        return Injection::Skip(SkipReason::NamespaceDisabled { selected_by: names });
    }
    let namespace_enabled = namespace_label == Some(NAMESPACE_INJECTION_ENABLED);
    if selecting.is_empty() && !namespace_enabled {
        return Injection::Skip(SkipReason::NotSelected);
    }
    // The operator writes `custos-config` while the namespace holds a policy not being deleted.
    if selecting.is_empty() && !policies.iter().any(|p| p.borrow().metadata.deletion_timestamp.is_none()) {
        return Injection::Skip(SkipReason::NoConfigInNamespace);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Injection::Skip(SkipReason::HostNetwork { selected_by: names });
    }
    if spec.and_then(|s| s.os.as_ref()).is_some_and(|os| os.name.eq_ignore_ascii_case("windows")) {
        return Injection::Skip(SkipReason::WindowsPod { selected_by: names });
    }

    let proxy_port = match single_port(selecting, |p| p.spec.workload.proxy_port()) {
        Ok(port) => port.unwrap_or(custos_api::policy::DEFAULT_PROXY_PORT),
        Err(ports) => return conflict(names, "proxyPort", ports),
    };
    let upstream_port = match single_port(selecting, |p| p.spec.workload.app_port) {
        Ok(Some(_)) => None,
        Ok(None) => match selection::first_app_port(containers) {
            Some(port) => Some(port),
            None => return Injection::Skip(SkipReason::NoAppPort),
        },
        Err(ports) => return conflict(names, "appPort", ports),
    };

    if proxy_port == settings.admin_port {
        return Injection::Skip(SkipReason::ProxyPortIsAdminPort { port: proxy_port, policies: names });
    }
    for port in [proxy_port, settings.admin_port] {
        if let Some(c) = containers
            .iter()
            .chain(init_containers)
            .find(|c| c.ports.iter().flatten().any(|p| p.container_port == i32::from(port)))
        {
            return Injection::Skip(SkipReason::PortInUse { port, container: c.name.clone() });
        }
    }
    // The NetworkPolicies open the admin port to the metrics sources by its name: an app port
    // of that name would be opened with it.
    let sidecar_port_names = [PROXY_PORT_NAME, ADMIN_PORT_NAME];
    for c in containers.iter().chain(init_containers) {
        if let Some(p) = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().is_some_and(|n| sidecar_port_names.contains(&n)))
        {
            let name = p.name.clone().unwrap_or_default();
            return Injection::Skip(SkipReason::PortNameInUse { name, container: c.name.clone() });
        }
    }
    let jwks_secrets = selection::jwks_secrets(selecting);
    let wanted = sidecar::volumes(&jwks_secrets, settings);
    if let Some(v) = spec
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find(|v| wanted.iter().any(|w| w.name == v.name))
    {
        return Injection::Skip(SkipReason::VolumeNameInUse { name: v.name.clone() });
    }
    // Admission validates volume mounts after this webhook has added the volumes: a mount of
    // one of ours by the app would be accepted.
    let ephemeral = spec.and_then(|s| s.ephemeral_containers.as_deref()).unwrap_or_default();
    let mounts = containers
        .iter()
        .chain(init_containers)
        .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, &m.name)))
        .chain(
            ephemeral.iter().flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, &m.name))),
        );
    for (container, volume) in mounts {
        if wanted.iter().any(|w| w.name == *volume) {
            return Injection::Refuse(Refusal::SidecarVolumeMounted {
                container: container.clone(),
                volume: volume.clone(),
            });
        }
    }

    let container = sidecar::container(
        &sidecar::SidecarPlan {
            proxy_port,
            upstream_port,
            jwks_secrets: &jwks_secrets,
            grace_period_seconds: pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds),
        },
        settings,
    );
    let mut injected = pod.clone();
    injected
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.to_string(), names.join(","));
    injected
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(SIDECAR_LABEL.to_string(), SIDECAR_LABEL_VALUE.to_string());
    let pod_spec = injected.spec.get_or_insert_with(Default::default);
    if settings.native_sidecar {
        pod_spec.init_containers.get_or_insert_with(Vec::new).push(container);
    } else {
        pod_spec.containers.push(container);
    }
    pod_spec.volumes.get_or_insert_with(Vec::new).extend(wanted);
    Injection::Inject { pod: Box::new(injected), policies: names }
}

fn conflict(policies: Vec<String>, field: &'static str, ports: Vec<u16>) -> Injection {
    Injection::Skip(SkipReason::ConflictingPolicies { policies, field, ports })
}

/// A container of `spec` other than `sidecar` that mounts a volume `sidecar` mounts.
fn mounts_of_sidecar_volumes(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
    sidecar: &k8s_openapi::api::core::v1::Container,
) -> Option<Refusal> {
    let spec = spec?;
    let theirs: Vec<&str> = sidecar.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    let regular = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| !std::ptr::eq(*c, sidecar))
        .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, &m.name)));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, &m.name)));
    regular.chain(ephemeral).find(|(_, volume)| theirs.contains(&volume.as_str())).map(
        |(container, volume)| Refusal::SidecarVolumeMounted {
            container: container.clone(),
            volume: volume.clone(),
        },
    )
}

/// The one value of `port` over `policies`: `Ok(None)` for no policy, `Err(distinct values)`
/// when they disagree.
fn single_port(
    policies: &[&DataAccessPolicy],
    port: impl Fn(&DataAccessPolicy) -> u16,
) -> Result<Option<u16>, Vec<u16>> {
    let mut ports: Vec<u16> = policies.iter().map(|p| port(p)).collect();
    ports.sort_unstable();
    ports.dedup();
    match ports.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(ports),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
