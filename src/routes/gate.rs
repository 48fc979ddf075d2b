//! The checks a request passes before its body is used: a browser's cross-site post is refused (`origin`), then
//! the source's authentication (`crate::auth`) and its request budget (`crate::request_rate`). Header credentials
//! are checked first, so requests without them do not spend the sender's budget; signatures over the body are
//! checked on the raw bytes, before parsing, and a request whose signature fails gives its budget back, so forged
//! requests cannot spend the real sender's budget.
//!
//! Failed authentication is counted in `/metrics` (`heap_relay_auth_failures_total`) every time, and logged at
//! most once per source per `log.auth_failure_interval_secs`, with the number of failures since the last line.

use super::AppState;
use crate::auth::{AuthError, AuthMode, Verifier, WriteKeys};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::SourceLabels;
use crate::request_rate::RequestRate;
use actix_web::HttpRequest;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One source's authentication and request budget.
#[derive(Debug)]
pub struct Gate {
    pub verifier: Verifier,
    pub rate: RequestRate,
    /// Segment write keys (empty for the other sources, and for a segment source without any).
    pub write_keys: WriteKeys,
}

/// What a request showed before its body was read.
#[derive(Debug)]
pub struct Passed<'s> {
    gate: Option<&'s Gate>,
    /// The environment its credential chose: `Some("")` for a write key of the default environment, `None` when
    /// the credential names none (the source's own secret, or no authentication).
    environment: Option<String>,
    /// No write key in the headers of a source that has write keys and no other authentication: the body's
    /// `writeKey` must name one.
    needs_write_key: bool,
}

impl Passed<'_> {
    /// Gives back the request budget taken by `before_body` when the relay itself could not take the body
    /// (`overloaded`): the sender should not be rate-limited for the relay's own pressure.
    pub fn give_back_if_ours(&self, e: &crate::error::ApiError) {
        if let (Some(g), crate::error::ErrorCode::Overloaded) = (self.gate, &e.code) {
            g.rate.give_back();
        }
    }

    /// For routes without a gate (tests, disabled sources).
    pub fn open() -> Self {
        Self { gate: None, environment: None, needs_write_key: false }
    }
}

/// When each source last logged an authentication failure, and how many it has not logged since.
#[derive(Debug)]
pub struct AuthFailureLog {
    every: Duration,
    state: Mutex<HashMap<String, (Instant, u64)>>,
}

impl AuthFailureLog {
    pub fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new(HashMap::new()) }
    }

    /// Some(failures not logged since the last line) when this failure should be logged.
    pub fn should_log(&self, source: &str, now: Instant) -> Option<u64> {
        let mut m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(source) {
            Some((last, quiet)) if now.saturating_duration_since(*last) < self.every => {
                *quiet += 1;
                None
            }
            Some((last, quiet)) => {
                let n = *quiet;
                *last = now;
                *quiet = 0;
                Some(n)
            }
            None => {
                m.insert(source.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn unauthorized(req: &HttpRequest, source: &str, e: &AuthError, state: &AppState) -> ApiError {
    state.intake.metrics.auth_failures.get_or_create(&SourceLabels { source: source.to_owned() }).inc();
    state.intake.metrics.request(source, 401);
    if let Some(not_logged) = state.auth_log.should_log(source, Instant::now()) {
        let client = super::client_ip(req).map(|ip| ip.to_string()).unwrap_or_default();
        tracing::warn!(
            source,
            client,
            header = e.header(),
            reason = %e,
            failures_not_logged = not_logged,
            "request refused: authentication failed (logged at most once per log.auth_failure_interval_secs)"
        );
    }
    ApiError::new(ErrorCode::Unauthorized, e.to_string()).with_field(e.header())
}

/// The Origin check, authentication from headers (a write key, or the source's auth), then the request budget.
/// Returns what `after_body` finishes with.
pub fn before_body<'s>(req: &HttpRequest, source: &str, state: &'s AppState) -> Result<Passed<'s>, ApiError> {
    if let Err(e) = state.origins.check(req.headers().get(actix_web::http::header::ORIGIN).map(|v| v.as_bytes())) {
        state.intake.metrics.request(source, e.code.status().as_u16());
        return Err(e);
    }
    let Some(gate) = state.gates.get(source) else {
        return Ok(Passed::open());
    };
    let headers = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    let mut passed = Passed { gate: Some(gate), environment: None, needs_write_key: false };
    let mut by_key = false;
    if !gate.write_keys.is_empty() {
        match crate::auth::basic_user(headers("Authorization")) {
            Some(user) => match gate.write_keys.environment_of(&user) {
                Some(env) => {
                    passed.environment = Some(env.to_owned());
                    by_key = true;
                }
                // The source's own Basic credentials may still pass.
                None if gate.verifier.mode() == AuthMode::Basic => {}
                None => {
                    let e = AuthError::Wrong { header: "Authorization".into(), what: "write key (Basic user)" };
                    return Err(unauthorized(req, source, &e, state));
                }
            },
            None if gate.verifier.mode() == AuthMode::None => passed.needs_write_key = true,
            None => {}
        }
    }
    if !by_key && !passed.needs_write_key {
        passed.environment =
            gate.verifier.before_body(&headers, now_secs()).map_err(|e| unauthorized(req, source, &e, state))?;
    }
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
        state.intake.metrics.request(source, 429);
        e
    })?;
    Ok(passed)
}

/// A signature over the raw body, when the source's mode has one, or the body's `writeKey` when the headers had
/// none. A failure gives the budget taken back. Returns the environment the credential chose (see `Passed`).
pub fn after_body(
    req: &HttpRequest,
    source: &str,
    passed: Passed<'_>,
    body: &[u8],
    state: &AppState,
) -> Result<Option<String>, ApiError> {
    let Some(gate) = passed.gate else {
        return Ok(None);
    };
    let fail = |e: AuthError| {
        gate.rate.give_back();
        unauthorized(req, source, &e, state)
    };
    if passed.needs_write_key {
        let Some(key) = body_write_key(body) else {
            // A body that is not JSON at all is named as such, not as a missing key.
            if let Err(e) = crate::json::parse(body, &state.intake.pipeline.json_limits) {
                gate.rate.give_back();
                return Err(super::accept::ingest_error(crate::ingest::IngestError::Json(e)));
            }
            return Err(fail(AuthError::Missing {
                header: "Authorization".into(),
                expected: "a write key (HTTP Basic user, or writeKey in the body)".into(),
            }));
        };
        return match gate.write_keys.environment_of(key.as_bytes()) {
            Some(env) => Ok(Some(env.to_owned())),
            None => Err(fail(AuthError::Wrong { header: "writeKey".into(), what: "write key" })),
        };
    }
    let headers = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    let signed = gate.verifier.after_body(&headers, body, now_secs()).map_err(fail)?;
    Ok(passed.environment.or(signed))
}

/// The top-level `writeKey` string of a JSON object body (the body is already bounded by `read_limited`; only
/// that one field is kept).
pub fn body_write_key(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Key {
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    serde_json::from_slice::<Key>(body).ok()?.write_key.filter(|k| !k.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_failures_in_one_interval_log_one_line_and_the_next_line_counts_them() {
        let log = AuthFailureLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let logged = (0..1000).filter(|_| log.should_log("userpilot", t0).is_some()).count();
        assert_eq!(logged, 1);
        assert_eq!(log.should_log("segment", t0), Some(0), "each source has its own interval");
        assert_eq!(log.should_log("userpilot", t0 + Duration::from_secs(10)), Some(999));
    }
}
