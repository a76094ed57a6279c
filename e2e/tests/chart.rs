//! The Helm chart `charts/custos`, rendered by a real Helm and checked offline (no cluster).
//!
//! Helm is `$HELM`, else `target/tools/helm` as `scripts/install-helm.sh` installs it. For the
//! default values, `ci/production-values.yaml` and a minimal variant:
//!
//! - `helm lint --strict` passes, and values.schema.json refuses misspelt keys, bad enum
//!   values and inconsistent stores;
//! - every rendered document deserialises into its k8s-openapi type with no field that type
//!   does not know (serde_ignored reports them); cert-manager's and the Prometheus Operator's
//!   objects into the part of their schemas the chart uses. A misspelt field in a template
//!   fails here, not in a cluster;
//! - the operator's ClusterRole and Role are `custos_operator::rbac`'s rules; its arguments
//!   parse with `OperatorArgs` and the collector's with `CollectorArgs` into valid configs
//!   that agree with the rendered Services, Secrets, volumes and webhook configurations;
//! - the webhook configurations call the webhook Service on `/mutate-pods` and
//!   `/validate-policies`; the certificate the operator serves is trusted through their
//!   caBundle for the Service's DNS name (Helm-generated), or comes from the cert-manager
//!   Certificate whose CA is injected into them;
//! - the chart's CRD is the repository's `crds/` file, byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use clap::Parser;
use custos_collector::{Auth, CollectorArgs, CollectorConfig};
use custos_operator::args::{OperatorArgs, OperatorConfig, TlsSource};
use custos_operator::rbac::{
    CLUSTER_RULES, NAMESPACE_RULES, SECRET_SYNC_CLUSTER_RULES, SECRET_SYNC_NAMESPACE_RULES, policy_rules,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ServiceReference, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodTemplateSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{Metadata, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "custos";
const NAMESPACE: &str = "custos-system";
const CRD_FILE: &str = "dataaccesspolicies.custos.dev.yaml";
/// The default image: the chart's appVersion, which follows the workspace version.
const IMAGE: &str = concat!("ghcr.io/custos-dev/custos:", env!("CARGO_PKG_VERSION"));

// ---------------------------------------------------------------------------------------------
// Helm

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ has a parent").to_path_buf()
}

fn chart_dir() -> PathBuf {
    workspace().join("charts/custos")
}

/// charts/custos/Chart.yaml.
fn chart_yaml() -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap()
}

/// The Helm binary: `$HELM`, else `target/tools/helm`.
fn helm_binary() -> PathBuf {
    let path = match std::env::var_os("HELM").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => workspace().join("target/tools/helm"),
    };
    assert!(
        path.is_file(),
        "no Helm binary at {}: run `bash scripts/install-helm.sh` (installs target/tools/helm), \
         or set HELM=/path/to/helm",
        path.display()
    );
    path
}

/// Runs helm; its stdout, or its stderr as the error.
fn helm(args: &[&str]) -> Result<String, String> {
    let bin = helm_binary();
    let out = Command::new(&bin)
        .args(args)
        // No kubeconfig, no repositories: `lookup` finds nothing, as in `helm template`.
        .env("KUBECONFIG", "/dev/null")
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("custos-chart-test-helm/cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("custos-chart-test-helm/config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("custos-chart-test-helm/data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = String::from_utf8(out.stdout).expect("helm prints UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() { Ok(stdout) } else { Err(format!("{stderr}{stdout}")) }
}

/// A set of values: values files and `--set` overrides.
struct Variant {
    name: &'static str,
    values_files: Vec<PathBuf>,
    set: Vec<&'static str>,
    /// `--api-versions`: what the cluster is taken to serve beyond helm's defaults.
    api_versions: Vec<&'static str>,
}

impl Variant {
    fn defaults() -> Self {
        Variant {
            name: "default values",
            values_files: Vec::new(),
            set: Vec::new(),
            api_versions: Vec::new(),
        }
    }

    fn production() -> Self {
        Variant {
            name: "ci/production-values.yaml",
            values_files: vec![chart_dir().join("ci/production-values.yaml")],
            set: Vec::new(),
            api_versions: Vec::new(),
        }
    }

    /// No collector, one operator replica without leader election, two namespaces, no
    /// NetworkPolicies, webhooks that fail open, an external collector.
    fn minimal() -> Self {
        Variant {
            name: "minimal",
            values_files: Vec::new(),
            set: vec![
                "collector.enabled=false",
                "operator.replicas=1",
                "operator.leaderElection.enabled=false",
                "operator.namespaces={shop,logistics}",
                "operator.webhook.failurePolicy=Ignore",
                "operator.sidecar.collectorUrl=https://audit.example.com",
                "operator.sidecar.collectorTokenSecret=audit-token",
                "networkPolicy.enabled=false",
            ],
            api_versions: Vec::new(),
        }
    }

    fn with(mut self, set: &'static str) -> Self {
        self.set.push(set);
        self
    }

    /// The cluster is taken to serve `api_version` (`group/version/Kind`).
    fn serving(mut self, api_version: &'static str) -> Self {
        self.api_versions.push(api_version);
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for file in &self.values_files {
            args.push("-f".to_string());
            args.push(file.display().to_string());
        }
        for set in &self.set {
            args.push("--set".to_string());
            args.push((*set).to_string());
        }
        for api_version in &self.api_versions {
            args.push("--api-versions".to_string());
            args.push((*api_version).to_string());
        }
        args
    }

    fn lint(&self) -> Result<String, String> {
        let chart = chart_dir().display().to_string();
        let mut args = vec!["lint".to_string(), "--strict".to_string(), chart];
        args.extend(self.args());
        helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `helm template` of the chart (CRDs included) in [`NAMESPACE`].
    fn template(&self, chart: &Path) -> Result<String, String> {
        let chart = chart.display().to_string();
        let mut args: Vec<String> = ["template", RELEASE, &chart, "--namespace", NAMESPACE, "--include-crds"]
            .map(String::from)
            .into();
        args.extend(self.args());
        helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn render(&self) -> Manifests {
        let text = self
            .template(&chart_dir())
            .unwrap_or_else(|e| panic!("{}: helm template failed:\n{e}", self.name));
        Manifests::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

// ---------------------------------------------------------------------------------------------
// Strict deserialisation

/// Deserialises `value` into `T`; any field `T` does not know is an error naming its path.
fn strict<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(value.clone(), |path| unknown.push(field_path(&path)))
        .map_err(|e| e.to_string())?;
    if unknown.is_empty() { Ok(parsed) } else { Err(format!("unknown fields: {}", unknown.join(", "))) }
}

/// `spec.template.spec.containers.0.image`: map keys and sequence indexes (serde_ignored's own
/// display also shows each `Option` level as `?`).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let join = |parent: &Path<'_>, segment: String| match field_path(parent) {
        p if p.is_empty() => segment,
        p => format!("{p}.{segment}"),
    };
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => join(parent, index.to_string()),
        Path::Map { parent, key } => join(parent, key.clone()),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            field_path(parent)
        }
    }
}

/// cert-manager and Prometheus Operator objects: the part of their `v1` schemas the chart uses
/// (field names from their CRDs). Like k8s-openapi's types they skip unknown fields, which
/// [`strict`] then reports.
mod custom {
    // Fields are declared to be recognised (anything else is reported); not all are read.
    #![allow(dead_code)]

    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use serde::Deserialize;

    /// `cert-manager.io/v1` `Issuer`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Issuer {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: IssuerSpec,
    }

    /// The issuer kinds the chart may create.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct IssuerSpec {
        pub self_signed: Option<BTreeMap<String, String>>,
    }

    /// `cert-manager.io/v1` `Certificate`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Certificate {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: CertificateSpec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct CertificateSpec {
        pub secret_name: String,
        pub common_name: Option<String>,
        pub dns_names: Vec<String>,
        pub duration: Option<String>,
        pub renew_before: Option<String>,
        pub private_key: Option<PrivateKey>,
        pub issuer_ref: IssuerRef,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PrivateKey {
        pub algorithm: String,
        pub size: u32,
        pub rotation_policy: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct IssuerRef {
        pub name: String,
        pub kind: String,
        pub group: String,
    }

    /// `monitoring.coreos.com/v1` `ServiceMonitor`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: ServiceMonitorSpec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub namespace_selector: Option<NamespaceSelector>,
        pub selector: LabelSelector,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NamespaceSelector {
        pub match_names: Vec<String>,
    }

    /// `monitoring.coreos.com/v1` `PodMonitor`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: PodMonitorSpec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodMonitorSpec {
        pub namespace_selector: AnyNamespace,
        pub selector: LabelSelector,
        pub pod_metrics_endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    pub struct AnyNamespace {
        pub any: bool,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: String,
        pub path: Option<String>,
        pub interval: Option<String>,
        pub scrape_timeout: Option<String>,
    }
}

