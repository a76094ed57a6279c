//! The `custos` command line, run as a user would.
#![allow(missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn custos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_custos")).args(args).current_dir(root()).output().expect("custos runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn examples() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("examples"))
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.strip_prefix(root()).expect("under root").display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn check_accepts_every_example() {
    let files = examples();
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let out = custos(&args);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{} policies checked: {} valid", files.len(), files.len())));
}

#[test]
fn check_names_the_broken_row_filter_and_exits_1() {
    let out = custos(&["check", "examples/broken/broken-rowfilter.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("examples/broken/broken-rowfilter.yaml: logistics/customer-api: spec.rules[0].rowFilter: undeclared reference 'usr'"),
        "{err}"
    );
}

#[test]
fn check_json_output_lists_every_problem() {
    let out = custos(&[
        "check",
        "-o",
        "json",
        "examples/broken/broken-rowfilter.yaml",
        "examples/scanner-egress-lockdown.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["policies"], 2);
    assert_eq!(v["valid"], 1);
    assert_eq!(v["problems"][0]["path"], "spec.rules[0].rowFilter");
}

#[test]
fn check_reads_stdin_and_reports_yaml_errors() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["check", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"apiVersion: custos.dev/v1alpha1\nkind: DataAccessPolicy\nmetadata: {name: x}\nspec: {workload: {selector: {}, appPort: 80}, rules: [{name: a, action: Maybe}]}\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("spec.rules[0].action: must be one of Allow, Deny"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_file_is_a_usage_error() {
    let out = custos(&["check", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read does/not/exist.yaml"));
}

#[test]
fn crd_matches_the_committed_copy() {
    let out = custos(&["crd"]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(root().join("crds/dataaccesspolicies.custos.dev.yaml"))
        .expect("committed CRD");
    assert_eq!(text(&out.stdout), committed, "run `make crds`");
}

#[test]
fn compile_writes_a_config_the_sidecar_loader_accepts() {
    let dir = std::env::temp_dir().join(format!("custos-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let config = dir.join("config.json");
    let netpol = dir.join("netpol.yaml");
    let out = custos(&[
        "compile",
        "-n",
        "scanning",
        "examples/scanner-egress-lockdown.yaml",
        "examples/courier-branch-scoping.yaml",
        "-o",
        config.to_str().expect("utf-8"),
        "--network-policies",
        netpol.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&config).expect("config written");
    let (cfg, policies) = custos_policy::load_config(&bytes).expect("loads");
    assert_eq!(cfg.namespace, "scanning");
    assert_eq!(policies.len(), 1, "only the scanning namespace's policy");
    let np = std::fs::read_to_string(&netpol).expect("netpol written");
    assert!(np.contains("kind: NetworkPolicy") && np.contains("- Egress"), "{np}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn compile_refuses_a_broken_policy() {
    let out = custos(&["compile", "-n", "logistics", "examples/broken/broken-rowfilter.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("spec.rules[0].rowFilter"));
    assert!(out.stdout.is_empty(), "nothing is written when a policy is broken");
}

fn explain(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["explain", "-o", "json"];
    a.extend_from_slice(args);
    let out = custos(&a);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn explain_shows_decision_rule_reason_and_plan() {
    let clerk = ["--user", "branch=HB-07,role=clerk", "--from", "logistics/ops-portal"];
    let mut args = vec!["-p", "examples/courier-branch-scoping.yaml", "--request", "GET /parcels/search?q=1"];
    args.extend_from_slice(&clerk);
    args.extend_from_slice(&["--body", "examples/data/parcel-page.json"]);
    let v = explain(&args);
    assert_eq!(v["decision"], "Allow");
    assert_eq!(v["rule"], "clerks-list-own-branch");
    assert_eq!(v["plan"]["rowFilter"], "record.branch == user.branch");
    assert_eq!(v["response"]["stats"]["recordsFiltered"], 1);
    assert_eq!(v["response"]["stats"]["recordsReturned"], 2);
    let body = v["response"]["body"].to_string();
    assert!(
        !body.contains("138 0013 8000") && body.contains("8000"),
        "phones are masked to their last 4: {body}"
    );
    assert!(!body.contains("SH-02"), "other branches' rows are removed");

    // An explicit Deny rule: 403, also without a token.
    let v = explain(&[
        "-p",
        "examples/backoffice-bulk-export.yaml",
        "--request",
        "GET /customers/export",
        "--time",
        "2026-11-23T10:00:00Z",
    ]);
    assert_eq!(v["decision"], "Deny");
    assert_eq!(v["status"], 403);
    assert_eq!((v["status"].as_i64(), v["reasonCode"].as_str()), (Some(403), Some("deny_rule")));

    // No allow rule matched, the policy verifies users and no user (token) was given: the
    // sidecar's 401 missing_token, not 403.
    let v = explain(&["-p", "examples/courier-branch-scoping.yaml", "--request", "GET /customers/42"]);
    assert_eq!((v["decision"].as_str(), v["reasonCode"].as_str()), (Some("Deny"), Some("missing_token")));
    assert_eq!(v["status"], 401);
    // With a user (a verified token) whose role no rule allows: 403.
    let v = explain(&[
        "-p",
        "examples/courier-branch-scoping.yaml",
        "--request",
        "GET /customers/42",
        "--user",
        "branch=HB-07,role=driver",
        "--from",
        "logistics/ops-portal",
    ]);
    assert_eq!((v["decision"].as_str(), v["reasonCode"].as_str()), (Some("Deny"), Some("default_deny")));
    assert_eq!(v["status"], 403);

    let v = explain(&["-p", "examples/audit-mode-rollout.yaml", "--request", "DELETE /anything"]);
    assert_eq!(v["decision"], "WouldDeny");
}

/// The README's `custos explain` example, as written there.
#[test]
fn readme_explain_example_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme.find("custos explain -p").expect("the README has an explain example");
    let command: String = readme[start..]
        .lines()
        .scan(true, |more, line| {
            let taken = more.then_some(line);
            *more = line.trim_end().ends_with('\\');
            taken
        })
        .map(|l| l.trim_end().trim_end_matches('\\').to_owned())
        .collect::<Vec<_>>()
        .join(" ");
    // The words after `custos`, quotes kept together.
    let mut args = Vec::new();
    let mut rest = command.trim_start_matches("custos").trim();
    while !rest.is_empty() {
        let (word, tail) = if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').expect("closing quote");
            (&quoted[..end], &quoted[end + 1..])
        } else {
            rest.split_once(' ').unwrap_or((rest, ""))
        };
        args.push(word.to_owned());
        rest = tail.trim_start();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(args.contains(&"--body"), "the example shows a transformed body: {args:?}");
    let out = custos(&args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("decision:  Allow"), "{stdout}");
    assert!(!stdout.contains("0000 4821") && stdout.contains("4821"), "the phone is masked: {stdout}");
}

/// The address baseline on the same pods as the branch scoping policy: the scoping policy
/// still decides, the baseline's rule is listed as applying too, and the body goes through
/// both plans (filters first, then every mask).
#[test]
fn explain_applies_every_constraining_policy() {
    let mut args = clerk_search_beside("examples/logistics-address-baseline.yaml");
    args.extend(["--body", "examples/data/parcel-page.json"]);
    let v = explain(&args);
    assert_eq!((v["decision"].as_str(), v["rule"].as_str()), (Some("Allow"), Some("clerks-list-own-branch")));
    assert_eq!(v["alsoApplies"][0]["policy"], "logistics/logistics-address-baseline");
    assert_eq!(v["alsoApplies"][0]["rule"], "mask-addresses");
    assert_eq!(v["alsoApplies"][0]["plan"]["mask"]["address"]["strategy"], "Redact");
    let stats = &v["response"]["stats"];
    assert_eq!((stats["recordsReturned"].as_u64(), stats["recordsFiltered"].as_u64()), (Some(2), Some(1)));
    // Masks apply after every row filter: the two records returned.
    assert_eq!(stats["masked"], serde_json::json!({"address": 2, "name": 4, "phone": 4}));
    let body = v["response"]["body"].to_string();
    assert!(!body.contains("Wuhan") && !body.contains("SH-02") && !body.contains("138 0013"), "{body}");

    let printed = explain_text(&args);
    assert!(
        printed
            .contains("also applies: rule 'mask-addresses' of policy logistics/logistics-address-baseline"),
        "{printed}"
    );
    assert!(printed.contains("mask:      address -> Redact"), "{printed}");
}

/// `custos explain` arguments: the branch scoping example and `other`, asked about a clerk of
/// branch HB-07 searching parcels from the ops portal.
fn clerk_search_beside(other: &str) -> Vec<&str> {
    vec![
        "-p",
        "examples/courier-branch-scoping.yaml",
        "-p",
        other,
        "--request",
        "GET /parcels/search",
        "--user",
        "branch=HB-07,role=clerk",
        "--from",
        "logistics/ops-portal",
    ]
}

/// `custos explain ARGS` as text (it must succeed).
fn explain_text(args: &[&str]) -> String {
    let mut text_args = vec!["explain"];
    text_args.extend_from_slice(args);
    let out = custos(&text_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// An Audit-mode policy beside the enforcing one does not decide: its verdict is listed as a
/// dry run, in JSON and in text, with its plan and limits, and with `--body` what its plan
/// would do to the app's body (not to what the deciding plan made of it).
#[test]
fn explain_lists_the_dry_runs_of_audit_policies_beside_the_deciding_one() {
    let mut args = clerk_search_beside("examples/audit-mode-rollout.yaml");
    let v = explain(&args);
    assert_eq!((v["policy"].as_str(), v["mode"].as_str()), (Some("logistics/customer-api"), Some("Enforce")));
    let dry_run = &v["dryRuns"][0];
    assert_eq!(v["dryRuns"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        [&dry_run["policy"], &dry_run["rule"], &dry_run["decision"], &dry_run["reasonCode"]],
        ["logistics/waybill-api", "clerks-list-own-branch", "Allow", "allow_rule"]
    );
    assert_eq!(dry_run["plan"]["rowFilter"], "record.branch == user.branch");
    assert!(dry_run["response"].is_null(), "no --body, no response: {dry_run}");
    let printed = explain_text(&args);
    assert!(
        printed.contains("dry run:   policy logistics/waybill-api (Audit) would decide Allow"),
        "{printed}"
    );
    assert!(printed.contains("           rowFilter: record.branch == user.branch"), "{printed}");

    args.extend(["--body", "examples/data/parcel-page.json"]);
    let v = explain(&args);
    let stats = &v["dryRuns"][0]["response"]["stats"];
    // The app's body: the record of another branch, which the deciding plan removes too, is
    // there for the dry run's filter to remove.
    assert_eq!((stats["recordsReturned"].as_u64(), stats["recordsFiltered"].as_u64()), (Some(2), Some(1)));
    assert_eq!(stats["masked"]["name"], 4);
    let printed = explain_text(&args);
    assert!(
        printed
            .contains("           would return 2 records, 1 filtered out of scope, 0 cut by the cap; mask "),
        "{printed}"
    );
    // Alone, the Audit policy decides, and there is no dry run.
    let v = explain(&["-p", "examples/audit-mode-rollout.yaml", "--request", "GET /parcels/search"]);
    assert_eq!((v["decision"].as_str(), v["dryRuns"].as_array().map(Vec::len)), (Some("WouldDeny"), Some(0)));
}

#[test]
fn explain_rejects_hostile_paths_without_echoing_them() {
    let v =
        explain(&["-p", "examples/courier-branch-scoping.yaml", "--request", "GET /customers%2F13800138000"]);
    assert_eq!(v["status"], 400);
    assert!(!v.to_string().contains("13800138000"), "{v}");
}

#[test]
fn explain_selects_policies_by_pod_labels() {
    let v = explain(&[
        "-p",
        "examples/courier-branch-scoping.yaml",
        "--labels",
        "app=billing",
        "--request",
        "GET /x",
    ]);
    assert_eq!((v["decision"].as_str(), v["reasonCode"].as_str()), (Some("Allow"), Some("no_policy")));
}

#[test]
fn explain_prints_json_paths_as_written() {
    let v = explain(&[
        "-p",
        "examples/courier-branch-scoping.yaml",
        "--request",
        "GET /parcels",
        "--user",
        "branch=HB-07,role=clerk",
        "--from",
        "logistics/ops-portal",
    ]);
    assert_eq!(v["plan"]["mask"]["phone"]["paths"], serde_json::json!(["$..phone"]));
    assert_eq!(v["plan"]["records"], "$.items[*]");
    assert_eq!(v["plan"]["recordId"], "$.id");
}

#[test]
fn explain_with_a_broken_policy_exits_1() {
    let out = custos(&["explain", "-p", "examples/broken/broken-rowfilter.yaml", "--request", "GET /x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("spec.rules[0].rowFilter"));
}

#[test]
fn operator_refuses_bad_flags_and_a_missing_cluster_with_exit_2() {
    let out = custos(&["operator", "--sidecar-memory-limit", "lots"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--sidecar-memory-limit"), "{}", text(&out.stderr));

    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["operator", "--disable-webhooks", "--leader-election", "false", "--admin", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("custos runs");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot build a Kubernetes client"), "{}", text(&out.stderr));
}
