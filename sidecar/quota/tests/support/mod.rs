//! Test helpers: limits, times and a simulated collector.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use custos_api::collector::{RuleUsage, UsageResponse};
use custos_api::policy::Limits;
use custos_quota::{QuotaKey, Timestamp};

/// A day-aligned base time (2023-11-14T00:00:00Z), so minute, quarter-hour and hour buckets
/// start at T.
pub const T: u64 = 1_699_920_000;

pub const MIN: u64 = 60;
pub const HOUR: u64 = 3_600;
pub const DAY: u64 = 86_400;

/// T + `secs` seconds.
pub fn at(secs: u64) -> Timestamp {
    Timestamp::from_secs(T + secs)
}

/// T + `ms` milliseconds.
pub fn at_ms(ms: u64) -> Timestamp {
    Timestamp::from_millis(T * 1_000 + ms)
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn limits(rpm: Option<u32>, per_hour: Option<u64>, per_day: Option<u64>) -> Limits {
    Limits {
        requests_per_minute: rpm,
        records_per_hour: per_hour,
        records_per_day: per_day,
        ..Limits::default()
    }
}

pub fn key(principal: &str) -> QuotaKey {
    QuotaKey::new("customer-api", "read", principal)
}

/// What every replica reported: (time ms, rule, requests, records), as the collector stores
/// it, and the cluster-wide usage it computes over exact trailing windows.
#[derive(Default)]
pub struct Collector {
    events: Vec<(u64, String, u64, u64)>,
}

impl Collector {
    pub fn request(&mut self, rule: &str, now: Timestamp) {
        self.events.push((now.as_millis(), rule.to_owned(), 1, 0));
    }

    pub fn records(&mut self, rule: &str, n: u64, now: Timestamp) {
        self.events.push((now.as_millis(), rule.to_owned(), 0, n));
    }

    pub fn usage(&self, policy: &str, principal: &str, as_of: Timestamp) -> UsageResponse {
        let t = as_of.as_millis();
        let mut rules: BTreeMap<String, RuleUsage> = BTreeMap::new();
        for (at, rule, requests, records) in &self.events {
            if *at > t {
                continue;
            }
            let u = rules.entry(rule.clone()).or_default();
            if *at + 60_000 > t {
                u.requests_last_minute += requests;
            }
            if *at + 3_600_000 > t {
                u.records_last_hour += records;
            }
            if *at + 86_400_000 > t {
                u.records_last_day += records;
            }
        }
        UsageResponse {
            policy: policy.to_owned(),
            principal: principal.to_owned(),
            as_of: String::new(),
            rules,
            instance: None,
            rules_without_instance: None,
        }
    }
}
