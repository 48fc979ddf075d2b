//! Which environment (`[environments.<name>]`) a request belongs to: the one its credential names (a write key,
//! or a secret listed under `sources.<name>.auth.environments`), else the one its `/env/{name}/` path prefix
//! names (for senders that can carry no credential), else the default one (`""`). A path naming another
//! environment than the credential is refused, so a path cannot move a credential's events to another project.

use super::AppState;
use crate::error::{ApiError, ErrorCode};

/// A path prefix must name a configured environment (404 `unknown_environment` before the body is read).
pub fn check_path(path: Option<&str>, source: &str, state: &AppState) -> Result<(), ApiError> {
    let Some(name) = path else {
        return Ok(());
    };
    if state.intake.pipeline.environments.contains_key(name) {
        return Ok(());
    }
    state.intake.metrics.request(source, 404);
    Err(ApiError::new(
        ErrorCode::UnknownEnvironment,
        format!("no environment {name:?} in the relay's configuration ([environments.<name>])"),
    )
    .with_field("environment"))
}

/// The request's environment from what its credential chose (`Some("")`: the default one, by a write key) and its
/// path prefix.
pub fn resolve(
    credential: Option<String>,
    path: Option<&str>,
    source: &str,
    state: &AppState,
) -> Result<String, ApiError> {
    match (credential, path) {
        (Some(c), Some(p)) if c != p => {
            state.intake.metrics.request(source, 403);
            let named = if c.is_empty() { "the default environment".to_owned() } else { format!("environment {c:?}") };
            Err(ApiError::new(
                ErrorCode::WrongEnvironment,
                format!("the request's credential belongs to {named}, but its path names environment {p:?}"),
            )
            .with_field("environment"))
        }
        (Some(c), _) => Ok(c),
        (None, Some(p)) => Ok(p.to_owned()),
        (None, None) => Ok(String::new()),
    }
}
