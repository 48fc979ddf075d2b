//! What every ingest route does with a request, in one place: `/hooks/*`, the Heap-compatible `/api/*` and
//! Segment's `/v1/*` differ only in what bounds the read, how the repaired body becomes the pipeline's, and the
//! shape of the answer ([`Api`]). The steps: the path's environment, the source's gate (Origin, header
//! credentials, request budget), the body (bounded, decoded), the gate's body check (signature or `writeKey`), the
//! environment, NULs and lone surrogates repaired (after the signature, which covers the body as sent), intake,
//! the answer with what the repair changed. Also the one mapping of intake's errors to answers.

use super::AppState;
use super::body::read_limited;
use super::{environment, gate, segment_api};
use crate::error::{ApiError, ErrorCode};
use crate::ingest::{IngestError, Route};
use crate::intake::{Intake, IntakeError};
use crate::json::JsonError;
use crate::sanitize::Report;
use crate::store::StoreError;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

/// The API a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The relay's own answers (`/hooks/*`, `/api/*`): 202 with the summary.
    Relay,
    /// Segment's tracking API (`/v1/*`): Segment's size limits, the message type from the path (`single`: the
    /// call of a one-message route, None for `batch`), and 200 with `success: true`, as Segment's libraries read.
    Segment { single: Option<&'static str> },
}

/// One ingest request: which source's gate it passes, the environment named by its path (if any), where the
/// pipeline sends it, and the API it speaks.
#[derive(Debug)]
pub struct IngestCall<'a> {
    pub source: &'a str,
    pub path_environment: Option<&'a str>,
    pub route: Route,
    pub api: Api,
}

/// Takes one ingest request from its headers to its answer (see the module doc).
pub async fn accept_request(
    req: &HttpRequest,
    call: IngestCall<'_>,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let IngestCall { source, path_environment, route, api } = call;
    let count = |e: &ApiError| state.intake.metrics.request(source, e.code.status().as_u16());
    environment::check_path(path_environment, source, state)?;
    let passed = gate::before_body(req, source, state)?;
    let (limit, over_limit) = read_limit(api, state);
    let body = read_limited(req, payload, limit, state.body_read_timeout, &state.inflight)
        .await
        .map_err(|e| match over_limit {
            Some(too_large) if e.code == ErrorCode::BodyTooLarge => too_large(),
            _ => e,
        })
        .inspect_err(|e| {
            passed.give_back_if_ours(e);
            count(e)
        })?;
    let credential = gate::after_body(req, source, passed, &body.bytes, state)?;
    let environment = environment::resolve(credential, path_environment, source, state)?;
    let (bytes, repairs) = repair(source, body.bytes, state);
    let bytes = match api {
        // A Segment body's `writeKey` is a secret: checked by the gate, never stored.
        Api::Relay if source == "segment" => segment_api::without_write_key(&bytes, state).unwrap_or(bytes),
        Api::Relay => bytes,
        Api::Segment { single } => segment_api::prepare(bytes, single, state).inspect_err(count)?,
    };
    // The budget stays held (body.held) until the answer: the pipeline's copies of the body live that long.
    let result = state.intake.accept_in(&environment, route, bytes).await;
    drop(body.held);
    respond(source, api, result, repairs, state)
}

/// The bound on the decoded body, and the error past it when it is not the relay's own `body_too_large`:
/// Segment's own limit, when lower, bounds the read (nothing past 500 KB for a batch, 32 KB for a message, is
/// decoded) and is answered with Segment's error.
fn read_limit(api: Api, state: &AppState) -> (usize, Option<impl FnOnce() -> ApiError>) {
    let Api::Segment { single } = api else {
        return (state.max_body_bytes, None);
    };
    let (limit, too_large) = segment_api::segment_limit(single);
    if limit <= state.max_body_bytes { (limit, Some(too_large)) } else { (state.max_body_bytes, None) }
}

