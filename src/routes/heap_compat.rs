//! `POST /api/track` and `POST /api/add_user_properties`: Heap's own bodies (single or bulk), validated, stored and
//! delivered with retries, so an existing integration only changes its base URL.

use super::AppState;
use super::hooks::take_body;
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
    take_body(req, "heap", None, Route::Heap(kind), payload, state).await
}
