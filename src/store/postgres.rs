//! The shared store for several relay instances: PostgreSQL, same tables and same meaning as the SQLite store.
//!
//! - Appends go through one writer task per instance. It takes every append waiting in its channel and writes them
//!   in one transaction with array inserts (`INSERT … SELECT … FROM unnest(…)`), answering each caller only after
//!   COMMIT (group commit). If a group fails, each append is retried alone so one bad body fails only itself. The
//!   ingest commit writes a row per body (its event rows in `items`) and the dedupe keys; the event rows, with the
//!   indexes of the queue and the operator views, are written off it (`writer::expand`, from `caught_up`, which
//!   every claim and read of the store runs first).
//! - Claims by partition (`parts`): each delivery worker of every instance leases a fair share of the queue's
//!   partitions (by app_id and identity) under a fencing token, and reads the ready events of its partitions
//!   without writing anything per event. Results are recorded only while the event's partition still carries the
//!   token it was claimed under, so a worker whose lease expired and was taken over by another instance cannot
//!   overwrite the new holder's outcome.
//! - The writer NOTIFYs a per-schema channel in the append transaction; [`PgStore::spawn_listener`] LISTENs on it so
//!   idle workers of every instance wake when events arrive anywhere.
//! - Heap rate budgets (token buckets per app_id and per identity) live in `rate_budget`, taken under row locks, so
//!   several instances share one budget instead of each spending its own.
//!
//! Layout: this file holds the schema, start-up and the queue (claim, renew, record, requeue, release, prune);
//! `parts` the partition leases, `writer` the group commit, `budget` the shared rate budgets, `listen` LISTEN/NOTIFY, `log` the delivery-log reads.

mod budget;
mod console;
mod listen;
mod log;
mod parts;
pub mod tls;
mod writer;
/// The advisory lock an expanding transaction holds shared (for tests that stand in for one).
pub use writer::EXPANDING_LOCK;

use super::*;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use writer::{PendingAppend, Writer};

/// Same tables as the SQLite schema (raw_bodies, events, attempts), plus the shared rate budgets.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_bodies (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT   NOT NULL,
    template    TEXT   NOT NULL,
    received_at BIGINT NOT NULL,
    body        BYTEA  NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id               BIGSERIAL PRIMARY KEY,
    event_id         TEXT    NOT NULL UNIQUE,
    raw_id           BIGINT,
    item_index       BIGINT  NOT NULL,
    source           TEXT    NOT NULL,
    template         TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    app_id           TEXT    NOT NULL,
    identity         TEXT    NOT NULL,
    idempotency_key  TEXT,
    payload          TEXT,
    status           TEXT    NOT NULL,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    enqueued_at      BIGINT  NOT NULL,
    next_attempt_at  BIGINT  NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    lease_token      BIGINT  NOT NULL DEFAULT 0,
    received_at      BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    last_error       TEXT
) WITH (fillfactor = 80);
-- Added after the first release: the environment (dev, prod, ...) a request's credential chose.
ALTER TABLE events ADD COLUMN IF NOT EXISTS environment TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN IF NOT EXISTS template_version TEXT;
-- How a body's derived idempotency keys hash its items (KeyScheme); NULL: stored before schemes existed (1).
ALTER TABLE raw_bodies ADD COLUMN IF NOT EXISTS key_scheme SMALLINT;
-- A body's rows until they are written as event rows (off the ingest commit, `writer::expand`); NULL once written.
ALTER TABLE raw_bodies ADD COLUMN IF NOT EXISTS items BYTEA;
-- The environment the body came in for, beside `items` (which also holds it), so that a body whose items cannot be
-- read is still re-rendered for its own environment. NULL: stored before this column (its environment is in items).
ALTER TABLE raw_bodies ADD COLUMN IF NOT EXISTS environment TEXT;
CREATE INDEX IF NOT EXISTS raw_bodies_unexpanded ON raw_bodies (id) WHERE items IS NOT NULL; -- room on each page, so claims and renewals (no indexed column changes) update in place
-- Claims scan waiting rows in id order (acceptance order); the partial index keeps delivered rows out of the way.
CREATE INDEX IF NOT EXISTS events_ready_id ON events (id) WHERE status IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS events_status_time ON events (status, received_at);
CREATE INDEX IF NOT EXISTS events_raw ON events (raw_id);
-- The operator's reads (console, /admin/deliveries, `deliveries`): the last hour, the delivery log filtered by
-- app_id and status, by identity or by key (newest first), and the newest failures. Without them each of those
-- pages walks the table (a test checks the plans with 100,000 rows).
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE INDEX IF NOT EXISTS events_app_status_id ON events (app_id, status, id);
CREATE INDEX IF NOT EXISTS events_identity_id ON events (identity, id);
CREATE INDEX IF NOT EXISTS events_key_id ON events (idempotency_key, id) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_failed_id ON events (id) WHERE status IN ('dead', 'rejected');
CREATE TABLE IF NOT EXISTS attempts (
    id          BIGSERIAL PRIMARY KEY,
    event_row   BIGINT  NOT NULL,
    at          BIGINT  NOT NULL,
    http_status INTEGER,
    latency_ms  BIGINT  NOT NULL,
    batch_size  BIGINT  NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS attempts_event ON attempts (event_row);
CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at);
-- A sender's retries, recognised at the door: request body hashes and message ids, with the first event ids.
CREATE TABLE IF NOT EXISTS dedupe (
    key       TEXT   PRIMARY KEY,
    at        BIGINT NOT NULL,
    event_ids TEXT   NOT NULL
);
-- Token buckets shared by every instance: identity '' is the app_id's own budget.
CREATE TABLE IF NOT EXISTS rate_budget (
    app_id   TEXT             NOT NULL,
    identity TEXT             NOT NULL,
    tokens   DOUBLE PRECISION NOT NULL,
    at       BIGINT           NOT NULL,
    PRIMARY KEY (app_id, identity)
);
";

