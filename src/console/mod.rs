//! The operator console at `/console`: what flowed, why an event failed, the templates, and the actions that
//! repair (replay, re-render, pause). On only when `admin.token` is set (404 otherwise).
//!
//! Pages are rendered on the server (`views`, maud) from the same store functions `/admin/*` and the CLI use
//! (`store::queries`); actions call `replay` and `delivery` as `/admin/replay` does, and each is kept in the audit
//! log. `session` says who is looking; every state change needs an admin session, its CSRF token and a same-origin
//! request.
//!
//! Rooms: `overview` (the last hour), `events` (deliveries and one event), `failures` (groups, bulk actions and
//! their progress), `templates` (load status, preview, `POST /admin/preview`), `control` (pauses, drain estimate,
//! audit log), `signin`.

pub mod control;
pub mod events;
pub mod failures;
pub mod overview;
pub mod preview;
pub mod session;
pub mod signin;
pub mod templates;
pub mod views;

use crate::replay::ReplayReport;
use crate::routes::AppState;
use crate::settings::Settings;
use crate::store::queries::AuditEntry;
use crate::store::{Millis, StoreError, now_ms};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use maud::html;
use session::{Role, Session, Sessions, Throttle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The console's own state, built from settings.
#[derive(Debug)]
pub struct Console {
    pub sessions: Sessions,
    pub throttle: Throttle,
    /// Where the templates are, named on the Templates page.
    pub templates_dir: PathBuf,
    pub jobs: Jobs,
    /// delivery.app_events_per_minute, for the drain estimate (0: no budget).
    pub app_events_per_minute: u32,
}

impl Console {
    /// The console as configured; `None` (off) without an admin token.
    pub fn from_settings(settings: &Settings) -> Option<Self> {
        let admin = settings.admin_token()?;
        let c = &settings.console;
        Some(Self {
            sessions: Sessions::new(admin, settings.console_readonly_token(), (c.session_minutes * 60_000) as i64),
            throttle: Throttle::new(c.sign_in_attempts_per_minute),
            templates_dir: settings.templates.dir.clone(),
            jobs: Jobs::default(),
            app_events_per_minute: settings.delivery.app_events_per_minute,
        })
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/console", web::get().to(overview::page))
        .route("/console/sign-in", web::get().to(signin::form))
        .route("/console/sign-in", web::post().to(signin::sign_in))
        .route("/console/sign-out", web::post().to(signin::sign_out))
        .route("/console/deliveries", web::get().to(events::deliveries))
        .route("/console/events/{id}", web::get().to(events::event))
        .route("/console/events/{id}/replay", web::post().to(events::replay))
        .route("/console/failures", web::get().to(failures::page))
        .route("/console/failures/replay", web::post().to(failures::replay_group))
        .route("/console/jobs/{id}", web::get().to(failures::job))
        .route("/console/templates", web::get().to(templates::page))
        .route("/console/templates/preview", web::post().to(templates::preview_form))
        .route("/console/control", web::get().to(control::page))
        .route("/console/control/pause", web::post().to(control::pause))
        .route("/console/control/resume", web::post().to(control::resume))
        .route("/console/control/purge", web::post().to(control::purge))
        .route("/admin/preview", web::post().to(templates::admin_preview));
}

/// Why a console request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the console is off: set admin.token to turn it on")]
    Off,
    #[error("sign in first")]
    SignIn,
    #[error("this session is read-only: sign in with the admin token to act")]
    ReadOnly,
    #[error("the form's CSRF token is missing or not this session's; reload the page and try again")]
    BadCsrf,
    #[error("refused: the request did not come from a page of this console (Origin/Referer)")]
    CrossOrigin,
    #[error("too many failed sign-ins from this address; wait a minute")]
    Throttled,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::Off | ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::SignIn => StatusCode::SEE_OTHER,
            ConsoleError::ReadOnly | ConsoleError::BadCsrf | ConsoleError::CrossOrigin => StatusCode::FORBIDDEN,
            ConsoleError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::Invalid(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ConsoleError::SignIn = self {
            return HttpResponse::SeeOther().insert_header((header::LOCATION, "/console/sign-in")).finish();
        }
        let message = match self {
            ConsoleError::Store(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(e), "console: store error");
                "the store failed; the relay's log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let body = views::page(
            "Not done",
            views::Nav::None,
            None,
            None,
            html! {
                p.error { (message) }
                p { a href="/console" { "Back to the console" } }
            },
        );
        let mut r = HttpResponse::build(self.status_code()).content_type("text/html; charset=utf-8").body(body.0);
        if let ConsoleError::Throttled = self {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        r
    }
}

/// A signed-in request: its session and what handlers need.
pub struct Viewer {
    pub session: Session,
    pub state: web::Data<AppState>,
    pub console: Arc<Console>,
}

impl FromRequest for Viewer {
    type Error = ConsoleError;
    type Future = std::future::Ready<Result<Self, ConsoleError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(viewer(req))
    }
}

/// The console's state, or `Off`.
pub fn console_of(req: &HttpRequest) -> Result<(web::Data<AppState>, Arc<Console>), ConsoleError> {
    let state = req.app_data::<web::Data<AppState>>().cloned().ok_or(ConsoleError::Off)?;
    let console = state.console.clone().ok_or(ConsoleError::Off)?;
    Ok((state, console))
}

fn viewer(req: &HttpRequest) -> Result<Viewer, ConsoleError> {
    let (state, console) = console_of(req)?;
    let cookie = req.cookie(session::COOKIE).ok_or(ConsoleError::SignIn)?;
    let session = console.sessions.check(cookie.value(), now_ms()).ok_or(ConsoleError::SignIn)?;
    Ok(Viewer { session, state, console })
}

impl Viewer {
    /// Allows a state change: an admin session, this session's CSRF token, a request from this origin.
    pub fn act(&self, req: &HttpRequest, csrf: &str) -> Result<(), ConsoleError> {
        check_origin(req)?;
        if !Sessions::csrf_ok(&self.session, csrf) {
            return Err(ConsoleError::BadCsrf);
        }
        if self.session.role != Role::Admin {
            return Err(ConsoleError::ReadOnly);
        }
        Ok(())
    }

    /// Keeps an action in the audit log; a failure to write it is logged, the action stands.
    pub async fn audit(&self, action: &str, selection: String, count: i64) {
        let entry = AuditEntry {
            at: now_ms(),
            actor: self.session.role.as_str().to_owned(),
            action: action.into(),
            selection,
            count,
        };
        if let Err(e) = self.state.intake.store.audit(entry).await {
            tracing::error!(error = %e, "console: cannot write the audit log");
        }
    }
}

/// Whether the request reached the relay over TLS: only a trusted proxy's `X-Forwarded-Proto` says so (the relay
/// itself listens in plain HTTP).
pub fn over_tls(req: &HttpRequest) -> bool {
    let trusted = match (req.app_data::<web::Data<AppState>>(), req.peer_addr()) {
        (Some(s), Some(peer)) => s.proxies.is_trusted(peer.ip()),
        _ => false,
    };
    trusted
        && req
            .headers()
            .get("X-Forwarded-Proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

pub fn check_origin(req: &HttpRequest) -> Result<(), ConsoleError> {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = h("Host").unwrap_or("");
    let scheme = if over_tls(req) { "https" } else { "http" };
    if session::same_origin(host, scheme, h("Origin"), h("Referer"), h("Sec-Fetch-Site")) {
        Ok(())
    } else {
        Err(ConsoleError::CrossOrigin)
    }
}

/// Picks up template edits made since the last periodic reload, so a re-render or preview uses today's files (a
/// broken file keeps the last good set, as the periodic reload does).
pub fn fresh_templates(pipeline: &crate::ingest::Pipeline) {
    if let Err(errors) = pipeline.templates.reload_if_changed() {
        tracing::warn!(problems = errors.len(), "the template directory has problems; the last good set stays in use");
    }
}

/// An HTML page response.
pub fn html(markup: maud::Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ))
        .body(markup.0)
}

/// A redirect after a form (303: the browser follows with GET).
pub fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((header::LOCATION, location.to_owned())).finish()
}

/// Bulk actions running or done, with their progress, so a page can show them while they run.
#[derive(Debug, Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Mutex<Job>>>>,
}

#[derive(Debug, Clone, Default)]
pub struct Job {
    pub label: String,
    pub started: Millis,
    pub done: usize,
    pub total: usize,
    pub report: Option<ReplayReport>,
    pub error: Option<String>,
}

/// Jobs kept for their pages at most; the oldest go first.
const KEPT_JOBS: usize = 100;

impl Jobs {
    pub fn start(&self, label: String) -> (u64, Arc<Mutex<Job>>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Mutex::new(Job { label, started: now_ms(), ..Default::default() }));
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.len() >= KEPT_JOBS
            && let Some(oldest) = jobs.keys().min().copied()
        {
            jobs.remove(&oldest);
        }
        jobs.insert(id, job.clone());
        (id, job)
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(&id).map(|j| j.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
