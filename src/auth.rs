//! Who may post to a source: per-source authentication (`[sources.<name>.auth]`), checked on the raw request
//! before the body is parsed. Plain functions over header values and bytes; no HTTP types.
//!
//! Modes: `none`; `basic` (HTTP Basic user and password); `bearer` (`Authorization: Bearer <secret>`); `header`
//! (a shared secret in a header of your choice: what CleverTap's webhook settings can send); `hmac_userpilot`
//! (`X-Signature: t=<unix seconds>,v1=<hex>` = HMAC over `body + "." + t`, within a tolerance window against
//! replay); `hmac_sha1_hex` (Customer.io: `X-Signature` = hex HMAC-SHA1 of the body).
//!
//! Comparisons are constant-time: tokens are compared as SHA-256 digests with `subtle` (so neither content nor
//! length shows in timing), signatures with the `hmac` crate's constant-time `verify_slice`. No message ever
//! holds a secret or what the client sent in its place.

use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How a source authenticates its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    None,
    Basic,
    Bearer,
    Header,
    HmacUserpilot,
    HmacSha1Hex,
}

/// The hash of a Userpilot signature (Userpilot does not document it; SHA-256 is the common choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    Sha1,
    #[default]
    Sha256,
    Sha512,
}

impl HashAlg {
    fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "HMAC-SHA1",
            HashAlg::Sha256 => "HMAC-SHA256",
            HashAlg::Sha512 => "HMAC-SHA512",
        }
    }
}

/// `[sources.<name>.auth]` as configured. Secrets are `SecretString`: redacted in Debug, never logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// `basic`: the user name.
    pub user: String,
    /// `basic`: the password.
    pub password: SecretString,
    /// `bearer`: the token; `header`: the header's value; `hmac_*`: the signing secret. Surrounding whitespace is
    /// ignored, as it is in what a client presents.
    pub secret: SecretString,
    /// For rotation: a second secret accepted as well as `secret` (empty: none).
    #[serde(default)]
    pub previous_secret: SecretString,
    /// `basic`, for rotation: a second password accepted for `user` (empty: none).
    #[serde(default)]
    pub previous_password: SecretString,
    /// `header`: the header holding the secret (empty: `X-Relay-Secret`); `hmac_*`: the header holding the
    /// signature (empty: `X-Signature`).
    pub header: String,
    /// `hmac_userpilot`: sha256 (default), sha1 or sha512.
    pub hash: HashAlg,
    /// `hmac_userpilot`: how far the signed timestamp may be from the relay's clock, in seconds.
    pub tolerance_secs: u64,
    /// Credentials that choose an environment, by environment name (`[environments.<name>]`): in the mode's own
    /// form (bearer token, header value, signing secret; for `basic`, the password of `user`). A request passing
    /// with `secret` (or `previous_secret`) goes to the default environment.
    #[serde(default)]
    pub environments: std::collections::BTreeMap<String, SecretString>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            user: String::new(),
            password: SecretString::default(),
            secret: SecretString::default(),
            previous_secret: SecretString::default(),
            previous_password: SecretString::default(),
            header: String::new(),
            hash: HashAlg::Sha256,
            tolerance_secs: 300,
            environments: Default::default(),
        }
    }
}

pub const DEFAULT_SECRET_HEADER: &str = "X-Relay-Secret";
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Signature";

/// A request that failed authentication. Answered with 401 `unauthorized`; `field` names the header at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {header} header: this source requires {expected}")]
    Missing { header: String, expected: String },
    #[error("{header} header is not {expected}")]
    Malformed { header: String, expected: String },
    #[error("wrong {what} in the {header} header")]
    Wrong { header: String, what: &'static str },
    #[error(
        "{header} timestamp t={t} is {age} seconds from the relay's clock; the tolerance is {tolerance} seconds \
         (replayed or delayed request, or a clock out of sync)"
    )]
    Stale { header: String, t: i64, age: i64, tolerance: u64 },
    #[error("{header} does not match the body ({algorithm} of {signed} with the configured secret)")]
    BadSignature { header: String, algorithm: &'static str, signed: &'static str },
}

impl AuthError {
    pub fn header(&self) -> &str {
        match self {
            AuthError::Missing { header, .. }
            | AuthError::Malformed { header, .. }
            | AuthError::Wrong { header, .. }
            | AuthError::Stale { header, .. }
            | AuthError::BadSignature { header, .. } => header,
        }
    }
}