/// Every table and index SCHEMA creates: when all exist, start-up runs no DDL at all. (`CREATE INDEX IF NOT EXISTS`
/// takes a SHARE lock on its table before it finds the index there, which would queue every writer behind it.)
const RELATIONS: [&str; 23] = [
    "raw_bodies_unexpanded",
    "claim_parts",
    "claim_parts_pkey",
    "claim_owners",
    "claim_owners_pkey",
    "dedupe",
    "dedupe_pkey",
    "raw_bodies",
    "events",
    "events_ready_id",
    "events_status_time",
    "events_raw",
    "events_received_at",
    "events_app_status_id",
    "events_identity_id",
    "events_key_id",
    "events_failed_id",
    "attempts",
    "attempts_event",
    "attempts_at",
    "rate_budget",
    "events_event_id_key",
    "rate_budget_pkey",
];

async fn migrated(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let names: Vec<&str> = RELATIONS.to_vec();
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) AS r(name)
             WHERE to_regclass(quote_ident(current_schema()) || '.' || r.name) IS NOT NULL",
            &[&names],
        )
        .await?
        .get(0);
    let columns: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = current_schema()
               AND ((table_name = 'events' AND column_name IN ('environment', 'template_version'))
                    OR (table_name = 'raw_bodies' AND column_name IN ('key_scheme', 'items', 'environment')))",
            &[],
        )
        .await?
        .get(0);
    Ok(found == RELATIONS.len() as i64 && columns == 5)
}

/// Sets lz4 on the columns `lz4_pending` names. Best effort: a role that does not own the tables, or a lock held
/// by a long transaction (the ALTER waits at most `lock_timeout`), leaves them on pglz with a warning, and the next
/// start tries again; the relay works the same either way, only PostgreSQL spends more CPU.
async fn use_lz4(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    for (table, column) in lz4_pending(client).await? {
        let sql = format!(
            "SET lock_timeout = '2s'; ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4; RESET lock_timeout"
        );
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("RESET lock_timeout").await;
            tracing::warn!(table, column, error = %e,
                "cannot set lz4 compression (PostgreSQL keeps pglz, which costs more CPU); the next start tries again");
            break;
        }
    }
    Ok(())
}