/// NULs removed from string values and lone surrogates replaced (`crate::sanitize`), counted in `/metrics`.
fn repair(source: &str, bytes: Vec<u8>, state: &AppState) -> (Vec<u8>, Option<Report>) {
    let (bytes, report) = crate::sanitize::repair(bytes);
    if let Some(r) = &report {
        let labels = crate::metrics::SourceLabels { source: source.to_owned() };
        state.intake.metrics.sanitized_values.get_or_create(&labels).inc_by(r.total as u64);
    }
    (bytes, report)
}

/// Maps an intake result to HTTP, in the route's API: the summary (202, or 200 with `success` for Segment's),
/// with `sanitized` (the repaired values listed) and `sanitized_count` when the body was repaired.
fn respond(
    source: &str,
    api: Api,
    result: Result<Intake, IntakeError>,
    repairs: Option<Report>,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let response = match result {
        Ok(Intake::Ping) => Ok(HttpResponse::Ok()
            .json(json!({"ok": true, "test": true, "message": "test ping received; nothing sent to Heap"}))),
        Ok(Intake::Stored { summary, nothing_accepted: false }) => {
            let mut body = serde_json::to_value(&summary).unwrap_or_default();
            if let Some(r) = &repairs {
                r.add_to(&mut body);
            }
            match api {
                Api::Relay => Ok(HttpResponse::Accepted().json(body)),
                // Segment's libraries read `success`; RudderStack's Python library takes only 200 as success.
                Api::Segment { .. } => {
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("success".into(), Value::Bool(true));
                    }
                    Ok(HttpResponse::Ok().json(body))
                }
            }
        }
        Ok(Intake::Stored { summary, nothing_accepted: true }) => {
            let first = summary.rejected.first().map(|r| r.field.clone());
            let mut e = ApiError::new(
                ErrorCode::NothingAccepted,
                format!("none of the {} items could be accepted; see `rejected` for each reason", summary.items),
            );
            e.field = first;
            e.rejected = serde_json::to_value(&summary.rejected).ok();
            Err(e)
        }
        Err(IntakeError::Ingest(e)) => Err(ingest_error(e)),
        Err(IntakeError::Store(e)) => Err(store_error(e, state)),
    };
    let status = match &response {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.code.status().as_u16(),
    };
    state.intake.metrics.request(source, status);
    response
}

pub(super) fn ingest_error(e: IngestError) -> ApiError {
    let message = e.to_string();
    match e {
        IngestError::Json(e) => {
            let code = match &e {
                JsonError::InvalidUtf8 { .. } => ErrorCode::InvalidUtf8,
                JsonError::Nul { .. } => ErrorCode::NulCharacter,
                JsonError::LoneSurrogate { .. } => ErrorCode::LoneSurrogate,
                JsonError::TooDeep { .. } => ErrorCode::JsonTooDeep,
                JsonError::NumberOutOfRange { .. } => ErrorCode::NumberOutOfRange,
                JsonError::DuplicateKey { .. } => ErrorCode::DuplicateKey,
                JsonError::Syntax { .. } => ErrorCode::MalformedJson,
            };
            ApiError::new(code, message).with_field(e.field())
        }
        IngestError::SourceDisabled(_) => ApiError::new(ErrorCode::UnknownSource, message).with_field("source"),
        IngestError::UnknownTemplate { .. } => {
            ApiError::new(ErrorCode::UnknownTemplate, message).with_field("template")
        }
        IngestError::Body(f) => ApiError::new(ErrorCode::InvalidBody, f.message).with_field(f.field),
        IngestError::TooManyItems { .. } => ApiError::new(ErrorCode::TooManyItems, message),
    }
}

/// A store error as an answer: 503 `store_full` with `Retry-After` when the store is at `store.max_bytes` (the
/// sender should retry later), else a 500 that says little (the log has the cause).
pub(super) fn store_error(e: StoreError, state: &AppState) -> ApiError {
    match e {
        StoreError::Full(why) => {
            tracing::warn!(reason = %why, "refused: the store is full");
            let mut e = ApiError::new(ErrorCode::StoreFull, "the relay's store is full; retry later");
            e.retry_after = Some(state.retry_after_secs);
            e
        }
        e => ApiError::internal(&e),
    }
}
