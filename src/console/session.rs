//! Who is looking at the console: sign-in with a token, a signed session cookie, a CSRF token per session, the
//! same-origin check on every state change, and the sign-in throttle.
//!
//! The cookie holds `role.expires.nonce.mac`, where `mac` is an HMAC-SHA256 under a key derived from the admin
//! token. Nothing is kept server-side, so a session is valid on every instance configured with the same admin token
//! (every instance sharing a PostgreSQL store) and ends when it expires or the token changes. The CSRF token is
//! another HMAC of the cookie, so a page can carry it without the cookie being readable from script (HttpOnly).

use crate::auth::digest;
use crate::store::Millis;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use subtle::ConstantTimeEq;

pub const COOKIE: &str = "heap_relay_console";

/// What a signed-in person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signed in with admin.token: looks and acts.
    Admin,
    /// Signed in with console.readonly_token: looks only.
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "read-only" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

/// A valid session.
#[derive(Debug, Clone)]
pub struct Session {
    pub role: Role,
    pub expires: Millis,
    /// The token every form of this session carries.
    pub csrf: String,
}

/// Signs and checks sessions.
pub struct Sessions {
    key: [u8; 32],
    admin: [u8; 32],
    readonly: Option<[u8; 32]>,
    lifetime_ms: i64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("lifetime_ms", &self.lifetime_ms).finish_non_exhaustive()
    }
}

impl Sessions {
    pub fn new(admin_token: &str, readonly_token: Option<&str>, lifetime_ms: i64) -> Self {
        let key = digest(format!("heap-relay console session key\0{admin_token}").as_bytes());
        Self {
            key,
            admin: digest(admin_token.as_bytes()),
            readonly: readonly_token.map(|t| digest(t.as_bytes())),
            lifetime_ms: lifetime_ms.max(60_000),
        }
    }

    pub fn lifetime_secs(&self) -> i64 {
        self.lifetime_ms / 1000
    }

    /// The role a token signs in as, compared in constant time (over digests, so lengths do not show).
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let given = digest(token.trim().as_bytes());
        if bool::from(given.ct_eq(&self.admin)) {
            return Some(Role::Admin);
        }
        match &self.readonly {
            Some(r) if bool::from(given.ct_eq(r)) => Some(Role::ReadOnly),
            _ => None,
        }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        for p in parts {
            m.update(p.as_bytes());
            m.update(b"\0");
        }
        hex::encode(m.finalize().into_bytes())
    }

    /// A new session's cookie value.
    pub fn issue(&self, role: Role, now: Millis) -> String {
        let expires = now + self.lifetime_ms;
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let body = format!("{}.{expires}.{nonce}", role.as_str());
        let mac = self.mac(&["session", &body]);
        format!("{body}.{mac}")
    }

    /// The session a cookie value names, if its signature holds and it has not expired.
    pub fn check(&self, cookie: &str, now: Millis) -> Option<Session> {
        let (body, mac) = cookie.rsplit_once('.')?;
        let want = self.mac(&["session", body]);
        if !bool::from(want.as_bytes().ct_eq(mac.as_bytes())) {
            return None;
        }
        let mut parts = body.split('.');
        let role = Role::parse(parts.next()?)?;
        let expires: Millis = parts.next()?.parse().ok()?;
        if expires <= now {
            return None;
        }
        Some(Session { role, expires, csrf: self.mac(&["csrf", cookie]) })
    }

    /// Whether a form's CSRF token is the session's.
    pub fn csrf_ok(session: &Session, given: &str) -> bool {
        bool::from(session.csrf.as_bytes().ct_eq(given.as_bytes()))
    }
}

/// Whether a state-changing request came from a page of this origin: `Origin` (or, without it, `Referer`) must name
/// the scheme and host the request was sent to, and `Sec-Fetch-Site`, when the browser sends it, must say
/// `same-origin`. A request with neither Origin nor Referer is refused.
pub fn same_origin(
    host: &str,
    scheme: &str,
    origin: Option<&str>,
    referer: Option<&str>,
    fetch_site: Option<&str>,
) -> bool {
    if fetch_site.is_some_and(|s| s != "same-origin") {
        return false;
    }
    let expected = format!("{scheme}://{host}");
    match (origin, referer) {
        (Some(o), _) => o == expected,
        (None, Some(r)) => r == expected || r.starts_with(&format!("{expected}/")),
        (None, None) => false,
    }
}

