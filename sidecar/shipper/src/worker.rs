//! The background task: batches events, sends them, spools what could not be sent and drains
//! the spool.
//!
//! At most one request is in flight, so deliveries happen in order. Spool I/O runs on the
//! blocking pool. State machine, re-checked after every step ([`Worker::pump`]): when nothing is
//! in flight and no retry is pending, the oldest batch waiting in memory is sent, else the
//! spool's oldest record. Batches wait in memory only while the spool is empty, so they are
//! always older than what the spool holds.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use custos_api::AuditEvent;
use custos_api::collector::IngestResponse;
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use crate::metrics::{BatchResult, DropReason, ShipperMetrics};
use crate::queue::{Drained, QueueReceiver};
use crate::spool::{AppendError, RecordRef, Spool};
use crate::transport::{Outcome, Transport};
use crate::{ShipperConfig, ShutdownReport, ShutdownRequest};

type SendFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// An encoded batch: NDJSON, one event per line.
#[derive(Clone)]
struct Batch {
    payload: Arc<Vec<u8>>,
    count: u32,
}

#[derive(Default)]
struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    fn push(&mut self, event: &AuditEvent) {
        custos_api::audit::json::write_event(&mut self.buf, event);
        self.buf.push(b'\n');
        self.count += 1;
    }

    /// Whether the batch has `max_events` events or `max_bytes` bytes (or more: the event that
    /// crossed the byte limit is in it).
    fn is_full(&self, max_events: usize, max_bytes: usize) -> bool {
        self.count as usize >= max_events || self.buf.len() >= max_bytes
    }

    fn take(&mut self) -> Option<Batch> {
        if self.count == 0 {
            return None;
        }
        let count = std::mem::take(&mut self.count);
        Some(Batch { payload: Arc::new(std::mem::take(&mut self.buf)), count })
    }
}

enum Source {
    /// A fresh batch, not in the spool.
    Direct(Batch),
    /// The spool's oldest record, and its payload.
    Spooled(RecordRef, Arc<Vec<u8>>),
}

impl Source {
    fn count(&self) -> u32 {
        match self {
            Source::Direct(batch) => batch.count,
            Source::Spooled(record, _) => record.count,
        }
    }
}

struct InFlight {
    source: Source,
    send: SendFuture,
}

/// Capped exponential back-off with jitter.
struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration, jitter: f64) -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0x5eed);
        Backoff { initial, max, jitter, current: initial, rng: hasher.finish() }
    }

    /// The next wait, and doubles the following one.
    fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        if self.jitter <= 0.0 {
            return base;
        }
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - self.jitter * unit)
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// What woke the loop.
enum Wake {
    Shutdown(ShutdownRequest),
    ShutdownHandleGone,
    Sent(Outcome),
    Events,
    Tick,
    RetryDue,
}

/// The most full batches one flush tick takes from the queue; what is left is taken at the
/// next wake (the queue's wake-up threshold is re-armed).
const MAX_BATCHES_PER_WAKE: usize = 8;

pub(crate) struct Worker {
    rx: QueueReceiver<AuditEvent>,
    shutdown_rx: oneshot::Receiver<ShutdownRequest>,
    transport: Arc<Transport>,
    spool: Arc<Mutex<Spool>>,
    metrics: ShipperMetrics,
    batch_max: usize,
    /// A batch is closed once its payload reaches this many bytes.
    batch_max_bytes: usize,
    flush_interval: Duration,
    default_deadline: Duration,
    current: BatchBuilder,
    /// Full batches completed while another was in flight, oldest first (at most
    /// `max_waiting`; only while the spool is empty and the collector answers).
    waiting: VecDeque<Batch>,
    max_waiting: usize,
    inflight: Option<InFlight>,
    /// While set, the collector is considered unreachable until then.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Sends in a row whose acknowledgement covered fewer events than were sent.
    short_acks: u32,
    /// Sends in a row that the collector did not answer in time on a connection it accepted
    /// ([`SLOW_ANSWERS_BEFORE_SPLIT`]).
    slow_answers: u32,
}

