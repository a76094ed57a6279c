//! The policy compiler: a `DataAccessPolicySpec` to a [`CompiledPolicy`] the decision engine
//! runs, reporting every problem with its field path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use custos_api::policy::{
    AccessRule, Action, DataAccessPolicySpec, ExceedAction, Limits, Mode, UserIdentity,
};
use custos_transform::expr::{Expr, Scope};
use custos_transform::{ClassMask, PhasedPlan, Plan};
use serde_json_path::JsonPath;

use crate::error::{FieldErrors, Path};
use crate::glob::PathGlob;
use crate::selector::{Selector, check_label_key, check_label_value, is_dns_label};

/// User attributes every policy has, besides the ones it maps from claims.
const BUILTIN_USER_FIELDS: &[&str] = &["id", "authenticated"];
/// Fields of the `workload` CEL variable.
const WORKLOAD_FIELDS: &[&str] = &["namespace", "serviceAccount", "labels"];
/// Fields of the `request` CEL variable.
const REQUEST_FIELDS: &[&str] = &["method", "path", "params", "hour", "weekday", "time"];

/// A policy ready for decisions.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// Enforce, Audit or Disabled.
    pub mode: Mode,
    /// What applies when no allow rule matches.
    pub default_action: Action,
    /// Whether untransformable responses pass unmasked.
    pub fail_open: bool,
    /// The protected pods.
    pub selector: Selector,
    /// The app's port.
    pub app_port: u16,
    /// The sidecar's port.
    pub proxy_port: u16,
    /// End-user identity settings.
    pub identity: Option<UserIdentity>,
    /// Deny rules, in spec order.
    pub deny_rules: Vec<CompiledRule>,
    /// Allow rules, in spec order.
    pub allow_rules: Vec<CompiledRule>,
    /// Data class name -> JSONPath sources, as written (for display; the plans hold the
    /// parsed paths).
    pub data_classes: BTreeMap<String, Vec<String>>,
    /// `spec.audit.recordId` as written.
    pub record_id_source: Option<String>,
    /// The response plan of the default action when it is Allow (no transform, but record
    /// ids still hashed).
    pub default_plan: Arc<Plan>,
    /// Whether some Allow rule rewrites responses (records, row filter, masks): then what the
    /// app answers under this policy depends on the caller, and no response of it may be kept
    /// by a shared cache, not even an untransformed one (a CDN would serve an unrestricted
    /// caller's page to a restricted one).
    pub transforms_responses: bool,
    /// Whether Allow rules also see the path as an app routing without regard to ASCII case
    /// reads it (`spec.workload.routing.caseInsensitive`, default true).
    pub routes_case_insensitively: bool,
    /// Whether Allow rules also see the path without a format suffix
    /// (`spec.workload.routing.formatSuffixes`, default true).
    pub routes_format_suffixes: bool,
}

/// One rule, with its matchers compiled.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    /// Rule name.
    pub name: String,
    /// Position in `spec.rules`.
    pub index: usize,
    /// Allow or Deny.
    pub action: Action,
    /// Upper-cased methods; empty means any.
    pub methods: Vec<String>,
    /// Path globs; empty means any.
    pub paths: Vec<PathGlob>,
    /// Allow rules: `paths` comparing literals without regard to ASCII case, which the
    /// variants of a request's path are matched with (an app may route `/Customers/42` or
    /// `/customers/42.json` to the handler of `/customers/{id}`: the rule's constraints are
    /// not escaped by spelling the path so). Empty for Deny rules, whose `paths` fold already.
    pub variant_paths: Vec<PathGlob>,
    /// Whether a literal of `paths` has a character that folding case changes (a capital, or
    /// `ſ`: folding can change its matches of a path without capitals too).
    pub upper_literals: bool,
    /// When every glob of `paths` starts with a literal segment: those literals. A request
    /// whose first segment is none of them cannot match the rule, which is then passed over
    /// before anything else is compared.
    pub first_segments: Option<Vec<Box<str>>>,
    /// Calling workloads; empty means any caller.
    pub workloads: Vec<WorkloadMatcher>,
    /// Required user attributes: attribute and accepted values.
    pub users: Vec<(String, Vec<String>)>,
    /// Whether a verified user is required (true) or forbidden (false).
    pub authenticated: Option<bool>,
    /// Extra CEL condition.
    pub when: Option<Expr>,
    /// What an allowed response goes through.
    pub plan: Arc<Plan>,
    /// `plan` in the parts it applies in when other policies' plans apply with it.
    pub phased: PhasedPlan,
    /// `records` as written (for display).
    pub records_source: Option<String>,
    /// Per-principal limits.
    pub limits: Option<Limits>,
}

