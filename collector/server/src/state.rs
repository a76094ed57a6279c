//! What every handler shares: the store, the metrics, authentication, limits and the
//! post-commit hook.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use custos_store::{AnyStore, IngestOutcome, Ingested};
use http::{HeaderMap, StatusCode};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc};

use crate::auth::TokenAuth;
use crate::error::{ApiError, reason};
use crate::ingest::{Batch, IngestLimits};
use crate::metrics::CollectorMetrics;
use crate::observer::StoredBatch;

struct Inner {
    store: AnyStore,
    metrics: CollectorMetrics,
    auth: Option<TokenAuth>,
    limits: IngestLimits,
    /// `--max-event-age`: older events are acknowledged as expired, not stored.
    max_event_age: Option<chrono::TimeDelta>,
    /// The newest event time this replica knows stored (µs; [`NEWEST_UNKNOWN`] until read from
    /// the store, [`NEWEST_NONE`] for an empty store): the maximum event age is measured from
    /// it when the clock is later, so that a clock that jumped ahead cannot make every new
    /// event "too old".
    newest_us: AtomicI64,
    batch_slots: Semaphore,
    /// `--max-concurrent-queries`, and how long a report query waits for one of them.
    query_slots: Arc<Semaphore>,
    query_wait: Duration,
    /// KiB of request bodies being received, across requests: taken as bytes arrive, so a
    /// slow sender holds only what it sent (see [`crate::ingest::read_body`]).
    body_budget: Arc<Semaphore>,
    observer: Option<mpsc::Sender<StoredBatch>>,
    shutting_down: AtomicBool,
}

/// The collector's shared state, given to every handler (axum `State`); cheap to clone.
///
/// Extra routes (see [`CollectorConfig::extra_routes`](crate::CollectorConfig::extra_routes))
/// use it to ingest through the same path as `POST /v1/events`: [`CollectorState::commit`].
#[derive(Clone)]
pub struct CollectorState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CollectorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorState")
            .field("backend", &self.inner.store.backend())
            .field("authenticated", &self.inner.auth.is_some())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// The newest time (µs) among `events`, not before `oldest` and not past the store's allowed
