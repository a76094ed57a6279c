//! Throughput of `apply` against plain `serde_json` parse + serialise of the same body.
//!
//! Body: `{"items":[...]}` with 5000 customer records (~1 MB). Plan: records `$.items[*]`,
//! row filter `record.branch == user.branch` keeping 80% of them (4 of 5 records belong to the
//! caller's branch), phone ShowLast4, name ShowFirst1, email Hash, record ids hashed.
//!
//! After the criterion groups, a plain timed loop measures both in the same run (alternating,
//! 60 runs each after warm-up, medians) and prints
//! `transform: X MB/s, baseline parse+serialise: Y MB/s, ratio: Z%` (1 MB = 10^6 bytes).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use custos_api::policy::{ExceedAction, MaskStrategy};
use custos_transform::expr::{Expr, RequestVars, Scope, UserVars, Vars};
use custos_transform::{ClassMask, HashKey, Outcome, Plan, apply};
use serde_json::{Value, json};
use serde_json_path::JsonPath;

const RECORDS: usize = 5000;

const SURNAMES: [&str; 8] = ["王", "李", "Zhang", "Liu", "陈", "Yang", "Huang", "赵"];
const GIVEN: [&str; 8] = ["伟", "Fang", "秀英", "Min", "静", "Lei", "Qiang", "磊"];
const CITIES: [&str; 5] = ["Shanghai", "杭州市", "Beijing", "深圳市", "Chengdu"];

fn body() -> Vec<u8> {
    let items: Vec<Value> = (0..RECORDS)
        .map(|i| {
            let branch = if i % 5 == 0 { format!("BR-{:02}", 2 + (i / 5) % 4) } else { "BR-01".to_owned() };
            json!({
                "id": 100_000 + i,
                "name": format!("{}{}", SURNAMES[i % 8], GIVEN[(i / 8) % 8]),
                "phone": format!("138{:08}", (i * 7919) % 100_000_000),
                "email": format!("customer{i}@example-mail.com"),
                "branch": branch,
                "address": format!(
                    "{} Road No. {}, Building {}, Room {}, {} District, {}",
                    ["Nanjing", "Huaihai", "Wenyi", "Shennan", "Tianfu"][i % 5],
                    i % 997,
                    i % 31,
                    100 + i % 900,
                    ["Xuhui", "西湖区", "Chaoyang", "南山区", "Jinjiang"][i % 5],
                    CITIES[i % 5],
                ),
                "parcels": i % 17,
                "vip": i % 11 == 0,
            })
        })
        .collect();
    serde_json::to_vec(&json!({"items": items, "total": RECORDS, "page": 1})).expect("serialisable")
}

fn plan() -> Plan {
    let path = |p: &str| JsonPath::parse(p).expect("valid JSONPath");
    let mask = |class: &str, p: &str, strategy| ClassMask {
        class: class.to_owned(),
        paths: vec![path(p)],
        strategy,
    };
    Plan {
        records: Some(path("$.items[*]")),
        row_filter: Some(Expr::compile("record.branch == user.branch", Scope::RowFilter).expect("valid CEL")),
        masks: vec![
            mask("phone", "$.items[*].phone", MaskStrategy::ShowLast4),
            mask("name", "$.items[*].name", MaskStrategy::ShowFirst1),
            mask("email", "$.items[*].email", MaskStrategy::Hash),
        ],
        max_records: None,
        on_exceed: ExceedAction::Truncate,
        record_id: Some(path("$.id")),
    }
}

fn vars() -> Vars {
    let request = RequestVars {
        method: "GET".to_owned(),
        path: "/customers".to_owned(),
        params: BTreeMap::new(),
        time: 1_704_633_600,
    };
    let user = UserVars {
        id: "clerk-7".to_owned(),
        attributes: BTreeMap::from([("branch".to_owned(), "BR-01".to_owned())]),
    };
    Vars::new(&request, Some(&user), None)
}

fn baseline(body: &[u8]) -> Vec<u8> {
    let value: Value = serde_json::from_slice(body).expect("valid JSON");
    serde_json::to_vec(&value).expect("serialisable")
}

fn criterion_groups(c: &mut Criterion, body: &[u8], plan: &Plan, vars: &Vars, key: &HashKey) {
    let mut group = c.benchmark_group("transform_1mb");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("baseline_parse_serialise", |b| b.iter(|| baseline(black_box(body))));
    group.bench_function("apply", |b| {
        b.iter(|| apply(black_box(body), plan, vars, key).expect("transformable"))
    });
    group.finish();
}

/// Median seconds per run of `a` and `b`, measured alternately so that both see the same
/// machine load.
fn median_times(runs: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let start = Instant::now();
        a();
        ta.push(start.elapsed());
        let start = Instant::now();
        b();
        tb.push(start.elapsed());
    }
    let median = |mut t: Vec<Duration>| {
        t.sort();
        t[t.len() / 2].as_secs_f64()
    };
    (median(ta), median(tb))
}

fn main() {
    let body = body();
    let plan = plan();
    let vars = vars();
    let key = HashKey::new(b"bench-key".to_vec());

    // Sanity: the plan does what the benchmark says.
    let out = apply(&body, &plan, &vars, &key).expect("transformable");
    assert_eq!(out.stats.records_returned, (RECORDS * 4 / 5) as u64);
    assert!(matches!(out.outcome, Outcome::Body(_)));

    let mut criterion = Criterion::default().configure_from_args();
    criterion_groups(&mut criterion, &body, &plan, &vars, &key);
    criterion.final_summary();

    // Same-run comparison with a plain loop (after warm-up).
    for _ in 0..10 {
        black_box(baseline(&body));
        black_box(apply(&body, &plan, &vars, &key).expect("transformable"));
    }
    let (base, transform) = median_times(
        60,
        || {
            black_box(baseline(black_box(&body)));
        },
        || {
            black_box(apply(black_box(&body), &plan, &vars, &key).expect("transformable"));
        },
    );
    let mb = body.len() as f64 / 1e6;
    println!("body: {:.2} MB, {RECORDS} records, {} kept", mb, out.stats.records_returned);
    println!(
        "transform: {:.1} MB/s, baseline parse+serialise: {:.1} MB/s, ratio: {:.0}%",
        mb / transform,
        mb / base,
        100.0 * base / transform
    );
}