/// A compiled `from.workloads[]` entry.
#[derive(Clone, Debug)]
pub struct WorkloadMatcher {
    /// Required namespace.
    pub namespace: String,
    /// Required service account, if any.
    pub service_account: Option<String>,
    /// Required pod labels.
    pub labels: Selector,
}

/// Most user attributes a policy maps (an audit event carries them; the collector takes at
/// most 256).
pub const MAX_ATTRIBUTES: usize = 64;
/// Most data classes a policy declares (an audit event counts masks by class, for every policy
/// that applies: the collector takes at most this many for each of 65 policies).
pub const MAX_DATA_CLASSES: usize = 64;

/// The longest policy name: a Kubernetes label value (the policy's NetworkPolicy carries the
/// name in `custos.dev/policy`), shorter than the 253 characters of object names.
pub const MAX_POLICY_NAME_LEN: usize = 63;

/// Compiles one policy of `namespace`. Every problem is reported, each with its field path.
pub fn compile_policy(
    namespace: &str,
    name: &str,
    spec: &DataAccessPolicySpec,
) -> Result<CompiledPolicy, FieldErrors> {
    let mut errors = FieldErrors::default();
    let spec_path = Path::root("spec");

    if name.is_empty() {
        errors.push("metadata.name", "must not be empty");
    } else if name.len() > MAX_POLICY_NAME_LEN {
        errors.push(
            "metadata.name",
            format!(
                "must be at most {MAX_POLICY_NAME_LEN} characters, got {}: the name is the value of the \
                 label `custos.dev/policy` on the policy's NetworkPolicy",
                name.len()
            ),
        );
    }

    // Workload and ports.
    let wl = spec_path.field("workload");
    let selector = Selector::compile(&spec.workload.selector, &wl.field("selector"), &mut errors);
    if spec.workload.app_port == 0 {
        errors.push(wl.field("appPort").as_str(), "must be between 1 and 65535");
    }
    if spec.workload.proxy_port == Some(0) {
        errors.push(wl.field("proxyPort").as_str(), "must be between 1 and 65535");
    }
    let proxy_port = spec.workload.proxy_port();
    if proxy_port == spec.workload.app_port {
        errors.push(
            wl.field("proxyPort").as_str(),
            format!("must differ from appPort ({})", spec.workload.app_port),
        );
    }

    // Identity: the user attributes rules may use.
    let mut user_fields: BTreeSet<String> = BUILTIN_USER_FIELDS.iter().map(|s| s.to_string()).collect();
    let identity = spec.identity.as_ref().and_then(|i| i.users.clone());
    if let Some(users) = &identity {
        let up = spec_path.field("identity").field("users");
        check_identity(users, &up, &mut errors);
        for attr in users.attributes.keys() {
            user_fields.insert(attr.clone());
        }
    }

    // Data classes.
    if spec.data_classes.len() > MAX_DATA_CLASSES {
        errors.push(
            spec_path.field("dataClasses").as_str(),
            format!("at most {MAX_DATA_CLASSES} data classes, got {}", spec.data_classes.len()),
        );
    }
    let mut classes: BTreeMap<&str, Vec<JsonPath>> = BTreeMap::new();
    for (i, class) in spec.data_classes.iter().enumerate() {
        let cp = spec_path.field("dataClasses").index(i);
        if !is_identifier(&class.name) {
            errors.push(
                cp.field("name").as_str(),
                "must be a name of letters, digits, '_' or '-', starting with a letter",
            );
        }
        if classes.contains_key(class.name.as_str()) {
            errors.push(cp.field("name").as_str(), format!("duplicate data class '{}'", class.name));
        }
        if class.paths.is_empty() {
            errors.push(cp.field("paths").as_str(), "must list at least one JSONPath");
        }
        let mut paths = Vec::new();
        for (j, p) in class.paths.iter().enumerate() {
            if let Some(jp) = parse_json_path(p, &cp.field("paths").index(j), &mut errors) {
                paths.push(jp);
            }
        }
        classes.insert(class.name.as_str(), paths);
    }

    let record_id = spec
        .audit
        .as_ref()
        .and_then(|a| a.record_id.as_deref())
        .and_then(|p| parse_json_path(p, &spec_path.field("audit").field("recordId"), &mut errors));

    // Rules.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut deny_rules = Vec::new();
    let mut allow_rules = Vec::new();
    let ctx = RuleContext {
        namespace,
        identity: identity.as_ref(),
        user_fields: &user_fields,
        classes: &classes,
        record_id: record_id.as_ref(),
    };
    for (i, rule) in spec.rules.iter().enumerate() {
        let rp = spec_path.field("rules").index(i);
        if let Some(first) = names.insert(rule.name.as_str(), i) {
            errors.push(
                rp.field("name").as_str(),
                format!("duplicate rule name '{}' (also spec.rules[{first}])", rule.name),
            );
        }
        let compiled = compile_rule(rule, i, &rp, &ctx, &mut errors);
        match rule.action {
            Action::Deny => deny_rules.push(compiled),
            Action::Allow => allow_rules.push(compiled),
        }
    }
    check_shadowed_allows(spec, &mut errors);

    if let Some(np) = &spec.network_policy {
        crate::netpol::check(np, &spec_path.field("networkPolicy"), &mut errors);
    }

    if !errors.is_empty() {
        errors.0.sort();
        errors.0.dedup();
        return Err(errors);
    }
    Ok(CompiledPolicy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        mode: spec.mode,
        default_action: spec.default_action,
        fail_open: spec.fail_open,
        selector,
        app_port: spec.workload.app_port,
        proxy_port,
        identity,
        transforms_responses: allow_rules.iter().any(|r| r.plan.needs_body()),
        routes_case_insensitively: spec
            .workload
            .routing
            .as_ref()
            .and_then(|r| r.case_insensitive)
            .unwrap_or(true),
        routes_format_suffixes: spec
            .workload
            .routing
            .as_ref()
            .and_then(|r| r.format_suffixes)
            .unwrap_or(true),
        deny_rules,
        allow_rules,
        data_classes: spec.data_classes.iter().map(|c| (c.name.clone(), c.paths.clone())).collect(),
        record_id_source: spec.audit.as_ref().and_then(|a| a.record_id.clone()),
        default_plan: Arc::new(Plan::default()),
    })
}

