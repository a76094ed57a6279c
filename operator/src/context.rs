//! [`Context`]: everything the controller depends on, in one struct — the Kubernetes client,
//! the metrics, the Event recorder and the settings. Built once at start; the tests and the
//! benchmark build it over an in-memory API.

use std::collections::BTreeSet;

use custos_operator_core::desired::Options;
use custos_operator_core::names::REPORTING_CONTROLLER;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use crate::metrics::OperatorMetrics;

/// The Secrets the sidecars mount (collector token, hash key), copied by the operator from
/// its own namespace into every namespace that has live policies (`--sync-sidecar-secrets`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretSync {
    /// Where the originals are: the operator's namespace.
    pub source_namespace: String,
    /// Their names (the same in every namespace).
    pub names: Vec<String>,
    /// Which of them is the collector token: each namespace gets, under its key `token`, the
    /// namespace token derived from the original
    /// ([`custos_api::collector::namespace_token`]), which may only send that namespace's
    /// events and read its usage, instead of the collector token itself.
    pub collector_token: Option<String>,
}

/// What the controller is told to do.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// This replica's identity: the `reportingInstance` of its Events.
    pub instance: String,
    /// The namespaces to reconcile; `None`: all. Pods outside them are not read either, so a
    /// rule source naming another namespace matches no pod there.
    pub namespaces: Option<BTreeSet<String>>,
    /// Secrets to copy into the namespaces with policies; `None`: the user provides them.
    pub secret_sync: Option<SecretSync>,
    /// What shapes the objects of every namespace (who may scrape the sidecars).
    pub options: Options,
}

impl Settings {
    /// True when `namespace` is one the operator reconciles (and reads pods of).
    pub fn watches(&self, namespace: &str) -> bool {
        self.namespaces.as_ref().is_none_or(|set| set.contains(namespace))
    }
}

/// The controller's dependencies.
pub struct Context {
    /// Kubernetes API client.
    pub client: Client,
    /// Operator metrics (reconcile counts, durations, errors, policy count).
    pub metrics: OperatorMetrics,
    /// Records Events on DataAccessPolicies (reporting controller `custos-operator`).
    pub recorder: Recorder,
    /// Instance name and namespaces.
    pub settings: Settings,
}

impl Context {
    /// A context over `client`, recording Events as [`REPORTING_CONTROLLER`] /
    /// `settings.instance`.
    pub fn new(client: Client, metrics: OperatorMetrics, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_string(),
            instance: Some(settings.instance.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Self { client, metrics, recorder, settings }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("settings", &self.settings).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_watch_all_namespaces_or_the_listed_ones() {
        let all = Settings { instance: "op-0".into(), ..Settings::default() };
        assert!(all.watches("anything"));
        let some = Settings {
            instance: "op-0".into(),
            namespaces: Some(BTreeSet::from(["shop".to_string()])),
            ..Settings::default()
        };
        assert!(some.watches("shop"));
        assert!(!some.watches("billing"));
    }
}
