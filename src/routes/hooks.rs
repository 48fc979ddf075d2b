//! `POST /hooks/{source}` and `POST /hooks/{source}/{template}`: a vendor webhook in, a 202 summary out.

use super::AppState;
use super::body::read_limited;
use super::{environment, gate};
use crate::error::{ApiError, ErrorCode};
use crate::ingest::{IngestError, Route};
use crate::intake::{Intake, IntakeError};
use crate::json::JsonError;
use crate::sanitize::Sanitized;
use crate::sources::Source;
use crate::store::StoreError;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

pub async fn hook(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    take(&req, None, &path.into_inner(), None, payload, &state).await
}

pub async fn hook_with_template(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (source, template) = path.into_inner();
    take(&req, None, &source, Some(template), payload, &state).await
}

/// `POST /env/{environment}/hooks/{source}`: for senders that can carry no credential naming an environment.
pub async fn hook_in(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (environment, source) = path.into_inner();
    take(&req, Some(&environment), &source, None, payload, &state).await
}

/// `POST /env/{environment}/hooks/{source}/{template}`.
pub async fn hook_with_template_in(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (environment, source, template) = path.into_inner();
    take(&req, Some(&environment), &source, Some(template), payload, &state).await
}

async fn take(
    req: &HttpRequest,
    path_environment: Option<&str>,
    source: &str,
    template: Option<String>,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let Some(source) = Source::parse(source) else {
        return Err(ApiError::new(
            ErrorCode::UnknownSource,
            format!("no source {source:?}; sources are clevertap, userpilot, segment"),
        )
        .with_field("source"));
    };
    take_body(req, source.as_str(), path_environment, Route::Hook { source, template }, payload, state).await
}

/// What every ingest route does: the source's gate, the body (bounded), the gate's body check, the environment
/// (the credential's, else `path_environment`'s), intake, answer.
pub async fn take_body(
    req: &HttpRequest,
    source: &str,
    path_environment: Option<&str>,
    route: Route,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    environment::check_path(path_environment, source, state)?;
    let gate = gate::before_body(req, source, state)?;
    let body = read_limited(req, payload, state.max_body_bytes, state.body_read_timeout, &state.inflight)
        .await
        .inspect_err(|e| {
            gate.give_back_if_ours(e);
            state.intake.metrics.request(source, e.code.status().as_u16())
        })?;
    let credential = gate::after_body(req, source, gate, &body.bytes, state)?;
    let environment = environment::resolve(credential, path_environment, source, state)?;
    // NULs and lone surrogates are repaired (after the signature check, which covers the body as sent).
    let (bytes, sanitized) = match crate::sanitize::sanitize(&body.bytes) {
        Some((repaired, listed, total)) => {
            let labels = crate::metrics::SourceLabels { source: source.to_owned() };
            state.intake.metrics.sanitized_values.get_or_create(&labels).inc_by(total as u64);
            (repaired, Some((listed, total)))
        }
        None => (body.bytes, None),
    };
    // A Segment body's `writeKey` is a secret: checked by the gate, never stored.
    let bytes = match source {
        "segment" => super::segment_api::without_write_key(&bytes, state).unwrap_or(bytes),
        _ => bytes,
    };
    // The budget stays held (body.held) until the answer: the pipeline's copies of the body live that long.
    let result = state.intake.accept_in(&environment, route, bytes).await;
    drop(body.held);
    respond(source, result, sanitized, state)
}

/// Maps an intake result to HTTP; shared with the Heap-compatible routes. `sanitized`: the repaired values
/// (listed, and counted), added to the summary.
pub fn respond(
    source: &str,
    result: Result<Intake, IntakeError>,
    sanitized: Option<(Vec<Sanitized>, usize)>,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let response = match result {
        Ok(Intake::Ping) => Ok(HttpResponse::Ok()
            .json(json!({"ok": true, "test": true, "message": "test ping received; nothing sent to Heap"}))),
        Ok(Intake::Stored { summary, nothing_accepted: false }) => {
            let mut body = serde_json::to_value(&summary).unwrap_or_default();
            if let (Some((listed, total)), Some(obj)) = (sanitized, body.as_object_mut()) {
                obj.insert("sanitized".into(), json!(listed));
                obj.insert("sanitized_count".into(), json!(total));
            }
            Ok(HttpResponse::Accepted().json(body))
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