struct RuleContext<'a> {
    namespace: &'a str,
    identity: Option<&'a UserIdentity>,
    user_fields: &'a BTreeSet<String>,
    classes: &'a BTreeMap<&'a str, Vec<JsonPath>>,
    record_id: Option<&'a JsonPath>,
}

fn compile_rule(
    rule: &AccessRule,
    index: usize,
    rp: &Path,
    ctx: &RuleContext<'_>,
    errors: &mut FieldErrors,
) -> CompiledRule {
    if rule.name.is_empty() || rule.name.len() > 63 || !rule.name.split('.').all(is_dns_label) {
        errors.push(
            rp.field("name").as_str(),
            "must be a lowercase DNS name of at most 63 characters (letters, digits, '-')",
        );
    }

    // from
    let mut workloads = Vec::new();
    let mut users = Vec::new();
    let mut authenticated = None;
    if let Some(from) = &rule.from {
        let fp = rp.field("from");
        for (j, w) in from.workloads.iter().enumerate() {
            let wp = fp.field("workloads").index(j);
            let ns = w.namespace.clone().unwrap_or_else(|| ctx.namespace.to_string());
            if !is_dns_label(&ns) {
                errors.push(wp.field("namespace").as_str(), "must be a valid namespace name");
            }
            if let Some(sa) = &w.service_account
                && (sa.is_empty() || sa.len() > 253 || !sa.split('.').all(is_dns_label))
            {
                errors.push(wp.field("serviceAccount").as_str(), "must be a valid service account name");
            }
            for (k, v) in &w.labels {
                let lp = wp.field("labels").key(k);
                check_label_key(k, &lp, errors);
                check_label_value(v, &lp, errors);
            }
            workloads.push(WorkloadMatcher {
                namespace: ns,
                service_account: w.service_account.clone(),
                labels: Selector::from_labels(&w.labels),
            });
        }
        for (attr, values) in &from.users {
            let up = fp.field("users").key(attr);
            if ctx.identity.is_none() {
                errors.push(up.as_str(), "user attributes need spec.identity.users");
            } else if attr != "id" && !ctx.user_fields.contains(attr) {
                errors.push(
                    up.as_str(),
                    format!("unknown user attribute '{attr}' ({})", declared(ctx.user_fields)),
                );
            }
            if values.is_empty() {
                errors.push(up.as_str(), "must list at least one accepted value");
            }
            users.push((attr.clone(), values.clone()));
        }
        if let Some(a) = from.authenticated {
            if a && ctx.identity.is_none() {
                errors.push(fp.field("authenticated").as_str(), "needs spec.identity.users to verify tokens");
            }
            authenticated = Some(a);
        }
    }

    // to
    let mut methods = Vec::new();
    let mut paths = Vec::new();
    if let Some(to) = &rule.to {
        let tp = rp.field("to");
        for (j, m) in to.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) || m.len() > 32 {
                errors.push(
                    tp.field("methods").index(j).as_str(),
                    "must be an HTTP method such as GET or POST",
                );
            }
            let up = m.to_ascii_uppercase();
            if !methods.contains(&up) {
                methods.push(up);
            }
        }
        // A rule about GET is about HEAD too: every framework runs the GET handler for a HEAD
        // (and the response's headers describe the GET's body).
        if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
            methods.push("HEAD".to_owned());
        }
        for (j, p) in to.paths.iter().enumerate() {
            match PathGlob::parse(p) {
                Ok(g) if rule.action == Action::Deny => paths.push(g.folding_case()),
                Ok(g) => paths.push(g),
                Err(e) => errors.push(tp.field("paths").index(j).as_str(), e.to_string()),
            }
        }
    }

    // when
    let when = rule
        .when
        .as_deref()
        .and_then(|src| compile_expr(src, Scope::When, &rp.field("when"), ctx.user_fields, errors));

    // Allow-only parts.
    let is_deny = rule.action == Action::Deny;
    for (set, field) in [
        (rule.records.is_some(), "records"),
        (rule.row_filter.is_some(), "rowFilter"),
        (!rule.mask.is_empty(), "mask"),
        (rule.limits.is_some(), "limits"),
    ] {
        if is_deny && set {
            errors.push(rp.field(field).as_str(), "applies only to Allow rules");
        }
    }
    let records = rule.records.as_deref().and_then(|p| parse_json_path(p, &rp.field("records"), errors));
    let row_filter = rule.row_filter.as_deref().and_then(|src| {
        let p = rp.field("rowFilter");
        if rule.records.is_none() {
            errors.push(p.as_str(), "needs records: the JSONPath of the records it filters");
        }
        compile_expr(src, Scope::RowFilter, &p, ctx.user_fields, errors)
    });
    let mut masks = Vec::new();
    for (class, strategy) in &rule.mask {
        match ctx.classes.get(class.as_str()) {
            Some(paths) => {
                masks.push(ClassMask { class: class.clone(), paths: paths.clone(), strategy: *strategy })
            }
            None => {
                let known: Vec<&str> = ctx.classes.keys().copied().collect();
                let hint = if known.is_empty() {
                    "no data classes are declared in spec.dataClasses".to_string()
                } else {
                    format!("declared: {}", known.join(", "))
                };
                errors.push(
                    rp.field("mask").key(class).as_str(),
                    format!("unknown data class '{class}' ({hint})"),
                );
            }
        }
    }
    if let Some(limits) = &rule.limits {
        let lp = rp.field("limits");
        for (v, field) in [
            (limits.requests_per_minute.map(u64::from), "requestsPerMinute"),
            (limits.records_per_hour, "recordsPerHour"),
            (limits.records_per_day, "recordsPerDay"),
            (limits.max_records_per_response, "maxRecordsPerResponse"),
        ] {
            if v == Some(0) {
                errors.push(
                    lp.field(field).as_str(),
                    "must be at least 1 (use a Deny rule to refuse everything)",
                );
            }
            if v.is_some() && field != "requestsPerMinute" && rule.records.is_none() {
                errors.push(lp.field(field).as_str(), "counts records: set the rule's records JSONPath");
            }
        }
        if let (Some(h), Some(d)) = (limits.records_per_hour, limits.records_per_day)
            && h > d
        {
            errors.push(lp.field("recordsPerHour").as_str(), format!("is larger than recordsPerDay ({d})"));
        }
    }
    let limits = rule.limits.clone();
    let plan = Plan {
        records,
        row_filter,
        masks,
        max_records: limits.as_ref().and_then(|l| l.max_records_per_response),
        on_exceed: limits.as_ref().and_then(|l| l.on_exceed).unwrap_or(ExceedAction::Truncate),
        record_id: if rule.records.is_some() { ctx.record_id.cloned() } else { None },
        cache: Default::default(),
    };

    // Allow rules also match the variants of a path (engine `allow_variant`) with their
    // literals folded; Deny rules' own globs fold already.
    let variant_paths = if rule.action == Action::Allow {
        paths.iter().map(|g| g.clone().folding_case()).collect()
    } else {
        Vec::new()
    };
    let first_segments = if paths.is_empty() {
        None
    } else {
        paths.iter().map(|g| g.first_literal().map(Box::from)).collect()
    };
    CompiledRule {
        name: rule.name.clone(),
        index,
        action: rule.action,
        methods,
        first_segments,
        upper_literals: paths.iter().any(|g| has_upper_literal(g.as_str())),
        paths,
        variant_paths,
        workloads,
        users,
        authenticated,
        when,
        phased: PhasedPlan::of(&plan),
        plan: Arc::new(plan),
        records_source: rule.records.clone(),
        limits,
    }
}