/// A configuration that cannot work (a mode without its secret, say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sources.{source_name}.auth: {message}")]
pub struct AuthConfigError {
    pub source_name: String,
    pub message: String,
}

/// Looks a request header up by name (case-insensitive, as HTTP headers are).
pub type Headers<'r, 'h> = &'r dyn Fn(&str) -> Option<&'h [u8]>;

/// One source's check, built once from its settings: the current secret's, then the previous one's (rotation).
#[derive(Clone)]
pub struct Verifier {
    check: Check,
    previous: Option<Check>,
    /// Credentials that choose an environment, by its name.
    environments: Vec<(String, Check)>,
}

#[derive(Clone)]
enum Check {
    None,
    /// SHA-256 of `user:password`, as the Basic credentials must decode to.
    Basic {
        digest: [u8; 32],
    },
    Bearer {
        digest: [u8; 32],
    },
    Header {
        name: String,
        digest: [u8; 32],
    },
    Userpilot {
        header: String,
        key: SecretString,
        hash: HashAlg,
        tolerance: u64,
    },
    Sha1Hex {
        header: String,
        key: SecretString,
    },
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("mode", &self.mode()).finish_non_exhaustive()
    }
}

/// What a secret is kept as once loaded: its SHA-256, compared in constant time by the `verify_*` functions.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of a presented value and an expected digest; lengths do not show either.
fn matches(presented: &[u8], expected: &[u8; 32]) -> bool {
    digest(presented).ct_eq(expected).into()
}

impl Verifier {
    pub fn none() -> Self {
        Self { check: Check::None, previous: None, environments: Vec::new() }
    }

    /// Builds the check for `source_name` from its settings; refuses a mode whose secret is missing. With a
    /// `previous_secret` (or `previous_password`), requests signed or authenticated with either are accepted.
    pub fn from_settings(source_name: &str, s: &AuthSettings) -> Result<Self, AuthConfigError> {
        let check = Self::check_from(source_name, s, s.secret.expose_secret(), &s.password)?;
        let prev_secret = s.previous_secret.expose_secret().trim();
        let prev_password = s.previous_password.expose_secret();
        let previous = match s.mode {
            AuthMode::Basic if !prev_password.is_empty() => {
                Some(Self::check_from(source_name, s, "", &s.previous_password)?)
            }
            AuthMode::Bearer | AuthMode::Header | AuthMode::HmacUserpilot | AuthMode::HmacSha1Hex
                if !prev_secret.is_empty() =>
            {
                Some(Self::check_from(source_name, s, prev_secret, &s.password)?)
            }
            _ => None,
        };
        if s.mode == AuthMode::None && !s.environments.is_empty() {
            return Err(AuthConfigError {
                source_name: source_name.to_owned(),
                message: "environments need a mode with a credential (mode \"none\" has none)".into(),
            });
        }
        let mut environments = Vec::new();
        for (env, credential) in &s.environments {
            let c = credential.expose_secret().trim();
            let c = match s.mode {
                AuthMode::Basic => Self::check_from(source_name, s, "", &SecretString::from(c.to_owned()))?,
                _ => Self::check_from(source_name, s, c, &s.password)?,
            };
            // `default` names the default environment, stored as "" (as write keys do).
            let env = if env == crate::settings::DEFAULT_ENVIRONMENT_KEY { String::new() } else { env.clone() };
            environments.push((env, c));
        }
        Ok(Self { check, previous, environments })
    }