/// A batch the collector has not answered in time this many sends in a row, on connections it
/// accepted, is split in two (when it holds more than [`MIN_EVENTS_TO_SPLIT_WHEN_SLOW`]): a
/// collector slow to commit (its database under load) would otherwise get the same large batch
/// for ever, commit it each time as duplicates, and the spool behind it would fill.
const SLOW_ANSWERS_BEFORE_SPLIT: u32 = 2;

/// The fewest events a batch split for slow answers holds more than: the halves stay batches
/// (a collector that accepts connections and never answers must not turn the spool into
/// single events).
const MIN_EVENTS_TO_SPLIT_WHEN_SLOW: u64 = 64;

/// The events an acknowledgement accounts for: stored, already stored, or expired.
fn counted(response: &IngestResponse) -> u64 {
    response.accepted + response.duplicates + response.expired
}

async fn wait_inflight(inflight: &mut Option<InFlight>) -> Outcome {
    match inflight {
        Some(inflight) => (&mut inflight.send).await,
        None => std::future::pending().await,
    }
}

async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Worker {
    pub(crate) fn new(
        config: &ShipperConfig,
        rx: QueueReceiver<AuditEvent>,
        shutdown_rx: oneshot::Receiver<ShutdownRequest>,
        transport: Transport,
        spool: Spool,
        metrics: ShipperMetrics,
    ) -> Self {
        Worker {
            rx,
            shutdown_rx,
            transport: Arc::new(transport),
            spool: Arc::new(Mutex::new(spool)),
            metrics,
            batch_max: config.batch_max_events,
            batch_max_bytes: config.batch_max_bytes,
            flush_interval: config.flush_interval,
            default_deadline: config.request_timeout,
            current: BatchBuilder::default(),
            waiting: VecDeque::new(),
            max_waiting: config.max_waiting_batches,
            inflight: None,
            retry_at: None,
            backoff: Backoff::new(
                config.retry_initial_backoff,
                config.retry_max_backoff,
                config.retry_jitter,
            ),
            short_acks: 0,
            slow_answers: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval_at(Instant::now() + self.flush_interval, self.flush_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut shutdown_open = true;
        loop {
            self.pump().await;
            let wake = tokio::select! {
                biased;
                request = &mut self.shutdown_rx, if shutdown_open => match request {
                    Ok(request) => Wake::Shutdown(request),
                    Err(_) => Wake::ShutdownHandleGone,
                },
                outcome = wait_inflight(&mut self.inflight) => Wake::Sent(outcome),
                // Timers before events: under a steady stream of events, a retry that is due
                // and the flush tick must still get their turn.
                () = wait_until(self.retry_at) => Wake::RetryDue,
                _ = tick.tick() => Wake::Tick,
                () = self.rx.ready() => Wake::Events,
            };
            match wake {
                Wake::Shutdown(request) => {
                    let report = self.shutdown(request.deadline).await;
                    let _ = request.reply.send(report);
                    return;
                }
                Wake::ShutdownHandleGone => shutdown_open = false,
                Wake::Sent(outcome) => {
                    if let Some(inflight) = self.inflight.take() {
                        self.settle(inflight.source, outcome).await;
                    }
                }
                Wake::Events | Wake::Tick => {
                    // The wake-up threshold (or a close) woke the loop: take what is queued, up to
                    // one full batch. The tick takes everything and sends the partial batch too.
                    let everything = matches!(wake, Wake::Tick);
                    if self.take_queued(everything).await == Drained::Closed {
                        // Every handle was dropped without a shutdown call.
                        self.shutdown(self.default_deadline).await;
                        return;
                    }
                    if everything {
                        self.flush().await;
                    }
                }
                Wake::RetryDue => self.retry_at = None,
            }
        }
    }

    /// Moves queued events into the batch being built, flushing every full batch: until the
    /// queue is empty when `everything` (at most [`MAX_BATCHES_PER_WAKE`] batches, so that
    /// producers as fast as the drain cannot keep the loop here while a delivery waits to be
    /// settled), else until one batch was flushed or the queue is empty.
    async fn take_queued(&mut self, everything: bool) -> Drained {
        let mut batches = 0;
        loop {
            let (emptied, drained) = self.fill_current();
            if self.current.is_full(self.batch_max, self.batch_max_bytes) {
                self.flush().await;
                batches += 1;
            }
            // A threshold's worth left over after one batch has already re-armed `ready`.
            if drained == Drained::Closed || emptied || !everything || batches >= MAX_BATCHES_PER_WAKE {
                return drained;
            }
        }
    }

    /// Moves queued events into the batch being built until it is full (by events or bytes):
    /// whether that emptied the queue (it took fewer than it had room for), and whether the
    /// queue is closed.
    fn fill_current(&mut self) -> (bool, Drained) {
        let room = self.batch_max.saturating_sub(self.current.count as usize).max(1);
        let max_bytes = self.batch_max_bytes;
        let current = &mut self.current;
        let (taken, drained) = self.rx.drain(room, |event| {
            current.push(&event);
            current.buf.len() < max_bytes
        });
        let emptied = taken < room && !self.current.is_full(self.batch_max, max_bytes);
        (emptied, drained)
    }

    fn spool_guard(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spool_is_empty(&self) -> bool {
        self.spool_guard().is_empty()
    }

    /// Runs `op` on the spool on the blocking pool (spool operations do file I/O and fsync).
    /// (A `&self` borrow would make the task's future require `Worker: Sync`.)
    fn with_spool<T, F>(&self, op: F) -> impl Future<Output = Option<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut Spool) -> T + Send + 'static,
    {
        let spool = Arc::clone(&self.spool);
        async move {
            let task = tokio::task::spawn_blocking(move || {
                op(&mut spool.lock().unwrap_or_else(PoisonError::into_inner))
            });
            match task.await {
                Ok(value) => Some(value),
                Err(error) => {
                    tracing::error!(error = %error, "audit spool operation failed");
                    None
                }
            }
        }
    }

    fn send(&self, payload: Arc<Vec<u8>>) -> SendFuture {
        let transport = Arc::clone(&self.transport);
        Box::pin(async move { transport.post_events(payload).await })
    }

    /// Starts sending the oldest waiting batch, else the spool's oldest record, when the
    /// collector is believed reachable and nothing is in flight.
    async fn pump(&mut self) {
        if self.inflight.is_some() || self.retry_at.is_some() {
            return;
        }
        if let Some(batch) = self.waiting.pop_front() {
            let send = self.send(Arc::clone(&batch.payload));
            self.inflight = Some(InFlight { source: Source::Direct(batch), send });
            return;
        }
        if self.spool_is_empty() {
            return;
        }
        match self.with_spool(Spool::head).await {
            Some(Ok(Some((record, payload)))) => {
                let payload = Arc::new(payload);
                let send = self.send(Arc::clone(&payload));
                self.inflight = Some(InFlight { source: Source::Spooled(record, payload), send });
            }
            Some(Ok(None)) => {}
            Some(Err(error)) => {
                tracing::warn!(error = %error, "audit spool: cannot read the oldest record now; trying again later");
                self.retry_at = Some(Instant::now() + self.backoff.next_delay());
            }
            None => self.retry_at = Some(Instant::now() + self.backoff.next_delay()),
        }
    }

    /// Closes the batch being built: sends it when the way is clear, keeps it in memory behind
    /// the batch in flight when there is room and no backlog, otherwise spools it behind the
    /// backlog.
    async fn flush(&mut self) {
        let Some(batch) = self.current.take() else { return };
        if self.retry_at.is_some() || !self.spool_is_empty() {
            self.spool_batch(batch).await;
        } else if self.inflight.is_none() && self.waiting.is_empty() {
            let send = self.send(Arc::clone(&batch.payload));
            self.inflight = Some(InFlight { source: Source::Direct(batch), send });
        } else if self.waiting.len() < self.max_waiting {
            self.waiting.push_back(batch);
        } else {
            self.spool_batch(batch).await;
        }
    }

    /// Writes `batch` to the spool, or counts it as dropped.
    async fn spool_batch(&mut self, batch: Batch) -> bool {
        self.spool_batch_within(batch, 0).await
    }

    /// [`Self::spool_batch`], allowed `replacing` bytes past the spool's limit
    /// ([`Spool::append_within`]).
    async fn spool_batch_within(&mut self, batch: Batch, replacing: u64) -> bool {
        let Batch { payload, count } = batch;
        let result = self.with_spool(move |spool| spool.append_within(&payload, count, replacing)).await;
        let events = u64::from(count);
        match result {
            Some(Ok(())) => true,
            Some(Err(AppendError::Full)) => {
                let total = self.metrics.dropped(DropReason::SpoolFull, events);
                tracing::error!(
                    events,
                    dropped_total = total,
                    "audit spool full: undeliverable batch dropped"
                );
                false
            }
            Some(Err(AppendError::Io(error))) => {
                self.metrics.dropped(DropReason::SpoolError, events);
                tracing::error!(events, error = %error, "audit spool write failed: undeliverable batch dropped");
                false
            }
            None => {
                self.metrics.dropped(DropReason::SpoolError, events);
                false
            }
        }
    }

    /// Keeps a batch the collector did not take for a later send: in the spool (a spooled one
    /// stays where it is), and what waits in memory goes there too, behind it.
    async fn keep_for_retry(&mut self, source: Source) {
        if let Source::Direct(batch) = source {
            self.spool_batch(batch).await;
        }
        while let Some(batch) = self.waiting.pop_front() {
            self.spool_batch(batch).await;
        }
    }

    /// Applies the outcome of a delivery attempt.
    async fn settle(&mut self, source: Source, outcome: Outcome) {
        let events = u64::from(source.count());
        // The count of short acknowledgements is the batch's in a row: any other outcome ends
        // the run (the next batch, or this one's halves, start afresh).
        let short = matches!(&outcome, Outcome::Delivered { response, .. } if counted(response) < events);
        if !short {
            self.short_acks = 0;
        }
        if matches!(outcome, Outcome::SlowAnswer { .. }) {
            self.slow_answers += 1;
        } else {
            self.slow_answers = 0;
        }
        match outcome {
            Outcome::Delivered { response, .. } if short && self.short_acks + 1 < crate::MAX_SHORT_ACKS => {
                // Fewer events acknowledged than sent: send the batch again (each event id is
                // stored once), behind a back-off, as if it had failed.
                self.short_acks += 1;
                self.metrics.batch(BatchResult::ShortAck);
                let delay = self.backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                tracing::warn!(
                    events,
                    accepted = response.accepted,
                    duplicates = response.duplicates,
                    expired = response.expired,
                    "the collector acknowledged fewer events than were sent: the batch is sent again"
                );
                self.keep_for_retry(source).await;
            }
            Outcome::Delivered { response, elapsed } => {
                // Forget the record before counting it delivered, so that the metrics never show
                // an event both delivered and still spooled.
                if let Source::Spooled(record, _) = source {
                    self.with_spool(move |spool| spool.ack(record)).await;
                }
                self.metrics.batch(BatchResult::Ok);
                // What the collector did not count is counted as dropped below, not delivered.
                let counted = counted(&response);
                self.metrics.delivered(events.min(counted), &response, elapsed.as_secs_f64());
                if response.expired > 0 {
                    tracing::warn!(
                        expired = response.expired,
                        "the collector did not store events older than its retention or its --max-event-age (delivered too late)"
                    );
                }
                if counted < events {
                    let total = self.metrics.dropped(DropReason::Unacknowledged, events - counted);
                    tracing::error!(
                        events,
                        counted,
                        dropped_total = total,
                        "the collector acknowledged fewer events than were sent, again: the rest counted as dropped"
                    );
                } else if counted > events {
                    tracing::warn!(
                        events,
                        accepted = response.accepted,
                        duplicates = response.duplicates,
                        expired = response.expired,
                        "the collector acknowledged a batch with other counts than were sent"
                    );
                }
                self.short_acks = 0;
                self.backoff.reset();
            }
            Outcome::SlowAnswer { .. }
                if self.slow_answers >= SLOW_ANSWERS_BEFORE_SPLIT
                    && events > MIN_EVENTS_TO_SPLIT_WHEN_SLOW =>
            {
                self.slow_answers = 0;
                self.metrics.batch(BatchResult::Timeout);
                tracing::warn!(
                    events,
                    sends = SLOW_ANSWERS_BEFORE_SPLIT,
                    "the collector answered none of the last sends of an audit batch in time: split in two"
                );
                self.split_behind_backlog(source).await;
            }
            Outcome::SlowAnswer { detail } => {
                self.keep_for_retry_later(source, BatchResult::Timeout, &detail).await
            }
            Outcome::NotYet { detail } => {
                self.metrics.batch(BatchResult::Refused);
                let delay = self.backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                tracing::warn!(
                    events,
                    error = %detail,
                    retry_in_ms = delay.as_millis() as u64,
                    "audit batch refused for now: kept, behind the batches that may pass"
                );
                self.requeue_behind_backlog(source).await;
            }
            Outcome::Retry { result, detail } => self.keep_for_retry_later(source, result, &detail).await,
            // The collector said which event it refused: that one is dropped and the rest go
            // behind the backlog as one batch (one spool write, not a split per halving).
            Outcome::BadEvent { at: Some(at) } if events > 1 && (at as u64) < events => {
                self.metrics.batch(BatchResult::BadEvent);
                self.replace_behind_backlog(source, |batch| vec![without_line(&batch.payload, at)]).await;
                let total = self.metrics.dropped(DropReason::Rejected, 1);
                tracing::error!(
                    events,
                    line = at + 1,
                    dropped_total = total,
                    "the collector refused an event of an audit batch, pointing at it: that event dropped, \
                     the rest kept to send again"
                );
            }
            Outcome::TooLarge | Outcome::BadEvent { .. } if events > 1 => {
                let too_large = matches!(outcome, Outcome::TooLarge);
                self.metrics.batch(if too_large { BatchResult::TooLarge } else { BatchResult::BadEvent });
                if too_large {
                    tracing::warn!(
                        events,
                        "the collector refused an audit batch as too large (413): split in two"
                    );
                } else {
                    tracing::warn!(
                        events,
                        "the collector refused an event of an audit batch (400 bad_event): split in two, so that \
                         only that event is dropped"
                    );
                }
                self.split_behind_backlog(source).await;
            }
            Outcome::TooLarge => self.reject(source, 413, BatchResult::TooLarge).await,
            Outcome::BadEvent { .. } => self.reject(source, 400, BatchResult::Rejected).await,
            Outcome::Rejected { status } => self.reject(source, status, BatchResult::Rejected).await,
        }
    }

    /// A batch not delivered (`result`, `detail`), kept to send again after a back-off.
    async fn keep_for_retry_later(&mut self, source: Source, result: BatchResult, detail: &str) {
        let events = u64::from(source.count());
        self.metrics.batch(result);
        let delay = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        if result == BatchResult::Unauthorized {
            tracing::error!(
                events,
                retry_in_ms = delay.as_millis() as u64,
                "the collector refused the token (401): events stay spooled; check the token file \
                 and the collector's authorisation"
            );
        } else {
            tracing::warn!(
                events,
                result = result.as_str(),
                error = %detail,
                retry_in_ms = delay.as_millis() as u64,
                "audit batch not delivered, kept for retry"
            );
        }
        self.keep_for_retry(source).await;
    }

    /// Spools a batch behind the backlog (and what waits in memory behind it); a spooled
    /// original is forgotten only then, its copy taking its room.
    async fn requeue_behind_backlog(&mut self, source: Source) {
        self.replace_behind_backlog(source, |batch| {
            vec![Batch { payload: Arc::clone(&batch.payload), count: batch.count }]
        })
        .await;
    }

    /// Splits a batch in two and spools both halves behind the backlog.
    async fn split_behind_backlog(&mut self, source: Source) {
        self.replace_behind_backlog(source, |batch| {
            let (first, second) = split(&batch.payload);
            vec![first, second]
        })
        .await;
    }

    /// Spools what `replacement` makes of a batch behind the backlog, and what waits in memory
    /// behind them; a spooled original is forgotten only then, the new records taking its room
    /// (a full spool must not lose the whole batch for a split or a requeue).
    async fn replace_behind_backlog(
        &mut self,
        source: Source,
        replacement: impl FnOnce(&Batch) -> Vec<Batch>,
    ) {
        let (batch, record) = match source {
            Source::Direct(batch) => (batch, None),
            Source::Spooled(record, payload) => (Batch { payload, count: record.count }, Some(record)),
        };
        let batches = replacement(&batch);
        let headers = crate::spool::HEADER_LEN * batches.len() as u64;
        let replacing = if record.is_some() { headers + batch.payload.len() as u64 } else { 0 };
        for part in batches {
            self.spool_batch_within(part, replacing).await;
        }
        while let Some(batch) = self.waiting.pop_front() {
            self.spool_batch(batch).await;
        }
        if let Some(record) = record {
            self.with_spool(move |spool| spool.ack(record)).await;
        }
    }

    /// Drops a batch the collector refused.
    async fn reject(&mut self, source: Source, status: u16, result: BatchResult) {
        let events = u64::from(source.count());
        if let Source::Spooled(record, _) = source {
            self.with_spool(move |spool| spool.ack(record)).await;
        }
        self.metrics.batch(result);
        let total = self.metrics.dropped(DropReason::Rejected, events);
        tracing::error!(
            events,
            status,
            dropped_total = total,
            "the collector rejected an audit batch: dropped"
        );
    }

    /// Flushes everything within `deadline`: queued events go to the collector or the spool, then
    /// the spool is drained while the collector answers.
    async fn shutdown(&mut self, deadline: Duration) -> ShutdownReport {
        let start = Instant::now();
        // Memory is made safe (sent or spooled) by `soft`; `hard` leaves a margin to report.
        let soft = start + deadline / 2;
        let hard = start + deadline.saturating_sub((deadline / 10).min(Duration::from_millis(250)));
        let delivered_before = self.metrics.events_delivered();
        let dropped_before = self.metrics.events_dropped_total();
        let mut report = ShutdownReport::default();

        self.rx.close();
        // The batches waiting in memory first: they are older than what is still queued.
        let mut batches = std::mem::take(&mut self.waiting);
        loop {
            let (emptied, _) = self.fill_current();
            if self.current.is_full(self.batch_max, self.batch_max_bytes) {
                batches.extend(self.current.take());
            }
            if emptied {
                break;
            }
        }
        batches.extend(self.current.take());
        // One more chance for the collector, whatever the back-off said.
        self.retry_at = None;

        if let Some(mut inflight) = self.inflight.take() {
            match tokio::time::timeout_at(soft, &mut inflight.send).await {
                Ok(outcome) => self.settle(inflight.source, outcome).await,
                Err(_) => {
                    report.deadline_exceeded = true;
                    self.retry_at = Some(hard);
                    if let Source::Direct(batch) = inflight.source {
                        batches.push_front(batch);
                    }
                }
            }
        }

        while let Some(batch) = batches.pop_front() {
            let clear = self.retry_at.is_none() && self.spool_is_empty() && Instant::now() < soft;
            if !clear {
                self.spool_batch(batch).await;
                continue;
            }
            match tokio::time::timeout_at(soft, self.send(Arc::clone(&batch.payload))).await {
                Ok(outcome) => self.settle(Source::Direct(batch), outcome).await,
                Err(_) => {
                    report.deadline_exceeded = true;
                    self.retry_at = Some(hard);
                    self.spool_batch(batch).await;
                }
            }
        }

        while self.retry_at.is_none() && Instant::now() < hard && !self.spool_is_empty() {
            let Some(Ok(Some((record, payload)))) = self.with_spool(Spool::head).await else { break };
            let payload = Arc::new(payload);
            match tokio::time::timeout_at(hard, self.send(Arc::clone(&payload))).await {
                Ok(outcome) => self.settle(Source::Spooled(record, payload), outcome).await,
                Err(_) => {
                    report.deadline_exceeded = true;
                    break;
                }
            }
        }

        {
            let spool = self.spool_guard();
            report.spooled_events = spool.pending_events();
            report.spooled_records = spool.pending_records();
        }
        report.delivered = self.metrics.events_delivered().saturating_sub(delivered_before);
        report.dropped = self.metrics.events_dropped_total().saturating_sub(dropped_before);
        if report.spooled_events > 0 {
            tracing::warn!(
                delivered = report.delivered,
                dropped = report.dropped,
                spooled_events = report.spooled_events,
                "audit shipper stopped with events left in the spool; they are delivered by the next start on \
                 the same spool directory"
            );
        } else {
            tracing::info!(delivered = report.delivered, dropped = report.dropped, "audit shipper stopped");
        }
        report
    }
}

/// `payload` (NDJSON, one event a line) without its `at`-th line (0-based).
fn without_line(payload: &[u8], at: usize) -> Batch {
    let mut rest = Vec::with_capacity(payload.len());
    let mut count = 0u32;
    for (i, line) in payload.split_inclusive(|&b| b == b'\n').enumerate() {
        if i != at {
            rest.extend_from_slice(line);
            count += u32::from(line.ends_with(b"\n"));
        }
    }
    Batch { payload: Arc::new(rest), count }
}

/// Splits an NDJSON payload into two batches of about half the lines each.
fn split(payload: &[u8]) -> (Batch, Batch) {
    let lines = payload.iter().filter(|&&b| b == b'\n').count();
    let half = lines / 2;
    let cut = payload
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(half.saturating_sub(1))
        .map_or(payload.len(), |(i, _)| i + 1);
    let (first, second) = payload.split_at(cut);
    let batch = |part: &[u8]| Batch {
        payload: Arc::new(part.to_vec()),
        count: u32::try_from(part.iter().filter(|&&b| b == b'\n').count()).unwrap_or(u32::MAX),
    };
    (batch(first), batch(second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_line_drops_that_line_only() {
        let rest = without_line(b"1\n2\n3\n", 1);
        assert_eq!((rest.payload.as_slice(), rest.count), (&b"1\n3\n"[..], 2));
        let rest = without_line(b"1\n2\n3\n", 2);
        assert_eq!((rest.payload.as_slice(), rest.count), (&b"1\n2\n"[..], 2));
        let rest = without_line(b"1\n2\n3\n", 0);
        assert_eq!((rest.payload.as_slice(), rest.count), (&b"2\n3\n"[..], 2));
    }

    #[test]
    fn split_cuts_on_a_line_boundary() {
        let (a, b) = split(b"1\n2\n3\n4\n5\n");
        assert_eq!((a.payload.as_slice(), a.count), (&b"1\n2\n"[..], 2));
        assert_eq!((b.payload.as_slice(), b.count), (&b"3\n4\n5\n"[..], 3));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350), 0.0);
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_only_shortens_and_stays_within_the_fraction() {
        let mut backoff = Backoff::new(Duration::from_millis(1000), Duration::from_millis(1000), 0.5);
        for _ in 0..100 {
            let delay = backoff.next_delay();
            assert!(delay <= Duration::from_millis(1000) && delay >= Duration::from_millis(500));
        }
    }
}
