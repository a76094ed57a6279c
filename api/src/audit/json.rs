//! The JSON of an audit event, written by hand: the same bytes as `serde_json::to_vec` of
//! the event (the tests compare the two on every field and on random events), without
//! serde_json's byte-by-byte string escaping, which was most of the cost of encoding an event
//! (callgrind: 4,800 of 6,100 instructions per event in the sidecar's shipper; strings are
//! most of an event, field names included). The sidecar ships events written here, and the
//! collector stores them (the body its hash chain links) written here.
//!
//! Fields are written in the struct's order with its serde names, skipping what its serde
//! attributes skip. A field added to [`AuditEvent`] breaks the tests' struct literal, and then
//! their comparison with serde_json until it is written here too.

use std::collections::BTreeMap;

use crate::audit::AuditEvent;
use crate::policy::Mode;

/// Appends `e` as one line of JSON, without the newline.
pub fn write_event(out: &mut Vec<u8>, e: &AuditEvent) {
    write_event_open(out, e);
    if let Some(prev_hash) = &e.prev_hash {
        out.extend_from_slice(b",\"prevHash\":");
        write_str(out, prev_hash);
    }
    out.push(b'}');
}

/// Appends `"recordsReturned":..,"recordsFiltered":..,"recordsTruncated":..` (`counts`, in
/// that order) and `"masked":{..}` unless empty: the numbers of an event and of a dry run's
/// transform, written alike.
fn write_record_counts(out: &mut Vec<u8>, counts: [u64; 3], masked: &BTreeMap<String, u64>) {
    let names: [&[u8]; 3] = [b"\"recordsReturned\":", b",\"recordsFiltered\":", b",\"recordsTruncated\":"];
    for (name, n) in names.into_iter().zip(counts) {
        out.extend_from_slice(name);
        write_u64(out, n);
    }
    if !masked.is_empty() {
        out.extend_from_slice(b",\"masked\":");
        write_map(out, masked, |out, n| write_u64(out, *n));
    }
}

/// Appends `e` without its `prevHash` (the last field) and without the closing brace: what
/// the collector links into its hash chain by appending `prevHash` and the brace.
pub fn write_event_open(out: &mut Vec<u8>, e: &AuditEvent) {
    out.extend_from_slice(b"{\"schemaVersion\":");
    write_u64(out, u64::from(e.schema_version));
    out.extend_from_slice(b",\"id\":");
    write_str(out, &e.id);
    out.extend_from_slice(b",\"time\":");
    write_str(out, &e.time);
    if let Some(cluster) = &e.cluster {
        out.extend_from_slice(b",\"cluster\":");
        write_str(out, cluster);
    }
    out.extend_from_slice(b",\"namespace\":");
    write_str(out, &e.namespace);
    if let Some(policy) = &e.policy {
        out.extend_from_slice(b",\"policy\":");
        write_str(out, policy);
    }
    if let Some(rule) = &e.rule {
        out.extend_from_slice(b",\"rule\":");
        write_str(out, rule);
    }
    out.extend_from_slice(b",\"mode\":");
    write_str(out, mode_name(e.mode));
    if let Some(pod) = &e.pod {
        out.extend_from_slice(b",\"pod\":");
        write_str(out, pod);
    }
    if let Some(caller) = &e.caller {
        out.extend_from_slice(b",\"caller\":{\"namespace\":");
        write_str(out, &caller.namespace);
        out.extend_from_slice(b",\"serviceAccount\":");
        write_str(out, &caller.service_account);
        out.push(b'}');
    }
    if let Some(user) = &e.user {
        out.extend_from_slice(b",\"user\":{\"id\":");
        write_str(out, &user.id);
        if !user.attributes.is_empty() {
            out.extend_from_slice(b",\"attributes\":");
            write_map(out, &user.attributes, |out, v| write_str(out, v));
        }
        out.push(b'}');
    }
    out.extend_from_slice(b",\"principal\":");
    write_str(out, &e.principal);
    write_opt_str(out, b",\"rulePrincipal\":", e.rule_principal.as_deref());
    out.extend_from_slice(b",\"method\":");
    write_str(out, &e.method);
    out.extend_from_slice(b",\"path\":");
    write_str(out, &e.path);
    out.extend_from_slice(b",\"decision\":");
    write_str(out, e.decision.as_str());
    out.extend_from_slice(b",\"reason\":");
    write_str(out, &e.reason);
    out.extend_from_slice(b",\"status\":");
    write_u64(out, u64::from(e.status));
    out.push(b',');
    write_record_counts(out, [e.records_returned, e.records_filtered, e.records_truncated], &e.masked);
    out.extend_from_slice(b",\"bytes\":");
    write_u64(out, e.bytes);
    out.extend_from_slice(b",\"latencyUs\":");
    write_u64(out, e.latency_us);
    if let Some(trace_id) = &e.trace_id {
        out.extend_from_slice(b",\"traceId\":");
        write_str(out, trace_id);
    }
    write_list(out, b",\"recordHashes\":[", &e.record_hashes, |out, hash| write_str(out, hash));
    write_list(out, b",\"alsoApplied\":[", &e.also_applied, |out, applied| {
        out.extend_from_slice(b"{\"policy\":");
        write_str(out, &applied.policy);
        out.extend_from_slice(b",\"rule\":");
        write_str(out, &applied.rule);
        write_opt_str(out, b",\"principal\":", applied.principal.as_deref());
        out.push(b'}');
    });
    write_list(out, b",\"dryRuns\":[", &e.dry_runs, |out, run| {
        out.extend_from_slice(b"{\"policy\":");
        write_str(out, &run.policy);
        write_opt_str(out, b",\"rule\":", run.rule.as_deref());
        write_opt_str(out, b",\"principal\":", run.principal.as_deref());
        out.extend_from_slice(b",\"decision\":");
        write_str(out, run.decision.as_str());
        out.extend_from_slice(b",\"reason\":");
        write_str(out, &run.reason);
        if run.charged {
            out.extend_from_slice(b",\"charged\":true");
        }
        if let Some(t) = &run.transform {
            out.extend_from_slice(b",\"transform\":{");
            write_record_counts(
                out,
                [t.records_returned, t.records_filtered, t.records_truncated],
                &t.masked,
            );
            out.push(b'}');
        }
        out.push(b'}');
    });
}

