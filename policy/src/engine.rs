//! The decision engine: pure and synchronous. Given the compiled policies of a pod and a
//! normalised request, it decides Allow, Deny or WouldDeny, names the rule and the reason,
//! and hands out the response plan.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use custos_api::Decision;
use custos_api::config::WorkloadIdentity;
use custos_api::policy::{Action, ExceedAction, Limits, Mode};
use custos_transform::expr::{RequestVars, UserVars, Vars, WorkloadVars};
use custos_transform::{Phase, Plan};

use crate::compile::{CompiledPolicy, CompiledRule};
use crate::normalize::NormalizedPath;

/// A verified end user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// The user id claim.
    pub id: String,
    /// Attributes mapped from claims.
    pub attributes: BTreeMap<String, String>,
}

/// One request, as the engine sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// HTTP method as received (compared case-insensitively).
    pub method: &'a str,
    /// The normalised path.
    pub path: &'a NormalizedPath,
    /// The calling workload, when the peer is in the identity table.
    pub caller: Option<&'a WorkloadIdentity>,
    /// The verified end user, when a token was presented and verified.
    pub user: Option<&'a User>,
    /// Request time, seconds since the Unix epoch (UTC).
    pub time: i64,
}

impl Request<'_> {
    /// The CEL variables of this request (`request`, `user`, `workload`), with the path
    /// parameters a rule captured. Row filters and `when` conditions evaluate against them.
    pub fn vars(&self, params: &[(String, String)]) -> Vars {
        let request = RequestVars {
            method: self.method.to_ascii_uppercase(),
            path: self.path.as_str().to_string(),
            params: params.iter().cloned().collect(),
            time: self.time,
        };
        let user = self.user.map(|u| UserVars { id: u.id.clone(), attributes: u.attributes.clone() });
        let workload = self.caller.map(WorkloadVars::of);
        Vars::new(&request, user.as_ref(), workload.as_ref())
    }
}

/// Why the engine decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No policy selects this pod: traffic passes untouched.
    NoPolicy,
    /// A Deny rule matched.
    DenyRule,
    /// An Allow rule matched.
    AllowRule,
    /// No Allow rule matched and the default action is Deny.
    DefaultDeny,
    /// No Allow rule matched and the default action is Allow.
    DefaultAllow,
    /// The path as an app routing without regard to ASCII case or format suffixes would read
    /// it (`/Customers/search`, `/customers/search.json`) matches an earlier Allow rule than
    /// the path as sent does: which handler the app runs, and so which rule's constraints
    /// belong to the response, cannot be told; refused (see [`allow_variant`]).
    AmbiguousRoute,
}

impl Reason {
    /// A stable snake_case code for metrics and audit grouping.
    pub fn code(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no_policy",
            Reason::DenyRule => "deny_rule",
            Reason::AllowRule => "allow_rule",
            Reason::DefaultDeny => "default_deny",
            Reason::DefaultAllow => "default_allow",
            Reason::AmbiguousRoute => "ambiguous_route",
        }
    }
}

/// The engine's answer for one request.
#[derive(Clone, Debug)]
pub struct Verdict<'e> {
    /// Allow, Deny, or WouldDeny (Audit mode).
    pub decision: Decision,
    /// The mode of the deciding policy; in Audit mode the sidecar must leave traffic
    /// untouched and only record what it would have done.
    pub mode: Mode,
    /// The deciding policy.
    pub policy: Option<&'e CompiledPolicy>,
    /// The deciding rule; none when a default action or no policy decided.
    pub rule: Option<&'e CompiledRule>,
    /// Why.
    pub reason: Reason,
    /// What an allowed response goes through (to apply in Enforce mode, to dry-run in Audit).
    pub plan: Option<&'e Arc<Plan>>,
    /// Per-principal limits of the rule.
    pub limits: Option<&'e Limits>,
    /// Path segments captured by the rule's `{name}` globs.
    pub params: Vec<(String, String)>,
    /// The other enforced Allows that constrain the response (records, row filter, masks, or
    /// limits), when this verdict is one too: their plans and limits apply as well as this
    /// one's, so that a second policy selecting the same pods cannot lift the first one's
    /// masks or row filter. In policy name order; empty otherwise (and always empty in the
    /// verdicts it holds).
    pub also: Vec<Verdict<'e>>,
    /// The verdicts of the Audit-mode policies that did not decide (outranked by this one):
    /// what each would have decided, recorded beside this verdict so that a dry run of a
    /// policy stays visible on pods another policy enforces on. In policy name order; empty
    /// in the verdicts it holds. Audit-mode policies are evaluated after the enforcing ones,
    /// and not at all after an enforced Deny: a request an enforcing policy refuses has no
    /// dry runs.
    pub dry_runs: Vec<Verdict<'e>>,
}

