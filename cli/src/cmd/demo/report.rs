//! The demo's report: per phase what was allowed, refused, throttled, filtered and masked, the
//! alerts, who accessed the sample customer, the egress lockdown, and the chain verification.
//! Plain aligned text, or one JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::audit::{EventCounts, Findings, phase_of};
use super::phase::{Phase, Tally};

/// One phase in the report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PhaseReport {
    /// The phase.
    #[serde(flatten)]
    pub(crate) phase: Phase,
    /// Its events in the audit store.
    pub(crate) audit: EventCounts,
    /// Detectors that alerted on its callers.
    pub(crate) alerts: Vec<String>,
}

/// One alert.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AlertLine {
    /// Phase key of its principal.
    pub(crate) phase: String,
    /// Detector.
    pub(crate) detector: String,
    /// Severity.
    pub(crate) severity: String,
    /// Principal.
    pub(crate) principal: String,
    /// Namespace/policy.
    pub(crate) scope: String,
    /// The detector's message.
    pub(crate) message: String,
}

/// One access to the sample customer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AccessLine {
    /// Time (UTC).
    pub(crate) time: String,
    /// Principal.
    pub(crate) principal: String,
    /// Namespace/policy/rule.
    pub(crate) via: String,
    /// Normalised path.
    pub(crate) path: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    /// Normal traffic, then the incidents.
    pub(crate) phases: Vec<PhaseReport>,
    /// Every alert.
    pub(crate) alerts: Vec<AlertLine>,
    /// The sample customer's id (synthetic).
    pub(crate) sample_customer: String,
    /// Its keyed hash, as the store indexes it.
    pub(crate) sample_hash: String,
    /// Who accessed it.
    pub(crate) accesses: Vec<AccessLine>,
    /// The scanners' service egress, from its compiled NetworkPolicy.
    pub(crate) egress: Vec<String>,
    /// Requests sent in all.
    pub(crate) requests: u64,
    /// Events stored in all (the chain's head).
    pub(crate) events_stored: u64,
    /// Stored events attributed to a phase.
    pub(crate) events_attributed: u64,
    /// Events the chain verification checked.
    pub(crate) chain_checked: u64,
    /// Whether the chain verified.
    pub(crate) chain_intact: bool,
    /// The first broken link, when it did not.
    pub(crate) chain_break: Option<String>,
    /// What the demo changed in the examples.
    pub(crate) adjustments: Vec<String>,
    /// Where the store and configs were kept (`--keep`).
    pub(crate) kept: Option<String>,
    /// What did not happen as expected (empty: the story held).
    pub(crate) failures: Vec<String>,
}

/// Builds the report from the replay and the store.
pub(crate) fn build(phases: Vec<Phase>, findings: Findings, sample: (&str, &str)) -> Report {
    let alerts: Vec<AlertLine> = findings
        .alerts
        .iter()
        .map(|a| {
            let principal = a.principal.clone().unwrap_or_default();
            AlertLine {
                phase: phase_of(&phases, &principal, true).map_or("normal", |p| p.key).to_owned(),
                detector: a.detector.clone(),
                severity: format!("{:?}", a.severity),
                principal,
                scope: format!(
                    "{}/{}",
                    a.namespace.as_deref().unwrap_or("-"),
                    a.policy.as_deref().unwrap_or("-")
                ),
                message: a.message.clone(),
            }
        })
        .collect();
    let requests = phases.iter().map(|p| p.tally.requests).sum();
    let events_attributed = findings.counts.values().map(|c| c.events).sum();
    let phases = phases
        .into_iter()
        .map(|phase| {
            let mut detectors: Vec<String> =
                alerts.iter().filter(|a| a.phase == phase.key).map(|a| a.detector.clone()).collect();
            detectors.sort();
            detectors.dedup();
            let audit = findings.counts.get(phase.key).cloned().unwrap_or_default();
            PhaseReport { phase, audit, alerts: detectors }
        })
        .collect();
    let accesses = findings
        .accesses
        .iter()
        .map(|a| AccessLine {
            time: a.time.get(11..19).unwrap_or(&a.time).to_owned(),
            principal: a.principal.clone(),
            via: format!(
                "{}/{}/{}",
                a.namespace,
                a.policy.as_deref().unwrap_or("-"),
                a.rule.as_deref().unwrap_or("(default)")
            ),
            path: a.path.clone(),
        })
        .collect();
    let verify = &findings.verify;
    Report {
        phases,
        alerts,
        sample_customer: sample.0.to_owned(),
        sample_hash: sample.1.to_owned(),
        accesses,
        egress: Vec::new(),
        requests,
        events_stored: events_attributed,
        events_attributed,
        chain_checked: verify.checked,
        chain_intact: verify.is_ok(),
        chain_break: verify
            .first_broken
            .as_ref()
            .map(|b| format!("seq {}: {:?}: {}", b.seq, b.kind, b.detail)),
        adjustments: Vec::new(),
        kept: None,
        failures: Vec::new(),
    }
}

/// Columns padded to their widest cell; `right` columns aligned right.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>], right: &[usize]) {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = indent.to_owned();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if right.contains(&i) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn reasons(t: &Tally) -> String {
    if t.reasons.is_empty() {
        return "none".to_owned();
    }
    let mut list: Vec<(&String, &u64)> = t.reasons.iter().collect();
    list.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    list.iter().map(|(r, n)| format!("{r} x{n}")).collect::<Vec<_>>().join(", ")
}

