//! The exact RBAC the operator needs, as data: the rules of its ClusterRole and of its Role in
//! its own namespace, and the extra rules it needs only when it generates its webhook
//! certificate itself (no `--tls-cert-file`). `docs/operator.md` documents them; the chart
//! (which always hands the operator certificate files) grants the base rules,
//! `e2e/manifests/rbac.yaml` (generated certificates) both; tests keep them equal.

use k8s_openapi::api::rbac::v1::PolicyRule;

/// One rule: API group, resources, verbs and why.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// API group (`""` = core).
    pub api_group: &'static str,
    /// Resources (with subresources as `resource/sub`).
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// What the operator does with it.
    pub why: &'static str,
    /// Which objects: any, or only the sidecar Secrets (`resourceNames`).
    pub names: Names,
}

/// The objects a [`Rule`] grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    /// Every object of the resources.
    Any,
    /// Only the sidecar Secrets the operator copies (`--sidecar-collector-token-secret`,
    /// `--sidecar-hash-key-secret`): the rule's `resourceNames`.
    SidecarSecrets,
}

/// Cluster-wide rules (a ClusterRole bound to the operator's ServiceAccount).
pub const CLUSTER_RULES: &[Rule] = &[
    Rule {
        api_group: "custos.dev",
        resources: &["dataaccesspolicies"],
        verbs: &["get", "list", "watch", "patch", "update"],
        why: "watch policies; add and remove the custos.dev/cleanup finalizer",
        names: Names::Any,
    },
    Rule {
        api_group: "custos.dev",
        resources: &["dataaccesspolicies/status"],
        verbs: &["get", "patch", "update"],
        why: "write status: observedGeneration, conditions, selectedPods, configHash",
        names: Names::Any,
    },
    Rule {
        api_group: "custos.dev",
        resources: &["dataaccesspolicies/finalizers"],
        verbs: &["update"],
        why: "set blockOwnerDeletion on owner references to policies",
        names: Names::Any,
    },
    Rule {
        api_group: "",
        resources: &["configmaps"],
        verbs: &["get", "list", "watch", "create", "patch", "update", "delete"],
        why: "the custos-config ConfigMap of each namespace (server-side apply)",
        names: Names::Any,
    },
    Rule {
        api_group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: &["get", "list", "watch", "create", "patch", "update", "delete"],
        why: "one NetworkPolicy per policy; read the others to detect sidecar bypasses",
        names: Names::Any,
    },
    Rule {
        api_group: "",
        resources: &["pods"],
        verbs: &["get", "list", "watch"],
        why: "selected pod counts and the workload identity table (pod IP -> identity)",
        names: Names::Any,
    },
    Rule {
        api_group: "",
        resources: &["services"],
        verbs: &["get", "list", "watch"],
        why: "how a mesh reads the sidecars' proxy port (Service port protocols, Linkerd's opaque-ports)",
        names: Names::Any,
    },
    Rule {
        api_group: "",
        resources: &["namespaces"],
        verbs: &["get", "list", "watch"],
        why: "namespaces labelled custos.dev/injection=enabled (injection webhook)",
        names: Names::Any,
    },
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
        why: "Events on policies (compile errors, bypasses, config changes)",
        names: Names::Any,
    },
];

/// Cluster-wide rules needed only with a generated webhook certificate.
pub const GENERATED_CERT_CLUSTER_RULES: &[Rule] = &[Rule {
    api_group: "admissionregistration.k8s.io",
    resources: &["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
    verbs: &["get", "patch"],
    why: "patch the generated CA into the webhook configurations",
    names: Names::Any,
}];

/// Cluster-wide rules needed only with `--sync-sidecar-secrets`: the originals are read in the
/// operator's namespace and the copies written in the namespaces with policies, which can be
/// any namespace.
/// Reading, applying and deleting are limited to the sidecar Secrets' names; creating cannot
/// be limited by name in Kubernetes RBAC (server-side apply creates the copies).
pub const SECRET_SYNC_CLUSTER_RULES: &[Rule] = &[
    Rule {
        api_group: "",
        resources: &["secrets"],
        verbs: &["create"],
        why: "create the copies of the sidecar Secrets (collector token, hash key) in namespaces with policies (--sync-sidecar-secrets; a create cannot be limited by name)",
        names: Names::Any,
    },
    Rule {
        api_group: "",
        resources: &["secrets"],
        verbs: &["get", "patch", "delete"],
        why: "read the originals, apply and delete the copies: only Secrets of the sidecar Secrets' names, in any namespace (--sync-sidecar-secrets)",
        names: Names::SidecarSecrets,
    },
];

/// Rules in the operator's own namespace needed only when copying the sidecar Secrets: a
/// metadata watch on the originals, so that rotations reach the copies at once.
pub const SECRET_SYNC_NAMESPACE_RULES: &[Rule] = &[Rule {
    api_group: "",
    resources: &["secrets"],
    verbs: &["list", "watch"],
    why: "notice rotations of the original sidecar Secrets at once (metadata watch, --sync-sidecar-secrets)",
    names: Names::Any,
}];

/// Rules in the operator's own namespace (a Role).
pub const NAMESPACE_RULES: &[Rule] = &[Rule {
    api_group: "coordination.k8s.io",
    resources: &["leases"],
    verbs: &["get", "list", "watch", "create", "patch", "update"],
    why: "leader election on the custos-operator Lease",
    names: Names::Any,
}];

/// Rules in the operator's namespace needed only with a generated webhook certificate.
pub const GENERATED_CERT_NAMESPACE_RULES: &[Rule] = &[Rule {
    api_group: "",
    resources: &["secrets"],
    verbs: &["get", "create", "update"],
    why: "the generated webhook CA and certificate, shared by the replicas (Secret custos-operator-webhook-tls)",
    names: Names::Any,
}];

/// The rules as k8s-openapi PolicyRules, `sidecar_secrets` the names of the sidecar Secrets
/// (for [`Names::SidecarSecrets`]).
pub fn policy_rules(rules: &[Rule], sidecar_secrets: &[String]) -> Vec<PolicyRule> {
    rules
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.api_group.to_string()]),
            resources: Some(r.resources.iter().map(|s| s.to_string()).collect()),
            verbs: r.verbs.iter().map(|s| s.to_string()).collect(),
            resource_names: (r.names == Names::SidecarSecrets).then(|| sidecar_secrets.to_vec()),
            ..PolicyRule::default()
        })
        .collect()
}

/// The rules as a Markdown table (for docs/operator.md).
pub fn markdown_table(rules: &[Rule]) -> String {
    let mut out = String::from("| API group | resources | verbs | why |\n|---|---|---|---|\n");
    for r in rules {
        let group = if r.api_group.is_empty() { "\"\" (core)" } else { r.api_group };
        let names = match r.names {
            Names::Any => "",
            Names::SidecarSecrets => " (resourceNames: the sidecar Secrets)",
        };
        out.push_str(&format!(
            "| {group} | {}{names} | {} | {} |\n",
            r.resources.join(", "),
            r.verbs.join(", "),
            r.why
        ));
    }
    out
}