impl<'e> Verdict<'e> {
    /// The reason as a sentence with no personal data: names of rules and policies only.
    pub fn explanation(&self) -> String {
        let policy = self.policy.map(|p| p.name.as_str()).unwrap_or("-");
        let rule = self.rule.map(|r| r.name.as_str()).unwrap_or("-");
        let audit = if self.mode == Mode::Audit { " (Audit mode: not enforced)" } else { "" };
        match self.reason {
            Reason::NoPolicy => "no policy selects this pod".to_string(),
            Reason::DenyRule => format!("denied by rule '{rule}' of policy '{policy}'{audit}"),
            Reason::AllowRule => format!("allowed by rule '{rule}' of policy '{policy}'"),
            Reason::DefaultDeny => {
                format!("no allow rule of policy '{policy}' matched; default action Deny{audit}")
            }
            Reason::DefaultAllow => {
                format!("no allow rule of policy '{policy}' matched; default action Allow")
            }
            Reason::AmbiguousRoute => format!(
                "the path, read without regard to case or without its format suffix, matches rule '{rule}' of policy '{policy}' before the rule the path itself matches: ambiguous{audit}"
            ),
        }
    }

    /// True when the request must not reach the app.
    pub fn blocks(&self) -> bool {
        self.decision == Decision::Deny
    }

    /// Whether an enforced refusal is really "who are you?": no allow rule matched
    /// (`DefaultDeny`, not an explicit Deny rule), the deciding policy verifies users, and the
    /// request carried no Bearer token (`has_bearer` false). The sidecar answers such a
    /// request 401 `missing_token` instead of 403, so that a client that forgot its token is
    /// told so.
    pub fn wants_token(&self, has_bearer: bool) -> bool {
        self.blocks()
            && self.mode == Mode::Enforce
            && self.reason == Reason::DefaultDeny
            && !has_bearer
            && self.policy.is_some_and(|p| p.identity.is_some())
    }

    /// This verdict and those in [`Verdict::also`], in the order their plans apply to the
    /// response within each phase: the others first (in policy name order), this one last.
    pub fn in_application_order(&self) -> Vec<&Verdict<'e>> {
        self.also.iter().chain(std::iter::once(self)).collect()
    }

    /// The plans to apply to an allowed response, in order, each with the verdict it is
    /// part of: this verdict's own plan when it applies alone (no [`Verdict::also`]); with
    /// others, every rule's row filter, then every rule's record cap (those that refuse a
    /// response over their cap first, so that each judges the records the filters kept), then
    /// every rule's record id hashing, then every rule's masks
    /// ([`custos_transform::PhasedPlan`]), in [`Verdict::in_application_order`] within each
    /// phase. So no row filter reads a value another policy masked, ids are hashed as the app
    /// sent them for the records returned, and masks are counted on those records.
    /// The phase is `None` for a whole plan.
    pub fn plan_steps(&self) -> Vec<(&Verdict<'e>, &'e Arc<Plan>, Option<Phase>)> {
        if self.also.is_empty() {
            return self.plan.map(|p| (self, p, None)).into_iter().collect();
        }
        let order = self.in_application_order();
        let mut steps = Vec::new();
        for phase in Phase::ALL {
            let first = steps.len();
            for v in &order {
                if let Some(part) = v.rule.and_then(|r| r.phased.part(phase)) {
                    steps.push((*v, part, Some(phase)));
                }
            }
            if phase == Phase::Cap {
                // Stable: the order above holds among the refusing caps and among the others.
                steps[first..].sort_by_key(|(_, part, _)| {
                    !(part.on_exceed == ExceedAction::Deny && part.max_records.is_some())
                });
            }
        }
        steps
    }
}

/// The policies that apply to one pod, ready for decisions.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    policies: Vec<CompiledPolicy>,
}

