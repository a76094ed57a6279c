//! What must have happened for the demo to tell its story; each miss is named in the report
//! and makes `custos demo` exit 1.

use std::collections::BTreeSet;

use super::report::{PhaseReport, Report};

/// The misses, empty when the story held.
pub(crate) fn check(report: &Report) -> Vec<String> {
    let mut misses = Vec::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            misses.push(what.to_owned());
        }
    };
    for p in &report.phases {
        expect(p.phase.tally.errors == 0, &format!("{}: some requests got no answer", p.phase.title));
        expect(
            p.phase.tally.throttled == p.phase.tally.retry_after,
            &format!("{}: a 429 came without Retry-After", p.phase.title),
        );
    }
    let phase = |key: &str| report.phases.iter().find(|p| p.phase.key == key);
    let fired = |p: &PhaseReport, detector: &str| p.alerts.iter().any(|d| d == detector);
    match phase("normal") {
        Some(p) => {
            let t = &p.phase.tally;
            expect(t.denied + t.throttled + t.rejected == 0, "normal traffic: a request was refused");
            expect(
                p.audit.would_deny > 0,
                "normal traffic: the Audit-mode waybill-api recorded no WouldDeny",
            );
            expect(p.alerts.is_empty(), "normal traffic: an alert fired on a normal caller");
        }
        None => expect(false, "the normal traffic did not run"),
    }
    match phase("insider") {
        Some(p) => {
            let t = &p.phase.tally;
            expect(t.with_reason("out_of_scope") > 0, "incident 1: no out-of-scope record was refused");
            expect(p.audit.records_filtered > 0, "incident 1: the row filter dropped no row");
            expect(t.throttled > 0, "incident 1: the account's record budget was never exhausted");
            expect(
                t.with_reason("default_deny") > 0,
                "incident 1: the token was accepted from another workload",
            );
            expect(fired(p, "row_filter_burst"), "incident 1: no row_filter_burst alert");
        }
        None => expect(false, "incident 1 did not run"),
    }
    match phase("bulk") {
        Some(p) => {
            let t = &p.phase.tally;
            expect(
                t.with_reason("no-bulk-export") > 0,
                "incident 2: no export was refused by no-bulk-export",
            );
            expect(t.with_reason("record_cap_exceeded") > 0, "incident 2: no oversized page was refused");
            expect(t.rejected > 0, "incident 2: the encoded-slash path was not rejected");
            expect(t.throttled > 0, "incident 2: the hourly record budget was never exhausted");
            expect(fired(p, "denial_burst"), "incident 2: no denial_burst alert");
        }
        None => expect(false, "incident 2 did not run"),
    }
    match phase("crawler") {
        Some(p) => {
            let t = &p.phase.tally;
            expect(t.with_reason("missing_token") > 0, "incident 3: anonymous scraping was not refused");
            expect(t.throttled > 0, "incident 3: the signed-in crawler was never throttled");
            expect(p.audit.records_truncated > 0, "incident 3: no page was cut to 20 results");
            expect(p.audit.masked_total() > 0, "incident 3: no contact field was masked");
            expect(fired(p, "denial_burst"), "incident 3: no denial_burst alert");
        }
        None => expect(false, "incident 3 did not run"),
    }
    match phase("scanner") {
        Some(p) => {
            let t = &p.phase.tally;
            expect(p.audit.masked_total() > 0, "incident 4: no field was masked for the scanner");
            expect(t.denied > 0, "incident 4: the endpoints scanners never need were not refused");
            expect(t.throttled > 0, "incident 4: the scanner was never throttled");
            expect(fired(p, "denial_burst"), "incident 4: no denial_burst alert");
            expect(
                report.egress.last().is_some_and(|l| l.starts_with("deny everything else")),
                "incident 4: the compiled NetworkPolicy does not lock egress down",
            );
        }
        None => expect(false, "incident 4 did not run"),
    }
    expect(
        report.events_stored == report.requests,
        &format!("{} requests sent but {} events stored", report.requests, report.events_stored),
    );
    expect(
        report.events_attributed == report.events_stored,
        &format!(
            "{} stored events belong to no phase",
            report.events_stored.abs_diff(report.events_attributed)
        ),
    );
    expect(report.chain_intact, "audit verify: the chain is broken");
    let accessors: BTreeSet<&str> = report.accesses.iter().map(|a| a.principal.as_str()).collect();
    expect(accessors.len() >= 2, "the sample customer's accesses were not found through its keyed hash");
    misses
}
