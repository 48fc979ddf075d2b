//! The durable queue and delivery log. Ingest appends a raw body with the events rendered from it in one
//! transaction (deduplicating a sender's retries in the same commit); delivery workers claim ready events under a
//! lease, and record every Heap call that carried them.
//!
//! Two backends keep these promises: `sqlite` (the embedded default, one instance) is an append-only ingest log
//! plus delivery's own books in a second file, so that nothing delivery writes holds up an ingest commit;
//! `postgres` (several instances sharing one queue) keeps a row per event and claims with `FOR UPDATE SKIP LOCKED`.

pub mod postgres;
pub mod queries;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::domain::{CallKind, KeyScheme};
use serde::Serialize;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, waiting for its first attempt.
    Pending,
    /// At least one attempt failed; another is scheduled.
    Retrying,
    Delivered,
    /// Heap refused it for good, or the retry window ran out. Kept with Heap's answer; replayable.
    Dead,
    /// Refused at ingest (validation or template); kept with the reason so a re-render can repair it.
    Rejected,
    /// Superseded by a re-rendered copy.
    Replaced,
    /// Received while its template did not load: kept with the template's error until a re-render after the fix.
    Held,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Retrying,
        Status::Delivered,
        Status::Dead,
        Status::Rejected,
        Status::Replaced,
        Status::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
            Status::Rejected => "rejected",
            Status::Replaced => "replaced",
            Status::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// One event to store, already validated and serialised as the element of Heap's bulk array.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The id operators and the 202 see; empty: the store assigns it (SQLite from the log entry, PostgreSQL a uuid
    /// v7), and `Appended::event_ids` says it.
    pub event_id: String,
    pub item_index: i64,
    pub kind: CallKind,
    pub app_id: String,
    pub identity: String,
    pub idempotency_key: Option<String>,
    pub payload: String,
    /// The sender's own id for this item (Segment `messageId`, a Heap body's `idempotency_key`): a second item
    /// with the same key within the dedupe window is a retry, answered with the first one's event id.
    pub dedupe_key: Option<String>,
}

/// An item refused at ingest, logged so the operator can find it and a re-render can repair it.
#[derive(Debug, Clone)]
pub struct NewRejection {
    /// As `NewEvent::event_id`.
    pub event_id: String,
    pub item_index: i64,
    pub field: String,
    pub message: String,
}

/// A stored key scheme; a number this version does not know (a newer relay wrote it) is an error, not a guess.
pub(crate) fn stored_key_scheme(n: i64) -> Result<KeyScheme, StoreError> {
    KeyScheme::from_i64(n).ok_or_else(|| {
        StoreError::Config(format!(
            "a stored body names key scheme {n}, which this version of heap-relay does not know; \
             a newer version wrote it (see README, \"Upgrade notes\")"
        ))
    })
}

/// One request's worth of work, written in one transaction.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub source: String,
    /// The environment the request's credential (or path) chose (`dev`, `prod`, …); empty for the default one.
    pub environment: String,
    pub template: String,
    pub body: Vec<u8>,
    pub received_at: Millis,
    pub events: Vec<NewEvent>,
    pub rejections: Vec<NewRejection>,
    /// When this re-renders a stored body, the body's row id (no new raw row is written).
    pub replay_of_raw: Option<i64>,
    /// Names this request as a whole (a hash of source, template and body) for senders that retry by re-sending
    /// the same body: a second request with the same key within the dedupe window is not stored again.
    pub request_key: Option<String>,
    /// Which version of the template rendered the events (`Template::version`), so a re-render can select by it.
    pub template_version: Option<String>,
    /// The body's template did not load: `held` items are kept with this error (the body is stored raw) until a
    /// re-render after the fix.
    pub held: Option<HeldItems>,
}

/// Items of a body whose template did not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldItems {
    pub items: usize,
    pub reason: String,
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// One id per event of the append, in order: a new event's own id, or, for an item the dedupe window already
    /// holds, the id its first delivery got.
    pub event_ids: Vec<String>,
    /// The whole request was a retry of one already stored: nothing was written.
    pub duplicate: bool,
    /// Events dropped as retries of ones already stored (all of them when `duplicate`).
    pub duplicates: usize,
    /// Where the append was written: the ingest log entry (SQLite) or raw body row (PostgreSQL); none for a
    /// duplicate.
    pub entry: Option<i64>,
}