impl Engine {
    /// An engine over `policies` (Disabled ones are dropped).
    pub fn new(policies: Vec<CompiledPolicy>) -> Self {
        let mut policies: Vec<_> = policies.into_iter().filter(|p| p.mode != Mode::Disabled).collect();
        // Enforcing policies first, so their verdicts take precedence over dry runs.
        policies.sort_by_key(|p| (p.mode != Mode::Enforce, p.name.clone()));
        Engine { policies }
    }

    /// The engine restricted to the policies whose workload selector matches `labels`.
    pub fn for_pod(&self, labels: &BTreeMap<String, String>) -> Engine {
        Engine { policies: self.policies.iter().filter(|p| p.selector.matches(labels)).cloned().collect() }
    }

    /// The policies this engine applies.
    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    /// Decides one request. Within a policy, Deny rules beat Allow rules and the first
    /// matching Allow rule gives the plan; no Allow means the default action. Across
    /// policies that select the same pod, an enforced Deny wins, then an enforced Allow that
    /// constrains the response (a plan that reads the body: records, row filter, masks; or
    /// quotas), then any other enforced Allow, then Audit-mode verdicts. So a broad policy
    /// that allows everything (health checks, say) does not take the masks and row filter of
    /// another that selects the same pods. Of several constraining Allows the first by name
    /// decides (it names the policy and rule) and the others are in [`Verdict::also`]: every
    /// one of them applies.
    pub fn decide<'e>(&'e self, req: &Request<'_>) -> Verdict<'e> {
        self.decide_as(req, |_| req.user)
    }

    /// [`Engine::decide`], where each policy sees the user its own identity settings
    /// verified: `user_of(i)` is the user of the `i`-th of [`Engine::policies`] (`req.user`
    /// is not read). A token one policy's issuer signed must not satisfy the rules of a
    /// policy that trusts another issuer or audience (RFC 8725 §2.8).
    pub fn decide_as<'e, 'u>(
        &'e self,
        req: &Request<'u>,
        user_of: impl Fn(usize) -> Option<&'u User>,
    ) -> Verdict<'e> {
        let mut vars: Option<CachedVars> = None;
        // The best verdict so far, with its rank (lower wins).
        let mut best: Option<(u8, Verdict<'e>)> = None;
        let mut also: Vec<Verdict<'e>> = Vec::new();
        let mut dry_runs: Vec<Verdict<'e>> = Vec::new();
        let mut last_user: Option<&User> = None;
        for (i, policy) in self.policies.iter().enumerate() {
            let user = user_of(i);
            if !same_user(user, last_user) {
                // The CEL variables hold the user.
                vars = None;
                last_user = user;
            }
            let v = decide_policy(policy, &Request { user, ..*req }, &mut vars);
            let rank = match (v.mode, v.decision) {
                (Mode::Enforce, Decision::Deny) => 0,
                (Mode::Enforce, _) if v.plan.is_some_and(|p| p.needs_body()) || v.limits.is_some() => {
                    CONSTRAINING
                }
                (Mode::Enforce, _) => 2,
                (_, Decision::WouldDeny) => 3,
                _ => 4,
            };
            match &best {
                Some((best_rank, _)) if rank >= *best_rank => {
                    if rank == CONSTRAINING && *best_rank == CONSTRAINING {
                        also.push(v);
                    } else if v.mode == Mode::Audit {
                        dry_runs.push(v);
                    }
                }
                _ => {
                    if rank != CONSTRAINING {
                        // Constraining Allows outranked (by a Deny) or not yet seen.
                        also.clear();
                    }
                    if let Some((_, outranked)) = best.replace((rank, v))
                        && outranked.mode == Mode::Audit
                    {
                        dry_runs.push(outranked);
                    }
                    if rank == 0 {
                        break;
                    }
                }
            }
        }
        let mut best = best.map(|(_, v)| v);
        if let Some(b) = &mut best {
            b.also = also;
            if dry_runs.len() > 1 {
                // An outranked verdict was pushed after those seen later than it.
                dry_runs.sort_by(|a, b| a.policy.map(|p| &p.name).cmp(&b.policy.map(|p| &p.name)));
            }
            b.dry_runs = dry_runs;
        }
        best.unwrap_or(Verdict {
            decision: Decision::Allow,
            mode: Mode::Disabled,
            policy: None,
            rule: None,
            reason: Reason::NoPolicy,
            plan: None,
            limits: None,
            params: Vec::new(),
            also: Vec::new(),
            dry_runs: Vec::new(),
        })
    }
}

