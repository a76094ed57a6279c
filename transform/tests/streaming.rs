//! The streaming path of `apply` against the parsed-document path: targeted cases, random
//! documents and plans, invalid and hostile bodies.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{assert_agree, checked, differences, vars};
use custos_api::policy::{ExceedAction, MaskStrategy};
use custos_transform::expr::{Expr, Scope};
use custos_transform::{
    ClassMask, HashKey, Outcome, Plan, TransformError, Transformed, apply, apply_dom, apply_streaming,
    streaming_eligible,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use serde_json_path::JsonPath;

fn key() -> HashKey {
    HashKey::new(b"stream-key".to_vec())
}

fn path(p: &str) -> JsonPath {
    JsonPath::parse(p).unwrap()
}

fn mask(class: &str, paths: &[&str], strategy: MaskStrategy) -> ClassMask {
    ClassMask { class: class.into(), paths: paths.iter().map(|p| path(p)).collect(), strategy }
}

/// Runs both paths, checks they agree and that the streaming path took the body.
fn streamed(body: &str, plan: &Plan) -> (String, Transformed) {
    let dom = apply_dom(body.as_bytes(), plan, &vars(), &key());
    let streamed = apply_streaming(body.as_bytes(), plan, &key()).expect("the streaming path takes it");
    assert_agree(&dom, &streamed, body);
    assert_agree(&dom, &apply(body.as_bytes(), plan, &vars(), &key()), body);
    let t = streamed.unwrap();
    let Outcome::Body(b) = &t.outcome else { panic!("root filtered") };
    (String::from_utf8(b.clone()).unwrap(), t)
}

/// Runs both paths and checks that the streaming path hands the body over.
fn handed_over(body: &str, plan: &Plan) {
    assert!(apply_streaming(body.as_bytes(), plan, &key()).is_none(), "streamed: {body}");
    checked(body.as_bytes(), plan, &key()).ok();
}

fn sidecar_body() -> String {
    let items: Vec<Value> = (0..18)
        .map(|i| {
            json!({
                "id": format!("C{:05}", 1000 + i),
                "name": format!("Customer Name {i}"),
                "phone": format!("+86 138 {:04} {:04}", 1000 + i, 2000 + i),
                "branch": format!("HB-{:02}", i % 3),
                "city": "Wuhan",
                "parcels": i * 3,
            })
        })
        .collect();
    serde_json::to_string(&json!({"items": items, "page": 1})).unwrap()
}

// ---- targeted ----------------------------------------------------------------------------

#[test]
fn the_sidecar_plan_is_streamed_and_rewrites_only_masked_values() {
    let body = sidecar_body();
    let plan = Plan {
        records: Some(path("$.items[*]")),
        masks: vec![
            mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4),
            mask("name", &["$.items[*].name"], MaskStrategy::ShowFirst1),
        ],
        record_id: Some(path("$.id")),
        ..Plan::default()
    };
    assert!(streaming_eligible(&plan));
    let (text, t) = streamed(&body, &plan);
    assert_eq!(t.stats.records_returned, 18);
    assert_eq!(t.stats.masked["phone"], 18);
    assert_eq!(t.stats.masked["name"], 18);
    assert_eq!(t.stats.record_hashes[0], key().hash_hex(b"C01000"));
    // everything but the masked values is the original text
    let mut expected = body.clone();
    for i in 0..18 {
        expected = expected
            .replace(
                &format!("+86 138 {:04} {:04}", 1000 + i, 2000 + i),
                &format!("{}{:04}", "*".repeat(13), 2000 + i),
            )
            .replace(
                &format!("\"Customer Name {i}\""),
                &format!("\"C{}\"", "*".repeat(13 + i.to_string().len())),
            );
    }
    assert_eq!(text, expected);
}

#[test]
fn removal_takes_the_right_commas() {
    let body = "{ \"a\" : 1 , \"b\" : [ 1 , 2 , 3 ] ,\n \"c\" : {\"x\":1} , \"d\":\"4\" }";
    let names = ["a", "b", "c", "d"];
    for subset in 1..16u32 {
        let removed: Vec<&str> =
            names.iter().enumerate().filter(|(i, _)| subset & 1 << i != 0).map(|(_, n)| *n).collect();
        let paths: Vec<String> = removed.iter().map(|n| format!("$.{n}")).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let plan = Plan { masks: vec![mask("x", &paths, MaskStrategy::Remove)], ..Plan::default() };
        let (text, t) = streamed(body, &plan);
        let doc: Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
        let kept: Vec<&str> = names.iter().copied().filter(|n| !removed.contains(n)).collect();
        assert_eq!(keys, kept, "{text}");
        assert_eq!(t.stats.masked["x"], removed.len() as u64);
    }
    // array elements: every one, and members of objects in arrays
    let (text, _) = streamed(
        body,
        &Plan { masks: vec![mask("x", &["$.b[*]"], MaskStrategy::Remove)], ..Plan::default() },
    );
    assert_eq!(text, "{ \"a\" : 1 , \"b\" : [  ] ,\n \"c\" : {\"x\":1} , \"d\":\"4\" }");
    for i in 0..3 {
        let plan =
            Plan { masks: vec![mask("x", &[&format!("$.b[{i}]")], MaskStrategy::Remove)], ..Plan::default() };
        let (text, _) = streamed(body, &plan);
        let mut b = vec![1, 2, 3];
        b.remove(i);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["b"], json!(b));
    }
    // the root: Remove leaves null, as in the parsed document
    let (text, _) =
        streamed(body, &Plan { masks: vec![mask("x", &["$"], MaskStrategy::Remove)], ..Plan::default() });
    assert_eq!(text, "null");
}