/// Whether the rate budgets let an event go now. Delivery implements it; the store asks it while choosing what to
/// claim, so that nothing is claimed that the budgets would hold back.
pub trait Admission: Send + Sync {
    /// Takes one event's worth of the app's and the identity's budgets, or says which one is spent and until when.
    fn admit(&self, app_id: &str, identity: &str, now: Millis) -> Result<(), Held>;
}

/// Why an event may not go yet, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The app_id's budget is spent: no event of that app_id may go before `until`.
    App { until: Millis },
    /// This identity's budget is spent; other identities of the app may go.
    Identity { until: Millis },
}

/// An event leased to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub event_id: String,
    pub source: String,
    pub kind: CallKind,
    pub app_id: String,
    pub identity: String,
    pub payload: String,
    pub attempts: i64,
    pub enqueued_at: Millis,
    pub lease_token: i64,
}

/// What became of one event after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Delivered,
    Retry {
        at: Millis,
    },
    Dead,
    /// Not attempted (rate limit, shutdown): back to the queue at `at`, attempt count unchanged.
    Release {
        at: Millis,
    },
}

/// One HTTP attempt that carried an event.
#[derive(Debug, Clone)]
pub struct AttemptLog {
    /// Which Heap call this was (unique within the process): every event a call carried shares it, so a store can
    /// keep one record per call.
    pub call: u64,
    pub at: Millis,
    pub http_status: Option<u16>,
    pub latency_ms: i64,
    pub batch_size: i64,
    pub error: Option<String>,
}

/// Everything one delivery round did to one event: its attempts (a batch split to isolate a bad event makes
/// several) and where it ends up.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub id: i64,
    pub lease_token: i64,
    pub attempts: Vec<AttemptLog>,
    pub resolution: Resolution,
    /// Heap's answer or the transport error, kept as the event's `last_error`.
    pub error: Option<String>,
}

/// What an operator's pause or purge names: the events of one app_id, or of one environment (`""` is the default
/// environment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    AppId(String),
    Environment(String),
}

impl Scope {
    /// In words, for the console and the audit log: `app_id 1234`, `environment prod`, `environment default`.
    pub fn describe(&self) -> String {
        match self {
            Scope::AppId(a) => format!("app_id {a}"),
            Scope::Environment(e) if e.is_empty() => "environment default".to_owned(),
            Scope::Environment(e) => format!("environment {e}"),
        }
    }
}

/// What a claim skips: events of these app_ids (an operator's pause, a 429, a spent shared budget) and of these
/// environments (an operator's pause); and, on PostgreSQL, how many events of an app_id it takes at most (what its
/// shared budget holds now, so that nothing is claimed that the budget will not let go).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    pub app_ids: Vec<String>,
    pub environments: Vec<String>,
    /// (app_id, events): at most that many of the app_id's events.
    pub app_caps: Vec<(String, i64)>,
    /// At most this many events of an app_id not in `app_caps` (a full bucket); None: not capped.
    pub app_cap_others: Option<i64>,
}

impl Paused {
    pub fn apps(app_ids: Vec<String>) -> Self {
        Self { app_ids, ..Self::default() }
    }

    /// Whether an event of `app_id` in `environment` waits.
    pub fn holds(&self, app_id: &str, environment: &str) -> bool {
        self.app_ids.iter().any(|a| a == app_id) || self.environments.iter().any(|e| e == environment)
    }
}

/// Filters for the delivery log.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub status: Option<Status>,
    pub source: Option<String>,
    pub environment: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    pub limit: i64,
}