/// The columns whose values PostgreSQL compresses itself (TOAST, above about 2 KB a row) and that should use lz4 but
/// do not yet: the raw body and its deferred rows, the event payload. pglz, the default, was 14% of the server's CPU
/// under ingest (`perf record -a`); lz4 does the same job for a fraction of it. Empty when the server cannot (before
/// PostgreSQL 14, or built without lz4): then the columns keep the default. Only new values are written with it;
/// PostgreSQL reads either kind transparently, so an older relay reads a database this one wrote.
async fn lz4_pending(client: &tokio_postgres::Client) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let supported: bool = client
        .query_one(
            "SELECT coalesce((SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'),
                             false)",
            &[],
        )
        .await?
        .get(0);
    if !supported {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT c.relname::text, a.attname::text FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN unnest($1::text[], $2::text[]) AS w(rel, col) ON w.rel = c.relname AND w.col = a.attname
             WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
               AND a.attcompression IS DISTINCT FROM 'l'",
            &[&LZ4_COLUMNS.map(|(t, _)| t).to_vec(), &LZ4_COLUMNS.map(|(_, c)| c).to_vec()],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// (table, column) of the values compressed with lz4 where the server has it: see `lz4_pending`.
const LZ4_COLUMNS: [(&str, &str); 3] = [("raw_bodies", "body"), ("raw_bodies", "items"), ("events", "payload")];

/// Serialises migrations of instances starting together (`CREATE … IF NOT EXISTS` alone can race in PostgreSQL).
const MIGRATION_LOCK: i64 = 0x6865_6170_5f72_656c; // "heap_rel"

/// Transactions of `writer::EXPAND_BATCH` bodies one catch-up writes at most.
const CATCH_UP_BATCHES: usize = 16;

/// Rows deleted per prune call, so one prune never holds locks for long.
const PRUNE_CHUNK: i64 = 5000;

#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    /// Refuse new bodies once the schema's tables hold this many bytes (0: no limit).
    pub max_bytes: u64,
    /// Connections in the pool (claims, records, reads) besides the writer's and the listener's.
    pub pool_size: usize,
    /// A request or message id seen again within this many milliseconds is a sender's retry (0: no dedupe).
    pub dedupe_window_ms: i64,
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    appends: mpsc::Sender<PendingAppend>,
    config: Arc<tokio_postgres::Config>,
    /// TLS for connections opened outside the pool (LISTEN).
    tls: tls::MakeRustls,
    /// The schema the tables live in (the first existing schema of the connection's search_path).
    schema: Arc<str>,
    /// NOTIFY channel for "events were appended", one per schema.
    channel: Arc<str>,
    dedupe_window_ms: i64,
    max_bytes: u64,
    /// The partitions each delivery worker of this instance holds, and its events in flight.
    holdings: Arc<std::sync::Mutex<std::collections::HashMap<String, parts::Holding>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("schema", &self.schema).finish_non_exhaustive()
    }
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(",");
            format!("postgres://{}@{host}/{}", c.get_user().unwrap_or(""), c.get_dbname().unwrap_or(""))
        }
        Err(_) => "postgres://(unparsable)".into(),
    }
}

fn channel_for(schema: &str) -> String {
    // NOTIFY channel names are identifiers: at most 63 bytes.
    let mut c = format!("heap_relay.{schema}");
    while c.len() > 63 {
        c.pop();
    }
    c
}

/// Writes the event rows of stored bodies not expanded yet, at most `CATCH_UP_BATCHES` transactions of them.
async fn catch_up(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    for _ in 0..CATCH_UP_BATCHES {
        let tx = client.transaction().await?;
        let n = writer::expand(&tx, None).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        if n < writer::EXPAND_BATCH as usize {
            break;
        }
    }
    Ok(())
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::DISK_FULL) {
        return StoreError::Full("the PostgreSQL disk is full".into());
    }
    StoreError::Postgres(e)
}