/// Stars over ASCII text keep the body's length and are written into one copy of it; the
/// first edit of another length (a removal, a value of another length, a partial mask of
/// non-ASCII text) leaves that mode, wherever it comes, and later stars still land right.
#[test]
fn length_keeping_and_length_changing_edits_mix() {
    let body = r#"{"a":"abcdef","b":"xyz123","c":"王小明","d":"ghijkl","e":[1,"mnopqr"],"f":7}"#;
    let cases: [(&[(&str, MaskStrategy)], &str); 7] = [
        (
            &[("$.a", MaskStrategy::ShowLast4), ("$.d", MaskStrategy::ShowFirst1)],
            r#"{"a":"**cdef","b":"xyz123","c":"王小明","d":"g*****","e":[1,"mnopqr"],"f":7}"#,
        ),
        (
            &[
                ("$.a", MaskStrategy::ShowLast4),
                ("$.b", MaskStrategy::Remove),
                ("$.d", MaskStrategy::ShowLast4),
            ],
            r#"{"a":"**cdef","c":"王小明","d":"**ijkl","e":[1,"mnopqr"],"f":7}"#,
        ),
        (
            &[("$.b", MaskStrategy::Remove), ("$.a", MaskStrategy::ShowLast4)],
            r#"{"a":"**cdef","c":"王小明","d":"ghijkl","e":[1,"mnopqr"],"f":7}"#,
        ),
        (
            &[("$.a", MaskStrategy::Remove), ("$.b", MaskStrategy::ShowLast4)],
            r#"{"b":"**z123","c":"王小明","d":"ghijkl","e":[1,"mnopqr"],"f":7}"#,
        ),
        (
            &[
                ("$.a", MaskStrategy::ShowFirst1),
                ("$.b", MaskStrategy::Redact),
                ("$.e[1]", MaskStrategy::ShowLast4),
            ],
            r#"{"a":"a*****","b":"[REDACTED]","c":"王小明","d":"ghijkl","e":[1,"**opqr"],"f":7}"#,
        ),
        (
            &[
                ("$.a", MaskStrategy::ShowLast4),
                ("$.c", MaskStrategy::ShowFirst1),
                ("$.d", MaskStrategy::ShowLast4),
            ],
            r#"{"a":"**cdef","b":"xyz123","c":"王**","d":"**ijkl","e":[1,"mnopqr"],"f":7}"#,
        ),
        (
            &[("$.d", MaskStrategy::ShowLast4), ("$.f", MaskStrategy::Remove)],
            r#"{"a":"abcdef","b":"xyz123","c":"王小明","d":"**ijkl","e":[1,"mnopqr"]}"#,
        ),
    ];
    for (masks, expected) in cases {
        let masks = masks.iter().map(|(p, strategy)| mask(p, &[p], *strategy)).collect();
        let (text, _) = streamed(body, &Plan { masks, ..Plan::default() });
        assert_eq!(text, expected);
    }
}

/// A key matches a name of the plan only when it is that name: names and keys sharing
/// prefixes around eight bytes (one word of the string scan), escaped, holding a NUL, empty,
/// not ASCII, and keys too near the end of the body for a word to follow them.
#[test]
fn keys_match_names_exactly_around_eight_bytes() {
    let body = r#"{"custom":1,"customer":2,"customers":3,"customerA":4,"customerB":5,"o":{"cust\u006fmer":6,"ab\u0000":8},"ab":7,"":9,"a":10,"名字":11,"名字x":12,"z":13}"#;
    let cases: [(&str, &[&str]); 12] = [
        ("$.custom", &["custom"]),
        ("$.customer", &["customer"]),
        ("$.o.customer", &["cust\\u006fmer"]),
        ("$.o.ab", &[]),
        ("$.customers", &["customers"]),
        ("$.customerA", &["customerA"]),
        ("$.customerB", &["customerB"]),
        ("$.ab", &["ab"]),
        ("$['']", &[""]),
        ("$.a", &["a"]),
        ("$['名字']", &["名字"]),
        ("$.z", &["z"]),
    ];
    for (mask_path, keys) in cases {
        let plan = Plan { masks: vec![mask("c", &[mask_path], MaskStrategy::Null)], ..Plan::default() };
        let mut expected = body.to_owned();
        for key in keys {
            let member = format!("\"{key}\":");
            let at = expected.find(&member).unwrap() + member.len();
            let end = at + expected[at..].find([',', '}']).unwrap();
            expected.replace_range(at..end, "null");
        }
        let (out, t) = streamed(body, &plan);
        assert_eq!(out, expected, "{mask_path}");
        assert_eq!(t.stats.masked.get("c").copied().unwrap_or(0), keys.len() as u64, "{mask_path}");
    }
}

#[test]
fn masks_compose_in_plan_order() {
    let body = r#"{"a":{"b":"secret-1","c":[1,2]},"d":"13812345678","e":[{"f":1},{"f":2}]}"#;
    let cases: Vec<Vec<ClassMask>> = vec![
        // a later mask masks what an earlier one wrote
        vec![mask("p", &["$.d"], MaskStrategy::Redact), mask("q", &["$.d"], MaskStrategy::Hash)],
        // the same location through two paths of one class: masked twice, counted twice
        vec![mask("p", &["$.d", "$['d']"], MaskStrategy::Hash)],
        // an inner mask first, then the whole subtree by its (masked) text
        vec![mask("p", &["$.a.b"], MaskStrategy::ShowFirst1), mask("q", &["$.a"], MaskStrategy::ShowLast4)],
        // the subtree first: the inner path then finds a string and masks nothing
        vec![mask("q", &["$.a"], MaskStrategy::Null), mask("p", &["$.a.b"], MaskStrategy::Redact)],
        // removed, then nothing left for a later mask
        vec![mask("p", &["$.e[*]"], MaskStrategy::Remove), mask("q", &["$.e[0].f"], MaskStrategy::Redact)],
        vec![mask("q", &["$.e[0].f"], MaskStrategy::Redact), mask("p", &["$.e[*]"], MaskStrategy::Remove)],
        vec![mask("p", &["$.a.c[1]"], MaskStrategy::Remove), mask("q", &["$.a"], MaskStrategy::Hash)],
        // classes sharing a name add up
        vec![mask("p", &["$.d"], MaskStrategy::Redact), mask("p", &["$.e[*].f"], MaskStrategy::Null)],
        // wildcards over objects
        vec![mask("p", &["$.*"], MaskStrategy::ShowLast4), mask("q", &["$.a.*"], MaskStrategy::Redact)],
        vec![mask("q", &["$.a.*"], MaskStrategy::Remove), mask("p", &["$.*"], MaskStrategy::ShowLast4)],
    ];
    for masks in cases {
        let plan = Plan { masks, ..Plan::default() };
        streamed(body, &plan);
    }
}