/// skew ahead of `now` (a later one is refused anyway).
fn newest_time(
    events: &[custos_api::AuditEvent],
    oldest: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<i64> {
    let latest = now.timestamp_micros().saturating_add(custos_store::chain::MAX_FUTURE_SKEW_US);
    events
        .iter()
        .filter_map(|e| chrono::DateTime::parse_from_rfc3339(&e.time).ok())
        .map(|t| t.timestamp_micros())
        .filter(|t| oldest.is_none_or(|o| *t >= o.timestamp_micros()) && *t <= latest)
        .max()
}

/// [`Inner::newest_us`] before the store was asked.
const NEWEST_UNKNOWN: i64 = i64::MIN;
/// [`Inner::newest_us`] of a store without events.
const NEWEST_NONE: i64 = i64::MIN + 1;

impl CollectorState {
    /// What `--max-event-age` is measured from: the earlier of `now` and the newest event known,
    /// this replica's newest stored (read from the store the first time) or the batch's own
    /// newest (`batch_newest`), whichever is later. A clock that jumped ahead then cannot make
    /// every new event "too old" (acknowledged unstored, lost): the events themselves say
    /// what time it is. `None` when nothing is known (an empty store, a batch without a
    /// readable time).
    async fn age_base(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        batch_newest: Option<i64>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let mut newest = self.inner.newest_us.load(Ordering::Relaxed);
        if newest == NEWEST_UNKNOWN {
            match self.inner.store.newest_event_time().await {
                Ok(time) => {
                    let read = time.map_or(NEWEST_NONE, |t| t.timestamp_micros());
                    newest = self.inner.newest_us.fetch_max(read, Ordering::Relaxed).max(read);
                }
                // The ingest that follows meets the same store: no bound for this batch.
                Err(_) => return None,
            }
        }
        let stored = (newest != NEWEST_NONE).then_some(newest);
        let known = stored.max(batch_newest)?;
        chrono::DateTime::from_timestamp_micros(known).map(|t| t.min(now))
    }

    /// Notes the newest time among `events` stored (see [`newest_time`]).
    fn saw_events(
        &self,
        events: &[custos_api::AuditEvent],
        oldest: Option<chrono::DateTime<chrono::Utc>>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        if let Some(newest) = newest_time(events, oldest, now) {
            self.inner.newest_us.fetch_max(newest, Ordering::Relaxed);
        }
    }

    pub(crate) fn new(
        store: AnyStore,
        metrics: CollectorMetrics,
        auth: Option<TokenAuth>,
        (limits, max_event_age): (IngestLimits, Option<Duration>),
        max_concurrent_batches: usize,
        (max_concurrent_queries, query_wait): (usize, Duration),
        observer: Option<mpsc::Sender<StoredBatch>>,
    ) -> Self {
        CollectorState {
            inner: Arc::new(Inner {
                store,
                metrics,
                auth,
                limits,
                max_event_age: max_event_age.and_then(|a| chrono::TimeDelta::from_std(a).ok()),
                newest_us: AtomicI64::new(NEWEST_UNKNOWN),
                batch_slots: Semaphore::new(max_concurrent_batches.max(1)),
                query_slots: Arc::new(Semaphore::new(max_concurrent_queries.max(1))),
                query_wait,
                body_budget: Arc::new(Semaphore::new(
                    (max_concurrent_batches.max(1) * limits.max_batch_bytes.div_ceil(1024))
                        .min(Semaphore::MAX_PERMITS),
                )),
                observer,
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// The audit store.
    pub fn store(&self) -> &AnyStore {
        &self.inner.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &CollectorMetrics {
        &self.inner.metrics
    }

    /// The batch size limits.
    pub fn limits(&self) -> IngestLimits {
        self.inner.limits
    }

    /// Checks the bearer token of a request (always Ok when the collector runs
    /// unauthenticated). The `/v1/*` routes, extra routes included, are checked before their
    /// handler runs.
    pub async fn authorize(&self, headers: &HeaderMap) -> Result<crate::auth::Scope, ApiError> {
        match &self.inner.auth {
            Some(auth) => auth.check(headers).await,
            None => Ok(crate::auth::Scope::All),
        }
    }

    /// The budget of request body bytes being received (KiB permits).
    pub(crate) fn body_budget(&self) -> &Arc<Semaphore> {
        &self.inner.body_budget
    }

    /// Waits for one of the `--max-concurrent-batches` slots: hold it while a batch body is
    /// decoded and committed, which bounds the memory and CPU batches take. It is taken once
    /// the body has arrived (the body's bytes count against [`Self::body_budget`] as they
    /// do), so senders that trickle their bodies cannot hold every slot.
    pub async fn batch_slot(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        self.inner.batch_slots.acquire().await.map_err(|_| ApiError::internal("batch slots closed"))
    }

    /// Stores a parsed batch (idempotent by event id, durable when this returns Ok), counts it
    /// and offers it to the post-commit observer without waiting. A store refusal of one event
    /// is a 400 `bad_event` pointing at that event; any other store failure is a 503
    /// `store_unavailable` (the sender retries). Events dated more than `--max-event-age` ago
    /// (or before what retention pruned) are acknowledged as `expired` and not stored.
    ///
    /// A namespace token (`scope`) may only send events of its namespace: another one is 403
    /// `wrong_namespace` pointing at it, and nothing of the batch is stored.
    pub async fn commit(&self, batch: Batch, scope: &crate::auth::Scope) -> Result<IngestOutcome, ApiError> {
        if let crate::auth::Scope::Namespace(namespace) = scope
            && let Some(index) = batch.events().iter().position(|e| e.namespace != *namespace)
        {
            let position = batch.position(index);
            let message = format!(
                "the event at {} belongs to another namespace than the token's ({namespace})",
                position.describe()
            );
            return Err(position.annotate(ApiError::new(
                StatusCode::FORBIDDEN,
                reason::WRONG_NAMESPACE,
                message,
            )));
        }
        let started = Instant::now();
        let now = chrono::Utc::now();
        let oldest = match self.inner.max_event_age {
            Some(age) => {
                let batch_newest = newest_time(batch.events(), None, now);
                self.age_base(now, batch_newest).await.and_then(|base| base.checked_sub_signed(age))
            }
            None => None,
        };
        let result = self.inner.store.ingest_listing_new_since(batch.events(), oldest).await;
        if let (Ok(ingested), Some(_)) = (&result, self.inner.max_event_age)
            && ingested.outcome.accepted > 0
        {
            self.saw_events(batch.events(), oldest, now);
        }
        self.metrics().store_op("ingest", started.elapsed());
        match result {
            Ok(ingested) => {
                let outcome = ingested.outcome;
                self.metrics().ingested(outcome);
                if outcome.expired > 0 {
                    tracing::debug!(
                        expired = outcome.expired,
                        "events older than --max-event-age or than what retention pruned: \
                         acknowledged as expired, not stored"
                    );
                }
                if outcome.accepted > 0 {
                    self.notify(batch, ingested);
                }
                Ok(outcome)
            }
            Err(custos_store::Error::InvalidEvent { reason: what, .. })
                if what == custos_store::chain::TOO_MANY_DAYS =>
            {
                // The batch's fault, not an event's (the one that brought in a day too many is
                // valid): no pointer, so that a sender splits the batch rather than drop it.
                let message = format!("the batch is invalid: {what}");
                Err(ApiError::new(StatusCode::BAD_REQUEST, reason::BAD_EVENT, message))
            }
            Err(custos_store::Error::InvalidEvent { index, reason: what }) => {
                let position = batch.position(index);
                let message = format!("the event at {} is invalid: {what}", position.describe());
                let error = ApiError::new(StatusCode::BAD_REQUEST, reason::BAD_EVENT, message);
                // A sender's clock ahead of this one's: the event may pass later, and a sender
                // that knows `clockAhead` keeps it (an older one drops it, as before).
                let error = if what == custos_store::chain::TIME_AHEAD {
                    error.with("clockAhead", true)
                } else {
                    error
                };
                Err(position.annotate(error))
            }
            Err(error) => {
                tracing::error!(%error, events = batch.len(), "storing a batch failed; the sender will retry");
                Err(ApiError::store_unavailable())
            }
        }
    }

    /// Offers the events `ingested` says were newly stored (never a duplicate's copy from this
    /// request: the stored event of that id may differ) to the observer.
    fn notify(&self, batch: Batch, ingested: Ingested) {
        let Some(observer) = &self.inner.observer else { return };
        let mut new = ingested.new.iter().copied().peekable();
        let events = batch
            .into_events()
            .into_iter()
            .enumerate()
            .filter(|(index, _)| new.next_if_eq(index).is_some())
            .map(|(_, event)| event)
            .collect();
        let stored = StoredBatch { events, duplicates: ingested.outcome.duplicates };
        let lost = match observer.try_send(stored) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b)) => b.events.len(),
        };
        let total = self.metrics().observer_dropped(lost as u64);
        let before = total - lost as u64;
        // Logged when the total crosses a power of two: visible without flooding.
        if before == 0 || before.ilog2() != total.ilog2() {
            tracing::warn!(
                dropped_events_total = total,
                "the stored-events observer is not keeping up: batch not handed over"
            );
        }
    }

    /// Runs a report query (`work` over the store, timed like [`Self::timed`]) in one of the
    /// `--max-concurrent-queries` slots: an investigator's long scans cannot take every
    /// database connection from ingest and `/v1/usage`. A query that finds no free slot within
    /// `--query-timeout` is 503 `queries_busy`. The query runs in a task of its own that holds
    /// the slot until the database is done with it: a client that goes away does not free the
    /// slot while its scan goes on, so clients that disconnect in a loop cannot pile scans up.
    pub(crate) async fn report<T, F, Fut>(&self, op: &'static str, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(AnyStore) -> Fut,
        Fut: Future<Output = custos_store::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let slot =
            tokio::time::timeout(self.inner.query_wait, Arc::clone(&self.inner.query_slots).acquire_owned())
                .await;
        let slot = match slot {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(ApiError::internal("query slots closed")),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason::QUERIES_BUSY,
                    "other report queries have held every --max-concurrent-queries slot for \
                     --query-timeout; try again later",
                ));
            }
        };
        let query = work(self.inner.store.clone());
        let task = tokio::spawn(async move {
            let _slot = slot;
            query.await
        });
        self.timed(op, async { task.await.map_err(|e| custos_store::Error::Task(e.to_string()))? }).await
    }

    /// Runs a store operation, timing it in `custos_collector_store_seconds{op}`.
    pub(crate) async fn timed<T>(
        &self,
        op: &'static str,
        future: impl Future<Output = custos_store::Result<T>>,
    ) -> Result<T, ApiError> {
        let started = Instant::now();
        let result = future.await;
        self.metrics().store_op(op, started.elapsed());
        result.map_err(|e| ApiError::from_store(op, &e))
    }

    pub(crate) fn set_shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown has begun (`/ready` answers 503 from then on).
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }
}