/// Every rendered document, typed.
#[derive(Default)]
struct Manifests {
    /// The documents as parsed.
    raw: Vec<Value>,
    crds: Vec<CustomResourceDefinition>,
    deployments: Vec<Deployment>,
    stateful_sets: Vec<StatefulSet>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    secrets: Vec<Secret>,
    config_maps: Vec<ConfigMap>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    mutating: Vec<MutatingWebhookConfiguration>,
    validating: Vec<ValidatingWebhookConfiguration>,
    admission_policies: Vec<ValidatingAdmissionPolicy>,
    admission_policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    network_policies: Vec<NetworkPolicy>,
    pdbs: Vec<PodDisruptionBudget>,
    issuers: Vec<custom::Issuer>,
    certificates: Vec<custom::Certificate>,
    service_monitors: Vec<custom::ServiceMonitor>,
    pod_monitors: Vec<custom::PodMonitor>,
}

/// Pushes `doc` into `m.$field` and returns when its apiVersion and kind are those of `$ty`.
macro_rules! typed {
    ($m:ident, $doc:ident, $api_version:ident, $kind:ident, $( $ty:ty => $field:ident ),+ $(,)?) => {
        $(
            if $api_version == <$ty as Resource>::API_VERSION && $kind == <$ty as Resource>::KIND {
                $m.$field.push(strict::<$ty>($doc)?);
                return Ok(());
            }
        )+
    };
}

impl Manifests {
    fn parse(text: &str) -> Result<Self, String> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| format!("the rendered YAML does not parse: {e}"))?;
        let mut m = Manifests::default();
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            m.add(&api_version, &kind, &doc).map_err(|e| format!("{kind} {name:?} ({api_version}): {e}"))?;
            m.raw.push(doc);
        }
        Ok(m)
    }

    /// Deserialises one document into the type its apiVersion and kind name.
    fn add(&mut self, api_version: &str, kind: &str, doc: &Value) -> Result<(), String> {
        let m = self;
        typed!(m, doc, api_version, kind,
            CustomResourceDefinition => crds,
            Deployment => deployments,
            StatefulSet => stateful_sets,
            Service => services,
            ServiceAccount => service_accounts,
            Secret => secrets,
            ConfigMap => config_maps,
            ClusterRole => cluster_roles,
            ClusterRoleBinding => cluster_role_bindings,
            Role => roles,
            RoleBinding => role_bindings,
            MutatingWebhookConfiguration => mutating,
            ValidatingWebhookConfiguration => validating,
            ValidatingAdmissionPolicy => admission_policies,
            ValidatingAdmissionPolicyBinding => admission_policy_bindings,
            NetworkPolicy => network_policies,
            PodDisruptionBudget => pdbs,
        );
        match (api_version, kind) {
            ("cert-manager.io/v1", "Issuer") => m.issuers.push(strict(doc)?),
            ("cert-manager.io/v1", "Certificate") => m.certificates.push(strict(doc)?),
            ("monitoring.coreos.com/v1", "ServiceMonitor") => m.service_monitors.push(strict(doc)?),
            ("monitoring.coreos.com/v1", "PodMonitor") => m.pod_monitors.push(strict(doc)?),
            _ => return Err("a kind this test does not know: add it to Manifests".to_string()),
        }
        Ok(())
    }

    fn service(&self, name: &str) -> &Service {
        self.services.iter().find(|s| name_of(*s) == name).unwrap_or_else(|| panic!("no Service {name}"))
    }

    fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| name_of(*s) == name)
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| name_of(*d) == name)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    /// Every pod template, with its workload's name.
    fn pod_templates(&self) -> Vec<(String, &PodTemplateSpec)> {
        let deployments =
            self.deployments.iter().map(|d| (name_of(d).to_string(), &d.spec.as_ref().unwrap().template));
        let sets =
            self.stateful_sets.iter().map(|s| (name_of(s).to_string(), &s.spec.as_ref().unwrap().template));
        deployments.chain(sets).collect()
    }
}

fn name_of<K: Metadata<Ty = ObjectMeta>>(object: &K) -> &str {
    object.metadata().name.as_deref().unwrap_or_default()
}

fn labels_of(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn match_labels(selector: &LabelSelector) -> BTreeMap<String, String> {
    assert!(selector.match_expressions.is_none(), "the chart selects with matchLabels only");
    selector.match_labels.clone().unwrap_or_default()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Flags

#[derive(Parser)]
struct OperatorCommand {
    #[command(flatten)]
    args: OperatorArgs,
}

#[derive(Parser)]
struct CollectorCommand {
    #[command(flatten)]
    args: CollectorArgs,
}

fn container<'a>(template: &'a PodTemplateSpec, name: &str) -> &'a Container {
    let spec = template.spec.as_ref().expect("pod spec");
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

/// The container's arguments after the `custos` subcommand.
fn subcommand_args(container: &Container, subcommand: &str) -> Vec<String> {
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some(subcommand), "{}: args {args:?}", container.name);
    let mut argv = vec![format!("custos {subcommand}")];
    argv.extend(args.into_iter().skip(1));
    argv
}

fn operator_config(container: &Container) -> OperatorConfig {
    let argv = subcommand_args(container, "operator");
    let command = OperatorCommand::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("custos operator rejects the chart's flags {argv:?}:\n{e}"));
    command.args.into_config().unwrap_or_else(|e| panic!("custos operator rejects {argv:?}: {e}"))
}

fn collector_config(container: &Container) -> CollectorConfig {
    let argv = subcommand_args(container, "collector");
    let command = CollectorCommand::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("custos collector rejects the chart's flags {argv:?}:\n{e}"));
    command.args.into_config().unwrap_or_else(|e| panic!("custos collector rejects {argv:?}: {e}"))
}

/// The Secret mounted at a directory holding `file`, per the container's mounts.
fn secret_mounted_for(template: &PodTemplateSpec, container: &Container, file: &Path) -> String {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| file.parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("{}: nothing is mounted where {} is", container.name, file.display()));
    let volume = template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let secret = volume.secret.as_ref().unwrap_or_else(|| panic!("volume {} is not a Secret", volume.name));
    let key = file.file_name().unwrap().to_str().unwrap();
    if let Some(items) = &secret.items {
        assert!(items.iter().any(|i| i.path == key), "volume {} does not project {key}", volume.name);
    }
    secret.secret_name.clone().expect("secretName")
}

fn container_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: no port {name}", container.name))
        .container_port
}

fn probe_target(probe: Option<&k8s_openapi::api::core::v1::Probe>) -> (String, IntOrString) {
    let http = probe.and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
    (http.path.clone().unwrap_or_default(), http.port.clone())
}

// ---------------------------------------------------------------------------------------------
// Checks every variant passes

