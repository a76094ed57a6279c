//! What every replay phase shares: the context it calls through, the tally of the answers it
//! got, and its description in the report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Serialize;
use serde_json::Value;

use super::app::Service;
use super::client::{Answer, Caller};
use super::identity::Issuer;
use super::stack::Stack;

/// What a phase can use.
pub(crate) struct Ctx<'a> {
    /// Signs the users' tokens.
    pub(crate) issuer: &'a Issuer,
    /// The sidecars.
    pub(crate) stack: &'a Stack,
}

impl Ctx<'_> {
    /// A caller from `source` to `service`'s sidecar with `token`.
    pub(crate) fn caller(&self, service: Service, source: Ipv4Addr, token: Option<String>) -> Caller {
        Caller::new(source, self.stack.proxy(service), token)
    }
}

/// Counts of the answers a phase got.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Tally {
    /// Requests sent.
    pub(crate) requests: u64,
    /// 2xx answers.
    pub(crate) allowed: u64,
    /// 401 and 403 answers.
    pub(crate) denied: u64,
    /// 429 answers.
    pub(crate) throttled: u64,
    /// 429 answers carrying `Retry-After`.
    pub(crate) retry_after: u64,
    /// 400 answers (requests refused before any policy: ambiguous paths).
    pub(crate) rejected: u64,
    /// Other answers.
    pub(crate) other: u64,
    /// Requests that got no answer.
    pub(crate) errors: u64,
    /// Refusals by status and reason, e.g. `403 out_of_scope`.
    pub(crate) reasons: BTreeMap<String, u64>,
    /// The first record of the first allowed answer, as the caller received it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sample: Option<Value>,
}

impl Tally {
    /// Counts one answer.
    pub(crate) fn record(&mut self, answer: &anyhow::Result<Answer>) {
        self.requests += 1;
        let Ok(answer) = answer else {
            self.errors += 1;
            return;
        };
        match answer.status {
            200..=299 => {
                self.allowed += 1;
                if self.sample.is_none() {
                    self.sample = first_record(&answer.body);
                }
            }
            401 | 403 => self.denied += 1,
            429 => {
                self.throttled += 1;
                self.retry_after += u64::from(answer.retry_after.is_some());
            }
            400 => self.rejected += 1,
            _ => self.other += 1,
        }
        if answer.status >= 400 {
            let reason = answer.reason.as_deref().unwrap_or("-");
            *self.reasons.entry(format!("{} {reason}", answer.status)).or_default() += 1;
        }
    }

    /// Adds another tally.
    pub(crate) fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.throttled += other.throttled;
        self.retry_after += other.retry_after;
        self.rejected += other.rejected;
        self.other += other.other;
        self.errors += other.errors;
        for (reason, n) in other.reasons {
            *self.reasons.entry(reason).or_default() += n;
        }
        if self.sample.is_none() {
            self.sample = other.sample;
        }
    }

    /// How many refusals have a reason containing `needle`.
    pub(crate) fn with_reason(&self, needle: &str) -> u64 {
        self.reasons.iter().filter(|(r, _)| r.contains(needle)).map(|(_, n)| n).sum()
    }

    /// `GET path` `times` times through `caller`.
    pub(crate) async fn get(&mut self, caller: &mut Caller, path: &str, times: usize) {
        for _ in 0..times {
            let answer = caller.get(path).await;
            self.record(&answer);
        }
    }

    /// `POST path` once through `caller`.
    pub(crate) async fn post(&mut self, caller: &mut Caller, path: &str, body: &str) {
        let answer = caller.post(path, body).await;
        self.record(&answer);
    }
}

/// The first item of a list body, or the body itself.
fn first_record(body: &[u8]) -> Option<Value> {
    let value: Value = serde_json::from_slice(body).ok()?;
    match value.get("items").and_then(Value::as_array) {
        Some(items) => items.first().cloned(),
        None => Some(value),
    }
}

/// One phase of the replay.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Phase {
    /// Short key (`normal`, `insider`, ...).
    pub(crate) key: &'static str,
    /// Title in the report.
    pub(crate) title: &'static str,
    /// The example policy it runs against.
    pub(crate) policy: &'static str,
    /// What the callers do, one line.
    pub(crate) story: &'static str,
    /// The principal keys of its callers (`user:<id>`, `peer:<ip>`).
    pub(crate) principals: BTreeSet<String>,
    /// The answers.
    pub(crate) tally: Tally,
    /// Whether the report shows the sample record (only where every personal field of it is
    /// masked).
    #[serde(skip)]
    pub(crate) show_sample: bool,
}

impl Phase {
    /// A phase with no request yet.
    pub(crate) fn new(
        key: &'static str,
        title: &'static str,
        policy: &'static str,
        story: &'static str,
    ) -> Phase {
        Phase {
            key,
            title,
            policy,
            story,
            principals: BTreeSet::new(),
            tally: Tally::default(),
            show_sample: false,
        }
    }

    /// Adds the principal of a user id.
    pub(crate) fn user(&mut self, id: &str) {
        self.principals.insert(format!("user:{id}"));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn answer(status: u16, reason: Option<&str>, retry: bool) -> anyhow::Result<Answer> {
        Ok(Answer {
            status,
            retry_after: retry.then(|| "30".to_owned()),
            reason: reason.map(str::to_owned),
            body: Bytes::from_static(br#"{"items": [{"id": "A"}, {"id": "B"}]}"#),
        })
    }

    #[test]
    fn answers_are_counted_by_kind_and_reason() {
        let mut t = Tally::default();
        t.record(&answer(200, None, false));
        t.record(&answer(403, Some("out_of_scope"), false));
        t.record(&answer(401, Some("missing_token"), false));
        t.record(&answer(429, Some("quota recordsPerHour"), true));
        t.record(&answer(400, Some("ambiguous_encoding"), false));
        t.record(&Err(anyhow::anyhow!("connection refused")));
        assert_eq!((t.requests, t.allowed, t.denied, t.throttled, t.retry_after), (6, 1, 2, 1, 1));
        assert_eq!((t.rejected, t.errors, t.other), (1, 1, 0));
        assert_eq!(t.with_reason("out_of_scope"), 1);
        assert_eq!(t.reasons.get("429 quota recordsPerHour"), Some(&1));
        assert_eq!(t.sample, Some(serde_json::json!({"id": "A"})));
        let mut sum = Tally::default();
        sum.merge(t.clone());
        sum.merge(t);
        assert_eq!((sum.requests, sum.with_reason("missing_token")), (12, 2));
    }
}
