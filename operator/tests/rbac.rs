//! The committed RBAC manifest (`e2e/manifests/rbac.yaml`: an operator generating its webhook
//! certificate) grants exactly the rules of `custos_operator::rbac` (base and generated-cert),
//! and docs/operator.md shows them. (The chart's copy is checked by e2e/tests/chart.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custos_operator::rbac::{
    CLUSTER_RULES, GENERATED_CERT_CLUSTER_RULES, GENERATED_CERT_NAMESPACE_RULES, NAMESPACE_RULES,
    SECRET_SYNC_CLUSTER_RULES, SECRET_SYNC_NAMESPACE_RULES, markdown_table, policy_rules,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde_json::Value;

fn manifests() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/manifests/rbac.yaml");
    serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn rules_of(kind: &str) -> Vec<PolicyRule> {
    let doc = manifests()
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == "custos-operator")
        .unwrap_or_else(|| panic!("{kind} custos-operator in e2e/manifests/rbac.yaml"));
    match kind {
        "ClusterRole" => serde_json::from_value::<ClusterRole>(doc).unwrap().rules.unwrap(),
        _ => serde_json::from_value::<Role>(doc).unwrap().rules.unwrap(),
    }
}

#[test]
fn cluster_role_matches_the_code() {
    let all: Vec<_> = CLUSTER_RULES.iter().chain(GENERATED_CERT_CLUSTER_RULES).copied().collect();
    assert_eq!(rules_of("ClusterRole"), policy_rules(&all, &[]));
}

#[test]
fn role_matches_the_code() {
    let all: Vec<_> = NAMESPACE_RULES.iter().chain(GENERATED_CERT_NAMESPACE_RULES).copied().collect();
    assert_eq!(rules_of("Role"), policy_rules(&all, &[]));
}

#[test]
fn docs_show_the_same_tables() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operator.md")).unwrap();
    for table in [
        markdown_table(CLUSTER_RULES),
        markdown_table(NAMESPACE_RULES),
        markdown_table(GENERATED_CERT_CLUSTER_RULES),
        markdown_table(GENERATED_CERT_NAMESPACE_RULES),
        markdown_table(SECRET_SYNC_CLUSTER_RULES),
        markdown_table(SECRET_SYNC_NAMESPACE_RULES),
    ] {
        assert!(docs.contains(&table), "docs/operator.md must contain:\n{table}");
    }
}