    fn check_from(
        source_name: &str,
        s: &AuthSettings,
        secret: &str,
        password: &SecretString,
    ) -> Result<Check, AuthConfigError> {
        let fail = |message: String| Err(AuthConfigError { source_name: source_name.to_owned(), message });
        let secret = secret.trim();
        let key = || SecretString::from(secret.to_owned());
        let needs_secret =
            matches!(s.mode, AuthMode::Bearer | AuthMode::Header | AuthMode::HmacUserpilot | AuthMode::HmacSha1Hex);
        if needs_secret && secret.trim().is_empty() {
            return fail(format!(
                "mode {:?} needs a secret (sources.{source_name}.auth.secret, or the environment variable \
                 HEAP_RELAY__SOURCES__{}__AUTH__SECRET)",
                mode_name(s.mode),
                source_name.to_ascii_uppercase()
            ));
        }
        let header = |default: &str| {
            let h = s.header.trim();
            if h.is_empty() { default.to_owned() } else { h.to_owned() }
        };
        let check = match s.mode {
            AuthMode::None => Check::None,
            AuthMode::Basic => {
                if s.user.is_empty() || password.expose_secret().is_empty() {
                    return fail("mode \"basic\" needs user and password".into());
                }
                if s.user.contains(':') {
                    return fail("a Basic auth user name cannot contain ':'".into());
                }
                Check::Basic { digest: digest(format!("{}:{}", s.user, password.expose_secret()).as_bytes()) }
            }
            AuthMode::Bearer => Check::Bearer { digest: digest(secret.as_bytes()) },
            AuthMode::Header => {
                let name = header(DEFAULT_SECRET_HEADER);
                if !valid_header_name(&name) {
                    return fail(format!("header {name:?} is not a valid HTTP header name"));
                }
                if name.eq_ignore_ascii_case("authorization") {
                    return fail("use mode \"bearer\" or \"basic\" for the Authorization header".into());
                }
                Check::Header { name, digest: digest(secret.as_bytes()) }
            }
            AuthMode::HmacUserpilot => {
                if s.tolerance_secs == 0 {
                    return fail("tolerance_secs must be above 0".into());
                }
                Check::Userpilot {
                    header: header(DEFAULT_SIGNATURE_HEADER),
                    key: key(),
                    hash: s.hash,
                    tolerance: s.tolerance_secs,
                }
            }
            AuthMode::HmacSha1Hex => Check::Sha1Hex { header: header(DEFAULT_SIGNATURE_HEADER), key: key() },
        };
        Ok(check)
    }

    pub fn mode(&self) -> AuthMode {
        match self.check {
            Check::None => AuthMode::None,
            Check::Basic { .. } => AuthMode::Basic,
            Check::Bearer { .. } => AuthMode::Bearer,
            Check::Header { .. } => AuthMode::Header,
            Check::Userpilot { .. } => AuthMode::HmacUserpilot,
            Check::Sha1Hex { .. } => AuthMode::HmacSha1Hex,
        }
    }

    /// Checks what can be checked from the headers alone, before the body is read: credentials, and for
    /// signatures that the header is there, well formed and (Userpilot) fresh. Returns the environment whose
    /// credential passed (`None`: the source's own `secret` or `previous_secret`, the default environment; for
    /// signature modes the environment is known only [`Verifier::after_body`]).
    pub fn before_body(&self, headers: Headers<'_, '_>, now_secs: i64) -> Result<Option<String>, AuthError> {
        self.first_passing(|check| check.before_body(headers, now_secs))
    }

    /// Checks a signature over the raw body (after `before_body`); returns the environment whose signing secret
    /// matched, as `before_body` does.
    pub fn after_body(
        &self,
        headers: Headers<'_, '_>,
        body: &[u8],
        now_secs: i64,
    ) -> Result<Option<String>, AuthError> {
        self.first_passing(|check| check.after_body(headers, body, now_secs))
    }

    /// The one way a request's credential is tried: `run` against every credential this source accepts (the
    /// current secret, the previous one, each environment's), in that order; the first that passes names the
    /// environment. Every one is run whatever passed (no return at the first match), and each comparison is
    /// constant-time itself. On failure, the current secret's error is reported.
    fn first_passing(&self, run: impl Fn(&Check) -> Result<(), AuthError>) -> Result<Option<String>, AuthError> {
        let current = run(&self.check);
        let previous = self.previous.iter().map(|c| (c, None));
        let listed = self.environments.iter().map(|(env, c)| (c, Some(env)));
        let mut passed = current.is_ok().then_some(None);
        for (check, env) in previous.chain(listed) {
            if run(check).is_ok() && passed.is_none() {
                passed = Some(env);
            }
        }
        match passed {
            Some(env) => Ok(env.cloned()),
            None => current.map(|()| None),
        }
    }
}

impl Check {
    fn before_body(&self, headers: Headers<'_, '_>, now_secs: i64) -> Result<(), AuthError> {
        match self {
            Check::None => Ok(()),
            Check::Basic { digest } => verify_basic(headers("Authorization"), digest),
            Check::Bearer { digest } => verify_bearer(headers("Authorization"), digest),
            Check::Header { name, digest } => verify_shared_header(name, headers(name), digest),
            Check::Userpilot { header, tolerance, .. } => {
                let sig = parse_userpilot_signature(header, headers(header))?;
                check_fresh(header, &sig, now_secs, *tolerance)
            }
            Check::Sha1Hex { header, .. } => parse_hex_signature(header, headers(header)).map(|_| ()),
        }
    }

