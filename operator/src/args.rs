//! Flags of `custos operator` (each also read from the `CUSTOS_OPERATOR_*` environment
//! variable named in its help) and their checks.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use custos_operator_core::inject::{self, InjectSettings};
use custos_operator_core::names;
use custos_policy::selector::is_dns_label;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::context::SecretSync;
use crate::leader::LeaderSettings;

/// Flags of `custos operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Namespaces to reconcile, comma-separated [default: all namespaces].
    #[arg(long, env = "CUSTOS_OPERATOR_NAMESPACES", value_name = "NS,...", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Admin address: /healthz, /readyz, /metrics (plain HTTP).
    #[arg(long, env = "CUSTOS_OPERATOR_ADMIN", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub admin: SocketAddr,

    /// Webhook address (HTTPS): /mutate-pods, /validate-policies and /validate-pods.
    #[arg(long, env = "CUSTOS_OPERATOR_WEBHOOK_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_listen: SocketAddr,

    /// Do not serve the webhooks (no injection, no admission validation): for running the
    /// controller alone, e.g. out of cluster.
    #[arg(long, env = "CUSTOS_OPERATOR_DISABLE_WEBHOOKS")]
    pub disable_webhooks: bool,

    /// Webhook serving certificate (PEM), e.g. from cert-manager; re-read when it changes.
    /// Without it (and --tls-key-file) a CA and certificate are generated on start and the CA
    /// is patched into the webhook configurations.
    #[arg(long, env = "CUSTOS_OPERATOR_TLS_CERT_FILE", value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key of --tls-cert-file (PEM).
    #[arg(long, env = "CUSTOS_OPERATOR_TLS_KEY_FILE", value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Service in front of the webhooks (names of the generated certificate).
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_WEBHOOK_SERVICE",
        value_name = "NAME",
        default_value = "custos-operator-webhook"
    )]
    pub webhook_service: String,

    /// The operator's own namespace (webhook Service, Lease).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS", default_value = "custos-system")]
    pub operator_namespace: String,

    /// MutatingWebhookConfiguration to patch the generated CA into.
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_MUTATING_WEBHOOK",
        value_name = "NAME",
        default_value = "custos-sidecar-injector"
    )]
    pub mutating_webhook_configuration: String,

    /// ValidatingWebhookConfiguration to patch the generated CA into.
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_VALIDATING_WEBHOOK",
        value_name = "NAME",
        default_value = "custos-policy-validator"
    )]
    pub validating_webhook_configuration: String,

    /// Elect a leader on a Lease; only the leader reconciles. Turn off only with one replica.
    #[arg(long, env = "CUSTOS_OPERATOR_LEADER_ELECTION", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader Lease (in the operator's namespace).
    #[arg(long, env = "CUSTOS_OPERATOR_LEASE_NAME", value_name = "NAME", default_value = names::LEASE_NAME)]
    pub lease_name: String,

    /// How long a leader's Lease lasts without renewal.
    #[arg(long, env = "CUSTOS_OPERATOR_LEASE_DURATION", value_name = "DURATION", default_value = "15s", value_parser = parse_seconds)]
    pub lease_duration: Duration,

    /// How long before expiry the leader renews its Lease.
    #[arg(long, env = "CUSTOS_OPERATOR_LEASE_GRACE", value_name = "DURATION", default_value = "5s", value_parser = parse_seconds)]
    pub lease_grace: Duration,

    /// This replica's identity (Lease holder, Event reporter) [default: the host name].
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub instance: Option<String>,

    /// Image of the injected sidecar.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_IMAGE", value_name = "IMAGE", default_value = concat!("ghcr.io/custos-dev/custos:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// imagePullPolicy of the injected sidecar.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_IMAGE_PULL_POLICY", value_name = "POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: String,

    /// CPU request of the sidecar.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_CPU_REQUEST", value_name = "QUANTITY", default_value = "50m")]
    pub sidecar_cpu_request: String,

    /// Memory request of the sidecar.
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_SIDECAR_MEMORY_REQUEST",
        value_name = "QUANTITY",
        default_value = "32Mi"
    )]
    pub sidecar_memory_request: String,

    /// CPU limit of the sidecar [default: none].
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_CPU_LIMIT", value_name = "QUANTITY")]
    pub sidecar_cpu_limit: Option<String>,

    /// Memory limit of the sidecar.
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_SIDECAR_MEMORY_LIMIT",
        value_name = "QUANTITY",
        default_value = "128Mi"
    )]
    pub sidecar_memory_limit: String,

    /// Collector URL the sidecars send audit events to.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_COLLECTOR", value_name = "URL")]
    pub sidecar_collector: Option<String>,

    /// Secret (in each protected pod's namespace) holding the collector token, key `token`.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_COLLECTOR_TOKEN_SECRET", value_name = "NAME")]
    pub sidecar_collector_token_secret: Option<String>,

    /// Secret (in each protected pod's namespace) holding the hash key, key `key`.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_HASH_KEY_SECRET", value_name = "NAME")]
    pub sidecar_hash_key_secret: Option<String>,

    /// Proxy threads of the injected sidecars (0: one shared runtime) [default: the CPU limit
    /// rounded up when --sidecar-cpu-limit is set, else 2]. Without it a sidecar would start
    /// one thread per CPU of its node.
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_SIDECAR_PROXY_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(0..=i64::from(inject::MAX_PROXY_THREADS))
    )]
    pub sidecar_proxy_threads: Option<u16>,

    /// Port of the injected sidecars' admin server (/healthz, /ready, /metrics; container port
    /// `custos-admin`). The default stays clear of the ports Istio's and Linkerd's proxies
    /// take in the same pod; it must differ from the policies' proxyPort (default 15080).
    #[arg(
        long,
        env = "CUSTOS_OPERATOR_SIDECAR_ADMIN_PORT",
        value_name = "PORT",
        default_value_t = names::DEFAULT_SIDECAR_ADMIN_PORT,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub sidecar_admin_port: u16,

    /// Inject the sidecar as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+): it starts before the app and stops after it, and Jobs complete.
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_NATIVE")]
    pub sidecar_native: bool,

    /// One more `custos sidecar` flag for the injected sidecars, e.g.
    /// `--sidecar-arg=--upstream-max-connections=256` (repeatable; added after `sidecar`).
    /// The flags the injection sets itself (config, listen and admin addresses, app, pod
    /// identity, collector, spool, hash key and JWKS paths, proxy threads) are refused.
    #[arg(long = "sidecar-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub sidecar_args: Vec<String>,

    /// Who may reach the injected sidecars' admin port (--sidecar-admin-port: /metrics, /ready, /healthz)
    /// through the NetworkPolicies derived from the policies: a JSON array of
    /// NetworkPolicyPeers, e.g.
    /// `[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]`
    /// [default: nobody; the NetworkPolicies open the proxy port only].
    #[arg(long, env = "CUSTOS_OPERATOR_SIDECAR_METRICS_FROM", value_name = "JSON")]
    pub sidecar_metrics_from: Option<String>,

    /// Copy the sidecar Secrets (--sidecar-collector-token-secret, --sidecar-hash-key-secret)
    /// from --operator-namespace into every namespace with policies, and delete the copies
    /// when its last policy goes. A Secret of that name that the operator did not create is
    /// left alone. Needs the cluster-wide Secret rules of docs/operator.md.
    #[arg(long, env = "CUSTOS_OPERATOR_SYNC_SIDECAR_SECRETS")]
    pub sync_sidecar_secrets: bool,
}

