//! OTLP/HTTP logs for Custos audit events.
//!
//! - Ingest: [`decode_logs`] turns an OTLP/HTTP `ExportLogsServiceRequest` (protobuf or
//!   OTLP/JSON) into [`AuditEvent`]s plus the log records it rejected, each with its position
//!   and a reason, so that a collector can answer with an OTLP partial success
//!   ([`Decoded::response`], [`encode_response`]).
//! - Export: [`encode_logs`] builds the request for a batch of events and [`OtlpExporter`]
//!   POSTs stored events to the user's own OTLP/HTTP endpoint (`/v1/logs`) in batches, with
//!   retry and back-off, a bounded queue and Prometheus metrics: the way past one machine is
//!   the user's pipeline (an OpenTelemetry Collector, Kafka, ClickHouse), not a home-made
//!   distribution.
//!
//! # How an audit event travels in a log record
//!
//! The log record's **body** carries the event, in one of these forms (decoding accepts all):
//!
//! 1. `stringValue`: the event's JSON, exactly as `POST /v1/events` takes one NDJSON line.
//!    This is what [`encode_logs`] writes and what an OpenTelemetry Collector `filelog` or
//!    `otlp` pipeline passes through untouched.
//! 2. `kvlistValue`: the event's JSON object mapped onto OTLP values, key for key (the same
//!    camelCase field names; nested objects such as `user`, `caller`, `masked` as nested
//!    kvlists, `recordHashes` as an `arrayValue` of strings, numbers as `intValue` (or
//!    `doubleValue` with an integral value)). This is what a pipeline that parses JSON bodies
//!    into maps (e.g. the Collector's `json_parser` operator) produces.
//! 3. `bytesValue`: UTF-8 event JSON, as in 1.
//!
//! Anything else (no body, a plain log line, a body that is not an audit event of a supported
//! `schemaVersion`, an event the store would refuse: empty id, time not RFC 3339) is rejected
//! with a reason; the other records of the request are still decoded. When the event has no
//! `traceId` and the log record carries a valid trace id, the record's trace id (hex) is used.
//! Resource and scope attributes and the record's own attributes are not needed and are
//! ignored; [`encode_logs`] writes the most useful event fields as attributes too, for the
//! user's pipeline to route and filter by.
//!
//! Errors and rejection reasons never echo values from the payload: they name the position
//! (`resourceLogs[0].scopeLogs[1].logRecords[2]`), the field, and what is wrong.
#![forbid(unsafe_code)]

mod decode;
mod encode;
mod export;

pub use custos_api::AuditEvent;
pub use decode::{Decoded, RecordPosition, Rejected, decode_logs, encode_response};
pub use encode::{SCOPE_NAME, encode_logs, encode_logs_protobuf, logs_endpoint};
pub use export::{ExportError, ExportSummary, ExporterConfig, ExporterMetrics, OtlpExporter, QueueFull};
/// The generated OTLP messages (logs, common, resource, collector service), re-exported so that
/// users of this crate need no direct dependency on `opentelemetry-proto`.
pub use opentelemetry_proto::tonic as proto;
pub use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
/// prost's message trait (`encode_to_vec`, `decode`) for the re-exported messages.
pub use prost::Message;

/// Path of the OTLP/HTTP logs endpoint.
pub const LOGS_PATH: &str = "/v1/logs";

/// The `event_name` of the log records [`encode_logs`] writes.
pub const EVENT_NAME: &str = "custos.audit";

/// The two OTLP/HTTP encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// Binary protobuf, `application/x-protobuf`.
    Protobuf,
    /// OTLP/JSON (the protobuf JSON mapping with OTLP's exceptions: hex trace and span ids,
    /// 64-bit integers as decimal strings or numbers), `application/json`.
    Json,
}

impl ContentType {
    /// Reads a `Content-Type` header value: `application/x-protobuf` (or
    /// `application/protobuf`) and `application/json`, parameters such as `charset` ignored,
    /// case-insensitive. `None` for anything else (HTTP 415).
    pub fn from_header(value: &str) -> Option<ContentType> {
        let media = value.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/x-protobuf")
            || media.eq_ignore_ascii_case("application/protobuf")
        {
            Some(ContentType::Protobuf)
        } else if media.eq_ignore_ascii_case("application/json") {
            Some(ContentType::Json)
        } else {
            None
        }
    }

    /// The header value to send.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Protobuf => "application/x-protobuf",
            ContentType::Json => "application/json",
        }
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request body that cannot be decoded at all (HTTP 400). Single log records that are not
/// audit events are not errors: they are [`Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The protobuf bytes are not an `ExportLogsServiceRequest`.
    #[error("malformed OTLP protobuf: {0}")]
    Protobuf(String),
    /// The JSON is malformed or is not an `ExportLogsServiceRequest`.
    #[error("malformed OTLP/JSON: {0}")]
    Json(String),
}

/// Replaces the quoted parts of a (serde) error message that may be input values: every
/// double-quoted part (`invalid type: string "…", expected u16`), and the backquoted parts
/// before `, expected ` (`invalid type: integer `13800138000``, `unknown variant `a@b.c``),
/// whose expected side comes from the type and stays. Field names elsewhere (`missing field
/// `id``) stay.
pub(crate) fn redact(message: &str) -> String {
    let (head, tail) = match message.rfind(", expected ") {
        Some(i) => message.split_at(i),
        None => (message, ""),
    };
    let mut out = redact_quoted(head, !tail.is_empty());
    out.push_str(&redact_quoted(tail, false));
    out
}

/// [`redact`] of one part: double quotes always, backquotes when `backquotes`.
fn redact_quoted(message: &str, backquotes: bool) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' {
            let mut escaped = false;
            for q in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if q == '\\' {
                    escaped = true;
                } else if q == '"' {
                    break;
                }
            }
            out.push_str("…\"");
        } else if c == '`' && backquotes {
            for q in chars.by_ref() {
                if q == '`' {
                    break;
                }
            }
            out.push_str("…`");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(ContentType::from_header("application/x-protobuf"), Some(ContentType::Protobuf));
        assert_eq!(ContentType::from_header("Application/JSON; charset=utf-8"), Some(ContentType::Json));
        assert_eq!(ContentType::from_header("application/protobuf"), Some(ContentType::Protobuf));
        assert_eq!(ContentType::from_header("text/plain"), None);
        assert_eq!(ContentType::from_header(""), None);
    }

    #[test]
    fn redact_hides_quoted_values() {
        assert_eq!(
            redact(r#"invalid type: string "alice \"x\" 13800138000", expected u16"#),
            r#"invalid type: string "…", expected u16"#
        );
        assert_eq!(redact("missing field `id`"), "missing field `id`");
        // Backquoted input values (a review's probe: a phone number and an e-mail address
        // were echoed); what was expected stays.
        assert_eq!(
            redact("invalid type: integer `13800138000`, expected a string"),
            "invalid type: integer `…`, expected a string"
        );
        assert_eq!(
            redact("unknown variant `alice@example.com`, expected one of `Allow`, `Deny`, `WouldDeny`"),
            "unknown variant `…`, expected one of `Allow`, `Deny`, `WouldDeny`"
        );
        assert_eq!(redact(r#"unterminated "abc"#), r#"unterminated "…""#);
    }
}
