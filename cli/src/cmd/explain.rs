//! `custos explain`: the decision for one request, and what the response plan would do.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use custos_api::policy::Mode;
use custos_api::{Decision, WorkloadIdentity};
use custos_policy::{Engine, Request, User, Verdict, compile_policy, normalize};
use custos_transform::{HashKey, Outcome, Plan, TransformError, TransformStats, apply};
use serde_json::{Value, json};

use crate::input::{document_problems, parse_map, problems, read_files};
use crate::output::{OutputFormat, print_json};

/// Arguments of `custos explain`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Policy files.
    #[arg(long = "policy", short = 'p', required = true, num_args = 1..)]
    policies: Vec<PathBuf>,
    /// The request: `METHOD /path?query`.
    #[arg(long, short = 'r')]
    request: String,
    /// User attributes, `k=v,k2=v2`. Giving any user option makes the request authenticated.
    #[arg(long)]
    user: Option<String>,
    /// User id (default `explain-user` when --user is given).
    #[arg(long)]
    user_id: Option<String>,
    /// Calling workload, `NAMESPACE/SERVICEACCOUNT`.
    #[arg(long)]
    from: Option<String>,
    /// Labels of the calling pod, `k=v,...`.
    #[arg(long)]
    caller_labels: Option<String>,
    /// Labels of the protected pod, `k=v,...`: only policies selecting it apply. Omitted: all
    /// policies given apply.
    #[arg(long)]
    labels: Option<String>,
    /// Namespace of policies without metadata.namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Request time, RFC 3339 or seconds since the epoch (default now). Matters for `when`.
    #[arg(long)]
    time: Option<String>,
    /// A sample JSON response body: show what the plan does to it.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: OutputFormat,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.policies)?;
    let mut compiled = Vec::new();
    let mut bad = Vec::new();
    for f in &files {
        bad.extend(document_problems(f, &args.namespace));
        for p in &f.loaded.policies {
            let ns = p.namespace.clone().unwrap_or_else(|| args.namespace.clone());
            match compile_policy(&ns, &p.input.name, &p.input.spec) {
                Ok(c) => compiled.push(c),
                Err(e) => bad.extend(problems(&f.path, p.document, Some(&p.input.name), &e)),
            }
        }
    }
    if !bad.is_empty() {
        for p in &bad {
            eprintln!("{p}");
        }
        eprintln!(
            "the policies have {} error(s); fix them first (custos check shows the same list)",
            bad.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut engine = Engine::new(compiled);
    if let Some(l) = &args.labels {
        engine = engine.for_pod(&parse_map(Some(l))?);
    }

    let (method, target) = args
        .request
        .trim()
        .split_once(' ')
        .with_context(|| format!("--request must be 'METHOD /path', got '{}'", args.request))?;
    let target = target.trim();
    let user = (args.user.is_some() || args.user_id.is_some()).then(|| -> anyhow::Result<User> {
        Ok(User {
            id: args.user_id.clone().unwrap_or_else(|| "explain-user".into()),
            attributes: parse_map(args.user.as_deref())?,
        })
    });
    let user = user.transpose()?;
    let caller = match &args.from {
        Some(f) => {
            let (ns, sa) = f
                .split_once('/')
                .with_context(|| format!("--from must be NAMESPACE/SERVICEACCOUNT, got '{f}'"))?;
            Some(WorkloadIdentity {
                ip: String::new(),
                namespace: ns.into(),
                service_account: sa.into(),
                labels: parse_map(args.caller_labels.as_deref())?,
                labels_unknown: false,
            })
        }
        None => None,
    };
    let time = parse_time(args.time.as_deref())?;

    let path = match normalize(target) {
        Ok(p) => p,
        Err(rejection) => {
            let report = json!({
                "decision": "Deny",
                "status": 400,
                "reason": format!("request path rejected: {rejection} ({})", rejection.code()),
            });
            match args.output {
                OutputFormat::Json => print_json(&report)?,
                OutputFormat::Text => {
                    println!("decision:  Deny (400 Bad Request; the app is not called)");
                    println!("reason:    request path rejected: {rejection}");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let req = Request { method, path: &path, caller: caller.as_ref(), user: user.as_ref(), time };
    let verdict = engine.decide(&req);

    // The dry runs that would allow the request run their plans on the body too, as the
    // sidecar runs them beside the deciding policy (on the app's body, not on what the
    // deciding plans made of it).
    let reads_body = |v: &Verdict<'_>| v.plan.is_some_and(|p| p.needs_body());
    let allowing_dry_runs =
        || verdict.dry_runs.iter().filter(|d| d.decision == Decision::Allow && reads_body(d));
    let body = match &args.body {
        Some(b) if !verdict.blocks() && (verdict.plan.is_some() || allowing_dry_runs().next().is_some()) => {
            Some(std::fs::read(b).with_context(|| format!("cannot read {}", b.display()))?)
        }
        _ => None,
    };
    let key = HashKey::new(format!("custos-explain-{}", std::process::id()).into_bytes());
    let body_result = body
        .as_ref()
        .filter(|_| verdict.plan.is_some())
        .map(|b| transformed(&verdict, &req, b.clone(), &key));
    let dry_run_results: Vec<Option<Value>> = verdict
        .dry_runs
        .iter()
        .map(|d| {
            let allows = d.decision == Decision::Allow && reads_body(d);
            body.as_ref().filter(|_| allows).map(|b| transformed(d, &req, b.clone(), &key))
        })
        .collect();

    // A user given on the command line stands for a verified Bearer token.
    let wants_token = verdict.wants_token(user.is_some());
    let report = report_json(&verdict, path.as_str(), body_result, &dry_run_results, wants_token);
    match args.output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => print_text(&verdict, path.as_str(), &report, wants_token),
    }
    Ok(ExitCode::SUCCESS)
}

/// The body as the sidecar would return it: every plan step in turn (one plan, unless several
/// policies' constraining rules apply), with what they did together.
fn transformed(verdict: &Verdict<'_>, req: &Request<'_>, mut body: Vec<u8>, key: &HashKey) -> Value {
    let mut total = TransformStats::default();
    if body.is_empty() {
        // The sidecar passes an empty body on: nothing to leak, nothing to count.
        return json!({"stats": stats_json(&total), "body": Value::Null});
    }
    for (i, (applying, plan, _)) in verdict.plan_steps().into_iter().enumerate() {
        let vars = req.vars(&applying.params);
        let t = match apply(&body, plan, &vars, key) {
            Ok(t) => t,
            Err(e) => {
                // As the sidecar answers: 403 past a refusing cap, 502 for a body it cannot
                // check (passed on under failOpen).
                let (status, reason) = match e {
                    TransformError::RecordCapExceeded { .. } => (403, "record_cap_exceeded"),
                    TransformError::RecordsNotFound => (502, "records_not_found"),
                    _ => (502, "response_not_json"),
                };
                let fail_open = status == 502 && applying.policy.is_some_and(|p| p.fail_open);
                return json!({"error": e.to_string(), "status": status, "reason": reason, "failOpen": fail_open});
            }
        };
        total.then(plan, t.stats, i == 0);
        body = match t.outcome {
            Outcome::Body(b) => b,
            Outcome::RootFiltered => {
                total.records_returned = 0;
                return json!({"error": "the single record is out of the caller's scope", "status": 403,
                              "reason": "out_of_scope", "failOpen": false, "stats": stats_json(&total)});
            }
        };
    }
    json!({"stats": stats_json(&total), "body": serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null)})
}

/// What plans did, as JSON.
fn stats_json(total: &TransformStats) -> Value {
    json!({
        "recordsReturned": total.records_returned,
        "recordsFiltered": total.records_filtered,
        "recordsTruncated": total.records_truncated,
        "filterErrors": total.filter_errors,
        "masked": total.masked,
    })
}

fn parse_time(s: Option<&str>) -> anyhow::Result<i64> {
    match s {
        None => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)),
        Some(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return Ok(n);
            }
            let t = chrono::DateTime::parse_from_rfc3339(s)
                .with_context(|| format!("--time must be RFC 3339 or epoch seconds, got '{s}'"))?;
            Ok(t.timestamp())
        }
    }
}

