//! `mk_*` builders for policy tests.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;

use custos_api::WorkloadIdentity;
use custos_api::policy::*;
use custos_policy::{CompiledPolicy, Engine, compile_policy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub fn mk_labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn mk_spec(rules: Vec<AccessRule>) -> DataAccessPolicySpec {
    DataAccessPolicySpec {
        workload: WorkloadSpec {
            selector: LabelSelector {
                match_labels: Some(mk_labels(&[("app", "customer-api")])),
                ..Default::default()
            },
            app_port: 8080,
            proxy_port: None,
            routing: None,
        },
        mode: Mode::Enforce,
        default_action: Action::Deny,
        fail_open: false,
        identity: Some(IdentitySpec {
            users: Some(UserIdentity {
                jwt: JwtSpec {
                    issuer: "https://sso.example.com".into(),
                    audiences: vec!["customer-api".into()],
                    jwks_secret_ref: Some(SecretKeyRef { name: "sso-jwks".into(), key: None }),
                    jwks_uri: None,
                    leeway_seconds: None,
                },
                attributes: mk_labels(&[("branch", "branch_id"), ("role", "role")]),
                id_claim: None,
            }),
        }),
        data_classes: vec![
            DataClass { name: "phone".into(), paths: vec!["$.items[*].phone".into(), "$.phone".into()] },
            DataClass { name: "name".into(), paths: vec!["$.items[*].name".into(), "$.name".into()] },
        ],
        rules,
        network_policy: None,
        audit: None,
    }
}

pub fn mk_rule(name: &str, action: Action) -> AccessRule {
    AccessRule {
        name: name.into(),
        action,
        from: None,
        to: None,
        when: None,
        records: None,
        row_filter: None,
        mask: BTreeMap::new(),
        limits: None,
    }
}

pub fn mk_to(methods: &[&str], paths: &[&str]) -> Option<Target> {
    Some(Target {
        methods: methods.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
    })
}

pub fn mk_allow(name: &str, methods: &[&str], paths: &[&str]) -> AccessRule {
    AccessRule { to: mk_to(methods, paths), ..mk_rule(name, Action::Allow) }
}

pub fn mk_deny(name: &str, methods: &[&str], paths: &[&str]) -> AccessRule {
    AccessRule { to: mk_to(methods, paths), ..mk_rule(name, Action::Deny) }
}

pub fn mk_caller(ns: &str, sa: &str, labels: &[(&str, &str)]) -> WorkloadIdentity {
    WorkloadIdentity {
        ip: "10.0.0.7".into(),
        namespace: ns.into(),
        service_account: sa.into(),
        labels: mk_labels(labels),
        labels_unknown: false,
    }
}

pub fn mk_policy(name: &str, spec: &DataAccessPolicySpec) -> CompiledPolicy {
    match compile_policy("logistics", name, spec) {
        Ok(p) => p,
        Err(e) => panic!("policy {name} should compile:\n{e}"),
    }
}

pub fn mk_engine(spec: &DataAccessPolicySpec) -> Engine {
    Engine::new(vec![mk_policy("customer-api", spec)])
}

/// Compiles and returns the error strings (`path: message`).
pub fn compile_errors(spec: &DataAccessPolicySpec) -> Vec<String> {
    match compile_policy("logistics", "p", spec) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}
