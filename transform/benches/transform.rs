//! Throughput of `apply` against plain `serde_json` parse + serialise of the same body.
//!
//! 1 MB: `{"items":[...]}` with 5000 customer records (~1 MB). Plan: records `$.items[*]`,
//! row filter `record.branch == user.branch` keeping 80% of them (4 of 5 records belong to the
//! caller's branch), phone ShowLast4, name ShowFirst1, email Hash, record ids hashed. The row
//! filter makes this the parsed-document path.
//!
//! 2 KB: the sidecar benchmark's body (`sidecar/bench`: 18 records of id, name, phone, branch,
//! city, parcels) and plan (records `$.items[*]`, phone ShowLast4, name ShowFirst1), which
//! the streaming path takes; measured through `apply` (streaming), the parsed-document path
//! alone and the baseline.
//!
//! After the criterion groups, plain timed loops measure each body's contenders in the same
//! run (alternating, 60 runs each after warm-up, medians; the 2 KB runs are batches of 500
//! calls) and print
//! `transform: X MB/s, baseline parse+serialise: Y MB/s, ratio: Z%` (1 MB = 10^6 bytes) for
//! the 1 MB body, then the streaming path, the parsed-document path and the baseline for the
//! 2 KB body with their ratios, the same plan without its row filter on the 1 MB body, and
//! with a general records path (`$.items[?@.branch]`) against the simple one and the baseline.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use custos_api::policy::{ExceedAction, MaskStrategy};
use custos_transform::expr::{Expr, RequestVars, Scope, UserVars, Vars};
use custos_transform::{ClassMask, HashKey, Outcome, Plan, apply, apply_dom, apply_streaming};
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
        cache: Default::default(),
    }
}

/// The sidecar benchmark's response body (`sidecar/bench/src/upstream.rs`), about 2 KB.
fn small_body() -> Vec<u8> {
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
    serde_json::to_vec(&json!({"items": items, "page": 1})).expect("serialisable")
}

/// The sidecar benchmark's plan: records `$.items[*]`, phone ShowLast4, name ShowFirst1.
fn small_plan() -> Plan {
    let path = |p: &str| JsonPath::parse(p).expect("valid JSONPath");
    let mask = |class: &str, p: &str, strategy| ClassMask {
        class: class.to_owned(),
        paths: vec![path(p)],
        strategy,
    };
    Plan {
        records: Some(path("$.items[*]")),
        masks: vec![
            mask("phone", "$.items[*].phone", MaskStrategy::ShowLast4),
            mask("name", "$.items[*].name", MaskStrategy::ShowFirst1),
        ],
        ..Plan::default()
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

    let (small, small_plan) = (small_body(), small_plan());
    let mut group = c.benchmark_group("transform_2kb");
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("baseline_parse_serialise", |b| b.iter(|| baseline(black_box(&small))));
    group.bench_function("apply_streaming", |b| {
        b.iter(|| apply(black_box(&small), &small_plan, vars, key).expect("transformable"))
    });
    group.bench_function("apply_dom", |b| {
        b.iter(|| apply_dom(black_box(&small), &small_plan, vars, key).expect("transformable"))
    });
    group.finish();
}

/// Median seconds per run of each of `fs`, measured alternately so that all see the same
/// machine load.
fn median_times(runs: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); fs.len()];
    for _ in 0..runs {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f();
            t.push(start.elapsed());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort();
            t[t.len() / 2].as_secs_f64()
        })
        .collect()
}

