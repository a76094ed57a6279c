//! `POST /v1/events`: reading, decompressing and parsing a batch, then committing it.
//!
//! Order of checks: content type and encoding (415) before the body is read; the body size
//! (413, from `Content-Length` or while streaming), the gzip stream (400 `bad_encoding`, and
//! 413 when the decompressed size is over the limit), then every event (400 `bad_event` naming
//! the line or index, 400 `unsupported_schema_version`, 413 when there are too many). Only a
//! batch that passes all of them reaches the store, and the answer is sent after the store's
//! durable commit. Nothing of a rejected batch is stored.

use std::io::Read;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use custos_api::AuditEvent;
use custos_api::audit::AUDIT_SCHEMA_VERSION;
use custos_api::collector::IngestResponse;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{ApiError, reason};
use crate::state::CollectorState;

/// The `schemaVersion`s of [`AuditEvent`] this collector accepts (those `custos-api` knows).
pub const SUPPORTED_SCHEMA_VERSIONS: &[u32] = &[AUDIT_SCHEMA_VERSION];

/// Time a client has to send a whole batch body once its headers arrived.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// After refusing an oversized body, up to this much of the rest is read and discarded (within
/// [`DRAIN_TIMEOUT`]) so that the client, still sending, gets the 413 rather than a reset.
const DRAIN_BUDGET: usize = 32 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Size limits of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestLimits {
    /// Largest body, in bytes, both as received and after gzip decompression.
    pub max_batch_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits { max_batch_bytes: 16 << 20, max_batch_events: 10_000 }
    }
}

/// How the events of a body are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// One event per line (`application/x-ndjson`); blank lines are ignored.
    Ndjson,
    /// A JSON array of events (`application/json`).
    JsonArray,
}

/// The `Content-Encoding` of a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentEncoding {
    /// Not compressed.
    Identity,
    /// gzip (one or more members).
    Gzip,
}

/// Where an event was in the request: what error answers point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// 1-based line of an NDJSON body.
    Line(usize),
    /// 0-based index in a JSON array (or in a batch built otherwise).
    Index(usize),
}

impl Position {
    pub(crate) fn describe(self) -> String {
        match self {
            Position::Line(n) => format!("line {n}"),
            Position::Index(i) => format!("index {i}"),
        }
    }

    /// Adds `line` or `index` to an error answer.
    pub fn annotate(self, error: ApiError) -> ApiError {
        match self {
            Position::Line(n) => error.with("line", n),
            Position::Index(i) => error.with("index", i),
        }
    }
}

/// A parsed batch: the events and where each one was in the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    events: Vec<AuditEvent>,
    positions: Vec<Position>,
}

impl Batch {
    /// A batch of events identified by their index.
    pub fn new(events: Vec<AuditEvent>) -> Self {
        let positions = (0..events.len()).map(Position::Index).collect();
        Batch { events, positions }
    }

    fn push(&mut self, event: AuditEvent, position: Position) {
        self.events.push(event);
        self.positions.push(position);
    }

    /// The events.
    pub fn events(&self) -> &[AuditEvent] {
        &self.events
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there is no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Where the `i`-th event was in the request.
    pub fn position(&self, i: usize) -> Position {
        self.positions.get(i).copied().unwrap_or(Position::Index(i))
    }

    /// The events, by value.
    pub fn into_events(self) -> Vec<AuditEvent> {
        self.events
    }
}

fn unsupported_media_type(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason::UNSUPPORTED_MEDIA_TYPE, message)
}

fn too_large(message: String, limit: usize, unit: &str) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, reason::BATCH_TOO_LARGE, message)
        .with("limit", limit)
        .with("unit", unit)
}

fn too_many_bytes(limit: usize) -> ApiError {
    too_large(format!("the batch is larger than {limit} bytes"), limit, "bytes")
}

fn too_many_events(limit: usize) -> ApiError {
    too_large(format!("the batch has more than {limit} events"), limit, "events")
}

