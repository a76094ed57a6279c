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
//! [`WARM_UP_MAX_EVENTS`], read in pages of at most [`WARM_UP_PAGE_BYTES`] of stored events and
//! kept slimmed to at most [`WARM_UP_MAX_BYTES`]) so that a restart does not reset every
//! principal's baseline; the alerts of the warm-up are discarded (those that were raised
//! before are already stored).
//!
//! The detectors are told when each batch was received (now): an event dated ahead of that
//! counts as of now ([`Detectors::observe_all_received`]), and first_seen learns from the
//! collector's start.
//!
//! On PostgreSQL, where several replicas share the store and each receives only some of the
//! sidecars' batches, detection does not read the replica's own batches: one replica, the one
//! holding the store's detection lease ([`AnyStore::try_lease`]), follows the store itself in
//! chain order ([`AnyStore::events_after`]) every [`FOLLOW_INTERVAL`] and detects over every
//! replica's events; the others stand by and take over, warmed up from the store, when its
//! lease is lost (its process or connection gone).

use std::time::{Duration, Instant};

use chrono::Utc;
use custos_detect::{AlertDispatcher, DetectConfig, Detectors};
use custos_otlp::OtlpExporter;
use custos_store::{AnyStore, EventQuery, Lease, StorePosition};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::observer::StoredBatch;

/// How far back the detectors are warmed up at start.
pub const WARM_UP: Duration = Duration::from_secs(3_600);
/// At most this many events are replayed at start.
pub const WARM_UP_MAX_EVENTS: usize = 200_000;
/// The stored events of one warm-up page take at most about this much (plus one event, at most
/// [`custos_store::chain::MAX_EVENT_BYTES`]): a page of 5,000 crawler events with 10,000
/// record hashes each would otherwise be 3.5 GB of bodies, parsed at once.
pub const WARM_UP_PAGE_BYTES: usize = 16 << 20;
/// The slimmed events kept for the replay take at most about this much (estimated from their
/// strings): once reached, the older events are left out.
pub const WARM_UP_MAX_BYTES: usize = 128 << 20;
/// Batches waiting for the pipeline.
pub(crate) const CHANNEL_CAPACITY: usize = 256;
/// How often the replica following the store (PostgreSQL) reads what every replica stored,
/// and the others try to take the detection lease.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
/// How often the follower checks that it still holds the lease.
const LEASE_CHECK: Duration = Duration::from_secs(5);
/// Events read per page while following the store (and at most [`FOLLOW_PAGE_BYTES`] of
/// them); at most [`FOLLOW_PAGES`] pages a step.
const FOLLOW_PAGE: u32 = 1_000;
const FOLLOW_PAGE_BYTES: usize = 16 << 20;
const FOLLOW_PAGES: usize = 50;
/// How long one page of new events may take to read.
const FOLLOW_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the lease's check may take before the lease counts as lost.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The lease of the replica that detects for all (PostgreSQL).
const DETECTION_LEASE: &str = "custos_detection";

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
    // Several replicas may share a PostgreSQL store: detection follows the store, in a task
    // of its own (its reads never hold up the export of this replica's batches).
    if store.backend() == "postgres" {
        let Sinks { detectors, dispatcher, exporter } = sinks;
        let follower = match detectors {
            Some(d) => Some(tokio::spawn(follow(store.clone(), d, dispatcher, stop.clone(), grace))),
            None => {
                shut_down_dispatcher(&dispatcher, grace).await;
                None
            }
        };
        loop {
            let batch = tokio::select! {
                b = batches.recv() => b,
                () = crate::server::stopped(&mut stop) => None,
            };
            let Some(batch) = batch else { break };
            export(exporter.as_ref(), &batch.events);
        }
        while let Ok(batch) = batches.try_recv() {
            export(exporter.as_ref(), &batch.events);
        }
        shut_down_exporter(exporter.as_ref(), grace).await;
        if let Some(f) = follower {
            let _ = f.await;
        }
        return;
    }
    if let Some(detectors) = sinks.detectors.as_mut() {
        warm_up(&store, detectors).await;
        sinks.dispatcher.metrics().set_detecting(true);
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
    sinks.dispatcher.metrics().set_detecting(false);
    shut_down_dispatcher(&sinks.dispatcher, grace).await;
    shut_down_exporter(sinks.exporter.as_ref(), grace).await;
}

