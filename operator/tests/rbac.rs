//! The committed RBAC manifest (`e2e/manifests/rbac.yaml`, which the chart mirrors) grants
//! exactly the rules of `custos_operator::rbac`, and docs/operator.md shows them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custos_operator::rbac::{CLUSTER_RULES, NAMESPACE_RULES, markdown_table, policy_rules};
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
    assert_eq!(rules_of("ClusterRole"), policy_rules(CLUSTER_RULES));
}

#[test]
fn role_matches_the_code() {
    assert_eq!(rules_of("Role"), policy_rules(NAMESPACE_RULES));
}

#[test]
fn docs_show_the_same_tables() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operator.md")).unwrap();
    for table in [markdown_table(CLUSTER_RULES), markdown_table(NAMESPACE_RULES)] {
        assert!(docs.contains(&table), "docs/operator.md must contain:\n{table}");
    }
}