/// The operator flags behind the sidecar flags the injection sets that users choose.
const OPERATOR_FLAG_OF: [(&str, &str); 5] = [
    ("--proxy-threads", "--sidecar-proxy-threads"),
    ("--admin", "--sidecar-admin-port"),
    ("--collector", "--sidecar-collector"),
    ("--collector-token-file", "--sidecar-collector-token-secret"),
    ("--hash-key-file", "--sidecar-hash-key-secret"),
];

/// Whether `arg` may be added to the injected sidecars' command line.
fn check_sidecar_arg(arg: &str) -> Result<(), String> {
    let name = arg.split_once('=').map_or(arg, |(name, _)| name);
    if !name.starts_with("--") || name.len() < 3 {
        return Err(format!("{arg:?} is not a `custos sidecar` flag (--name or --name=value)"));
    }
    // The injection gives the sidecar its pod's own labels (a downward API file); a label list
    // would take precedence over them and change which policies select the pod, behind the
    // operator's back (its NetworkPolicies and status count the pod's real labels).
    if name == "--pod-labels" {
        return Err(format!("{arg:?}: the injection gives the sidecar its pod's own labels"));
    }
    if inject::is_managed_flag(name) {
        let hint = OPERATOR_FLAG_OF
            .iter()
            .find(|(flag, _)| *flag == name)
            .map_or(String::new(), |(_, operator_flag)| format!("; use {operator_flag}"));
        return Err(format!("{arg:?}: {name} is set by the injection{hint}"));
    }
    Ok(())
}

