//! The decision table: deny beats allow, default actions, Audit mode, method and path globs,
//! user attributes, workload identity and `when`.

mod support;

use custos_api::policy::{AccessRule, Action, Mode, Source, WorkloadRef};
use custos_api::{Decision, WorkloadIdentity};
use custos_policy::{Engine, Reason, Request, User, normalize};
use support::*;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    user: Option<&'static [(&'static str, &'static str)]>,
    caller: Option<(&'static str, &'static str)>,
    /// Hour of day (UTC) of the request.
    hour: i64,
    want: Decision,
    rule: Option<&'static str>,
}

const fn case(
    name: &'static str,
    method: &'static str,
    path: &'static str,
    want: Decision,
    rule: Option<&'static str>,
) -> Case {
    Case { name, method, path, user: None, caller: None, hour: 12, want, rule }
}

fn engine(mode: Mode, default_action: Action) -> Engine {
    let mut spec = mk_spec(vec![
        mk_deny("no-bulk-export", &[], &["/customers/export", "/customers/export/**"]),
        AccessRule {
            from: Some(Source {
                workloads: vec![WorkloadRef {
                    namespace: None,
                    service_account: Some("ops-portal".into()),
                    ..Default::default()
                }],
                users: [("role".to_string(), vec!["clerk".to_string()])].into(),
                authenticated: None,
            }),
            ..mk_allow("clerks-read", &["get"], &["/customers/{id}", "/parcels/**"])
        },
        AccessRule {
            from: Some(Source { authenticated: Some(true), ..Default::default() }),
            ..mk_allow("search", &["GET", "HEAD"], &["/search"])
        },
        AccessRule {
            when: Some("request.hour < 7 || request.hour >= 20".into()),
            ..mk_deny("off-hours-writes", &["POST", "PUT"], &["/**"])
        },
        mk_allow("health", &["GET"], &["/healthz"]),
        mk_allow("scans", &["POST"], &["/parcels/*/scans"]),
    ]);
    spec.mode = mode;
    spec.default_action = default_action;
    mk_engine(&spec)
}

fn run(engine: &Engine, c: &Case) -> (Decision, Option<String>, Reason) {
    let path = normalize(c.path).expect("test paths are valid");
    let user = c.user.map(|attrs| User { id: "u-1".into(), attributes: mk_labels(attrs) });
    let caller = c.caller.map(|(ns, sa)| mk_caller(ns, sa, &[("app", "ops-portal")]));
    let req = Request {
        method: c.method,
        path: &path,
        caller: caller.as_ref(),
        user: user.as_ref(),
        time: c.hour * 3600,
    };
    let v = engine.decide(&req);
    (v.decision, v.rule.map(|r| r.name.clone()), v.reason)
}

const CLERK: &[(&str, &str)] = &[("role", "clerk"), ("branch", "HB")];
const DRIVER: &[(&str, &str)] = &[("role", "driver"), ("branch", "HB")];

#[test]
fn decision_table_enforce() {
    use Decision::*;
    let clerk = |c: Case| Case { user: Some(CLERK), caller: Some(("logistics", "ops-portal")), ..c };
    let cases = [
        clerk(case("clerk reads a customer", "GET", "/customers/42", Allow, Some("clerks-read"))),
        clerk(case("method match is case-insensitive", "get", "/customers/42", Allow, Some("clerks-read"))),
        clerk(case("** matches any depth", "GET", "/parcels/7/events/3", Allow, Some("clerks-read"))),
        clerk(case("** matches zero segments", "GET", "/parcels", Allow, Some("clerks-read"))),
        clerk(case("{id} matches one segment only", "GET", "/customers/42/orders", Deny, None)),
        clerk(case("deny beats allow", "GET", "/customers/export", Deny, Some("no-bulk-export"))),
        clerk(case("deny under export/**", "GET", "/customers/export/all.csv", Deny, Some("no-bulk-export"))),
        clerk(case("wrong method, default deny", "DELETE", "/customers/42", Deny, None)),
        case("no user, no caller: default deny", "GET", "/customers/42", Deny, None),
        Case {
            user: Some(DRIVER),
            caller: Some(("logistics", "ops-portal")),
            ..case("wrong role", "GET", "/customers/42", Deny, None)
        },
        Case {
            user: Some(CLERK),
            caller: Some(("logistics", "billing")),
            ..case("wrong service account", "GET", "/customers/42", Deny, None)
        },
        Case {
            user: Some(CLERK),
            caller: Some(("storefront", "ops-portal")),
            ..case("wrong namespace", "GET", "/customers/42", Deny, None)
        },
        Case { user: Some(CLERK), caller: None, ..case("unknown peer", "GET", "/customers/42", Deny, None) },
        Case { user: Some(DRIVER), ..case("authenticated search", "GET", "/search", Allow, Some("search")) },
        case("anonymous search", "GET", "/search", Deny, None),
        case("health needs no identity", "GET", "/healthz", Allow, Some("health")),
        case("* is one segment", "POST", "/parcels/9/scans", Allow, Some("scans")),
        case("* is not two segments", "POST", "/parcels/9/8/scans", Deny, None),
        Case {
            hour: 22,
            ..case("when: off-hours write denied", "POST", "/parcels/9/scans", Deny, Some("off-hours-writes"))
        },
        Case {
            hour: 6,
            ..case("when: early write denied", "POST", "/parcels/9/scans", Deny, Some("off-hours-writes"))
        },
        Case {
            hour: 7,
            ..case("when: office hours write allowed", "POST", "/parcels/9/scans", Allow, Some("scans"))
        },
        case("unknown path", "GET", "/admin", Deny, None),
    ];
    let e = engine(Mode::Enforce, Action::Deny);
    for c in &cases {
        let (d, rule, _) = run(&e, c);
        assert_eq!((d, rule.as_deref()), (c.want, c.rule), "case {:?}", c.name);
    }
}

