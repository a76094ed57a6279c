//! Audit events → OTLP/HTTP logs.

use std::time::{SystemTime, UNIX_EPOCH};

use custos_api::{AuditEvent, Decision};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::{EVENT_NAME, LOGS_PATH};

/// The instrumentation scope name of the log records [`encode_logs`] writes.
pub const SCOPE_NAME: &str = "custos";

/// One OTLP logs request for `events`: one resource (with the `resource` attributes, e.g.
/// `service.name`, `k8s.cluster.name`), one scope ([`SCOPE_NAME`]), and one log record per
/// event, in order:
///
/// - body: the event's JSON as a string (what [`decode_logs`](crate::decode_logs) and
///   `POST /v1/events` read back unchanged);
/// - `event_name` [`EVENT_NAME`], time from the event (observed time: now), severity INFO for
///   `Allow` and WARN for `Deny` and `WouldDeny`, trace id from the event when it has one;
/// - attributes for routing and filtering in the user's pipeline: `custos.event.id`,
///   `custos.namespace`, `custos.policy`, `custos.rule`, `custos.decision`,
///   `custos.principal`, `custos.cluster`, `http.request.method`, `url.path` (normalised),
///   `http.response.status_code`, `custos.records_returned`.
pub fn encode_logs(events: &[AuditEvent], resource: &[(String, String)]) -> ExportLogsServiceRequest {
    let observed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let log_records = events.iter().filter_map(|e| record(e, observed)).collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| string_kv(k, v)).collect(),
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// [`encode_logs`] as protobuf bytes, the body of an `application/x-protobuf` POST.
pub fn encode_logs_protobuf(events: &[AuditEvent], resource: &[(String, String)]) -> Vec<u8> {
    encode_logs(events, resource).encode_to_vec()
}

/// The logs URL of an OTLP/HTTP endpoint: a base URL without a path (`http://otel:4318`)
/// gets [`LOGS_PATH`]; a URL with a path is used as given (as the OpenTelemetry SDKs treat
/// `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`).
pub fn logs_endpoint(endpoint: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(endpoint).map_err(|e| format!("invalid OTLP endpoint URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("invalid OTLP endpoint URL: the scheme must be http or https".into());
    }
    if url.host_str().is_none() {
        return Err("invalid OTLP endpoint URL: no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("invalid OTLP endpoint URL: put credentials in a header, not in the URL".into());
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(LOGS_PATH);
    }
    Ok(url)
}

fn record(e: &AuditEvent, observed: u64) -> Option<LogRecord> {
    // An AuditEvent always serialises (its maps have string keys); skip rather than panic.
    let body = serde_json::to_string(e).ok()?;
    let time = chrono::DateTime::parse_from_rfc3339(&e.time)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let (severity, severity_text) = match e.decision {
        Decision::Allow => (SeverityNumber::Info, "INFO"),
        Decision::Deny | Decision::WouldDeny => (SeverityNumber::Warn, "WARN"),
    };
    let mut attributes = vec![
        string_kv("custos.event.id", &e.id),
        string_kv("custos.namespace", &e.namespace),
        string_kv("custos.decision", e.decision.as_str()),
        string_kv("custos.principal", &e.principal),
        string_kv("http.request.method", &e.method),
        string_kv("url.path", &e.path),
        int_kv("http.response.status_code", i64::from(e.status)),
        int_kv("custos.records_returned", i64::try_from(e.records_returned).unwrap_or(i64::MAX)),
    ];
    for (key, value) in
        [("custos.policy", &e.policy), ("custos.rule", &e.rule), ("custos.cluster", &e.cluster)]
    {
        if let Some(v) = value {
            attributes.push(string_kv(key, v));
        }
    }
    let trace_id =
        e.trace_id.as_deref().and_then(|t| hex::decode(t).ok()).filter(|b| b.len() == 16).unwrap_or_default();
    Some(LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: observed,
        severity_number: severity as i32,
        severity_text: severity_text.into(),
        body: Some(AnyValue { value: Some(Any::StringValue(body)) }),
        attributes,
        trace_id,
        event_name: EVENT_NAME.into(),
        ..Default::default()
    })
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(Any::StringValue(value.into())) }) }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(Any::IntValue(value)) }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            logs_endpoint("http://otel:4318").map(|u| u.to_string()),
            Ok("http://otel:4318/v1/logs".into())
        );
        assert_eq!(
            logs_endpoint("https://otel.example/custom/logs").map(|u| u.to_string()),
            Ok("https://otel.example/custom/logs".into())
        );
        assert!(logs_endpoint("ftp://x").is_err());
        assert!(logs_endpoint("http://u:p@x").is_err());
        assert!(logs_endpoint("not a url").is_err());
    }
}