/// Namespaces, labels, and the references between objects.
fn check_objects(m: &Manifests) {
    let cluster_scoped = [
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ];
    let chart_label = format!("custos-{}", chart_yaml()["version"].as_str().expect("Chart.yaml version"));
    for doc in &m.raw {
        let kind = doc["kind"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        assert!(!name.is_empty() && name.len() <= 63, "{kind} name {name:?}");
        let namespace = doc["metadata"]["namespace"].as_str();
        if kind == "CustomResourceDefinition" {
            continue;
        }
        if cluster_scoped.contains(&kind) {
            assert_eq!(namespace, None, "{kind} {name} is cluster-scoped");
        } else {
            assert_eq!(namespace, Some(NAMESPACE), "{kind} {name}: namespace");
        }
        let labels = &doc["metadata"]["labels"];
        for (key, value) in [
            ("app.kubernetes.io/name", "custos"),
            ("app.kubernetes.io/instance", RELEASE),
            ("app.kubernetes.io/managed-by", "Helm"),
            ("app.kubernetes.io/part-of", "custos"),
            ("helm.sh/chart", chart_label.as_str()),
        ] {
            assert_eq!(labels[key].as_str(), Some(value), "{kind} {name}: label {key}");
        }
    }

    // ServiceAccounts of the pods and subjects of the bindings exist; bindings name roles that exist.
    let accounts: Vec<&str> = m.service_accounts.iter().map(name_of).collect();
    for (workload, template) in m.pod_templates() {
        let account = template.spec.as_ref().unwrap().service_account_name.as_deref().unwrap_or_default();
        assert!(accounts.contains(&account), "{workload}: ServiceAccount {account:?} is not rendered");
    }
    let subjects = m
        .cluster_role_bindings
        .iter()
        .flat_map(|b| b.subjects.iter().flatten())
        .chain(m.role_bindings.iter().flat_map(|b| b.subjects.iter().flatten()));
    for subject in subjects {
        assert_eq!(subject.kind, "ServiceAccount");
        assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
        assert!(accounts.contains(&subject.name.as_str()), "binding subject {}", subject.name);
    }
    for binding in &m.cluster_role_bindings {
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert!(
            m.cluster_roles.iter().any(|r| name_of(r) == binding.role_ref.name),
            "{}",
            binding.role_ref.name
        );
    }
    for binding in &m.role_bindings {
        assert_eq!(binding.role_ref.kind, "Role");
        assert!(m.roles.iter().any(|r| name_of(r) == binding.role_ref.name), "{}", binding.role_ref.name);
    }

    // Each Service selects exactly one workload, on ports its container declares.
    for service in &m.services {
        let spec = service.spec.as_ref().unwrap();
        let selector = spec.selector.clone().unwrap_or_default();
        let targets: Vec<_> =
            m.pod_templates().into_iter().filter(|(_, t)| selects(&selector, &labels_of(t))).collect();
        assert_eq!(targets.len(), 1, "Service {} selects {} workloads", name_of(service), targets.len());
        let template = targets[0].1;
        for port in spec.ports.iter().flatten() {
            let Some(IntOrString::String(target)) = &port.target_port else {
                panic!("Service {}: target ports are named", name_of(service))
            };
            let mut declared =
                template.spec.as_ref().unwrap().containers.iter().flat_map(|c| c.ports.iter().flatten());
            assert!(
                declared.any(|p| p.name.as_deref() == Some(target.as_str())),
                "Service {}: no container port {target}",
                name_of(service)
            );
        }
    }

    // Workload selectors match their own pods.
    for d in &m.deployments {
        let spec = d.spec.as_ref().unwrap();
        assert!(selects(&match_labels(&spec.selector), &labels_of(&spec.template)), "{}", name_of(d));
    }
    for s in &m.stateful_sets {
        let spec = s.spec.as_ref().unwrap();
        assert!(selects(&match_labels(&spec.selector), &labels_of(&spec.template)), "{}", name_of(s));
        let governing = spec.service_name.as_deref().expect("serviceName");
        assert_eq!(m.service(governing).spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
    }
}

/// Non-root 65532, read-only root filesystem, no privilege escalation, no capabilities, the
/// runtime's seccomp profile, resources and probes on declared ports, for every Custos pod.
fn check_hardening(m: &Manifests) {
    for (workload, template) in m.pod_templates() {
        let spec = template.spec.as_ref().unwrap();
        let pod = spec.security_context.as_ref().unwrap_or_else(|| panic!("{workload}: pod securityContext"));
        assert_eq!(pod.run_as_non_root, Some(true), "{workload}");
        assert_eq!(pod.run_as_user, Some(65532), "{workload}");
        assert_eq!(
            pod.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault"),
            "{workload}"
        );
        for c in &spec.containers {
            let sc = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{workload}/{}: securityContext", c.name));
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{workload}/{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{workload}/{}", c.name);
            assert_eq!(sc.run_as_non_root, Some(true), "{workload}/{}", c.name);
            let drop = sc.capabilities.as_ref().and_then(|caps| caps.drop.clone());
            assert_eq!(drop, Some(strings(&["ALL"])), "{workload}/{}", c.name);
            let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            assert!(
                requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
                "{workload}/{}",
                c.name
            );
            for probe in [&c.startup_probe, &c.liveness_probe, &c.readiness_probe] {
                let (_, port) = probe_target(probe.as_ref());
                let IntOrString::String(port) = port else { panic!("{workload}: probe ports are named") };
                container_port(c, &port);
            }
        }
    }
}

/// The operator's ServiceAccount, ClusterRole and Role: exactly `custos_operator::rbac` (with
/// the Secret-copy rules, cluster-wide and in its namespace, exactly when the operator is told
/// to copy the sidecar Secrets).
fn check_operator_rbac(m: &Manifests) {
    let cluster_role = m
        .cluster_roles
        .iter()
        .find(|r| name_of(*r) == "custos-operator")
        .expect("ClusterRole custos-operator");
    let config = operator_config(container(
        &m.deployment("custos-operator").spec.as_ref().unwrap().template,
        "operator",
    ));
    let mut expected: Vec<_> = CLUSTER_RULES.to_vec();
    if config.secret_sync.is_some() {
        expected.extend_from_slice(SECRET_SYNC_CLUSTER_RULES);
    }
    let sidecar_secrets = config.secret_sync.as_ref().map(|s| s.names.clone()).unwrap_or_default();
    assert_eq!(cluster_role.rules.clone().unwrap_or_default(), policy_rules(&expected, &sidecar_secrets));
    let role = m.roles.iter().find(|r| name_of(*r) == "custos-operator").expect("Role custos-operator");
    let mut expected: Vec<_> = NAMESPACE_RULES.to_vec();
    if config.secret_sync.is_some() {
        expected.extend_from_slice(SECRET_SYNC_NAMESPACE_RULES);
    }
    assert_eq!(role.rules.clone().unwrap_or_default(), policy_rules(&expected, &sidecar_secrets));
    let bound = |role_kind: &str, role_name: &str| -> Vec<String> {
        m.cluster_role_bindings
            .iter()
            .filter(|b| b.role_ref.kind == role_kind && b.role_ref.name == role_name)
            .flat_map(|b| b.subjects.clone().unwrap_or_default())
            .chain(
                m.role_bindings
                    .iter()
                    .filter(|b| b.role_ref.kind == role_kind && b.role_ref.name == role_name)
                    .flat_map(|b| b.subjects.clone().unwrap_or_default()),
            )
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(bound("ClusterRole", "custos-operator"), ["custos-operator"]);
    assert_eq!(bound("Role", "custos-operator"), ["custos-operator"]);
    let operator = m.deployment("custos-operator");
    let spec = operator.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("custos-operator"));
}

/// The collector's Kubernetes Events RBAC (docs/collector.md), present unless kubeEvents=off.
fn check_collector_rbac(m: &Manifests, expected: bool) {
    let role = m.cluster_roles.iter().find(|r| name_of(*r) == "custos-collector");
    if !expected {
        assert!(role.is_none(), "no collector ClusterRole without Kubernetes Events");
        return;
    }
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(strings(&[group])),
        resources: Some(strings(&[resource])),
        verbs: strings(verbs),
        ..PolicyRule::default()
    };
    assert_eq!(
        role.expect("ClusterRole custos-collector").rules.clone().unwrap_or_default(),
        [
            rule("custos.dev", "dataaccesspolicies", &["get"]),
            rule("events.k8s.io", "events", &["create", "patch"])
        ]
    );
}

/// How the webhook certificate is provided in a variant.
enum WebhookCert {
    HelmGenerated,
    CertManager,
}

/// The operator Deployment and its flags, the webhook Service and configurations, the
/// certificate. Returns the operator's config (the callers check its sidecar settings).
fn check_operator(m: &Manifests, replicas: i32, cert: WebhookCert) -> OperatorConfig {
    let deployment = m.deployment("custos-operator");
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(replicas));
    let template = &spec.template;
    let c = container(template, "operator");
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let config = operator_config(c);

    // Listening ports = container ports; probes on the admin port.
    assert_eq!(config.admin.port() as i32, container_port(c, "admin"));
    assert_eq!(config.webhook_listen.expect("webhooks served").port() as i32, container_port(c, "webhook"));
    assert_eq!(
        probe_target(c.readiness_probe.as_ref()),
        ("/readyz".into(), IntOrString::String("admin".into()))
    );
    assert_eq!(
        probe_target(c.liveness_probe.as_ref()),
        ("/healthz".into(), IntOrString::String("admin".into()))
    );

    // Leader election (when on) on a Lease in the release namespace, as the Role allows.
    assert!(config.leader.enabled || replicas == 1, "{replicas} replicas need leader election");
    assert_eq!(config.leader.lease_namespace, NAMESPACE);
    assert_eq!(config.leader.lease_name, "custos-operator");

    // The certificate files come from the webhook certificate Secret.
    let TlsSource::Files { cert: cert_file, key: key_file } = &config.tls else {
        panic!("the chart gives the operator its certificate files, got {:?}", config.tls)
    };
    let cert_secret = secret_mounted_for(template, c, cert_file);
    assert_eq!(secret_mounted_for(template, c, key_file), cert_secret);

    // The webhook Service sends 443 to the operator's webhook port.
    let service = m.service("custos-operator-webhook");
    let port =
        service.spec.as_ref().unwrap().ports.iter().flatten().find(|p| p.port == 443).expect("port 443");
    assert_eq!(port.target_port, Some(IntOrString::String("webhook".into())));

    // The webhook configurations: names given to the operator, the Service, the paths.
    assert_eq!(m.mutating.len(), 1);
    assert_eq!(m.validating.len(), 1);
    let mutating = &m.mutating[0];
    let validating = &m.validating[0];
    let expected_service = |path: &str| ServiceReference {
        name: "custos-operator-webhook".into(),
        namespace: NAMESPACE.into(),
        path: Some(path.into()),
        port: Some(443),
    };
    let [inject] = mutating.webhooks.as_deref().expect("webhooks") else { panic!("one mutating webhook") };
    let [validate, validate_pods] = validating.webhooks.as_deref().expect("webhooks") else {
        panic!("two validating webhooks: policies and pod updates")
    };
    assert_eq!(inject.client_config.service, Some(expected_service("/mutate-pods")));
    assert_eq!(validate.client_config.service, Some(expected_service("/validate-policies")));
    assert_eq!(inject.client_config.url, None);
    assert_eq!(validate.client_config.url, None);
    assert_eq!(name_of(mutating), "custos-sidecar-injector");
    assert_eq!(name_of(validating), "custos-policy-validator");
    let argv = c.args.clone().unwrap_or_default();
    for (flag, value) in [
        ("--mutating-webhook-configuration", name_of(mutating)),
        ("--validating-webhook-configuration", name_of(validating)),
        ("--webhook-service", name_of(service)),
    ] {
        assert!(argv.contains(&format!("{flag}={value}")), "{flag}={value} in {argv:?}");
    }
    let pods_rule = &inject.rules.as_deref().unwrap()[0];
    assert_eq!(pods_rule.resources, Some(strings(&["pods"])));
    assert_eq!(pods_rule.operations, Some(strings(&["CREATE"])));
    let policies_rule = &validate.rules.as_deref().unwrap()[0];
    assert_eq!(policies_rule.api_groups, Some(strings(&["custos.dev"])));
    assert_eq!(policies_rule.resources, Some(strings(&["dataaccesspolicies"])));
    assert_eq!(policies_rule.operations, Some(strings(&["CREATE", "UPDATE"])));
    // Updates of injected pods: the pod and `kubectl debug`'s subresource, only pods with the
    // label the injection sets.
    assert_eq!(validate_pods.client_config.service, Some(expected_service("/validate-pods")));
    let [update_rule] = validate_pods.rules.as_deref().unwrap() else { panic!("one rule") };
    assert_eq!(update_rule.api_groups, Some(strings(&[""])));
    assert_eq!(update_rule.resources, Some(strings(&["pods", "pods/ephemeralcontainers"])));
    assert_eq!(update_rule.operations, Some(strings(&["UPDATE"])));
    let labels =
        validate_pods.object_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    assert_eq!(
        labels,
        BTreeMap::from([(
            custos_operator_core::names::SIDECAR_LABEL.to_string(),
            custos_operator_core::names::SIDECAR_LABEL_VALUE.to_string()
        )])
    );
    assert_eq!(validate_pods.namespace_selector, inject.namespace_selector);
    // A namespace labelled custos.dev/injection=disabled still reaches the injector, which
    // refuses a pod an Enforce policy selects there (docs/operator.md: fail closed).
    let exprs =
        inject.namespace_selector.as_ref().and_then(|s| s.match_expressions.clone()).unwrap_or_default();
    assert!(exprs.iter().all(|e| e.key != "custos.dev/injection"), "{exprs:?}");
    // Unless told to keep them away from it (no dependency on the webhook there).
    let kept_away = Variant::defaults().with("operator.webhook.checkOptedOutNamespaces=false").render();
    let injector = &kept_away.mutating[0].webhooks.as_ref().unwrap()[0];
    let exprs =
        injector.namespace_selector.as_ref().and_then(|s| s.match_expressions.clone()).unwrap_or_default();
    let opted_out = exprs.iter().find(|e| e.key == "custos.dev/injection").expect("the opt-out term");
    assert_eq!(
        (opted_out.operator.as_str(), opted_out.values.clone()),
        ("NotIn", Some(strings(&["disabled"])))
    );
    assert_eq!(validate_pods.failure_policy, validate.failure_policy);
    for webhook_side_effects in [&inject.side_effects, &validate.side_effects, &validate_pods.side_effects] {
        assert_eq!(webhook_side_effects, "None");
    }
    // Pods of kube-system and of Custos's own namespace never wait for the injector.
    let excluded = inject
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .and_then(|exprs| {
            exprs.iter().find(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
        })
        .and_then(|e| e.values.clone())
        .expect("a NotIn namespace selector");
    assert!(
        excluded.contains(&"kube-system".to_string()) && excluded.contains(&NAMESPACE.to_string()),
        "{excluded:?}"
    );

    match cert {
        WebhookCert::HelmGenerated => check_generated_certificate(
            m,
            &cert_secret,
            &[
                inject.client_config.ca_bundle.as_ref(),
                validate.client_config.ca_bundle.as_ref(),
                validate_pods.client_config.ca_bundle.as_ref(),
            ],
        ),
        WebhookCert::CertManager => {
            assert!(m.secret(&cert_secret).is_none(), "cert-manager writes {cert_secret}, not Helm");
            let [certificate] = m.certificates.as_slice() else { panic!("one Certificate") };
            assert_eq!(certificate.spec.secret_name, cert_secret);
            assert!(certificate.spec.dns_names.contains(&format!("custos-operator-webhook.{NAMESPACE}.svc")));
            let issuer = &certificate.spec.issuer_ref;
            assert_eq!((issuer.kind.as_str(), issuer.group.as_str()), ("Issuer", "cert-manager.io"));
            assert!(
                m.issuers.iter().any(|i| i.metadata.name.as_deref() == Some(issuer.name.as_str())
                    && i.spec.self_signed.is_some()),
                "Issuer {}",
                issuer.name
            );
            let inject_from =
                format!("{NAMESPACE}/{}", certificate.metadata.name.as_deref().unwrap_or_default());
            for (name, meta, ca_bundle) in [
                (name_of(mutating), mutating.metadata(), &inject.client_config.ca_bundle),
                (name_of(validating), validating.metadata(), &validate.client_config.ca_bundle),
                (name_of(validating), validating.metadata(), &validate_pods.client_config.ca_bundle),
            ] {
                let annotation =
                    meta.annotations.as_ref().and_then(|a| a.get("cert-manager.io/inject-ca-from"));
                assert_eq!(annotation, Some(&inject_from), "{name}");
                assert_eq!(*ca_bundle, None, "{name}: cert-manager's cainjector fills caBundle");
            }
        }
    }
    config
}

/// The Helm-generated Secret: the operator loads its pair, and a client trusting the caBundle
/// of the webhook configurations accepts it for the webhook Service's name.
fn check_generated_certificate(
    m: &Manifests,
    secret_name: &str,
    ca_bundles: &[Option<&k8s_openapi::ByteString>],
) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let secret = m.secret(secret_name).unwrap_or_else(|| panic!("no Secret {secret_name}"));
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.as_ref().expect("data");
    let (ca, crt, key) = (&data["ca.crt"].0, &data["tls.crt"].0, &data["tls.key"].0);
    for bundle in ca_bundles {
        assert_eq!(bundle.map(|b| &b.0), Some(ca), "caBundle = the Secret's ca.crt");
    }
    custos_operator::tls::certified_key(crt, key, Path::new("tls.crt"), Path::new("tls.key"))
        .expect("the operator loads the generated pair");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca).expect("ca.crt is a PEM certificate")).expect("a usable CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    let leaf = CertificateDer::from_pem_slice(crt).expect("tls.crt is a PEM certificate");
    for name in
        [format!("custos-operator-webhook.{NAMESPACE}.svc"), format!("custos-operator-webhook.{NAMESPACE}")]
    {
        let server = ServerName::try_from(name.clone()).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &server, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("the apiserver would not trust the webhook as {name}: {e}"));
    }
    let other = ServerName::try_from("custos-operator-webhook.elsewhere.svc").unwrap();
    assert!(verifier.verify_server_cert(&leaf, &[], &other, &[], UnixTime::now()).is_err());
}