/// Appends `open` (`,"name":[`), the items written by `each` and `]`; nothing when `items`
/// is empty (the fields serde skips when empty).
fn write_list<T>(out: &mut Vec<u8>, open: &[u8], items: &[T], each: impl Fn(&mut Vec<u8>, &T)) {
    if items.is_empty() {
        return;
    }
    out.extend_from_slice(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(b']');
}

/// Appends `name` (`,"name":`) and `value` when there is one (the fields serde skips when
/// `None`).
fn write_opt_str(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(name);
        write_str(out, value);
    }
}

/// The serde name of a mode (its variant name).
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "Enforce",
        Mode::Audit => "Audit",
        Mode::Disabled => "Disabled",
    }
}

fn write_map<V>(out: &mut Vec<u8>, map: &BTreeMap<String, V>, value: impl Fn(&mut Vec<u8>, &V)) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        value(out, v);
    }
    out.push(b'}');
}

fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (eight, little-endian) that JSON escapes: below 0x20, `"` and `\`. The
/// lowest set high bit is exact (later ones may be borrows).
fn escapes(w: u64) -> u64 {
    let eq = |b: u8| {
        let x = w ^ (ONES * u64::from(b));
        x.wrapping_sub(ONES) & !x
    };
    (w.wrapping_sub(ONES * 0x20) | eq(b'"') | eq(b'\\')) & !w & HIGHS
}

/// Appends `s` as a JSON string literal, escaped as serde_json escapes: `\"`, `\\`, the short
/// forms `\b \f \n \r \t`, other control characters as `\u00xx`; everything else as is. Runs
/// without escapes are found eight bytes at a time and copied whole.
fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        // eight bytes, or the last few padded with spaces (which need no escape)
        let mut w = [b' '; 8];
        let n = (bytes.len() - i).min(8);
        for (to, from) in w.iter_mut().zip(&bytes[i..i + n]) {
            *to = *from;
        }
        let stops = escapes(u64::from_le_bytes(w));
        if stops == 0 {
            i += n;
            continue;
        }
        i += (stops.trailing_zeros() / 8) as usize;
        let b = bytes[i];
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0C => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1F => b'u',
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            out.extend_from_slice(&[b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]]);
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::audit::{AppliedRule, AuditUser, CallerWorkload, Decision, DryRun, DryRunTransform};
    use proptest::prelude::*;

    use super::*;

    fn serde_line(e: &AuditEvent) -> String {
        serde_json::to_string(e).unwrap()
    }

    fn line(e: &AuditEvent) -> String {
        let mut out = Vec::new();
        write_event(&mut out, e);
        String::from_utf8(out).unwrap()
    }

    /// Every field set (a struct literal: a new field must be added here, and then written).
    fn mk_full(text: &str) -> AuditEvent {
        AuditEvent {
            schema_version: 1,
            id: format!("01J{text}"),
            time: "2026-12-05T05:00:00.123456Z".into(),
            cluster: Some(format!("c{text}")),
            namespace: format!("ns{text}"),
            policy: Some(text.into()),
            rule: Some(format!("r{text}")),
            mode: Mode::Audit,
            pod: Some(format!("p{text}")),
            caller: Some(CallerWorkload { namespace: text.into(), service_account: format!("sa{text}") }),
            user: Some(AuditUser {
                id: text.into(),
                attributes: [("branch".to_string(), text.to_string()), (text.to_string(), "x".to_string())]
                    .into(),
            }),
            principal: format!("user:{text}"),
            rule_principal: Some(format!("peer:{text}")),
            method: "GET".into(),
            path: format!("/customers/{text}"),
            decision: Decision::WouldDeny,
            reason: format!("deny_rule {text}"),
            status: 403,
            records_returned: u64::MAX,
            records_filtered: 7,
            records_truncated: 0,
            masked: [(text.to_string(), 3), ("phone".to_string(), 10)].into(),
            bytes: 1_000_000,
            latency_us: 12,
            trace_id: Some(format!("t{text}")),
            record_hashes: vec![text.into(), "ab".into()],
            also_applied: vec![
                AppliedRule { policy: text.into(), rule: format!("r{text}"), principal: None },
                AppliedRule {
                    policy: format!("p{text}"),
                    rule: text.into(),
                    principal: Some(format!("peer:{text}")),
                },
            ],
            dry_runs: vec![
                DryRun {
                    policy: text.into(),
                    rule: Some(format!("r{text}")),
                    principal: None,
                    decision: Decision::WouldDeny,
                    reason: format!("deny_rule{text}"),
                    charged: false,
                    transform: None,
                },
                DryRun {
                    policy: format!("p{text}"),
                    rule: None,
                    principal: Some(format!("peer:{text}")),
                    decision: Decision::Allow,
                    reason: "default_allow".into(),
                    charged: true,
                    transform: Some(DryRunTransform {
                        records_returned: 2,
                        records_filtered: u64::MAX,
                        records_truncated: 0,
                        masked: [(text.to_string(), 1), ("name".to_string(), 4)].into(),
                    }),
                },
                DryRun {
                    policy: format!("q{text}"),
                    rule: Some("r".into()),
                    principal: None,
                    decision: Decision::Allow,
                    reason: "allow_rule".into(),
                    charged: false,
                    transform: Some(DryRunTransform::default()),
                },
            ],
            prev_hash: Some(format!("h{text}")),
        }
    }

    /// Only what an event must have.
    fn mk_bare() -> AuditEvent {
        AuditEvent {
            cluster: None,
            policy: None,
            rule: None,
            mode: Mode::Enforce,
            pod: None,
            caller: None,
            user: Some(AuditUser { id: "u".into(), attributes: BTreeMap::new() }),
            decision: Decision::Allow,
            records_returned: 0,
            masked: BTreeMap::new(),
            trace_id: None,
            rule_principal: None,
            record_hashes: Vec::new(),
            also_applied: Vec::new(),
            dry_runs: Vec::new(),
            prev_hash: None,
            ..mk_full("")
        }
    }

    #[test]
    fn every_field_and_every_skipped_field_as_serde_json_writes_them() {
        for e in [mk_full("plain"), mk_bare(), AuditEvent { user: None, mode: Mode::Disabled, ..mk_bare() }] {
            assert_eq!(line(&e), serde_line(&e));
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}b", char::from(b))).collect();
        texts.extend(
            [
                "",
                "\"",
                "\\",
                "\u{7f}",
                "é",
                "日本",
                "😀",
                "\u{2028}",
                "12345678\n",
                "1234567\"",
                "\u{1}\u{1f}x",
            ]
            .map(String::from),
        );
        for t in texts {
            let e = mk_full(&t);
            assert_eq!(line(&e), serde_line(&e), "{t:?}");
        }
    }

    proptest! {
        #[test]
        fn random_events_are_written_as_serde_json_writes_them(text in any::<String>(), n in any::<u64>(), status in any::<u16>()) {
            let mut e = mk_full(&text);
            e.records_filtered = n;
            e.status = status;
            prop_assert_eq!(line(&e), serde_line(&e));
            let back: AuditEvent = serde_json::from_str(&line(&e)).unwrap();
            prop_assert_eq!(back, e);
        }
    }
}
