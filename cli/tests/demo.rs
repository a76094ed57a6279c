//! `custos demo --quiet`: the whole story in one process exits 0 and its report names each
//! incident, the alerts that fired, the sample customer's accessors and the chain
//! verification; `--output json` gives the same story as one document, with timestamped
//! progress lines on standard error while it runs; `--keep DIR` leaves a store that
//! `custos audit` reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn custos(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_custos"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CUSTOS_") || key.starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command.args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_demo_tells_the_whole_story_and_exits_0() {
    let out = custos(&["demo", "--quiet"]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{report}\nstderr:\n{}", out.status, text(&out.stderr));
    assert!(out.stderr.is_empty(), "--quiet printed progress: {}", text(&out.stderr));
    for incident in [
        "Incident 1: courier insider",
        "Incident 2: back-office bulk download",
        "Incident 3: crawler",
        "Incident 4: infected scanner",
    ] {
        assert!(report.contains(incident), "{incident} missing:\n{report}");
    }
    // What each incident ran into.
    for refusal in [
        "403 out_of_scope",
        "deny rule no-bulk-export",
        "record_cap_exceeded",
        "401 missing_token",
        "429 quota",
    ] {
        assert!(report.contains(refusal), "{refusal} missing:\n{report}");
    }
    // The alerts, with the principals they name.
    for alert in [
        "row_filter_burst  Warning   user:clerk-hb07-2",
        "denial_burst      Warning   peer:127.0.0.1",
        "denial_burst      Warning   user:agent-023",
        "denial_burst      Warning   user:scanner-0042",
        "first_seen        Info      user:shopper-7781",
    ] {
        assert!(report.contains(alert), "alert {alert:?} missing:\n{report}");
    }
    // Who accessed the sample customer: the agent, the clerk of its branch, the bulk downloader.
    let accesses = report.split("Who accessed customer M100004").nth(1).unwrap_or_default();
    for accessor in ["user:agent-017", "user:clerk-hb07-1", "user:agent-023"] {
        assert!(accesses.contains(accessor), "{accessor} not among the accessors:\n{report}");
    }
    assert!(report.contains("audit verify: chain intact"), "{report}");
    assert!(report.contains("Every step of the story happened as expected."), "{report}");
    assert!(report.contains("Everything the demo created has been removed"), "{report}");
    // Masked values only: the synthetic phone numbers never appear in full.
    for phone in ["+86 130 1000 2000", "+86 131 1007 2013", "+86 150 3000 4000"] {
        assert!(!report.contains(phone), "{phone} in the report");
    }
}

#[test]
fn the_json_report_and_the_kept_store_hold_the_same_story() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    // Without --quiet: progress on standard error while it runs, the report alone on stdout.
    let out = custos(&["demo", "--output", "json", "--keep", keep.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let progress = text(&out.stderr);
    let mut last = 0.0;
    for phase in ["normal traffic", "incident 1: courier insider", "incident 4: infected scanner"] {
        let line = progress
            .lines()
            .find(|l| l.contains(&format!("{phase}: running")))
            .unwrap_or_else(|| panic!("no progress line for {phase}:\n{progress}"));
        let seconds: f64 = line.trim_start_matches('[').split('s').next().unwrap().trim().parse().unwrap();
        assert!(seconds >= last, "progress out of order:\n{progress}");
        last = seconds;
        let finished = format!("{phase}: ");
        assert!(progress.lines().any(|l| l.contains(&finished) && l.contains(" requests: ")), "{progress}");
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failures"], serde_json::json!([]));
    assert_eq!(report["chainIntact"], true);
    assert_eq!(report["eventsStored"], report["requests"]);
    let keys: Vec<&str> =
        report["phases"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["normal", "insider", "bulk", "crawler", "scanner"]);
    let insider = &report["phases"][1];
    assert!(insider["audit"]["recordsFiltered"].as_u64().unwrap() > 0, "{insider}");

    // The kept store answers `custos audit` like a collector's.
    let store = format!("sqlite:{}", keep.join("audit.db").display());
    let verify = custos(&["audit", "--store", &store, "verify"]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    let events = report["eventsStored"].as_u64().unwrap();
    assert!(
        text(&verify.stdout).contains(&format!("chain intact: {events} events verified")),
        "{}",
        text(&verify.stdout)
    );
    let alerts = custos(&["audit", "--store", &store, "-o", "json", "alerts"]);
    assert_eq!(text(&alerts.stdout).lines().count(), report["alerts"].as_array().unwrap().len());

    // A second run refuses to mix its events into the kept store.
    let again = custos(&["demo", "--quiet", "--keep", keep.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already holds an audit store"), "{}", text(&again.stderr));
}