/// Which events a replay re-sends.
#[derive(Debug, Clone)]
pub enum Selector {
    Id(String),
    Status(Status),
    /// Events rendered by a template version other than the current one: `(source, template, current version)`.
    /// Held items (no version) count as other.
    StaleTemplate {
        source: String,
        template: String,
        current: String,
    },
    Range {
        from: Millis,
        to: Millis,
        status: Option<Status>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub at: String,
    pub http_status: Option<u16>,
    pub latency_ms: i64,
    pub batch_size: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub id: String,
    pub status: &'static str,
    pub source: String,
    /// Empty for the default environment.
    pub environment: String,
    pub template: String,
    /// The version of the template that rendered it (none for the Heap-compatible routes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_version: Option<String>,
    pub kind: &'static str,
    pub app_id: String,
    pub identity: String,
    pub idempotency_key: Option<String>,
    pub item_index: i64,
    pub attempts: i64,
    pub received_at: String,
    pub updated_at: String,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_log: Option<Vec<AttemptView>>,
}

/// Queue figures for /metrics and /readyz.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    pub ready_or_waiting: i64,
    pub oldest_pending_ms: Option<Millis>,
    pub dead: i64,
    pub db_bytes: i64,
    /// Write transactions and the request bodies they carried, since start (their ratio is the group-commit size);
    /// `None` where the backend does not count them.
    pub commits: Option<u64>,
    pub bodies_committed: Option<u64>,
    /// Commits of delivery's own books (SQLite: a separate file and writer from the ingest log, whose commits
    /// `commits` counts), so a test can see which writer a piece of work went through.
    pub delivery_commits: Option<u64>,
    /// Log entries the operator views' index has not reached yet (SQLite's follower index); `None` elsewhere.
    pub index_lag_entries: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot take more: the configured size limit or the disk is full. Answer 503 with Retry-After.
    #[error("the store is full: {0}")]
    Full(String),
    #[error("the store's writer has stopped")]
    Closed,
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(String),
    /// The store's configuration cannot work (an unparsable URL, a search_path naming no schema).
    #[error("store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn iso(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The configured store. Every backend offers the same operations with the same meaning; callers hold this.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Writes a body and everything rendered from it, durably, in one transaction, unless the dedupe window holds
    /// it already (see [`Appended`]).
    pub async fn append(&self, ingested: Ingested) -> Result<Appended, StoreError> {
        delegate!(self, s => s.append(ingested).await)
    }

    /// Leases up to `limit` ready events (oldest first) to `owner` until `now + lease_ms`, skipping the app_ids and
    /// environments `paused` names.
    /// With `admission`, only events it admits are claimed (their budget is taken); without, the caller admits.
    pub async fn claim(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Paused,
        admission: Option<std::sync::Arc<dyn Admission>>,
    ) -> Result<Vec<Claimed>, StoreError> {
        match self {
            Store::Sqlite(s) => s.claim(owner, now, lease_ms, limit, paused, admission).await,
            Store::Postgres(s) => s.claim(owner, now, lease_ms, limit, paused).await,
        }
    }

    /// Whether [`Store::claim`] asks the admission itself (SQLite: budgets before claims, from memory); otherwise
    /// the caller takes the budget after the claim (PostgreSQL: budgets shared in the database).
    pub fn admits_in_claim(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    /// Records attempts and outcomes; records with a stale lease token are ignored. Returns how many applied.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<usize, StoreError> {
        delegate!(self, s => s.record(records).await)
    }