/// The body format from `Content-Type` (parameters such as `charset` are ignored).
pub fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    const EXPECTED: &str = "Content-Type must be application/x-ndjson or application/json";
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported_media_type(&format!("no Content-Type: {EXPECTED}")));
    };
    let value = value.to_str().map_err(|_| unsupported_media_type(EXPECTED))?;
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-ndjson" | "application/ndjson" => Ok(BodyFormat::Ndjson),
        "application/json" => Ok(BodyFormat::JsonArray),
        _ => Err(unsupported_media_type(EXPECTED)),
    }
}

/// The body encoding from `Content-Encoding`: none, `identity` or `gzip`.
pub fn content_encoding(headers: &HeaderMap) -> Result<ContentEncoding, ApiError> {
    let mut encoding = ContentEncoding::Identity;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().unwrap_or("?");
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("identity") {
                continue;
            }
            if (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && encoding == ContentEncoding::Identity
            {
                encoding = ContentEncoding::Gzip;
                continue;
            }
            return Err(unsupported_media_type(
                "unsupported Content-Encoding: only gzip (once) or none is accepted",
            ));
        }
    }
    Ok(encoding)
}

/// Reads a request body of at most `limit` bytes (413 beyond, checked against `Content-Length`
/// first), within a time-out (408). The body holds one permit of `budget` per KiB received
/// (rounded up), taken as its chunks arrive (waiting while the budget is spent, within the
/// time-out); the permits come back with the body and are released when dropped.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    budget: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        // A client waiting for `100 Continue` has not sent the body: answer without reading it.
        let expects_continue =
            headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue && declared.is_some_and(|len| len <= (limit + DRAIN_BUDGET) as u64) {
            drain(body).await;
        }
        return Err(too_many_bytes(limit));
    }
    let read = async {
        let mut body = body;
        let mut buf = Vec::new();
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        loop {
            match body.frame().await {
                None => return Ok((Bytes::from(buf), held)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if buf.len() + data.len() > limit {
                            drain(body).await;
                            return Err(too_many_bytes(limit));
                        }
                        // The KiB the body has reached, less those already held: a body of
                        // tiny frames takes what it sent, not a KiB per frame.
                        let needed = (buf.len() + data.len()).div_ceil(1024);
                        let missing = needed.saturating_sub(held.as_ref().map_or(0, |h| h.num_permits()));
                        if missing > 0 {
                            let permit = budget
                                .clone()
                                .acquire_many_owned(u32::try_from(missing).unwrap_or(u32::MAX))
                                .await
                                .map_err(|_| ApiError::internal("body budget closed"))?;
                            match &mut held {
                                Some(h) => h.merge(permit),
                                None => held = Some(permit),
                            }
                        }
                        if buf.is_empty() {
                            buf.reserve(declared.map_or(64 << 10, |l| l as usize).min(limit));
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "reading a batch body failed");
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        reason::BAD_BODY,
                        "the request body could not be read",
                    ));
                }
            }
        }
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            reason::BODY_TIMEOUT,
            format!("the body was not received within {} s", BODY_READ_TIMEOUT.as_secs()),
        )),
    }
}