async fn shut_down_dispatcher(dispatcher: &AlertDispatcher, grace: Duration) {
    if !dispatcher.shutdown(grace).await {
        tracing::warn!("alert delivery did not finish within the shutdown grace period");
    }
}

async fn shut_down_exporter(exporter: Option<&OtlpExporter>, grace: Duration) {
    if let Some(e) = exporter {
        let summary = e.shutdown(grace).await;
        tracing::info!(?summary, "OTLP exporter stopped");
    }
}

/// Offers `events` to the OTLP exporter, if any (a full queue drops and counts them).
fn export(exporter: Option<&OtlpExporter>, events: &[custos_api::AuditEvent]) {
    if let Some(exporter) = exporter {
        let _ = exporter.try_send(events);
    }
}

/// Detection over a store several replicas share, until `stop`: every [`FOLLOW_INTERVAL`] a
/// [`Follower`] step. Stopping, it reads what was stored before the stop (without taking the
/// lease now), lets the lease go, then finishes delivering its alerts.
async fn follow(
    store: AnyStore,
    mut detectors: Detectors,
    dispatcher: AlertDispatcher,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut follower = Follower::default();
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::server::stopped(&mut stop) => break,
        }
        // Not cancelled mid-way (alerts raised and not yet dispatched would be lost): the step
        // looks at the stop between pages.
        follower.step(&store, &mut detectors, &dispatcher, Some(&stop)).await;
    }
    // What was stored before the stop, within the grace period.
    if tokio::time::timeout(grace, follower.step(&store, &mut detectors, &dispatcher, None)).await.is_err() {
        tracing::warn!("detection did not read every event stored before the stop within the grace period");
    }
    follower.lease = None;
    dispatcher.metrics().set_detecting(false);
    shut_down_dispatcher(&dispatcher, grace).await;
}

/// Exports a stored batch and detects over it.
async fn handle(store: &AnyStore, sinks: &mut Sinks, batch: StoredBatch) {
    export(sinks.exporter.as_ref(), &batch.events);
    if let Some(detectors) = sinks.detectors.as_mut() {
        detect_over(store, detectors, &sinks.dispatcher, &batch.events).await;
    }
}

/// Runs the detectors over `events` (received now); stores and dispatches their alerts.
async fn detect_over(
    store: &AnyStore,
    detectors: &mut Detectors,
    dispatcher: &AlertDispatcher,
    events: &[custos_api::AuditEvent],
) {
    let alerts = detectors.observe_all_received(events, Utc::now());
    dispatcher.metrics().update_detect_stats(&detectors.stats());
    if alerts.is_empty() {
        return;
    }
    if let Err(error) = store.insert_alerts(&alerts).await {
        tracing::error!(%error, alerts = alerts.len(), "storing alerts failed; they are still delivered");
    }
    dispatcher.dispatch(alerts);
}

/// Detection over a store several replicas share: the lease, and where in the chain this
/// replica has read to.
#[derive(Default)]
struct Follower {
    /// Held while this replica detects for all.
    lease: Option<Lease>,
    /// The last event read.
    position: StorePosition,
    last_check: Option<Instant>,
}