/// The collector StatefulSet, its flags, token, probes and Service. Returns its config and the
/// StatefulSet.
fn check_collector(m: &Manifests) -> (CollectorConfig, StatefulSet) {
    let [set] = m.stateful_sets.as_slice() else { panic!("one StatefulSet") };
    assert_eq!(name_of(set), "custos-collector");
    let template = &set.spec.as_ref().unwrap().template;
    let c = container(template, "collector");
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let config = collector_config(c);
    assert_eq!(config.listen.port() as i32, container_port(c, "http"));
    assert_eq!(
        probe_target(c.readiness_probe.as_ref()),
        ("/ready".into(), IntOrString::String("http".into()))
    );
    assert_eq!(
        probe_target(c.liveness_probe.as_ref()),
        ("/healthz".into(), IntOrString::String("http".into()))
    );
    let Auth::TokenFile(token_file) = &config.auth else { panic!("the collector requires a token") };
    let token_secret = secret_mounted_for(template, c, token_file);
    assert_eq!(token_secret, "custos-collector-token");
    let service = m.service("custos-collector");
    let port = service.spec.as_ref().unwrap().ports.iter().flatten().next().unwrap();
    assert_eq!(port.port as u16, config.listen.port());
    (config, set.clone())
}

/// The generated collector token Secret: a `token` of 48 characters.
fn check_generated_token(m: &Manifests) {
    let secret = m.secret("custos-collector-token").expect("the generated token Secret");
    let token = &secret.data.as_ref().unwrap()["token"].0;
    assert_eq!(token.len(), 48);
    assert!(token.iter().all(u8::is_ascii_alphanumeric));
}

