//! Settings: the embedded defaults (`config.toml` as built), then the config file, then `HEAP_RELAY__SECTION__KEY`
//! environment variables. `load` takes the environment as a map so tests never touch the process environment.

use crate::auth::{AuthMode, AuthSettings, Verifier};
use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The committed `config.toml`, the lowest layer.
pub const DEFAULT_CONFIG: &str = include_str!("../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Unreadable { path: String, source: std::io::Error },
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub heap: HeapSettings,
    pub templates: TemplateSettings,
    pub store: StoreSettings,
    pub delivery: DeliverySettings,
    pub limits: LimitSettings,
    pub admin: AdminSettings,
    pub console: ConsoleSettings,
    pub log: LogSettings,
    pub sources: SourcesSettings,
    pub identity: IdentitySettings,
    /// Named environments (`dev`, `prod`, ...), each with its own Heap app_id, chosen per request by the
    /// credential it carries or by a `/env/{name}/` path prefix. Empty: one default environment.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentSettings>,
}

/// `[environments.<name>]`: one Heap project (app_id) that requests can be routed to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSettings {
    /// The Heap app_id every event of this environment goes to (templates naming another environment's app_id
    /// have their items refused).
    pub app_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub max_body_bytes: usize,
    pub workers: usize,
    pub shutdown_grace_secs: u64,
    /// Most open connections across all HTTP workers; more wait in the kernel's backlog. 0: follow the process's
    /// open-file limit (see `connection_cap`).
    pub max_connections: usize,
    /// Decoded bytes of all request bodies in flight together; past it 503 `overloaded`.
    pub max_inflight_body_bytes: usize,
    /// Opt-in to serve a source without authentication on a non-loopback address (refused at start otherwise).
    pub allow_unauthenticated_public_bind: bool,
    /// Sites (`https://app.example.com`) whose browsers may post to the ingest routes; any other `Origin` is 403.
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client; others' is ignored.
    #[serde(deserialize_with = "string_or_list")]
    pub trusted_proxies: Vec<String>,
    /// A second address serving only /healthz, /readyz and /metrics, with its own connections; empty: none.
    pub health_bind: String,
    /// A client must send its request line and headers within this many seconds (408 and close otherwise).
    pub header_read_timeout_secs: u64,
    /// A client must send its whole body within this many seconds of the handler starting to read it (408).
    pub body_read_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapSettings {
    pub base_url: String,
    pub app_id: String,
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_app_ids: Vec<String>,
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSettings {
    pub dir: PathBuf,
    pub reload_interval_secs: u64,
    pub max_leaf_bytes: usize,
    /// Largest template file accepted at load, in bytes.
    pub max_template_bytes: u64,
    /// Most iterations the range loops of one leaf may run (`(1..n)` ranges must be integer literals).
    pub max_loop_iterations: u64,
    /// Most milliseconds rendering one item may take.
    pub render_timeout_ms: u64,
    /// Most bytes one item's rendered Heap calls may hold, as JSON.
    pub max_event_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub path: PathBuf,
    /// `postgres://…` selects the shared PostgreSQL store (several instances, one queue); empty keeps SQLite at
    /// `path`. Secret: it may hold a password.
    pub url: SecretString,
    /// PostgreSQL connections per instance for claims, records and reads (the writer and LISTEN have their own).
    pub pool_size: usize,
    pub max_bytes: u64,
    pub retention_hours: u64,
    pub retry_after_secs: u64,
    /// A request body (CleverTap, Userpilot) or message id (Segment `messageId`, Heap `idempotency_key`) seen again
    /// within this many seconds is a sender's retry: answered with the first event ids, not stored again. 0: off.
    pub dedupe_window_secs: u64,
    /// Refused items (kept, with their body, for a repair by re-render) are deleted after this many hours ...
    pub refused_retention_hours: u64,
    /// ... or, oldest first, while more than this many are kept (0: no cap).
    pub max_refused_items: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub workers: usize,
    pub max_batch: usize,
    pub linger_ms: u64,
    pub poll_interval_ms: u64,
    pub lease_secs: u64,
    pub max_retry_hours: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_secs: u64,
    pub app_events_per_minute: u32,
    pub identity_events_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_items: usize,
    pub max_properties: usize,
    /// Most characters in one property key after flattening (Heap: fewer than 1024).
    pub max_property_key_chars: usize,
    /// String values longer than this are truncated (Heap: fewer than 1024).
    pub max_property_value_chars: usize,
    /// Most nested arrays and objects in a body (at most 127, serde_json's own limit).
    pub max_json_depth: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Redacted in Debug output; never logged.
    pub token: SecretString,
}

/// The operator console at /console (on when admin.token is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// A second token that signs in to look only (no replay, re-render or pause). Empty: none. Never logged.
    pub readonly_token: SecretString,
    /// How long a console session lasts after sign-in.
    pub session_minutes: u64,
    /// Failed sign-ins allowed per client address per minute; more are refused (429) until the minute passes.
    pub sign_in_attempts_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: String,
    /// At most one log line per source per this many seconds for failed authentication (with a count).
    pub auth_failure_interval_secs: u64,
}

