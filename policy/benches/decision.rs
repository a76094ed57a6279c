//! Decision latency on a 50-rule policy (target: median ≤ 2 µs), beside a baseline measured in
//! the same run: the same 50 path patterns as a `regex::RegexSet`, the usual way a router
//! matches many patterns at once.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use custos_api::WorkloadIdentity;
use custos_api::policy::*;
use custos_policy::{Engine, Request, User, compile_policy, normalize};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

const RESOURCES: [&str; 10] = [
    "customers",
    "parcels",
    "waybills",
    "branches",
    "drivers",
    "routes",
    "invoices",
    "refunds",
    "tickets",
    "stores",
];

/// 50 rules: 10 resources × (deny export, allow list, allow by id with user/workload sources,
/// allow nested reads, allow writes with a `when`).
fn policy_50() -> DataAccessPolicySpec {
    let mut rules = Vec::new();
    for r in RESOURCES {
        let to = |m: &[&str], p: &[String]| {
            Some(Target { methods: m.iter().map(|s| s.to_string()).collect(), paths: p.to_vec() })
        };
        let from = Some(Source {
            workloads: vec![WorkloadRef {
                namespace: Some("logistics".into()),
                service_account: Some("ops-portal".into()),
                labels: BTreeMap::new(),
            }],
            users: [("role".to_string(), vec!["clerk".to_string(), "supervisor".to_string()])].into(),
            authenticated: None,
        });
        let base = AccessRule {
            name: String::new(),
            action: Action::Allow,
            from: None,
            to: None,
            when: None,
            records: None,
            row_filter: None,
            mask: BTreeMap::new(),
            limits: None,
        };
        rules.push(AccessRule {
            name: format!("deny-{r}-export"),
            action: Action::Deny,
            to: to(&[], &[format!("/{r}/export"), format!("/{r}/export/**")]),
            ..base.clone()
        });
        rules.push(AccessRule {
            name: format!("{r}-list"),
            to: to(&["GET"], &[format!("/{r}")]),
            from: from.clone(),
            records: Some("$.items[*]".into()),
            row_filter: Some("record.branch == user.branch".into()),
            ..base.clone()
        });
        rules.push(AccessRule {
            name: format!("{r}-by-id"),
            to: to(&["GET"], &[format!("/{r}/{{id}}")]),
            from: from.clone(),
            records: Some("$".into()),
            ..base.clone()
        });
        rules.push(AccessRule {
            name: format!("{r}-nested"),
            to: to(&["GET"], &[format!("/{r}/*/history/**")]),
            from: from.clone(),
            ..base.clone()
        });
        rules.push(AccessRule {
            name: format!("{r}-write"),
            to: to(&["POST", "PUT"], &[format!("/{r}/{{id}}")]),
            when: Some("request.hour >= 7 && request.hour < 20".into()),
            ..base.clone()
        });
    }
    DataAccessPolicySpec {
        workload: WorkloadSpec {
            selector: LabelSelector::default(),
            app_port: 8080,
            proxy_port: None,
            routing: None,
        },
        mode: Mode::Enforce,
        default_action: Action::Deny,
        fail_open: false,
        identity: Some(IdentitySpec {
            users: Some(UserIdentity {
                jwt: JwtSpec {
                    issuer: "https://sso".into(),
                    audiences: vec!["customer-api".into()],
                    jwks_secret_ref: Some(SecretKeyRef { name: "jwks".into(), key: None }),
                    jwks_uri: None,
                    leeway_seconds: None,
                },
                attributes: [
                    ("branch".to_string(), "branch_id".to_string()),
                    ("role".to_string(), "role".to_string()),
                ]
                .into(),
                id_claim: None,
            }),
        }),
        data_classes: vec![],
        rules,
        network_policy: None,
        audit: None,
    }
}

fn regex_set(spec: &DataAccessPolicySpec) -> regex::RegexSet {
    let patterns: Vec<String> = spec
        .rules
        .iter()
        .flat_map(|r| r.to.iter().flat_map(|t| t.paths.iter()))
        .map(|p| {
            let mut re = String::from("^");
            for seg in p.trim_start_matches('/').split('/') {
                match seg {
                    "**" => re.push_str("(?:/[^/]+)*"),
                    "*" => re.push_str("/[^/]+"),
                    s if s.starts_with('{') => re.push_str("/([^/]+)"),
                    s => {
                        re.push('/');
                        re.push_str(&regex::escape(s));
                    }
                }
            }
            re.push('$');
            re
        })
        .collect();
    regex::RegexSet::new(patterns).expect("valid regexes")
}

struct Fixture {
    engine: Engine,
    set: regex::RegexSet,
    user: User,
    caller: WorkloadIdentity,
}

fn fixture() -> Fixture {
    let spec = policy_50();
    let compiled = compile_policy("logistics", "bench", &spec).expect("the bench policy compiles");
    Fixture {
        engine: Engine::new(vec![compiled]),
        set: regex_set(&spec),
        user: User {
            id: "u-1".into(),
            attributes: [("role".to_string(), "clerk".to_string()), ("branch".to_string(), "HB".to_string())]
                .into(),
        },
        caller: WorkloadIdentity {
            ip: "10.0.0.1".into(),
            namespace: "logistics".into(),
            service_account: "ops-portal".into(),
            labels: BTreeMap::new(),
            labels_unknown: false,
        },
    }
}

/// Requests: allowed late in the rule list, denied by a deny rule, and unmatched (default deny).
const TARGETS: [(&str, &str); 3] =
    [("GET", "/stores/4711"), ("GET", "/tickets/export"), ("DELETE", "/nothing/here")];

fn decide(f: &Fixture, method: &str, target: &str) -> bool {
    let path = normalize(target).expect("valid path");
    let req = Request { method, path: &path, caller: Some(&f.caller), user: Some(&f.user), time: 12 * 3600 };
    f.engine.decide(&req).blocks()
}

fn baseline(f: &Fixture, target: &str) -> bool {
    f.set.matches(target.split('?').next().unwrap_or(target)).matched_any()
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("decision_50_rules");
    for (method, target) in TARGETS {
        g.bench_function(format!("custos normalise+decide {method} {target}"), |b| {
            b.iter(|| decide(&f, black_box(method), black_box(target)))
        });
        g.bench_function(format!("baseline RegexSet {target}"), |b| {
            b.iter(|| baseline(&f, black_box(target)))
        });
    }
    g.finish();
}

/// Same-run summary: median of many short timed batches, for each request and the baseline.
fn summary() {
    let f = fixture();
    println!("\ndecision latency, 50-rule policy (median of 101 batches of 2,000 calls):");
    println!("{:<38} {:>12} {:>14} {:>8}", "request", "custos", "RegexSet base", "ratio");
    for (method, target) in TARGETS {
        let c = median_ns(|| {
            black_box(decide(&f, black_box(method), black_box(target)));
        });
        let b = median_ns(|| {
            black_box(baseline(&f, black_box(target)));
        });
        println!("{:<38} {:>9.0} ns {:>11.0} ns {:>7.2}x", format!("{method} {target}"), c, b, c / b);
    }
}

fn median_ns(mut f: impl FnMut()) -> f64 {
    for _ in 0..20_000 {
        f();
    }
    let mut samples: Vec<f64> = (0..101)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..2_000 {
                f();
            }
            t.elapsed().as_nanos() as f64 / 2_000.0
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[50]
}

criterion_group!(benches, bench);

fn main() {
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
    summary();
}