/// The 2 KB comparison: streaming (through `apply`), parsed document, baseline.
fn small_summary(vars: &Vars, key: &HashKey) {
    const BATCH: usize = 500;
    let (body, plan) = (small_body(), small_plan());
    let streamed = apply_streaming(&body, &plan, key).expect("the streaming path takes the plan");
    let dom = apply_dom(&body, &plan, vars, key).expect("transformable");
    assert_eq!(streamed.expect("transformable").stats, dom.stats);
    assert_eq!(dom.stats.records_returned, 18);

    let mut streaming = || {
        for _ in 0..BATCH {
            black_box(apply(black_box(&body), &plan, vars, key).expect("transformable"));
        }
    };
    let mut parsed = || {
        for _ in 0..BATCH {
            black_box(apply_dom(black_box(&body), &plan, vars, key).expect("transformable"));
        }
    };
    let mut base = || {
        for _ in 0..BATCH {
            black_box(baseline(black_box(&body)));
        }
    };
    for _ in 0..3 {
        streaming();
        parsed();
        base();
    }
    let t = median_times(60, &mut [&mut streaming, &mut parsed, &mut base]);
    let (streaming, parsed, base) = (t[0] / BATCH as f64, t[1] / BATCH as f64, t[2] / BATCH as f64);
    let mb = body.len() as f64 / 1e6;
    println!(
        "2 KB body: {} bytes, 18 records; plan: records $.items[*], phone ShowLast4, name ShowFirst1",
        body.len()
    );
    println!(
        "2 KB streaming: {:.2} µs ({:.1} MB/s), DOM: {:.2} µs ({:.1} MB/s), baseline parse+serialise: {:.2} µs ({:.1} MB/s)",
        streaming * 1e6,
        mb / streaming,
        parsed * 1e6,
        mb / parsed,
        base * 1e6,
        mb / base,
    );
    println!(
        "2 KB ratios: streaming/DOM speed-up: {:.1}x, streaming vs baseline: {:.0}%, DOM vs baseline: {:.0}%",
        parsed / streaming,
        100.0 * base / streaming,
        100.0 * base / parsed,
    );
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
    let t = median_times(
        60,
        &mut [
            &mut || {
                black_box(baseline(black_box(&body)));
            },
            &mut || {
                black_box(apply(black_box(&body), &plan, &vars, &key).expect("transformable"));
            },
        ],
    );
    let (base, transform) = (t[0], t[1]);
    let mb = body.len() as f64 / 1e6;
    println!("body: {:.2} MB, {RECORDS} records, {} kept", mb, out.stats.records_returned);
    println!(
        "transform: {:.1} MB/s, baseline parse+serialise: {:.1} MB/s, ratio: {:.0}%",
        mb / transform,
        mb / base,
        100.0 * base / transform
    );

    small_summary(&vars, &key);

    // The 1 MB body without the row filter: streaming against the parsed document.
    let unfiltered = Plan { row_filter: None, ..plan.clone() };
    assert!(apply_streaming(&body, &unfiltered, &key).is_some());
    let t = median_times(
        30,
        &mut [
            &mut || {
                black_box(apply(black_box(&body), &unfiltered, &vars, &key).expect("transformable"));
            },
            &mut || {
                black_box(apply_dom(black_box(&body), &unfiltered, &vars, &key).expect("transformable"));
            },
        ],
    );
    println!(
        "1 MB without row filter: streaming: {:.1} MB/s, DOM: {:.1} MB/s, speed-up: {:.1}x",
        mb / t[0],
        mb / t[1],
        t[1] / t[0]
    );

    // The same row filter over a general records path (a filter selector, found through the
    // located query): the dropped records leave in one pass over their array.
    let general =
        Plan { records: Some(JsonPath::parse("$.items[?@.branch]").expect("a valid path")), ..plan.clone() };
    let out = apply(&body, &general, &vars, &key).expect("transformable");
    assert_eq!(out.stats.records_returned, (RECORDS * 4 / 5) as u64);
    let t = median_times(
        30,
        &mut [
            &mut || {
                black_box(apply(black_box(&body), &general, &vars, &key).expect("transformable"));
            },
            &mut || {
                black_box(apply(black_box(&body), &plan, &vars, &key).expect("transformable"));
            },
            &mut || {
                black_box(baseline(black_box(&body)));
            },
        ],
    );
    println!(
        "1 MB general records path: {:.1} MB/s, simple records path: {:.1} MB/s, baseline parse+serialise: {:.1} MB/s, general vs baseline: {:.0}%",
        mb / t[0],
        mb / t[1],
        mb / t[2],
        100.0 * t[2] / t[0]
    );
}
