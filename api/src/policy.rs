//! The `DataAccessPolicy` custom resource (`custos.dev/v1alpha1`).
//!
//! Every doc comment on a field below becomes its `kubectl explain` text.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Default port the Custos sidecar listens on inside a protected pod.
pub const DEFAULT_PROXY_PORT: u16 = 15080;

/// A DataAccessPolicy protects one workload that holds personal data: who may call it, which
/// rows and fields each caller may see, and how much they may take.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "custos.dev",
    version = "v1alpha1",
    kind = "DataAccessPolicy",
    plural = "dataaccesspolicies",
    shortname = "dap",
    category = "custos",
    namespaced,
    doc = "A DataAccessPolicy protects one workload that holds personal data: who may call it, which rows and fields each caller may see, and how much they may take.",
    status = "DataAccessPolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.ruleCount"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.selectedPods"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("(has(self.workload.proxyPort) ? self.workload.proxyPort : 15080) != self.workload.appPort").message("workload.proxyPort (default 15080) must differ from workload.appPort"))]
pub struct DataAccessPolicySpec {
    /// The pods this policy protects and the ports of their app and of the Custos sidecar.
    pub workload: WorkloadSpec,

    /// Enforce (default) applies decisions; Audit computes and records them (would-deny,
    /// would-mask) without touching traffic; Disabled turns the policy off.
    #[serde(default)]
    pub mode: Mode,

    /// What happens to a request that no Allow rule matches. Deny (default) or Allow.
    #[serde(default = "default_action_deny")]
    pub default_action: Action,

    /// When true, a response that cannot be transformed (not JSON, too large) is passed
    /// through unmasked instead of failing closed with 502. A partial response (206) fails
    /// closed regardless, and a response the sidecar's buffers have no room for gets 503
    /// regardless (load, which a client can cause), and so does a response under a rule with
    /// record limits (its records could not be counted or capped). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_open: bool,

    /// How callers are identified: end users from JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,

    /// Named classes of personal data and where they appear in JSON responses. Rules mask
    /// fields by class name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = 64))]
    pub data_classes: Vec<DataClass>,

    /// Ordered access rules. Deny rules win over Allow rules; the first matching Allow rule
    /// decides the response plan.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<AccessRule>,

    /// The NetworkPolicy the operator derives from this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,

    /// What the sidecar records in audit events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
}

fn default_action_deny() -> Action {
    Action::Deny
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The protected pods and their ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Label selector of the protected pods in the policy's namespace. Several policies may
    /// select the same pods (they must then agree on appPort and proxyPort): a Deny of any of
    /// them refuses, and every one whose Allow rule constrains the response (records, row
    /// filter, masks, limits) applies to it.
    pub selector: LabelSelector,

    /// The port the application listens on. The sidecar forwards to 127.0.0.1:appPort and
    /// the NetworkPolicy closes this port to other pods.
    #[schemars(range(min = 1))]
    pub app_port: u16,

    /// The port the Custos sidecar listens on (default 15080). It must differ from the
    /// sidecars' admin port (the operator's `--sidecar-admin-port`, default 15081): a pod
    /// selected by a policy using that port gets no sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub proxy_port: Option<u16>,

    /// How the app routes request paths to its handlers. An app may route another spelling
    /// of a path to an Allow rule's handler (Express without regard to case, Rails past a
    /// format suffix); the rule's constraints then apply to it too, and a spelling that an
    /// earlier Allow rule matches is refused (403 ambiguous_route). Turn off what the app
    /// does not do. Deny rules match every spelling whatever is set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,
}

/// How the protected app routes paths (`spec.workload.routing`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingSpec {
    /// Whether the app may route a path without regard to case (Express, ASP.NET Core by
    /// default). Default true; false for an app that routes case-sensitively (Go,
    /// Django, Rails, Spring): Allow rules then see only the path as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_insensitive: Option<bool>,

    /// Whether the app may route a path past a format suffix on its last segment
    /// (`/customers/search.json` to the handler of `/customers/search`: Rails, Spring with
    /// suffix matching). Default true; false for an app that does not (Go, Django, Express),
    /// where `/reports/summary.pdf` is its own resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_suffixes: Option<bool>,
}

