use serde_json::{Value, json};

use super::*;

const NS: &str = "logistics";

fn mk_object(spec: Value) -> Value {
    json!({
        "apiVersion": "custos.dev/v1alpha1",
        "kind": "DataAccessPolicy",
        "metadata": {"name": "customer-api", "namespace": NS},
        "spec": spec,
    })
}

fn mk_spec_json() -> Value {
    json!({
        "workload": {"selector": {"matchLabels": {"app": "customer-api"}}, "appPort": 8080},
        "identity": {"users": {
            "jwt": {
                "issuer": "https://sso.example",
                "audiences": ["customer-api"],
                "jwksSecretRef": {"name": "sso-jwks"}
            },
            "attributes": {"branch": "branch_id", "role": "role"}
        }},
        "dataClasses": [{"name": "phone", "paths": ["$..phone"]}],
        "rules": [{
            "name": "clerks-read",
            "action": "Allow",
            "from": {"users": {"role": ["clerk"]}},
            "to": {"methods": ["GET"], "paths": ["/customers/*"]},
            "records": "$.items[*]",
            "rowFilter": "record.branch == user.branch",
            "mask": {"phone": "ShowLast4"}
        }]
    })
}

fn mk_spec(edit: impl FnOnce(&mut Value)) -> DataAccessPolicySpec {
    let mut spec = mk_spec_json();
    edit(&mut spec);
    serde_json::from_value(spec).expect("a well-formed spec")
}

fn warnings_of(v: Validation) -> Vec<String> {
    match v {
        Validation::Allowed { warnings } => warnings,
        Validation::Denied { message, .. } => panic!("expected the policy to be admitted: {message}"),
    }
}

fn denial_of(v: Validation) -> (FieldErrors, String) {
    match v {
        Validation::Denied { errors, message } => (errors, message),
        Validation::Allowed { warnings } => panic!("expected a denial, got Allowed {warnings:?}"),
    }
}

fn paths(errors: &FieldErrors) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn a_sound_policy_is_admitted_without_warnings() {
    let v = validate(NS, "customer-api", &mk_spec(|_| {}));
    assert!(v.is_allowed());
    assert_eq!(warnings_of(v), Vec::<String>::new());
}

#[test]
fn bad_cel_is_denied_at_its_field_path() {
    let spec = mk_spec(|s| s["rules"][0]["rowFilter"] = json!("record.branch == usr.branch"));
    let (errors, message) = denial_of(validate(NS, "customer-api", &spec));
    assert_eq!(paths(&errors), vec!["spec.rules[0].rowFilter"]);
    assert!(message.starts_with("DataAccessPolicy logistics/customer-api is invalid: "), "{message}");
    assert!(message.contains("spec.rules[0].rowFilter: "), "{message}");
    assert!(message.contains("usr"), "{message}");
}

#[test]
fn bad_globs_and_unknown_mask_classes_are_denied_together() {
    let spec = mk_spec(|s| {
        s["rules"][0]["to"]["paths"] = json!(["/customers/{id"]);
        s["rules"][0]["mask"] = json!({"email": "Redact"});
    });
    let (errors, message) = denial_of(validate(NS, "customer-api", &spec));
    let found = paths(&errors);
    assert!(found.contains(&"spec.rules[0].to.paths[0]"), "{found:?}");
    assert!(found.contains(&"spec.rules[0].mask.email"), "{found:?}");
    assert!(message.contains("spec.rules[0].mask.email: unknown data class 'email'"), "{message}");
    assert!(message.contains("; "), "the problems are listed one after another: {message}");
}

#[test]
fn audit_mode_warns_that_nothing_is_enforced() {
    let spec = mk_spec(|s| s["mode"] = json!("Audit"));
    let warnings = warnings_of(validate(NS, "customer-api", &spec));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("spec.mode is Audit"), "{warnings:?}");
}

#[test]
fn risky_settings_warn() {
    let spec = mk_spec(|s| {
        s["defaultAction"] = json!("Allow");
        s["rules"][0]["from"] = json!({});
        s["networkPolicy"] = json!({"enabled": false});
    });
    let warnings = warnings_of(validate(NS, "customer-api", &spec));
    let joined = warnings.join("\n");
    assert_eq!(warnings.len(), 3, "{joined}");
    assert!(joined.contains("spec.defaultAction is Allow"), "{joined}");
    assert!(joined.contains("spec.rules[0] (clerks-read) allows every caller"), "{joined}");
    assert!(joined.contains("spec.networkPolicy.enabled is false"), "{joined}");

    // In Audit mode a missing NetworkPolicy changes nothing: no warning about it.
    let spec = mk_spec(|s| {
        s["mode"] = json!("Audit");
        s["networkPolicy"] = json!({"enabled": false});
    });
    let warnings = warnings_of(validate(NS, "customer-api", &spec));
    assert!(!warnings.iter().any(|w| w.contains("networkPolicy")), "{warnings:?}");

    let spec = mk_spec(|s| s["mode"] = json!("Disabled"));
    let warnings = warnings_of(validate(NS, "customer-api", &spec));
    assert!(warnings[0].starts_with("spec.mode is Disabled"), "{warnings:?}");
}

