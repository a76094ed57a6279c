//! OTLP/HTTP logs → audit events.

use std::fmt;

use custos_api::AuditEvent;
use custos_api::audit::AUDIT_SCHEMA_VERSION;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValueList};
use prost::Message;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{ContentType, OtlpError, redact};

/// Where a log record sits in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordPosition {
    /// Index in `resourceLogs`.
    pub resource: usize,
    /// Index in that resource's `scopeLogs`.
    pub scope: usize,
    /// Index in that scope's `logRecords`.
    pub record: usize,
    /// Index among all the log records of the request, in order (0-based).
    pub index: usize,
}

impl fmt::Display for RecordPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resourceLogs[{}].scopeLogs[{}].logRecords[{}]", self.resource, self.scope, self.record)
    }
}

/// A log record that is not a Custos audit event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Where it is.
    pub position: RecordPosition,
    /// What is wrong, without values from the payload.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.reason)
    }
}

/// The result of [`decode_logs`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    /// The audit events, in request order.
    pub events: Vec<AuditEvent>,
    /// Where each event came from (same length and order as `events`), to name the record
    /// when the store refuses an event.
    pub positions: Vec<RecordPosition>,
    /// The log records that are not audit events, in request order.
    pub rejected: Vec<Rejected>,
    /// All log records of the request.
    pub records: usize,
}

impl Decoded {
    /// The OTLP answer: full success, or a partial success with the number of rejected
    /// records and a message naming the first one and why.
    pub fn response(&self) -> ExportLogsServiceResponse {
        let partial_success = self.rejected.first().map(|first| ExportLogsPartialSuccess {
            rejected_log_records: i64::try_from(self.rejected.len()).unwrap_or(i64::MAX),
            error_message: format!(
                "{} of {} log records are not Custos audit events and were rejected; first: {first}",
                self.rejected.len(),
                self.records
            ),
        });
        ExportLogsServiceResponse { partial_success }
    }
}

/// Encodes an OTLP answer in the request's encoding. OTLP/JSON writes `rejectedLogRecords`
/// as a decimal string (64-bit integers are strings in OTLP/JSON) and omits an absent
/// `partialSuccess`.
pub fn encode_response(response: &ExportLogsServiceResponse, content_type: ContentType) -> Vec<u8> {
    match content_type {
        ContentType::Protobuf => response.encode_to_vec(),
        ContentType::Json => {
            let mut root = Map::new();
            if let Some(p) = &response.partial_success {
                let mut partial = Map::new();
                partial
                    .insert("rejectedLogRecords".into(), Value::String(p.rejected_log_records.to_string()));
                if !p.error_message.is_empty() {
                    partial.insert("errorMessage".into(), Value::String(p.error_message.clone()));
                }
                root.insert("partialSuccess".into(), Value::Object(partial));
            }
            Value::Object(root).to_string().into_bytes()
        }
    }
}

/// Decodes an OTLP/HTTP `ExportLogsServiceRequest` into audit events and rejected records
/// (see the crate documentation for the accepted bodies). An error only when the body as a
/// whole cannot be decoded.
///
/// OTLP/JSON is read as the OTLP specification writes it: lowerCamelCase keys, unknown keys
/// ignored, trace ids in hex, 64-bit integers as strings or numbers. A log record that is not
/// a JSON object of that shape is rejected (the other records are kept); a document whose
/// `resourceLogs` / `scopeLogs` / `logRecords` are not arrays of objects is an error naming
/// the place.
pub fn decode_logs(body: &[u8], content_type: ContentType) -> Result<Decoded, OtlpError> {
    match content_type {
        ContentType::Protobuf => {
            let request =
                ExportLogsServiceRequest::decode(body).map_err(|e| OtlpError::Protobuf(e.to_string()))?;
            Ok(decode_request(&request))
        }
        ContentType::Json => decode_json(body),
    }
}

/// Decodes the log records of a protobuf request already parsed.
fn decode_request(request: &ExportLogsServiceRequest) -> Decoded {
    let mut out = Decoded::default();
    for (r, resource) in request.resource_logs.iter().enumerate() {
        for (s, scope) in resource.scope_logs.iter().enumerate() {
            for (k, record) in scope.log_records.iter().enumerate() {
                let position = RecordPosition { resource: r, scope: s, record: k, index: out.records };
                out.push(position, event_of(record.body.as_ref(), &record.trace_id));
            }
        }
    }
    out
}