impl Follower {
    /// One step: while running (`stop` given; the step ends between pages once it turns true),
    /// take the lease if free (then warm the detectors up from the store and start at its
    /// last event: the events of the last hour count in their windows, those of the moments
    /// between the former holder's last step and this one raise no alert); check it, and read
    /// what every replica stored since. Stopping (`stop` none), only the reading. Detectors
    /// that held the lease before keep their state: the warm-up's events they saw already are
    /// not counted twice.
    async fn step(
        &mut self,
        store: &AnyStore,
        detectors: &mut Detectors,
        dispatcher: &AlertDispatcher,
        stop: Option<&watch::Receiver<bool>>,
    ) {
        let stopping = || stop.is_some_and(|s| *s.borrow());
        if self.lease.is_none() {
            if stop.is_none() || stopping() {
                return;
            }
            match store.try_lease(DETECTION_LEASE).await {
                Ok(Some(lease)) => {
                    let position = match store.last_position().await {
                        Ok(p) => p,
                        Err(error) => {
                            tracing::warn!(%error, "cannot read the store's last event; detection starts at the next try");
                            return;
                        }
                    };
                    warm_up(store, detectors).await;
                    dispatcher.metrics().set_detecting(true);
                    tracing::info!(
                        "this replica detects leak patterns over every replica's events (detection lease taken)"
                    );
                    self.lease = Some(lease);
                    self.position = position;
                    self.last_check = Some(Instant::now());
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot take the detection lease; trying again");
                    return;
                }
            }
        }
        // Its connection known closed: at once (another replica may hold the lock already);
        // else a round trip now and then.
        let check = self.last_check.is_none_or(|at| at.elapsed() >= LEASE_CHECK);
        let held = match &self.lease {
            Some(lease) if lease.lost() => false,
            Some(lease) if check => lease.held(LEASE_CHECK_TIMEOUT).await,
            Some(_) => true,
            None => false,
        };
        if !held {
            tracing::warn!("detection lease lost (connection gone): another replica takes over");
            self.lease = None;
            dispatcher.metrics().set_detecting(false);
            return;
        }
        if check {
            self.last_check = Some(Instant::now());
        }
        for _ in 0..FOLLOW_PAGES {
            if stopping() || self.lease.as_ref().is_some_and(Lease::lost) {
                return;
            }
            let read = store.events_after(&self.position, FOLLOW_PAGE, FOLLOW_PAGE_BYTES);
            let page = match tokio::time::timeout(FOLLOW_READ_TIMEOUT, read).await {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read new events for detection; trying again");
                    return;
                }
                Err(_) => {
                    tracing::warn!("reading new events for detection timed out; trying again");
                    return;
                }
            };
            let Some((last, _)) = page.last() else { return };
            self.position = last.clone();
            let events: Vec<custos_api::AuditEvent> = page.into_iter().map(|(_, e)| slim(e)).collect();
            detect_over(store, detectors, dispatcher, &events).await;
        }
    }
}

/// An event as the detectors read it: the fields they never look at (record hashes, the user's
/// attributes, the method and path, masks, other rules and dry runs, trace and chain fields)
/// dropped, so that holding up to [`WARM_UP_MAX_EVENTS`] of them at start does not take
/// hundreds of MiB (a review measured 660 MiB for 200,000 events with ten record hashes each,
/// past the chart's memory limit: a restart under crawler load would be killed, and again).
fn slim(mut event: custos_api::AuditEvent) -> custos_api::AuditEvent {
    event.record_hashes = Vec::new();
    event.user = None;
    event.caller = None;
    event.masked = Default::default();
    event.method = String::new();
    event.path = String::new();
    event.trace_id = None;
    event.prev_hash = None;
    event.pod = None;
    event.cluster = None;
    event.rule_principal = None;
    event.also_applied = Vec::new();
    event.dry_runs = Vec::new();
    event
}

/// About the memory a [`slim`] event takes: the struct and the strings it keeps.
fn slim_bytes(e: &custos_api::AuditEvent) -> usize {
    let strings = [&e.id, &e.time, &e.namespace, &e.principal, &e.reason]
        .into_iter()
        .chain([&e.policy, &e.rule].into_iter().flatten())
        .map(|s| s.len())
        .sum::<usize>();
    std::mem::size_of::<custos_api::AuditEvent>() + strings
}

/// What a warm-up did.
#[derive(Debug, Default, PartialEq, Eq)]
struct WarmUp {
    /// Events replayed.
    replayed: usize,
    /// Pages read.
    pages: usize,
    /// Older events were left out ([`WARM_UP_MAX_EVENTS`] or [`WARM_UP_MAX_BYTES`]).
    truncated: bool,
}