/// The plan as JSON, with JSONPaths as the policy wrote them.
fn plan_json(v: &Verdict<'_>, plan: &Plan) -> Value {
    let policy = v.policy;
    let masks: BTreeMap<&str, Value> = plan
        .masks
        .iter()
        .map(|m| {
            let paths = policy.and_then(|p| p.data_classes.get(&m.class)).cloned().unwrap_or_default();
            (m.class.as_str(), json!({"strategy": format!("{:?}", m.strategy), "paths": paths}))
        })
        .collect();
    json!({
        "records": v.rule.and_then(|r| r.records_source.clone()),
        "rowFilter": plan.row_filter.as_ref().map(|e| e.source().to_string()),
        "mask": masks,
        "maxRecordsPerResponse": plan.max_records,
        "onExceed": format!("{:?}", plan.on_exceed),
        "recordId": plan.record_id.as_ref().and(policy.and_then(|p| p.record_id_source.clone())),
    })
}

/// The report of `v`; `dry_run_results`: what each of its dry runs' plans did to the body;
/// `wants_token`: the refusal is the sidecar's 401 `missing_token` ([`Verdict::wants_token`]).
fn report_json(
    v: &Verdict<'_>,
    path: &str,
    body: Option<Value>,
    dry_run_results: &[Option<Value>],
    wants_token: bool,
) -> Value {
    let limits = v.limits.map(|l| serde_json::to_value(l).unwrap_or(Value::Null));
    let (status, reason_code) = match (wants_token, v.blocks()) {
        (true, _) => (401, "missing_token"),
        (false, true) => (403, v.reason.code()),
        (false, false) => (200, v.reason.code()),
    };
    json!({
        "decision": v.decision.as_str(),
        "status": status,
        "mode": format!("{:?}", v.mode),
        "policy": v.policy.map(|p| format!("{}/{}", p.namespace, p.name)),
        "rule": v.rule.map(|r| r.name.clone()),
        "reason": v.explanation(),
        "reasonCode": reason_code,
        "path": path,
        "params": v.params.iter().cloned().collect::<BTreeMap<_, _>>(),
        "plan": v.plan.filter(|_| !v.blocks()).map(|p| plan_json(v, p)),
        "limits": limits,
        "alsoApplies": v.also.iter().map(|a| json!({
            "policy": a.policy.map(|p| format!("{}/{}", p.namespace, p.name)),
            "rule": a.rule.map(|r| r.name.clone()),
            "params": a.params.iter().cloned().collect::<BTreeMap<_, _>>(),
            "plan": a.plan.map(|p| plan_json(a, p)),
            "limits": a.limits.map(|l| serde_json::to_value(l).unwrap_or(Value::Null)),
        })).collect::<Vec<_>>(),
        "dryRuns": v.dry_runs.iter().zip(dry_run_results).map(|(d, result)| {
            let allows = d.decision == Decision::Allow;
            json!({
                "policy": d.policy.map(|p| format!("{}/{}", p.namespace, p.name)),
                "rule": d.rule.map(|r| r.name.clone()),
                "decision": d.decision.as_str(),
                "reasonCode": d.reason.code(),
                "plan": d.plan.filter(|_| allows).map(|p| plan_json(d, p)),
                "limits": d.limits.filter(|_| allows).map(|l| serde_json::to_value(l).unwrap_or(Value::Null)),
                "response": result,
            })
        }).collect::<Vec<_>>(),
        "response": body,
    })
}