/// Failed sign-ins per client address in the current minute.
#[derive(Debug)]
pub struct Throttle {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Millis, u32)>>,
}

/// Addresses remembered at most; past it, windows that ended are forgotten first.
const THROTTLE_ADDRESSES: usize = 10_000;

impl Throttle {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1), seen: Mutex::new(HashMap::new()) }
    }

    /// Whether `ip` may try to sign in now (it has not used up this minute's failures).
    pub fn allows(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        let Some(ip) = ip else { return true };
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&ip).is_none_or(|(start, n)| now - start >= 60_000 || *n < self.per_minute)
    }

    /// Counts a failed sign-in.
    pub fn failed(&self, ip: Option<IpAddr>, now: Millis) {
        let Some(ip) = ip else { return };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= THROTTLE_ADDRESSES {
            seen.retain(|_, (start, _)| now - *start < 60_000);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now - e.0 >= 60_000 {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new("admin-token", Some("look-token"), 3_600_000)
    }

    #[test]
    fn tokens_sign_in_as_their_role_and_others_do_not() {
        let s = sessions();
        assert_eq!(s.role_of("admin-token"), Some(Role::Admin));
        assert_eq!(s.role_of("look-token"), Some(Role::ReadOnly));
        assert_eq!(s.role_of("admin-toke"), None);
        assert_eq!(s.role_of(""), None);
    }

    #[test]
    fn a_session_holds_until_it_expires_and_cannot_be_altered() {
        let s = sessions();
        let c = s.issue(Role::ReadOnly, 1_000);
        assert_eq!(s.check(&c, 2_000).map(|x| x.role), Some(Role::ReadOnly));
        assert!(s.check(&c, 1_000 + 3_600_000).is_none(), "expired");
        let forged = c.replacen("read-only", "admin", 1);
        assert!(s.check(&forged, 2_000).is_none(), "role changed without the key");
        let other = Sessions::new("another-admin-token", None, 3_600_000);
        assert!(other.check(&c, 2_000).is_none(), "another admin token's key");
    }

    #[test]
    fn the_csrf_token_differs_per_session() {
        let s = sessions();
        let a = s.check(&s.issue(Role::Admin, 0), 1).unwrap();
        let b = s.check(&s.issue(Role::Admin, 0), 1).unwrap();
        assert_ne!(a.csrf, b.csrf);
        assert!(Sessions::csrf_ok(&a, &a.csrf.clone()));
        assert!(!Sessions::csrf_ok(&a, &b.csrf));
        assert!(!Sessions::csrf_ok(&a, ""));
    }

    #[test]
    fn only_same_origin_requests_may_change_state() {
        let h = "relay.example:8080";
        assert!(same_origin(h, "http", Some("http://relay.example:8080"), None, Some("same-origin")));
        assert!(same_origin(h, "http", None, Some("http://relay.example:8080/console/failures"), None));
        assert!(!same_origin(h, "http", Some("http://evil.example"), None, None));
        assert!(!same_origin(h, "http", None, Some("http://relay.example:8080.evil.example/"), None));
        assert!(!same_origin(h, "http", Some("http://relay.example:8080"), None, Some("cross-site")));
        assert!(!same_origin(h, "http", None, None, None));
    }

    #[test]
    fn sign_in_failures_are_throttled_per_address_per_minute() {
        let t = Throttle::new(2);
        let ip = Some("10.0.0.1".parse().unwrap());
        t.failed(ip, 0);
        assert!(t.allows(ip, 1));
        t.failed(ip, 1);
        assert!(!t.allows(ip, 2));
        assert!(t.allows(Some("10.0.0.2".parse().unwrap()), 2), "another address");
        assert!(t.allows(ip, 60_000), "a minute later");
    }
}
