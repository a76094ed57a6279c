//! The post-commit pipeline of `custos collector`: newly stored events go through the leak
//! detectors ([`custos_detect::Detectors`]; alerts are stored, counted and handed to the
//! [`AlertDispatcher`] for the webhook) and, when configured, are forwarded to the user's
//! OpenTelemetry pipeline ([`OtlpExporter`]).
//!
//! It consumes the [`observer`](crate::observer) channel, so it never delays an
//! acknowledgement: when it falls behind, batches are dropped from the channel and counted in
//! `custos_collector_observer_dropped_events_total`. It is given each stored event once: the
//! store tells which events of a resent batch were new.
//!
//! At start the detectors are warmed up with the last [`WARM_UP`] of stored events (at most
//! [`WARM_UP_MAX_EVENTS`]) so that a restart does not reset every principal's baseline; the
//! alerts of the warm-up are discarded (those that were raised before are already stored).

use std::time::Duration;

use chrono::Utc;
use custos_detect::{AlertDispatcher, DetectConfig, Detectors};
use custos_otlp::OtlpExporter;
use custos_store::{AnyStore, EventQuery};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::observer::StoredBatch;

/// How far back the detectors are warmed up at start.
pub const WARM_UP: Duration = Duration::from_secs(3_600);
/// At most this many events are replayed at start.
pub const WARM_UP_MAX_EVENTS: usize = 200_000;
/// Batches waiting for the pipeline.
pub(crate) const CHANNEL_CAPACITY: usize = 256;

/// What the pipeline feeds.
pub(crate) struct Sinks {
    /// `None`: detection is off.
    pub detectors: Option<Detectors>,
    /// Counts alerts and delivers them (webhook, recorders); counts only without destinations.
    pub dispatcher: AlertDispatcher,
    /// `None`: no OTLP export.
    pub exporter: Option<OtlpExporter>,
}

/// The running pipeline.
pub(crate) struct Pipeline {
    task: JoinHandle<()>,
}