    fn after_body(&self, headers: Headers<'_, '_>, body: &[u8], now_secs: i64) -> Result<(), AuthError> {
        match self {
            Check::Userpilot { header, key, hash, tolerance } => {
                let sig = parse_userpilot_signature(header, headers(header))?;
                check_fresh(header, &sig, now_secs, *tolerance)?;
                verify_userpilot(header, &sig, key.expose_secret().as_bytes(), *hash, body)
            }
            Check::Sha1Hex { header, key } => {
                let sig = parse_hex_signature(header, headers(header))?;
                verify_sha1_hex(header, &sig, key.expose_secret().as_bytes(), body)
            }
            _ => Ok(()),
        }
    }
}

fn mode_name(m: AuthMode) -> &'static str {
    match m {
        AuthMode::None => "none",
        AuthMode::Basic => "basic",
        AuthMode::Bearer => "bearer",
        AuthMode::Header => "header",
        AuthMode::HmacUserpilot => "hmac_userpilot",
        AuthMode::HmacSha1Hex => "hmac_sha1_hex",
    }
}

pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Segment write keys, each naming its environment (`""`: the default one). Kept as SHA-256 digests; a lookup
/// compares against every key in constant time, so neither which key matched nor how much of it shows in timing.
#[derive(Clone, Default)]
pub struct WriteKeys {
    keys: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for WriteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteKeys").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl WriteKeys {
    /// `by_environment`: environment name → its keys; `default_name` maps to the default environment `""`.
    pub fn new<'a>(
        by_environment: impl IntoIterator<Item = (&'a String, &'a Vec<SecretString>)>,
        default_name: &str,
    ) -> Self {
        let mut keys = Vec::new();
        for (env, list) in by_environment {
            let env = if env == default_name { String::new() } else { env.clone() };
            for k in list {
                keys.push((digest(k.expose_secret().trim().as_bytes()), env.clone()));
            }
        }
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The environment of a presented write key, or None when it is not one of ours.
    pub fn environment_of(&self, presented: &[u8]) -> Option<&str> {
        let d = digest(presented.trim_ascii());
        let mut found = None;
        for (k, env) in &self.keys {
            if bool::from(d.ct_eq(k)) {
                found = Some(env.as_str());
            }
        }
        found
    }
}

/// What a request presents as a write key in `Authorization: Basic base64(writeKey:)`: the user part (the
/// password is ignored; Segment's libraries send it empty). None when the header is absent or not Basic.
pub fn basic_user(authorization: Option<&[u8]>) -> Option<Vec<u8>> {
    let value = std::str::from_utf8(authorization?).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let user = match decoded.iter().position(|b| *b == b':') {
        Some(i) => decoded[..i].to_vec(),
        None => decoded,
    };
    Some(user)
}

/// `Authorization: Basic base64(user:password)`.
pub fn verify_basic(authorization: Option<&[u8]>, expected: &[u8; 32]) -> Result<(), AuthError> {
    let header = || "Authorization".to_owned();
    let expected_shape = "HTTP Basic credentials (Authorization: Basic base64(user:password))";
    let value =
        authorization.ok_or_else(|| AuthError::Missing { header: header(), expected: expected_shape.into() })?;
    let malformed = || AuthError::Malformed { header: header(), expected: expected_shape.into() };
    let value = std::str::from_utf8(value).map_err(|_| malformed())?.trim();
    let (scheme, encoded) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed());
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    if !decoded.contains(&b':') {
        return Err(malformed());
    }
    if matches(&decoded, expected) {
        Ok(())
    } else {
        Err(AuthError::Wrong { header: header(), what: "user or password" })
    }
}

/// `Authorization: Bearer <token>`.
pub fn verify_bearer(authorization: Option<&[u8]>, expected: &[u8; 32]) -> Result<(), AuthError> {
    let header = || "Authorization".to_owned();
    let shape = "a bearer token (Authorization: Bearer <token>)";
    let value = authorization.ok_or_else(|| AuthError::Missing { header: header(), expected: shape.into() })?;
    let malformed = || AuthError::Malformed { header: header(), expected: shape.into() };
    let value = std::str::from_utf8(value).map_err(|_| malformed())?.trim();
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(malformed());
    }
    if matches(token.trim().as_bytes(), expected) {
        Ok(())
    } else {
        Err(AuthError::Wrong { header: header(), what: "token" })
    }
}