#[test]
fn records_and_ids_are_taken_before_masks() {
    let body = r#"{"items":[{"id":"x-1","p":"1"},{"id":12,"p":"2"},{"id":1.50,"p":"3"},{"id":"\u0041\n"},{"id":-0},{"id":123456789012345678901234},{"ref":{"id":1}},{"id":[1]},7]}"#;
    let id_masks = [
        vec![],
        vec![mask("id", &["$.items[*].id"], MaskStrategy::Hash)],
        vec![mask("all", &["$.items"], MaskStrategy::Redact)],
        vec![mask("one", &["$.items[1]"], MaskStrategy::Remove)],
        vec![mask("all", &["$"], MaskStrategy::Null)],
    ];
    for masks in id_masks {
        for id in ["$.id", "$.*", "$", "$.ref.id"] {
            let plan = Plan {
                records: Some(path("$.items[*]")),
                record_id: Some(path(id)),
                masks: masks.clone(),
                ..Plan::default()
            };
            let (_, t) = streamed(body, &plan);
            assert_eq!(t.stats.records_returned, 9);
        }
    }
    // records at the root and ids of scalar records
    let plan = Plan { records: Some(path("$")), record_id: Some(path("$")), ..Plan::default() };
    let (_, t) = streamed("\"c-1\"", &plan);
    assert_eq!(t.stats.record_hashes, vec![key().hash_hex(b"c-1")]);
    let plan = Plan { records: Some(path("$[*]")), record_id: Some(path("$")), ..Plan::default() };
    let (_, t) = streamed("[1, 2.0, \"x\", null, {}]", &plan);
    assert_eq!(t.stats.record_hashes.len(), 3);
    assert_eq!(t.stats.record_hashes[1], key().hash_hex(b"2.0"));
}