#[test]
fn default_allow_lets_unmatched_requests_through_but_deny_still_wins() {
    let e = engine(Mode::Enforce, Action::Allow);
    let (d, rule, reason) = run(&e, &case("", "GET", "/admin", Decision::Allow, None));
    assert_eq!((d, rule, reason), (Decision::Allow, None, Reason::DefaultAllow));
    let (d, rule, _) = run(&e, &case("", "GET", "/customers/export", Decision::Deny, None));
    assert_eq!((d, rule.as_deref()), (Decision::Deny, Some("no-bulk-export")));
}

#[test]
fn audit_mode_turns_denials_into_would_deny() {
    let e = engine(Mode::Audit, Action::Deny);
    let (d, rule, reason) = run(&e, &case("", "GET", "/customers/export", Decision::WouldDeny, None));
    assert_eq!((d, rule.as_deref(), reason), (Decision::WouldDeny, Some("no-bulk-export"), Reason::DenyRule));
    let (d, _, reason) = run(&e, &case("", "GET", "/admin", Decision::WouldDeny, None));
    assert_eq!((d, reason), (Decision::WouldDeny, Reason::DefaultDeny));
    let v = run(&e, &Case { user: Some(DRIVER), ..case("", "GET", "/search", Decision::Allow, None) });
    assert_eq!(v.0, Decision::Allow);
}

#[test]
fn disabled_policies_do_not_apply() {
    let e = engine(Mode::Disabled, Action::Deny);
    let (d, _, reason) = run(&e, &case("", "GET", "/customers/export", Decision::Allow, None));
    assert_eq!((d, reason), (Decision::Allow, Reason::NoPolicy));
}

#[test]
fn only_policies_selecting_the_pod_apply() {
    let e = engine(Mode::Enforce, Action::Deny);
    let other = e.for_pod(&mk_labels(&[("app", "billing")]));
    assert!(other.policies().is_empty());
    let (d, _, reason) = run(&other, &case("", "GET", "/customers/export", Decision::Allow, None));
    assert_eq!((d, reason), (Decision::Allow, Reason::NoPolicy));
    let same = e.for_pod(&mk_labels(&[("app", "customer-api"), ("pod-template-hash", "x")]));
    assert_eq!(same.policies().len(), 1);
}

#[test]
fn enforced_deny_wins_over_an_audit_policy_and_enforced_allow_over_audit_deny() {
    let mut enforce =
        mk_spec(vec![mk_allow("all-get", &["GET"], &["/**"]), mk_deny("no-export", &[], &["/export"])]);
    let mut audit = mk_spec(vec![mk_deny("audit-no-customers", &[], &["/customers/**"])]);
    audit.mode = Mode::Audit;
    enforce.mode = Mode::Enforce;
    let e = Engine::new(vec![mk_policy("b-audit", &audit), mk_policy("a-enforce", &enforce)]);
    let (d, rule, _) = run(&e, &case("", "GET", "/export", Decision::Deny, None));
    assert_eq!((d, rule.as_deref()), (Decision::Deny, Some("no-export")));
    let (d, rule, _) = run(&e, &case("", "GET", "/customers/1", Decision::Allow, None));
    assert_eq!((d, rule.as_deref()), (Decision::Allow, Some("all-get")));
}

/// Deny rules match literal text without regard to case: an app that routes so (Express,
/// ASP.NET Core) would serve `/Customers/EXPORT` from the denied handler. Allow rules stay
/// exact (matching more there would allow more).
/// A default-deny engine over `no-export` (Deny, `denied` globs) and `read` (Allow GET,
/// `allowed` globs), answering a GET of a path with its decision and rule.
fn export_rules(denied: &[&str], allowed: &[&str]) -> impl Fn(&str) -> (Decision, Option<String>) + use<> {
    let mut spec = mk_spec(vec![mk_deny("no-export", &[], denied), mk_allow("read", &["GET"], allowed)]);
    spec.default_action = Action::Deny;
    let e = mk_engine(&spec);
    move |p: &str| {
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        (v.decision, v.rule.map(|r| r.name.clone()))
    }
}

#[test]
fn deny_rules_ignore_letter_case_and_allow_rules_do_not() {
    let decide =
        export_rules(&["/customers/export", "/reports/*.CSV"], &["/customers/*", "/reports/*", "/Exact"]);
    for denied in
        ["/customers/export", "/Customers/EXPORT", "/CUSTOMERS/Export", "/reports/q1.csv", "/REPORTS/Q1.Csv"]
    {
        assert_eq!(decide(denied), (Decision::Deny, Some("no-export".into())), "{denied}");
    }
    assert_eq!(decide("/customers/42"), (Decision::Allow, Some("read".into())));
    assert_eq!(decide("/Exact"), (Decision::Allow, Some("read".into())));
    assert_eq!(decide("/exact").0, Decision::Deny, "allow rules stay case-sensitive");
    assert_eq!(decide("/reports/q1.txt"), (Decision::Allow, Some("read".into())));
}