/// The rank, among the verdicts of several policies, of an enforced Allow that constrains the
/// response.
const CONSTRAINING: u8 = 1;

/// The same user, or both none.
fn same_user(a: Option<&User>, b: Option<&User>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn decide_policy<'e>(
    policy: &'e CompiledPolicy,
    req: &Request<'_>,
    vars: &mut Option<CachedVars>,
) -> Verdict<'e> {
    let denied = if policy.mode == Mode::Audit { Decision::WouldDeny } else { Decision::Deny };
    let verdict = |decision, rule: Option<&'e CompiledRule>, reason, params| Verdict {
        decision,
        mode: policy.mode,
        policy: Some(policy),
        rule,
        reason,
        plan: rule.filter(|r| r.action == Action::Allow).map(|r| &r.plan),
        limits: rule.and_then(|r| r.limits.as_ref()),
        params,
        also: Vec::new(),
        dry_runs: Vec::new(),
    };
    // Rules whose paths all start with other literal segments are passed over here, without
    // the call: most rules of a policy are about other paths.
    let first = req.path.segment(0);
    for rule in &policy.deny_rules {
        if may_match_first(rule, first, Some(req.path.is_ascii()))
            && let Some(params) = rule_matches(rule, req, vars)
        {
            return verdict(denied, Some(rule), Reason::DenyRule, params);
        }
    }
    // Deny rules also see the path without a format suffix on its last segment (see
    // [`suffix_stems`]), with their captures and conditions.
    if !policy.deny_rules.is_empty() {
        for stem in suffix_stems(req.path) {
            let stem_req = Request { path: &stem, ..*req };
            let mut stem_vars = None;
            for rule in &policy.deny_rules {
                if may_match_first(rule, stem.segment(0), Some(stem.is_ascii()))
                    && let Some(params) = rule_matches(rule, &stem_req, &mut stem_vars)
                {
                    return verdict(denied, Some(rule), Reason::DenyRule, params);
                }
            }
        }
    }
    let exact = policy.allow_rules.iter().enumerate().find_map(|(i, rule)| {
        if !may_match_first(rule, first, None) {
            return None;
        }
        rule_matches(rule, req, vars).map(|params| (i, params))
    });
    // What the path's variants match among the Allow rules before the one the path matched
    // (all of them when none did and the default action lets the request through).
    let before = match &exact {
        Some((i, _)) => *i,
        None if policy.default_action == Action::Allow => policy.allow_rules.len(),
        None => 0,
    };
    let variants = (policy.routes_case_insensitively, policy.routes_format_suffixes);
    if let Some((rule, params)) = allow_variant(&policy.allow_rules[..before], variants, req, vars) {
        if exact.is_none() {
            // The default would have passed it unconstrained: the rule's constraints apply.
            return verdict(Decision::Allow, Some(rule), Reason::AllowRule, params);
        }
        let mut v = verdict(denied, Some(rule), Reason::AmbiguousRoute, params);
        (v.plan, v.limits) = (None, None);
        return v;
    }
    if let Some((i, params)) = exact {
        return verdict(Decision::Allow, policy.allow_rules.get(i), Reason::AllowRule, params);
    }
    match policy.default_action {
        Action::Deny => verdict(denied, None, Reason::DefaultDeny, Vec::new()),
        Action::Allow => {
            let mut v = verdict(Decision::Allow, None, Reason::DefaultAllow, Vec::new());
            v.plan = Some(&policy.default_plan);
            v
        }
    }
}

/// The path without a format suffix on its last segment, as frameworks route it to the
/// handler of the path without: Rails (`(.:format)` on every route: `/customers/export.json`
/// is `/customers/export`), Spring's suffix pattern matching (`export.*`: also `export.` and
/// `export.tar.gz`). Up to two paths: without the last `.` and what follows, and without the
/// first; none when the last segment has no `.` with something before it. A Deny rule refuses
/// the request when it matches one of them: matching more can only refuse more.
fn suffix_stems(path: &NormalizedPath) -> Vec<NormalizedPath> {
    let Some(last) = path.segment_count().checked_sub(1).and_then(|i| path.segment(i)) else {
        return Vec::new();
    };
    if !last.contains('.') {
        return Vec::new();
    }
    let full = path.as_str();
    let prefix = &full[..full.len() - last.len()];
    let mut stems: Vec<NormalizedPath> = Vec::with_capacity(2);
    let mut seen: Vec<&str> = Vec::with_capacity(2);
    for cut in [last.rfind('.'), last.find('.')].into_iter().flatten() {
        let stem = &last[..cut];
        if stem.is_empty() || seen.contains(&stem) {
            continue;
        }
        seen.push(stem);
        let mut target = format!("{prefix}{stem}");
        if let Some(query) = path.query() {
            target.push('?');
            target.push_str(query);
        }
        // A stem such as `.` is resolved or refused by the normaliser like any path.
        if let Ok(p) = crate::normalize::normalize(&target) {
            stems.push(p);
        }
    }
    stems
}

