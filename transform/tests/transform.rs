//! End-to-end behaviour of `apply`: row filters, caps, record ids, masks, bad bodies,
//! unicode and numbers.
//!
//! Every call also runs the parsed-document path and, where it takes the plan and body, the
//! streaming path, and checks that both agree with `apply` (`common::checked`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{checked, vars};
use custos_api::policy::{ExceedAction, MaskStrategy};
use custos_transform::expr::{Expr, Scope};
use custos_transform::{
    ClassMask, HashKey, Outcome, Plan, TransformError, TransformStats, Transformed, apply_dom,
    apply_streaming,
};
use serde_json::{Value, json};
use serde_json_path::JsonPath;

fn key() -> HashKey {
    HashKey::new(b"test-key".to_vec())
}

fn path(p: &str) -> JsonPath {
    JsonPath::parse(p).unwrap()
}

fn filter(src: &str) -> Option<Expr> {
    Some(Expr::compile(src, Scope::RowFilter).unwrap())
}

fn mask(class: &str, paths: &[&str], strategy: MaskStrategy) -> ClassMask {
    ClassMask { class: class.into(), paths: paths.iter().map(|p| path(p)).collect(), strategy }
}

fn masks(masks: Vec<ClassMask>) -> Plan {
    Plan { masks, ..Plan::default() }
}

fn transform(body: &str, plan: &Plan) -> Result<Transformed, TransformError> {
    checked(body.as_bytes(), plan, &key())
}

/// The output of the parsed-document path alone.
fn dom_text(body: &str, plan: &Plan) -> String {
    match apply_dom(body.as_bytes(), plan, &vars(), &key()).unwrap().outcome {
        Outcome::Body(b) => String::from_utf8(b).unwrap(),
        Outcome::RootFiltered => panic!("root filtered"),
    }
}

/// The output of the streaming path alone (which must take the plan and body).
fn streamed_text(body: &str, plan: &Plan) -> String {
    match apply_streaming(body.as_bytes(), plan, &key()).expect("streamed").unwrap().outcome {
        Outcome::Body(b) => String::from_utf8(b).unwrap(),
        Outcome::RootFiltered => panic!("root filtered"),
    }
}

/// The output body as text and the stats.
fn run_text(body: &str, plan: &Plan) -> (String, TransformStats) {
    let t = transform(body, plan).unwrap();
    match t.outcome {
        Outcome::Body(b) => (String::from_utf8(b).unwrap(), t.stats),
        Outcome::RootFiltered => panic!("root filtered"),
    }
}

fn run(body: &str, plan: &Plan) -> (Value, TransformStats) {
    let (text, stats) = run_text(body, plan);
    (serde_json::from_str(&text).unwrap(), stats)
}

fn customers() -> String {
    json!({
        "items": [
            {"id": 1, "name": "Alice", "phone": "13800000001", "branch": "b1"},
            {"id": 2, "name": "Bob", "phone": "13800000002", "branch": "b2"},
            {"id": 3, "name": "Carol", "phone": "13800000003", "branch": "b1"},
            {"id": 4, "name": "Dan", "phone": "13800000004", "branch": "b3"},
            {"id": 5, "name": "Eve", "phone": "13800000005", "branch": "b1"}
        ],
        "total": 5
    })
    .to_string()
}