/// Each Custos pod is selected by a NetworkPolicy admitting exactly the ports its containers
/// declare (operator: webhook and admin; collector: its port).
fn check_network_policies(m: &Manifests) {
    for (workload, template) in m.pod_templates() {
        let declared: Vec<i32> = template
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
            .collect();
        let policies: Vec<_> = m
            .network_policies
            .iter()
            .filter(|p| {
                let selector = p.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
                selects(&match_labels(selector), &labels_of(template))
            })
            .collect();
        let [policy] = policies.as_slice() else {
            panic!("{workload}: {} NetworkPolicies select its pods", policies.len())
        };
        let spec = policy.spec.as_ref().unwrap();
        assert_eq!(spec.policy_types, Some(strings(&["Ingress"])));
        let admitted: Vec<i32> = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|rule| rule.ports.iter().flatten())
            .map(|p| match p.port {
                Some(IntOrString::Int(port)) => port,
                ref other => panic!("{workload}: numeric ports, got {other:?}"),
            })
            .collect();
        assert_eq!(admitted, declared, "{workload}: ports admitted by {}", name_of(*policy));
    }
}

fn check_crd(m: &Manifests) {
    let repository: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(workspace().join("crds").join(CRD_FILE)).unwrap())
            .unwrap();
    let [crd] = m.raw.iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect::<Vec<_>>()[..]
    else {
        panic!("one CRD rendered")
    };
    assert_eq!(*crd, repository, "the chart renders the repository's CRD");
    assert_eq!(m.crds.len(), 1);
}

fn env_var<'a>(container: &'a Container, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn chart_crd_is_the_repository_crd_byte_for_byte() {
    let chart =
        std::fs::read(chart_dir().join("crds").join(CRD_FILE)).expect("charts/custos/crds/ has the CRD");
    let repository = std::fs::read(workspace().join("crds").join(CRD_FILE)).unwrap();
    assert!(
        chart == repository,
        "charts/custos/crds/{CRD_FILE} differs from crds/{CRD_FILE}: run `make crds`"
    );
    let copies: Vec<_> =
        std::fs::read_dir(chart_dir().join("crds")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(copies, [CRD_FILE], "charts/custos/crds/ holds the CRD only");
}

#[test]
fn chart_app_version_is_the_workspace_version() {
    assert_eq!(chart_yaml()["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")), "Chart.yaml appVersion");
}

#[test]
fn helm_lint_strict_passes() {
    for variant in [Variant::defaults(), Variant::production(), Variant::minimal()] {
        let out = variant.lint().unwrap_or_else(|e| panic!("helm lint --strict ({}):\n{e}", variant.name));
        assert!(out.contains("0 chart(s) failed"), "{}: {out}", variant.name);
    }
}

#[test]
fn default_values_render_a_complete_installation() {
    let m = Variant::defaults().render();
    check_objects(&m);
    check_hardening(&m);
    check_crd(&m);
    check_operator_rbac(&m);
    check_collector_rbac(&m, true);
    let operator = check_operator(&m, 2, WebhookCert::HelmGenerated);
    assert!(operator.leader.enabled);
    assert_eq!(operator.namespaces, None, "all namespaces");
    assert_eq!(operator.inject.image, IMAGE);
    // The collector token Secret is copied into the namespaces with policies.
    let sync = operator.secret_sync.clone().expect("--sync-sidecar-secrets by default");
    assert_eq!(sync.source_namespace, NAMESPACE);
    assert_eq!(sync.names, ["custos-collector-token"]);
    assert_eq!(
        operator.inject.collector_url.as_deref(),
        Some("http://custos-collector.custos-system.svc:8080")
    );
    assert_eq!(operator.inject.collector_token_secret.as_deref(), Some("custos-collector-token"));
    assert_eq!(operator.inject.hash_key_secret, None);
    let requests = operator.inject.resources.requests.clone().unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("50m", "32Mi"));

    let (collector, set) = check_collector(&m);
    check_generated_token(&m);
    // SQLite on the pod's volume claim.
    let db = collector.store_url.strip_prefix("sqlite:").expect("the SQLite store");
    let spec = set.spec.as_ref().unwrap();
    let c = container(&spec.template, "collector");
    let data = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| Path::new(db).starts_with(&v.mount_path))
        .expect("db on a mount");
    let claims = spec.volume_claim_templates.as_ref().expect("a PVC for SQLite");
    assert_eq!(claims.iter().map(name_of).collect::<Vec<_>>(), [data.name.as_str()]);
    let size =
        &claims[0].spec.as_ref().unwrap().resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"];
    assert_eq!(size.0, "10Gi");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(collector.retention, None);
    assert!(collector.detect.is_some());

    check_network_policies(&m);
    let [pdb] = m.pdbs.as_slice() else { panic!("one PodDisruptionBudget") };
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    let operator_pods = labels_of(&m.deployment("custos-operator").spec.as_ref().unwrap().template);
    assert!(selects(&match_labels(pdb_spec.selector.as_ref().unwrap()), &operator_pods));
    assert!(m.service_monitors.is_empty() && m.certificates.is_empty() && m.issuers.is_empty());
    assert!(m.pod_monitors.is_empty());
    let mutating = &m.mutating[0].webhooks.as_ref().unwrap()[0];
    assert_eq!(mutating.failure_policy.as_deref(), Some("Fail"));
}