/// Deny rules fold case as the apps that route without regard to it do, beyond ASCII too:
/// Java's `equalsIgnoreCase` and Spring's case-insensitive `PathPattern` take `ſ` (U+017F) for
/// `s`, `ı`/`İ` for `i` and the Kelvin sign for `k`; ASP.NET Core's `OrdinalIgnoreCase`
/// routing takes `CAFÉ` for `café`. Clients send these percent-encoded.
#[test]
fn deny_rules_fold_case_beyond_ascii() {
    let decide =
        export_rules(&["/customers/export", "/keys/*.csv", "/café/menu", "/\u{17F}ecrets"], &["/**"]);
    let cases: &[(&str, bool)] = &[
        // (request path, denied)
        ("/cu%C5%BFtomers/export", true),  // ſ
        ("/CU%C5%BFTOMERS/EXPORT", true),  // ſ among capitals
        ("/customers/%C4%B0xport", false), // İ is i, not e
        ("/customers/exporT", true),
        ("/%E2%84%AAeys/q1.csv", true), // Kelvin sign
        ("/keys/Q1.C%C5%BFV", true),    // ſ in a wildcard's literal part
        ("/caf%C3%A9/menu", true),
        ("/CAF%C3%89/MENU", true), // É
        ("/cafe/menu", false),     // no accent folding
        ("/secrets", true),        // the rule's own ſ folds
        ("/SECRETS", true),
        ("/customers/expor%C5%A7", false), // ŧ is not t
        ("/customers/exp%C3%B6rt", false),
    ];
    for &(target, denied) in cases {
        let want = if denied { Decision::Deny } else { Decision::Allow };
        assert_eq!(decide(target).0, want, "{target}");
    }
    // `İ` and `ı` both fold to `i`, and so to a literal's `I`.
    let decide = export_rules(&["/admin/IMPORT"], &["/**"]);
    for target in ["/adm%C4%B1n/import", "/ADM%C4%B0N/%C4%B0mport", "/admin/%C4%B1mport"] {
        assert_eq!(decide(target).0, Decision::Deny, "{target}");
    }
}

/// Deny rules look past a format suffix on the last segment: Rails routes
/// `/customers/export.json` (and Spring, with suffix matching, `/export.csv`) to the denied
/// handler. Allow rules do not.
#[test]
fn deny_rules_look_past_a_format_suffix_and_allow_rules_do_not() {
    let decide =
        export_rules(&["/customers/export", "/export"], &["/customers/*", "/export.json", "/status"]);
    for denied in ["/customers/export.json", "/customers/EXPORT.csv", "/export.json", "/Export.xml"] {
        assert_eq!(decide(denied), (Decision::Deny, Some("no-export".into())), "{denied}");
    }
    assert_eq!(decide("/customers/42.json"), (Decision::Allow, Some("read".into())));
    assert_eq!(decide("/customers/exports.json"), (Decision::Allow, Some("read".into())));
    assert_eq!(decide("/status.json").0, Decision::Deny, "allow rules name their suffixes");
    assert_eq!(decide("/status"), (Decision::Allow, Some("read".into())));
    // Spring's `export.*` also takes these.
    for denied in ["/customers/export.tar.gz", "/customers/export."] {
        assert_eq!(decide(denied), (Decision::Deny, Some("no-export".into())), "{denied}");
    }
}

/// Where Deny rules look past a format suffix: the last segment only, the last or the first
/// `.` of it.
#[test]
fn format_suffix_table_for_deny_rules() {
    let cases: &[(&str, &str, bool)] = &[
        // (Deny rule's glob, request path, denied)
        ("/customers/export", "/customers/export.json", true),
        ("/customers/export", "/Customers/EXPORT.CSV", true),
        ("/customers/export", "/customers/export.tar.gz", true),
        ("/customers/export", "/customers/export.", true),
        ("/customers/export", "/customers/.json", false),
        ("/customers/export", "/customers/exports.json", false),
        ("/customers/export", "/customers/export.json/x", false),
        ("/customers/export", "/customers.json/export", false),
        ("/customers.json/export", "/customers/export", false),
        ("/export", "/export.json", true),
        ("/export", "/EXPORT.xml", true),
        ("/**/export", "/a/b/export.csv", true),
        ("/reports/*.csv", "/reports/q1.csv.gz", true),
        ("/reports/*.csv", "/reports/q1.txt", false),
        ("/customers/*/export", "/customers/7.json/export", true),
    ];
    for &(glob, target, denied) in cases {
        let decide = export_rules(&[glob], &["/**"]);
        let want = if denied { Decision::Deny } else { Decision::Allow };
        assert_eq!(decide(target).0, want, "Deny {glob} vs {target}");
    }
}

