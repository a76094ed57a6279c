//! Properties of `apply` over random records.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use custos_api::policy::{ExceedAction, MaskStrategy};
use custos_transform::expr::{Expr, RequestVars, Scope, UserVars, Vars};
use custos_transform::{ClassMask, HashKey, Outcome, Plan, apply};
use proptest::prelude::*;
use serde_json::{Value, json};
use serde_json_path::JsonPath;

/// One random record: a secret string and a secret number (the masked classes), plus
/// unmasked fields that must come back unchanged.
#[derive(Clone, Debug)]
struct Record {
    secret: String,
    account: u64,
    name: String,
    big: String,
    keep: bool,
}

/// Values of the masked classes start with a marker no other field contains, so that a
/// value found in the output can only be a survivor, never an accident.
fn records() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(
        ("[^«»]{8,24}", 10_000_000u64..u64::MAX, "[^«»]{0,16}", "[1-9][0-9]{20,40}", any::<bool>()),
        0..12,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (secret, account, name, big, keep))| Record {
                secret: format!("«{i}»{secret}"),
                account,
                name,
                big,
                keep,
            })
            .collect()
    })
}

fn strategy() -> impl Strategy<Value = MaskStrategy> {
    prop_oneof![
        Just(MaskStrategy::Redact),
        Just(MaskStrategy::Hash),
        Just(MaskStrategy::ShowLast4),
        Just(MaskStrategy::ShowFirst1),
        Just(MaskStrategy::Null),
        Just(MaskStrategy::Remove),
    ]
}

/// The body: `big` is written as a raw number token that no `f64` holds.
fn body(records: &[Record]) -> String {
    let items: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "id": i,
                "secret": r.secret,
                "contact": {"account": r.account},
                "name": r.name,
                "big": format!("BIG{i}"),
                "keep": r.keep,
            })
        })
        .collect();
    let mut text = json!({"items": items}).to_string();
    for (i, r) in records.iter().enumerate() {
        text = text.replace(&format!("\"BIG{i}\""), &r.big);
    }
    text
}

fn plan(strategy: MaskStrategy, general: bool, filtered: bool) -> Plan {
    let (secret, account) = if general {
        // the same locations through filter selectors, which take the located-query path
        ("$.items[?@.secret].secret", "$.items[?@.contact].contact.account")
    } else {
        ("$.items[*].secret", "$.items[*].contact.account")
    };
    let class = |name: &str, path: &str| ClassMask {
        class: name.to_owned(),
        paths: vec![JsonPath::parse(path).unwrap()],
        strategy,
    };
    Plan {
        records: Some(JsonPath::parse("$.items[*]").unwrap()),
        row_filter: filtered.then(|| Expr::compile("record.keep == true", Scope::RowFilter).unwrap()),
        masks: vec![class("secret", secret), class("account", account)],
        max_records: None,
        on_exceed: ExceedAction::Truncate,
        record_id: Some(JsonPath::parse("$.id").unwrap()),
        cache: Default::default(),
    }
}

fn run(body: &str, plan: &Plan) -> String {
    let vars = Vars::new(
        &RequestVars::default(),
        Some(&UserVars { id: "u".into(), attributes: BTreeMap::new() }),
        None,
    );
    let out = apply(body.as_bytes(), plan, &vars, &HashKey::new("k")).unwrap();
    match out.outcome {
        Outcome::Body(b) => String::from_utf8(b).unwrap(),
        Outcome::RootFiltered => panic!("no root record"),
    }
}

/// Every string (keys included) and number text of a document.
fn leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                leaves(v, out);
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// No value of a masked class survives anywhere in the output; unmasked fields (unicode
    /// strings, numbers beyond f64) come back exactly.
    #[test]
    fn masked_values_do_not_survive(
        records in records(),
        strategy in strategy(),
        general in any::<bool>(),
        filtered in any::<bool>(),
    ) {
        let body = body(&records);
        let text = run(&body, &plan(strategy, general, filtered));
        // big numbers are raw tokens: compare them textually, the rest structurally
        for r in &records {
            if !filtered || r.keep {
                let expected = format!("\"big\":{},", r.big);
                prop_assert!(text.contains(&expected), "{} missing", r.big);
            }
        }
        let mut cleaned = text.clone();
        for r in &records {
            cleaned = cleaned.replace(&r.big, "0");
        }
        let doc: Value = serde_json::from_str(&cleaned).unwrap();
        let mut all = Vec::new();
        leaves(&doc, &mut all);
        for r in &records {
            prop_assert!(!all.iter().any(|s| s.contains(&r.secret)), "secret survived");
            let account = r.account.to_string();
            prop_assert!(!all.iter().any(|s| s.contains(&account)), "account survived");
            prop_assert!(!text.contains(&account), "account survived in the text");
        }
        let items = doc["items"].as_array().unwrap();
        let kept: Vec<&Record> = records.iter().filter(|r| !filtered || r.keep).collect();
        prop_assert_eq!(items.len(), kept.len());
        for (item, r) in items.iter().zip(kept) {
            prop_assert_eq!(item["name"].as_str(), Some(r.name.as_str()));
            match strategy {
                MaskStrategy::Remove => {
                    prop_assert!(item.get("secret").is_none());
                    prop_assert_eq!(&item["contact"], &json!({}));
                }
                MaskStrategy::Null => prop_assert!(item["secret"].is_null()),
                MaskStrategy::ShowLast4 => {
                    let s = item["secret"].as_str().unwrap();
                    let n = r.secret.chars().count();
                    let tail: String = r.secret.chars().skip(n - 4).collect();
                    prop_assert_eq!(s, format!("{}{}", "*".repeat(n - 4), tail));
                }
                MaskStrategy::ShowFirst1 => {
                    let s = item["secret"].as_str().unwrap();
                    prop_assert!(s.starts_with('«'));
                    prop_assert_eq!(s.chars().count(), r.secret.chars().count());
                }
                _ => {}
            }
        }
    }

    /// Simple paths (walked directly) and filter paths (located queries) select the same
    /// locations, so the outputs are identical.
    #[test]
    fn simple_and_general_paths_agree(
        records in records(),
        strategy in strategy(),
        filtered in any::<bool>(),
    ) {
        let body = body(&records);
        prop_assert_eq!(
            run(&body, &plan(strategy, false, filtered)),
            run(&body, &plan(strategy, true, filtered))
        );
    }

    /// Arbitrary bytes never panic: they transform or fail with an error.
    #[test]
    fn arbitrary_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let vars = Vars::new(&RequestVars::default(), None, None);
        let _ = apply(&bytes, &plan(MaskStrategy::Hash, false, true), &vars, &HashKey::new("k"));
    }

    /// JSON-ish bodies (valid JSON with big numbers, cut and spliced with JSON punctuation)
    /// never panic; what transforms comes back non-empty.
    #[test]
    fn mutated_json_never_panics(
        records in records(),
        cut in any::<prop::sample::Index>(),
        junk in "[\\[\\]{}\",:0-9eE.+-]{0,4}",
    ) {
        let body = body(&records);
        let mut at = cut.index(body.len() + 1);
        while !body.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &body[..at], junk, &body[at..]);
        let vars = Vars::new(&RequestVars::default(), None, None);
        let plan = plan(MaskStrategy::ShowLast4, false, true);
        if let Ok(out) = apply(mutated.as_bytes(), &plan, &vars, &HashKey::new("k"))
            && let Outcome::Body(b) = out.outcome
        {
            prop_assert!(!b.is_empty());
        }
    }
}