/// The operator's validated settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to reconcile; `None` = all.
    pub namespaces: Option<BTreeSet<String>>,
    /// Admin address.
    pub admin: SocketAddr,
    /// Webhook address; `None` = webhooks disabled.
    pub webhook_listen: Option<SocketAddr>,
    /// Where the webhook certificate comes from.
    pub tls: TlsSource,
    /// Leader election.
    pub leader: LeaderSettings,
    /// This replica's identity.
    pub instance: String,
    /// What the injector puts into pods.
    pub inject: InjectSettings,
    /// Sidecar Secrets the controller copies into namespaces (`--sync-sidecar-secrets`).
    pub secret_sync: Option<SecretSync>,
    /// Who may reach the sidecars' admin port through the policies' NetworkPolicies
    /// (`--sidecar-metrics-from`); empty: nobody.
    pub sidecar_metrics_from: Vec<NetworkPolicyPeer>,
}

/// Where the webhook serving certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files, re-read when they change.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Generated on start; the CA is patched into the named webhook configurations.
    Generate {
        /// Service name.
        service: String,
        /// Service namespace.
        namespace: String,
        /// MutatingWebhookConfiguration name.
        mutating: String,
        /// ValidatingWebhookConfiguration name.
        validating: String,
    },
}

/// A flag value that does not make sense.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ArgsError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

fn quantity(flag: &'static str, value: &str) -> Result<Quantity, ArgsError> {
    let ok = !value.is_empty()
        && value.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && value
            .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
            .chars()
            .all(|c| c.is_ascii_alphabetic())
        && matches!(
            value.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'),
            "" | "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti"
        );
    if ok {
        Ok(Quantity(value.to_string()))
    } else {
        Err(ArgsError {
            flag,
            message: format!("{value:?} is not a resource quantity such as 50m, 128Mi or 1"),
        })
    }
}

/// Proxy threads of the injected sidecars when `--sidecar-proxy-threads` is not given.
fn default_proxy_threads(cpu_limit: Option<&str>) -> Result<u16, ArgsError> {
    inject::proxy_threads_for_cpu_limit(cpu_limit).ok_or_else(|| ArgsError {
        flag: "sidecar-cpu-limit",
        message: format!(
            "{:?} is not a CPU quantity such as 500m, 1.5 or 2 (for the sidecars' proxy threads)",
            cpu_limit.unwrap_or_default()
        ),
    })
}