/// A shared secret as the whole value of header `name`.
pub fn verify_shared_header(name: &str, value: Option<&[u8]>, expected: &[u8; 32]) -> Result<(), AuthError> {
    let value = value.ok_or_else(|| AuthError::Missing {
        header: name.to_owned(),
        expected: format!("the shared secret in the {name} header"),
    })?;
    if matches(value.trim_ascii(), expected) {
        Ok(())
    } else {
        Err(AuthError::Wrong { header: name.to_owned(), what: "secret" })
    }
}

/// A parsed `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserpilotSignature {
    /// The timestamp exactly as sent: it is signed as text.
    pub t_text: String,
    pub t: i64,
    pub v1: Vec<Vec<u8>>,
}

pub fn parse_userpilot_signature(header: &str, value: Option<&[u8]>) -> Result<UserpilotSignature, AuthError> {
    let shape = "t=<unix seconds>,v1=<hex signature>";
    let value = value.ok_or_else(|| AuthError::Missing {
        header: header.to_owned(),
        expected: format!("a Userpilot signature ({header}: {shape})"),
    })?;
    let malformed = || AuthError::Malformed { header: header.to_owned(), expected: shape.to_owned() };
    let value = std::str::from_utf8(value).map_err(|_| malformed())?;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in value.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(malformed());
        };
        match k.trim() {
            "t" if t.is_none() => t = Some(v.trim().to_owned()),
            "v1" => v1.push(hex::decode(v.trim()).map_err(|_| malformed())?),
            _ => {} // other schemes (v0, ...) are ignored, as Stripe-style signatures allow
        }
    }
    let t_text = t.ok_or_else(malformed)?;
    let t_num = t_text.parse::<i64>().map_err(|_| malformed())?;
    if v1.is_empty() || v1.len() > 8 {
        return Err(malformed());
    }
    Ok(UserpilotSignature { t_text, t: t_num, v1 })
}

fn check_fresh(header: &str, sig: &UserpilotSignature, now_secs: i64, tolerance: u64) -> Result<(), AuthError> {
    let age = now_secs.saturating_sub(sig.t);
    if age.unsigned_abs() > tolerance {
        return Err(AuthError::Stale { header: header.to_owned(), t: sig.t, age, tolerance });
    }
    Ok(())
}

/// HMAC(`secret`, body + "." + t) with `hash` equals one of the `v1` signatures.
pub fn verify_userpilot(
    header: &str,
    sig: &UserpilotSignature,
    secret: &[u8],
    hash: HashAlg,
    body: &[u8],
) -> Result<(), AuthError> {
    let ok = sig.v1.iter().any(|v| match hash {
        HashAlg::Sha1 => hmac_verify::<Hmac<sha1::Sha1>>(secret, &[body, b".", sig.t_text.as_bytes()], v),
        HashAlg::Sha256 => hmac_verify::<Hmac<Sha256>>(secret, &[body, b".", sig.t_text.as_bytes()], v),
        HashAlg::Sha512 => hmac_verify::<Hmac<sha2::Sha512>>(secret, &[body, b".", sig.t_text.as_bytes()], v),
    });
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadSignature { header: header.to_owned(), algorithm: hash.name(), signed: "body + \".\" + t" })
    }
}

pub fn parse_hex_signature(header: &str, value: Option<&[u8]>) -> Result<Vec<u8>, AuthError> {
    let value = value.ok_or_else(|| AuthError::Missing {
        header: header.to_owned(),
        expected: format!("a signature ({header}: hex HMAC-SHA1 of the body)"),
    })?;
    let malformed = || AuthError::Malformed { header: header.to_owned(), expected: "a hex HMAC-SHA1 signature".into() };
    let text = std::str::from_utf8(value).map_err(|_| malformed())?.trim();
    let text = text.strip_prefix("sha1=").unwrap_or(text);
    hex::decode(text).map_err(|_| malformed())
}

/// Customer.io: hex HMAC-SHA1 of the raw body.
pub fn verify_sha1_hex(header: &str, sig: &[u8], secret: &[u8], body: &[u8]) -> Result<(), AuthError> {
    if hmac_verify::<Hmac<sha1::Sha1>>(secret, &[body], sig) {
        Ok(())
    } else {
        Err(AuthError::BadSignature { header: header.to_owned(), algorithm: "HMAC-SHA1", signed: "the body" })
    }
}

