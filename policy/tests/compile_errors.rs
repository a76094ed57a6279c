//! Each kind of compile error yields its field-path message, and all errors of a policy are
//! reported, not only the first.

mod support;

use custos_api::policy::*;
use custos_policy::load_policies;
use support::*;

type Mutation = fn(&mut DataAccessPolicySpec);

fn with_rule(rule: AccessRule) -> DataAccessPolicySpec {
    mk_spec(vec![rule])
}

#[test]
fn each_error_kind_names_its_field_path() {
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "undeclared CEL variable",
            |s| s.rules[0].row_filter = Some("record.branch == usr.branch".into()),
            "spec.rules[0].rowFilter: undeclared reference 'usr'",
        ),
        (
            "CEL syntax",
            |s| s.rules[0].when = Some("request.method ==".into()),
            "spec.rules[0].when: syntax error",
        ),
        (
            "record in when",
            |s| s.rules[0].when = Some("record.x == 1".into()),
            "spec.rules[0].when: undeclared reference 'record'",
        ),
        (
            "unknown user attribute in CEL",
            |s| s.rules[0].row_filter = Some("record.branch == user.brnch".into()),
            "spec.rules[0].rowFilter: unknown user attribute 'user.brnch' (declared: authenticated, branch, id, role)",
        ),
        (
            "unknown request field",
            |s| s.rules[0].when = Some("request.hours > 3".into()),
            "spec.rules[0].when: unknown field 'request.hours'",
        ),
        (
            "bad records JSONPath",
            |s| s.rules[0].records = Some("$.items[".into()),
            "spec.rules[0].records: invalid JSONPath",
        ),
        (
            "bad data class JSONPath",
            |s| s.data_classes[1].paths[0] = "items[*].name".into(),
            "spec.dataClasses[1].paths[0]: invalid JSONPath",
        ),
        ("bad glob", |s| s.rules[0].to = mk_to(&["GET"], &["customers/*"]), "spec.rules[0].to.paths[0]: "),
        (
            "bad method",
            |s| s.rules[0].to = mk_to(&["GET /x"], &["/x"]),
            "spec.rules[0].to.methods[0]: must be an HTTP method",
        ),
        (
            "unknown mask class",
            |s| {
                s.rules[0].mask.insert("phon".into(), MaskStrategy::Redact);
            },
            "spec.rules[0].mask.phon: unknown data class 'phon' (declared: name, phone)",
        ),
        (
            "rowFilter without records",
            |s| {
                s.rules[0].records = None;
            },
            "spec.rules[0].rowFilter: needs records",
        ),
        (
            "mask on a deny rule",
            |s| {
                s.rules[0].action = Action::Deny;
            },
            "spec.rules[0].mask: applies only to Allow rules",
        ),
        (
            "zero limit",
            |s| s.rules[0].limits = Some(Limits { requests_per_minute: Some(0), ..Default::default() }),
            "spec.rules[0].limits.requestsPerMinute: must be at least 1",
        ),
        (
            "record limit without records",
            |s| {
                s.rules[0].records = None;
                s.rules[0].row_filter = None;
                s.rules[0].limits = Some(Limits { records_per_hour: Some(10), ..Default::default() });
            },
            "spec.rules[0].limits.recordsPerHour: counts records",
        ),
        (
            "hour limit above day limit",
            |s| {
                s.rules[0].limits = Some(Limits {
                    records_per_hour: Some(10),
                    records_per_day: Some(5),
                    ..Default::default()
                })
            },
            "spec.rules[0].limits.recordsPerHour: is larger than recordsPerDay (5)",
        ),
        (
            "undeclared user attribute in from",
            |s| {
                s.rules[0].from = Some(Source {
                    users: [("team".to_string(), vec!["a".to_string()])].into(),
                    ..Default::default()
                })
            },
            "spec.rules[0].from.users.team: unknown user attribute 'team'",
        ),
        (
            "duplicate rule names",
            |s| {
                let r = s.rules[0].clone();
                s.rules.push(r);
            },
            "spec.rules[1].name: duplicate rule name 'read' (also spec.rules[0])",
        ),
        (
            "bad rule name",
            |s| s.rules[0].name = "Read All".into(),
            "spec.rules[0].name: must be a lowercase DNS name",
        ),
        (
            "same ports",
            |s| s.workload.proxy_port = Some(8080),
            "spec.workload.proxyPort: must differ from appPort (8080)",
        ),
        ("zero port", |s| s.workload.app_port = 0, "spec.workload.appPort: must be between 1 and 65535"),
        (
            "bad selector operator",
            |s| {
                s.workload.selector.match_expressions =
                    Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "app".into(),
                        operator: "Equals".into(),
                        values: Some(vec!["x".into()]),
                    }])
            },
            "spec.workload.selector.matchExpressions[0].operator: unknown operator 'Equals'",
        ),
        (
            "bad label key",
            |s| s.workload.selector.match_labels = Some(mk_labels(&[("-app", "x")])),
            "spec.workload.selector.matchLabels.-app: label key name",
        ),
        (
            "both jwks sources",
            |s| {
                s.identity.as_mut().and_then(|i| i.users.as_mut()).expect("identity").jwt.jwks_uri =
                    Some("https://sso/jwks".into())
            },
            "spec.identity.users.jwt: set exactly one of jwksSecretRef or jwksUri",
        ),
        (
            "jwks key leading out of the Secret's volume",
            |s| {
                let j = &mut s.identity.as_mut().and_then(|i| i.users.as_mut()).expect("identity").jwt;
                j.jwks_secret_ref.as_mut().expect("secret ref").key = Some("../../run/secrets/token".into());
            },
            "spec.identity.users.jwt.jwksSecretRef.key: must be a Secret data key",
        ),
        (
            "plain http jwks",
            |s| {
                let j = &mut s.identity.as_mut().and_then(|i| i.users.as_mut()).expect("identity").jwt;
                j.jwks_secret_ref = None;
                j.jwks_uri = Some("http://sso.example.com/jwks".into());
            },
            "spec.identity.users.jwt.jwksUri: must be an https:// URL",
        ),
        (
            "leeway of days",
            |s| {
                s.identity.as_mut().and_then(|i| i.users.as_mut()).expect("identity").jwt.leeway_seconds =
                    Some(86_400_000)
            },
            "spec.identity.users.jwt.leewaySeconds: at most 300 seconds",
        ),
        (
            "built-in attribute mapped",
            |s| {
                s.identity
                    .as_mut()
                    .and_then(|i| i.users.as_mut())
                    .expect("identity")
                    .attributes
                    .insert("id".into(), "sub".into());
            },
            "spec.identity.users.attributes.id: 'id' is built in",
        ),
        (
            "duplicate data class",
            |s| {
                let c = s.data_classes[0].clone();
                s.data_classes.push(c);
            },
            "spec.dataClasses[2].name: duplicate data class 'phone'",
        ),
        (
            "bad record id path",
            |s| s.audit = Some(AuditSpec { record_id: Some("id".into()) }),
            "spec.audit.recordId: invalid JSONPath",
        ),
        (
            "egressAllow without DenyAll",
            |s| {
                s.network_policy = Some(NetworkPolicySpec {
                    enabled: true,
                    egress: EgressMode::Allow,
                    egress_allow: vec![EgressPeer { cidr: Some("10.0.0.0/8".into()), ..Default::default() }],
                })
            },
            "spec.networkPolicy.egressAllow: only applies when egress is DenyAll",
        ),
        (
            "bad cidr",
            |s| {
                s.network_policy = Some(NetworkPolicySpec {
                    enabled: true,
                    egress: EgressMode::DenyAll,
                    egress_allow: vec![EgressPeer { cidr: Some("10.0.0.0/33".into()), ..Default::default() }],
                })
            },
            "spec.networkPolicy.egressAllow[0].cidr: must be an IP block",
        ),
        (
            "conflicting rules",
            |s| {
                let mut d = s.rules[0].clone();
                d.name = "deny-read".into();
                d.action = Action::Deny;
                d.records = None;
                d.row_filter = None;
                d.mask.clear();
                d.limits = None;
                s.rules.push(d);
            },
            "spec.rules[0]: conflicts with Deny rule 'deny-read'",
        ),
        (
            "authenticated without identity",
            |s| {
                s.identity = None;
                s.rules[0].row_filter = None;
                s.rules[0].from = Some(Source { authenticated: Some(true), ..Default::default() });
            },
            "spec.rules[0].from.authenticated: needs spec.identity.users",
        ),
        (
            "too many data classes",
            |s| {
                s.data_classes.extend(
                    (0..63).map(|i| DataClass { name: format!("c{i}"), paths: vec![format!("$.c{i}")] }),
                )
            },
            "spec.dataClasses: at most 64 data classes, got 65",
        ),
        (
            "too many attributes",
            |s| {
                if let Some(users) = s.identity.as_mut().and_then(|i| i.users.as_mut()) {
                    users.attributes.extend((0..63).map(|i| (format!("a{i}"), format!("claim_{i}"))));
                }
            },
            "spec.identity.users.attributes: at most 64 attributes, got 65",
        ),
    ];
    for (name, mutate, want) in cases {
        let mut spec = base();
        mutate(&mut spec);
        let errors = compile_errors(&spec);
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "case {name:?}: want an error starting with {want:?}, got {errors:#?}"
        );
    }
}