#[test]
fn production_values_render_cert_manager_postgres_and_monitoring() {
    let m = Variant::production().render();
    check_objects(&m);
    check_hardening(&m);
    check_crd(&m);
    check_operator_rbac(&m);
    check_collector_rbac(&m, true);
    let operator = check_operator(&m, 3, WebhookCert::CertManager);
    assert_eq!(operator.inject.hash_key_secret.as_deref(), Some("custos-hash-key"));
    let limits = operator.inject.resources.limits.clone().unwrap();
    assert_eq!((limits["cpu"].0.as_str(), limits["memory"].0.as_str()), ("1", "256Mi"));

    // Resources as in the values file.
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart_dir().join("ci/production-values.yaml")).unwrap(),
    )
    .unwrap();
    let operator_pods = &m.deployment("custos-operator").spec.as_ref().unwrap().template;
    let rendered = serde_json::to_value(container(operator_pods, "operator").resources.clone()).unwrap();
    assert_eq!(rendered, values["operator"]["resources"]);

    // PostgreSQL: the URL from the Secret, no volume claim, no --store flag.
    let (collector, set) = check_collector(&m);
    assert_eq!(collector.retention, Some(std::time::Duration::from_secs(400 * 86_400)));
    let spec = set.spec.as_ref().unwrap();
    assert!(spec.volume_claim_templates.is_none(), "no PVC with PostgreSQL");
    let c = container(&spec.template, "collector");
    assert!(!c.args.iter().flatten().any(|a| a.starts_with("--store")), "the URL is not in the pod spec");
    let store = env_var(c, "CUSTOS_COLLECTOR_STORE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref());
    let store = store.expect("CUSTOS_COLLECTOR_STORE from a Secret");
    assert_eq!((store.name.as_str(), store.key.as_str()), ("custos-postgres", "url"));
    let webhook = env_var(c, "CUSTOS_ALERT_WEBHOOK")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref());
    assert_eq!(webhook.map(|s| s.name.as_str()), Some("custos-alert-webhook"));
    let alert_token = collector.alerts.token_file.clone().expect("--alert-webhook-token-file");
    assert_eq!(secret_mounted_for(&spec.template, c, &alert_token), "custos-alert-webhook");
    check_generated_token(&m);

    // ServiceMonitors scrape /metrics on named ports of rendered Services.
    assert_eq!(m.service_monitors.len(), 2);
    for monitor in &m.service_monitors {
        assert_eq!(
            (monitor.api_version.as_str(), monitor.kind.as_str()),
            ("monitoring.coreos.com/v1", "ServiceMonitor")
        );
        let selector = match_labels(&monitor.spec.selector);
        let services: Vec<_> = m
            .services
            .iter()
            .filter(|s| selects(&selector, &s.metadata.labels.clone().unwrap_or_default()))
            .collect();
        let [service] = services.as_slice() else {
            panic!(
                "{} selects {} Services",
                monitor.metadata.name.as_deref().unwrap_or_default(),
                services.len()
            )
        };
        assert_eq!(monitor.spec.namespace_selector.as_ref().unwrap().match_names, [NAMESPACE]);
        for endpoint in &monitor.spec.endpoints {
            assert_eq!(endpoint.path.as_deref(), Some("/metrics"));
            assert!(endpoint.interval.is_some() && endpoint.scrape_timeout.is_some());
            let mut ports = service.spec.as_ref().unwrap().ports.iter().flatten();
            assert!(
                ports.any(|p| p.name.as_deref() == Some(endpoint.port.as_str())),
                "{}: Service {} has no port {}",
                monitor.metadata.name.as_deref().unwrap_or_default(),
                name_of(*service),
                endpoint.port
            );
        }
        let labels = monitor.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("release").map(String::as_str), Some("kube-prometheus-stack"));
    }
    check_sidecar_pod_monitor(&m);
    check_network_policies(&m);
    assert_eq!(m.pdbs[0].spec.as_ref().unwrap().min_available, Some(IntOrString::Int(2)));
}

/// The PodMonitor scrapes `/metrics` on the port and the pod label the injection gives every
/// sidecar, in every namespace.
fn check_sidecar_pod_monitor(m: &Manifests) {
    use custos_operator_core::inject::ADMIN_PORT_NAME;
    use custos_operator_core::names::{SIDECAR_LABEL, SIDECAR_LABEL_VALUE};
    let [monitor] = m.pod_monitors.as_slice() else { panic!("one PodMonitor, got {}", m.pod_monitors.len()) };
    assert_eq!(
        (monitor.api_version.as_str(), monitor.kind.as_str()),
        ("monitoring.coreos.com/v1", "PodMonitor")
    );
    assert!(monitor.spec.namespace_selector.any, "the sidecars run in the protected namespaces");
    let selector = match_labels(&monitor.spec.selector);
    assert_eq!(selector, BTreeMap::from([(SIDECAR_LABEL.to_string(), SIDECAR_LABEL_VALUE.to_string())]));
    let [endpoint] = monitor.spec.pod_metrics_endpoints.as_slice() else { panic!("one endpoint") };
    assert_eq!((endpoint.port.as_str(), endpoint.path.as_deref()), (ADMIN_PORT_NAME, Some("/metrics")));
    assert!(endpoint.interval.is_some() && endpoint.scrape_timeout.is_some());
    let labels = monitor.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("release").map(String::as_str), Some("kube-prometheus-stack"));
}

#[test]
fn the_sidecar_pod_monitor_is_a_value_away() {
    let m = Variant::production().with("serviceMonitor.sidecars=false").render();
    assert_eq!(m.service_monitors.len(), 2);
    assert!(m.pod_monitors.is_empty());
    let m = Variant::defaults()
        .with("serviceMonitor.enabled=true")
        .with("serviceMonitor.labels.release=kube-prometheus-stack")
        .render();
    check_sidecar_pod_monitor(&m);
}

#[test]
fn secret_sync_off_leaves_secrets_to_the_user_and_grants_no_secret_access() {
    let m = Variant::defaults().with("operator.sidecar.syncSecrets=false").render();
    check_operator_rbac(&m);
    let operator = check_operator(&m, 2, WebhookCert::HelmGenerated);
    assert!(operator.secret_sync.is_none());

    let cluster_role = m.cluster_roles.iter().find(|r| name_of(*r) == "custos-operator").unwrap();
    let secrets = |r: &PolicyRule| r.resources.as_ref().is_some_and(|res| res.iter().any(|x| x == "secrets"));
    assert!(!cluster_role.rules.clone().unwrap_or_default().iter().any(secrets));
    let notes = render_notes(&Variant::defaults().with("operator.sidecar.syncSecrets=false"));
    assert!(notes.contains("create it in every namespace whose pods get the sidecar"), "{notes}");
    let notes = render_notes(&Variant::production());
    assert!(notes.contains("the operator copies them from"), "{notes}");
}

/// The operator reads and writes no Secret outside its namespace but the sidecar Secrets:
/// `get`, `patch` and `delete` name them (`create` cannot).
#[test]
fn secret_sync_names_the_secrets_it_may_read() {
    let m = Variant::defaults().with("operator.sidecar.hashKeySecret=custos-hash-key").render();
    check_operator_rbac(&m);
    let sync = check_operator(&m, 2, WebhookCert::HelmGenerated).secret_sync.unwrap();
    assert_eq!(sync.names, ["custos-collector-token", "custos-hash-key"]);
    let cluster_role = m.cluster_roles.iter().find(|r| name_of(*r) == "custos-operator").unwrap();
    let secret_rules: Vec<_> = cluster_role
        .rules
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.resources.as_ref().is_some_and(|res| res.iter().any(|x| x == "secrets")))
        .collect();
    assert_eq!(secret_rules.len(), 2, "{secret_rules:#?}");
    for rule in &secret_rules {
        match rule.resource_names.as_deref() {
            None => assert_eq!(rule.verbs, ["create"], "only create is unnamed"),
            Some(names) => {
                assert_eq!(names, ["custos-collector-token", "custos-hash-key"]);
                assert!(rule.verbs.iter().any(|v| v == "get"));
            }
        }
    }
}

#[test]
fn native_sidecars_are_a_value_away() {
    let default = check_operator(&Variant::defaults().render(), 2, WebhookCert::HelmGenerated);
    assert!(!default.inject.native_sidecar);
    let m = Variant::defaults().with("operator.sidecar.native=true").render();
    assert!(check_operator(&m, 2, WebhookCert::HelmGenerated).inject.native_sidecar);
}

#[test]
fn sidecar_flags_are_a_value_away() {
    let default = check_operator(&Variant::defaults().render(), 2, WebhookCert::HelmGenerated);
    assert!(default.inject.extra_args.is_empty());
    let m = Variant::defaults()
        .with("operator.sidecar.extraArgs={--upstream-max-connections=256,--upstream-timeout=10s}")
        .render();
    let config = check_operator(&m, 2, WebhookCert::HelmGenerated);
    assert_eq!(config.inject.extra_args, ["--upstream-max-connections=256", "--upstream-timeout=10s"]);
}

#[test]
fn sidecar_metrics_sources_are_a_value_away() {
    let sources = |variant: Variant| {
        let config = check_operator(&variant.render(), 2, WebhookCert::HelmGenerated);
        serde_json::to_value(config.sidecar_metrics_from).unwrap()
    };
    assert_eq!(sources(Variant::defaults()), serde_json::json!([]), "closed by default");
    let monitoring = serde_json::json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]);
    let production = Variant::production().render();
    let config = check_operator(&production, 3, WebhookCert::CertManager);
    assert_eq!(serde_json::to_value(config.sidecar_metrics_from).unwrap(), monitoring);
    assert_eq!(
        sources(Variant::defaults().with(
            "operator.sidecar.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring"
        )),
        monitoring
    );
}

