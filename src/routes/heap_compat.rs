//! `POST /api/track` and `POST /api/add_user_properties`: Heap's own bodies (single or bulk), validated, stored and
//! delivered with retries, so an existing integration only changes its base URL.

use super::AppState;
use super::body::read_limited;
use super::gate;
use super::hooks::respond;
use crate::domain::CallKind;
use crate::error::ApiError;
use crate::ingest::Route;
use actix_web::{HttpRequest, HttpResponse, web};

pub async fn track(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    take(&req, CallKind::Track, payload, &state).await
}

pub async fn add_user_properties(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    take(&req, CallKind::UserProperties, payload, &state).await
}

async fn take(
    req: &HttpRequest,
    kind: CallKind,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let gate = gate::before_body(req, "heap", state)?;
    let body = read_limited(req, payload, state.max_body_bytes, state.body_read_timeout).await?;
    gate::after_body(req, gate, &body, state)?;
    let result = state.intake.accept(Route::Heap(kind), body).await;
    respond("heap", result, state)
}
