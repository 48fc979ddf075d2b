//! Browsers' cross-site posts. A web page on any site can make its visitors' browsers post to the relay (form
//! posts and `fetch` with `no-cors` need no preflight, whatever the Content-Type). Browsers always send `Origin` on
//! a cross-site POST; vendors' webhooks and server-side SDKs send none. So an ingest request whose `Origin` names
//! a site not in `server.allowed_origins` is refused (403 `forbidden_origin`), and content types stay open (real
//! SDKs send gzip bodies as `application/x-www-form-urlencoded`).

use crate::error::{ApiError, ErrorCode};

/// `scheme://host[:port]`, lower-cased, without a trailing slash; None for anything else.
pub fn normalize(origin: &str) -> Option<String> {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = o.split_once("://")?;
    let ok = matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' ', ','])
        && rest.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(o)
}

/// The configured list, normalised.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    pub fn new(list: &[String]) -> Self {
        Self(list.iter().filter_map(|o| normalize(o)).collect())
    }

    /// No `Origin` header passes; one naming a listed site passes; any other (`null` included) is refused.
    pub fn check(&self, origin: Option<&[u8]>) -> Result<(), ApiError> {
        let Some(raw) = origin else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(raw);
        if normalize(&text).is_some_and(|o| self.0.contains(&o)) {
            return Ok(());
        }
        let shown: String = text.chars().take(100).collect();
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "a browser page at {shown:?} may not post here: its site is not in server.allowed_origins \
                 (webhooks and SDKs send no Origin header)"
            ),
        )
        .with_field("Origin"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_origin_and_listed_origins_pass_others_are_refused() {
        let a = AllowedOrigins::new(&["https://App.example.com/".into()]);
        assert!(a.check(None).is_ok());
        assert!(a.check(Some(b"https://app.example.com")).is_ok());
        assert!(a.check(Some(b"https://evil.example")).is_err());
        assert!(a.check(Some(b"null")).is_err());
        assert!(AllowedOrigins::default().check(Some(b"https://app.example.com")).is_err());
    }
}