/// Reads and discards up to [`DRAIN_BUDGET`] bytes of the rest of a body.
async fn drain(body: Body) {
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > DRAIN_BUDGET {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
}

/// Undoes the content encoding, refusing more than `limit` decompressed bytes.
pub fn decode(encoding: ContentEncoding, raw: Bytes, limit: usize) -> Result<Bytes, ApiError> {
    match encoding {
        ContentEncoding::Identity => Ok(raw),
        ContentEncoding::Gzip if raw.is_empty() => Ok(raw),
        ContentEncoding::Gzip => {
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
            let mut decoder = flate2::read::MultiGzDecoder::new(&raw[..]).take(limit as u64 + 1);
            decoder.read_to_end(&mut out).map_err(|_| {
                ApiError::new(StatusCode::BAD_REQUEST, reason::BAD_ENCODING, "the gzip body is corrupt")
            })?;
            if out.len() > limit {
                return Err(too_large(
                    format!("the decompressed batch is larger than {limit} bytes"),
                    limit,
                    "bytes",
                ));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Parses a decoded body into a batch.
pub fn parse_batch(format: BodyFormat, body: &[u8], limits: IngestLimits) -> Result<Batch, ApiError> {
    let batch = match format {
        BodyFormat::Ndjson => parse_ndjson(body, limits.max_batch_events)?,
        BodyFormat::JsonArray => parse_array(body, limits.max_batch_events)?,
    };
    if batch.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, reason::EMPTY_BATCH, "the batch holds no event"));
    }
    Ok(batch)
}

/// What is wrong with one event.
enum EventError {
    Malformed(String),
    Version(u64),
}

impl EventError {
    fn at(self, position: Position) -> ApiError {
        let error = match self {
            EventError::Malformed(what) => ApiError::new(
                StatusCode::BAD_REQUEST,
                reason::BAD_EVENT,
                format!("the event at {} is invalid: {what}", position.describe()),
            ),
            EventError::Version(version) => ApiError::new(
                StatusCode::BAD_REQUEST,
                reason::UNSUPPORTED_SCHEMA_VERSION,
                format!(
                    "the event at {} has schemaVersion {version}; this collector accepts {:?}",
                    position.describe(),
                    SUPPORTED_SCHEMA_VERSIONS
                ),
            )
            .with("version", version)
            .with("supported", SUPPORTED_SCHEMA_VERSIONS.to_vec()),
        };
        position.annotate(error)
    }
}

fn check_version(event: AuditEvent) -> Result<AuditEvent, EventError> {
    if SUPPORTED_SCHEMA_VERSIONS.contains(&event.schema_version) {
        Ok(event)
    } else {
        Err(EventError::Version(u64::from(event.schema_version)))
    }
}

fn unsupported_version(version: Option<u64>) -> Option<EventError> {
    version
        .filter(|v| !SUPPORTED_SCHEMA_VERSIONS.iter().any(|s| u64::from(*s) == *v))
        .map(EventError::Version)
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
}

fn parse_ndjson(body: &[u8], max_events: usize) -> Result<Batch, ApiError> {
    let mut batch = Batch::default();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if batch.len() >= max_events {
            return Err(too_many_events(max_events));
        }
        let position = Position::Line(i + 1);
        batch.push(parse_line(line).map_err(|e| e.at(position))?, position);
    }
    Ok(batch)
}

fn parse_line(line: &[u8]) -> Result<AuditEvent, EventError> {
    // Events are parsed from text (the line checked as UTF-8 at once, quickly, rather than
    // each of its strings on its own) and without tracking the path (which records every key
    // it passes). A line that fails, as one that is not UTF-8 must, is parsed again with the
    // path, for the error's field path.
    if let Ok(text) = std::str::from_utf8(line)
        && let Ok(event) = serde_json::from_str::<AuditEvent>(text)
    {
        return check_version(event);
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let parsed = serde_path_to_error::deserialize::<_, AuditEvent>(&mut de)
        .map_err(|e| describe(e.inner(), &render_path(e.path()), true))
        .and_then(|event| de.end().map(|()| event).map_err(|e| describe(&e, "", true)));
    match parsed {
        Ok(event) => check_version(event),
        Err(what) => {
            // An event of an unknown version may not parse as this version's: say so rather
            // than report a field.
            let version = serde_json::from_slice::<VersionProbe>(line).ok().and_then(|p| p.schema_version);
            Err(unsupported_version(version).unwrap_or(EventError::Malformed(what)))
        }
    }
}

fn event_from_value(value: Value) -> Result<AuditEvent, EventError> {
    if let Some(e) = unsupported_version(value.get("schemaVersion").and_then(Value::as_u64)) {
        return Err(e);
    }
    // as in `parse_line`: the path is tracked only to describe a failure
    if let Ok(event) = AuditEvent::deserialize(&value) {
        return check_version(event);
    }
    serde_path_to_error::deserialize::<_, AuditEvent>(value)
        .map_err(|e| EventError::Malformed(describe(e.inner(), &render_path(e.path()), false)))
        .and_then(check_version)
}

/// Why the array walk stopped early.
enum ArrayFailure {
    /// An element was refused (or one too many).
    Refused(ApiError),
    /// The JSON text of the element at this index is malformed.
    Syntax(usize),
}

/// Streams the elements of a JSON array, one `Value` at a time, so that an error (syntax or
/// shape) is attributed to its element's index.
struct ArrayVisitor<'a> {
    batch: &'a mut Batch,
    failure: &'a mut Option<ArrayFailure>,
    max_events: usize,
}

impl<'de> Visitor<'de> for ArrayVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of audit events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let index = self.batch.len();
            let position = Position::Index(index);
            match seq.next_element::<Value>() {
                Ok(None) => return Ok(()),
                Ok(Some(value)) => {
                    if index >= self.max_events {
                        *self.failure = Some(ArrayFailure::Refused(too_many_events(self.max_events)));
                        return Err(A::Error::custom("too many events"));
                    }
                    match event_from_value(value) {
                        Ok(event) => self.batch.push(event, position),
                        Err(e) => {
                            *self.failure = Some(ArrayFailure::Refused(e.at(position)));
                            return Err(A::Error::custom("invalid event"));
                        }
                    }
                }
                Err(error) => {
                    *self.failure = Some(ArrayFailure::Syntax(index));
                    return Err(error);
                }
            }
        }
    }
}

