//! Compiling a namespace: config with schema version and stable hash, NetworkPolicies, and
//! invalid policies left out without breaking the others.

mod support;

use custos_api::config::CONFIG_SCHEMA_VERSION;
use custos_api::policy::*;
use custos_policy::{ConfigError, PolicyInput, compile_namespace, load_config};
use support::*;

fn input(name: &str, spec: DataAccessPolicySpec) -> PolicyInput {
    PolicyInput { name: name.into(), generation: Some(1), spec }
}

fn portal_rule() -> AccessRule {
    AccessRule {
        from: Some(Source {
            workloads: vec![WorkloadRef {
                namespace: Some("logistics".into()),
                service_account: Some("ops-portal".into()),
                labels: mk_labels(&[("app", "ops-portal")]),
            }],
            ..Default::default()
        }),
        ..mk_allow("portal", &["GET"], &["/customers/**"])
    }
}

#[test]
fn config_is_versioned_hashed_and_stable() {
    let a = compile_namespace(
        "logistics",
        &[input("b", mk_spec(vec![portal_rule()])), input("a", mk_spec(vec![]))],
        vec![],
    );
    let b = compile_namespace(
        "logistics",
        &[input("a", mk_spec(vec![])), input("b", mk_spec(vec![portal_rule()]))],
        vec![],
    );
    assert!(a.is_clean());
    assert_eq!(a.config.schema_version, CONFIG_SCHEMA_VERSION);
    assert!(a.config.hash.starts_with("sha256:") && a.config.hash.len() == 7 + 64);
    assert_eq!(a.config.hash, b.config.hash, "input order must not change the hash");
    let names: Vec<_> = a.config.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);

    let mut changed = mk_spec(vec![portal_rule()]);
    changed.mode = Mode::Audit;
    let c = compile_namespace("logistics", &[input("a", mk_spec(vec![])), input("b", changed)], vec![]);
    assert_ne!(a.config.hash, c.config.hash, "a spec change must change the hash");

    let d = compile_namespace(
        "logistics",
        &[input("a", mk_spec(vec![])), input("b", mk_spec(vec![portal_rule()]))],
        vec![mk_caller("logistics", "ops-portal", &[])],
    );
    assert_ne!(a.config.hash, d.config.hash, "the identity table is part of the hash");
}

#[test]
fn invalid_policy_is_left_out_and_the_others_still_compile() {
    let mut bad = mk_spec(vec![portal_rule()]);
    bad.rules[0].when = Some("usr.x".into());
    let out = compile_namespace(
        "logistics",
        &[input("good", mk_spec(vec![portal_rule()])), input("bad", bad)],
        vec![],
    );
    assert_eq!(out.config.policies.len(), 1);
    assert_eq!(out.config.policies[0].name, "good");
    let errs = out.errors["bad"].to_string();
    assert_eq!(errs, "spec.rules[0].when: undeclared reference 'usr'");
    assert_eq!(out.network_policies.len(), 1);
}

#[test]
fn config_round_trips_through_the_sidecar_loader() {
    let out = compile_namespace(
        "logistics",
        &[input("p", mk_spec(vec![portal_rule()]))],
        vec![mk_caller("logistics", "ops-portal", &[])],
    );
    let json = serde_json::to_vec_pretty(&out.config).expect("serialises");
    let (config, policies) = load_config(&json).expect("loads");
    assert_eq!(config, out.config);
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].proxy_port, DEFAULT_PROXY_PORT);
    // Methods are upper-cased in the config.
    let lower = compile_namespace(
        "logistics",
        &[input("p", mk_spec(vec![mk_allow("r", &["get"], &["/x"])]))],
        vec![],
    );
    assert_eq!(
        lower.config.policies[0].spec.rules[0].to.as_ref().map(|t| t.methods.clone()),
        Some(vec!["GET".to_string()])
    );
}