impl PgStore {
    /// Connects to `url`, runs the migrations (idempotent, under an advisory lock) and starts the writer task.
    pub async fn open(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        // sslmode / sslrootcert are honoured by `tls` (tokio-postgres knows only some of libpq's modes).
        let (config, tls, _) = tls::connector(url)?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        // One connection more than asked: the writer keeps one for itself.
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2) + 1)
            .build()
            .map_err(|e| StoreError::Config(format!("cannot build the PostgreSQL pool: {e}")))?;
        let mut client = pool.get().await?;
        let schema: Option<String> =
            client.query_one(&client.prepare_cached("SELECT current_schema()::text").await?, &[]).await?.get(0);
        let schema = schema.ok_or_else(|| {
            StoreError::Config(
                "the connection's search_path names no existing schema this role may use: create it first, or grant \
                 the role USAGE on it (GRANT USAGE ON SCHEMA <schema> TO <role>)"
                    .into(),
            )
        })?;
        if !migrated(&client).await? {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
            tx.batch_execute(SCHEMA).await?;
            tx.batch_execute(parts::SCHEMA).await?;
            tx.commit().await?;
        }
        use_lz4(&client).await?;
        drop(client);
        let channel: Arc<str> = channel_for(&schema).into();
        let (appends, rx) = mpsc::channel(4096);
        tokio::spawn(Writer { pool: pool.clone(), options, channel: channel.clone(), size: None }.run(rx));
        let (dedupe_window_ms, max_bytes) = (options.dedupe_window_ms, options.max_bytes);
        Ok(Self {
            pool,
            appends,
            config: Arc::new(config),
            tls,
            schema: schema.into(),
            channel,
            dedupe_window_ms,
            max_bytes,
            holdings: Arc::default(),
        })
    }

    /// Why the schema takes no more bodies now (`store.max_bytes` reached), if it does not.
    pub async fn full_reason(&self) -> Result<Option<String>, StoreError> {
        if self.max_bytes == 0 {
            return Ok(None);
        }
        let client = self.pool.get().await?;
        let used = writer::schema_bytes(&client).await?;
        Ok((used as u64 >= self.max_bytes)
            .then(|| format!("the schema holds {used} bytes; store.max_bytes is {}", self.max_bytes)))
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Writes a body and everything rendered from it, durably, in one transaction (shared with concurrent appends).
    pub async fn append(&self, mut ingested: Ingested) -> Result<Appended, StoreError> {
        // Ids this store makes: uuid v7 (time-ordered, so the unique index on them is appended to, not scattered).
        let ids = ingested.events.iter_mut().map(|e| &mut e.event_id);
        for id in ids.chain(ingested.rejections.iter_mut().map(|r| &mut r.event_id)).filter(|id| id.is_empty()) {
            *id = uuid::Uuid::now_v7().to_string();
        }
        let (reply, rx) = oneshot::channel();
        self.appends.send(PendingAppend { ingested, reply }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes the rows of stored bodies that are not event rows yet (the ingest commit leaves them to this), at
    /// most `CATCH_UP_BATCHES` transactions of them: every read of the queue and the views starts here, so they
    /// see what was appended. Bodies another transaction is writing at that moment are waited for (a read right
    /// after an append would otherwise miss its events while a claim on another connection writes them), and
    /// written here if that transaction gave them back unwritten.
    pub(crate) async fn caught_up(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        catch_up(&mut client).await?;
        // Every expanding transaction holds the schema's expansion lock shared (`writer::expand`): taking it
        // exclusively waits for those in flight. Then write what they gave back unwritten, if anything.
        let tx = client.transaction().await?;
        tx.execute(
            &tx.prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))").await?,
            &[&writer::EXPANDING_LOCK],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        catch_up(&mut client).await
    }

    /// Up to `limit` ready events (oldest first) of the partitions `owner` holds (taking or giving back
    /// partitions for its fair share first), leaving out the events it already has in flight and those of the
    /// app_ids and environments `paused` names. Nothing is written per event; each carries its partition's lease.
    pub async fn claim(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Paused,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut client = self.pool.get().await?;
        catch_up(&mut client).await?;
        let held = self.hold_parts(&client, owner, now, lease_ms).await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: std::collections::HashMap<i32, i64> = held.iter().copied().collect();
        let part_ids: Vec<i32> = tokens.keys().copied().collect();
        let in_flight = self.in_flight(owner);
        // The first `limit` ready events, then of each capped app_id no more than its cap (what its shared budget
        // holds now): nothing is claimed that the app budget will not let go.
        let sql = format!(
            "WITH ready AS (
                 SELECT id, event_id, kind, app_id, identity, payload, attempts, enqueued_at, source, {part} AS part
                 FROM events
                 WHERE status IN ('pending', 'retrying') AND next_attempt_at <= $1 AND {part} = ANY($2)
                   AND NOT (id = ANY($3)) AND NOT (app_id = ANY($4::text[])) AND NOT (environment = ANY($5::text[]))
                 ORDER BY id LIMIT $6)
             SELECT r.id, r.event_id, r.kind, r.app_id, r.identity, r.payload, r.attempts, r.enqueued_at, r.source,
                    r.part
             FROM (SELECT ready.*, row_number() OVER (PARTITION BY app_id ORDER BY id) AS rn FROM ready) r
                  LEFT JOIN unnest($7::text[], $8::int8[]) AS c(app, n) ON c.app = r.app_id
             WHERE r.rn <= coalesce(c.n, $9)
             ORDER BY r.id",
            part = parts::PART_OF_ROW
        );
        let (cap_apps, caps): (Vec<&str>, Vec<i64>) = paused.app_caps.iter().map(|(a, n)| (a.as_str(), *n)).unzip();
        let rows = client
            .query(
                &client.prepare_cached(&sql).await?,
                &[
                    &now,
                    &part_ids,
                    &in_flight,
                    &paused.app_ids,
                    &paused.environments,
                    &limit,
                    &cap_apps,
                    &caps,
                    &paused.app_cap_others.unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(pg_err)?;
        let out: Vec<Claimed> = rows
            .iter()
            .map(|r| {
                let part: i32 = r.get(9);
                Claimed {
                    id: r.get(0),
                    event_id: r.get(1),
                    kind: CallKind::parse(r.get::<_, &str>(2)).unwrap_or(CallKind::Track),
                    app_id: r.get(3),
                    identity: r.get(4),
                    payload: r.get::<_, Option<String>>(5).unwrap_or_default(),
                    attempts: r.get(6),
                    enqueued_at: r.get(7),
                    source: r.get(8),
                    lease_token: parts::lease_token(part, tokens.get(&part).copied().unwrap_or_default()),
                }
            })
            .collect();
        self.claimed(owner, now, out.iter().map(|c| (c.id, parts::split_lease(c.lease_token).0)));
        Ok(out)
    }

    /// Extends `owner`'s leases on the partitions of `leases` (row id, lease token) until `until`. Returns how
    /// many of `leases` are still held; fewer than asked means another worker took some partitions over.
    pub async fn renew(&self, owner: &str, leases: Vec<(i64, i64)>, until: Millis) -> Result<usize, StoreError> {
        self.renew_parts(owner, leases, until).await
    }

    /// Records attempts and outcomes in one transaction. Records whose lease token is stale are ignored (fencing);
    /// returns how many applied.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<usize, StoreError> {
        // Events the budgets held back were claimed with no write and are released with none: their worker does
        // not claim them again before their time (`hold_back`), and nothing else about them changed.
        let (released, records): (Vec<AttemptRecord>, Vec<AttemptRecord>) = records
            .into_iter()
            .partition(|r| matches!(r.resolution, Resolution::Release { .. }) && r.attempts.is_empty());
        let held: Vec<(i64, Millis)> = released
            .iter()
            .filter_map(|r| match r.resolution {
                Resolution::Release { at } => Some((r.id, at)),
                _ => None,
            })
            .collect();
        let held = self.hold_back(&held);
        if records.is_empty() {
            return Ok(held);
        }
        let now = now_ms();
        let n = records.len();
        let (mut ids, mut tokens, mut release, mut statuses, mut counts, mut nexts, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for r in &records {
            let (status, next, is_release) = match r.resolution {
                Resolution::Delivered => ("delivered", now, false),
                Resolution::Retry { at } => ("retrying", at, false),
                Resolution::Dead => ("dead", now, false),
                Resolution::Release { at } => ("", at, true),
            };
            ids.push(r.id);
            tokens.push(r.lease_token);
            release.push(is_release);
            statuses.push(status);
            counts.push(if is_release { 0 } else { r.attempts.len() as i64 });
            nexts.push(next);
            errors.push(if is_release { None } else { r.error.as_deref() });
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let sql = format!(
            "UPDATE events e SET
                     status = CASE WHEN r.release THEN e.status ELSE r.status END,
                     attempts = e.attempts + r.n,
                     next_attempt_at = r.next_at,
                     last_error = coalesce(r.err, e.last_error),
                     lease_owner = NULL, lease_expires_at = NULL,
                     updated_at = CASE WHEN r.release THEN e.updated_at ELSE $8 END
                 FROM unnest($1::int8[], $2::int8[], $3::bool[], $4::text[], $5::int8[], $6::int8[], $7::text[])
                      AS r(id, token, release, status, n, next_at, err)
                 WHERE e.id = r.id AND e.status IN ('pending', 'retrying')
                   AND EXISTS (SELECT 1 FROM claim_parts p
                               WHERE p.part = r.token % {parts} AND p.token = r.token / {parts}
                                 AND p.part = {part_of})
                 RETURNING e.id",
            parts = parts::PARTS,
            part_of = parts::PART_OF_ROW,
        );
        let applied = tx
            .query(
                &tx.prepare_cached(&sql).await?,
                &[&ids, &tokens, &release, &statuses, &counts, &nexts, &errors, &now],
            )
            .await
            .map_err(pg_err)?;
        let applied: std::collections::HashSet<i64> = applied.iter().map(|r| r.get(0)).collect();
        // A stale lease token means another worker owns the event now: its attempts are its own to record.
        let (mut rows, mut at, mut status, mut latency, mut size, mut error) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in records.iter().filter(|r| applied.contains(&r.id)) {
            for a in &r.attempts {
                rows.push(r.id);
                at.push(a.at);
                status.push(a.http_status.map(i32::from));
                latency.push(a.latency_ms);
                size.push(a.batch_size);
                error.push(a.error.as_deref());
            }
        }
        if !rows.is_empty() {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO attempts (event_row, at, http_status, latency_ms, batch_size, error)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::int8[], $5::int8[], $6::text[])",
                )
                .await?,
                &[&rows, &at, &status, &latency, &size, &error],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
        self.recorded(&ids);
        Ok(applied.len() + held)
    }

    /// Puts the selected events back in the queue (status pending, due now).
    pub async fn requeue(&self, selector: Selector) -> Result<i64, StoreError> {
        self.caught_up().await?;
        let now = now_ms();
        let (cond, mut args) = selector_sql(&selector, 2);
        let sql = format!(
            "UPDATE events SET status = 'pending', next_attempt_at = $1, enqueued_at = $1, updated_at = $1,
                    lease_owner = NULL, lease_expires_at = NULL
             WHERE {cond} AND status IN ('dead', 'delivered', 'retrying', 'pending') AND payload IS NOT NULL"
        );
        args.insert(0, Box::new(now));
        let client = self.pool.get().await?;
        let n = client.execute(&sql, &params(&args)).await.map_err(pg_err)?;
        if n > 0 {
            client.execute(&client.prepare_cached("SELECT pg_notify($1, '')").await?, &[&&*self.channel]).await?;
        }
        Ok(n as i64)
    }

    /// Gives back every partition `owner` holds (shutdown), so other workers need not wait for the leases to
    /// expire. Returns how many claimed events it had not recorded.
    pub async fn release_owner(&self, owner: &str) -> Result<usize, StoreError> {
        self.release_parts(owner).await
    }

    /// Deletes delivered and replaced events (with their attempts) last updated before `before`, raw bodies no event
    /// refers to any more, and rate budgets untouched since. Returns the number of events deleted.
    pub async fn prune(&self, before: Millis) -> Result<usize, StoreError> {
        self.caught_up().await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query(
                &tx.prepare_cached(
                    "SELECT id FROM events WHERE status IN ('delivered', 'replaced') AND updated_at < $1 LIMIT $2",
                )
                .await?,
                &[&before, &PRUNE_CHUNK],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(&tx.prepare_cached("DELETE FROM attempts WHERE event_row = ANY($1)").await?, &[&ids]).await?;
        let n = tx.execute(&tx.prepare_cached("DELETE FROM events WHERE id = ANY($1)").await?, &[&ids]).await?;
        tx.execute(
            &tx.prepare_cached(
                "DELETE FROM raw_bodies WHERE id IN (
                 SELECT r.id FROM raw_bodies r WHERE r.received_at < $1 AND r.items IS NULL
                   AND NOT EXISTS (SELECT 1 FROM events e WHERE e.raw_id = r.id) LIMIT $2)",
            )
            .await?,
            &[&before, &PRUNE_CHUNK],
        )
        .await?;
        tx.execute(&tx.prepare_cached("DELETE FROM rate_budget WHERE at < $1").await?, &[&before]).await?;
        let dedupe_before = now_ms().saturating_sub(self.dedupe_window_ms);
        tx.execute(&tx.prepare_cached("DELETE FROM dedupe WHERE at < $1").await?, &[&dedupe_before]).await?;
        tx.commit().await?;
        Ok(n as usize)
    }

    /// Deletes refused items received before `before` (their own retention), or the oldest while more than
    /// `max_items` are kept (their cap). Raw bodies no event refers to go with the next `prune`.
    pub async fn prune_refused(&self, before: Millis, max_items: i64) -> Result<usize, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        let kept: i64 = client.query_one("SELECT count(*) FROM events WHERE status = 'rejected'", &[]).await?.get(0);
        let mut deleted = 0;
        if max_items > 0 && kept > max_items {
            // Past the cap: the oldest go, whatever their age.
            let excess = (kept - max_items).min(PRUNE_CHUNK);
            deleted += client
                .execute(
                    "DELETE FROM events WHERE id IN (
                     SELECT id FROM events WHERE status = 'rejected' ORDER BY id LIMIT $1)",
                    &[&excess],
                )
                .await?;
        }
        let n = client
            .execute(
                &client
                    .prepare_cached(
                        "DELETE FROM events WHERE id IN (
                         SELECT id FROM events WHERE status = 'rejected' AND received_at < $1 LIMIT $2)",
                    )
                    .await?,
                &[&before, &PRUNE_CHUNK],
            )
            .await?;
        Ok(n as usize + deleted as usize)
    }

    /// Checks that the database answers (for /readyz).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.get().await?.query_one("SELECT 1", &[]).await?;
        Ok(())
    }
}

fn params(args: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// The WHERE condition for a selector, with placeholders numbered from `first`.
fn selector_sql(sel: &Selector, first: usize) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    match sel {
        Selector::Id(id) => (format!("event_id = ${first}"), vec![Box::new(id.clone())]),
        Selector::Status(s) => (format!("status = ${first}"), vec![Box::new(s.as_str())]),
        Selector::StaleTemplate { source, template, current } => (
            format!(
                "source = ${first} AND template = ${} AND template_version IS DISTINCT FROM ${} AND status != 'replaced'",
                first + 1,
                first + 2
            ),
            vec![Box::new(source.clone()), Box::new(template.clone()), Box::new(current.clone())],
        ),
        Selector::Range { from, to, status } => {
            let mut sql = format!("received_at >= ${first} AND received_at < ${}", first + 1);
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(*from), Box::new(*to)];
            if let Some(s) = status {
                sql.push_str(&format!(" AND status = ${}", first + 2));
                args.push(Box::new(s.as_str()));
            }
            (sql, args)
        }
    }
}