/// Whether the glob text `pattern` has, outside its `{name}` captures, a character that
/// folding case changes ([`crate::glob::fold_char`]).
fn has_upper_literal(pattern: &str) -> bool {
    let mut in_capture = false;
    pattern.chars().any(|c| {
        in_capture = (in_capture || c == '{') && c != '}';
        !in_capture && crate::glob::fold_char(c) != c
    })
}

/// Whether `key` is a Secret data key as Kubernetes accepts them, and so a plain file name in
/// the Secret's mounted volume (never a path leading out of it).
fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The largest clock skew `jwt.leewaySeconds` may allow.
const MAX_LEEWAY_SECONDS: u32 = 300;

fn check_identity(users: &UserIdentity, up: &Path, errors: &mut FieldErrors) {
    let jp = up.field("jwt");
    if users.jwt.issuer.trim().is_empty() {
        errors.push(jp.field("issuer").as_str(), "must not be empty");
    }
    if users.jwt.audiences.iter().all(|a| a.trim().is_empty()) {
        errors.push(
            jp.field("audiences").as_str(),
            "must list at least one audience: tokens are accepted only when they carry one of them",
        );
    }
    match (&users.jwt.jwks_secret_ref, &users.jwt.jwks_uri) {
        (Some(_), Some(_)) | (None, None) => {
            errors.push(jp.as_str(), "set exactly one of jwksSecretRef or jwksUri")
        }
        (Some(r), None) if !r.name.split('.').all(is_dns_label) => {
            errors.push(jp.field("jwksSecretRef").field("name").as_str(), "must be a valid Secret name")
        }
        (Some(r), None) if r.key.as_deref().is_some_and(|k| !is_secret_key(k)) => errors.push(
            jp.field("jwksSecretRef").field("key").as_str(),
            "must be a Secret data key (letters, digits, '-', '_' and '.', not '.' or '..', at most 253 characters)",
        ),
        (None, Some(uri)) if !(uri.starts_with("https://") || is_loopback_http(uri)) => errors
            .push(jp.field("jwksUri").as_str(), "must be an https:// URL (plain http only for localhost)"),
        _ => {}
    }
    if users.jwt.leeway_seconds.is_some_and(|l| l > MAX_LEEWAY_SECONDS) {
        errors.push(
            jp.field("leewaySeconds").as_str(),
            format!(
                "at most {MAX_LEEWAY_SECONDS} seconds: a larger skew would accept tokens long expired or not yet valid"
            ),
        );
    }
    if users.attributes.len() > MAX_ATTRIBUTES {
        errors.push(
            up.field("attributes").as_str(),
            format!("at most {MAX_ATTRIBUTES} attributes, got {}", users.attributes.len()),
        );
    }
    for (attr, claim) in &users.attributes {
        let ap = up.field("attributes").key(attr);
        if !is_identifier(attr) || attr.contains('-') {
            errors.push(ap.as_str(), "attribute names must be identifiers (letters, digits, '_')");
        }
        if BUILTIN_USER_FIELDS.contains(&attr.as_str()) {
            errors.push(ap.as_str(), format!("'{attr}' is built in and cannot be mapped"));
        }
        if claim.is_empty() {
            errors.push(ap.as_str(), "claim name must not be empty");
        }
    }
}

