//! Segment's HTTP tracking API on the segment source, so Segment's and RudderStack's libraries send to the relay by
//! changing one URL: `POST /v1/batch`, `/v1/track`, `/v1/identify`, `/v1/page`, `/v1/screen`, `/v1/group`,
//! `/v1/alias`, at the root, under `/hooks/segment/` (a base URL with a path) and under `/env/{environment}/`.
//!
//! Answers as those libraries expect: `200 {"success": true, ...}` once stored (RudderStack's Python library treats
//! only 200 as success), and errors with `success`, `code` and `message` at the top level beside the relay's own
//! `error` object (both libraries read `code`; without it one raised `KeyError` and retried forever). Segment's
//! size limits apply, each with its own error: 500 KB per batch (`batch_too_large`), 32 KB per message
//! (`message_too_large`), both 400 as Segment answers. Authentication is the source's gate (write keys as HTTP
//! Basic user or `writeKey` in the body, or `[sources.segment.auth]`); a retried batch is answered from the
//! messageId dedupe (`store.dedupe_window_secs`), so it makes no copies.

use super::AppState;
use super::accept::{Api, IngestCall, accept_request, ingest_error};
use crate::error::{ApiError, ErrorCode};
use crate::ingest::{IngestError, Route};
use crate::sources::Source;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

/// Segment's documented limit on one batch request, in bytes (decoded).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Segment's documented limit on one message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

const CALLS: [&str; 7] = ["batch", "track", "identify", "page", "screen", "group", "alias"];
const SOURCE: &str = "segment";

pub async fn call(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    take(&req, None, &path.into_inner(), payload, &state).await.map_err(segment_shaped)
}

/// `POST /env/{environment}/v1/{call}` (and under `/env/{environment}/hooks/segment/`).
pub async fn call_in(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (environment, call) = path.into_inner();
    take(&req, Some(&environment), &call, payload, &state).await.map_err(segment_shaped)
}

fn segment_shaped(mut e: ApiError) -> ApiError {
    e.segment_api = true;
    e
}

async fn take(
    req: &HttpRequest,
    path_environment: Option<&str>,
    call: &str,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let Some(call) = CALLS.iter().copied().find(|c| *c == call) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no Segment call {call:?}; calls are {}", CALLS.join(", ")),
        ));
    };
    let route = Route::Hook { source: Source::Segment, template: None };
    let api = Api::Segment { single: (call != "batch").then_some(call) };
    accept_request(req, IngestCall { source: SOURCE, path_environment, route, api }, payload, state).await
}

/// A Segment body's `writeKey` removed before the body is stored (it is a secret), for bodies posted to
/// `/hooks/segment`; None when it has none (or is not JSON: the pipeline reports that).
pub fn without_write_key(bytes: &[u8], state: &AppState) -> Option<Vec<u8>> {
    if !bytes.windows(10).any(|w| w == b"\"writeKey\"") {
        return None;
    }
    let mut value = crate::json::parse(bytes, &state.intake.pipeline.json_limits).ok()?;
    value.as_object_mut()?.remove("writeKey")?;
    serde_json::to_vec(&value).ok()
}

/// Segment's limit for a batch (`single` none) or one message, and its error.
pub(super) fn segment_limit(single: Option<&str>) -> (usize, impl Fn() -> ApiError) {
    let (limit, code, what) = match single {
        None => (MAX_BATCH_BYTES, ErrorCode::BatchTooLarge, "a batch"),
        Some(_) => (MAX_MESSAGE_BYTES, ErrorCode::MessageTooLarge, "a message"),
    };
    (limit, move || ApiError::new(code, format!("the body is more than Segment's limit of {limit} bytes for {what}")))
}

/// Segment's size limits, then the body (already repaired: `accept::repair`) as the pipeline takes it
/// (`sources::segment::prepare_tracking_call`): type from the path, `writeKey` removed, timestamps corrected for
/// skew.
pub(super) fn prepare(bytes: Vec<u8>, single: Option<&str>, state: &AppState) -> Result<Vec<u8>, ApiError> {
    let (limit, too_large) = segment_limit(single);
    if bytes.len() > limit {
        return Err(too_large());
    }
    let mut value = crate::json::parse(&bytes, &state.intake.pipeline.json_limits)
        .map_err(|e| ingest_error(IngestError::Json(e)))?;
    if let Some(Value::Array(batch)) = value.get("batch") {
        for (i, m) in batch.iter().enumerate() {
            let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(0);
            if size > MAX_MESSAGE_BYTES {
                return Err(ApiError::new(
                    ErrorCode::MessageTooLarge,
                    format!("message {i} is {size} bytes, more than Segment's limit of {MAX_MESSAGE_BYTES} bytes"),
                )
                .with_field(format!("batch[{i}]")));
            }
        }
    }
    let received_at = state.intake.clock.now_ms();
    if crate::sources::segment::prepare_tracking_call(&mut value, single, received_at) {
        return serde_json::to_vec(&value).map_err(|e| ApiError::internal(&e));
    }
    Ok(bytes)
}