fn masked(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts.iter().map(|(class, n)| format!("{class} {n}")).collect::<Vec<_>>().join(", ")
}

impl Report {
    /// The report as text.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        let _ =
            writeln!(out, "Custos demo: four leak incidents against the example policies (synthetic data)");
        let _ = writeln!(out);
        let mut rows = vec![
            [
                "PHASE",
                "REQUESTS",
                "ALLOWED",
                "DENIED",
                "THROTTLED",
                "REJECTED",
                "RECORDS",
                "FILTERED",
                "CAPPED",
                "MASKED",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for p in &self.phases {
            let (t, a) = (&p.phase.tally, &p.audit);
            rows.push(vec![
                p.phase.title.split(" (").next().unwrap_or(p.phase.title).to_owned(),
                t.requests.to_string(),
                t.allowed.to_string(),
                t.denied.to_string(),
                t.throttled.to_string(),
                t.rejected.to_string(),
                a.records_returned.to_string(),
                a.records_filtered.to_string(),
                a.records_truncated.to_string(),
                a.masked_total().to_string(),
            ]);
        }
        table(&mut out, "", &rows, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let _ = writeln!(
            out,
            "(denied: 401/403; throttled: 429 with Retry-After; rejected: 400 before any rule; records returned, \
             filtered out by row filters, capped, and fields masked: from the audit store)"
        );
        for p in &self.phases {
            let _ = writeln!(out);
            let _ = writeln!(out, "{}  [{}]", p.phase.title, p.phase.policy);
            let _ = writeln!(out, "  {}", p.phase.story);
            let _ = writeln!(out, "  refused:  {}", reasons(&p.phase.tally));
            let _ = writeln!(
                out,
                "  audit:    {} events ({} Allow, {} Deny, {} WouldDeny); masked: {}",
                p.audit.events,
                p.audit.allow,
                p.audit.deny,
                p.audit.would_deny,
                masked(&p.audit.masked)
            );
            if let Some(sample) = p.phase.tally.sample.as_ref().filter(|_| p.phase.show_sample) {
                let _ = writeln!(out, "  got e.g.: {sample}");
            }
            let alerts = if p.alerts.is_empty() { "none".to_owned() } else { p.alerts.join(", ") };
            let _ = writeln!(out, "  alerts:   {alerts}");
            if p.phase.key == "scanner" && !self.egress.is_empty() {
                let _ = writeln!(
                    out,
                    "  egress of parcel-scan pods (compiled NetworkPolicy custos-parcel-scan):"
                );
                for line in &self.egress {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Alerts fired: {}", self.alerts.len());
        let mut rows =
            vec![["PHASE", "DETECTOR", "SEVERITY", "PRINCIPAL", "MESSAGE"].map(str::to_owned).to_vec()];
        for a in &self.alerts {
            rows.push(vec![
                a.phase.clone(),
                a.detector.clone(),
                a.severity.clone(),
                a.principal.clone(),
                a.message.clone(),
            ]);
        }
        table(&mut out, "  ", &rows, &[]);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Who accessed customer {} (keyed hash {}...; the store holds no customer ids): {} access{}",
            self.sample_customer,
            self.sample_hash.get(..16).unwrap_or(&self.sample_hash),
            self.accesses.len(),
            if self.accesses.len() == 1 { "" } else { "es" }
        );
        let mut rows =
            vec![["TIME (UTC)", "PRINCIPAL", "NAMESPACE/POLICY/RULE", "PATH"].map(str::to_owned).to_vec()];
        for a in &self.accesses {
            rows.push(vec![a.time.clone(), a.principal.clone(), a.via.clone(), a.path.clone()]);
        }
        table(&mut out, "  ", &rows, &[]);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Audit trail: {} requests sent, {} events stored",
            self.requests, self.events_stored
        );
        match &self.chain_break {
            None => {
                let _ = writeln!(out, "audit verify: chain intact, {} events checked", self.chain_checked);
            }
            Some(b) => {
                let _ = writeln!(
                    out,
                    "audit verify: chain BROKEN at {b} ({} events checked before)",
                    self.chain_checked
                );
            }
        }
        if !self.adjustments.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "The demo adjusted the examples:");
            for a in &self.adjustments {
                let _ = writeln!(out, "  {a}");
            }
        }
        let _ = writeln!(out);
        if self.failures.is_empty() {
            let _ = writeln!(out, "Every step of the story happened as expected.");
        } else {
            let _ = writeln!(out, "NOT as expected:");
            for f in &self.failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        match &self.kept {
            Some(dir) => {
                let _ = writeln!(
                    out,
                    "Audit store and configs kept in {dir} (try: custos audit --store sqlite:{dir}/audit.db alerts)"
                );
            }
            None => {
                let _ =
                    writeln!(out, "Everything the demo created has been removed (keep it with --keep DIR).");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned() {
        let mut out = String::new();
        let rows = vec![
            vec!["A".to_owned(), "N".to_owned(), "LAST".to_owned()],
            vec!["long name".to_owned(), "12".to_owned(), "x".to_owned()],
        ];
        table(&mut out, "  ", &rows, &[1]);
        assert_eq!(out, "  A           N  LAST\n  long name  12  x\n");
    }
}
