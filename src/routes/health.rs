//! `/healthz`: the process answers. `/readyz`: the store answers and the delivery workers are running.

use super::AppState;
use crate::error::{ApiError, ErrorCode};
use actix_web::{HttpResponse, web};
use serde_json::json;
use std::sync::atomic::Ordering;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if let Err(e) = state.intake.store.ping().await {
        tracing::error!(error = %e, "readiness: the store does not answer");
        return Err(ApiError::new(ErrorCode::NotReady, "the store does not answer"));
    }
    match state.intake.store.full_reason().await {
        Ok(Some(why)) => {
            tracing::warn!(reason = %why, "readiness: the store is full; bodies get 503 store_full");
            return Err(ApiError::new(ErrorCode::NotReady, "the store is full (store.max_bytes); bodies are refused"));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "readiness: could not measure the store"),
    }
    let workers = state.workers_running.load(Ordering::SeqCst);
    if workers == 0 {
        return Err(ApiError::new(ErrorCode::NotReady, "no delivery worker is running"));
    }
    Ok(HttpResponse::Ok().json(json!({"status": "ready", "delivery_workers": workers})))
}