fn hmac_verify<M: Mac + hmac::digest::KeyInit>(secret: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(secret) else {
        return false;
    };
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"event":"flow_started"}"#;
    // python3: hmac.new(b'whsec_test', BODY + b'.' + b'1700000000', hashlib.sha256).hexdigest()
    const USERPILOT_SIG: &str = "f3ecd04d76bf6eb2ea2c7ed5570b9697a36b8ad2aec346c81780fe03d5333011";
    // python3: hmac.new(b'cio-secret', b'{"type":"track"}', hashlib.sha1).hexdigest()
    const CIO_SIG: &str = "e6bdb163fee07753ff5fff61c93e19820e9c5f1e";

    fn settings(mode: AuthMode, secret: &str) -> AuthSettings {
        AuthSettings { mode, secret: secret.into(), ..AuthSettings::default() }
    }

    fn with<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> + 'a {
        move |name: &str| pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes())
    }

    fn check(v: &Verifier, pairs: &[(&str, &str)], body: &[u8], now: i64) -> Result<(), AuthError> {
        let h = with(pairs);
        v.before_body(&h, now)?;
        v.after_body(&h, body, now).map(|_| ())
    }

    #[test]
    fn userpilot_signature_over_body_dot_t_is_accepted() {
        let v = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "whsec_test")).unwrap();
        let header = format!("t=1700000000,v1={USERPILOT_SIG}");
        assert_eq!(check(&v, &[("X-Signature", &header)], BODY, 1_700_000_100), Ok(()));
    }

    #[test]
    fn userpilot_signature_older_than_the_tolerance_is_rejected() {
        let v = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "whsec_test")).unwrap();
        let header = format!("t=1700000000,v1={USERPILOT_SIG}");
        let err = check(&v, &[("X-Signature", &header)], BODY, 1_700_000_301).unwrap_err();
        assert!(matches!(err, AuthError::Stale { age: 301, tolerance: 300, .. }), "{err}");
        let err = check(&v, &[("X-Signature", &header)], BODY, 1_699_999_000).unwrap_err();
        assert!(matches!(err, AuthError::Stale { .. }), "a timestamp from the future is refused too: {err}");
    }

    #[test]
    fn userpilot_signature_of_another_body_or_secret_or_hash_is_rejected() {
        let header = format!("t=1700000000,v1={USERPILOT_SIG}");
        let now = 1_700_000_000;
        let v = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "whsec_test")).unwrap();
        let err = check(&v, &[("X-Signature", &header)], b"{\"event\":\"flow_completed\"}", now).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { algorithm: "HMAC-SHA256", .. }), "{err}");
        let other = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "whsec_other")).unwrap();
        assert!(check(&other, &[("X-Signature", &header)], BODY, now).is_err());
        let sha1 = AuthSettings { hash: HashAlg::Sha1, ..settings(AuthMode::HmacUserpilot, "whsec_test") };
        let sha1 = Verifier::from_settings("userpilot", &sha1).unwrap();
        assert!(check(&sha1, &[("X-Signature", &header)], BODY, now).is_err());
        // The timestamp is signed: changing it breaks the signature.
        let moved = format!("t=1700000001,v1={USERPILOT_SIG}");
        assert!(matches!(check(&v, &[("X-Signature", &moved)], BODY, now), Err(AuthError::BadSignature { .. })));
    }

    #[test]
    fn userpilot_signature_headers_that_are_missing_or_malformed_are_named() {
        let v = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "whsec_test")).unwrap();
        assert!(matches!(check(&v, &[], BODY, 0), Err(AuthError::Missing { .. })));
        for bad in ["", "v1=abcd", "t=1700000000", "t=soon,v1=abcd", "t=1700000000,v1=zz", "garbage"] {
            let err = check(&v, &[("X-Signature", bad)], BODY, 1_700_000_000).unwrap_err();
            assert!(matches!(err, AuthError::Malformed { .. }), "{bad:?}: {err}");
            assert_eq!(err.header(), "X-Signature");
        }
    }

    #[test]
    fn customer_io_hex_hmac_sha1_of_the_body_is_checked() {
        let v = Verifier::from_settings("segment", &settings(AuthMode::HmacSha1Hex, "cio-secret")).unwrap();
        let body = br#"{"type":"track"}"#;
        assert_eq!(check(&v, &[("X-Signature", CIO_SIG)], body, 0), Ok(()));
        assert!(matches!(check(&v, &[("X-Signature", CIO_SIG)], b"{}", 0), Err(AuthError::BadSignature { .. })));
        assert!(matches!(check(&v, &[("X-Signature", "not hex")], body, 0), Err(AuthError::Malformed { .. })));
        assert!(matches!(check(&v, &[], body, 0), Err(AuthError::Missing { .. })));
    }

    #[test]
    fn basic_auth_accepts_only_the_configured_user_and_password() {
        let s = AuthSettings { mode: AuthMode::Basic, user: "ct".into(), password: "pw".into(), ..Default::default() };
        let v = Verifier::from_settings("clevertap", &s).unwrap();
        let good = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ct:pw"));
        assert_eq!(check(&v, &[("Authorization", &good)], b"", 0), Ok(()));
        let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ct:px"));
        assert!(matches!(check(&v, &[("Authorization", &wrong)], b"", 0), Err(AuthError::Wrong { .. })));
        assert!(matches!(check(&v, &[("Authorization", "Basic !!!")], b"", 0), Err(AuthError::Malformed { .. })));
        assert!(matches!(check(&v, &[("Authorization", "Bearer pw")], b"", 0), Err(AuthError::Malformed { .. })));
        assert!(matches!(check(&v, &[], b"", 0), Err(AuthError::Missing { .. })));
    }

    #[test]
    fn bearer_and_shared_header_secrets_compare_exactly() {
        let v = Verifier::from_settings("heap", &settings(AuthMode::Bearer, "tok-123")).unwrap();
        assert_eq!(check(&v, &[("Authorization", "Bearer tok-123")], b"", 0), Ok(()));
        assert!(check(&v, &[("Authorization", "Bearer tok-1234")], b"", 0).is_err());
        assert!(check(&v, &[("Authorization", "Bearer tok-12")], b"", 0).is_err());
        let s = AuthSettings { header: "X-CleverTap-Secret".into(), ..settings(AuthMode::Header, "sh-1") };
        let v = Verifier::from_settings("clevertap", &s).unwrap();
        assert_eq!(check(&v, &[("x-clevertap-secret", "sh-1")], b"", 0), Ok(()));
        let err = check(&v, &[("X-CleverTap-Secret", "sh-2")], b"", 0).unwrap_err();
        assert_eq!(err.to_string(), "wrong secret in the X-CleverTap-Secret header");
        let err = check(&v, &[], b"", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing X-CleverTap-Secret header: this source requires the shared secret in the X-CleverTap-Secret header"
        );
    }

    #[test]
    fn a_mode_without_its_secret_is_a_configuration_error_and_secrets_never_show_in_debug() {
        let err = Verifier::from_settings("userpilot", &settings(AuthMode::HmacUserpilot, "  ")).unwrap_err();
        assert!(err.to_string().contains("HEAP_RELAY__SOURCES__USERPILOT__AUTH__SECRET"), "{err}");
        let basic = AuthSettings { mode: AuthMode::Basic, user: "u".into(), ..Default::default() };
        assert!(Verifier::from_settings("clevertap", &basic).is_err());
        let s = settings(AuthMode::Bearer, "very-secret-value");
        assert!(!format!("{s:?}").contains("very-secret-value"));
        let v = Verifier::from_settings("heap", &s).unwrap();
        assert!(!format!("{v:?}").contains("very-secret-value"));
    }

    #[test]
    fn a_credential_listed_for_an_environment_names_it_and_the_source_secret_names_none() {
        let mut s = settings(AuthMode::Bearer, "tok-default");
        s.environments.insert("prod".into(), "tok-prod".into());
        let v = Verifier::from_settings("heap", &s).unwrap();
        let env = |token: &str| {
            let value = format!("Bearer {token}");
            let pairs = [("Authorization", value.as_str())];
            v.before_body(&with(&pairs), 0)
        };
        assert_eq!(env("tok-default"), Ok(None));
        assert_eq!(env("tok-prod"), Ok(Some("prod".into())));
        assert!(matches!(env("tok-other"), Err(AuthError::Wrong { .. })));

        // `default` names the default environment, stored as "", the same as a write key listed under it.
        let mut s = settings(AuthMode::Bearer, "tok-main");
        s.environments.insert("default".into(), "tok-old".into());
        let v = Verifier::from_settings("heap", &s).unwrap();
        let pairs = [("Authorization", "Bearer tok-old")];
        assert_eq!(v.before_body(&with(&pairs), 0), Ok(Some(String::new())));

        let mut s = settings(AuthMode::HmacSha1Hex, "cio-other");
        s.environments.insert("dev".into(), "cio-secret".into());
        let v = Verifier::from_settings("segment", &s).unwrap();
        let h = with(&[("X-Signature", CIO_SIG)]);
        assert_eq!(v.before_body(&h, 0), Ok(None), "a signature's environment is known after the body");
        assert_eq!(v.after_body(&h, br#"{"type":"track"}"#, 0), Ok(Some("dev".into())));
        assert!(v.after_body(&h, b"{}", 0).is_err());
        assert!(!format!("{v:?}").contains("cio-secret"));
    }

    #[test]
    fn in_every_mode_the_current_and_previous_secrets_both_pass_and_a_wrong_one_reports_the_current_check() {
        let b64 = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        let rotating = |mode, secret: &str, previous: &str| AuthSettings {
            previous_secret: previous.into(),
            ..settings(mode, secret)
        };
        let basic = AuthSettings {
            mode: AuthMode::Basic,
            user: "ct".into(),
            password: "pw-new".into(),
            previous_password: "pw-old".into(),
            ..Default::default()
        };
        let up = |secret: &str| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(BODY);
            mac.update(b".1700000000");
            format!("t=1700000000,v1={}", hex::encode(mac.finalize().into_bytes()))
        };
        let cio = |secret: &str| {
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(BODY);
            hex::encode(mac.finalize().into_bytes())
        };
        let cases: Vec<(AuthSettings, &str, [String; 3])> = vec![
            (
                rotating(AuthMode::Bearer, "tok-new", "tok-old"),
                "Authorization",
                ["Bearer tok-new".into(), "Bearer tok-old".into(), "Bearer tok-other".into()],
            ),
            (
                rotating(AuthMode::Header, "sh-new", "sh-old"),
                "X-Relay-Secret",
                ["sh-new".into(), "sh-old".into(), "sh-other".into()],
            ),
            (basic, "Authorization", [b64("ct:pw-new"), b64("ct:pw-old"), b64("ct:pw-other")]),
            (
                rotating(AuthMode::HmacUserpilot, "up-new", "up-old"),
                "X-Signature",
                [up("up-new"), up("up-old"), up("up-other")],
            ),
            (
                rotating(AuthMode::HmacSha1Hex, "cio-new", "cio-old"),
                "X-Signature",
                [cio("cio-new"), cio("cio-old"), cio("cio-other")],
            ),
        ];
        for (s, header, [current, previous, wrong]) in cases {
            let v = Verifier::from_settings("src", &s).unwrap();
            let mode = s.mode;
            let run = |value: &str| {
                let pairs = [(header, value)];
                let h = with(&pairs);
                v.before_body(&h, 1_700_000_000)?;
                v.after_body(&h, BODY, 1_700_000_000)
            };
            assert_eq!(run(&current), Ok(None), "{mode:?}: the current secret");
            assert_eq!(run(&previous), Ok(None), "{mode:?}: the previous secret, while rotating");
            let err = run(&wrong).unwrap_err();
            assert!(matches!(err, AuthError::Wrong { .. } | AuthError::BadSignature { .. }), "{mode:?}: {err}");
            assert_eq!(err.header(), header, "{mode:?}");
            assert!(!format!("{v:?}").contains("-old"), "{mode:?}: no secret in Debug");
        }
    }

    #[test]
    fn write_keys_map_to_their_environment_and_a_basic_user_is_read_whatever_the_password() {
        let prod: Vec<SecretString> = vec!["wk-prod".into()];
        let def: Vec<SecretString> = vec!["wk-default".into()];
        let by_env = [("prod".to_owned(), prod), ("default".to_owned(), def)];
        let keys = WriteKeys::new(by_env.iter().map(|(k, v)| (k, v)), "default");
        assert_eq!(keys.environment_of(b"wk-prod"), Some("prod"));
        assert_eq!(keys.environment_of(b"wk-default"), Some(""));
        assert_eq!(keys.environment_of(b"wk-nope"), None);
        let b64 = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert_eq!(basic_user(Some(b64("wk-prod:").as_bytes())), Some(b"wk-prod".to_vec()));
        assert_eq!(basic_user(Some(b64("wk-prod").as_bytes())), Some(b"wk-prod".to_vec()));
        assert_eq!(basic_user(Some(b"Bearer wk-prod")), None);
        assert!(!format!("{keys:?}").contains("wk-prod"));
    }
}