/// The first of `rules` (Allow rules, in order) that a variant of the request's path
/// matches, as an app that routes without regard to ASCII case (Express, ASP.NET Core) or
/// that drops a format suffix (Rails, Spring) would read the path: the path with every
/// rule's literals compared without regard to case, then its [`suffix_stems`] likewise; with
/// its captures. Rules of any path are passed over (a variant changes nothing for them).
///
/// A variant can only add constraints: the engine asks only of the rules before the one the
/// path itself matched, or of all when none did and the default action would let the request
/// through unconstrained ([`Reason::AmbiguousRoute`] when one rule was matched already).
///
/// `(fold, stems)`: which variants the app's routing makes (`spec.workload.routing`).
fn allow_variant<'e>(
    rules: &'e [CompiledRule],
    (fold, stems): (bool, bool),
    req: &Request<'_>,
    vars: &mut Option<CachedVars>,
) -> Option<(&'e CompiledRule, Vec<(String, String)>)> {
    if rules.is_empty() || !(fold || stems) {
        return None;
    }
    // Folding case changes a match only where the path or the rule's literals have capitals
    // (the rules before the matching one failed as sent); only a last segment with a `.` has
    // stems. Most requests have neither: nothing more is compared.
    // (A path with any character beyond ASCII is taken as having capitals: `ſ`, `É`.)
    let upper_path = fold && req.path.as_str().bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii());
    let folds = fold && (upper_path || rules.iter().any(|r| r.upper_literals));
    let suffixed = stems && req.path.as_str().rsplit('/').next().is_some_and(|last| last.contains('.'));
    if !folds && !suffixed {
        return None;
    }
    let first = req.path.segment(0);
    // `rule` matched against `req`, its literals without regard to case when `fold`.
    fn variant<'e>(
        rule: &'e CompiledRule,
        req: &Request<'_>,
        first: Option<&str>,
        fold: bool,
        vars: &mut Option<CachedVars>,
    ) -> Option<(&'e CompiledRule, Vec<(String, String)>)> {
        // Folded, the rule's first literals are not compared here: its variant globs compare
        // them folded first thing.
        if rule.paths.is_empty() || (!fold && !may_match_first(rule, first, None)) {
            return None;
        }
        let globs = if fold { &rule.variant_paths } else { &rule.paths };
        rule_matches_in(rule, globs, req, vars).map(|params| (rule, params))
    }
    if folds
        && let Some(found) = rules
            .iter()
            .filter(|rule| upper_path || rule.upper_literals)
            .find_map(|rule| variant(rule, req, first, true, vars))
    {
        return Some(found);
    }
    for stem in if suffixed { suffix_stems(req.path) } else { Vec::new() } {
        let stem_req = Request { path: &stem, ..*req };
        let (first, mut stem_vars) = (stem.segment(0), None);
        if let Some(found) =
            rules.iter().find_map(|rule| variant(rule, &stem_req, first, fold, &mut stem_vars))
        {
            return Some(found);
        }
    }
    None
}

/// Whether a request whose path starts with the segment `first` may match `rule` (see
/// [`CompiledRule::first_segments`]). `folded`: the rule's literals are folded (Deny rules)
/// and compared without regard to case, with whether the path is ASCII.
#[inline(always)]
fn may_match_first(rule: &CompiledRule, first: Option<&str>, folded: Option<bool>) -> bool {
    let (Some(firsts), Some(first)) = (rule.first_segments.as_ref(), first) else {
        return rule.first_segments.is_none();
    };
    // The kind of comparison is chosen once, not per literal: most rules are passed over here.
    match folded {
        None => firsts.iter().any(|f| **f == *first),
        Some(true) => firsts.iter().any(|f| f.eq_ignore_ascii_case(first)),
        Some(false) => firsts.iter().any(|f| crate::glob::folded_eq(f, first, false)),
    }
}

