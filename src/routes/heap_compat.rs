//! `POST /api/track` and `POST /api/add_user_properties`: Heap's own bodies (single or bulk), validated, stored and
//! delivered with retries, so an existing integration only changes its base URL.

use super::AppState;
use super::accept::{Api, IngestCall, accept_request};
use crate::domain::CallKind;
use crate::error::ApiError;
use crate::ingest::Route;
use actix_web::{HttpRequest, HttpResponse, web};

pub async fn track(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    accept_request(&req, heap_call(CallKind::Track), payload, &state).await
}

pub async fn add_user_properties(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    accept_request(&req, heap_call(CallKind::UserProperties), payload, &state).await
}

/// The Heap-compatible routes pass the `heap` source's gate and name no environment by path.
fn heap_call(kind: CallKind) -> IngestCall<'static> {
    IngestCall { source: "heap", path_environment: None, route: Route::Heap(kind), api: Api::Relay }
}