impl WorkloadSpec {
    /// The sidecar port, defaulted.
    pub fn proxy_port(&self) -> u16 {
        self.proxy_port.unwrap_or(DEFAULT_PROXY_PORT)
    }
}

/// Whether a policy's decisions are applied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Mode {
    /// Decisions are applied: denied requests get 403, masks and limits are enforced.
    #[default]
    Enforce,
    /// Dry run: decisions are computed and recorded (WouldDeny, would-mask) but traffic is
    /// forwarded and returned untouched.
    Audit,
    /// The policy is ignored.
    Disabled,
}

/// The action of a rule or the default action of a policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Action {
    /// Let the request through (subject to the rule's row filter, masks and limits).
    Allow,
    /// Refuse the request with 403.
    Deny,
}

/// How callers are identified.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySpec {
    /// End users, from a verified JWT in the Authorization header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<UserIdentity>,
}

/// End-user identity from JWT bearer tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserIdentity {
    /// How tokens are verified.
    pub jwt: JwtSpec,

    /// User attributes taken from token claims: attribute name -> claim name. Rules match on
    /// attributes (`from.users`) and CEL sees them as `user.<attribute>`. A string, number or
    /// boolean claim (or an array of one) maps to its text; a claim with several values or an
    /// object refuses the token (401 invalid_claim); a missing one leaves the attribute absent.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 64))]
    pub attributes: BTreeMap<String, String>,

    /// The claim that holds the user id (default `sub`). Recorded in audit events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_claim: Option<String>,
}

/// JWT verification settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.jwksSecretRef) != has(self.jwksUri)").message("set exactly one of jwksSecretRef or jwksUri"))]
pub struct JwtSpec {
    /// Expected `iss` claim.
    pub issuer: String,

    /// Accepted `aud` values; a token must carry at least one.
    #[serde(default)]
    pub audiences: Vec<String>,

    /// Secret in the policy's namespace holding the JWKS document (key `jwks.json` unless
    /// `key` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<SecretKeyRef>,

    /// HTTPS URL of the issuer's JWKS, fetched and cached by the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,

    /// Allowed clock skew for `exp` and `nbf`, in seconds (default 30, at most 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 300))]
    pub leeway_seconds: Option<u32>,
}

/// A reference to one key of a Secret in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret (default `jwks.json`): a Secret data key (letters, digits, `-`,
    /// `_` and `.`; not `.` or `..`), the name of the file the sidecar reads in the Secret's
    /// mounted volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

/// A named class of personal data and the JSON locations where it appears.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataClass {
    /// Class name used by `rules[].mask`, e.g. `phone`.
    pub name: String,
    /// RFC 9535 JSONPath expressions into response bodies, e.g. `$.items[*].phone`.
    pub paths: Vec<String>,
}

/// One access rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.action == 'Allow' || (!has(self.rowFilter) && !has(self.mask) && !has(self.limits) && !has(self.records))").message("rowFilter, mask, limits and records apply only to Allow rules"))]
pub struct AccessRule {
    /// Unique name within the policy; recorded in audit events.
    pub name: String,

    /// Allow or Deny.
    pub action: Action,

    /// Who the rule applies to. Omitted: every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,

    /// Which requests the rule applies to. Omitted: every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Target>,

    /// Extra CEL condition over `request`, `user` and `workload`; the rule matches only when
    /// it evaluates to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,

    /// JSONPath selecting the records of a response, e.g. `$.items[*]` or `$` for a single
    /// record. Row filters, record caps and record quotas count these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<String>,

    /// CEL condition over `record`, `user`, `request` and `workload`; records for which it is
    /// not true are removed from the response. Requires `records`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_filter: Option<String>,