fn print_text(v: &Verdict<'_>, path: &str, report: &Value, wants_token: bool) {
    let status = if wants_token {
        " (401 missing_token: no allow rule matched and the request has no bearer token; the app is not called)"
    } else if v.blocks() {
        " (403; the app is not called)"
    } else if v.mode == Mode::Audit {
        " (Audit mode: traffic untouched)"
    } else {
        ""
    };
    println!("decision:  {}{status}", v.decision);
    if let Some(p) = v.policy {
        println!("policy:    {}/{} ({:?})", p.namespace, p.name, p.mode);
    }
    println!("rule:      {}", v.rule.map(|r| r.name.as_str()).unwrap_or("(none: default action)"));
    println!("reason:    {}", v.explanation());
    println!("path:      {path}");
    if !v.params.is_empty() {
        let params: Vec<String> = v.params.iter().map(|(k, x)| format!("{k}={x}")).collect();
        println!("params:    {}", params.join(", "));
    }
    if !v.blocks() {
        print_plan(v, "");
    }
    for also in &v.also {
        let policy = also.policy.map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default();
        let rule = also.rule.map(|r| r.name.as_str()).unwrap_or("(none: default action)");
        println!("also applies: rule '{rule}' of policy {policy} (its plan and limits too)");
        print_plan(also, "");
    }
    let dry_run_reports = report.get("dryRuns").and_then(Value::as_array);
    for (i, run) in v.dry_runs.iter().enumerate() {
        let policy = run.policy.map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default();
        println!("dry run:   policy {policy} (Audit) would decide {}: {}", run.decision, run.explanation());
        if run.decision == Decision::Allow {
            print_plan(run, "           ");
            let response = dry_run_reports.and_then(|r| r.get(i)?.get("response")).filter(|r| !r.is_null());
            if let Some(response) = response {
                print_dry_run_response(response);
            }
        }
    }
    if let Some(resp) = report.get("response").filter(|r| !r.is_null()) {
        print_response(resp);
    }
}

