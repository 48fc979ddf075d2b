//! The route table, and the state handlers share. Handlers stay thin: read the body, call `intake`, `store` or
//! `replay`, map the result to HTTP.

pub mod admin;
pub mod body;
pub mod gate;
pub mod health;
pub mod heap_compat;
pub mod hooks;
pub mod metrics;

use crate::error::{ApiError, ErrorCode};
use crate::intake::Intaker;
use actix_web::{HttpResponse, web};

#[derive(Debug, Clone)]
pub struct AppState {
    pub intake: Intaker,
    pub max_body_bytes: usize,
    pub retry_after_secs: u64,
    /// None: the admin endpoints are off.
    pub admin_token: Option<[u8; 32]>,
    pub workers_running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Each source's authentication and request budget, by source name (`clevertap`, ..., `heap`).
    pub gates: std::sync::Arc<std::collections::HashMap<&'static str, gate::Gate>>,
    /// How long a client may take to send its body (408 after).
    pub body_read_timeout: std::time::Duration,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/hooks/{source}", web::post().to(hooks::hook))
        .route("/hooks/{source}/{template}", web::post().to(hooks::hook_with_template))
        .route("/api/track", web::post().to(heap_compat::track))
        .route("/api/add_user_properties", web::post().to(heap_compat::add_user_properties))
        .route("/admin/deliveries", web::get().to(admin::list))
        .route("/admin/deliveries/{id}", web::get().to(admin::get))
        .route("/admin/replay", web::post().to(admin::replay))
        .default_service(web::to(not_found));
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    let segments: Vec<&str> = req.path().trim_start_matches('/').split('/').collect();
    let route_exists = !segments.iter().any(|s| s.is_empty())
        && matches!(
            segments.as_slice(),
            ["healthz" | "readyz" | "metrics"]
                | ["api", "track" | "add_user_properties"]
                | ["admin", "replay" | "deliveries"]
                | ["admin", "deliveries", _]
                | ["hooks", _]
                | ["hooks", _, _]
        );
    if route_exists {
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} is not allowed on {}", req.method(), req.path()),
        ));
    }
    Err(ApiError::new(ErrorCode::NotFound, format!("no route {} {}", req.method(), req.path())))
}