impl Decoded {
    fn push(&mut self, position: RecordPosition, result: Result<AuditEvent, String>) {
        self.records += 1;
        match result {
            Ok(event) => {
                self.events.push(event);
                self.positions.push(position);
            }
            Err(reason) => self.rejected.push(Rejected { position, reason }),
        }
    }
}

/// The fields of an OTLP/JSON log record that decoding needs; the others are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct JsonLogRecord {
    /// opentelemetry-proto's OTLP/JSON mapping of `AnyValue` (`stringValue`, `kvlistValue`,
    /// `intValue` as a string or a number, `bytesValue` in base64, ...).
    body: Option<AnyValue>,
    trace_id: Option<String>,
}

fn decode_json(body: &[u8]) -> Result<Decoded, OtlpError> {
    // Syntax errors only (the target is a Value): they name the line and column, never a value.
    let root: Value = serde_json::from_slice(body).map_err(|e| OtlpError::Json(e.to_string()))?;
    let root = root.as_object().ok_or_else(|| {
        OtlpError::Json("the document is not a JSON object (ExportLogsServiceRequest)".into())
    })?;
    let mut out = Decoded::default();
    for (r, resource) in objects(root, "resourceLogs", "")?.into_iter().enumerate() {
        let resource_path = format!("resourceLogs[{r}]");
        for (s, scope) in objects(resource, "scopeLogs", &resource_path)?.into_iter().enumerate() {
            let scope_path = format!("{resource_path}.scopeLogs[{s}]");
            let Some(records) = array(scope, "logRecords", &scope_path)? else { continue };
            for (k, record) in records.iter().enumerate() {
                let position = RecordPosition { resource: r, scope: s, record: k, index: out.records };
                let result = match serde_path_to_error::deserialize::<_, JsonLogRecord>(record) {
                    Ok(rec) => {
                        let trace =
                            rec.trace_id.as_deref().and_then(|t| hex::decode(t).ok()).unwrap_or_default();
                        event_of(rec.body.as_ref(), &trace)
                    }
                    Err(e) => Err(format!("not an OTLP/JSON LogRecord: {}", describe(&e))),
                };
                out.push(position, result);
            }
        }
    }
    Ok(out)
}

/// `parent[key]` as an array; `None` when absent or null.
fn array<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, OtlpError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(OtlpError::Json(format!("{} is not an array", join(path, key)))),
    }
}

/// `parent[key]` as an array of objects (empty when absent).
fn objects<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Vec<&'a Map<String, Value>>, OtlpError> {
    let Some(items) = array(parent, key, path)? else { return Ok(Vec::new()) };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_object()
                .ok_or_else(|| OtlpError::Json(format!("{}[{i}] is not an object", join(path, key))))
        })
        .collect()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// A serde error with the path of the offending field, its quoted values redacted.
fn describe(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let message = redact(&e.inner().to_string());
    if path == "." { message } else { format!("{path}: {message}") }
}

/// The audit event a log record carries, or why it carries none.
fn event_of(body: Option<&AnyValue>, trace_id: &[u8]) -> Result<AuditEvent, String> {
    let json = match body.and_then(|b| b.value.as_ref()) {
        None => return Err("the log record has no body".into()),
        Some(Any::StringValue(s)) => parse_json(s.as_bytes(), "string")?,
        Some(Any::BytesValue(b)) => parse_json(b, "bytes")?,
        Some(Any::KvlistValue(list)) => kvlist_to_json(list, "")?,
        Some(other) => {
            return Err(format!(
                "the body is {}, not a Custos audit event (expected a string holding the event's JSON, \
                 or a kvlist of its fields)",
                kind(other)
            ));
        }
    };
    let mut event = event_from_json(json)?;
    if event.trace_id.is_none() && trace_id.len() == 16 && trace_id.iter().any(|b| *b != 0) {
        event.trace_id = Some(hex::encode(trace_id));
    }
    Ok(event)
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the {what} body is not Custos audit event JSON: {e}"))
}