fn base() -> DataAccessPolicySpec {
    let mut rule = mk_allow("read", &["GET"], &["/customers/**"]);
    rule.records = Some("$.items[*]".into());
    rule.row_filter = Some("record.branch == user.branch".into());
    rule.mask.insert("phone".into(), MaskStrategy::ShowLast4);
    with_rule(rule)
}

#[test]
fn the_base_policy_is_valid() {
    assert_eq!(compile_errors(&base()), Vec::<String>::new());
}

#[test]
fn all_errors_are_reported_not_only_the_first() {
    let mut spec = base();
    spec.rules[0].row_filter = Some("record.branch == usr.branch".into());
    spec.rules[0].records = Some("$[".into());
    spec.rules[0].mask.insert("ssn".into(), MaskStrategy::Hash);
    spec.workload.app_port = 15080;
    let errors = compile_errors(&spec);
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn schema_errors_from_yaml_name_their_field_paths() {
    let yaml = r#"
apiVersion: custos.dev/v1alpha1
kind: DataAccessPolicy
metadata: {name: bad}
spec:
  workload: {selector: {matchLabels: {app: x}}, appPort: "8080"}
  mode: Enforcing
  rules:
    - name: r
      action: Allow
      rowFiter: "record.a == 1"
      to: {methods: GET}
"#;
    let loaded = load_policies(yaml);
    assert!(loaded.policies.is_empty());
    let errors: Vec<String> = loaded.errors[0].errors.iter().map(|e| e.to_string()).collect();
    for want in [
        "spec.workload.appPort: must be an integer, got a string",
        "spec.mode: must be one of Enforce, Audit, Disabled",
        "spec.rules[0].rowFiter: unknown field",
        "spec.rules[0].to.methods: must be an array, got a string",
    ] {
        assert!(errors.iter().any(|e| e.starts_with(want)), "want {want:?} in {errors:#?}");
    }
}

/// Integers too large for the API types are schema errors at their field (the CRD bounds
/// them, so the API server refuses them too), not serde's text at `spec`.
#[test]
fn integers_beyond_the_types_name_their_field_paths() {
    let yaml = r#"
apiVersion: custos.dev/v1alpha1
kind: DataAccessPolicy
metadata: {name: big}
spec:
  workload: {selector: {matchLabels: {app: x}}, appPort: 70000}
  identity:
    users:
      jwt: {issuer: "https://sso.example", jwksUri: "https://sso.example/jwks", leewaySeconds: 4294967296}
  rules:
    - name: r
      action: Allow
      to: {methods: [GET], paths: [/x]}
      limits: {requestsPerMinute: 4294967296, recordsPerHour: 18446744073709551616, recordsPerDay: 9007199254740992}
"#;
    let loaded = load_policies(yaml);
    assert!(loaded.policies.is_empty());
    let errors: Vec<String> = loaded.errors[0].errors.iter().map(|e| e.to_string()).collect();
    for want in [
        "spec.workload.appPort: ",
        "spec.identity.users.jwt.leewaySeconds: ",
        "spec.rules[0].limits.requestsPerMinute: ",
        "spec.rules[0].limits.recordsPerHour: ",
        "spec.rules[0].limits.recordsPerDay: ",
    ] {
        assert!(errors.iter().any(|e| e.starts_with(want)), "want {want:?} in {errors:#?}");
    }
    assert!(!errors.iter().any(|e| e.starts_with("spec: ")), "{errors:#?}");
}

#[test]
fn yaml_that_is_not_yaml_is_an_error_not_a_panic() {
    for text in [
        "{",
        "a: [",
        "\t- x: : y",
        "apiVersion: custos.dev/v1alpha1\nkind: DataAccessPolicy\nspec: 3\nmetadata: {name: x}",
    ] {
        let loaded = load_policies(text);
        assert!(loaded.policies.is_empty(), "{text:?}");
    }
}

#[test]
fn other_kinds_are_skipped() {
    let loaded = load_policies("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n");
    assert_eq!(loaded.skipped, vec!["Secret".to_string()]);
    assert!(loaded.errors.is_empty());
}