impl OperatorArgs {
    /// Checks the flags and builds the config.
    pub fn into_config(self) -> Result<OperatorConfig, ArgsError> {
        let namespaces: BTreeSet<String> =
            self.namespaces.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
        if let Some(bad) = namespaces.iter().find(|n| !is_dns_label(n)) {
            return Err(ArgsError {
                flag: "namespaces",
                message: format!("{bad:?} is not a namespace name"),
            });
        }
        for (flag, value) in
            [("operator-namespace", &self.operator_namespace), ("webhook-service", &self.webhook_service)]
        {
            if !is_dns_label(value) {
                return Err(ArgsError { flag, message: format!("{value:?} is not a DNS label") });
            }
        }
        if self.lease_grace < Duration::from_secs(1) || self.lease_duration <= self.lease_grace {
            return Err(ArgsError {
                flag: "lease-duration",
                message: format!(
                    "must be longer than --lease-grace ({}s), and the grace at least 1s",
                    self.lease_grace.as_secs()
                ),
            });
        }
        if self.sidecar_admin_port == custos_api::policy::DEFAULT_PROXY_PORT {
            return Err(ArgsError {
                flag: "sidecar-admin-port",
                message: format!(
                    "must differ from the policies' default proxyPort {}",
                    custos_api::policy::DEFAULT_PROXY_PORT
                ),
            });
        }
        let instance = match self.instance.filter(|i| !i.is_empty()) {
            Some(instance) => instance,
            None => hostname(),
        };
        let mut requests = std::collections::BTreeMap::new();
        requests.insert("cpu".to_string(), quantity("sidecar-cpu-request", &self.sidecar_cpu_request)?);
        requests
            .insert("memory".to_string(), quantity("sidecar-memory-request", &self.sidecar_memory_request)?);
        let mut limits = std::collections::BTreeMap::new();
        limits.insert("memory".to_string(), quantity("sidecar-memory-limit", &self.sidecar_memory_limit)?);
        if let Some(cpu) = &self.sidecar_cpu_limit {
            limits.insert("cpu".to_string(), quantity("sidecar-cpu-limit", cpu)?);
        }
        let proxy_threads = match self.sidecar_proxy_threads {
            Some(threads) => threads,
            None => default_proxy_threads(self.sidecar_cpu_limit.as_deref())?,
        };
        if let Some(url) = &self.sidecar_collector
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ArgsError {
                flag: "sidecar-collector",
                message: format!("{url:?} is not an http(s) URL"),
            });
        }
        for arg in &self.sidecar_args {
            check_sidecar_arg(arg).map_err(|message| ArgsError { flag: "sidecar-arg", message })?;
        }
        let sidecar_metrics_from = match self.sidecar_metrics_from.as_deref() {
            Some(json) => {
                network_peers(json).map_err(|message| ArgsError { flag: "sidecar-metrics-from", message })?
            }
            None => Vec::new(),
        };
        let secret_sync = self.sync_sidecar_secrets.then(|| SecretSync {
            source_namespace: self.operator_namespace.clone(),
            names: [&self.sidecar_collector_token_secret, &self.sidecar_hash_key_secret]
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            collector_token: self.sidecar_collector_token_secret.clone(),
        });
        if secret_sync.as_ref().is_some_and(|s| s.names.is_empty()) {
            return Err(ArgsError {
                flag: "sync-sidecar-secrets",
                message: "needs --sidecar-collector-token-secret or --sidecar-hash-key-secret".into(),
            });
        }
        let inject = InjectSettings {
            image: self.sidecar_image,
            image_pull_policy: self.sidecar_image_pull_policy,
            resources: ResourceRequirements {
                requests: Some(requests),
                limits: Some(limits),
                ..ResourceRequirements::default()
            },
            collector_url: self.sidecar_collector,
            collector_token_secret: self.sidecar_collector_token_secret,
            hash_key_secret: self.sidecar_hash_key_secret,
            native_sidecar: self.sidecar_native,
            proxy_threads,
            admin_port: self.sidecar_admin_port,
            extra_args: self.sidecar_args,
            ..InjectSettings::default()
        };
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            _ => TlsSource::Generate {
                service: self.webhook_service,
                namespace: self.operator_namespace.clone(),
                mutating: self.mutating_webhook_configuration,
                validating: self.validating_webhook_configuration,
            },
        };
        Ok(OperatorConfig {
            namespaces: if namespaces.is_empty() { None } else { Some(namespaces) },
            admin: self.admin,
            webhook_listen: (!self.disable_webhooks).then_some(self.webhook_listen),
            tls,
            leader: LeaderSettings {
                enabled: self.leader_election,
                lease_name: self.lease_name,
                lease_namespace: self.operator_namespace,
                identity: instance.clone(),
                duration: self.lease_duration,
                grace: self.lease_grace,
            },
            instance,
            inject,
            secret_sync,
            sidecar_metrics_from,
        })
    }
}

/// Parses a JSON array of NetworkPolicyPeers. Each must name a source (a namespace selector,
/// a pod selector or an IP block; the API refuses an empty peer) and nothing else: a misspelt
/// field would otherwise be dropped and widen the rule.
fn network_peers(json: &str) -> Result<Vec<NetworkPolicyPeer>, String> {
    const FIELDS: [&str; 3] = ["namespaceSelector", "podSelector", "ipBlock"];
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let Some(items) = value.as_array() else {
        return Err("must be a JSON array of NetworkPolicyPeers".into());
    };
    for (i, item) in items.iter().enumerate() {
        let Some(fields) = item.as_object() else {
            return Err(format!("[{i}]: must be an object (a NetworkPolicyPeer)"));
        };
        if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "[{i}].{unknown}: unknown field; a peer has namespaceSelector, podSelector and ipBlock"
            ));
        }
        if fields.is_empty() {
            return Err(format!("[{i}]: a peer needs namespaceSelector, podSelector or ipBlock"));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("not a JSON array of NetworkPolicyPeers: {e}"))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "custos-operator".to_string())
}