/// Past a format suffix, a Deny rule's captures are the stem's, and so are its conditions':
/// `/customers/42.json` is customer 42 to Rails.
#[test]
fn a_deny_rules_captures_and_condition_see_the_path_without_its_suffix() {
    let mut spec = mk_spec(vec![
        AccessRule {
            when: Some("request.params.id == '42'".into()),
            ..mk_deny("vip", &[], &["/customers/{id}"])
        },
        mk_allow("read", &["GET"], &["/customers/*"]),
    ]);
    spec.default_action = Action::Deny;
    let e = mk_engine(&spec);
    let decide = |p: &str| {
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        (v.decision, v.rule.map(|r| r.name.clone()), v.params)
    };
    for target in ["/customers/42", "/customers/42.json", "/customers/42.xml.gz", "/customers/42."] {
        let (decision, rule, params) = decide(target);
        assert_eq!((decision, rule.as_deref()), (Decision::Deny, Some("vip")), "{target}");
        assert_eq!(params, vec![("id".to_owned(), "42".to_owned())], "{target}");
    }
    assert_eq!(decide("/customers/7.json").1.as_deref(), Some("read"));
}

/// A broad enforcing policy that allows everything (health checks, say) does not take the
/// response plan or the quotas of another that selects the same pods: an Allow that constrains
/// the response ranks first, whatever the names' order.
#[test]
fn an_allow_that_constrains_the_response_wins_over_a_plain_allow() {
    let mut open = mk_spec(vec![]);
    open.default_action = Action::Allow;
    let scoped = mk_spec(vec![AccessRule {
        records: Some("$.items[*]".into()),
        ..mk_allow("list", &["GET"], &["/customers"])
    }]);
    let limited = mk_spec(vec![AccessRule {
        limits: Some(custos_api::policy::Limits { requests_per_minute: Some(10), ..Default::default() }),
        ..mk_allow("limited", &["GET"], &["/customers"])
    }]);
    for (name, constraining) in [("z-scoped", &scoped), ("z-limited", &limited)] {
        let e = Engine::new(vec![mk_policy("a-api-health", &open), mk_policy(name, constraining)]);
        let path = normalize("/customers").expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        assert_eq!(v.decision, Decision::Allow);
        assert_eq!(v.policy.map(|p| p.name.as_str()), Some(name));
    }
    // Two plain Allows: the first by name, as before.
    let e = Engine::new(vec![mk_policy("b-open", &open), mk_policy("a-open", &open)]);
    let path = normalize("/customers").expect("valid");
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!(v.policy.map(|p| p.name.as_str()), Some("a-open"));
}