fn parse_array(body: &[u8], max_events: usize) -> Result<Batch, ApiError> {
    let mut batch = Batch::default();
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = de
        .deserialize_seq(ArrayVisitor { batch: &mut batch, failure: &mut failure, max_events })
        .and_then(|()| de.end());
    match (failure, result) {
        (Some(ArrayFailure::Refused(error)), _) => Err(error),
        (Some(ArrayFailure::Syntax(index)), Err(e)) => {
            Err(EventError::Malformed(describe(&e, "", true)).at(Position::Index(index)))
        }
        (_, Ok(())) => Ok(batch),
        (None, Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            reason::BAD_EVENT,
            format!("the body is not a JSON array of events: {}", describe(&e, "", true)),
        )),
    }
}

/// Field names of [`AuditEvent`] and its nested objects: a path segment that is one of them is
/// shown; any other key (a map key, i.e. input) is shown as `*`.
const KNOWN_FIELDS: &[&str] = &[
    "schemaVersion",
    "id",
    "time",
    "cluster",
    "namespace",
    "policy",
    "rule",
    "mode",
    "pod",
    "caller",
    "serviceAccount",
    "user",
    "attributes",
    "principal",
    "method",
    "path",
    "decision",
    "reason",
    "status",
    "recordsReturned",
    "recordsFiltered",
    "recordsTruncated",
    "masked",
    "bytes",
    "latencyUs",
    "traceId",
    "recordHashes",
    "prevHash",
];

/// A field path such as `user.attributes.*` or `recordHashes[2]`.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if KNOWN_FIELDS.contains(&key.as_str()) { key } else { "*" });
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// What a JSON error says, without any part of the input: serde's messages quote the
/// offending value (`invalid type: string "…"`), which may be personal data.
fn describe(error: &serde_json::Error, path: &str, with_column: bool) -> String {
    use serde_json::error::Category;
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let message = if error.line() > 0 { text.strip_suffix(&suffix).unwrap_or(&text) } else { &text };
    let what = match error.classify() {
        // serde_json's syntax messages are fixed texts ("expected value", "trailing characters").
        Category::Syntax => format!("invalid JSON: {message}"),
        Category::Eof => "truncated JSON (unexpected end of input)".to_owned(),
        Category::Data => sanitize_data_message(message),
        Category::Io => "unreadable input".to_owned(),
    };
    let mut out = String::new();
    if !path.is_empty() {
        out.push_str(&format!("field `{path}`: "));
    }
    out.push_str(&what);
    if with_column && error.line() > 0 && !matches!(error.classify(), Category::Data) {
        out.push_str(&format!(" (column {})", error.column()));
    }
    out
}