fn ids(doc: &Value) -> Vec<i64> {
    doc["items"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

// ---- masks -------------------------------------------------------------------------------

#[test]
fn each_mask_strategy() {
    let body = r#"{"a":"13812345678","b":"张三丰","c":{"x":1},"d":[1,2,3],"e":42,"f":"keep"}"#;
    let cases: Vec<(MaskStrategy, Value)> = vec![
        (MaskStrategy::Redact, json!("[REDACTED]")),
        (MaskStrategy::ShowLast4, json!("*******5678")),
        (MaskStrategy::ShowFirst1, json!("*******5678")),
        (MaskStrategy::Null, Value::Null),
    ];
    for (strategy, expected) in cases {
        let (doc, stats) = run(body, &masks(vec![mask("phone", &["$.a"], strategy)]));
        if strategy == MaskStrategy::ShowFirst1 {
            assert_eq!(doc["a"], json!("1**********"));
        } else {
            assert_eq!(doc["a"], expected, "{strategy:?}");
        }
        assert_eq!(doc["f"], "keep");
        assert_eq!(stats.masked, BTreeMap::from([("phone".to_owned(), 1)]));
    }

    let (doc, _) = run(body, &masks(vec![mask("name", &["$.b"], MaskStrategy::ShowFirst1)]));
    assert_eq!(doc["b"], "张**");
    let (doc, _) = run(body, &masks(vec![mask("name", &["$.b"], MaskStrategy::ShowLast4)]));
    assert_eq!(doc["b"], "***");

    let (doc, stats) = run(body, &masks(vec![mask("phone", &["$.a"], MaskStrategy::Remove)]));
    assert!(doc.get("a").is_none());
    assert_eq!(doc["b"], "张三丰");
    assert_eq!(stats.masked["phone"], 1);
}

#[test]
fn hash_mask_is_keyed_stable_and_prefixed() {
    let body = r#"{"items":[{"e":"a@x.org"},{"e":"b@x.org"},{"e":"a@x.org"}]}"#;
    let plan = masks(vec![mask("email", &["$.items[*].e"], MaskStrategy::Hash)]);
    let (doc, stats) = run(body, &plan);
    let h: Vec<&str> = doc["items"].as_array().unwrap().iter().map(|r| r["e"].as_str().unwrap()).collect();
    assert_eq!(stats.masked["email"], 3);
    assert!(h.iter().all(|h| h.len() == 34 && h.starts_with("h:")));
    assert!(h[0][2..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(h[0], h[2], "equal values hash equally");
    assert_ne!(h[0], h[1]);
    assert_eq!(&h[0][2..], &key().mask_hash_hex(b"a@x.org")[..32]);
    // stable across calls, different under another key
    let (again, _) = run(body, &plan);
    assert_eq!(again, doc);
    let other = checked(body.as_bytes(), &plan, &HashKey::new("other")).unwrap();
    let Outcome::Body(other) = other.outcome else { panic!() };
    assert_ne!(serde_json::from_slice::<Value>(&other).unwrap(), doc);
}

#[test]
fn non_string_values_are_masked_by_their_json_text() {
    let body = r#"{"n":13812345678,"t":true,"o":{"k":"v"},"l":[1,2]}"#;
    let plan = masks(vec![mask("x", &["$.n", "$.t", "$.o", "$.l"], MaskStrategy::ShowLast4)]);
    let (doc, stats) = run(body, &plan);
    // objects and arrays are redacted whole: their text's end would be a member's value
    assert_eq!(doc, json!({"n": "*******5678", "t": "****", "o": "[REDACTED]", "l": "[REDACTED]"}));
    assert_eq!(stats.masked["x"], 4);
    let plan = masks(vec![mask("x", &["$.n"], MaskStrategy::Hash)]);
    let (doc, _) = run(body, &plan);
    assert_eq!(doc["n"].as_str().unwrap()[2..], key().mask_hash_hex(b"13812345678")[..32]);
}

#[test]
fn masking_a_subtree_replaces_or_removes_it_whole() {
    let body = r#"{"addr":{"city":"Z","geo":[1.5,2.5]},"keep":1}"#;
    let (doc, stats) = run(body, &masks(vec![mask("addr", &["$.addr"], MaskStrategy::Redact)]));
    assert_eq!(doc, json!({"addr": "[REDACTED]", "keep": 1}));
    assert_eq!(stats.masked["addr"], 1);
    let (doc, _) = run(body, &masks(vec![mask("addr", &["$.addr"], MaskStrategy::Remove)]));
    assert_eq!(doc, json!({"keep": 1}));
    let (doc, _) = run(body, &masks(vec![mask("addr", &["$.addr"], MaskStrategy::Null)]));
    assert_eq!(doc, json!({"addr": null, "keep": 1}));
}

#[test]
fn remove_from_arrays_minds_index_shifts() {
    let body = r#"{"tags":["a","b","c","d","e"],"rows":[{"t":[1,2,3]},{"t":[4]}]}"#;
    // general path (several selectors): elements 0, 2 and 4 go, in one pass
    let (doc, stats) = run(body, &masks(vec![mask("t", &["$.tags[0,2,4]"], MaskStrategy::Remove)]));
    assert_eq!(doc["tags"], json!(["b", "d"]));
    assert_eq!(stats.masked["t"], 3);
    // simple path with a wildcard: every element
    let (doc, stats) = run(body, &masks(vec![mask("t", &["$.rows[*].t[*]"], MaskStrategy::Remove)]));
    assert_eq!(doc["rows"], json!([{"t": []}, {"t": []}]));
    assert_eq!(stats.masked["t"], 4);
    // negative index
    let (doc, _) = run(body, &masks(vec![mask("t", &["$.tags[-1]"], MaskStrategy::Remove)]));
    assert_eq!(doc["tags"], json!(["a", "b", "c", "d"]));
    // a filter selecting members to remove
    let (doc, stats) =
        run(body, &masks(vec![mask("t", &["$.tags[?@ == 'b' || @ == 'c']"], MaskStrategy::Remove)]));
    assert_eq!(doc["tags"], json!(["a", "d", "e"]));
    assert_eq!(stats.masked["t"], 2);
}

#[test]
fn descendant_paths_and_overlapping_locations() {
    let body = r#"{"a":{"phone":"111111111","b":{"phone":"222222222"}},"phone":"333333333"}"#;
    let (doc, stats) = run(body, &masks(vec![mask("phone", &["$..phone"], MaskStrategy::ShowLast4)]));
    assert_eq!(doc, json!({"a": {"phone": "*****1111", "b": {"phone": "*****2222"}}, "phone": "*****3333"}));
    assert_eq!(stats.masked["phone"], 3);
    // the same location through two paths of a class is masked once per path
    let plan = masks(vec![mask("phone", &["$.phone", "$['phone']"], MaskStrategy::Redact)]);
    let (doc, stats) = run(body, &plan);
    assert_eq!(doc["phone"], "[REDACTED]");
    assert_eq!(stats.masked["phone"], 2);
}

#[test]
fn paths_matching_nothing_count_zero() {
    let plan = masks(vec![
        mask("phone", &["$.items[*].phone"], MaskStrategy::Redact),
        mask("email", &["$.items[*].email", "$.nope"], MaskStrategy::Hash),
    ]);
    let (doc, stats) = run(&customers(), &plan);
    assert_eq!(stats.masked, BTreeMap::from([("email".to_owned(), 0), ("phone".to_owned(), 5)]));
    assert_eq!(doc["items"][0]["name"], "Alice");
    let (doc, _) = run("[1,2]", &plan);
    assert_eq!(doc, json!([1, 2]));
    let (doc, _) = run("\"just a string\"", &plan);
    assert_eq!(doc, json!("just a string"));
}

#[test]
fn masking_the_root() {
    let (doc, stats) = run(r#"{"a":1}"#, &masks(vec![mask("all", &["$"], MaskStrategy::Redact)]));
    assert_eq!(doc, json!("[REDACTED]"));
    assert_eq!(stats.masked["all"], 1);
    let (doc, _) = run(r#"{"a":1}"#, &masks(vec![mask("all", &["$"], MaskStrategy::Remove)]));
    assert_eq!(doc, Value::Null);
}

// ---- records -----------------------------------------------------------------------------

#[test]
fn row_filter_by_user_attribute() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.branch == user.branch"),
        masks: vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)],
        ..Plan::default()
    };
    let (doc, stats) = run(&customers(), &plan);
    assert_eq!(ids(&doc), vec![1, 3, 5]);
    assert_eq!(doc["total"], 5);
    assert_eq!(doc["items"][1]["phone"], "*******0003");
    assert_eq!(stats.records_returned, 3);
    assert_eq!(stats.records_filtered, 2);
    assert_eq!(stats.filter_errors, 0);
    assert_eq!(stats.masked["phone"], 3, "only the records returned are masked");
}

#[test]
fn filter_errors_drop_the_record_and_are_counted() {
    let body = r#"{"items":[{"id":1,"branch":"b1"},{"id":2},{"id":3,"branch":7},{"id":4,"branch":"b2"}]}"#;
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.branch == user.branch"),
        ..Plan::default()
    };
    let (doc, stats) = run(body, &plan);
    assert_eq!(ids(&doc), vec![1]);
    assert_eq!(stats.records_filtered, 3);
    // no `branch`: error; 7 == 'b1': false in CEL (no error); 'b2': false
    assert_eq!(stats.filter_errors, 1);

    // non-bool results are errors too
    let plan = Plan { row_filter: filter("record.id"), ..plan };
    let (doc, stats) = run(body, &plan);
    assert_eq!(ids(&doc), Vec::<i64>::new());
    assert_eq!(stats.filter_errors, 4);
}

#[test]
fn records_that_are_not_objects() {
    let body = r#"{"items":["b1",{"branch":"b1"},3,null,[1]]}"#;
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.branch == user.branch"),
        ..Plan::default()
    };
    let (doc, stats) = run(body, &plan);
    assert_eq!(doc, json!({"items": [{"branch": "b1"}]}));
    assert_eq!(stats.records_filtered, 4);
    assert_eq!(stats.filter_errors, 4);
}

