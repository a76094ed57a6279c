//! The OTLP logs codec: protobuf and OTLP/JSON in, protobuf out.
#![allow(missing_docs, clippy::unwrap_used)]

use custos_api::audit::{AUDIT_SCHEMA_VERSION, AuditUser, CallerWorkload, DryRun};
use custos_api::policy::Mode;
use custos_api::{AuditEvent, Decision};
use custos_otlp::proto::common::v1::any_value::Value as Any;
use custos_otlp::proto::common::v1::{AnyValue, KeyValue, KeyValueList};
use custos_otlp::proto::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use custos_otlp::{
    ContentType, EVENT_NAME, ExportLogsServiceRequest, ExportLogsServiceResponse, Message, OtlpError,
    decode_logs, encode_logs, encode_logs_protobuf, encode_response,
};

fn event(id: &str, decision: Decision) -> AuditEvent {
    AuditEvent {
        schema_version: AUDIT_SCHEMA_VERSION,
        id: id.into(),
        time: "2025-06-01T12:00:00.123456Z".into(),
        cluster: Some("prod".into()),
        namespace: "shop".into(),
        policy: Some("customers".into()),
        rule: Some("read".into()),
        mode: Mode::Enforce,
        pod: Some("customers-0".into()),
        caller: Some(CallerWorkload { namespace: "shop".into(), service_account: "portal".into() }),
        user: Some(AuditUser { id: "alice".into(), attributes: [("branch".into(), "north".into())].into() }),
        principal: "user:alice".into(),
        rule_principal: None,
        method: "GET".into(),
        path: "/customers/{id}".into(),
        decision,
        reason: "rule read allows".into(),
        status: 200,
        records_returned: 2,
        records_filtered: 1,
        records_truncated: 0,
        masked: [("phone".into(), 2)].into(),
        bytes: 512,
        latency_us: 1200,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        record_hashes: vec!["ab".repeat(32), "cd".repeat(32)],
        also_applied: Vec::new(),
        dry_runs: vec![DryRun {
            policy: "stricter-customers".into(),
            rule: Some("own-branch".into()),
            principal: None,
            decision: Decision::Allow,
            reason: "allow_rule".into(),
            charged: false,
            transform: Some(custos_api::audit::DryRunTransform {
                records_returned: 3,
                records_filtered: 1,
                records_truncated: 0,
                masked: [("phone".to_string(), 3)].into(),
            }),
        }],
        prev_hash: None,
    }
}

fn events() -> Vec<AuditEvent> {
    let mut deny = event("01JWQ8Z6N3V4S1T2R3Q4P5N6M8", Decision::Deny);
    deny.rule = None;
    deny.user = None;
    deny.trace_id = None;
    deny.record_hashes.clear();
    deny.principal = "workload:shop/crawler".into();
    let mut chained = event("01JWQ8Z6N3V4S1T2R3Q4P5N6M9", Decision::WouldDeny);
    chained.prev_hash = Some("0".repeat(64));
    vec![event("01JWQ8Z6N3V4S1T2R3Q4P5N6M7", Decision::Allow), deny, chained]
}

fn resource() -> Vec<(String, String)> {
    vec![("service.name".into(), "custos-collector".into())]
}

fn string(s: &str) -> Option<AnyValue> {
    Some(AnyValue { value: Some(Any::StringValue(s.into())) })
}

