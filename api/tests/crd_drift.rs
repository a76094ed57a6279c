//! The committed CRD under `crds/` must match the Rust types (regenerate with `make crds`).

use std::path::PathBuf;

#[test]
fn committed_crd_matches_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/dataaccesspolicies.custos.dev.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/dataaccesspolicies.custos.dev.yaml exists");
    assert!(
        committed == custos_api::crd_yaml(),
        "{} is stale: run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn crd_has_printer_columns_short_name_and_status() {
    let yaml = custos_api::crd_yaml();
    for needle in [
        "shortNames:\n    - dap",
        "name: Mode",
        "name: Rules",
        "name: Ready",
        "name: Age",
        "subresources:",
        "status: {}",
        "x-kubernetes-validations",
    ] {
        assert!(yaml.contains(needle), "CRD lacks {needle:?}");
    }
}
