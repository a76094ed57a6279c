//! The contract's JSON errors: `{"error": "...", "reason": "<code>", ...}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value};

/// An error answer of the collector's HTTP API: a status, a machine-readable `reason` code, a
/// message for humans and optional extra fields (`line`, `index`, `parameter`, `limit`...).
///
/// Messages never carry personal data values: they name the field, line or parameter that is
/// wrong and what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    body: Map<String, Value>,
}

/// Reason codes used by the collector (the `reason` field of error answers).
pub mod reason {
    /// No `Authorization: Bearer` header.
    pub const MISSING_TOKEN: &str = "missing_token";
    /// A bearer token that is not the configured one.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// The configured token file cannot be read: no request can be authenticated.
    pub const TOKEN_UNAVAILABLE: &str = "token_unavailable";
    /// A namespace token asked for more than its namespace's ingest and usage.
    pub const NAMESPACE_TOKEN_SCOPE: &str = "namespace_token_scope";
    /// A namespace token sent an event of another namespace.
    pub const WRONG_NAMESPACE: &str = "wrong_namespace";
    /// An event of the batch is malformed (with `line` or `index`).
    pub const BAD_EVENT: &str = "bad_event";
    /// A batch without any event.
    pub const EMPTY_BATCH: &str = "empty_batch";
    /// An event with a `schemaVersion` this collector does not know.
    pub const UNSUPPORTED_SCHEMA_VERSION: &str = "unsupported_schema_version";
    /// The batch is over `--max-batch-bytes` or `--max-batch-events`.
    pub const BATCH_TOO_LARGE: &str = "batch_too_large";
    /// A content type or content encoding the collector does not take.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// A corrupt gzip body.
    pub const BAD_ENCODING: &str = "bad_encoding";
    /// The client did not send the body in time.
    pub const BODY_TIMEOUT: &str = "body_timeout";
    /// The body could not be read from the connection.
    pub const BAD_BODY: &str = "bad_body";
    /// The store failed; the sender retries.
    pub const STORE_UNAVAILABLE: &str = "store_unavailable";
    /// The store holds data it did not write.
    pub const STORE_CORRUPT: &str = "store_corrupt";
    /// A query parameter is missing or malformed (with `parameter`).
    pub const BAD_QUERY: &str = "bad_query";
    /// `/v1/subjects/{hash}` with something else than 64 lowercase hex characters.
    pub const BAD_SUBJECT_HASH: &str = "bad_subject_hash";
    /// No such endpoint.
    pub const NOT_FOUND: &str = "not_found";
    /// The endpoint exists but not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// A report query ran longer than `--query-timeout` and was stopped (504).
    pub const QUERY_TIMEOUT: &str = "query_timeout";
    /// `--max-concurrent-queries` report queries were running for all of `--query-timeout`
    /// (503, retry later).
    pub const QUERIES_BUSY: &str = "queries_busy";
    /// The collector is shutting down.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// An unexpected failure inside the collector.
    pub const INTERNAL: &str = "internal";
}

impl ApiError {
    /// An error answer with `status`, `reason` code and `message`.
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(message.into()));
        body.insert("reason".into(), Value::String(reason.into()));
        ApiError { status, body }
    }

    /// Adds a field to the JSON answer (e.g. `line`, `index`, `parameter`, `limit`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.insert(key.to_owned(), value.into());
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `reason` code.
    pub fn reason(&self) -> &str {
        self.body.get("reason").and_then(Value::as_str).unwrap_or(reason::INTERNAL)
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        self.body.get("error").and_then(Value::as_str).unwrap_or_default()
    }

    /// An extra field of the answer.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.body.get(key)
    }

    /// 400 `bad_query` naming the parameter.
    pub fn bad_query(parameter: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, reason::BAD_QUERY, message).with("parameter", parameter)
    }

    /// 503 `store_unavailable`.
    pub fn store_unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            reason::STORE_UNAVAILABLE,
            "the audit store is unavailable",
        )
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason::INTERNAL, message)
    }

    /// Maps a store error of a query: a bad cursor is the client's fault, corruption is a 500,
    /// anything else means the store is unavailable. Logged here (store errors carry no
    /// personal data values).
    pub fn from_store(op: &str, error: &custos_store::Error) -> Self {
        match error {
            custos_store::Error::BadCursor => {
                ApiError::bad_query("cursor", "the cursor was not issued by this collector")
            }
            custos_store::Error::QueryTimeout(limit) => {
                tracing::warn!(
                    op,
                    limit_secs = limit.as_secs_f64(),
                    "a report query ran past --query-timeout and was stopped"
                );
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    reason::QUERY_TIMEOUT,
                    format!(
                        "the query ran longer than {limit:?} (--query-timeout) and was stopped: \
                         narrow it (since, until, namespace, policy, principal)"
                    ),
                )
            }
            custos_store::Error::Corrupt(_) => {
                tracing::error!(op, %error, "the audit store holds data it did not write");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    reason::STORE_CORRUPT,
                    "the audit store holds corrupt data; run `custos audit verify`",
                )
            }
            _ => {
                tracing::error!(op, %error, "audit store operation failed");
                ApiError::store_unavailable()
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.reason(), self.message())
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(Value::Object(self.body))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