fn sanitize_data_message(message: &str) -> String {
    if message.starts_with("missing field `") || message.starts_with("duplicate field `") {
        // The field name comes from the type, not from the input.
        return message.to_owned();
    }
    if message.starts_with("unknown variant `") {
        // "unknown variant `X`, expected one of `A`, `B`": keep what was expected.
        return match message.rfind(", expected ") {
            Some(i) => format!("unknown value, expected {}", &message[i + ", expected ".len()..]),
            None => "unknown value".to_owned(),
        };
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // "<unexpected>, expected <expected>": the unexpected part quotes the input.
            if let Some(i) = rest.rfind(", expected ") {
                let kind = rest[..i].split([' ', '`', '"']).next().unwrap_or("value");
                let kind = if kind == "floating" { "floating point number" } else { kind };
                return format!("{}{kind}, expected {}", prefix, &rest[i + ", expected ".len()..]);
            }
        }
    }
    if message.starts_with("invalid length ") {
        return message.to_owned();
    }
    "unexpected JSON shape".to_owned()
}

/// `POST /v1/events`.
pub(crate) async fn post_events(
    State(state): State<CollectorState>,
    axum::Extension(scope): axum::Extension<crate::auth::Scope>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match ingest(&state, &scope, &headers, body).await {
        Ok(outcome) => Json(IngestResponse {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            expired: outcome.expired,
        })
        .into_response(),
        Err(error) => {
            state.metrics().batch_rejected(crate::metrics::static_reason(error.reason()));
            if error.status().is_client_error() {
                tracing::debug!(status = error.status().as_u16(), reason = error.reason(), "batch rejected");
            }
            error.into_response()
        }
    }
}

