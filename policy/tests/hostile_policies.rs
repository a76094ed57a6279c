//! Hostile policy text: random edits of a real example never crash the loader or the
//! compiler, and every problem they find names a field path.

use custos_policy::{compile_policy, load_policies};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../examples/courier-branch-scoping.yaml");

fn check(text: &str) {
    let loaded = load_policies(text);
    for e in &loaded.errors {
        for fe in e.errors.iter() {
            assert!(!fe.path.is_empty() && !fe.message.is_empty(), "{fe:?}");
        }
    }
    for p in &loaded.policies {
        if let Err(errors) = compile_policy("ns", &p.input.name, &p.input.spec) {
            for fe in errors.iter() {
                assert!(fe.path.starts_with("spec") || fe.path.starts_with("metadata"), "{fe:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_edits_of_an_example_never_crash(edits in prop::collection::vec((0usize..4000, 0u8..4, any::<char>()), 1..8)) {
        let mut text: Vec<char> = EXAMPLE.chars().collect();
        for (pos, op, c) in edits {
            let pos = pos % (text.len() + 1);
            match op {
                0 => text.insert(pos, c),
                1 if pos < text.len() => { text.remove(pos); }
                2 if pos < text.len() => text[pos] = c,
                _ => text.truncate(pos),
            }
        }
        check(&text.into_iter().collect::<String>());
    }

    #[test]
    fn arbitrary_text_never_crashes(text in ".{0,400}") {
        check(&text);
    }

    #[test]
    fn arbitrary_expressions_in_rules_never_crash(expr in ".{0,80}", path in ".{0,40}", glob in ".{0,40}") {
        let text = EXAMPLE
            .replace("\"record.branch == user.branch\"", &serde_json::to_string(&expr).expect("json string"))
            .replace("\"$.items[*]\"", &serde_json::to_string(&path).expect("json string"))
            .replace("- /parcels/search", &format!("- {}", serde_json::to_string(&glob).expect("json string")));
        check(&text);
    }
}

#[test]
fn deeply_nested_yaml_is_an_error_not_a_stack_overflow() {
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let loaded = load_policies(&deep);
    assert!(loaded.policies.is_empty());
}
