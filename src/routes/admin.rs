//! `/admin/deliveries[/{id}]` and `/admin/replay`, behind the admin bearer token. Without a configured token the
//! admin endpoints do not exist (404).

use super::AppState;
use crate::auth::verify_bearer;
use crate::error::{ApiError, ErrorCode};
use crate::filters::FilterParams;
use crate::replay::{replay as run_replay, selector};
use crate::store::StoreError;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use std::future::{Ready, ready};

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let token = req.app_data::<web::Data<AppState>>().and_then(|s| s.admin_token);
        let Some(token) = token else {
            return ready(Err(ApiError::new(
                ErrorCode::NotFound,
                "the admin endpoints are off: set admin.token to turn them on",
            )));
        };
        ready(check_token(req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()), &token))
    }
}

/// The same bearer check (and constant-time comparison) the sources use.
fn check_token(authorization: Option<&[u8]>, token_digest: &[u8; 32]) -> Result<Admin, ApiError> {
    verify_bearer(authorization, token_digest).map(|()| Admin).map_err(|e| {
        ApiError::new(ErrorCode::Unauthorized, format!("admin token: {e} (admin.token)")).with_field("Authorization")
    })
}

pub async fn list(
    _: Admin,
    params: web::Query<FilterParams>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let filter =
        params.parse(100, 10_000).map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.message).with_field(e.field))?;
    let page = state.intake.store.page(filter).await.map_err(|e| ApiError::internal(&e))?;
    Ok(HttpResponse::Ok().json(json!({ "count": page.events.len(), "events": page.events, "next": page.next })))
}

pub async fn get(_: Admin, id: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.intake.store.get(&id).await {
        Ok(v) => Ok(HttpResponse::Ok().json(v)),
        Err(StoreError::NotFound) => {
            Err(ApiError::new(ErrorCode::NotFound, format!("no event {:?}", id.as_str())).with_field("id"))
        }
        Err(e) => Err(ApiError::internal(&e)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    id: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// `<source>/<name>`: the events that template rendered with another version than today's, or held.
    stale_template: Option<String>,
    #[serde(default)]
    rerender: bool,
}

/// Largest `/admin/replay` body: a selector, a few hundred bytes.
const MAX_REPLAY_BODY: usize = 64 * 1024;

pub async fn replay(
    _: Admin,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let b: ReplayBody = super::body::read_json(
        &req,
        payload,
        MAX_REPLAY_BODY,
        &state,
        "replay",
        r#"{"id"|"status"|"since"/"until"|"stale_template", "rerender"}"#,
    )
    .await?;
    let i = &state.intake;
    let sel = match &b.stale_template {
        Some(spec) => crate::replay::stale_template(&i.pipeline, spec),
        None => selector(b.id.as_deref(), b.status.as_deref(), b.since.as_deref(), b.until.as_deref()),
    }
    .map_err(|m| ApiError::new(ErrorCode::InvalidBody, m))?;
    let report = run_replay(&i.store, &i.pipeline, sel, b.rerender, &mut |done, total| {
        if done % 1000 == 0 || done == total {
            tracing::info!(done, total, "replay progress");
        }
    })
    .await
    .map_err(|e| super::accept::store_error(e, &state))?;
    i.delivery.wake();
    Ok(HttpResponse::Ok().json(report))
}

#[cfg(test)]
mod tests {
    use super::check_token;
    use crate::auth::digest;

    /// Equal only when bytes and length match.
    fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
        check_token(Some(&[b"Bearer ".as_slice(), given].concat()), &digest(token)).is_ok()
    }

    #[test]
    fn equal_only_when_bytes_and_length_match() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