/// Parses `15s`, `2m`, `1h` or a bare number of seconds, whole seconds only.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration such as 15s, 2m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: OperatorArgs,
    }

    fn parse(argv: &[&str]) -> Result<OperatorConfig, String> {
        let mut all = vec!["custos-operator"];
        all.extend_from_slice(argv);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--instance", "op-0"]).unwrap();
        assert_eq!(c.namespaces, None);
        assert_eq!(c.webhook_listen, Some("0.0.0.0:9443".parse().unwrap()));
        assert!(c.leader.enabled);
        assert_eq!(c.leader.identity, "op-0");
        assert_eq!(c.leader.duration, Duration::from_secs(15));
        assert!(matches!(c.tls, TlsSource::Generate { .. }));
        assert_eq!(c.inject.image_pull_policy, "IfNotPresent");
        let requests = c.inject.resources.requests.unwrap();
        assert_eq!(requests["cpu"], Quantity("50m".into()));
    }

    #[test]
    fn namespaces_files_and_switches() {
        let c = parse(&[
            "--namespaces",
            "shop, logistics",
            "--tls-cert-file",
            "/tls/tls.crt",
            "--tls-key-file",
            "/tls/tls.key",
            "--leader-election",
            "false",
            "--disable-webhooks",
        ])
        .unwrap();
        assert_eq!(c.namespaces.unwrap().into_iter().collect::<Vec<_>>(), ["logistics", "shop"]);
        assert_eq!(c.tls, TlsSource::Files { cert: "/tls/tls.crt".into(), key: "/tls/tls.key".into() });
        assert!(!c.leader.enabled);
        assert_eq!(c.webhook_listen, None);
    }

    #[test]
    fn secret_sync_copies_the_configured_sidecar_secrets_from_the_operator_namespace() {
        let c =
            parse(&["--sidecar-collector-token-secret", "tok", "--sidecar-hash-key-secret", "hk"]).unwrap();
        assert_eq!(c.secret_sync, None);
        let c = parse(&[
            "--sync-sidecar-secrets",
            "--operator-namespace",
            "custos",
            "--sidecar-collector-token-secret",
            "tok",
            "--sidecar-hash-key-secret",
            "hk",
        ])
        .unwrap();
        let sync = c.secret_sync.unwrap();
        assert!(!c.inject.native_sidecar);
        assert!(parse(&["--sidecar-native"]).unwrap().inject.native_sidecar);
        assert_eq!(sync.collector_token.as_deref(), Some("tok"));
        assert_eq!((sync.source_namespace.as_str(), sync.names), ("custos", vec!["tok".into(), "hk".into()]));
    }

    #[test]
    fn sidecar_args_are_passed_on_and_managed_flags_refused() {
        let c = parse(&[
            "--sidecar-arg=--upstream-max-connections=256",
            "--sidecar-arg",
            "--max-connections=2000",
        ])
        .unwrap();
        assert_eq!(c.inject.extra_args, ["--upstream-max-connections=256", "--max-connections=2000"]);
        for bad in [
            "--config=/tmp/x",
            "--upstream",
            "--collector=http://elsewhere",
            "--hash-key-file=/k",
            "--pod-labels=app=x",
            "-v",
            "x",
        ] {
            let error = parse(&["--sidecar-arg", bad]).expect_err(bad);
            assert!(error.contains("--sidecar-arg") && error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn sidecar_metrics_sources_are_network_policy_peers() {
        let peers = |argv: &[&str]| parse(argv).map(|c| c.sidecar_metrics_from);
        assert_eq!(peers(&[]), Ok(vec![]));
        assert_eq!(peers(&["--sidecar-metrics-from", "[]"]), Ok(vec![]));
        let monitoring = r#"[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}},
            {"ipBlock":{"cidr":"10.0.0.0/8"}}]"#;
        let parsed = peers(&["--sidecar-metrics-from", monitoring]).expect("valid peers");
        assert_eq!(parsed.len(), 2);
        let labels = parsed[0].namespace_selector.as_ref().and_then(|s| s.match_labels.clone());
        assert_eq!(labels.unwrap()["kubernetes.io/metadata.name"], "monitoring");
        assert_eq!(parsed[1].ip_block.as_ref().map(|b| b.cidr.as_str()), Some("10.0.0.0/8"));
        for (value, needle) in [
            ("monitoring", "--sidecar-metrics-from: not JSON"),
            (r#"{"podSelector":{}}"#, "must be a JSON array"),
            ("[\"monitoring\"]", "[0]: must be an object"),
            ("[{}]", "[0]: a peer needs namespaceSelector, podSelector or ipBlock"),
            (r#"[{"podSelector":{}},{"namespaceSelecter":{}}]"#, "[1].namespaceSelecter: unknown field"),
            (r#"[{"ipBlock":{"cidr":7}}]"#, "not a JSON array of NetworkPolicyPeers"),
        ] {
            let error = peers(&["--sidecar-metrics-from", value]).expect_err(value);
            assert!(error.contains(needle), "{value}: {error}");
        }
    }

    #[test]
    fn sidecar_admin_port_defaults_clear_of_istio_and_refuses_the_proxy_port() {
        let port = |argv: &[&str]| parse(argv).map(|c| c.inject.admin_port);
        assert_eq!(port(&[]), Ok(15081));
        assert_eq!(port(&["--sidecar-admin-port", "9464"]), Ok(9464));
        for (value, needle) in [
            ("15080", "--sidecar-admin-port: must differ from the policies' default proxyPort 15080"),
            ("0", "--sidecar-admin-port"),
            ("65536", "--sidecar-admin-port"),
            ("admin", "--sidecar-admin-port"),
        ] {
            let error = port(&["--sidecar-admin-port", value]).expect_err(value);
            assert!(error.contains(needle), "{value}: {error}");
        }
        let error = parse(&["--sidecar-arg=--admin=0.0.0.0:9000"]).expect_err("managed");
        assert!(error.contains("--sidecar-admin-port"), "{error}");
    }

    #[test]
    fn sidecar_proxy_threads_come_from_the_flag_or_the_cpu_limit() {
        let threads = |argv: &[&str]| parse(argv).map(|c| c.inject.proxy_threads);
        assert_eq!(threads(&[]), Ok(2));
        assert_eq!(threads(&["--sidecar-cpu-limit", "500m"]), Ok(1));
        assert_eq!(threads(&["--sidecar-cpu-limit", "2500m"]), Ok(3));
        assert_eq!(threads(&["--sidecar-cpu-limit", "4"]), Ok(4));
        assert_eq!(threads(&["--sidecar-cpu-limit", "500"]), Ok(64));
        assert_eq!(threads(&["--sidecar-cpu-limit", "4", "--sidecar-proxy-threads", "1"]), Ok(1));
        assert_eq!(threads(&["--sidecar-proxy-threads", "0"]), Ok(0));
        assert_eq!(threads(&["--sidecar-proxy-threads", "64"]), Ok(64));
        for (argv, needle) in [
            (&["--sidecar-proxy-threads", "65"][..], "--sidecar-proxy-threads"),
            (&["--sidecar-proxy-threads", "-1"][..], "-1"),
            (&["--sidecar-cpu-limit", "1Gi"][..], "--sidecar-cpu-limit"),
            (&["--sidecar-arg=--proxy-threads=8"][..], "--sidecar-proxy-threads"),
            (&["--sidecar-arg=--hash-key-file=/k"][..], "use --sidecar-hash-key-secret"),
            (&["--sidecar-cpu-limit", "2Mi"][..], "\"2Mi\" is not a CPU quantity"),
        ] {
            let error = threads(argv).expect_err(&format!("{argv:?} must fail"));
            assert!(error.contains(needle), "{argv:?}: {error}");
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (argv, flag) in [
            (vec!["--namespaces", "Shop_1"], "--namespaces"),
            (vec!["--sidecar-memory-limit", "lots"], "--sidecar-memory-limit"),
            (vec!["--lease-duration", "5s", "--lease-grace", "5s"], "--lease-duration"),
            (vec!["--lease-duration", "5d"], "unit"),
            (vec!["--sidecar-collector", "collector:8080"], "--sidecar-collector"),
            (vec!["--tls-cert-file", "/x"], "--tls-key-file"),
            (vec!["--sidecar-image-pull-policy", "Sometimes"], "Sometimes"),
            (vec!["--sync-sidecar-secrets"], "--sync-sidecar-secrets"),
        ] {
            let error = parse(&argv).expect_err(&format!("{argv:?} must fail"));
            assert!(error.contains(flag), "{argv:?}: {error}");
        }
    }
}