#[test]
fn nested_records() {
    let body = json!({"groups": [
        {"name": "g1", "items": [{"id": 1, "branch": "b1"}, {"id": 2, "branch": "b2"}]},
        {"name": "g2", "items": []},
        {"name": "g3", "items": [{"id": 3, "branch": "b2"}, {"id": 4, "branch": "b1"}]}
    ]})
    .to_string();
    for records in ["$.groups[*].items[*]", "$..items[*]", "$.groups[?@.name].items[*]"] {
        let plan = Plan {
            records: Some(path(records)),
            row_filter: filter("record.branch == user.branch"),
            max_records: Some(10),
            record_id: Some(path("$.id")),
            ..Plan::default()
        };
        let (doc, stats) = run(&body, &plan);
        assert_eq!(
            doc["groups"],
            json!([
                {"name": "g1", "items": [{"id": 1, "branch": "b1"}]},
                {"name": "g2", "items": []},
                {"name": "g3", "items": [{"id": 4, "branch": "b1"}]}
            ]),
            "{records}"
        );
        assert_eq!(stats.records_returned, 2, "{records}");
        assert_eq!(stats.records_filtered, 2, "{records}");
        assert_eq!(stats.record_hashes, vec![key().hash_hex(b"1"), key().hash_hex(b"4")], "{records}");
    }
}