/// Checks the schema version first (so that a newer event is named as such rather than by
/// the first field that differs), then deserialises and applies the store's own checks.
fn event_from_json(json: Value) -> Result<AuditEvent, String> {
    let Some(object) = json.as_object() else {
        return Err("the body is not Custos audit event JSON: not a JSON object".into());
    };
    match object.get("schemaVersion") {
        None => return Err("the body is not a Custos audit event: missing field `schemaVersion`".into()),
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(AUDIT_SCHEMA_VERSION)) => {}
        Some(Value::Number(n)) => {
            return Err(format!(
                "unsupported schemaVersion {n} (this collector reads version {AUDIT_SCHEMA_VERSION})"
            ));
        }
        Some(_) => return Err("schemaVersion: not a number".into()),
    }
    let event: AuditEvent = serde_path_to_error::deserialize(&json)
        .map_err(|e| format!("invalid audit event: {}", describe(&e)))?;
    if event.id.is_empty() {
        return Err("invalid audit event: id is empty".into());
    }
    if chrono::DateTime::parse_from_rfc3339(&event.time).is_err() {
        return Err("invalid audit event: time is not RFC 3339".into());
    }
    if i64::try_from(event.records_returned).is_err() {
        return Err("invalid audit event: recordsReturned is out of range".into());
    }
    Ok(event)
}

fn kind(value: &Any) -> &'static str {
    match value {
        Any::StringValue(_) => "a string",
        Any::BoolValue(_) => "a bool",
        Any::IntValue(_) => "an int",
        Any::DoubleValue(_) => "a double",
        Any::ArrayValue(_) => "an array",
        Any::KvlistValue(_) => "a kvlist",
        Any::BytesValue(_) => "bytes",
    }
}

/// A kvlist as a JSON object, key for key; `path` names the place in errors.
fn kvlist_to_json(list: &KeyValueList, path: &str) -> Result<Value, String> {
    let mut map = Map::with_capacity(list.values.len());
    for kv in &list.values {
        let here = if path.is_empty() { kv.key.clone() } else { format!("{path}.{}", kv.key) };
        let value = any_to_json(kv.value.as_ref(), &here)?;
        if map.insert(kv.key.clone(), value).is_some() {
            return Err(format!("the body kvlist has key {here} twice"));
        }
    }
    Ok(Value::Object(map))
}

fn any_to_json(value: Option<&AnyValue>, path: &str) -> Result<Value, String> {
    Ok(match value.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(Any::StringValue(s)) => Value::String(s.clone()),
        Some(Any::BoolValue(b)) => Value::Bool(*b),
        Some(Any::IntValue(i)) => Value::from(*i),
        Some(Any::DoubleValue(d)) => {
            double_to_json(*d).ok_or_else(|| format!("{path}: not a finite number"))?
        }
        Some(Any::ArrayValue(a)) => Value::Array(
            a.values
                .iter()
                .enumerate()
                .map(|(i, v)| any_to_json(Some(v), &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(Any::KvlistValue(list)) => kvlist_to_json(list, path)?,
        Some(Any::BytesValue(_)) => return Err(format!("{path}: a bytes value has no audit event meaning")),
    })
}

/// Integral doubles become integers (pipelines that parse JSON into maps often turn every
/// number into a double); others stay doubles.
fn double_to_json(d: f64) -> Option<Value> {
    if !d.is_finite() {
        return None;
    }
    // 2^63 and 2^64 are exact doubles: the range checks are exact.
    if d.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&d) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return Some(Value::from(d as u64));
    }
    if d.fract() == 0.0 && (-9_223_372_036_854_775_808.0..0.0).contains(&d) {
        #[allow(clippy::cast_possible_truncation)]
        return Some(Value::from(d as i64));
    }
    serde_json::Number::from_f64(d).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles() {
        assert_eq!(double_to_json(3.0), Some(Value::from(3u64)));
        assert_eq!(double_to_json(-2.0), Some(Value::from(-2i64)));
        assert_eq!(double_to_json(1.5), Some(serde_json::json!(1.5)));
        assert_eq!(double_to_json(f64::NAN), None);
    }
}
