//! The route table, and the state handlers share. Handlers stay thin: read the body, call `intake`, `store` or
//! `replay`, map the result to HTTP.

pub mod accept;
pub mod admin;
pub mod body;
pub mod environment;
pub mod gate;
pub mod health;
pub mod heap_compat;
pub mod hooks;
pub mod metrics;
pub mod origin;
pub mod segment_api;
pub mod span;

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
    /// Decoded bytes of every body in flight, against `server.max_inflight_body_bytes`.
    pub inflight: std::sync::Arc<body::InflightBytes>,
    /// Sites whose browsers may post to the ingest routes.
    pub origins: std::sync::Arc<origin::AllowedOrigins>,
    /// Proxies whose X-Forwarded-For names the client.
    pub proxies: std::sync::Arc<crate::client_addr::TrustedProxies>,
    /// Rate limit of the auth-failure log lines.
    pub auth_log: std::sync::Arc<gate::AuthFailureLog>,
    /// The operator console; None (off, 404) without an admin token.
    pub console: Option<std::sync::Arc<crate::console::Console>>,
}

/// The client's address: the peer's, or from X-Forwarded-For when the peer is a trusted proxy.
pub fn client_ip(req: &actix_web::HttpRequest) -> Option<std::net::IpAddr> {
    let peer = req.peer_addr().map(|a| a.ip());
    let proxies = req.app_data::<web::Data<AppState>>().map(|s| s.proxies.clone()).unwrap_or_default();
    let xff: Vec<&str> = req.headers().get_all("X-Forwarded-For").filter_map(|v| v.to_str().ok()).collect();
    proxies.client(peer, &xff)
}

/// How `web::Query` failures answer: the JSON error shape, naming the query.
pub fn query_error(e: actix_web::error::QueryPayloadError, _: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::new(ErrorCode::InvalidQuery, format!("query string: {e}")).with_field("query").into()
}

/// The probes alone, for the second listener (`server.health_bind`).
pub fn configure_health(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .default_service(web::to(not_found));
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/hooks/{source}", web::post().to(hooks::hook))
        .route("/hooks/{source}/{template}", web::post().to(hooks::hook_with_template))
        // Segment's tracking API, at the root and under a base URL with a path.
        .route("/v1/{call}", web::post().to(segment_api::call))
        .route("/hooks/segment/v1/{call}", web::post().to(segment_api::call))
        // An environment by path prefix, for senders that can carry no credential naming one.
        .route("/env/{environment}/hooks/{source}", web::post().to(hooks::hook_in))
        .route("/env/{environment}/hooks/{source}/{template}", web::post().to(hooks::hook_with_template_in))
        .route("/env/{environment}/v1/{call}", web::post().to(segment_api::call_in))
        .route("/env/{environment}/hooks/segment/v1/{call}", web::post().to(segment_api::call_in))
        .route("/api/track", web::post().to(heap_compat::track))
        .route("/api/add_user_properties", web::post().to(heap_compat::add_user_properties))
        .route("/admin/deliveries", web::get().to(admin::list))
        .route("/admin/deliveries/{id}", web::get().to(admin::get))
        .route("/admin/replay", web::post().to(admin::replay))
        .configure(crate::console::configure)
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
                | ["v1", _]
                | ["hooks", "segment", "v1", _]
                | ["env", _, "hooks", _]
                | ["env", _, "hooks", _, _]
                | ["env", _, "v1", _]
                | ["env", _, "hooks", "segment", "v1", _]
        );
    if route_exists {
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} is not allowed on {}", req.method(), req.path()),
        ));
    }
    Err(ApiError::new(ErrorCode::NotFound, format!("no route {} {}", req.method(), req.path())))
}
