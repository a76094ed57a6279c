//! Names shared by the operator, the webhooks, the chart and the sidecar: object names, label
//! and annotation keys, the field manager.

pub use custos_policy::netpol::{MANAGED_BY, MANAGED_BY_LABEL, POLICY_LABEL, network_policy_name};

/// Name of the ConfigMap holding a namespace's compiled sidecar config.
pub const CONFIG_MAP_NAME: &str = "custos-config";
/// Key of the compiled config (JSON) inside [`CONFIG_MAP_NAME`].
pub const CONFIG_KEY: &str = "config.json";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "custos";
/// Finalizer the operator puts on DataAccessPolicies so that deleting one recompiles its
/// namespace before it disappears.
pub const FINALIZER: &str = "custos.dev/cleanup";
/// Pod annotation: `"false"` opts a pod out of injection.
pub const INJECT_ANNOTATION: &str = "custos.dev/inject";
/// Namespace label: `enabled` injects the sidecar into every pod of the namespace (unless the
/// pod opts out), `disabled` into none.
pub const NAMESPACE_INJECTION_LABEL: &str = "custos.dev/injection";
/// Pod annotation the injector sets, naming the policies that selected the pod.
pub const INJECTED_ANNOTATION: &str = "custos.dev/injected";
/// Pod label the injector sets, with the value [`SIDECAR_LABEL_VALUE`], on every pod it gives
/// the sidecar: what a PodMonitor (the chart's) selects the sidecars to scrape by.
pub const SIDECAR_LABEL: &str = "custos.dev/sidecar";
/// Value of [`SIDECAR_LABEL`].
pub const SIDECAR_LABEL_VALUE: &str = "injected";
/// Name of the injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "custos-sidecar";
/// Default port of the sidecar's admin server (/healthz, /ready, /metrics); the operator's
/// `--sidecar-admin-port` chooses another. Next to the default proxy port 15080 and outside
/// the ports Istio's and Linkerd's proxies take in the same pod (Istio's Envoy serves its
/// Prometheus telemetry on 15090, where this port was until 2026-12-06).
pub const DEFAULT_SIDECAR_ADMIN_PORT: u16 = 15081;
/// Reporting controller name of the Events the operator records.
pub const REPORTING_CONTROLLER: &str = "custos-operator";
/// Name of the Lease the operator replicas elect a leader on.
pub const LEASE_NAME: &str = "custos-operator";
