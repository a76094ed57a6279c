//! The CRD's own CEL rules (`x-kubernetes-validations`), run offline with kube-cel as the
//! apiserver runs them: every example passes, and each rule rejects what it should.

use std::path::PathBuf;

use serde_json::{Value, json};

fn schema() -> Value {
    serde_json::to_value(custos_api::spec_schema()).expect("schema serialises")
}

fn failures(spec: &Value) -> Vec<String> {
    match kube_cel::validate(&schema(), spec, None) {
        Ok(()) => Vec::new(),
        Err(e) => e.into_vec().into_iter().map(|f| format!("{}: {}", f.field_path, f.message)).collect(),
    }
}

#[test]
fn every_example_passes_the_crd_rules() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(&path).expect("readable")).expect("yaml");
        for doc in docs.iter().filter(|d| d["kind"] == "DataAccessPolicy") {
            assert_eq!(failures(&doc["spec"]), Vec::<String>::new(), "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 5);
}

#[test]
fn each_crd_rule_rejects_what_it_should() {
    let base = json!({"workload": {"selector": {}, "appPort": 8080}, "rules": []});
    let cases = [
        (
            json!({"workload": {"selector": {}, "appPort": 8080, "proxyPort": 8080}}),
            "workload.proxyPort (default 15080) must differ",
        ),
        (
            json!({"workload": {"selector": {}, "appPort": 15080}}),
            "workload.proxyPort (default 15080) must differ",
        ),
        (
            json!({"rules": [{"name": "d", "action": "Deny", "rowFilter": "true"}]}),
            "rowFilter, mask, limits and records apply only to Allow rules",
        ),
        (
            json!({"identity": {"users": {"jwt": {"issuer": "https://i"}}}}),
            "set exactly one of jwksSecretRef or jwksUri",
        ),
        (
            json!({"identity": {"users": {"jwt": {"issuer": "https://i", "jwksUri": "https://i/k", "jwksSecretRef": {"name": "s"}}}}}),
            "set exactly one of jwksSecretRef or jwksUri",
        ),
        (
            json!({"networkPolicy": {"egress": "DenyAll", "egressAllow": [{"cidr": "10.0.0.0/8", "namespace": "x"}]}}),
            "set either cidr, or namespace and/or podLabels",
        ),
        (
            json!({"networkPolicy": {"egress": "DenyAll", "egressAllow": [{"ports": [53]}]}}),
            "set either cidr, or namespace and/or podLabels",
        ),
    ];
    assert_eq!(failures(&base), Vec::<String>::new(), "the base passes");
    for (patch, want) in cases {
        let mut spec = base.clone();
        for (k, v) in patch.as_object().expect("object") {
            spec[k] = v.clone();
        }
        let got = failures(&spec);
        assert!(got.iter().any(|f| f.contains(want)), "{patch}: want {want:?}, got {got:?}");
    }
}
