//! `POST /hooks/{source}` and `POST /hooks/{source}/{template}`: a vendor webhook in, a 202 summary out.

use super::AppState;
use super::accept::{Api, IngestCall, accept_request};
use crate::error::{ApiError, ErrorCode};
use crate::ingest::Route;
use crate::sources::Source;
use actix_web::{HttpRequest, HttpResponse, web};

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
    let route = Route::Hook { source, template };
    let call = IngestCall { source: source.as_str(), path_environment, route, api: Api::Relay };
    accept_request(req, call, payload, state).await
}