fn request(bodies: Vec<Option<AnyValue>>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: bodies
                    .into_iter()
                    .map(|body| LogRecord { body, ..Default::default() })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[test]
fn protobuf_round_trip_gives_back_the_same_events() {
    let events = events();
    let bytes = encode_logs_protobuf(&events, &resource());
    let decoded = decode_logs(&bytes, ContentType::Protobuf).unwrap();
    assert_eq!(decoded.events, events);
    assert!(decoded.rejected.is_empty());
    assert_eq!(decoded.records, 3);
    assert_eq!(decoded.positions.iter().map(|p| p.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(decoded.response().partial_success, None);
}

#[test]
fn encoded_records_carry_time_severity_trace_and_attributes() {
    let events = events();
    let request = encode_logs(&events, &resource());
    let rl = &request.resource_logs[0];
    let attrs = &rl.resource.as_ref().unwrap().attributes;
    assert_eq!(attrs[0].key, "service.name");
    let records = &rl.scope_logs[0].log_records;
    assert_eq!(records.len(), 3);
    // 2025-06-01T12:00:00.123456Z
    assert_eq!(records[0].time_unix_nano, 1_748_779_200_123_456_000);
    assert_eq!(records[0].severity_text, "INFO");
    assert_eq!(records[1].severity_text, "WARN");
    assert_eq!(records[0].event_name, EVENT_NAME);
    assert_eq!(hex::encode(&records[0].trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(records[1].trace_id.is_empty());
    let attr =
        |r: &LogRecord, k: &str| r.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone());
    assert_eq!(attr(&records[1], "custos.decision"), string("Deny"));
    assert_eq!(attr(&records[1], "custos.rule"), None);
    assert_eq!(
        attr(&records[0], "http.response.status_code"),
        Some(AnyValue { value: Some(Any::IntValue(200)) })
    );
}

#[test]
fn otlp_json_written_by_opentelemetry_proto_decodes_to_the_same_events() {
    let events = events();
    let json = serde_json::to_vec(&encode_logs(&events, &resource())).unwrap();
    // The JSON mapping: hex trace ids and int64s as strings.
    let text = String::from_utf8(json.clone()).unwrap();
    assert!(text.contains(r#""traceId":"4bf92f3577b34da6a3ce929d0e0e4736""#), "{text}");
    assert!(text.contains(r#""timeUnixNano":"1748779200123456000""#), "{text}");
    let decoded = decode_logs(&json, ContentType::Json).unwrap();
    assert_eq!(decoded.events, events);
    assert!(decoded.rejected.is_empty());
}

#[test]
fn committed_otlp_json_fixture_decodes() {
    let body = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/logs.json")).unwrap();
    let decoded = decode_logs(&body, ContentType::Json).unwrap();
    assert_eq!(decoded.records, 5);
    assert_eq!(decoded.events.len(), 2, "rejected: {:?}", decoded.rejected);

    // String body: the event's JSON; its trace id comes from the record (hex in OTLP/JSON).
    let first = &decoded.events[0];
    assert_eq!(first.id, "01JWQ8Z6N3V4S1T2R3Q4P5N6M7");
    assert_eq!(first.decision, Decision::Allow);
    assert_eq!(first.user.as_ref().unwrap().attributes["branch"], "HB-07");
    assert_eq!(first.masked["phone"], 1);
    assert_eq!(first.trace_id.as_deref(), Some("5b8efff798038103d269b633813fc60c"));

    // kvlist body: the same fields as OTLP values (intValue as string and as number, an
    // integral doubleValue, nested kvlists, an arrayValue).
    let second = &decoded.events[1];
    assert_eq!(second.id, "01JWQ8Z7A1B2C3D4E5F6G7H8J9");
    assert_eq!(second.decision, Decision::Deny);
    assert_eq!(second.status, 403);
    assert_eq!(second.bytes, 64);
    assert_eq!(second.user.as_ref().unwrap().attributes["role"], "support-agent");
    assert_eq!(second.record_hashes, vec!["aa".repeat(32), "bb".repeat(32)]);
    assert_eq!(second.trace_id.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
    assert_eq!(decoded.positions[1].to_string(), "resourceLogs[0].scopeLogs[0].logRecords[1]");

    // The other scope's records are not audit events.
    let rejected: Vec<String> = decoded.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(
        rejected[0].starts_with(
            "resourceLogs[0].scopeLogs[1].logRecords[0]: the string body is not Custos audit event JSON"
        ),
        "{rejected:?}"
    );
    assert!(rejected[1].contains("the body is an int, not a Custos audit event"), "{rejected:?}");
    assert!(rejected[2].ends_with("logRecords[2]: the log record has no body"), "{rejected:?}");
    assert_eq!(decoded.rejected[2].position.index, 4);

    let response = decoded.response();
    let partial = response.partial_success.clone().unwrap();
    assert_eq!(partial.rejected_log_records, 3);
    assert!(partial.error_message.starts_with("3 of 5 log records are not Custos audit events"));
    let json: serde_json::Value =
        serde_json::from_slice(&encode_response(&response, ContentType::Json)).unwrap();
    assert_eq!(json["partialSuccess"]["rejectedLogRecords"], "3");
    let proto =
        ExportLogsServiceResponse::decode(&encode_response(&response, ContentType::Protobuf)[..]).unwrap();
    assert_eq!(proto, response);
}

#[test]
fn otlp_json_accepts_numbers_for_64_bit_integers_and_ignores_unknown_keys() {
    let e = serde_json::to_string(&events()[0]).unwrap();
    let body = serde_json::json!({
        "resourceLogs": [{"scopeLogs": [{"logRecords": [{
            "timeUnixNano": 1748779200000000000u64,
            "someFutureField": {"x": 1},
            "body": {"stringValue": e}
        }]}]}]
    });
    let decoded = decode_logs(body.to_string().as_bytes(), ContentType::Json).unwrap();
    assert_eq!(decoded.events.len(), 1, "{:?}", decoded.rejected);
    assert_eq!(decode_logs(b"{}", ContentType::Json).unwrap().records, 0);
}

#[test]
fn malformed_protobuf_is_an_error() {
    let err = decode_logs(&[0xff, 0xff, 0xff, 0xff], ContentType::Protobuf).unwrap_err();
    assert!(matches!(err, OtlpError::Protobuf(_)), "{err}");
    assert!(err.to_string().starts_with("malformed OTLP protobuf"), "{err}");

    let bytes = encode_logs_protobuf(&events(), &resource());
    let truncated = &bytes[..bytes.len() - 7];
    assert!(matches!(decode_logs(truncated, ContentType::Protobuf), Err(OtlpError::Protobuf(_))));
}

#[test]
fn malformed_json_is_an_error_naming_the_place() {
    let err = decode_logs(b"{\"resourceLogs\": [", ContentType::Json).unwrap_err();
    assert!(matches!(err, OtlpError::Json(_)), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");

    let err = decode_logs(br#"{"resourceLogs": 5}"#, ContentType::Json).unwrap_err();
    assert_eq!(err.to_string(), "malformed OTLP/JSON: resourceLogs is not an array");
    let err = decode_logs(br#"{"resourceLogs": [{"scopeLogs": [3]}]}"#, ContentType::Json).unwrap_err();
    assert_eq!(err.to_string(), "malformed OTLP/JSON: resourceLogs[0].scopeLogs[0] is not an object");
    let err = decode_logs(b"[1, 2]", ContentType::Json).unwrap_err();
    assert!(err.to_string().contains("not a JSON object"), "{err}");
}

#[test]
fn non_audit_records_are_rejected_with_a_reason_and_no_values() {
    let good = serde_json::to_string(&events()[0]).unwrap();
    let mut newer: serde_json::Value = serde_json::from_str(&good).unwrap();
    newer["schemaVersion"] = 2.into();
    let mut bad_status: serde_json::Value = serde_json::from_str(&good).unwrap();
    bad_status["status"] = "13800138000-secret".into();
    let mut empty_id: serde_json::Value = serde_json::from_str(&good).unwrap();
    empty_id["id"] = "".into();
    let mut bad_time: serde_json::Value = serde_json::from_str(&good).unwrap();
    bad_time["time"] = "yesterday".into();
    let bodies = vec![
        string("user 13800138000 logged in"),
        string(&newer.to_string()),
        string(&bad_status.to_string()),
        string(&good),
        None,
        Some(AnyValue { value: Some(Any::BoolValue(true)) }),
        string(&empty_id.to_string()),
        string(&bad_time.to_string()),
        Some(AnyValue {
            value: Some(Any::KvlistValue(KeyValueList {
                values: vec![KeyValue { key: "schemaVersion".into(), value: string("one") }],
            })),
        }),
    ];
    let bytes = request(bodies).encode_to_vec();
    let decoded = decode_logs(&bytes, ContentType::Protobuf).unwrap();
    assert_eq!(decoded.events.len(), 1);
    assert_eq!(decoded.positions[0].index, 3);
    let reasons: Vec<&str> = decoded.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 8, "{reasons:?}");
    assert!(reasons[0].starts_with("the string body is not Custos audit event JSON"), "{reasons:?}");
    assert_eq!(reasons[1], "unsupported schemaVersion 2 (this collector reads version 1)");
    assert!(reasons[2].starts_with("invalid audit event: status: invalid type: string"), "{reasons:?}");
    assert_eq!(reasons[3], "the log record has no body");
    assert!(reasons[4].starts_with("the body is a bool"), "{reasons:?}");
    assert_eq!(reasons[5], "invalid audit event: id is empty");
    assert_eq!(reasons[6], "invalid audit event: time is not RFC 3339");
    assert_eq!(reasons[7], "schemaVersion: not a number");
    for r in &decoded.rejected {
        assert!(!r.reason.contains("13800138000"), "a value leaked: {}", r.reason);
        assert!(!r.reason.contains("yesterday"), "a value leaked: {}", r.reason);
    }
    assert_eq!(decoded.response().partial_success.unwrap().rejected_log_records, 8);
}