#[test]
fn sidecar_proxy_threads_follow_the_value_or_the_cpu_limit() {
    let threads = |variant: Variant| {
        check_operator(&variant.render(), 2, WebhookCert::HelmGenerated).inject.proxy_threads
    };
    assert_eq!(threads(Variant::defaults()), 2, "no CPU limit by default");
    assert_eq!(threads(Variant::defaults().with("operator.sidecar.resources.limits.cpu=1500m")), 2);
    assert_eq!(threads(Variant::defaults().with("operator.sidecar.resources.limits.cpu=4")), 4);
    assert_eq!(threads(Variant::defaults().with("operator.sidecar.proxyThreads=6")), 6);
    assert_eq!(threads(Variant::defaults().with("operator.sidecar.proxyThreads=0")), 0);
    assert_eq!(
        threads(
            Variant::defaults()
                .with("operator.sidecar.resources.limits.cpu=4")
                .with("operator.sidecar.proxyThreads=1")
        ),
        1
    );
}

#[test]
fn sidecar_admin_port_follows_the_value() {
    let port =
        |variant: Variant| check_operator(&variant.render(), 2, WebhookCert::HelmGenerated).inject.admin_port;
    assert_eq!(port(Variant::defaults()), custos_operator_core::names::DEFAULT_SIDECAR_ADMIN_PORT);
    assert_eq!(port(Variant::defaults().with("operator.sidecar.adminPort=9464")), 9464);
}

#[test]
fn minimal_variant_renders_the_operator_alone() {
    let m = Variant::minimal().render();
    check_objects(&m);
    check_hardening(&m);
    check_operator_rbac(&m);
    check_collector_rbac(&m, false);
    let operator = check_operator(&m, 1, WebhookCert::HelmGenerated);
    assert!(!operator.leader.enabled);
    assert_eq!(operator.namespaces.clone().unwrap().into_iter().collect::<Vec<_>>(), ["logistics", "shop"]);
    assert_eq!(operator.inject.collector_url.as_deref(), Some("https://audit.example.com"));
    assert_eq!(operator.inject.collector_token_secret.as_deref(), Some("audit-token"));
    assert_eq!(operator.secret_sync.clone().map(|s| s.names), Some(vec!["audit-token".to_string()]));
    assert!(m.stateful_sets.is_empty() && m.secret("custos-collector-token").is_none());
    assert!(m.network_policies.is_empty() && m.pdbs.is_empty());
    // Injection limited to the reconciled namespaces; webhooks fail open as asked.
    let inject = &m.mutating[0].webhooks.as_ref().unwrap()[0];
    assert_eq!(inject.failure_policy.as_deref(), Some("Ignore"));
    let exprs = inject.namespace_selector.as_ref().unwrap().match_expressions.clone().unwrap();
    let only = exprs.iter().find(|e| e.operator == "In").expect("an In selector");
    assert_eq!(only.values, Some(strings(&["shop", "logistics"])));
}

#[test]
fn collector_variants_match_the_collector_flags() {
    // Kubernetes Events off: no RBAC and no API token in the pod.
    let m = Variant::defaults().with("collector.kubeEvents=off").render();
    check_collector_rbac(&m, false);
    let (config, set) = check_collector(&m);
    assert_eq!(config.kube_events, custos_collector::KubeEvents::Off);
    assert_eq!(set.spec.unwrap().template.spec.unwrap().automount_service_account_token, Some(false));

    // Detectors off; retention; a given token Secret is used and none is generated.
    let m = Variant::defaults()
        .with("collector.detectors.enabled=false")
        .with("collector.retention=90d")
        .with("collector.auth.existingSecret=my-token")
        .render();
    let template = &m.stateful_sets[0].spec.as_ref().unwrap().template;
    let c = container(template, "collector");
    let config = collector_config(c);
    assert!(config.detect.is_none());
    assert_eq!(config.retention, Some(std::time::Duration::from_secs(90 * 86_400)));
    let Auth::TokenFile(file) = &config.auth else { panic!("token auth") };
    assert_eq!(secret_mounted_for(template, c, file), "my-token");
    assert!(m.secret("custos-collector-token").is_none());
    let operator = operator_config(container(
        &m.deployment("custos-operator").spec.as_ref().unwrap().template,
        "operator",
    ));
    assert_eq!(operator.inject.collector_token_secret.as_deref(), Some("my-token"));

    // Detector settings reach the collector's flags.
    let m = Variant::defaults()
        .with("collector.detectors.disable={off_hours,first_seen}")
        .with("collector.otlp.endpoint=http://otel:4318")
        .with("collector.otlp.gzip=true")
        .render();
    let c = container(&m.stateful_sets[0].spec.as_ref().unwrap().template, "collector");
    let config = collector_config(c);
    let detect = config.detect.expect("detectors on");
    assert!(!detect.off_hours.enabled && !detect.first_seen.enabled && detect.volume.enabled);
    let export = config.otlp_export.expect("OTLP export");
    assert!(export.gzip);
}

/// What a cluster serving ValidatingAdmissionPolicy (Kubernetes 1.30+) answers to helm.
const VAP: &str = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy";

/// Evaluates the CEL `expression` with `vars` bound, as the API server evaluates a
/// ValidatingAdmissionPolicy's (the same standard library: `has`, `in`, `exists`,
/// `startsWith`).
fn cel_allows(expression: &str, vars: &[(&str, Value)]) -> bool {
    let program = cel::Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
    let mut context = cel::Context::default();
    for (name, value) in vars {
        context.add_variable(*name, value.clone()).unwrap();
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("{expression}: {other:?}"),
    }
}

/// The operator may create Secrets anywhere (RBAC cannot narrow `create` by name): with the
/// cluster serving ValidatingAdmissionPolicy, the chart narrows it to Opaque Secrets of the
/// copied names, without `kubernetes.io/` annotations (no ServiceAccount token minted through
/// a copy). Its CEL is evaluated here on the objects the operator writes and on those it must
/// not.
#[test]
fn the_operators_secret_writes_are_narrowed_to_the_copies() {
    // Not served (helm's defaults): nothing rendered under `auto`; `on` renders anyway.
    assert!(Variant::defaults().render().admission_policies.is_empty());
    assert_eq!(
        Variant::defaults().with("operator.sidecar.secretCopyGuard=on").render().admission_policies.len(),
        1
    );
    for off in ["operator.sidecar.secretCopyGuard=off", "operator.sidecar.syncSecrets=false"] {
        assert!(Variant::defaults().serving(VAP).with(off).render().admission_policies.is_empty(), "{off}");
    }

    let m = Variant::defaults().serving(VAP).with("operator.sidecar.hashKeySecret=custos-hash-key").render();
    let [policy] = m.admission_policies.as_slice() else { panic!("one policy") };
    let [binding] = m.admission_policy_bindings.as_slice() else { panic!("one binding") };
    let spec = policy.spec.as_ref().unwrap();
    let binding_spec = binding.spec.as_ref().unwrap();
    assert_eq!(binding_spec.policy_name.as_deref(), policy.metadata.name.as_deref());
    assert_eq!(binding_spec.validation_actions, Some(strings(&["Deny"])));
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec.match_constraints.as_ref().and_then(|c| c.resource_rules.clone()).unwrap_or_default();
    let [rule] = rules.as_slice() else { panic!("one resource rule") };
    assert_eq!(rule.resources, Some(strings(&["secrets"])));
    assert_eq!(rule.operations, Some(strings(&["CREATE", "UPDATE"])));

    // Only the operator's own requests are judged.
    let operator_binding = m
        .cluster_role_bindings
        .iter()
        .find(|b| name_of(*b) == "custos-operator")
        .expect("the operator's binding");
    let subject = &operator_binding.subjects.as_ref().unwrap()[0];
    let operator = format!("system:serviceaccount:{}:{}", NAMESPACE, subject.name);
    let [condition] = spec.match_conditions.as_deref().unwrap() else { panic!("one match condition") };
    let user = |name: &str| serde_json::json!({"userInfo": {"username": name}});
    assert!(cel_allows(&condition.expression, &[("request", user(&operator))]));
    assert!(!cel_allows(
        &condition.expression,
        &[("request", user("system:serviceaccount:custos-system:default"))]
    ));

    // The names are the copied Secrets', as the RBAC's resourceNames.
    let copied: Vec<String> = m
        .cluster_roles
        .iter()
        .find(|r| name_of(*r) == "custos-operator")
        .expect("the operator's ClusterRole")
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.as_deref() == Some(&strings(&["secrets"])[..]))
        .find_map(|r| r.resource_names.clone())
        .expect("secret resourceNames");
    assert_eq!(copied, ["custos-collector-token", "custos-hash-key"]);
    let admitted = |object: Value| {
        spec.validations.iter().flatten().all(|v| cel_allows(&v.expression, &[("object", object.clone())]))
    };
    for name in &copied {
        let copy = serde_json::json!({"metadata": {"name": name, "namespace": "shop",
            "labels": {"app.kubernetes.io/managed-by": "custos"}}, "type": "Opaque", "data": {"token": "eA=="}});
        assert!(admitted(copy.clone()), "the copy {name}");
        let mut untyped = copy.clone();
        untyped.as_object_mut().unwrap().remove("type");
        assert!(admitted(untyped), "the copy {name} without a type (Opaque)");
        let mut minted = copy.clone();
        minted["type"] = "kubernetes.io/service-account-token".into();
        minted["metadata"]["annotations"] =
            serde_json::json!({"kubernetes.io/service-account.name": "admin"});
        assert!(!admitted(minted), "a ServiceAccount token named {name}");
        let mut annotated = copy.clone();
        annotated["metadata"]["annotations"] =
            serde_json::json!({"kubernetes.io/service-account.name": "admin"});
        assert!(!admitted(annotated), "an Opaque {name} annotated for a ServiceAccount");
        let mut docker = copy;
        docker["type"] = "kubernetes.io/dockerconfigjson".into();
        assert!(!admitted(docker));
    }
    let other =
        serde_json::json!({"metadata": {"name": "db-password", "namespace": "shop"}, "type": "Opaque"});
    assert!(!admitted(other), "another name");
}

