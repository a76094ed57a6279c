//! Random event streams: the engine never panics, stays within its principal cap, and is
//! deterministic.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::DateTime;
use common::*;
use custos_api::Decision;
use custos_detect::{DetectConfig, Detectors};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Ev {
    /// Milliseconds to add to the previous time (may be negative: out of order).
    step_ms: i64,
    principal: u8,
    decision: u8,
    returned: u64,
    filtered: u64,
    reason: u8,
    scope: u8,
    /// 0: valid; 1: unparsable time; 2: the id of the previous event again.
    oddity: u8,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        prop_oneof![
            8 => 0i64..2_000,
            2 => -600_000i64..0,
            1 => 0i64..86_400_000 * 3,
            1 => -86_400_000i64 * 400..86_400_000 * 400,
        ],
        any::<u8>(),
        0u8..3,
        prop_oneof![6 => 0u64..50, 1 => 0u64..200_000, 1 => Just(u64::MAX / 4)],
        prop_oneof![4 => Just(0u64), 1 => 0u64..1_000],
        0u8..4,
        0u8..4,
        prop_oneof![20 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    )
        .prop_map(|(step_ms, principal, decision, returned, filtered, reason, scope, oddity)| Ev {
            step_ms,
            principal,
            decision,
            returned,
            filtered,
            reason,
            scope,
            oddity,
        })
}

fn config() -> impl Strategy<Value = DetectConfig> {
    (1usize..40, 0u64..7_200, 60u64..86_400 * 3, 0u64..600, 0usize..64, 0u64..86_400 * 2, 1u64..600).prop_map(
        |(cap, cooldown, ttl, late, dedupe, learning, bucket)| {
            let mut c = DetectConfig {
                max_principals: cap,
                cooldown: Duration::from_secs(cooldown),
                state_ttl: Duration::from_secs(ttl),
                late_tolerance: Duration::from_secs(late),
                dedupe_window: dedupe,
                ..DetectConfig::default()
            };
            c.first_seen.learning = Duration::from_secs(learning);
            c.volume.bucket = Duration::from_secs(bucket);
            c.volume.warmup_buckets = (bucket % 5) as u32;
            c.off_hours.time_zone = "America/New_York".into();
            c
        },
    )
}

fn build(stream: &[Ev]) -> Vec<custos_api::AuditEvent> {
    let mut t = at("2024-03-10T06:30:00Z");
    let mut out: Vec<custos_api::AuditEvent> = Vec::new();
    for e in stream {
        t = (t + e.step_ms).clamp(0, 253_402_300_799_000);
        let principal = match e.principal % 4 {
            0 => format!("user:u{}", e.principal),
            1 => format!("workload:ns/sa{}", e.principal),
            2 => format!("peer:10.0.0.{}", e.principal),
            _ => format!("user:u{}", e.principal % 8),
        };
        let reason = [
            "out_of_scope",
            "default_deny",
            "quota_exceeded:records_per_hour",
            "out_of_scope (audit mode: not enforced)",
        ][e.reason as usize];
        let mut event = match e.decision {
            0 => mk_filtered(&principal, t, e.returned, e.filtered),
            _ => {
                let mut d = mk_deny(&principal, t, reason);
                if e.decision == 2 {
                    d.decision = Decision::WouldDeny;
                }
                d.records_filtered = e.filtered;
                d
            }
        };
        if e.scope > 0 {
            event = in_scope(event, &format!("ns{}", e.scope), &format!("policy{}", e.scope % 2));
        }
        match e.oddity {
            1 => event.time = "not a time".into(),
            2 => {
                if let Some(prev) = out.last() {
                    event.id = prev.id.clone();
                }
            }
            _ => {}
        }
        out.push(event);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_never_panic_and_stay_within_the_cap(
        config in config(),
        stream in prop::collection::vec(ev(), 1..400),
    ) {
        let events = build(&stream);
        let cap = config.max_principals;
        let mut d = Detectors::new(config.clone()).unwrap();
        let mut alerts = Vec::new();
        for e in &events {
            for a in d.observe(e) {
                prop_assert!(!a.id.is_empty());
                prop_assert!(DateTime::parse_from_rfc3339(&a.time).is_ok(), "alert time {}", a.time);
                prop_assert!(a.principal.as_deref() == Some(e.principal.as_str()));
                prop_assert!(!a.message.is_empty());
                alerts.push(a);
            }
            prop_assert!(d.tracked_principals() <= cap);
        }
        let s = d.stats();
        prop_assert_eq!(s.events, events.len() as u64);
        prop_assert_eq!(s.alerts, alerts.len() as u64);
        prop_assert!(s.duplicates + s.invalid + s.late <= s.events);
        prop_assert!(s.tracked_principals <= cap);

        // Deterministic: the same stream gives the same alerts.
        let mut again = Detectors::new(config).unwrap();
        prop_assert_eq!(again.observe_all(&events), alerts);
    }
}
