//! `POST /v1/logs`: OTLP/HTTP logs (protobuf or OTLP/JSON, optionally gzip) whose log records
//! carry audit events, so an existing OpenTelemetry Collector pipeline can feed the collector
//! (an `otlphttp` exporter pointed at it, with the bearer token as a header).
//!
//! The audit events of the request are stored like a `POST /v1/events` batch (idempotent by
//! id, answered after the durable commit); log records that are not audit events are reported
//! in the OTLP `partialSuccess` (count and the first one's position and reason), as the OTLP
//! specification asks, and are not stored. The answer uses the request's encoding.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use custos_otlp::{ContentType, decode_logs, encode_response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::error::{ApiError, reason};
use crate::ingest::{Batch, content_encoding, decode, read_body};
use crate::state::CollectorState;

/// Path of the OTLP/HTTP logs endpoint.
pub const LOGS_PATH: &str = "/v1/logs";

/// `POST /v1/logs`.
pub(crate) async fn post_logs(
    State(state): State<CollectorState>,
    axum::Extension(scope): axum::Extension<crate::auth::Scope>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match ingest(&state, &scope, &headers, body).await {
        Ok((bytes, content_type)) => {
            let mut response = (StatusCode::OK, bytes).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type.as_str()));
            response
        }
        Err(error) => {
            state.metrics().batch_rejected(crate::metrics::static_reason(error.reason()));
            error.into_response()
        }
    }
}

async fn ingest(
    state: &CollectorState,
    scope: &crate::auth::Scope,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u8>, ContentType), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(ContentType::from_header)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                reason::UNSUPPORTED_MEDIA_TYPE,
                "OTLP/HTTP logs must be application/x-protobuf or application/json",
            )
        })?;
    let encoding = content_encoding(headers)?;
    let limits = state.limits();
    let (raw, _received) = read_body(body, headers, limits.max_batch_bytes, state.body_budget()).await?;
    let _slot = state.batch_slot().await?;
    let decoded = tokio::task::spawn_blocking(move || {
        let bytes = decode(encoding, raw, limits.max_batch_bytes)?;
        decode_logs(&bytes, content_type)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, reason::BAD_BODY, e.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(format!("OTLP decoding task failed: {e}")))??;
    if decoded.events.len() > limits.max_batch_events {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            reason::BATCH_TOO_LARGE,
            format!("the request carries more than {} audit events", limits.max_batch_events),
        )
        .with("limit", limits.max_batch_events)
        .with("unit", "events"));
    }
    if !decoded.rejected.is_empty() {
        tracing::debug!(
            rejected = decoded.rejected.len(),
            first = %decoded.rejected[0],
            "OTLP log records that are not audit events were not stored"
        );
    }
    let response = decoded.response();
    if !decoded.events.is_empty() {
        state.commit(Batch::new(decoded.events), scope).await?;
    }
    Ok((encode_response(&response, content_type), content_type))
}