    /// Data class name -> masking strategy applied to responses of this rule.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mask: BTreeMap<String, MaskStrategy>,

    /// Rate and volume limits per principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// The callers a rule applies to. All given parts must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Calling workloads; the caller must match one. Omitted: any workload (or none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadRef>,

    /// Required user attributes: attribute -> accepted values. The user must carry every
    /// attribute named here with one of its values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, Vec<String>>,

    /// When true, the rule applies only to requests with a verified user token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
}

/// A calling workload, identified by the operator from its pod IP.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadRef {
    /// Namespace of the caller. Omitted: the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service account of the caller. Omitted: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Labels the calling pod must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The requests a rule applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    /// HTTP methods (case-insensitive). Omitted: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path globs matched against the normalised path: `*` matches one segment, `**` any
    /// number of segments, `{name}` one segment captured as `request.params.name`.
    /// Omitted: any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// How a masked value is rewritten.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema,
)]
pub enum MaskStrategy {
    /// Replaced by the string `[REDACTED]`.
    Redact,
    /// Replaced by a keyed, stable hash (HMAC-SHA256), so equal values still join.
    Hash,
    /// All but the last four characters replaced by `*`.
    ShowLast4,
    /// All but the first character replaced by `*`.
    ShowFirst1,
    /// Replaced by JSON null.
    Null,
    /// The field is removed.
    Remove,
}

/// The largest record count a limit may name: 2^53 - 1, the largest integer every JSON reader
/// keeps exactly. A bound in the CRD, so that the API server refuses a larger one instead of
/// storing an object the operator could not read.
pub const MAX_COUNT: u64 = 9_007_199_254_740_991;

/// Per-principal limits of a rule. A principal is the user id, else the calling workload,
/// else the peer address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub requests_per_minute: Option<u32>,
    /// Records returned per rolling hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub records_per_hour: Option<u64>,
    /// Records returned per rolling day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub records_per_day: Option<u64>,
    /// Maximum records in one response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub max_records_per_response: Option<u64>,
    /// What happens when a response holds more than maxRecordsPerResponse records:
    /// Truncate (default) or Deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exceed: Option<ExceedAction>,
}

/// What to do with a response over its record cap.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum ExceedAction {
    /// Keep the first maxRecordsPerResponse records.
    #[default]
    Truncate,
    /// Refuse the whole response.
    Deny,
}

/// The NetworkPolicy derived from this policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// Whether the operator manages a NetworkPolicy for this workload (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Egress of the protected pods: Allow (default, untouched) or DenyAll (only DNS and
    /// `egressAllow`).
    #[serde(default)]
    pub egress: EgressMode,
    /// Destinations allowed when egress is DenyAll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<EgressPeer>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true, egress: EgressMode::Allow, egress_allow: Vec::new() }
    }
}

fn default_true() -> bool {
    true
}

/// Egress mode of the protected pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum EgressMode {
    /// Egress is not restricted.
    #[default]
    Allow,
    /// All egress is denied except DNS and the `egressAllow` destinations.
    DenyAll,
}

/// An allowed egress destination.
// `namespace` is a reserved word in CEL: the apiserver escapes it as `__namespace__`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.cidr) != (has(self.__namespace__) || has(self.podLabels))").message("set either cidr, or namespace and/or podLabels"))]
pub struct EgressPeer {
    /// An IP block, e.g. `10.0.0.0/16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Destination namespace (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Destination pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Destination TCP ports. Omitted: all ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
}

/// Audit settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSpec {
    /// JSONPath, relative to one record, of its id (e.g. `$.id`). Keyed hashes of the ids
    /// returned go into audit events so that `custos audit subject` can answer who accessed a
    /// data subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataAccessPolicyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Compiled and NetworkPolicyApplied conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of rules in the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<i32>,
    /// Number of running pods the workload selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,
    /// Content hash of the compiled sidecar config this policy is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}