/// Past `MAX_RECORD_HASHES` ids are counted, not hashed, on every path (a record's ids read
/// from the body, from a masked subtree, and through the parsed document).
#[test]
fn record_hashes_stop_at_their_limit_and_the_rest_are_counted() {
    let n = custos_transform::MAX_RECORD_HASHES + 50;
    let items: Vec<String> = (0..n).map(|i| format!(r#"{{"id":{i},"p":"x"}}"#)).collect();
    let body = format!(r#"{{"items":[{}]}}"#, items.join(","));
    for masks in [
        vec![],
        vec![mask("all", &["$.items"], MaskStrategy::Redact)],
        vec![mask("p", &["$.items[*].p"], MaskStrategy::Null)],
    ] {
        let plan = Plan {
            records: Some(path("$.items[*]")),
            record_id: Some(path("$.id")),
            masks: masks.clone(),
            ..Plan::default()
        };
        let (_, t) = streamed(&body, &plan);
        assert_eq!(t.stats.records_returned, n as u64);
        assert_eq!(t.stats.record_hashes.len(), custos_transform::MAX_RECORD_HASHES, "{masks:?}");
        assert_eq!(t.stats.record_hashes_omitted, 50, "{masks:?}");
        assert_eq!(t.stats.record_hashes[0], key().hash_hex(b"0"));
        assert_eq!(t.stats.record_hashes.last(), Some(&key().hash_hex(b"9999")));
    }
}

#[test]
fn caps_are_counted_and_exceeded_caps_handed_over() {
    let body = sidecar_body();
    for (max, on_exceed) in [(18, ExceedAction::Deny), (100, ExceedAction::Truncate)] {
        let plan =
            Plan { records: Some(path("$.items[*]")), max_records: Some(max), on_exceed, ..Plan::default() };
        let (_, t) = streamed(&body, &plan);
        assert_eq!(t.stats.records_returned, 18);
    }
    for (max, on_exceed) in
        [(17, ExceedAction::Deny), (0, ExceedAction::Truncate), (3, ExceedAction::Truncate)]
    {
        let plan =
            Plan { records: Some(path("$.items[*]")), max_records: Some(max), on_exceed, ..Plan::default() };
        handed_over(&body, &plan);
        let result = apply(body.as_bytes(), &plan, &vars(), &key());
        match on_exceed {
            ExceedAction::Deny => {
                assert_eq!(result.unwrap_err(), TransformError::RecordCapExceeded { records: 18, max })
            }
            ExceedAction::Truncate => assert_eq!(result.unwrap().stats.records_truncated, 18 - max),
        }
    }
    // records counted inside a masked subtree count towards the cap too
    let plan = Plan {
        records: Some(path("$.items[*]")),
        max_records: Some(2),
        masks: vec![mask("all", &["$.items"], MaskStrategy::Redact)],
        ..Plan::default()
    };
    handed_over(&body, &plan);
}

#[test]
fn what_the_streaming_path_hands_over() {
    let phone = || vec![mask("phone", &["$.phone"], MaskStrategy::Redact)];
    let plan = Plan { masks: phone(), ..Plan::default() };
    // a duplicate key where a path looks; elsewhere it does not matter
    handed_over(r#"{"phone":"1","phone":"2"}"#, &plan);
    handed_over(r#"{"phone":"1","ph\u006fne":"2"}"#, &plan);
    streamed(r#"{"phone":"1","x":{"a":1,"a":2},"y":1,"y":[]}"#, &plan);
    // also after the record id was found: the parsed document reads the last duplicate
    let ids = |records: &str, id: &str| Plan {
        records: Some(path(records)),
        record_id: Some(path(id)),
        ..Plan::default()
    };
    handed_over(r#"{"name":"a","name":"b"}"#, &ids("$", "$.name"));
    handed_over(r#"{"items":[{"a":{"id":1},"a":{"id":2}}]}"#, &ids("$.items[*]", "$.a.id"));
    handed_over(r#"{"items":[{"a":{"id":1,"id":2}}]}"#, &ids("$.items[*]", "$.*.id"));
    streamed(r#"{"items":[{"a":{"id":1},"b":{"id":2}},{"a":{"id":3}}]}"#, &ids("$.items[*]", "$.*.id"));
    let wildcard = Plan { masks: vec![mask("all", &["$.*"], MaskStrategy::Redact)], ..Plan::default() };
    handed_over(r#"{"a":1,"b":2,"a":3}"#, &wildcard);
    // U+FDD0..=U+FDEF: streamed (the parsed document marks numbers with one the body does
    // not hold), but for all 32 in one body (it has none left and loses precision)
    streamed("{\"phone\":\"1\",\"s\":\"\u{FDD0}\",\"big\":123456789012345678901234}", &plan);
    streamed(r#"{"phone":"1","s":"\uFDD0","big":123456789012345678901234}"#, &plan);
    streamed(r#"{"s":"\ufdd0"}"#, &plan);
    let all: Vec<String> = (0xFDD0..=0xFDEFu32).map(|c| format!("\\u{c:04x}")).collect();
    let body = |all: &[String]| format!(r#"{{"phone":"1","s":"{}","big":1e400}}"#, all.concat());
    streamed(&body(&all[1..]), &plan);
    streamed(&body(&all[..31]), &plan);
    handed_over(&body(&all), &plan);
    handed_over(&body(&all).replace("\\ufdd5", "\u{FDD5}"), &plan);
    // escaped lone surrogates: streamed (copied as they are where no path looks), and both
    // paths read each as U+FFFD (a user's string must not make the whole response "not
    // JSON", nor need the parsed document)
    for (s, read) in [
        (r#"\ud800"#, "\u{FFFD}"),
        (r#"\udc00"#, "\u{FFFD}"),
        (r#"\ud800\u0041"#, "\u{FFFD}A"),
        (r#"\ud800x"#, "\u{FFFD}x"),
        (r#"\ud800\n"#, "\u{FFFD}\n"),
        (r#"\udc00\ud800"#, "\u{FFFD}\u{FFFD}"),
        (r#"\ud83d\ude00\udc00"#, "\u{1F600}\u{FFFD}"),
    ] {
        let body = format!(r#"{{"name":"{s}","phone":"+4917612345678"}}"#);
        streamed(&body, &plan);
        let t = checked(body.as_bytes(), &plan, &key()).unwrap_or_else(|e| panic!("{body}: {e}"));
        let Outcome::Body(out) = t.outcome else { panic!("root filtered") };
        let doc: Value = serde_json::from_str(&common::canonical(&out)).unwrap();
        assert_eq!(doc, json!({"name": read, "phone": "[REDACTED]"}), "{body}");
    }
    // a pair stays the character it encodes, and is still streamed
    streamed(r#"{"name":"\ud83d\ude00","phone":"1"}"#, &plan);
    // plans it does not take
    let filter = Some(Expr::compile("true", Scope::RowFilter).unwrap());
    for plan in [
        Plan { row_filter: filter, masks: phone(), ..Plan::default() },
        Plan { masks: vec![mask("p", &["$..phone"], MaskStrategy::Redact)], ..Plan::default() },
        Plan { masks: vec![mask("p", &["$.items[-1]"], MaskStrategy::Redact)], ..Plan::default() },
        Plan { masks: vec![mask("p", &["$.items[0,1]"], MaskStrategy::Redact)], ..Plan::default() },
        Plan { records: Some(path("$.items[?@.x]")), ..Plan::default() },
        Plan { records: Some(path("$.items[*]")), record_id: Some(path("$..id")), ..Plan::default() },
    ] {
        assert!(!streaming_eligible(&plan), "{plan:?}");
        checked(br#"{"items":[{"x":1,"id":1},{"id":2}],"phone":"1"}"#, &plan, &key()).unwrap();
    }
    // a removal by index with no index mask after it is streamed
    let plan = Plan {
        masks: vec![
            mask("q", &["$.items[1]"], MaskStrategy::Redact),
            mask("p", &["$.items[0]"], MaskStrategy::Remove),
            mask("r", &["$.items[*].id"], MaskStrategy::Hash),
        ],
        ..Plan::default()
    };
    assert!(streaming_eligible(&plan));
    let (text, _) = streamed(r#"{"items":[{"x":1,"id":1},{"id":2},{"id":3}]}"#, &plan);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["items"][0], "[REDACTED]");
}

/// Lone surrogates in strings the streaming pass skips, compares or masks need no parsed
/// document: a large body with one is transformed within the memory of the streaming pass.
#[test]
fn lone_surrogates_are_streamed() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        record_id: Some(path("$.id")),
        masks: vec![
            mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4),
            mask("name", &["$.items[*]['n\u{FFFD}']"], MaskStrategy::Redact),
        ],
        ..Plan::default()
    };
    for body in [
        r#"{"items":[{"id":"a\ud800","name":"Bob\ud800","phone":"+49\udc00176"}]}"#,
        r#"{"items":[{"id":"\udfff","n\ud800":1,"phone":"12\ud83d\ude00\udc00"}]}"#,
    ] {
        let (text, t) = streamed(body, &plan);
        assert_eq!(t.stats.masked["phone"], 1, "{text}");
    }
    let (_, t) = streamed(r#"{"items":[{"id":1,"n\ud800":1}]}"#, &plan);
    assert_eq!(t.stats.masked["name"], 1);
    // both keys read as "n\u{FFFD}": a duplicate where a path looks, handed over
    handed_over(r#"{"items":[{"id":"a","n\ud800":"x","n\ufffd":"y"}]}"#, &plan);
    // a body over 2 MiB, 32 MiB of room: the parsed document would need more
    let plan = Plan {
        masks: vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)],
        ..Plan::default()
    };
    let list = |name: &str| {
        let item = format!(r#"{{"name":"{name}","phone":"+4917612345678","note":"{}"}}"#, "x".repeat(60));
        format!(r#"{{"items":[{}]}}"#, vec![item; 24_000].join(","))
    };
    for name in ["Bob", r"Bob\ud800", r"Bob\udc00"] {
        let body = list(name);
        assert!(body.len() > 2 << 20);
        let t =
            custos_transform::apply_within(body.as_bytes(), &plan, vars, &key(), |needed| needed <= 32 << 20)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Outcome::Body(out) = t.outcome else { panic!("root filtered") };
        assert!(
            String::from_utf8(out).unwrap().contains(&format!(r#""name":"{name}","phone":"**********5678""#))
        );
    }
}

/// U+FDD0..=U+FDEF in strings the streaming pass skips, compares or masks need no parsed
/// document either (it marks numbers with one the body does not hold): a large body with a
/// user's U+FDD0 is transformed within the memory of the streaming pass, its numbers kept.
#[test]
fn noncharacters_are_streamed() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        record_id: Some(path("$.id")),
        masks: vec![
            mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4),
            mask("name", &["$.items[*].name"], MaskStrategy::Hash),
            mask("extra", &["$.items[*].extra"], MaskStrategy::Hash),
            mask("total", &["$.total"], MaskStrategy::ShowFirst1),
        ],
        ..Plan::default()
    };
    // decoded where masked (strings, objects holding them and big numbers), as ids, as keys
    for (body, records) in [
        (
            "{\"items\":[{\"id\":\"a\u{FDD0}\",\"name\":\"Bob\u{FDD0}\",\"phone\":\"+49\u{FDD1}176\"},{\"id\":12345678901234567890123,\"extra\":{\"n\":1e400,\"s\":\"\u{FDD0}\u{FDD1}1\"}}],\"total\":1e400}",
            2,
        ),
        (
            r#"{"items":[{"id":"\ufdd0","name":"\uFDD0123","extra":["\uFDD2",123456789012345678901234]}],"total":123456789012345678901234}"#,
            1,
        ),
        (
            r#"{"items":[{"id":12345678901234567890123,"\ufdd0":1,"name":"\ufdd1","extra":{"\ufdd0":1e400}}],"total":"\ufdd0"}"#,
            1,
        ),
    ] {
        let (text, t) = streamed(body, &plan);
        assert_eq!(t.stats.records_returned, records, "{text}");
        let big_id = key().hash_hex(b"12345678901234567890123");
        assert_eq!(
            t.stats.record_hashes.contains(&big_id),
            body.contains("12345678901234567890123,"),
            "{text}"
        );
    }
}

/// A body over 2 MiB with a user's U+FDD0 (raw or escaped) in a name, 32 MiB of room: the
/// parsed document would need more (`NoRoomForDocument`, a 502); the streaming pass takes it
/// and keeps its big numbers and record-id hashes.
#[test]
fn a_large_body_with_a_noncharacter_is_streamed_within_its_room() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        record_id: Some(path("$.id")),
        masks: vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)],
        ..Plan::default()
    };
    let list = |name: &str| {
        let item = format!(
            r#"{{"id":12345678901234567890123,"name":"{name}","phone":"+4917612345678","note":"{}"}}"#,
            "x".repeat(40)
        );
        format!(r#"{{"items":[{}],"total":1e400}}"#, vec![item; 24_000].join(","))
    };
    let within = |body: &str| {
        assert!(body.len() > 2 << 20);
        custos_transform::apply_within(body.as_bytes(), &plan, vars, &key(), |needed| needed <= 32 << 20)
    };
    let plain = within(&list("Bob")).unwrap();
    for name in ["Bob\u{FDD0}", r"Bob\ufdd0", r"Bob\uFDD0", "\u{FDD0}\u{FDD1}", r"Bob\uFDEF"] {
        let t = within(&list(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.stats, plain.stats, "{name}");
        let Outcome::Body(out) = t.outcome else { panic!("root filtered") };
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(&format!(
            r#"{{"id":12345678901234567890123,"name":"{name}","phone":"**********5678","#
        )));
        assert!(out.ends_with(r#""total":1e400}"#));
    }
}

/// A removal by index does not shift the positions later mask paths resolve: each path
/// selects what it selects in the body as it came, on both paths.
#[test]
fn removals_by_index_do_not_shift_later_masks() {
    let body = r#"{"contacts":["+4917600000000","+4917611111111","+4917622222222"]}"#;
    let contacts = |plan: &Plan| {
        let (text, t) = streamed(body, plan);
        (serde_json::from_str::<Value>(&text).unwrap()["contacts"].clone(), t.stats.masked)
    };
    // two classes
    let plan = Plan {
        masks: vec![
            mask("a", &["$.contacts[0]"], MaskStrategy::Remove),
            mask("b", &["$.contacts[1]"], MaskStrategy::Redact),
        ],
        ..Plan::default()
    };
    assert!(streaming_eligible(&plan));
    let (list, masked) = contacts(&plan);
    assert_eq!(list, json!(["[REDACTED]", "+4917622222222"]));
    assert_eq!(masked, [("a".to_owned(), 1), ("b".to_owned(), 1)].into());
    // one class, two paths
    let plan = Plan {
        masks: vec![mask("a", &["$.contacts[0]", "$.contacts[1]"], MaskStrategy::Remove)],
        ..Plan::default()
    };
    let (list, masked) = contacts(&plan);
    assert_eq!(list, json!(["+4917622222222"]));
    assert_eq!(masked, [("a".to_owned(), 2)].into());
    // a removed element is not masked again, nor counted; a wildcard skips it
    let plan = Plan {
        masks: vec![
            mask("a", &["$.contacts[1]"], MaskStrategy::Remove),
            mask("b", &["$.contacts[1]", "$.contacts[*]"], MaskStrategy::ShowLast4),
        ],
        ..Plan::default()
    };
    let (list, masked) = contacts(&plan);
    assert_eq!(list, json!(["**********0000", "**********2222"]));
    assert_eq!(masked, [("a".to_owned(), 1), ("b".to_owned(), 2)].into());
    // inside a value a mask selects whole (decoded by the streaming pass), and a hash of a
    // container reads it as the removals leave it
    let nested = r#"{"x":{"c":[1,2,3]},"y":[[1,2,3],[1,null]]}"#;
    for later in [MaskStrategy::Redact, MaskStrategy::Hash] {
        let plan = Plan {
            masks: vec![
                mask("a", &["$.x.c[0]", "$.y[0][1]"], MaskStrategy::Remove),
                mask("b", &["$.x.c[1]", "$.y[0][2]"], MaskStrategy::Null),
                mask("c", &["$.x", "$.y[*]"], later),
            ],
            ..Plan::default()
        };
        let (text, t) = streamed(nested, &plan);
        let doc: Value = serde_json::from_str(&text).unwrap();
        if later == MaskStrategy::Hash {
            // [1, null] both: the removals were made before hashing
            assert_eq!(doc["y"][0], doc["y"][1], "{text}");
        }
        assert_eq!(t.stats.masked, [("a".to_owned(), 2), ("b".to_owned(), 2), ("c".to_owned(), 3)].into());
    }
    // the parsed document alone (negative indices and general paths are not streamed)
    let dom = |plan: &Plan| {
        let t = checked(body.as_bytes(), plan, &key()).unwrap();
        let Outcome::Body(out) = t.outcome else { panic!("root filtered") };
        serde_json::from_slice::<Value>(&out).unwrap()["contacts"].clone()
    };
    for (remove, redact, expected) in [
        ("$.contacts[0]", "$.contacts[-2]", json!(["[REDACTED]", "+4917622222222"])),
        ("$.contacts[0,2]", "$.contacts[1]", json!(["[REDACTED]"])),
        ("$.contacts[-3]", "$.contacts[1:]", json!(["[REDACTED]", "[REDACTED]"])),
        ("$.contacts[?@ == '+4917600000000']", "$.contacts[1]", json!(["[REDACTED]", "+4917622222222"])),
    ] {
        let plan = Plan {
            masks: vec![
                mask("a", &[remove], MaskStrategy::Remove),
                mask("b", &[redact], MaskStrategy::Redact),
            ],
            ..Plan::default()
        };
        assert_eq!(dom(&plan), expected, "{remove} then {redact}");
    }
}

#[test]
fn plans_of_up_to_64_paths_are_streamed_and_larger_ones_agree_through_the_parsed_document() {
    // records + id + masks: 64 paths fit the streaming pass's path set, 65 do not
    let body = format!(
        r#"{{"items":[{{"id":1,{}}},{{"id":2,"f0":"x"}}]}}"#,
        (0..70).map(|i| format!(r#""f{i}":"value {i}""#)).collect::<Vec<_>>().join(",")
    );
    for masked in [62u64, 63] {
        let plan = Plan {
            records: Some(path("$.items[*]")),
            record_id: Some(path("$.id")),
            masks: (0..masked)
                .map(|i| mask(&format!("c{i}"), &[&format!("$.items[*].f{i}")], MaskStrategy::ShowLast4))
                .collect(),
            ..Plan::default()
        };
        assert_eq!(streaming_eligible(&plan), masked + 2 <= 64, "{} paths", masked + 2);
        let t = checked(body.as_bytes(), &plan, &key()).unwrap();
        assert_eq!(t.stats.records_returned, 2);
        assert_eq!(t.stats.masked.values().sum::<u64>(), masked + 1);
        if masked + 2 <= 64 {
            streamed(&body, &plan);
        }
    }
}

#[test]
fn invalid_bodies_are_rejected_alike() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        record_id: Some(path("$.id")),
        masks: vec![mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4)],
        ..Plan::default()
    };
    let cases: &[(&[u8], bool)] = &[
        // (body, truncated)
        (b"{\"items\":[{\"phone\":\"1\"", true),
        (b"{\"items\":[{\"phone\":\"1\"}", true),
        (b"{\"items\":[{\"phone\":", true),
        (b"{\"items\":[{\"phone\"", true),
        (b"{\"items\":[{\"ph", true),
        (b"{\"items\":[1,", true),
        (b"{\"items\":[-", true),
        (b"{\"items\":[1.", true),
        (b"{\"items\":[1e+", true),
        (b"{\"items\":[tru", true),
        (b"{\"items\":[\"\\u12", true),
        (b"{\"items\":[\"\\", true),
        (b"{\"items\":[\"\xe4\xbd", true),
        (b"{\"items\":[1,]}", false),
        (b"{\"items\":[1 2]}", false),
        (b"{\"items\":[01]}", false),
        (b"{\"items\":[1.e5]}", false),
        (b"{\"items\":[-a]}", false),
        (b"{\"items\":[trUe]}", false),
        (b"{\"items\":[\"a\x01\"]}", false),
        (b"{\"items\":[\"\\x\"]}", false),
        (b"{\"items\":[\"\\u12G4\"]}", false),
        (b"{\"items\":[\"\xff\"]}", false),
        (b"{\"items\":[{\"id\":\"\xc3\x28\"}]}", false),
        (b"{\"items\":[{\"phone\":\"\xed\xa0\x80\"}]}", false),
        (b"{\"items\":[{\"\xc0\xaf\":1}]}", false),
        (b"{\"items\":[],}", false),
        (b"{\"items\" 1}", false),
        (b"{\"items\":1 \"x\":2}", false),
        (b"{1:2}", false),
        (b"{\"a\":1}}", false),
        (b"[]]", false),
        (b"\xef\xbb\xbf{}", false),
        (b"{\"items\":[\x0c]}", false),
        (b"nul", true),
        (b"\"abc", true),
    ];
    for &(body, truncated) in cases {
        let dom = apply_dom(body, &plan, &vars(), &key());
        let streamed = apply_streaming(body, &plan, &key()).expect("streamed");
        assert_agree(&dom, &streamed, &String::from_utf8_lossy(body));
        let err = streamed.unwrap_err();
        assert_eq!(
            matches!(err, TransformError::Truncated { .. }),
            truncated,
            "{}: {err:?}",
            String::from_utf8_lossy(body)
        );
        // positions name the same place as serde_json's, within a few bytes
        let (TransformError::NotJson { line: l1, column: c1 }
        | TransformError::Truncated { line: l1, column: c1 }) = err
        else {
            panic!()
        };
        let (TransformError::NotJson { line: l2, column: c2 }
        | TransformError::Truncated { line: l2, column: c2 }) = dom.unwrap_err()
        else {
            panic!()
        };
        assert_eq!(l1, l2);
        assert!(c1.abs_diff(c2) <= 4, "{}: {c1} vs {c2}", String::from_utf8_lossy(body));
    }
}

// ---- hostile -----------------------------------------------------------------------------

fn plans_for_hostile() -> Vec<Plan> {
    vec![
        Plan { masks: vec![mask("p", &["$.a"], MaskStrategy::Hash)], ..Plan::default() },
        Plan { masks: vec![mask("p", &["$[0][0]"], MaskStrategy::ShowLast4)], ..Plan::default() },
        Plan { records: Some(path("$[*]")), record_id: Some(path("$.id")), ..Plan::default() },
        Plan { masks: vec![mask("p", &["$.x"], MaskStrategy::Redact)], ..Plan::default() },
    ]
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let n = 100_000;
    let bodies = [
        format!("{}{}", "[".repeat(n), "]".repeat(n)),
        format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)),
        format!("{}{}", "[{\"a\":".repeat(n / 2), "x"),
        format!("{{\"x\":1,\"b\":{}}}", "[".repeat(n)),
        format!("{{\"a\":{}}}", "[".repeat(n)),
        "[".repeat(n),
    ];
    for body in &bodies {
        for plan in plans_for_hostile() {
            let dom = apply_dom(body.as_bytes(), &plan, &vars(), &key());
            assert!(matches!(dom, Err(TransformError::NotJson { .. })), "{dom:?}");
            let streamed = apply_streaming(body.as_bytes(), &plan, &key()).expect("streamed");
            assert_agree(&dom, &streamed, &body[..40]);
        }
    }
    // the limit is where serde_json's is: 127 nested containers pass, 128 do not
    for depth in [126, 127, 128, 129] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let body = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            assert_eq!(serde_json::from_str::<Value>(&body).is_ok(), depth < 128);
            for plan in plans_for_hostile() {
                let dom = apply_dom(body.as_bytes(), &plan, &vars(), &key());
                assert_eq!(dom.is_ok(), depth < 128);
                let streamed = apply_streaming(body.as_bytes(), &plan, &key()).expect("streamed");
                assert_agree(&dom, &streamed, &format!("{open} x {depth}"));
            }
        }
    }
}

#[test]
fn huge_strings() {
    let big = "电话 13812345678 \\\" \\u00e9 ".repeat(200_000);
    let body = format!(r#"{{"a":"{big}","x":"{big}","n":[{{"id":"{big}"}}]}}"#);
    for plan in plans_for_hostile() {
        checked(body.as_bytes(), &plan, &key()).unwrap();
        assert!(apply_streaming(body.as_bytes(), &plan, &key()).is_some());
    }
    let plan = Plan { masks: vec![mask("p", &["$.a"], MaskStrategy::ShowLast4)], ..Plan::default() };
    let (text, _) = streamed(&body, &plan);
    assert!(text.ends_with(&format!(r#"u00e9 ","n":[{{"id":"{big}"}}]}}"#)));
    // truncated inside it
    let mut half = body.len() / 2;
    while !body.is_char_boundary(half) {
        half -= 1;
    }
    let cut = &body[..half];
    for plan in plans_for_hostile() {
        let streamed = apply_streaming(cut.as_bytes(), &plan, &key()).expect("streamed");
        assert!(matches!(streamed, Err(TransformError::Truncated { .. })));
        assert_agree(&apply_dom(cut.as_bytes(), &plan, &vars(), &key()), &streamed, "cut");
    }
}

#[test]
fn invalid_utf8_anywhere() {
    let valid = "{\"a\":\"é\",\"x\":[\"é\",{\"é\":\"é\"}],\"id\":\"é\"}".as_bytes().to_vec();
    let positions: Vec<usize> =
        valid.iter().enumerate().filter(|(_, b)| **b == 0xC3).map(|(i, _)| i).collect();
    assert_eq!(positions.len(), 5);
    for at in positions {
        for bad in [[0xC3, 0x28], [0xFF, 0xA9], [0xC0, 0xA9], [0x80, 0xA9]] {
            let mut body = valid.clone();
            body[at..at + 2].copy_from_slice(&bad);
            for plan in plans_for_hostile().into_iter().chain([Plan {
                records: Some(path("$.x[*]")),
                record_id: Some(path("$['é']")),
                masks: vec![mask("p", &["$.x[*].*", "$.id"], MaskStrategy::ShowFirst1)],
                ..Plan::default()
            }]) {
                let dom = apply_dom(&body, &plan, &vars(), &key());
                assert!(matches!(dom, Err(TransformError::NotJson { .. })), "{dom:?}");
                let streamed = apply_streaming(&body, &plan, &key()).expect("streamed");
                assert_agree(&dom, &streamed, &String::from_utf8_lossy(&body));
            }
        }
    }
}

/// Strings are scanned byte by byte for their first 16 bytes, then 8 bytes at a time: an
/// escape, a quote, a control character, non-ASCII, invalid UTF-8 or U+FDD0 at every offset
/// on either side of that boundary, in keys, masked values and skipped values, is judged as
/// the parsed document judges it.
#[test]
fn strings_are_judged_alike_at_every_offset() {
    let plan = Plan {
        records: Some(path("$.items[*]")),
        masks: vec![
            mask("phone", &["$.items[*].phone"], MaskStrategy::ShowLast4),
            mask("name", &["$.items[*].name"], MaskStrategy::ShowFirst1),
        ],
        ..Plan::default()
    };
    let specials: [(&[u8], bool); 9] = [
        // (bytes, streamed: false where the parsed document must decide)
        (b"\\n", true),
        (b"\\u00e9", true),
        (b"\"", true),
        (b"\x01", true),
        ("é".as_bytes(), true),
        (b"\xff", true),
        ("\u{fdd0}".as_bytes(), true),
        ("\u{fdef}".as_bytes(), true),
        (b"\\uFDD0", true),
    ];
    for len in 0..=40 {
        for at in 0..=len {
            for &(special, takes) in &specials {
                let mut text = vec![b'a'; len];
                text.splice(at..at, special.iter().copied());
                for place in 0..3 {
                    let mut body =
                        b"{\"items\":[{\"phone\":\"0123456789\",\"name\":\"Ann\",\"x\":\"y\"}]}".to_vec();
                    let (before, value) = match place {
                        0 => (&b"\"phone\":\""[..], &b"0123456789"[..]),
                        1 => (&b"\"name\":\""[..], &b"Ann"[..]),
                        _ => (&b"{\""[..], &b"x"[..]),
                    };
                    let from = body.windows(before.len()).position(|w| w == before).unwrap() + before.len();
                    body.splice(from..from + value.len(), text.iter().copied());
                    let label = String::from_utf8_lossy(&body).into_owned();
                    let dom = apply_dom(&body, &plan, &vars(), &key());
                    match apply_streaming(&body, &plan, &key()) {
                        Some(streamed) => assert_agree(&dom, &streamed, &label),
                        None => assert!(!takes, "handed over: {label}"),
                    }
                }
            }
        }
    }
}

// ---- random documents and plans ----------------------------------------------------------

/// Member names, as written (some escaped) and as they read.
const KEYS: [(&str, &str); 8] = [
    ("a", "a"),
    ("b", "b"),
    ("id", "id"),
    ("items", "items"),
    ("phone", "phone"),
    ("name", "name"),
    ("n\\u0061me", "name"),
    ("电话", "电话"),
];

/// A random JSON document, rendered with random whitespace.
#[derive(Clone, Debug)]
enum Node {
    Scalar(String),
    Array(Vec<Node>, usize),
    Object(Vec<(usize, Node)>, usize),
}

const WS: [&str; 5] = ["", " ", "\n  ", "\t", " \r\n "];

fn scalar() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "Z",
        "1",
        " ",
        "\\\"",
        "\\\\",
        "\\n",
        "\\u00e9",
        "\\ud83d\\ude00",
        "é",
        "张",
        "😀",
        "\\/",
        "\\t",
        "，",
        "\u{FDCF}",
        "\u{FFFD}",
        // the noncharacters that mark numbers the parsed document cannot hold
        "\u{FDD0}",
        "\\ufdd0",
        "\\uFDD1",
        "\u{FDD1}",
        "\\uFdE0",
        "\u{FDEF}",
        "+86 138",
        "\\u0000",
    ]);
    prop_oneof![
        3 => prop::collection::vec(pieces, 0..6).prop_map(|p| format!("\"{}\"", p.concat())),
        2 => prop::sample::select(vec![
            "0", "-0", "1", "-17", "3.25", "1.50", "1e2", "1E+3", "-2.5e-3", "123456789012345678901234",
            "-98765432109876543210", "18446744073709551615", "18446744073709551616", "3.14159265358979323846",
            "1e400", "-1e-400", "0.1", "9007199254740993", "0e999999999999", "-0.0E-0",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["true", "false", "null"]).prop_map(str::to_owned),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    scalar().prop_map(Node::Scalar).prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..5), 0..WS.len()).prop_map(|(v, w)| Node::Array(v, w)),
            (prop::collection::vec((0..KEYS.len(), inner), 0..5), 0..WS.len())
                .prop_map(|(m, w)| Node::Object(m, w)),
        ]
    })
}

/// An object with some of `id`, `phone`, `name`, `a`, `电话` (no duplicates), in any order.
fn record() -> impl Strategy<Value = Node> {
    (
        prop::sample::subsequence(vec![2usize, 4, 5, 0, 7], 1..=5).prop_shuffle(),
        prop::collection::vec(prop_oneof![2 => scalar().prop_map(Node::Scalar), 1 => node()], 5),
        0..WS.len(),
    )
        .prop_map(|(keys, values, w)| Node::Object(keys.into_iter().zip(values).collect(), w))
}

/// Documents that often have `items` arrays of records at the root.
fn document() -> impl Strategy<Value = Node> {
    prop_oneof![
        2 => node(),
        3 => (prop::collection::vec(prop_oneof![3 => record(), 1 => node()], 0..6), node(), 0..WS.len())
            .prop_map(|(items, other, w)| Node::Object(vec![(3, Node::Array(items, w)), (0, other)], w)),
    ]
}

fn render(node: &Node, out: &mut String) {
    match node {
        Node::Scalar(s) => out.push_str(s),
        Node::Array(items, w) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(WS[*w]);
                    out.push(',');
                }
                out.push_str(WS[(*w + i) % WS.len()]);
                render(item, out);
            }
            out.push_str(WS[*w]);
            out.push(']');
        }
        Node::Object(members, w) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(WS[(*w + i) % WS.len()]);
                out.push('"');
                out.push_str(KEYS[*k].0);
                out.push('"');
                out.push_str(WS[*w]);
                out.push(':');
                out.push_str(WS[(*w + 1) % WS.len()]);
                render(v, out);
            }
            out.push_str(WS[*w]);
            out.push('}');
        }
    }
}

fn has_duplicate_keys(node: &Node) -> bool {
    match node {
        Node::Scalar(_) => false,
        Node::Array(items, _) => items.iter().any(has_duplicate_keys),
        Node::Object(members, _) => {
            let mut seen = HashSet::new();
            members.iter().any(|(k, _)| !seen.insert(KEYS[*k].1))
                || members.iter().any(|(_, v)| has_duplicate_keys(v))
        }
    }
}

fn json_path() -> impl Strategy<Value = String> {
    let step = prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "id", "items", "phone", "name", "电话"])
            .prop_flat_map(|n| prop_oneof![Just(format!("['{n}']")), Just(format!(".{n}"))]),
        2 => (0..3usize).prop_map(|i| format!("[{i}]")),
        2 => prop::sample::select(vec!["[*]", ".*"]).prop_map(str::to_owned),
    ];
    prop::collection::vec(step, 0..4).prop_map(|steps| format!("${}", steps.concat()))
}

fn strategy() -> impl Strategy<Value = MaskStrategy> {
    prop::sample::select(vec![
        MaskStrategy::Redact,
        MaskStrategy::Hash,
        MaskStrategy::ShowLast4,
        MaskStrategy::ShowFirst1,
        MaskStrategy::Null,
        MaskStrategy::Remove,
    ])
}

fn plan() -> impl Strategy<Value = Plan> {
    let records = prop_oneof![
        1 => Just(None),
        2 => Just(Some("$.items[*]".to_owned())),
        2 => json_path().prop_map(Some),
    ];
    let classes = prop::collection::vec(
        (
            prop::sample::select(vec!["p", "q", "p", "r"]),
            strategy(),
            prop::collection::vec(json_path(), 1..3),
        ),
        1..4,
    );
    let record_id = prop::option::weighted(0.7, prop_oneof![2 => Just("$.id".to_owned()), 1 => json_path()]);
    let max = prop::option::weighted(0.3, (0..6u64, any::<bool>()));
    (records, classes, record_id, max).prop_map(|(records, classes, record_id, max)| Plan {
        records: records.map(|p| path(&p)),
        masks: classes
            .into_iter()
            .map(|(class, strategy, paths)| ClassMask {
                class: class.to_owned(),
                paths: paths.iter().map(|p| path(p)).collect(),
                strategy,
            })
            .collect(),
        record_id: record_id.map(|p| path(&p)),
        max_records: max.map(|(m, _)| m),
        on_exceed: if max.is_some_and(|(_, deny)| deny) {
            ExceedAction::Deny
        } else {
            ExceedAction::Truncate
        },
        ..Plan::default()
    })
}

/// Bytes that break JSON in interesting ways.
const JUNK: [u8; 14] = [b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', 0xFF, 0x01, b'x', b' ', 0xEF, b'0'];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// The streaming path gives what the parsed document gives (equal values and canonical
    /// forms, stats, outcome, error kind), and takes every eligible plan over documents
    /// without duplicate keys when no cap is set.
    #[test]
    fn streaming_equals_dom(doc in document(), plan in plan()) {
        let mut body = String::new();
        render(&doc, &mut body);
        let dom = apply_dom(body.as_bytes(), &plan, &vars(), &key());
        prop_assert!(
            matches!(dom, Ok(_) | Err(TransformError::RecordCapExceeded { .. })),
            "generated bodies are valid: {body} {dom:?}"
        );
        let streamed = apply_streaming(body.as_bytes(), &plan, &key());
        if let Some(streamed) = &streamed {
            let d = differences(&dom, streamed);
            prop_assert!(d.is_none(), "{}\nbody: {body}\nplan: {plan:?}", d.unwrap_or_default());
        }
        if streaming_eligible(&plan) && !has_duplicate_keys(&doc) && plan.max_records.is_none() {
            prop_assert!(streamed.is_some(), "not streamed: {body}\nplan: {plan:?}");
        }
        let applied = apply(body.as_bytes(), &plan, &vars(), &key());
        prop_assert!(differences(&dom, &applied).is_none());
    }

    /// Cut, changed, inserted or deleted bytes: both paths reject alike (or accept alike).
    #[test]
    fn mutated_bodies_are_judged_alike(
        doc in document(),
        plan in plan(),
        at in any::<prop::sample::Index>(),
        junk in prop::sample::select(JUNK.to_vec()),
        how in 0..4u8,
    ) {
        let mut body = String::new();
        render(&doc, &mut body);
        let mut body = body.into_bytes();
        let i = at.index(body.len());
        match how {
            0 => body.truncate(i.max(1)),
            1 => body[i] = junk,
            2 => body.insert(i, junk),
            _ => {
                body.remove(i);
            }
        }
        let dom = apply_dom(&body, &plan, &vars(), &key());
        if let Some(streamed) = apply_streaming(&body, &plan, &key()) {
            let d = differences(&dom, &streamed);
            prop_assert!(d.is_none(), "{}\nbody: {}\nplan: {plan:?}", d.unwrap_or_default(), String::from_utf8_lossy(&body));
        }
    }
}
