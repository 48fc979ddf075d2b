//! The checks a request passes before its body is used: the source's authentication (`crate::auth`) and its
//! request budget (`crate::request_rate`). Header credentials are checked first, so requests without them do not
//! spend the sender's budget; signatures over the body are checked on the raw bytes, before parsing.

use super::AppState;
use crate::auth::{AuthError, Verifier};
use crate::error::{ApiError, ErrorCode};
use crate::request_rate::RequestRate;
use actix_web::HttpRequest;
use std::time::Instant;

/// One source's authentication and request budget.
#[derive(Debug)]
pub struct Gate {
    pub verifier: Verifier,
    pub rate: RequestRate,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn unauthorized(source: &str, e: &AuthError) -> ApiError {
    tracing::warn!(source, header = e.header(), reason = %e, "request refused: authentication failed");
    ApiError::new(ErrorCode::Unauthorized, e.to_string()).with_field(e.header())
}

/// Authentication from headers, then the request budget. Returns the gate for `after_body`.
pub fn before_body<'s>(req: &HttpRequest, source: &str, state: &'s AppState) -> Result<Option<&'s Gate>, ApiError> {
    let Some(gate) = state.gates.get(source) else {
        return Ok(None);
    };
    let headers = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    let result = gate.verifier.before_body(&headers, now_secs()).map_err(|e| unauthorized(source, &e)).and_then(|()| {
        gate.rate.take(Instant::now()).map_err(|wait| {
            let mut e = ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "source {source} sent more than {} requests per minute (sources.{source}.requests_per_minute); \
                     retry after {} s",
                    gate.rate.per_minute(),
                    wait.as_secs()
                ),
            );
            e.retry_after = Some(wait.as_secs().max(1));
            e
        })
    });
    if let Err(e) = &result {
        state.intake.metrics.request(source, e.code.status().as_u16());
    }
    result.map(|()| Some(gate))
}

/// A signature over the raw body, when the source's mode has one.
pub fn after_body(req: &HttpRequest, gate: Option<&Gate>, body: &[u8], state: &AppState) -> Result<(), ApiError> {
    let Some(gate) = gate else {
        return Ok(());
    };
    let headers = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    gate.verifier.after_body(&headers, body, now_secs()).map_err(|e| {
        let source = req.match_info().get("source").unwrap_or("heap");
        state.intake.metrics.request(source, 401);
        unauthorized(source, &e)
    })
}