/// Returns the captured path parameters when `rule` matches `req` (whose first path segment
/// [`may_match_first`] the rule).
fn rule_matches(
    rule: &CompiledRule,
    req: &Request<'_>,
    vars: &mut Option<CachedVars>,
) -> Option<Vec<(String, String)>> {
    rule_matches_in(rule, &rule.paths, req, vars)
}

/// [`rule_matches`] with `paths` in place of the rule's own (its
/// [`CompiledRule::variant_paths`]).
fn rule_matches_in(
    rule: &CompiledRule,
    paths: &[crate::glob::PathGlob],
    req: &Request<'_>,
    vars: &mut Option<CachedVars>,
) -> Option<Vec<(String, String)>> {
    if !rule.methods.is_empty() && !rule.methods.iter().any(|m| m.eq_ignore_ascii_case(req.method)) {
        return None;
    }
    let glob = if paths.is_empty() { None } else { Some(paths.iter().find(|g| g.matches(req.path))?) };
    match rule.authenticated {
        Some(true) if req.user.is_none() => return None,
        Some(false) if req.user.is_some() => return None,
        _ => {}
    }
    if !rule.users.is_empty() {
        let user = req.user?;
        for (attr, values) in &rule.users {
            let have = if attr == "id" { Some(&user.id) } else { user.attributes.get(attr) };
            if !have.is_some_and(|v| values.contains(v)) {
                return None;
            }
        }
    }
    if !rule.workloads.is_empty() {
        let caller = req.caller?;
        let ok = rule.workloads.iter().any(|w| {
            w.namespace == caller.namespace
                && w.service_account.as_ref().is_none_or(|sa| *sa == caller.service_account)
                // A caller known by its certificate has no known labels: an Allow entry that
                // names some does not admit it, a Deny entry refuses it (fail closed).
                && (w.labels.matches(&caller.labels) || (caller.labels_unknown && rule.action == Action::Deny))
        });
        if !ok {
            return None;
        }
    }
    let params = glob.and_then(|g| g.captures(req.path)).unwrap_or_default();
    if let Some(when) = &rule.when {
        // Variables are built once per request, and again only for rules capturing other params.
        if vars.as_ref().is_none_or(|(p, _)| *p != params) {
            *vars = Some((params.clone(), req.vars(&params)));
        }
        let (_, vars) = vars.as_ref()?;
        // A `when` that fails to evaluate does not match: for a Deny rule that would let the
        // request through, so failures of Deny conditions count as matches (fail closed).
        match when.eval_bool(vars) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) if rule.action == Action::Deny => {}
            Err(_) => return None,
        }
    }
    Some(params)
}

/// CEL variables of a request, with the path parameters they were built with.
type CachedVars = (Vec<(String, String)>, Vars);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::normalize;

    fn stems(target: &str) -> Vec<String> {
        let path = normalize(target).expect("valid");
        suffix_stems(&path)
            .iter()
            .map(|p| match p.query() {
                Some(q) => format!("{}?{q}", p.as_str()),
                None => p.as_str().to_owned(),
            })
            .collect()
    }

    #[test]
    fn suffix_stems_of_the_last_segment() {
        let none: [&str; 0] = [];
        for (target, want) in [
            ("/customers/export.json", vec!["/customers/export"]),
            ("/customers/export.tar.gz", vec!["/customers/export.tar", "/customers/export"]),
            ("/customers/export.", vec!["/customers/export"]),
            ("/customers/export.json?x=1", vec!["/customers/export?x=1"]),
            ("/export.csv", vec!["/export"]),
            ("/caf%C3%A9/r%C3%A9sum%C3%A9.pdf", vec!["/café/résumé"]),
            ("/a%20b/c%20d.json", vec!["/a b/c d"]),
            ("/discount/50%25.json", vec!["/discount/50%25"]),
            ("/a/..json", vec!["/a"]),
        ] {
            assert_eq!(stems(target), want, "{target}");
        }
        for target in ["/customers/export", "/customers/.json", "/", "/a.b/c", "/..."] {
            assert_eq!(stems(target), none, "{target}");
        }
    }
}