/// Replays the last [`WARM_UP`] of stored events through the detectors, oldest first,
/// discarding their alerts.
async fn warm_up(store: &AnyStore, detectors: &mut Detectors) {
    let warm = warm_up_within(store, detectors, WARM_UP_PAGE_BYTES, WARM_UP_MAX_BYTES).await;
    if let Some(WarmUp { replayed, pages, truncated }) = warm {
        tracing::info!(replayed, pages, truncated, "detectors warmed up with recent events");
    }
}

/// [`warm_up`] with pages of at most about `page_bytes` of stored events and at most about
/// `max_bytes` of slimmed events kept; `None` when the store could not be read.
async fn warm_up_within(
    store: &AnyStore,
    detectors: &mut Detectors,
    page_bytes: usize,
    max_bytes: usize,
) -> Option<WarmUp> {
    let now = Utc::now();
    let since = now - chrono::Duration::from_std(WARM_UP).unwrap_or_default();
    let mut events = Vec::new();
    let mut warm = WarmUp::default();
    let mut kept_bytes = 0usize;
    let mut query = EventQuery { since: Some(since), limit: 5_000, ..EventQuery::default() };
    'pages: loop {
        match store.query_within(&query, page_bytes).await {
            Ok(page) => {
                warm.pages += 1;
                for event in page.events {
                    let event = slim(event);
                    kept_bytes = kept_bytes.saturating_add(slim_bytes(&event));
                    if kept_bytes > max_bytes || events.len() >= WARM_UP_MAX_EVENTS {
                        warm.truncated = true;
                        break 'pages;
                    }
                    events.push(event);
                }
                match page.next_cursor {
                    Some(c) => query.cursor = Some(c),
                    None => break,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read recent events to warm up the detectors; starting cold");
                return None;
            }
        }
    }
    events.reverse();
    warm.replayed = events.len();
    // Their receipt is unknown: now bounds them (an event stored dated ahead counts as now).
    let _ = detectors.observe_all_received(&events, now);
    Some(warm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::{SecondsFormat, Utc};
    use custos_detect::{DetectConfig, Detectors};
    use serde_json::json;

    use super::{WARM_UP_PAGE_BYTES, WarmUp, slim, slim_bytes, warm_up_within};

    /// The warm-up reads pages bounded in bytes, not only in events: events of 1,000 record
    /// hashes (about 67 KB stored) come a few to a page of 200 KB, and every one is replayed.
    /// Past the bound on what is kept, the oldest events are left out.
    #[tokio::test]
    async fn warm_up_pages_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("audit.db").display());
        let store = custos_store::open(&url).await.unwrap();
        let now = Utc::now();
        let events: Vec<custos_api::AuditEvent> = (0..40i64)
            .map(|i| {
                let time = now - chrono::Duration::seconds(100 - i);
                serde_json::from_value(json!({
                    "schemaVersion": 1, "id": format!("e{i:05}"),
                    "time": time.to_rfc3339_opts(SecondsFormat::Secs, true),
                    "namespace": "shop", "policy": "customers", "rule": "read", "mode": "Enforce",
                    "principal": "user:crawler", "method": "GET", "path": "/customers",
                    "decision": "Allow", "reason": "allow_rule", "status": 200, "recordsReturned": 1_000,
                    "recordHashes": (0..1_000).map(|n| format!("{:064x}", i * 1_000 + n)).collect::<Vec<_>>(),
                }))
                .unwrap()
            })
            .collect();
        store.ingest(&events).await.unwrap();

        let mut d = Detectors::new(DetectConfig::default()).unwrap();
        let warm = warm_up_within(&store, &mut d, 200_000, usize::MAX).await.unwrap();
        assert_eq!((warm.replayed, warm.truncated), (40, false), "{warm:?}");
        assert!(warm.pages >= 10, "about three events a page: {warm:?}");
        assert_eq!(d.stats().events, 40);

        // Room for ten slimmed events: the newest ten are replayed.
        let ten = 10 * slim_bytes(&slim(events[0].clone()));
        let mut d = Detectors::new(DetectConfig::default()).unwrap();
        let warm = warm_up_within(&store, &mut d, WARM_UP_PAGE_BYTES, ten).await.unwrap();
        assert_eq!(warm, WarmUp { replayed: 10, pages: 1, truncated: true });
        assert_eq!(d.stats().events, 10);
    }

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