/// The response plan and the limits of an allowing verdict, each line after `indent`.
fn print_plan(v: &Verdict<'_>, indent: &str) {
    if let Some(plan) = v.plan {
        println!("{indent}response plan:");
        if !plan.needs_body() {
            println!("{indent}  (none: the response passes unchanged)");
        }
        if let Some(r) = v.rule.and_then(|r| r.records_source.as_deref()) {
            println!("{indent}  records:   {r}");
        }
        if let Some(f) = &plan.row_filter {
            println!("{indent}  rowFilter: {} (records where it is not true are removed)", f.source());
        }
        for m in &plan.masks {
            println!("{indent}  mask:      {} -> {:?}", m.class, m.strategy);
        }
        if let Some(n) = plan.max_records {
            println!("{indent}  cap:       {n} records per response ({:?} beyond)", plan.on_exceed);
        }
    }
    if let Some(l) = v.limits {
        let mut parts = Vec::new();
        if let Some(n) = l.requests_per_minute {
            parts.push(format!("{n} requests/min"));
        }
        if let Some(n) = l.records_per_hour {
            parts.push(format!("{n} records/hour"));
        }
        if let Some(n) = l.records_per_day {
            parts.push(format!("{n} records/day"));
        }
        if !parts.is_empty() {
            println!("{indent}limits:    {} per principal", parts.join(", "));
        }
    }
}

/// A plan that could not be applied to the body, as [`transformed`] reports it.
struct Refusal<'a> {
    /// The status Enforce would answer with.
    status: &'a Value,
    reason: &'a str,
    error: &'a str,
    /// Passed on unchecked instead (the policy's failOpen).
    fail_open: bool,
}

impl<'a> Refusal<'a> {
    fn of(resp: &'a Value) -> Option<Refusal<'a>> {
        Some(Refusal {
            error: resp.get("error")?.as_str()?,
            status: &resp["status"],
            reason: resp["reason"].as_str().unwrap_or(""),
            fail_open: resp["failOpen"] == true,
        })
    }
}

/// What a dry run's plan would have done to the body, on one line under its `dry run:` line.
fn print_dry_run_response(resp: &Value) {
    let indent = "           ";
    if let Some(r) = Refusal::of(resp) {
        let (status, reason, err) = (r.status, r.reason, r.error);
        match r.fail_open {
            true => println!("{indent}would pass the response on unchecked (fail_open:{reason}): {err}"),
            false => println!("{indent}would refuse the response ({status} {reason}: WouldDeny): {err}"),
        }
        return;
    }
    let stats = &resp["stats"];
    let mut line = format!(
        "{indent}would return {} records, {} filtered out of scope, {} cut by the cap",
        stats["recordsReturned"], stats["recordsFiltered"], stats["recordsTruncated"]
    );
    if let Some(masked) = stats["masked"].as_object().filter(|m| !m.is_empty()) {
        let parts: Vec<String> = masked.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        line.push_str(&format!("; mask {}", parts.join(", ")));
    }
    println!("{line}");
}

/// Lines of the transformed body shown in text output; `-o json` shows all of it.
const BODY_PREVIEW_LINES: usize = 24;

fn print_response(resp: &Value) {
    if let Some(r) = Refusal::of(resp) {
        let (status, reason, err) = (r.status, r.reason, r.error);
        match r.fail_open {
            true => println!("response:  passed on unchecked (failOpen; {reason}): {err}"),
            false => println!("response:  refused ({status} {reason} in Enforce mode): {err}"),
        }
        return;
    }
    let stats = &resp["stats"];
    println!(
        "response:  {} records returned, {} filtered out of scope, {} cut by the cap, {} filter errors",
        stats["recordsReturned"], stats["recordsFiltered"], stats["recordsTruncated"], stats["filterErrors"]
    );
    if let Some(masked) = stats["masked"].as_object().filter(|m| !m.is_empty()) {
        let parts: Vec<String> = masked.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        println!("masked:    {}", parts.join(", "));
    }
    let body = serde_json::to_string_pretty(&resp["body"]).unwrap_or_default();
    let lines: Vec<&str> = body.lines().collect();
    println!("body:");
    for l in lines.iter().take(BODY_PREVIEW_LINES) {
        println!("  {l}");
    }
    if lines.len() > BODY_PREVIEW_LINES {
        println!("  ... ({} more lines; -o json shows the whole body)", lines.len() - BODY_PREVIEW_LINES);
    }
}