impl Pipeline {
    /// Starts the pipeline on `batches`; it stops when `stop` turns true (after draining what is
    /// queued) or when every sender is gone.
    pub(crate) fn start(
        store: AnyStore,
        sinks: Sinks,
        batches: mpsc::Receiver<StoredBatch>,
        stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> Pipeline {
        Pipeline { task: tokio::spawn(run(store, sinks, batches, stop, grace)) }
    }

    /// Waits until the pipeline has drained and its sinks have shut down.
    pub(crate) async fn finished(self) {
        let _ = self.task.await;
    }
}

/// Builds the detectors from `config` (`None`: detection off).
pub(crate) fn detectors(config: Option<&DetectConfig>) -> Result<Option<Detectors>, String> {
    config.map(|c| Detectors::new(c.clone()).map_err(|e| format!("detector settings: {e}"))).transpose()
}

async fn run(
    store: AnyStore,
    mut sinks: Sinks,
    mut batches: mpsc::Receiver<StoredBatch>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    if let Some(detectors) = sinks.detectors.as_mut() {
        warm_up(&store, detectors).await;
    }
    loop {
        let batch = tokio::select! {
            b = batches.recv() => b,
            () = crate::server::stopped(&mut stop) => None,
        };
        let Some(batch) = batch else { break };
        handle(&store, &mut sinks, batch).await;
    }
    // Stopping: what was committed before the stop is still processed.
    while let Ok(batch) = batches.try_recv() {
        handle(&store, &mut sinks, batch).await;
    }
    if !sinks.dispatcher.shutdown(grace).await {
        tracing::warn!("alert delivery did not finish within the shutdown grace period");
    }
    if let Some(e) = &sinks.exporter {
        let summary = e.shutdown(grace).await;
        tracing::info!(?summary, "OTLP exporter stopped");
    }
}

async fn handle(store: &AnyStore, sinks: &mut Sinks, batch: StoredBatch) {
    let events = batch.events;
    if let Some(exporter) = &sinks.exporter {
        // Full queue: dropped and counted by the exporter's metrics.
        let _ = exporter.try_send(&events);
    }
    let Some(detectors) = sinks.detectors.as_mut() else { return };
    let alerts = detectors.observe_all(&events);
    sinks.dispatcher.metrics().update_detect_stats(&detectors.stats());
    if alerts.is_empty() {
        return;
    }
    if let Err(error) = store.insert_alerts(&alerts).await {
        tracing::error!(%error, alerts = alerts.len(), "storing alerts failed; they are still delivered");
    }
    sinks.dispatcher.dispatch(alerts);
}

/// An event as the detectors read it: the fields they never look at (record hashes, the user's
/// attributes, the path, masks, trace and chain fields) dropped, so that holding up to
/// [`WARM_UP_MAX_EVENTS`] of them at start does not take hundreds of MiB (a review measured
/// 660 MiB for 200,000 events with ten record hashes each, past the chart's memory limit: a
/// restart under crawler load would be killed, and again).
fn slim(mut event: custos_api::AuditEvent) -> custos_api::AuditEvent {
    event.record_hashes = Vec::new();
    event.user = None;
    event.caller = None;
    event.masked = Default::default();
    event.path = String::new();
    event.trace_id = None;
    event.prev_hash = None;
    event.pod = None;
    event.cluster = None;
    event
}

/// Replays the last [`WARM_UP`] of stored events through the detectors, oldest first,
/// discarding their alerts.
async fn warm_up(store: &AnyStore, detectors: &mut Detectors) {
    let since = Utc::now() - chrono::Duration::from_std(WARM_UP).unwrap_or_default();
    let mut events = Vec::new();
    let mut query = EventQuery { since: Some(since), limit: 5_000, ..EventQuery::default() };
    loop {
        match store.query(&query).await {
            Ok(page) => {
                events.extend(page.events.into_iter().map(slim));
                match page.next_cursor {
                    Some(c) if events.len() < WARM_UP_MAX_EVENTS => query.cursor = Some(c),
                    _ => break,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read recent events to warm up the detectors; starting cold");
                return;
            }
        }
    }
    events.reverse();
    let replayed = events.len();
    let _ = detectors.observe_all(&events);
    tracing::info!(replayed, "detectors warmed up with recent events");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use custos_detect::{DetectConfig, Detectors};
    use serde_json::json;

    use super::slim;

    /// What the detectors make of slimmed events is what they make of whole ones: a denial
    /// burst and a bulk export by one user, among ordinary reads.
    #[test]
    fn slimmed_events_raise_the_alerts_whole_ones_do() {
        let event = |i: u32, decision: &str, records: u64| -> custos_api::AuditEvent {
            serde_json::from_value(json!({
                "schemaVersion": 1, "id": format!("e{i:05}"),
                "time": format!("2026-12-06T10:{:02}:{:02}Z", i / 60 % 60, i % 60),
                "namespace": "shop", "policy": "customers", "rule": "read", "mode": "Enforce",
                "pod": "customers-0", "user": {"id": "mallory", "attributes": {"branch": "north"}},
                "principal": if i.is_multiple_of(3) { "user:alice" } else { "user:mallory" },
                "method": "GET", "path": format!("/customers/{i}"), "decision": decision,
                "reason": if decision == "Deny" { "deny_rule" } else { "allow_rule" },
                "status": if decision == "Deny" { 403 } else { 200 },
                "recordsReturned": records, "recordHashes": vec![format!("{i:064x}"); 3],
                "traceId": "0af7651916cd43dd8448eb211c80319c",
            }))
            .unwrap()
        };
        let mut events: Vec<_> = (0..600).map(|i| event(i, "Allow", 5)).collect();
        events.extend((600..640).map(|i| event(i, "Deny", 0)));
        events.extend((640..700).map(|i| event(i, "Allow", 2_000)));
        let alerts = |events: &[custos_api::AuditEvent]| {
            let mut d = Detectors::new(DetectConfig::default()).unwrap();
            let mut ids: Vec<_> =
                d.observe_all(events).into_iter().map(|a| (a.detector.clone(), a.id)).collect();
            ids.sort();
            ids
        };
        let whole = alerts(&events);
        assert!(!whole.is_empty(), "the sample raises alerts");
        let slimmed: Vec<_> = events.into_iter().map(slim).collect();
        assert!(slimmed.iter().all(|e| e.record_hashes.is_empty() && e.user.is_none() && e.path.is_empty()));
        assert_eq!(alerts(&slimmed), whole);
    }
}