/// Which identities are refused because they would merge unrelated users into one Heap user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// Refused as placeholders (compared ignoring ASCII case).
    #[serde(deserialize_with = "string_or_list")]
    pub placeholders: Vec<String>,
    /// Accept `"0"` and `"-1"` as identities.
    pub allow_zero_and_minus_one: bool,
    /// Refuse an identity equal to what the template renders for a body with no fields (a constant default).
    pub refuse_template_default: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesSettings {
    pub clevertap: SourceSettings,
    pub userpilot: SourceSettings,
    pub segment: SourceSettings,
    pub heap: HeapCompatSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub enabled: bool,
    pub template: String,
    pub app_id: String,
    #[serde(default = "yes")]
    pub allow_anonymous: bool,
    /// Requests per minute this source may send (a token bucket holding one minute's budget); 0: no limit.
    pub requests_per_minute: u32,
    pub auth: AuthSettings,
    /// Segment only: write keys by environment (`default` = the default environment). A request carrying one (HTTP
    /// Basic user, or `writeKey` in the body) is authenticated and routed to that environment. Secrets.
    #[serde(default, deserialize_with = "secret_lists")]
    pub write_keys: BTreeMap<String, Vec<SecretString>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapCompatSettings {
    pub enabled: bool,
    pub requests_per_minute: u32,
    pub auth: AuthSettings,
}

fn yes() -> bool {
    true
}

/// Accepts a TOML list, or a comma-separated string (how a list arrives from the environment).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        Either::Many(v) => v.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
    })
}

/// Each environment's list of secrets: a TOML list, or a comma-separated string (from the environment).
fn secret_lists<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<SecretString>>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "string_or_list")] Vec<String>);
    let raw: BTreeMap<String, Wrap> = BTreeMap::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, Wrap(v))| (k, v.into_iter().map(SecretString::from).collect())).collect())
}

/// Environment names: what a path prefix and a metrics label can hold.
pub fn valid_environment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The environment name a `write_keys` or `auth.environments` entry uses for the default environment.
pub const DEFAULT_ENVIRONMENT_KEY: &str = "default";

/// A configuration error names the key and what was expected, never the value given: it may be a secret.
/// serde and `config` quote values in double quotes (`invalid type: string "hunter2", expected ...`).
fn redact_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("(value not shown)");
            }
            ('"', true) => quoted = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// Where the config file comes from.
#[derive(Debug, Clone)]
pub enum ConfigPath {
    /// Named on the command line: it must be readable.
    Explicit(PathBuf),
    /// `./config.toml` if it is there; the built-in defaults otherwise.
    Default(PathBuf),
}