    /// Extends the leases `owner` still holds on `leases` (row id, lease token) until `until`, while a batch is in
    /// flight. PostgreSQL only: SQLite serves one instance, and its lease (delivery.lease_secs, default 60 s) is
    /// kept above the longest round (see docs/postgres.md); there it renews nothing and returns 0.
    pub async fn renew(&self, owner: &str, leases: Vec<(i64, i64)>, until: Millis) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(0),
            Store::Postgres(s) => s.renew(owner, leases, until).await,
        }
    }

    /// Whether leases are renewed while a batch is in flight (see [`Store::renew`]).
    pub fn renews_leases(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    pub async fn requeue(&self, selector: Selector) -> Result<i64, StoreError> {
        delegate!(self, s => s.requeue(selector).await)
    }

    pub async fn release_owner(&self, owner: &str) -> Result<usize, StoreError> {
        delegate!(self, s => s.release_owner(owner).await)
    }

    pub async fn prune(&self, before: Millis) -> Result<usize, StoreError> {
        delegate!(self, s => s.prune(before).await)
    }

    /// Deletes refused items (with their bodies, where nothing else needs them) received before `before`, or the
    /// oldest while more than `max_items` are kept (0: no cap). Returns how many went (entries or rows).
    pub async fn prune_refused(&self, before: Millis, max_items: i64) -> Result<usize, StoreError> {
        delegate!(self, s => s.prune_refused(before, max_items).await)
    }

    /// The newest events under `q`'s filters: the first page of [`Store::page`].
    pub async fn list(&self, q: Query) -> Result<Vec<EventView>, StoreError> {
        Ok(self.page(queries::EventFilter { query: q, ..Default::default() }).await?.events)
    }

    pub async fn get(&self, event_id: &str) -> Result<EventView, StoreError> {
        delegate!(self, s => s.get(event_id).await)
    }

    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        delegate!(self, s => s.stats().await)
    }

    /// The raw bodies behind the selected events: (raw id, source, template, received_at, body).
    pub async fn raw_bodies(&self, selector: Selector) -> Result<Vec<RawBody>, StoreError> {
        let mut out = Vec::new();
        for id in self.raw_body_ids(selector).await? {
            out.extend(self.raw_body(id).await?);
        }
        Ok(out)
    }

    /// The ids of the raw bodies behind the selected events, in order, once each: a large selection is then
    /// re-rendered reading one body at a time ([`Store::raw_body`]).
    pub async fn raw_body_ids(&self, selector: Selector) -> Result<Vec<i64>, StoreError> {
        delegate!(self, s => s.raw_body_ids(selector).await)
    }

    /// One raw body by id, if it is still kept.
    pub async fn raw_body(&self, id: i64) -> Result<Option<RawBody>, StoreError> {
        delegate!(self, s => s.raw_body(id).await)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.ping().await)
    }

    /// Why the store refuses new bodies now (`store.max_bytes` reached), if it does: `/readyz` says so.
    pub async fn full_reason(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::Sqlite(s) => Ok(s.full_reason()),
            Store::Postgres(s) => s.full_reason().await,
        }
    }

    /// One page of the delivery log, newest first, under every filter of [`queries::EventFilter`] (keyset: pass
    /// the page's `next` as the following call's `before`).
    pub async fn page(&self, filter: queries::EventFilter) -> Result<queries::Page, StoreError> {
        delegate!(self, s => s.page(filter).await)
    }

    /// The last hour: per minute in and delivered, per source × environment × app_id, refusals, the newest call.
    pub async fn flow(&self, now: Millis) -> Result<queries::Flow, StoreError> {
        let mut flow = delegate!(self, s => s.flow(now).await)?;
        flow.rows.sort_by_key(|r| std::cmp::Reverse(r.received));
        Ok(flow)
    }

    /// Dead and refused events grouped by reason, most events first.
    pub async fn failures(&self) -> Result<Vec<queries::FailureGroup>, StoreError> {
        let mut groups = delegate!(self, s => s.failures().await)?;
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.newest_at.cmp(&a.newest_at)));
        Ok(groups)
    }

    /// The event ids of one failure group (`Dead` or `Rejected` and its reason), newest first, at most `limit`.
    pub async fn failure_members(
        &self,
        status: Status,
        reason: String,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.failure_members(status, reason, limit).await)
    }

    /// Moves every waiting (pending or retrying) event of `scope` (an app_id or an environment) to dead letters,
    /// with the error [`queries::PURGED`], so that a wrong campaign's backlog is not sent; they can be replayed from
    /// there. Returns how many. An event already in flight may still reach Heap.
    pub async fn purge(&self, scope: Scope) -> Result<i64, StoreError> {
        delegate!(self, s => s.purge(scope).await)
    }

    /// Keeps an operator's action in the audit log.
    pub async fn audit(&self, entry: queries::AuditEntry) -> Result<(), StoreError> {
        delegate!(self, s => s.audit(entry).await)
    }

    /// The newest `limit` entries of the audit log, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<queries::AuditEntry>, StoreError> {
        delegate!(self, s => s.audit_log(limit).await)
    }

    /// The query plans of the statements behind the console's overview, deliveries and failures pages: (page,
    /// statement, plan), for the test that none scans a whole table.
    pub async fn console_plans(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        delegate!(self, s => s.console_plans().await)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

/// A stored request body, with what a re-render needs to run it through the same route again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBody {
    /// The body's row (SQLite: its log entry); a re-render's append names it in `replay_of_raw`.
    pub id: i64,
    pub source: String,
    pub environment: String,
    pub template: String,
    pub received_at: Millis,
    pub body: Vec<u8>,
    /// How the body's derived idempotency keys hash its items; a store writes `KeyScheme::default()` with a new
    /// body (the intake renders new bodies with it), and bodies stored before schemes existed read as `Text`.
    pub key_scheme: KeyScheme,
}