fn is_loopback_http(uri: &str) -> bool {
    ["http://localhost", "http://127.0.0.1", "http://[::1]"]
        .iter()
        .any(|p| uri.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/'])))
}

fn compile_expr(
    src: &str,
    scope: Scope,
    path: &Path,
    user_fields: &BTreeSet<String>,
    errors: &mut FieldErrors,
) -> Option<Expr> {
    let expr = match Expr::compile(src, scope) {
        Ok(e) => e,
        Err(e) => {
            errors.push(path.as_str(), e.to_string());
            return None;
        }
    };
    let mut ok = true;
    for field in expr.fields_of("user") {
        if !user_fields.contains(&field) {
            errors.push(
                path.as_str(),
                format!("unknown user attribute 'user.{field}' ({})", declared(user_fields)),
            );
            ok = false;
        }
    }
    for (var, known) in [("workload", WORKLOAD_FIELDS), ("request", REQUEST_FIELDS)] {
        for field in expr.fields_of(var) {
            if !known.contains(&field.as_str()) {
                errors.push(
                    path.as_str(),
                    format!("unknown field '{var}.{field}' (known: {})", known.join(", ")),
                );
                ok = false;
            }
        }
    }
    ok.then_some(expr)
}

fn declared(fields: &BTreeSet<String>) -> String {
    let list: Vec<&str> = fields.iter().map(String::as_str).collect();
    format!("declared: {}", list.join(", "))
}

fn parse_json_path(src: &str, path: &Path, errors: &mut FieldErrors) -> Option<JsonPath> {
    match JsonPath::parse(src) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(
                path.as_str(),
                format!("invalid JSONPath at position {}: {}", e.position(), e.message()),
            );
            None
        }
    }
}