impl Settings {
    /// Layers the defaults, the file and `env` (variables named `HEAP_RELAY__SECTION__KEY`), then validates.
    pub fn load(path: &ConfigPath, env: HashMap<String, String>) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml));
        let file = match path {
            ConfigPath::Explicit(p) => Some(p),
            ConfigPath::Default(p) if p.exists() => Some(p),
            ConfigPath::Default(_) => None,
        };
        if let Some(p) = file {
            let text = std::fs::read_to_string(p)
                .map_err(|source| SettingsError::Unreadable { path: p.display().to_string(), source })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let env: HashMap<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("HEAP_RELAY__")).collect();
        builder = builder.add_source(
            Environment::with_prefix("HEAP_RELAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(false)
                .source(Some(env)),
        );
        let cfg = builder.build().map_err(|e| SettingsError::Invalid(redact_values(&e.to_string())))?;
        let settings: Settings =
            cfg.try_deserialize().map_err(|e| SettingsError::Invalid(redact_values(&e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The built-in defaults alone (what a fresh checkout runs with).
    pub fn defaults() -> Self {
        Self::load(&ConfigPath::Default(PathBuf::from("/nonexistent/heap-relay.toml")), HashMap::new())
            .expect("the committed config.toml is valid") // a unit test holds this
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if self.server.bind.parse::<SocketAddr>().is_err() {
            return bad(format!("server.bind {:?} is not an address:port such as 127.0.0.1:8080", self.server.bind));
        }
        if self.server.max_body_bytes == 0 {
            return bad("server.max_body_bytes must be above 0".into());
        }
        match reqwest::Url::parse(&self.heap.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                // Not echoed: a base URL may carry credentials.
                return bad("heap.base_url is not an http(s) URL such as https://heapanalytics.com".into());
            }
        }
        for (key, id) in self.configured_app_ids() {
            if let Err(e) = crate::domain::AppId::parse(id) {
                return bad(format!("{key}: {}", e.message));
            }
        }
        for id in &self.heap.allowed_app_ids {
            if crate::domain::AppId::parse(id).is_err() {
                return bad(format!("heap.allowed_app_ids: {id:?} is not a Heap app_id (digits only)"));
            }
        }
        if !self.heap.allowed_app_ids.is_empty() {
            for (key, id) in self.configured_app_ids() {
                if !self.heap.allowed_app_ids.iter().any(|a| a == id) {
                    return bad(format!("{key} = {id} is not in heap.allowed_app_ids"));
                }
            }
        }
        if !(1..=crate::json::SERDE_DEPTH_LIMIT).contains(&self.limits.max_json_depth) {
            return bad(format!(
                "limits.max_json_depth must be 1 to {} (serde_json's own limit)",
                crate::json::SERDE_DEPTH_LIMIT
            ));
        }
        if self.limits.max_property_key_chars == 0 || self.limits.max_property_value_chars == 0 {
            return bad("limits.max_property_key_chars and limits.max_property_value_chars must be above 0".into());
        }
        if self.server.max_inflight_body_bytes < self.server.max_body_bytes {
            return bad("server.max_inflight_body_bytes must be at least server.max_body_bytes".into());
        }
        for p in &self.server.trusted_proxies {
            if crate::client_addr::parse_range(p).is_none() {
                return bad(format!("server.trusted_proxies: {p:?} is not an IP address or CIDR range"));
            }
        }
        for o in &self.server.allowed_origins {
            if crate::routes::origin::normalize(o).is_none() {
                return bad(format!("server.allowed_origins: {o:?} is not an origin such as https://app.example.com"));
            }
        }
        if !self.server.health_bind.trim().is_empty() && self.server.health_bind.parse::<SocketAddr>().is_err() {
            return bad(format!("server.health_bind {:?} is not an address:port", self.server.health_bind));
        }
        for (name, auth) in self.source_auth() {
            Verifier::from_settings(name, auth).map_err(|e| SettingsError::Invalid(e.to_string()))?;
        }
        self.validate_environments()?;
        if let Some(url) = self.store_url() {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return bad("store.url must start with postgres:// (or be empty for SQLite)".into());
            }
            if let Err(e) = crate::store::postgres::tls::connector(url) {
                return bad(e.to_string());
            }
            if self.store.pool_size < 2 {
                return bad("store.pool_size must be at least 2".into());
            }
        }
        if !(1..=1000).contains(&self.delivery.max_batch) {
            return bad("delivery.max_batch must be 1 to 1000 (Heap's bulk limit)".into());
        }
        if self.delivery.workers == 0 {
            return bad("delivery.workers must be at least 1".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad(format!("log.format must be \"text\" or \"json\", got {:?}", self.log.format));
        }
        for (name, s) in self.hook_sources() {
            if !crate::templates::valid_name(&s.template) {
                return bad(format!(
                    "sources.{name}.template {:?}: names hold only letters, digits, _ and -",
                    s.template
                ));
            }
        }
        Ok(())
    }

    /// Environment names, the write keys' and the credentials' environments.
    fn validate_environments(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        for name in self.environments.keys() {
            if !valid_environment_name(name) || name == DEFAULT_ENVIRONMENT_KEY {
                return bad(format!(
                    "environments.{name}: names hold only a-z, 0-9, _ and - (at most 64), and \"default\" is the \
                     default environment's (heap.app_id)"
                ));
            }
        }
        let known = |env: &str| env == DEFAULT_ENVIRONMENT_KEY || self.environments.contains_key(env);
        let mut seen = std::collections::HashSet::new();
        for (source, s) in self.hook_sources() {
            if source != "segment" && !s.write_keys.is_empty() {
                return bad(format!("sources.{source}.write_keys: only the segment source takes write keys"));
            }
            for (env, keys) in &s.write_keys {
                if !known(env) {
                    return bad(format!("sources.{source}.write_keys.{env}: no [environments.{env}]"));
                }
                for k in keys {
                    let k = k.expose_secret().trim();
                    if k.is_empty() || k.contains(':') {
                        return bad(format!("sources.{source}.write_keys.{env}: a write key is empty or holds ':'"));
                    }
                    if !seen.insert(k.to_owned()) {
                        return bad(format!("sources.{source}.write_keys.{env}: a write key is listed twice"));
                    }
                }
            }
        }
        for (source, auth) in self.source_auth() {
            for env in auth.environments.keys() {
                if !known(env) {
                    return bad(format!("sources.{source}.auth.environments.{env}: no [environments.{env}]"));
                }
            }
        }
        Ok(())
    }

    /// The app_id of an environment (`""`: the default one, which has none of its own).
    pub fn environment_app_id(&self, environment: &str) -> Option<&str> {
        self.environments.get(environment).map(|e| e.app_id.trim())
    }

    /// Every non-empty app_id in the configuration, with its key.
    pub fn configured_app_ids(&self) -> Vec<(String, &str)> {
        let mut v = Vec::new();
        if !self.heap.app_id.trim().is_empty() {
            v.push(("heap.app_id".to_owned(), self.heap.app_id.trim()));
        }
        for (name, s) in self.hook_sources() {
            if !s.app_id.trim().is_empty() {
                v.push((format!("sources.{name}.app_id"), s.app_id.trim()));
            }
        }
        for (name, e) in &self.environments {
            v.push((format!("environments.{name}.app_id"), e.app_id.trim()));
        }
        v
    }

    pub fn hook_sources(&self) -> [(&'static str, &SourceSettings); 3] {
        [
            ("clevertap", &self.sources.clevertap),
            ("userpilot", &self.sources.userpilot),
            ("segment", &self.sources.segment),
        ]
    }

    /// Every source's auth settings, with its name (the hook sources, then `heap`).
    pub fn source_auth(&self) -> [(&'static str, &AuthSettings); 4] {
        [
            ("clevertap", &self.sources.clevertap.auth),
            ("userpilot", &self.sources.userpilot.auth),
            ("segment", &self.sources.segment.auth),
            ("heap", &self.sources.heap.auth),
        ]
    }

    /// Enabled sources that accept requests without authentication.
    pub fn unauthenticated_sources(&self) -> Vec<&'static str> {
        let enabled = |name: &str| match name {
            "heap" => self.sources.heap.enabled,
            n => self.hook_sources().iter().any(|(h, s)| *h == n && s.enabled),
        };
        // A segment source with write keys refuses requests without one.
        let keyed = |name: &str| name == "segment" && !self.sources.segment.write_keys.is_empty();
        self.source_auth()
            .into_iter()
            .filter(|(n, a)| a.mode == AuthMode::None && enabled(n) && !keyed(n))
            .map(|(n, _)| n)
            .collect()
    }

    /// The PostgreSQL URL, when one is set (the store is PostgreSQL then).
    pub fn store_url(&self) -> Option<&str> {
        let u = self.store.url.expose_secret();
        (!u.trim().is_empty()).then(|| u.trim())
    }

    /// The console's read-only token, when one is set.
    pub fn console_readonly_token(&self) -> Option<&str> {
        let t = self.console.readonly_token.expose_secret();
        (!t.trim().is_empty()).then(|| t.trim())
    }

    /// The admin token, when one is set.
    pub fn admin_token(&self) -> Option<&str> {
        let t = self.admin.token.expose_secret();
        (!t.trim().is_empty()).then(|| t.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn committed_defaults_load_and_validate() {
        let s = Settings::defaults();
        assert_eq!(s.server.bind, "127.0.0.1:8080");
        assert_eq!(s.heap.base_url, "https://heapanalytics.com");
        assert_eq!(s.templates.dir, PathBuf::from("templates"));
        assert!(s.admin_token().is_none());
    }

    #[test]
    fn environment_overrides_file_with_double_underscores_and_keeps_leading_zeros() {
        let s = Settings::load(
            &ConfigPath::Default(PathBuf::from("/nonexistent")),
            env(&[
                ("HEAP_RELAY__HEAP__APP_ID", "0123"),
                ("HEAP_RELAY__SERVER__BIND", "127.0.0.1:9999"),
                ("HEAP_RELAY__HEAP__ALLOWED_APP_IDS", "0123, 456"),
                ("HEAP_RELAY__SOURCES__CLEVERTAP__APP_ID", "456"),
                ("HEAP_RELAY__DELIVERY__MAX_BATCH", "10"),
                ("HEAP_RELAY__SOURCES__SEGMENT__ALLOW_ANONYMOUS", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(s.heap.app_id, "0123");
        assert_eq!(s.server.bind, "127.0.0.1:9999");
        assert_eq!(s.heap.allowed_app_ids, vec!["0123", "456"]);
        assert_eq!(s.sources.clevertap.app_id, "456");
        assert_eq!(s.delivery.max_batch, 10);
        assert!(!s.sources.segment.allow_anonymous);
    }

    #[test]
    fn a_named_but_missing_config_file_is_fatal_and_unknown_keys_are_refused() {
        let err =
            Settings::load(&ConfigPath::Explicit(PathBuf::from("/nonexistent/x.toml")), HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[heap]\napp_idd = \"1\"\n").unwrap();
        let err = Settings::load(&ConfigPath::Explicit(p), HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("app_idd"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        for (k, v, want) in [
            ("HEAP_RELAY__HEAP__APP_ID", "abc", "heap.app_id"),
            ("HEAP_RELAY__SERVER__BIND", "nowhere", "server.bind"),
            ("HEAP_RELAY__HEAP__BASE_URL", "ftp://x", "heap.base_url"),
            ("HEAP_RELAY__DELIVERY__MAX_BATCH", "1001", "delivery.max_batch"),
        ] {
            let err = Settings::load(&ConfigPath::Default(PathBuf::from("/nonexistent")), env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(want), "{k}: {err}");
        }
    }

    #[test]
    fn source_auth_comes_from_the_environment_and_its_secret_never_shows_in_debug_output() {
        let s = Settings::load(
            &ConfigPath::Default(PathBuf::from("/nonexistent")),
            env(&[
                ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__MODE", "hmac_userpilot"),
                ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__SECRET", "up-signing-secret-xyz"),
                ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__HASH", "sha512"),
                ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__TOLERANCE_SECS", "60"),
            ]),
        )
        .unwrap();
        assert_eq!(s.sources.userpilot.auth.mode, AuthMode::HmacUserpilot);
        assert_eq!(s.sources.userpilot.auth.hash, crate::auth::HashAlg::Sha512);
        assert_eq!(s.sources.userpilot.auth.tolerance_secs, 60);
        assert_eq!(s.sources.userpilot.auth.secret.expose_secret(), "up-signing-secret-xyz");
        assert!(!format!("{s:?}").contains("up-signing-secret-xyz"));
        assert_eq!(s.unauthenticated_sources(), vec!["clevertap", "segment", "heap"]);
    }

    #[test]
    fn an_auth_mode_without_its_secret_and_an_unknown_mode_are_refused() {
        for (k, v, want) in [
            ("HEAP_RELAY__SOURCES__CLEVERTAP__AUTH__MODE", "header", "sources.clevertap.auth"),
            ("HEAP_RELAY__SOURCES__HEAP__AUTH__MODE", "bearer", "sources.heap.auth"),
            ("HEAP_RELAY__SOURCES__SEGMENT__AUTH__MODE", "magic", "magic"),
            ("HEAP_RELAY__LIMITS__MAX_JSON_DEPTH", "1000", "limits.max_json_depth"),
        ] {
            let err = Settings::load(&ConfigPath::Default(PathBuf::from("/nonexistent")), env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(want), "{k}: {err}");
        }
    }

    #[test]
    fn a_store_url_selects_postgres_is_validated_and_never_shows_in_debug_output() {
        let load = |url: &str| {
            Settings::load(&ConfigPath::Default(PathBuf::from("/nonexistent")), env(&[("HEAP_RELAY__STORE__URL", url)]))
        };
        assert!(Settings::defaults().store_url().is_none(), "SQLite is the default");
        let s = load("postgres://relay:pw-s3cr3t@127.0.0.1:5432/test").unwrap();
        assert_eq!(s.store_url(), Some("postgres://relay:pw-s3cr3t@127.0.0.1:5432/test"));
        assert!(!format!("{s:?}").contains("s3cr3t"));
        let err = load("mysql://x").unwrap_err();
        assert!(err.to_string().contains("store.url"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_echoed_in_the_error() {
        for (k, v) in
            [("HEAP_RELAY__DELIVERY__WORKERS", "hunter2-secret"), ("HEAP_RELAY__SERVER__MAX_BODY_BYTES", "s3cr3t")]
        {
            let err = Settings::load(&ConfigPath::Default(PathBuf::from("/nonexistent")), env(&[(k, v)])).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains("hunter2") && !text.contains("s3cr3t"), "{k}: {text}");
        }
        assert_eq!(
            redact_values(r#"invalid type: string "pw", expected u64"#),
            "invalid type: string (value not shown), expected u64"
        );
    }

    #[test]
    fn the_shipped_defaults_are_the_safe_ones() {
        let s = Settings::defaults();
        assert!(!s.server.allow_unauthenticated_public_bind);
        assert_eq!(s.server.max_connections, 0, "follows the open-file limit");
        assert!(s.server.allowed_origins.is_empty() && s.server.trusted_proxies.is_empty());
        assert!(!s.identity.allow_zero_and_minus_one && s.identity.refuse_template_default);
    }

    #[test]
    fn the_admin_token_never_shows_in_debug_output() {
        let s = Settings::load(
            &ConfigPath::Default(PathBuf::from("/nonexistent")),
            env(&[("HEAP_RELAY__ADMIN__TOKEN", "s3cr3t-token-value")]),
        )
        .unwrap();
        assert_eq!(s.admin_token(), Some("s3cr3t-token-value"));
        assert!(!format!("{s:?}").contains("s3cr3t"));
    }

    #[test]
    fn environments_and_write_keys_come_from_the_environment_and_never_show_in_debug() {
        let s = Settings::load(
            &ConfigPath::Default(PathBuf::from("/nonexistent")),
            env(&[
                ("HEAP_RELAY__ENVIRONMENTS__PROD__APP_ID", "111"),
                ("HEAP_RELAY__ENVIRONMENTS__DEV__APP_ID", "222"),
                ("HEAP_RELAY__SOURCES__SEGMENT__WRITE_KEYS__PROD", "wk-prod-s3cr3t, wk-prod-2"),
                ("HEAP_RELAY__SOURCES__SEGMENT__WRITE_KEYS__DEV", "wk-dev-s3cr3t"),
            ]),
        )
        .unwrap();
        assert_eq!(s.environment_app_id("prod"), Some("111"));
        assert_eq!(s.sources.segment.write_keys["prod"].len(), 2);
        assert!(s.unauthenticated_sources().iter().all(|n| *n != "segment"), "write keys authenticate segment");
        assert!(!format!("{s:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_write_key_of_an_unknown_environment_or_an_environment_without_app_id_is_refused() {
        let load = |pairs: &[(&str, &str)]| {
            Settings::load(&ConfigPath::Default(PathBuf::from("/nonexistent")), env(pairs)).map(|_| ())
        };
        let err = load(&[("HEAP_RELAY__SOURCES__SEGMENT__WRITE_KEYS__STAGING", "wk")]).unwrap_err();
        assert!(err.to_string().contains("no [environments.staging]"), "{err}");
        assert!(load(&[("HEAP_RELAY__ENVIRONMENTS__PROD__APP_ID", "")]).is_err());
        assert!(load(&[("HEAP_RELAY__SOURCES__CLEVERTAP__WRITE_KEYS__DEFAULT", "wk")]).is_err());
        let err = load(&[("HEAP_RELAY__SOURCES__SEGMENT__WRITE_KEYS__DEFAULT", "dup-s3cr3t,dup-s3cr3t")]).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(load(&[("HEAP_RELAY__SOURCES__SEGMENT__WRITE_KEYS__DEFAULT", "wk")]).is_ok());
    }
}