/// Several constraining Allows of policies that select the same pods all apply: the first by
/// name decides and the others come in `also`, each with its own rule, plan, limits and
/// captures. A plain Allow or an Audit-mode verdict is not among them, and an enforced Deny
/// in any policy still wins alone.
#[test]
fn every_constraining_allow_applies_not_only_the_first() {
    let mut masking = mk_spec(vec![AccessRule {
        records: Some("$.items[*]".into()),
        ..mk_allow("masked-list", &["GET"], &["/customers"])
    }]);
    let mut scoping = mk_spec(vec![AccessRule {
        records: Some("$".into()),
        row_filter: Some("record.branch == 'north'".into()),
        ..mk_allow("scoped", &["GET"], &["/{area}"])
    }]);
    let mut limited = mk_spec(vec![AccessRule {
        limits: Some(custos_api::policy::Limits { requests_per_minute: Some(10), ..Default::default() }),
        ..mk_allow("limited", &["GET"], &["/customers"])
    }]);
    // Elsewhere these two allow without constraints.
    masking.default_action = Action::Allow;
    limited.default_action = Action::Allow;
    let mut open = mk_spec(vec![]);
    open.default_action = Action::Allow;
    let mut audited = masking.clone();
    audited.mode = Mode::Audit;
    let e = Engine::new(vec![
        mk_policy("c-limited", &limited),
        mk_policy("a-open", &open),
        mk_policy("b-scoping", &scoping),
        mk_policy("d-masking", &masking),
        mk_policy("e-audited", &audited),
    ]);
    let path = normalize("/customers").expect("valid");
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!((v.decision, v.policy.map(|p| p.name.as_str())), (Decision::Allow, Some("b-scoping")));
    assert_eq!(v.params, vec![("area".to_owned(), "customers".to_owned())]);
    let also: Vec<_> = v
        .also
        .iter()
        .map(|a| (a.policy.map_or("-", |p| p.name.as_str()), a.rule.map_or("-", |r| r.name.as_str())))
        .collect();
    assert_eq!(also, [("c-limited", "limited"), ("d-masking", "masked-list")]);
    assert!(v.also[0].limits.is_some() && v.also[1].plan.is_some_and(|p| p.records.is_some()));
    assert!(v.also.iter().all(|a| a.mode == Mode::Enforce && a.also.is_empty()));
    // The plans apply the others' first, the deciding one's last, phase by phase: filters,
    // caps (refusing caps first), id hashing, masks.
    let order = |v: &custos_policy::Verdict<'_>| {
        v.in_application_order()
            .iter()
            .map(|a| a.policy.map_or("-", |p| p.name.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(order(&v), "c-limited,d-masking,b-scoping");
    let steps = |v: &custos_policy::Verdict<'_>| {
        v.plan_steps()
            .iter()
            .map(|(a, _, phase)| {
                format!(
                    "{}:{:?}",
                    a.policy.map_or("-", |p| p.name.as_str()),
                    phase.expect("several plans go in phases")
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(steps(&v), "b-scoping:Filter,d-masking:Cap,b-scoping:Cap");
    masking.audit = Some(custos_api::policy::AuditSpec { record_id: Some("$.id".into()) });
    scoping.rules[0].limits = Some(custos_api::policy::Limits {
        max_records_per_response: Some(5),
        on_exceed: Some(custos_api::policy::ExceedAction::Deny),
        ..Default::default()
    });
    let e = Engine::new(vec![
        mk_policy("b-scoping", &scoping),
        mk_policy("d-masking", &masking),
        mk_policy("c-limited", &limited),
    ]);
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!(steps(&v), "b-scoping:Filter,b-scoping:Cap,d-masking:Cap,d-masking:Hash");
    // One policy: its whole plan, in one step.
    let alone = Engine::new(vec![mk_policy("d-masking", &masking)]);
    let v = alone.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert!(matches!(v.plan_steps().as_slice(), [(_, _, None)]));

    // One constraining Allow: nothing else applies.
    let path = normalize("/parcels").expect("valid");
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!(v.policy.map(|p| p.name.as_str()), Some("b-scoping"));
    assert!(v.also.is_empty(), "{:?}", v.also.len());

    // An enforced Deny anywhere wins alone, after constraining Allows or before them.
    let deny = mk_spec(vec![mk_deny("no-lists", &["GET"], &["/customers"])]);
    for name in ["0-deny", "z-deny"] {
        let e = Engine::new(vec![
            mk_policy("b-scoping", &scoping),
            mk_policy("d-masking", &masking),
            mk_policy(name, &deny),
        ]);
        let path = normalize("/customers").expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        assert_eq!((v.decision, v.policy.map(|p| p.name.as_str())), (Decision::Deny, Some(name)));
        assert!(v.also.is_empty());
    }
}

#[test]
fn captured_params_reach_when_and_the_verdict() {
    let spec = mk_spec(vec![AccessRule {
        when: Some("request.params.id != '0'".into()),
        ..mk_allow("by-id", &["GET"], &["/customers/{id}"])
    }]);
    let e = mk_engine(&spec);
    let path = normalize("/customers/42").expect("valid");
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(v.params, vec![("id".to_string(), "42".to_string())]);
    let path = normalize("/customers/0").expect("valid");
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!(v.decision, Decision::Deny);
}

#[test]
fn user_attributes_in_when() {
    let spec = mk_spec(vec![AccessRule {
        when: Some("user.branch == 'HB' && user.role in ['clerk', 'supervisor']".into()),
        ..mk_allow("hb-staff", &["GET"], &["/**"])
    }]);
    let e = mk_engine(&spec);
    let path = normalize("/x").expect("valid");
    let decide = |attrs: Option<&[(&str, &str)]>| {
        let user = attrs.map(|a| User { id: "u".into(), attributes: mk_labels(a) });
        e.decide(&Request { method: "GET", path: &path, caller: None, user: user.as_ref(), time: 0 }).decision
    };
    assert_eq!(decide(Some(CLERK)), Decision::Allow);
    assert_eq!(decide(Some(&[("role", "supervisor"), ("branch", "HB")])), Decision::Allow);
    assert_eq!(decide(Some(&[("role", "clerk"), ("branch", "SH")])), Decision::Deny);
    assert_eq!(decide(Some(&[("role", "clerk")])), Decision::Deny, "a missing attribute does not match");
    assert_eq!(decide(None), Decision::Deny);
}

#[test]
fn deny_rule_whose_when_fails_to_evaluate_still_denies() {
    let spec = mk_spec(vec![
        mk_allow("all", &[], &["/**"]),
        AccessRule { when: Some("user.branch == 'SH'".into()), ..mk_deny("no-sh", &[], &["/**"]) },
    ]);
    let e = mk_engine(&spec);
    let path = normalize("/x").expect("valid");
    // No user: `user.branch` is missing, the condition errors, and the Deny rule fails closed.
    let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
    assert_eq!((v.decision, v.rule.map(|r| r.name.as_str())), (Decision::Deny, Some("no-sh")));
}

#[test]
fn workload_labels_must_match() {
    let spec = mk_spec(vec![AccessRule {
        from: Some(Source {
            workloads: vec![WorkloadRef {
                namespace: Some("logistics".into()),
                service_account: None,
                labels: mk_labels(&[("app", "ops-portal")]),
            }],
            ..Default::default()
        }),
        ..mk_allow("portal", &[], &["/**"])
    }]);
    let e = mk_engine(&spec);
    let path = normalize("/x").expect("valid");
    let portal = mk_caller("logistics", "any", &[("app", "ops-portal"), ("tier", "web")]);
    let other = mk_caller("logistics", "any", &[("app", "crawler")]);
    let d =
        |c| e.decide(&Request { method: "GET", path: &path, caller: Some(c), user: None, time: 0 }).decision;
    assert_eq!(d(&portal), Decision::Allow);
    assert_eq!(d(&other), Decision::Deny);
}

/// A caller known only by its certificate (behind a mesh's proxy): its namespace and service
/// account count, its labels are unknown, so an Allow entry naming labels never admits it and
/// a Deny entry naming labels always refuses it.
#[test]
fn a_caller_whose_labels_are_unknown_matches_only_entries_without_labels() {
    let entry = |sa: Option<&str>, labels: &[(&str, &str)]| WorkloadRef {
        namespace: Some("logistics".into()),
        service_account: sa.map(str::to_owned),
        labels: mk_labels(labels),
    };
    let rule = |name: &str, workloads| AccessRule {
        from: Some(Source { workloads, ..Default::default() }),
        ..mk_allow(name, &[], &[&format!("/{name}/**")])
    };
    let spec = mk_spec(vec![
        AccessRule {
            from: Some(Source { workloads: vec![entry(None, &[("tier", "crawler")])], ..Default::default() }),
            ..mk_deny("no-crawlers", &[], &["/by-namespace/**"])
        },
        rule("by-account", vec![entry(Some("ops-portal"), &[])]),
        rule("by-namespace", vec![entry(None, &[])]),
        rule("by-label", vec![entry(None, &[("app", "ops-portal")])]),
        rule("by-account-and-label", vec![entry(Some("ops-portal"), &[("app", "ops-portal")])]),
    ]);
    let e = mk_engine(&spec);
    let by_certificate =
        WorkloadIdentity { labels_unknown: true, ..mk_caller("logistics", "ops-portal", &[]) };
    let from_table = mk_caller("logistics", "ops-portal", &[("app", "ops-portal")]);
    for (path, certificate, table) in [
        ("/by-account/1", Decision::Allow, Decision::Allow),
        ("/by-namespace/1", Decision::Deny, Decision::Allow),
        ("/by-label/1", Decision::Deny, Decision::Allow),
        ("/by-account-and-label/1", Decision::Deny, Decision::Allow),
    ] {
        let path = normalize(path).expect("valid");
        let d = |c| {
            e.decide(&Request { method: "GET", path: &path, caller: Some(c), user: None, time: 0 }).decision
        };
        assert_eq!(d(&by_certificate), certificate, "{path:?} by certificate");
        assert_eq!(d(&from_table), table, "{path:?} from the identity table");
    }
}

/// Rules whose globs all start with a literal are passed over when the request's first
/// segment is none of those literals; a rule with any other glob is always compared.
#[test]
fn the_first_segment_shortcut_keeps_every_match() {
    let spec = mk_spec(vec![
        mk_allow("two-literals", &["GET"], &["/parcels/{id}", "/waybills/**"]),
        mk_allow("mixed", &["GET"], &["/drivers/{id}", "/*/history"]),
        mk_allow("capture-first", &["GET"], &["/{area}/stats"]),
        mk_allow("deep-first", &["GET"], &["/**/export"]),
        mk_allow("any-path", &["HEAD"], &[]),
    ]);
    let engine = mk_engine(&spec);
    let cases = [
        ("GET", "/parcels/SP1", Some("two-literals")),
        ("GET", "/waybills", Some("two-literals")),
        ("GET", "/waybills/a/b", Some("two-literals")),
        ("GET", "/drivers/7", Some("mixed")),
        ("GET", "/parcels/history", Some("two-literals")),
        ("GET", "/routes/history", Some("mixed")),
        ("GET", "/routes/stats", Some("capture-first")),
        ("GET", "/a/b/export", Some("deep-first")),
        ("GET", "/export", Some("deep-first")),
        ("HEAD", "/", Some("any-path")),
        ("GET", "/", None),
        ("GET", "/parcel/SP1", None),
        ("GET", "/routes", None),
    ];
    for (method, target, want) in cases {
        let path = normalize(target).expect("test paths are valid");
        let req = Request { method, path: &path, caller: None, user: None, time: 0 };
        let v = engine.decide(&req);
        assert_eq!(v.rule.map(|r| r.name.as_str()), want, "{method} {target}");
    }
    let rules = &mk_policy("p", &spec).allow_rules;
    let firsts: Vec<_> = rules.iter().map(|r| r.first_segments.clone()).collect();
    assert_eq!(firsts[0], Some(vec!["parcels".into(), "waybills".into()]));
    assert!(firsts[1..].iter().all(Option::is_none), "{firsts:?}");
}

/// Each policy sees the user its own identity settings verified: a token another policy's
/// issuer accepted satisfies none of this policy's user rules, and each policy's `when`
/// reads its own user (the CEL variables are rebuilt when the user changes).
#[test]
fn each_policy_decides_with_the_user_its_own_identity_verified() {
    let admin = mk_spec(vec![
        AccessRule {
            from: Some(Source {
                users: [("role".to_string(), vec!["admin".to_string()])].into(),
                ..Default::default()
            }),
            ..mk_allow("admins", &["GET"], &["/admin/**"])
        },
        mk_allow("public", &["GET"], &["/public/**"]),
    ]);
    let mut public = mk_spec(vec![mk_allow("pages", &["GET"], &["/public/**"])]);
    public.default_action = Action::Allow;
    // Index 0: "a-admin", 1: "b-public" (enforced policies in name order).
    let e = Engine::new(vec![mk_policy("b-public", &public), mk_policy("a-admin", &admin)]);
    assert_eq!(e.policies()[0].name, "a-admin");
    let claims = User { id: "u".into(), attributes: mk_labels(&[("role", "admin")]) };
    let path = normalize("/admin/users").expect("valid");
    let req = Request { method: "GET", path: &path, caller: None, user: None, time: 0 };

    // The public issuer's token says role=admin; the admin policy's issuer verified nobody.
    let v = e.decide_as(&req, |i| (i == 1).then_some(&claims));
    assert_eq!((v.decision, v.reason), (Decision::Deny, Reason::DefaultDeny));
    assert_eq!(v.policy.map(|p| p.name.as_str()), Some("a-admin"));
    // The admin policy's own issuer verified the same claims: allowed.
    let v = e.decide_as(&req, |i| (i == 0).then_some(&claims));
    assert_eq!((v.decision, v.rule.map(|r| r.name.as_str())), (Decision::Allow, Some("admins")));
    // One user for every policy (`decide`) would let the public token in.
    let v = e.decide(&Request { user: Some(&claims), ..req });
    assert_eq!(v.decision, Decision::Allow);

    let readers = mk_spec(vec![AccessRule {
        when: Some("user.role == 'reader'".into()),
        ..mk_allow("readers", &["GET"], &["/public/**"])
    }]);
    let mut no_admins = mk_spec(vec![AccessRule {
        when: Some("user.role == 'admin'".into()),
        ..mk_deny("no-admins-here", &["GET"], &["/public/**"])
    }]);
    no_admins.default_action = Action::Allow;
    let e = Engine::new(vec![mk_policy("a-readers", &readers), mk_policy("b-no-admins", &no_admins)]);
    let reader = User { id: "r".into(), attributes: mk_labels(&[("role", "reader")]) };
    let path = normalize("/public/page").expect("valid");
    let req = Request { method: "GET", path: &path, caller: None, user: None, time: 0 };
    let users = [&reader, &claims];
    let v = e.decide_as(&req, |i| Some(users[i]));
    assert_eq!((v.decision, v.rule.map(|r| r.name.as_str())), (Decision::Deny, Some("no-admins-here")));
    let v = e.decide_as(&req, |_| Some(&reader));
    assert_eq!((v.decision, v.rule.map(|r| r.name.as_str())), (Decision::Allow, Some("readers")));
}

/// The verdicts of Audit-mode policies that do not decide come with the deciding one as dry
/// runs, in policy name order, whether an enforced verdict or another Audit verdict decides;
/// an enforced Deny stops the evaluation before any Audit policy.
#[test]
fn audit_policies_that_do_not_decide_are_recorded_as_dry_runs() {
    let mut enforcing = mk_spec(vec![mk_allow("read", &["GET"], &["/customers/**"])]);
    enforcing.default_action = Action::Deny;
    let mut stricter = mk_spec(vec![mk_deny("no-export", &["GET"], &["/customers/export"])]);
    stricter.default_action = Action::Allow;
    stricter.mode = Mode::Audit;
    let mut narrow = mk_spec(vec![mk_allow("one", &["GET"], &["/customers/{id}"])]);
    narrow.default_action = Action::Deny;
    narrow.mode = Mode::Audit;
    let decide = |e: &Engine, p: &str| {
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        let name = |v: &custos_policy::Verdict<'_>| {
            format!(
                "{}/{}:{}",
                v.policy.map_or("-", |p| p.name.as_str()),
                v.rule.map_or("-", |r| r.name.as_str()),
                v.decision
            )
        };
        assert!(v.dry_runs.iter().all(|d| d.mode == Mode::Audit && d.dry_runs.is_empty()));
        (name(&v), v.dry_runs.iter().map(name).collect::<Vec<_>>())
    };
    // Names chosen so that the enforcing policy comes between the two Audit ones.
    let e = Engine::new(vec![
        mk_policy("c-narrow", &narrow),
        mk_policy("b-enforcing", &enforcing),
        mk_policy("a-stricter", &stricter),
    ]);
    assert_eq!(
        decide(&e, "/customers/export"),
        (
            "b-enforcing/read:Allow".into(),
            vec!["a-stricter/no-export:WouldDeny".into(), "c-narrow/one:Allow".into()]
        )
    );
    assert_eq!(
        decide(&e, "/customers/42/orders"),
        ("b-enforcing/read:Allow".into(), vec!["a-stricter/-:Allow".into(), "c-narrow/-:WouldDeny".into()])
    );
    // An enforced Deny (the enforcing policy's default) is the whole answer.
    assert_eq!(decide(&e, "/parcels"), ("b-enforcing/-:Deny".into(), vec![]));
    // Audit policies alone: one decides (WouldDeny outranks Allow), the other is a dry run.
    let e = Engine::new(vec![mk_policy("a-stricter", &stricter), mk_policy("c-narrow", &narrow)]);
    assert_eq!(
        decide(&e, "/customers/export"),
        ("a-stricter/no-export:WouldDeny".into(), vec!["c-narrow/one:Allow".into()])
    );
    // The deciding Audit verdict comes after two others by name: the one it replaced is
    // listed in name order all the same.
    let mut open = mk_spec(vec![]);
    open.default_action = Action::Allow;
    open.mode = Mode::Audit;
    let e = Engine::new(vec![
        mk_policy("a-open", &open),
        mk_policy("b-open", &open),
        mk_policy("c-narrow", &narrow),
    ]);
    assert_eq!(
        decide(&e, "/parcels"),
        ("c-narrow/-:WouldDeny".into(), vec!["a-open/-:Allow".into(), "b-open/-:Allow".into()])
    );
    // One policy: no dry run.
    let e = Engine::new(vec![mk_policy("b-enforcing", &enforcing)]);
    assert_eq!(decide(&e, "/customers/export").1, Vec::<String>::new());
}

/// Allow rules also see the variants of a path an app may route to their handlers (case
/// folded, format suffix dropped), but only to constrain: under a default Allow the rule a
/// variant matches applies instead of the unconstrained default; where the path matched a
/// later rule than a variant does, the request is refused as ambiguous; a default Deny stays.
#[test]
fn path_variants_cannot_escape_an_allow_rules_constraints() {
    let decide = |mode: Mode, default_action: Action, method: &str, p: &str| {
        let mut spec = mk_spec(vec![
            mk_deny("no-export", &["GET"], &["/customers/export"]),
            mk_allow("search", &["GET"], &["/customers/search"]),
            mk_allow("one", &["GET"], &["/customers/{id}"]),
        ]);
        (spec.mode, spec.default_action) = (mode, default_action);
        let e = mk_engine(&spec);
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method, path: &path, caller: None, user: None, time: 0 });
        (v.decision, v.rule.map(|r| r.name.clone()), v.reason, v.plan.is_some())
    };
    let allow = |rule: &str| (Decision::Allow, Some(rule.to_owned()), Reason::AllowRule, true);
    let ambiguous = |d: Decision| (d, Some("search".to_owned()), Reason::AmbiguousRoute, false);
    let (enforce, audit, open, closed) = (Mode::Enforce, Mode::Audit, Action::Allow, Action::Deny);
    let cases = [
        (enforce, open, "GET", "/customers/search", allow("search")),
        (enforce, open, "GET", "/customers/42", allow("one")),
        (enforce, open, "GET", "/customers/42.json", allow("one")),
        // The default would have let these through unconstrained: the variant's rule applies.
        (enforce, open, "GET", "/Customers/42", allow("one")),
        (enforce, open, "GET", "/CUSTOMERS/Search", allow("search")),
        // `{id}` matches as sent, an earlier rule as the app may route it.
        (enforce, open, "GET", "/customers/search.json", ambiguous(Decision::Deny)),
        (enforce, open, "GET", "/customers/SEARCH", ambiguous(Decision::Deny)),
        (audit, open, "GET", "/customers/search.json", ambiguous(Decision::WouldDeny)),
        (enforce, closed, "GET", "/customers/search.json", ambiguous(Decision::Deny)),
        // A default Deny is not turned into an Allow by a variant.
        (enforce, closed, "GET", "/Customers/42", (Decision::Deny, None, Reason::DefaultDeny, false)),
        (enforce, open, "GET", "/orders/1", (Decision::Allow, None, Reason::DefaultAllow, true)),
        // A rule about GET is about HEAD too, Deny and Allow.
        (enforce, open, "HEAD", "/customers/42", allow("one")),
        (enforce, closed, "HEAD", "/customers/42", allow("one")),
        (
            enforce,
            open,
            "HEAD",
            "/customers/export",
            (Decision::Deny, Some("no-export".into()), Reason::DenyRule, false),
        ),
        (enforce, open, "POST", "/Customers/42", (Decision::Allow, None, Reason::DefaultAllow, true)),
    ];
    for (mode, default_action, method, path, want) in cases {
        assert_eq!(
            decide(mode, default_action, method, path),
            want,
            "{mode:?} {default_action:?} {method} {path}"
        );
    }
    // An app routing case-sensitively, or without format suffixes: those variants are the
    // app's other resources, not this rule's.
    let decide_routed = |case_insensitive: bool, format_suffixes: bool, p: &str| {
        let mut spec = mk_spec(vec![
            mk_allow("search", &["GET"], &["/customers/search"]),
            mk_allow("one", &["GET"], &["/customers/{id}"]),
        ]);
        spec.default_action = Action::Allow;
        spec.workload.routing = Some(custos_api::policy::RoutingSpec {
            case_insensitive: Some(case_insensitive),
            format_suffixes: Some(format_suffixes),
        });
        let e = mk_engine(&spec);
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        (v.reason, v.rule.map(|r| r.name.clone()))
    };
    let one = (Reason::AllowRule, Some("one".to_owned()));
    let ambiguous = (Reason::AmbiguousRoute, Some("search".to_owned()));
    assert_eq!(decide_routed(false, true, "/customers/SEARCH"), one);
    assert_eq!(decide_routed(false, true, "/customers/search.json"), ambiguous);
    assert_eq!(decide_routed(false, true, "/customers/Search.json"), one, "stems match as sent too");
    assert_eq!(decide_routed(true, false, "/customers/search.json"), one);
    assert_eq!(decide_routed(true, false, "/customers/SEARCH"), ambiguous);
    assert_eq!(decide_routed(false, false, "/customers/SEARCH.json"), one);
    assert_eq!(decide_routed(false, false, "/Customers/42").0, Reason::DefaultAllow);
    // Beyond ASCII: `ſ` (U+017F) is `s` to an app folding case as Java does.
    assert_eq!(decide_routed(true, false, "/customers/%C5%BFearch"), ambiguous);
    assert_eq!(decide_routed(false, false, "/customers/%C5%BFearch"), one);
    // A rule's own capitals fold too, with a path that has none (capture names aside).
    let mut spec = mk_spec(vec![mk_allow("reports", &["GET"], &["/Reports/{reportId}"])]);
    spec.default_action = Action::Allow;
    let e = mk_engine(&spec);
    for p in ["/reports/q1", "/REPORTS/q1", "/Reports/q1"] {
        let path = normalize(p).expect("valid");
        let v = e.decide(&Request { method: "GET", path: &path, caller: None, user: None, time: 0 });
        assert_eq!((v.reason, v.rule.map(|r| r.name.as_str())), (Reason::AllowRule, Some("reports")), "{p}");
    }
}