/// An Allow rule whose source and target equal a Deny rule's (and neither has `when`) can
/// never apply: that is a conflict, not a policy.
fn check_shadowed_allows(spec: &DataAccessPolicySpec, errors: &mut FieldErrors) {
    for (i, allow) in spec.rules.iter().enumerate() {
        if allow.action != Action::Allow || allow.when.is_some() {
            continue;
        }
        let shadow =
            spec.rules.iter().find(|d| d.action == Action::Deny && d.when.is_none() && covers(d, allow));
        if let Some(deny) = shadow {
            errors.push(
                format!("spec.rules[{i}]"),
                format!("conflicts with Deny rule '{}': it matches every request this Allow rule matches, so this rule can never apply", deny.name),
            );
        }
    }
}

/// True when Deny rule `d` matches at least every request Allow rule `a` matches, judged
/// structurally: `d`'s source is absent or equal, and its target is absent, or lists every
/// method and path `a` lists (or has none).
fn covers(d: &AccessRule, a: &AccessRule) -> bool {
    let from_covers = match (&d.from, &a.from) {
        (None, _) => true,
        (Some(df), Some(af)) => df == af,
        (Some(df), None) => *df == Default::default(),
    };
    let to_covers = match (&d.to, &a.to) {
        (None, _) => true,
        (Some(dt), Some(at)) => {
            let methods = dt.methods.is_empty()
                || (!at.methods.is_empty()
                    && at.methods.iter().all(|m| dt.methods.iter().any(|x| x.eq_ignore_ascii_case(m))));
            let paths = dt.paths.is_empty()
                || dt.paths.iter().any(|p| p == "/**")
                || (!at.paths.is_empty() && at.paths.iter().all(|p| dt.paths.contains(p)));
            methods && paths
        }
        (Some(dt), None) => {
            dt.methods.is_empty() && (dt.paths.is_empty() || dt.paths.iter().any(|p| p == "/**"))
        }
    };
    from_covers && to_covers
}

/// Class names: a letter, then letters, digits, `_` or `-`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 63
}