/// Working hours that end at midnight: the schema takes `24:00` as the collector does.
#[test]
fn off_hours_may_end_at_midnight() {
    let m = Variant::defaults()
        .with("collector.detectors.offHours.start=18:00")
        .with("collector.detectors.offHours.end=24:00")
        .render();
    let config =
        collector_config(container(&m.stateful_sets[0].spec.as_ref().unwrap().template, "collector"));
    let detect = config.detect.expect("detectors on");
    assert_eq!((detect.off_hours.start.as_str(), detect.off_hours.end.as_str()), ("18:00", "24:00"));
    let err = Variant::defaults().with("collector.detectors.offHours.end=24:01").template(&chart_dir());
    assert!(err.expect_err("24:01").contains("offHours.end: Does not match pattern"));
}

#[test]
fn schema_refuses_typos_bad_enums_and_inconsistent_stores() {
    for (set, expected) in [
        ("operator.replicaz=3", "operator: Additional property replicaz is not allowed"),
        ("colector.enabled=true", "Additional property colector is not allowed"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy: image.pullPolicy must be one of"),
        ("operator.webhook.failurePolicy=Maybe", "operator.webhook.failurePolicy must be one of"),
        ("collector.store.type=mysql", "collector.store.type must be one of"),
        ("collector.kubeEvents=sometimes", "collector.kubeEvents must be one of"),
        ("collector.retention=forever-ish", "collector.retention: Does not match pattern"),
        ("collector.retention=0d", "collector.retention: Does not match pattern"),
        ("collector.maxEventAge=0d", "collector.maxEventAge: Does not match pattern"),
        (
            "operator.sidecar.resources.requests.cpu=lots",
            "operator.sidecar.resources.requests.cpu: Does not match",
        ),
        ("operator.replicas=two", "operator.replicas: Invalid type"),
        ("collector.replicas=2", "collector.replicas: Must be less than or equal to 1"),
        ("collector.store.type=postgres", "collector.store.postgres.existingSecret"),
        ("operator.leaderElection.enabled=false", "operator.replicas: Must be less than or equal to 1"),
        ("collector.alerts.webhook.tokenKey=token", "collector.alerts.webhook.existingSecret"),
        ("collector.otlp.gzip=true", "collector.otlp.endpoint"),
        (
            "operator.sidecar.extraArgs={upstream-max-connections=256}",
            "operator.sidecar.extraArgs.0: Does not match",
        ),
        (
            "operator.sidecar.adminPort=15080",
            "operator.sidecar.adminPort: Must not validate the schema (not)",
        ),
        ("operator.sidecar.adminPort=0", "operator.sidecar.adminPort: Must be greater than or equal to 1"),
        (
            "operator.sidecar.proxyThreads=65",
            "operator.sidecar.proxyThreads: Must be less than or equal to 64",
        ),
        ("operator.sidecar.proxyThreads=many", "operator.sidecar.proxyThreads: Invalid type"),
        ("operator.sidecar.metricsFrom=monitoring", "operator.sidecar.metricsFrom: Invalid type"),
    ] {
        let variant = Variant::defaults().with(set);
        let err = variant.template(&chart_dir()).expect_err(set);
        assert!(err.contains(expected), "--set {set}: expected an error about {expected}, got:\n{err}");
        let lint = variant.lint().expect_err(set);
        assert!(lint.contains(expected), "helm lint --set {set}:\n{lint}");
    }
}

#[test]
fn strict_deserialisation_names_unknown_fields() {
    let mut deployment: Value = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
        }
    });
    strict::<Deployment>(&deployment).expect("a valid Deployment");
    deployment["spec"]["replica"] = 2.into();
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullpolicy"] = "Always".into();
    let err = strict::<Deployment>(&deployment).expect_err("misspelt fields");
    assert!(
        err.contains("spec.replica") && err.contains("spec.template.spec.containers.0.imagePullpolicy"),
        "{err}"
    );

    let monitor = serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "m"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "30s"}]}
    });
    let err = strict::<custom::ServiceMonitor>(&monitor).expect_err("misspelt field");
    assert!(err.contains("spec.endpoints.0.intervall"), "{err}");

    let err =
        Manifests::parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").err().expect("unknown kind");
    assert!(err.contains("Pod \"p\""), "{err}");
}

/// NOTES.txt, rendered through a copy of the chart that exposes it as a ConfigMap (`helm
/// template` does not print NOTES).
fn render_notes(variant: &Variant) -> String {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("custos");
    copy_dir(&chart_dir(), &copy);
    std::fs::copy(copy.join("templates/NOTES.txt"), copy.join("notes-under-test.txt")).unwrap();
    std::fs::write(
        copy.join("templates/notes-under-test.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  \
         notes: {{ tpl (.Files.Get \"notes-under-test.txt\") . | quote }}\n",
    )
    .unwrap();
    let text = variant.template(&copy).unwrap_or_else(|e| panic!("{}: {e}", variant.name));
    let m = Manifests::parse(&text).unwrap();
    let notes = m.config_maps.iter().find(|c| name_of(*c) == "notes").expect("the NOTES ConfigMap");
    notes.data.as_ref().unwrap()["notes"].clone()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn notes_say_how_to_check_and_warn_about_failing_open() {
    let notes = render_notes(&Variant::defaults());
    for expected in [
        "kubectl get dap -A",
        "kubectl -n custos-system logs deployment/custos-operator",
        "http://custos-collector.custos-system.svc:8080",
        "Secret \"custos-collector-token\"",
    ] {
        assert!(notes.contains(expected), "NOTES lack {expected:?}:\n{notes}");
    }
    assert!(!notes.contains("WARNING"), "{notes}");

    let notes = render_notes(&Variant::minimal());
    assert!(notes.contains("WARNING: operator.webhook.failurePolicy is Ignore"), "{notes}");
    assert!(notes.contains("Secret \"audit-token\""), "{notes}");

    let notes = render_notes(&Variant::defaults().with("collector.enabled=false"));
    assert!(notes.contains("WARNING: no collector"), "{notes}");
}

/// A policy's `egress: DenyAll` keeps the collector the chart runs reachable: the labels its
/// NetworkPolicy selects the collector by are those of the chart's collector pods.
#[test]
fn egress_lockdown_selects_the_charts_collector_pods() {
    let selector: BTreeMap<String, String> = custos_policy::netpol::COLLECTOR_POD_LABELS
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    for variant in [Variant::defaults(), Variant::production()] {
        let m = variant.render();
        let selected: Vec<String> = m
            .pod_templates()
            .into_iter()
            .filter(|(_, t)| selects(&selector, &labels_of(t)))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(selected.len(), 1, "{}: {selected:?}", variant.name);
        assert!(selected[0].ends_with("collector"), "{}: {selected:?}", variant.name);
    }
}