/// One span per batch (exported when OpenTelemetry tracing is on): size, then the outcome.
#[tracing::instrument(
    name = "ingest_batch",
    skip_all,
    fields(
        events = tracing::field::Empty,
        accepted = tracing::field::Empty,
        duplicates = tracing::field::Empty,
        expired = tracing::field::Empty
    )
)]
async fn ingest(
    state: &CollectorState,
    scope: &crate::auth::Scope,
    headers: &HeaderMap,
    body: Body,
) -> Result<custos_store::IngestOutcome, ApiError> {
    let format = body_format(headers)?;
    let encoding = content_encoding(headers)?;
    let limits = state.limits();
    let (raw, _received) = read_body(body, headers, limits.max_batch_bytes, state.body_budget()).await?;
    let _slot = state.batch_slot().await?;
    let batch = tokio::task::spawn_blocking(move || {
        let decoded = decode(encoding, raw, limits.max_batch_bytes)?;
        parse_batch(format, &decoded, limits)
    })
    .await
    .map_err(|e| ApiError::internal(format!("batch decoding task failed: {e}")))??;
    let span = tracing::Span::current();
    span.record("events", batch.len());
    let outcome = state.commit(batch, scope).await?;
    span.record("accepted", outcome.accepted);
    span.record("duplicates", outcome.duplicates);
    span.record("expired", outcome.expired);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::*;
    use custos_api::audit::{AuditUser, CallerWorkload};
    use custos_api::policy::Mode;

    fn full_event() -> AuditEvent {
        AuditEvent {
            schema_version: AUDIT_SCHEMA_VERSION,
            id: "01J".into(),
            time: "2025-06-01T12:00:00Z".into(),
            cluster: Some("c".into()),
            namespace: "shop".into(),
            policy: Some("p".into()),
            rule: Some("r".into()),
            mode: Mode::Enforce,
            pod: Some("pod".into()),
            caller: Some(CallerWorkload { namespace: "n".into(), service_account: "sa".into() }),
            user: Some(AuditUser { id: "u".into(), attributes: BTreeMap::from([("k".into(), "v".into())]) }),
            principal: "user:u".into(),
            rule_principal: None,
            method: "GET".into(),
            path: "/x".into(),
            decision: custos_api::Decision::Allow,
            reason: "r".into(),
            status: 200,
            records_returned: 1,
            records_filtered: 1,
            records_truncated: 1,
            masked: BTreeMap::from([("email".into(), 1)]),
            bytes: 1,
            latency_us: 1,
            trace_id: Some("t".into()),
            record_hashes: vec!["h".into()],
            also_applied: Vec::new(),
            dry_runs: Vec::new(),
            prev_hash: Some("p".into()),
        }
    }

    fn keys(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    out.push(k.clone());
                    if !matches!(k.as_str(), "masked" | "attributes") {
                        keys(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| keys(v, out)),
            _ => {}
        }
    }

    #[test]
    fn known_fields_cover_every_field_of_the_event() {
        let mut all = Vec::new();
        keys(&serde_json::to_value(full_event()).unwrap(), &mut all);
        for key in all {
            assert!(KNOWN_FIELDS.contains(&key.as_str()), "{key} is not in KNOWN_FIELDS");
        }
    }

    fn line_of(event: &Value) -> Vec<u8> {
        serde_json::to_vec(event).unwrap()
    }

    /// `parse_line` parses from text without the path first: every byte of an event line
    /// replaced (by bytes that break UTF-8, strings and numbers) or removed, it accepts
    /// exactly what serde_json accepts from the bytes, as the same event.
    #[test]
    fn the_fast_path_accepts_exactly_what_the_bytes_parse_to() {
        let mut event = full_event();
        event.path = "/客户/ünï/1".into();
        let line = line_of(&serde_json::to_value(&event).unwrap());
        let mut accepted = 0;
        for at in 0..line.len() {
            for replacement in [Some(0xFF), Some(0xC3), Some(0x80), Some(b'"'), Some(b'x'), Some(b'7'), None]
            {
                let mut mutated = line.clone();
                match replacement {
                    Some(b) => mutated[at] = b,
                    None => drop(mutated.remove(at)),
                }
                let reference = serde_json::from_slice::<AuditEvent>(&mutated).map_err(drop).and_then(|e| {
                    if SUPPORTED_SCHEMA_VERSIONS.contains(&e.schema_version) { Ok(e) } else { Err(()) }
                });
                match (parse_line(&mutated), reference) {
                    (Ok(ours), Ok(theirs)) => {
                        assert_eq!(ours, theirs, "at {at}");
                        accepted += 1;
                    }
                    (Err(_), Err(())) => {}
                    (ours, theirs) => panic!(
                        "at {at} ({replacement:?}): ours ok {}, serde_json's ok {}",
                        ours.is_ok(),
                        theirs.is_ok()
                    ),
                }
            }
        }
        // some mutations keep a valid event (a digit for a digit, a letter in a string)
        assert!(accepted > 100, "{accepted}");
    }

    #[test]
    fn wrong_types_name_the_field_without_the_value() {
        let mut v = serde_json::to_value(full_event()).unwrap();
        v["status"] = Value::String("secret-value-1".into());
        let err = parse_ndjson(&line_of(&v), 10).unwrap_err();
        assert!(err.message().contains("field `status`"), "{}", err.message());
        assert!(!err.message().contains("secret-value-1"), "{}", err.message());
        v["status"] = Value::from(200);
        v["user"]["attributes"]["k"] = Value::from(5);
        let err = parse_ndjson(&line_of(&v), 10).unwrap_err();
        assert!(err.message().contains("field `user.attributes.*`"), "{}", err.message());
        v["user"]["attributes"]["k"] = Value::from("v");
        v["decision"] = Value::from("secret-value-2");
        let err = parse_array(&serde_json::to_vec(&Value::Array(vec![v])).unwrap(), 10).unwrap_err();
        assert!(err.message().contains("field `decision`"), "{}", err.message());
        assert!(err.message().contains("Allow"), "{}", err.message());
        assert!(!err.message().contains("secret-value-2"), "{}", err.message());
        assert_eq!(err.field("index"), Some(&Value::from(0)));
    }

    #[test]
    fn sanitiser_drops_quoted_input() {
        assert_eq!(
            sanitize_data_message("invalid type: string \"a, expected b\", expected u16"),
            "invalid type: string, expected u16"
        );
        assert_eq!(
            sanitize_data_message("invalid value: integer `70000`, expected u16"),
            "invalid value: integer, expected u16"
        );
        assert_eq!(
            sanitize_data_message("unknown variant `Nope`, expected one of `Allow`, `Deny`"),
            "unknown value, expected one of `Allow`, `Deny`"
        );
        assert_eq!(sanitize_data_message("missing field `id`"), "missing field `id`");
        assert_eq!(sanitize_data_message("something custom: value"), "unexpected JSON shape");
    }

    #[test]
    fn gzip_bombs_are_bounded_and_corrupt_gzip_is_bad_encoding() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 1 << 20]).unwrap();
        let bomb = Bytes::from(enc.finish().unwrap());
        assert!(bomb.len() < 10_000);
        let err = decode(ContentEncoding::Gzip, bomb.clone(), 1000).unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(decode(ContentEncoding::Gzip, bomb, 1 << 20).unwrap().len(), 1 << 20);
        let err = decode(ContentEncoding::Gzip, Bytes::from_static(b"\x1f\x8bnot gzip"), 1000).unwrap_err();
        assert_eq!(err.reason(), reason::BAD_ENCODING);
    }

    #[test]
    fn content_types_and_encodings() {
        let mut h = HeaderMap::new();
        assert_eq!(body_format(&h).unwrap_err().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        h.insert(header::CONTENT_TYPE, "application/x-ndjson; charset=utf-8".parse().unwrap());
        assert_eq!(body_format(&h).unwrap(), BodyFormat::Ndjson);
        h.insert(header::CONTENT_TYPE, "Application/JSON".parse().unwrap());
        assert_eq!(body_format(&h).unwrap(), BodyFormat::JsonArray);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(body_format(&h).is_err());
        assert_eq!(content_encoding(&h).unwrap(), ContentEncoding::Identity);
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(content_encoding(&h).unwrap(), ContentEncoding::Gzip);
        h.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert!(content_encoding(&h).is_err());
        h.insert(header::CONTENT_ENCODING, "gzip, gzip".parse().unwrap());
        assert!(content_encoding(&h).is_err());
    }

    /// A body of `n` one-byte DATA frames.
    struct OneByteFrames(usize);

    impl hyper::body::Body for OneByteFrames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(None);
            }
            self.0 -= 1;
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// The body budget is charged by the KiB of bytes received, not by the frame: 5,000
    /// one-byte frames take 5 KiB of it, and finish within a budget of 8 KiB (charged a KiB a
    /// frame, they held the whole budget after 8 bytes and waited for the time-out).
    #[tokio::test]
    async fn tiny_frames_take_the_budget_by_their_bytes() {
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let headers = HeaderMap::new();
        let read = read_body(Body::new(OneByteFrames(5_000)), &headers, 1 << 20, &budget);
        let (bytes, held) = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the body is read without waiting for the budget")
            .unwrap();
        assert_eq!(bytes.len(), 5_000);
        assert_eq!(held.as_ref().map(|p| p.num_permits()), Some(5));
        assert_eq!(budget.available_permits(), 3);
        drop(held);
        assert_eq!(budget.available_permits(), 8);
    }

    #[test]
    fn ndjson_lines_are_counted_including_blank_ones() {
        let ok = line_of(&serde_json::to_value(full_event()).unwrap());
        let mut body = Vec::new();
        body.extend_from_slice(&ok);
        body.extend_from_slice(b"\r\n\n  \n");
        body.extend_from_slice(&ok[..ok.len() / 2]);
        body.push(b'\n');
        let err = parse_ndjson(&body, 10).unwrap_err();
        assert_eq!(err.field("line"), Some(&Value::from(4)));
        assert!(err.message().contains("truncated"), "{}", err.message());
    }
}