#[test]
fn sidecar_loader_rejects_tampered_unknown_and_malformed_configs() {
    let out = compile_namespace("logistics", &[input("p", mk_spec(vec![portal_rule()]))], vec![]);
    let mut v = serde_json::to_value(&out.config).expect("serialises");
    v["policies"][0]["spec"]["mode"] = "Audit".into();
    assert!(matches!(
        load_config(&serde_json::to_vec(&v).expect("json")),
        Err(ConfigError::HashMismatch { .. })
    ));
    let mut v = serde_json::to_value(&out.config).expect("serialises");
    v["schemaVersion"] = 99.into();
    let err = load_config(&serde_json::to_vec(&v).expect("json")).expect_err("version 99");
    assert_eq!(err.to_string(), "config schemaVersion 99 is not supported (this build reads 1)");
    for bad in [&b""[..], b"{", b"[]", b"{\"schemaVersion\":1}", b"\xff\xfe"] {
        assert!(matches!(load_config(bad), Err(ConfigError::Parse(_))), "{bad:?}");
    }
}

#[test]
fn network_policy_admits_only_rule_sources_to_the_proxy_port() {
    let out = compile_namespace("logistics", &[input("customer-api", mk_spec(vec![portal_rule()]))], vec![]);
    let np = serde_json::to_value(&out.network_policies[0]).expect("serialises");
    assert_eq!(np["metadata"]["name"], "custos-customer-api");
    assert_eq!(np["metadata"]["labels"]["app.kubernetes.io/managed-by"], "custos");
    assert_eq!(np["spec"]["podSelector"]["matchLabels"]["app"], "customer-api");
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    let ingress = &np["spec"]["ingress"];
    assert_eq!(ingress.as_array().map(Vec::len), Some(1));
    assert_eq!(
        ingress[0]["ports"],
        serde_json::json!([{"port": 15080, "protocol": "TCP"}]),
        "only the proxy port, never 8080"
    );
    assert_eq!(
        ingress[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "logistics"
    );
    assert_eq!(ingress[0]["from"][0]["podSelector"]["matchLabels"]["app"], "ops-portal");
}

#[test]
fn network_policy_egress_lockdown_and_open_sources() {
    let mut spec = mk_spec(vec![mk_allow("anyone", &["GET"], &["/**"])]);
    spec.network_policy = Some(NetworkPolicySpec {
        enabled: true,
        egress: EgressMode::DenyAll,
        egress_allow: vec![
            EgressPeer {
                namespace: Some("logistics".into()),
                pod_labels: mk_labels(&[("app", "parcel-db")]),
                ports: vec![5432],
                ..Default::default()
            },
            EgressPeer { cidr: Some("10.20.0.0/16".into()), ..Default::default() },
        ],
    });
    let out = compile_namespace("scanning", &[input("scanner", spec)], vec![]);
    let np = serde_json::to_value(&out.network_policies[0]).expect("serialises");
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress", "Egress"]));
    assert!(
        np["spec"]["ingress"][0].get("from").is_none(),
        "an allow rule without workload sources opens the proxy port to all"
    );
    let egress = np["spec"]["egress"].as_array().expect("egress rules");
    assert_eq!(egress.len(), 4, "DNS, collector, parcel-db, cidr");
    assert_eq!(egress[0]["ports"][0]["port"], 53);
    assert_eq!(egress[2]["to"][0]["podSelector"]["matchLabels"]["app"], "parcel-db");
    assert_eq!(egress[2]["ports"][0]["port"], 5432);
    assert_eq!(egress[3]["to"][0]["ipBlock"]["cidr"], "10.20.0.0/16");
}

#[test]
fn no_network_policy_in_audit_mode_or_when_disabled() {
    let mut audit = mk_spec(vec![portal_rule()]);
    audit.mode = Mode::Audit;
    let mut off = mk_spec(vec![portal_rule()]);
    off.network_policy = Some(NetworkPolicySpec { enabled: false, ..Default::default() });
    let out = compile_namespace("logistics", &[input("a", audit), input("b", off)], vec![]);
    assert!(out.network_policies.is_empty());
    assert_eq!(out.config.policies.len(), 2);
}

#[test]
fn deny_everything_closes_all_ingress() {
    let out = compile_namespace(
        "logistics",
        &[input("closed", mk_spec(vec![mk_deny("nothing", &[], &[])]))],
        vec![],
    );
    let np = serde_json::to_value(&out.network_policies[0]).expect("serialises");
    assert_eq!(np["spec"]["ingress"], serde_json::json!([]));
}
