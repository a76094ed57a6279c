//! Every example policy compiles; the broken one fails with its field path.

use std::path::PathBuf;

use custos_policy::{PolicyInput, compile_namespace, compile_policy, load_policies};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &PathBuf) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("examples/ exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_compiles() {
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 4, "one example per incident");
    for f in files {
        let loaded = load_policies(&std::fs::read_to_string(&f).expect("readable"));
        assert!(loaded.errors.is_empty(), "{}: {:?}", f.display(), loaded.errors);
        assert!(!loaded.policies.is_empty(), "{} holds a policy", f.display());
        for p in &loaded.policies {
            let ns = p.namespace.clone().unwrap_or_else(|| "default".into());
            if let Err(e) = compile_policy(&ns, &p.input.name, &p.input.spec) {
                panic!("{}: {}:\n{e}", f.display(), p.input.name);
            }
            let out = compile_namespace(&ns, &[PolicyInput { ..p.input.clone() }], vec![]);
            assert!(out.is_clean());
        }
    }
}

#[test]
fn broken_example_names_the_row_filter() {
    let f = examples_dir().join("broken/broken-rowfilter.yaml");
    let loaded = load_policies(&std::fs::read_to_string(&f).expect("readable"));
    let p = &loaded.policies[0];
    let err = compile_policy("logistics", &p.input.name, &p.input.spec).expect_err("broken");
    let text = err.to_string();
    assert!(text.contains("spec.rules[0].rowFilter: undeclared reference 'usr'"), "{text}");
}