#[test]
fn user_references_without_identity_warn() {
    let spec = mk_spec(|s| {
        s.as_object_mut().unwrap().remove("identity");
        let rule = &mut s["rules"][0];
        rule.as_object_mut().unwrap().remove("from");
        rule["from"] = json!({"workloads": [{"serviceAccount": "ops-portal"}]});
        rule["rowFilter"] = json!("record.owner == user.id");
        rule["when"] = json!("request.method == 'GET'");
    });
    let warnings = warnings_of(validate(NS, "customer-api", &spec));
    assert_eq!(
        warnings,
        vec![
            "spec.rules[0].rowFilter uses user but spec.identity.users is not set: every caller is anonymous"
                .to_string()
        ]
    );
}

#[test]
fn cel_user_references_are_recognised() {
    assert!(mentions_user("record.branch == user.branch"));
    assert!(mentions_user("user[\"role\"] == 'clerk'"));
    assert!(mentions_user("(user.id)"));
    assert!(!mentions_user("record.user.id == 'x'"));
    assert!(!mentions_user("superuser.id == 1"));
    assert!(!mentions_user("record.username == 'x'"));
    assert!(!mentions_user("users"));
}

#[test]
fn paths_are_rooted_at_the_object() {
    assert_eq!(rooted("spec.rules[0].when"), "spec.rules[0].when");
    assert_eq!(rooted("metadata.name"), "metadata.name");
    assert_eq!(rooted("rules[0].when"), "spec.rules[0].when");
    assert_eq!(rooted("workload.appPort"), "spec.workload.appPort");
    assert_eq!(rooted(""), "spec");
}

#[test]
fn whole_objects_are_checked_against_the_schema() {
    let object = mk_object(mk_spec_json());
    assert!(validate_object(NS, &object).is_allowed());

    let mut spec = mk_spec_json();
    spec["rules"][0]["actoin"] = json!("Deny");
    spec["mode"] = json!("Enforced");
    let (errors, message) = denial_of(validate_object(NS, &mk_object(spec)));
    let found = paths(&errors);
    assert!(found.contains(&"spec.rules[0].actoin"), "{found:?}");
    assert!(found.contains(&"spec.mode"), "{found:?}");
    assert!(message.contains("spec.rules[0].actoin: unknown field"), "{message}");

    let mut spec = mk_spec_json();
    spec["rules"][0]["rowFilter"] = json!("record.branch ==");
    let (errors, _) = denial_of(validate_object(NS, &mk_object(spec)));
    assert_eq!(paths(&errors), vec!["spec.rules[0].rowFilter"]);
}

#[test]
fn generate_name_objects_get_a_placeholder_name() {
    let mut object = mk_object(mk_spec_json());
    object["metadata"] = json!({"generateName": "customer-api-", "namespace": NS});
    assert!(validate_object(NS, &object).is_allowed());

    object["spec"]["rules"][0]["mask"] = json!({"email": "Redact"});
    let (_, message) = denial_of(validate_object(NS, &object));
    assert!(
        message.starts_with("DataAccessPolicy logistics/customer-api-<generated> is invalid"),
        "{message}"
    );
}

/// A policy name is a label value on its NetworkPolicy: 63 characters at most. A generateName
/// prefix of any length is admitted (the apiserver cuts it to fit).
#[test]
fn names_longer_than_a_label_value_are_denied() {
    assert!(validate(NS, &"a".repeat(63), &mk_spec(|_| {})).is_allowed());
    let (errors, message) = denial_of(validate(NS, &"a".repeat(64), &mk_spec(|_| {})));
    assert_eq!(paths(&errors), vec!["metadata.name"]);
    assert!(message.contains("at most 63 characters, got 64"), "{message}");

    let mut object = mk_object(mk_spec_json());
    object["metadata"] = json!({"generateName": "p".repeat(100), "namespace": NS});
    assert!(validate_object(NS, &object).is_allowed());
}

#[test]
fn other_kinds_are_denied() {
    let mut object = mk_object(mk_spec_json());
    object["kind"] = json!("ConfigMap");
    let (errors, message) = denial_of(validate_object(NS, &object));
    assert_eq!(paths(&errors), vec!["kind"]);
    assert!(message.contains("must be DataAccessPolicy, got ConfigMap"), "{message}");
}