#[test]
fn object_members_as_records() {
    let body = r#"{"byId":{"a":{"branch":"b1"},"b":{"branch":"b2"},"c":{"branch":"b1"}}}"#;
    let plan = Plan {
        records: Some(path("$.byId.*")),
        row_filter: filter("record.branch == user.branch"),
        ..Plan::default()
    };
    let (doc, stats) = run(body, &plan);
    assert_eq!(doc, json!({"byId": {"a": {"branch": "b1"}, "c": {"branch": "b1"}}}));
    assert_eq!(stats.records_returned, 2);
    // a single named member as the record
    let plan = Plan { records: Some(path("$.byId.b")), ..plan };
    let (doc, stats) = run(body, &plan);
    assert_eq!(doc["byId"].as_object().unwrap().len(), 2);
    assert!(doc["byId"].get("b").is_none());
    assert_eq!(stats.records_filtered, 1);
}

#[test]
fn empty_arrays_and_missing_records() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.branch == user.branch"),
        max_records: Some(1),
        on_exceed: ExceedAction::Deny,
        record_id: Some(path("$.id")),
        masks: vec![mask("phone", &["$.items[*].phone"], MaskStrategy::Redact)],
        ..Plan::default()
    };
    let (text, stats) = run_text(r#"{"items":[]}"#, &plan);
    assert_eq!(text, r#"{"items":[]}"#);
    assert_eq!(
        stats,
        TransformStats { masked: BTreeMap::from([("phone".to_owned(), 0)]), ..TransformStats::default() }
    );
    // No container where the records path looks, under a row filter: refused, not passed
    // unfiltered (another shape of response than the policy's).
    for body in [r#"{"other":true}"#, "[]", r#"{"items":null}"#, r#"{"items":"x"}"#, r#"[{"items":[]}]"#] {
        assert!(matches!(transform(body, &plan), Err(TransformError::RecordsNotFound)), "{body}");
    }
    // Without a row filter there is nothing to apply: passed as it is.
    let plan = Plan { row_filter: None, ..plan };
    let (text, stats) = run_text(r#"{"other":true}"#, &plan);
    assert_eq!(text, r#"{"other":true}"#);
    assert_eq!(stats.records_returned, 0);
    let (text, _) = run_text("[]", &plan);
    assert_eq!(text, "[]");
}

#[test]
fn single_root_record() {
    let plan = Plan {
        records: Some(path("$")),
        row_filter: filter("record.branch == user.branch"),
        masks: vec![mask("phone", &["$.phone"], MaskStrategy::ShowLast4)],
        record_id: Some(path("$.id")),
        ..Plan::default()
    };
    let (doc, stats) = run(r#"{"id":"c-9","branch":"b1","phone":"13811112222"}"#, &plan);
    assert_eq!(doc, json!({"id": "c-9", "branch": "b1", "phone": "*******2222"}));
    assert_eq!(stats.records_returned, 1);
    assert_eq!(stats.record_hashes, vec![key().hash_hex(b"c-9")]);

    let t = transform(r#"{"id":"c-9","branch":"b2","phone":"13811112222"}"#, &plan).unwrap();
    assert_eq!(t.outcome, Outcome::RootFiltered);
    assert_eq!(t.stats.records_filtered, 1);
    assert_eq!(t.stats.records_returned, 0);
    assert!(t.stats.record_hashes.is_empty());

    let t = transform(r#"{"id":"c-9"}"#, &plan).unwrap();
    assert_eq!(t.outcome, Outcome::RootFiltered);
    assert_eq!(t.stats.filter_errors, 1);

    // a row filter without a records path filters the whole document
    let plan = Plan { records: None, ..plan };
    let t = transform(r#"{"branch":"b2"}"#, &plan).unwrap();
    assert_eq!(t.outcome, Outcome::RootFiltered);
}

#[test]
fn record_cap_truncate() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        max_records: Some(2),
        on_exceed: ExceedAction::Truncate,
        record_id: Some(path("$.id")),
        ..Plan::default()
    };
    let (doc, stats) = run(&customers(), &plan);
    assert_eq!(ids(&doc), vec![1, 2]);
    assert_eq!(stats.records_returned, 2);
    assert_eq!(stats.records_truncated, 3);
    assert_eq!(stats.record_hashes.len(), 2);

    // the cap counts records after the row filter
    let plan = Plan { row_filter: filter("record.branch == user.branch"), ..plan };
    let (doc, stats) = run(&customers(), &plan);
    assert_eq!(ids(&doc), vec![1, 3]);
    assert_eq!((stats.records_filtered, stats.records_truncated), (2, 1));
}

#[test]
fn record_cap_deny() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        max_records: Some(2),
        on_exceed: ExceedAction::Deny,
        ..Plan::default()
    };
    let err = transform(&customers(), &plan).unwrap_err();
    assert_eq!(err, TransformError::RecordCapExceeded { records: 5, max: 2 });
    assert_eq!(err.to_string(), "response holds 5 records, more than the 2 allowed per response");

    let plan = Plan { row_filter: filter("record.branch == user.branch"), max_records: Some(3), ..plan };
    let (doc, stats) = run(&customers(), &plan);
    assert_eq!(ids(&doc), vec![1, 3, 5]);
    assert_eq!(stats.records_truncated, 0);
    let plan = Plan { max_records: Some(2), ..plan };
    assert_eq!(
        transform(&customers(), &plan).unwrap_err(),
        TransformError::RecordCapExceeded { records: 3, max: 2 }
    );
}

#[test]
fn record_id_hashes() {
    let body = r#"{"items":[{"id":"c-1"},{"id":2},{"id":123456789012345678901234},{"id":null},{},{"id":1.5},{"ref":{"id":"x"}}]}"#;
    let plan = Plan { records: Some(path("$.items[*]")), record_id: Some(path("$.id")), ..Plan::default() };
    let (_, stats) = run(body, &plan);
    let k = key();
    assert_eq!(stats.records_returned, 7);
    assert_eq!(
        stats.record_hashes,
        vec![
            k.hash_hex(b"c-1"),
            k.hash_hex(b"2"),
            k.hash_hex(b"123456789012345678901234"),
            k.hash_hex(b"1.5"),
        ]
    );
    assert!(stats.record_hashes.iter().all(|h| h.len() == 64));
    // a nested id path, through the general query
    let plan = Plan { record_id: Some(path("$..id")), ..plan };
    let (_, stats) = run(body, &plan);
    assert_eq!(stats.record_hashes.last(), Some(&k.hash_hex(b"x")));
}

// ---- bad bodies --------------------------------------------------------------------------

#[test]
fn bad_bodies_are_errors() {
    let plan = masks(vec![mask("phone", &["$.phone"], MaskStrategy::Redact)]);
    assert_eq!(transform("", &plan).unwrap_err(), TransformError::EmptyBody);
    assert_eq!(transform(" \n\t", &plan).unwrap_err(), TransformError::EmptyBody);
    assert_eq!(
        transform("<html>secret</html>", &plan).unwrap_err(),
        TransformError::NotJson { line: 1, column: 1 }
    );
    assert_eq!(
        transform("{\"a\":1,\n \"phone\": 13800000000x}", &plan).unwrap_err(),
        TransformError::NotJson { line: 2, column: 22 }
    );
    assert_eq!(
        transform(r#"{"phone":"1380000"#, &plan).unwrap_err(),
        TransformError::Truncated { line: 1, column: 17 }
    );
    assert!(matches!(transform(r#"{"a":[1,2"#, &plan), Err(TransformError::Truncated { .. })));
    assert!(matches!(transform(r#"{"a":1}{"b":2}"#, &plan), Err(TransformError::NotJson { .. })));
    assert!(matches!(transform("{'a':1}", &plan), Err(TransformError::NotJson { .. })));
    assert!(matches!(transform(&"[".repeat(200), &plan), Err(TransformError::NotJson { .. })));
    let invalid_utf8 = b"{\"phone\":\"\xff\xfe\"}";
    assert!(matches!(checked(invalid_utf8, &plan, &key()), Err(TransformError::NotJson { .. })));
    // a body with inexact numbers reports errors at their place in the original
    assert_eq!(
        transform("[123456789012345678901234, 1e999, x]", &plan).unwrap_err(),
        TransformError::NotJson { line: 1, column: 35 }
    );
    // a big number where only a string may stand is still an error
    assert!(matches!(
        transform(r#"{123456789012345678901234:1}"#, &plan),
        Err(TransformError::NotJson { .. })
    ));
}

#[test]
fn error_messages_hold_no_content() {
    let plan = masks(vec![mask("phone", &["$.phone"], MaskStrategy::Redact)]);
    for body in [r#"{"phone":"13812345678" "name":"Alice"}"#, r#"{"phone":"13812345678"#, "13812345678x"] {
        let msg = transform(body, &plan).unwrap_err().to_string();
        assert!(!msg.contains("1381") && !msg.contains("Alice"), "{msg}");
    }
}

// ---- unicode and numbers -----------------------------------------------------------------

#[test]
fn unicode_survives_in_masked_and_unmasked_fields() {
    let body = json!({
        "name": "王小明",
        "emoji": "👩‍👩‍👧‍👦 family 🎉",
        "combining": "e\u{301}le\u{300}ve",
        "mixed": "Zoë Ørsted-Łukasz 東京 ☎️",
        "escaped": "quote \" backslash \\ newline \n tab \t nul \u{0}",
        "phone": "电话：13812345678",
        "nick": "😀😁😂🤣",
        "first": "Ærøskøbing"
    })
    .to_string();
    let plan = masks(vec![
        mask("phone", &["$.phone"], MaskStrategy::ShowLast4),
        mask("nick", &["$.nick"], MaskStrategy::ShowLast4),
        mask("first", &["$.first"], MaskStrategy::ShowFirst1),
        mask("hash", &["$.emoji"], MaskStrategy::Hash),
    ]);
    let (doc, _) = run(&body, &plan);
    let original: Value = serde_json::from_str(&body).unwrap();
    for field in ["name", "combining", "mixed", "escaped"] {
        assert_eq!(doc[field], original[field], "{field}");
    }
    assert_eq!(doc["phone"], "**********5678");
    assert_eq!(doc["nick"], "****");
    assert_eq!(doc["first"], "Æ*********");
    assert_eq!(doc["emoji"].as_str().unwrap()[2..], key().mask_hash_hex("👩‍👩‍👧‍👦 family 🎉".as_bytes())[..32]);

    // the parsed document writes escapes back as the characters they stand for; the
    // streaming pass keeps what it does not rewrite as it is
    let body = r#"{"a":"\u00e9\ud83d\ude00\/","b":"\u00e9"}"#;
    assert_eq!(dom_text(body, &Plan::default()), "{\"a\":\"é😀/\",\"b\":\"é\"}");
    let plan = masks(vec![mask("b", &["$.b"], MaskStrategy::ShowLast4)]);
    assert_eq!(streamed_text(body, &plan), r#"{"a":"\u00e9\ud83d\ude00\/","b":"*"}"#);
}

#[test]
fn huge_and_precise_numbers_are_kept_as_written() {
    let body = r#"{"big":123456789012345678901234567890,"neg":-98765432109876543210,"pi":3.14159265358979323846264338,"tiny":1e-400,"huge":1.5e400,"u64":18446744073709551615,"i64":-9223372036854775808,"f":0.1,"items":[{"n":100000000000000000000001,"phone":12345678901234567890123}]}"#;
    let plan = masks(vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)]);
    let (text, stats) = run_text(body, &plan);
    assert_eq!(stats.masked["phone"], 1);
    for token in [
        "\"big\":123456789012345678901234567890",
        "\"neg\":-98765432109876543210",
        "\"pi\":3.14159265358979323846264338",
        "\"tiny\":1e-400",
        "\"huge\":1.5e400",
        "\"u64\":18446744073709551615",
        "\"i64\":-9223372036854775808",
        "\"f\":0.1",
        "\"n\":100000000000000000000001",
        "\"phone\":\"*******************0123\"",
    ] {
        assert!(text.contains(token), "{token} missing from {text}");
    }
    // hashing a big number hashes its text
    let plan = masks(vec![mask("phone", &["$.items[*].phone"], MaskStrategy::Hash)]);
    let (doc, _) = run(r#"{"items":[{"phone":12345678901234567890123}]}"#, &plan);
    assert_eq!(
        doc["items"][0]["phone"].as_str().unwrap()[2..],
        key().mask_hash_hex(b"12345678901234567890123")[..32]
    );
    // a masked object holding a big number: its JSON text has the number as written
    let plan = masks(vec![mask("item", &["$.items[0]"], MaskStrategy::Hash)]);
    let (doc, _) = run(r#"{"items":[{"n":100000000000000000000001}]}"#, &plan);
    assert_eq!(
        doc["items"][0].as_str().unwrap()[2..],
        key().mask_hash_hex(br#"{"n":100000000000000000000001}"#)[..32]
    );
}

#[test]
fn big_numbers_in_row_filters_compare_as_doubles() {
    let body = r#"{"items":[{"amount":123456789012345678901234},{"amount":5}]}"#;
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.amount > 1000.0"),
        ..Plan::default()
    };
    let (text, stats) = run_text(body, &plan);
    assert_eq!(text, r#"{"items":[{"amount":123456789012345678901234}]}"#);
    assert_eq!(stats.records_returned, 1);
}

fn phone_plan() -> Plan {
    masks(vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)])
}

/// U+FDD0 in a user's field (raw or escaped) no longer turns number preservation off for
/// the whole response (numbers are wrapped with a noncharacter the body does not hold): a
/// number beyond `f64` elsewhere does not make the body "not JSON" (a 502 for every caller).
#[test]
fn a_noncharacter_in_a_name_does_not_make_the_body_not_json() {
    for name in ["Bob\u{FDD0}", r"Bob\ufdd0", r"Bob\uFDD0", "Bob"] {
        let body = format!(r#"{{"items":[{{"name":"{name}","phone":"+4917612345678"}}],"total":1e400}}"#);
        let (text, stats) = run_text(&body, &phone_plan());
        assert_eq!(stats.masked["phone"], 1, "{body}");
        assert!(text.contains(r#""phone":"**********5678""#), "{body} -> {text}");
        assert!(text.ends_with(r#""total":1e400}"#), "{body} -> {text}");
        // the parsed document alone (the path a row filter takes) too
        let filtered = Plan {
            records: Some(path("$.items[*]")),
            row_filter: filter("record.name != 'x'"),
            ..phone_plan()
        };
        let (text, stats) = run_text(&body, &filtered);
        assert_eq!(stats.records_returned, 1, "{body}");
        assert!(text.contains("\"name\":\"Bob"), "{body} -> {text}");
        assert!(text.ends_with(r#""total":1e400}"#), "{body} -> {text}");
    }
}

/// U+FDD0 in one record's name: another record's big integer id keeps its value and the
/// hash it has without the U+FDD0.
#[test]
fn a_noncharacter_in_a_name_keeps_another_records_big_id_and_its_hash() {
    let plan = Plan { records: Some(path("$.items[*]")), record_id: Some(path("$.id")), ..phone_plan() };
    let list = |name: &str| {
        format!(
            r#"{{"items":[{{"id":"u1","name":"{name}","phone":"+4917612345678"}},{{"id":12345678901234567890123,"name":"Ann","phone":"+4917600000000"}}]}}"#
        )
    };
    let (_, plain) = run_text(&list("Bob"), &plan);
    assert_eq!(plain.record_hashes[1], key().hash_hex(b"12345678901234567890123"));
    for name in ["Bob\u{FDD0}", r"Bob\ufdd0", "\u{FDD0}\u{FDD1}", r"\uFDD0\ufdd1\uFdD2"] {
        let body = list(name);
        let (text, stats) = run_text(&body, &plan);
        assert!(text.contains(r#""id":12345678901234567890123,"#), "{body} -> {text}");
        assert_eq!(stats.record_hashes, plain.record_hashes, "{body}");
        let filtered = Plan { row_filter: filter("record.name != 'x'"), ..plan.clone() };
        let (text, stats) = run_text(&body, &filtered);
        assert!(text.contains(r#""id":12345678901234567890123,"#), "{body} -> {text}");
        assert_eq!(stats.record_hashes, plain.record_hashes, "{body}");
    }
}

/// U+FDD0 and U+FDD1 held: the next free noncharacter marks numbers; the body's own stay
/// strings, even one that reads like a marked number, and mask, hash and filter as the
/// strings they are.
#[test]
fn the_next_free_noncharacter_marks_numbers() {
    let body = "{\"a\":\"\u{FDD0}123\",\"b\":\"\\ufdd1456\",\"c\":\"\u{FDD2}\",\"big\":123456789012345678901234,\"x\":1.5e400}";
    assert_eq!(
        dom_text(body, &Plan::default()),
        "{\"a\":\"\u{FDD0}123\",\"b\":\"\u{FDD1}456\",\"c\":\"\u{FDD2}\",\"big\":123456789012345678901234,\"x\":1.5e400}"
    );
    let hashed = masks(vec![mask("h", &["$.a", "$.b", "$.big"], MaskStrategy::Hash)]);
    let (doc, stats) = run(&body.replace(",\"x\":1.5e400", ""), &hashed);
    assert_eq!(stats.masked["h"], 3);
    let h = |text: &str| format!("h:{}", &key().mask_hash_hex(text.as_bytes())[..32]);
    assert_eq!(doc["a"], h("\u{FDD0}123"));
    assert_eq!(doc["b"], h("\u{FDD1}456"));
    assert_eq!(doc["big"], h("123456789012345678901234"));
    // a row filter sees the body's string as a string and the number as a number
    let plan = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.s == '\u{FDD1}7' && record.n > 1.0"),
        ..Plan::default()
    };
    let body =
        "{\"items\":[{\"s\":\"\\ufdd17\",\"n\":123456789012345678901234},{\"s\":\"\u{FDD0}7\",\"n\":2}]}";
    let (text, stats) = run_text(body, &plan);
    assert_eq!(stats.records_returned, 1);
    assert_eq!(text, "{\"items\":[{\"s\":\"\u{FDD1}7\",\"n\":123456789012345678901234}]}");
}

/// Only a body holding all 32 noncharacters U+FDD0..=U+FDEF loses precision: it has no
/// marker left.
#[test]
fn a_body_holding_all_32_noncharacters_loses_precision_only() {
    let all: String = (0xFDD0..=0xFDEF).filter_map(char::from_u32).collect();
    let body = format!(r#"{{"s":"{all}","big":123456789012345678901234}}"#);
    let (doc, _) = run(&body, &Plan::default());
    assert_eq!(doc["s"], all);
    assert_eq!(doc["big"].as_f64(), Some(1.2345678901234568e23));
}

#[test]
fn numbers_change_spelling_not_value() {
    // the parsed document: serde_json's spelling
    let body = "[1.50,1e2,-0,0.000001,1E+3,2.0]";
    assert_eq!(dom_text(body, &Plan::default()), "[1.5,100.0,-0.0,1e-6,1000.0,2.0]");
    // the streaming pass: as written, also where a mask reads them
    let plan = masks(vec![mask("x", &["$[0]"], MaskStrategy::ShowLast4)]);
    assert_eq!(streamed_text(body, &plan), r#"["***",1e2,-0,0.000001,1E+3,2.0]"#);
    let (text, _) = run_text(body, &plan);
    assert_eq!(text, r#"["***",1e2,-0,0.000001,1E+3,2.0]"#);
}

#[test]
fn output_keeps_the_member_order() {
    let body = "{ \"b\" : [ 1 , 2 ] ,\n \"a\" : { } }";
    // the parsed document: compact
    assert_eq!(dom_text(body, &Plan::default()), r#"{"b":[1,2],"a":{}}"#);
    // the streaming pass: formatting kept
    let plan = masks(vec![mask("x", &["$.b[1]"], MaskStrategy::Redact)]);
    assert_eq!(streamed_text(body, &plan), "{ \"b\" : [ 1 , \"[REDACTED]\" ] ,\n \"a\" : { } }");
}

#[test]
fn removing_a_member_keeps_the_order_of_the_others() {
    let plan = masks(vec![mask("phone", &["$.phone"], MaskStrategy::Remove)]);
    let (text, _) = run_text(r#"{"z":1,"phone":"+86 138 0013 8000","a":2,"m":3}"#, &plan);
    assert_eq!(text, r#"{"z":1,"a":2,"m":3}"#);
}

/// The parsed document asks for room first; the streaming pass does not.
#[test]
fn the_parsed_document_asks_for_room_and_the_streaming_pass_does_not() {
    use custos_transform::{DOCUMENT_BYTES_PER_BODY_BYTE, apply_within};
    let body = r#"{"items":[{"branch":"a","phone":"1"},{"branch":"b","phone":"2"}]}"#;
    let filtered = Plan {
        records: Some(path("$.items[*]")),
        row_filter: filter("record.branch == 'a'"),
        ..Plan::default()
    };
    let asked = std::cell::Cell::new(0);
    let refuse = |needed| {
        asked.set(needed);
        false
    };
    let result = apply_within(body.as_bytes(), &filtered, vars, &key(), refuse);
    let needed = body.len() as u64 * DOCUMENT_BYTES_PER_BODY_BYTE;
    assert!(matches!(result, Err(TransformError::NoRoomForDocument { needed: n }) if n == needed));
    assert_eq!(asked.get(), needed);
    assert!(apply_within(body.as_bytes(), &filtered, vars, &key(), |_| true).is_ok());
    let masking = masks(vec![mask("phone", &["$.items[*].phone"], MaskStrategy::Redact)]);
    let never = |_| panic!("the streaming pass asked for room");
    assert!(apply_within(body.as_bytes(), &masking, vars, &key(), never).is_ok());
}

/// A general records path decides records in the body's order, so that a cap keeps the first
/// ones of the body and the record-id hashes follow it (an object's members are not sorted
/// by name).
#[test]
fn general_records_paths_decide_records_in_the_bodys_order() {
    let plan = Plan {
        records: Some(path("$.items[?@.id]")),
        record_id: Some(path("$.id")),
        max_records: Some(2),
        on_exceed: ExceedAction::Truncate,
        ..Plan::default()
    };
    let body = r#"{"items":{"c":{"id":"1"},"a":{"id":"2"},"b":{"id":"3"}}}"#;
    let (doc, stats) = run(body, &plan);
    assert_eq!(doc, json!({"items": {"c": {"id": "1"}, "a": {"id": "2"}}}));
    assert_eq!(stats.record_hashes, vec![key().hash_hex(b"1"), key().hash_hex(b"2")]);
    assert_eq!(stats.records_truncated, 1);
}
