//! The shared store for several relay instances: PostgreSQL, same tables and same meaning as the SQLite store.
//!
//! - Appends go through one writer task per instance. It takes every append waiting in its channel and writes them
//!   in one transaction with array inserts (`INSERT … SELECT … FROM unnest(…)`), answering each caller only after
//!   COMMIT (group commit). If a group fails, each append is retried alone so one bad body fails only itself.
//! - Claims lease rows with `FOR UPDATE SKIP LOCKED`: owner, expiry, and a `lease_token` bumped on every claim.
//!   Results are recorded only `WHERE id = … AND lease_token = …` (fencing), so a worker whose lease expired and was
//!   taken over by another instance cannot overwrite the new holder's outcome.
//! - The writer NOTIFYs a per-schema channel in the append transaction; [`PgStore::spawn_listener`] LISTENs on it so
//!   idle workers of every instance wake when events arrive anywhere.
//! - Heap rate budgets (token buckets per app_id and per identity) live in `rate_budget`, taken under row locks, so
//!   several instances share one budget instead of each spending its own.

use super::*;
use crate::delivery::rate_limit::{SharedBucket, take_shared};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};

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
);
-- Claims scan waiting rows in id order (acceptance order); the partial index keeps delivered rows out of the way.
CREATE INDEX IF NOT EXISTS events_ready_id ON events (id) WHERE status IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS events_status_time ON events (status, received_at);
CREATE INDEX IF NOT EXISTS events_raw ON events (raw_id);
CREATE INDEX IF NOT EXISTS events_lease_owner ON events (lease_owner) WHERE lease_owner IS NOT NULL;
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
-- Token buckets shared by every instance: identity '' is the app_id's own budget.
CREATE TABLE IF NOT EXISTS rate_budget (
    app_id   TEXT             NOT NULL,
    identity TEXT             NOT NULL,
    tokens   DOUBLE PRECISION NOT NULL,
    at       BIGINT           NOT NULL,
    PRIMARY KEY (app_id, identity)
);
";

/// Serialises migrations of instances starting together (`CREATE … IF NOT EXISTS` alone can race in PostgreSQL).
const MIGRATION_LOCK: i64 = 0x6865_6170_5f72_656c; // "heap_rel"

/// Appends waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

/// Rows deleted per prune call, so one prune never holds locks for long.
const PRUNE_CHUNK: i64 = 5000;

/// How long a measured schema size is trusted before the writer measures it again (store.max_bytes).
const SIZE_CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    /// Refuse new bodies once the schema's tables hold this many bytes (0: no limit).
    pub max_bytes: u64,
    /// Connections in the pool (claims, records, reads) besides the writer's and the listener's.
    pub pool_size: usize,
}

struct PendingAppend {
    ingested: Ingested,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    appends: mpsc::Sender<PendingAppend>,
    config: Arc<tokio_postgres::Config>,
    /// The schema the tables live in (the first existing schema of the connection's search_path).
    schema: Arc<str>,
    /// NOTIFY channel for "events were appended", one per schema.
    channel: Arc<str>,
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

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::DISK_FULL) {
        return StoreError::Full("the PostgreSQL disk is full".into());
    }
    StoreError::Postgres(e)
}

impl PgStore {
    /// Connects to `url`, runs the migrations (idempotent, under an advisory lock) and starts the writer task.
    pub async fn open(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Config(format!("store.url is not a PostgreSQL URL: {e}")))?;
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        // One connection more than asked: the writer keeps one for itself.
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2) + 1)
            .build()
            .map_err(|e| StoreError::Config(format!("cannot build the PostgreSQL pool: {e}")))?;
        let mut client = pool.get().await?;
        let schema: Option<String> = client.query_one("SELECT current_schema()::text", &[]).await?.get(0);
        let schema = schema.ok_or_else(|| {
            StoreError::Config("the connection's search_path names no existing schema; create it first".into())
        })?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        drop(client);
        let channel: Arc<str> = channel_for(&schema).into();
        let (appends, rx) = mpsc::channel(4096);
        tokio::spawn(Writer { pool: pool.clone(), options, channel: channel.clone(), size: None }.run(rx));
        Ok(Self { pool, appends, config: Arc::new(config), schema: schema.into(), channel })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Writes a body and everything rendered from it, durably, in one transaction (shared with concurrent appends).
    pub async fn append(&self, ingested: Ingested) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.appends.send(PendingAppend { ingested, reply }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Leases up to `limit` ready events (oldest first) to `owner` until `now + lease_ms`, skipping rows another
    /// transaction is claiming (`SKIP LOCKED`) and events of `paused` app_ids. Expired leases are claimable.
    pub async fn claim(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Vec<String>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "WITH picked AS (
                     SELECT id FROM events
                     WHERE status IN ('pending', 'retrying') AND next_attempt_at <= $3
                       AND (lease_expires_at IS NULL OR lease_expires_at < $3)
                       AND NOT (app_id = ANY($5::text[]))
                     ORDER BY id LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 UPDATE events e SET lease_owner = $1, lease_expires_at = $2, lease_token = e.lease_token + 1
                 FROM picked WHERE e.id = picked.id
                 RETURNING e.id, e.event_id, e.kind, e.app_id, e.identity, e.payload, e.attempts, e.enqueued_at,
                           e.lease_token, e.source",
            )
            .await?;
        let rows = client.query(&stmt, &[&owner, &(now + lease_ms), &now, &limit, &paused]).await.map_err(pg_err)?;
        let mut out: Vec<Claimed> = rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                event_id: r.get(1),
                kind: CallKind::parse(r.get::<_, &str>(2)).unwrap_or(CallKind::Track),
                app_id: r.get(3),
                identity: r.get(4),
                payload: r.get::<_, Option<String>>(5).unwrap_or_default(),
                attempts: r.get(6),
                enqueued_at: r.get(7),
                lease_token: r.get(8),
                source: r.get(9),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        Ok(out)
    }

    /// Extends the leases `owner` still holds (same token) on `leases` (row id, lease token) until `until`.
    /// Returns how many were extended; fewer than asked means another worker took some over.
    pub async fn renew(&self, owner: &str, leases: Vec<(i64, i64)>, until: Millis) -> Result<usize, StoreError> {
        let (ids, tokens): (Vec<i64>, Vec<i64>) = leases.into_iter().unzip();
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE events e SET lease_expires_at = $4
                 FROM unnest($2::int8[], $3::int8[]) AS l(id, token)
                 WHERE e.id = l.id AND e.lease_token = l.token AND e.lease_owner = $1
                   AND e.status IN ('pending', 'retrying')",
                &[&owner, &ids, &tokens, &until],
            )
            .await
            .map_err(pg_err)?;
        Ok(n as usize)
    }

    /// Records attempts and outcomes in one transaction. Records whose lease token is stale are ignored (fencing);
    /// returns how many applied.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<usize, StoreError> {
        if records.is_empty() {
            return Ok(0);
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
        let applied = tx
            .query(
                "UPDATE events e SET
                     status = CASE WHEN r.release THEN e.status ELSE r.status END,
                     attempts = e.attempts + r.n,
                     next_attempt_at = r.next_at,
                     last_error = coalesce(r.err, e.last_error),
                     lease_owner = NULL, lease_expires_at = NULL,
                     updated_at = CASE WHEN r.release THEN e.updated_at ELSE $8 END
                 FROM unnest($1::int8[], $2::int8[], $3::bool[], $4::text[], $5::int8[], $6::int8[], $7::text[])
                      AS r(id, token, release, status, n, next_at, err)
                 WHERE e.id = r.id AND e.lease_token = r.token AND e.status IN ('pending', 'retrying')
                 RETURNING e.id",
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
                "INSERT INTO attempts (event_row, at, http_status, latency_ms, batch_size, error)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::int8[], $5::int8[], $6::text[])",
                &[&rows, &at, &status, &latency, &size, &error],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(applied.len())
    }

    /// Puts the selected events back in the queue (status pending, due now).
    pub async fn requeue(&self, selector: Selector) -> Result<i64, StoreError> {
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
            client.execute("SELECT pg_notify($1, '')", &[&&*self.channel]).await?;
        }
        Ok(n as i64)
    }

    /// Gives back every lease `owner` holds (shutdown), so other workers need not wait for them to expire.
    pub async fn release_owner(&self, owner: &str) -> Result<usize, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE events SET lease_owner = NULL, lease_expires_at = NULL
                 WHERE lease_owner = $1 AND status IN ('pending', 'retrying')",
                &[&owner],
            )
            .await
            .map_err(pg_err)?;
        Ok(n as usize)
    }

    /// Deletes delivered and replaced events (with their attempts) last updated before `before`, raw bodies no event
    /// refers to any more, and rate budgets untouched since. Returns the number of events deleted.
    pub async fn prune(&self, before: Millis) -> Result<usize, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query(
                "SELECT id FROM events WHERE status IN ('delivered', 'replaced') AND updated_at < $1 LIMIT $2",
                &[&before, &PRUNE_CHUNK],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute("DELETE FROM attempts WHERE event_row = ANY($1)", &[&ids]).await?;
        let n = tx.execute("DELETE FROM events WHERE id = ANY($1)", &[&ids]).await?;
        tx.execute(
            "DELETE FROM raw_bodies WHERE id IN (
                 SELECT r.id FROM raw_bodies r WHERE r.received_at < $1
                   AND NOT EXISTS (SELECT 1 FROM events e WHERE e.raw_id = r.id) LIMIT $2)",
            &[&before, &PRUNE_CHUNK],
        )
        .await?;
        tx.execute("DELETE FROM rate_budget WHERE at < $1", &[&before]).await?;
        tx.commit().await?;
        Ok(n as usize)
    }

    pub async fn list(&self, q: Query) -> Result<Vec<EventView>, StoreError> {
        let mut cond = vec!["1 = 1".to_owned()];
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut push = |sql: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            cond.push(format!("{sql} ${}", args.len()));
        };
        if let Some(s) = q.status {
            push("status =", Box::new(s.as_str()));
        }
        if let Some(s) = q.source {
            push("source =", Box::new(s));
        }
        if let Some(t) = q.since {
            push("received_at >=", Box::new(t));
        }
        if let Some(t) = q.until {
            push("received_at <", Box::new(t));
        }
        args.push(Box::new(if q.limit > 0 { q.limit } else { 100 }));
        let sql = format!(
            "SELECT {VIEW_COLUMNS} FROM events WHERE {} ORDER BY id DESC LIMIT ${}",
            cond.join(" AND "),
            args.len()
        );
        let client = self.pool.get().await?;
        let rows = client.query(&sql, &params(&args)).await?;
        Ok(rows.iter().map(|r| view(r).1).collect())
    }

    pub async fn get(&self, event_id: &str) -> Result<EventView, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(&format!("SELECT {VIEW_COLUMNS} FROM events WHERE event_id = $1"), &[&event_id])
            .await?
            .ok_or(StoreError::NotFound)?;
        let (id, mut v) = view(&row);
        let log = client
            .query(
                "SELECT at, http_status, latency_ms, batch_size, error FROM attempts WHERE event_row = $1 ORDER BY id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| AttemptView {
                at: iso(r.get(0)),
                http_status: r.get::<_, Option<i32>>(1).map(|s| s as u16),
                latency_ms: r.get(2),
                batch_size: r.get(3),
                error: r.get(4),
            })
            .collect();
        v.attempt_log = Some(log);
        Ok(v)
    }

    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        let client = self.pool.get().await?;
        let r = client
            .query_one(
                "SELECT (SELECT count(*) FROM events WHERE status IN ('pending', 'retrying')),
                        (SELECT min(enqueued_at) FROM events WHERE status IN ('pending', 'retrying')),
                        (SELECT count(*) FROM events WHERE status = 'dead')",
                &[],
            )
            .await?;
        Ok(QueueStats {
            ready_or_waiting: r.get(0),
            oldest_pending_ms: r.get(1),
            dead: r.get(2),
            db_bytes: schema_bytes(&client).await?,
        })
    }

    /// The raw bodies behind the selected events, for a re-render.
    pub async fn raw_bodies(&self, selector: Selector) -> Result<Vec<RawBody>, StoreError> {
        let (cond, args) = selector_sql(&selector, 1);
        let sql = format!(
            "SELECT r.id, r.source, r.template, r.received_at, r.body FROM raw_bodies r
             WHERE r.id IN (SELECT raw_id FROM events WHERE {cond} AND status != 'replaced') ORDER BY r.id"
        );
        let client = self.pool.get().await?;
        let rows = client.query(&sql, &params(&args)).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect())
    }

    /// Checks that the database answers (for /readyz).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.get().await?.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    /// Takes one event's worth from the shared budgets of each `(app_id, identity)` in `wants`, in order, and says
    /// for each whether it may go now (`None`) or how long until it may. Every instance on this database takes from
    /// the same rows, under row locks, so together they keep to one budget. A rate of 0 turns that budget off.
    pub async fn take_budget(
        &self,
        wants: &[(&str, &str)],
        app_per_min: u32,
        identity_per_min: u32,
        now: Millis,
    ) -> Result<Vec<Option<Duration>>, StoreError> {
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for &(app, who) in wants {
            if app_per_min > 0 {
                keys.push((app, ""));
            }
            if identity_per_min > 0 {
                keys.push((app, who));
            }
        }
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(vec![None; wants.len()]);
        }
        let (apps, whos): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Missing buckets start full; rows are created and then locked in key order, so takers never deadlock.
        tx.execute(
            "INSERT INTO rate_budget (app_id, identity, tokens, at)
             SELECT a, i, CASE WHEN i = '' THEN $3::float8 ELSE $4::float8 END, $5::int8 FROM unnest($1::text[], $2::text[]) AS k(a, i)
             ORDER BY a, i
             ON CONFLICT DO NOTHING",
            &[&apps, &whos, &(app_per_min as f64), &(identity_per_min as f64), &now],
        )
        .await
        .map_err(pg_err)?;
        let rows = tx
            .query(
                "SELECT b.app_id, b.identity, b.tokens, b.at FROM rate_budget b
                 JOIN unnest($1::text[], $2::text[]) AS k(a, i) ON b.app_id = k.a AND b.identity = k.i
                 ORDER BY b.app_id, b.identity
                 FOR UPDATE OF b",
                &[&apps, &whos],
            )
            .await
            .map_err(pg_err)?;
        let mut buckets: HashMap<(String, String), SharedBucket> =
            rows.iter().map(|r| ((r.get(0), r.get(1)), SharedBucket { tokens: r.get(2), at: r.get(3) })).collect();
        let verdicts = take_shared(&mut buckets, wants, app_per_min, identity_per_min, now);
        let mut sorted: Vec<_> = buckets.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut a, mut i, mut t, mut at) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((app, who), b) in sorted {
            a.push(app);
            i.push(who);
            t.push(b.tokens);
            at.push(b.at);
        }
        tx.execute(
            "UPDATE rate_budget b SET tokens = k.t, at = k.at
             FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[]) AS k(a, i, t, at)
             WHERE b.app_id = k.a AND b.identity = k.i",
            &[&a, &i, &t, &at],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(verdicts)
    }

    /// LISTENs on this schema's channel on a connection of its own and calls `on_append` for every notification
    /// (events appended by any instance, or requeued). Reconnects after a lost connection; the workers' poll
    /// interval covers the gap.
    pub fn spawn_listener(&self, on_append: impl Fn() + Send + Sync + 'static) -> tokio::task::JoinHandle<()> {
        let config = self.config.clone();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            loop {
                match listen(&config, &channel, &on_append).await {
                    Ok(()) => tracing::warn!("the LISTEN connection to PostgreSQL closed; reconnecting"),
                    Err(e) => tracing::warn!(error = %e, "the LISTEN connection to PostgreSQL failed; reconnecting"),
                }
                // Whatever arrived meanwhile: let the workers look.
                on_append();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    channel: &str,
    on_append: &(impl Fn() + Send + Sync),
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL LISTEN connection error");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\""))).await?;
    while rx.recv().await.is_some() {
        on_append();
    }
    driver.abort();
    Ok(())
}

async fn schema_bytes(client: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'",
            &[],
        )
        .await
        .map(|r| r.get(0))
}

fn params(args: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// The WHERE condition for a selector, with placeholders numbered from `first`.
fn selector_sql(sel: &Selector, first: usize) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    match sel {
        Selector::Id(id) => (format!("event_id = ${first}"), vec![Box::new(id.clone())]),
        Selector::Status(s) => (format!("status = ${first}"), vec![Box::new(s.as_str())]),
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

const VIEW_COLUMNS: &str =
    "id, event_id, status, source, template, kind, app_id, identity, idempotency_key, item_index,
     attempts, received_at, updated_at, next_attempt_at, last_error, payload";

fn view(r: &tokio_postgres::Row) -> (i64, EventView) {
    let status = Status::parse(r.get(2)).unwrap_or(Status::Pending);
    let payload: Option<&str> = r.get(15);
    let waiting = matches!(status, Status::Pending | Status::Retrying);
    (
        r.get(0),
        EventView {
            id: r.get(1),
            status: status.as_str(),
            source: r.get(3),
            template: r.get(4),
            kind: CallKind::parse(r.get(5)).map_or("track", CallKind::as_str),
            app_id: r.get(6),
            identity: r.get(7),
            idempotency_key: r.get(8),
            item_index: r.get(9),
            attempts: r.get(10),
            received_at: iso(r.get(11)),
            updated_at: iso(r.get(12)),
            next_attempt_at: waiting.then(|| iso(r.get(13))),
            last_error: r.get(14),
            payload: payload.and_then(|p| serde_json::from_str(p).ok()),
            attempt_log: None,
        },
    )
}

/// The one task that writes appends: group commit.
struct Writer {
    pool: Pool,
    options: PgOptions,
    channel: Arc<str>,
    /// Last measured size of the schema's tables and when it was measured.
    size: Option<(i64, std::time::Instant)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<PendingAppend>) {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            self.apply(group).await;
        }
    }

    async fn apply(&mut self, group: Vec<PendingAppend>) {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let why = e.to_string();
                for p in group {
                    let _ = p.reply.send(Err(StoreError::Pool(why.clone())));
                }
                return;
            }
        };
        if let Some(why) = self.over_limit(&client).await {
            for p in group {
                let _ = p.reply.send(Err(StoreError::Full(why.clone())));
            }
            return;
        }
        let bodies: Vec<&Ingested> = group.iter().map(|p| &p.ingested).collect();
        match append_all(&mut client, &bodies, &self.channel).await {
            Ok(()) => {
                // A caller that gave up (timed-out request) is fine to ignore: its work is committed either way.
                for p in group {
                    let _ = p.reply.send(Ok(()));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.into_iter().next().map(|p| p.reply.send(Err(pg_err(e))));
            }
            Err(e) => {
                tracing::warn!(error = %e, appends = group.len(), "group append failed; writing each alone");
                for p in group {
                    let res = append_all(&mut client, &[&p.ingested], &self.channel).await.map_err(pg_err);
                    let _ = p.reply.send(res);
                }
            }
        }
    }

    /// Why the schema may take no more, if it may not (store.max_bytes), measured at most once a second.
    async fn over_limit(&mut self, client: &tokio_postgres::Client) -> Option<String> {
        let max = self.options.max_bytes;
        if max == 0 {
            return None;
        }
        let used = match self.size {
            Some((bytes, at)) if at.elapsed() < SIZE_CHECK_EVERY => bytes,
            _ => {
                let bytes = schema_bytes(client).await.unwrap_or(0);
                self.size = Some((bytes, std::time::Instant::now()));
                bytes
            }
        };
        (used as u64 >= max).then(|| format!("the schema holds {used} bytes; store.max_bytes is {max}"))
    }
}

/// Writes `bodies` (raw rows, event rows, rejection rows, re-render supersessions) in one transaction and NOTIFYs.
async fn append_all(
    client: &mut deadpool_postgres::Client,
    bodies: &[&Ingested],
    channel: &str,
) -> Result<(), tokio_postgres::Error> {
    let now = now_ms();
    let tx = client.transaction().await?;
    let replays: Vec<i64> = bodies.iter().filter_map(|b| b.replay_of_raw).collect();
    if !replays.is_empty() {
        tx.execute(
            "UPDATE events SET status = 'replaced', updated_at = $2, lease_owner = NULL, lease_expires_at = NULL
             WHERE raw_id = ANY($1) AND status != 'replaced'",
            &[&replays, &now],
        )
        .await?;
    }
    let fresh: Vec<&Ingested> = bodies.iter().copied().filter(|b| b.replay_of_raw.is_none()).collect();
    let mut raw_ids: Vec<i64> = Vec::new();
    if !fresh.is_empty() {
        raw_ids = tx
            .query(
                "SELECT nextval(pg_get_serial_sequence('raw_bodies', 'id')) FROM generate_series(1, $1::int4)",
                &[&(fresh.len() as i32)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let sources: Vec<&str> = fresh.iter().map(|b| b.source.as_str()).collect();
        let templates: Vec<&str> = fresh.iter().map(|b| b.template.as_str()).collect();
        let received: Vec<i64> = fresh.iter().map(|b| b.received_at).collect();
        let raw: Vec<&[u8]> = fresh.iter().map(|b| b.body.as_slice()).collect();
        tx.execute(
            "INSERT INTO raw_bodies (id, source, template, received_at, body)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::bytea[])",
            &[&raw_ids, &sources, &templates, &received, &raw],
        )
        .await?;
    }
    let mut fresh_ids = raw_ids.into_iter();
    let mut cols = EventColumns::default();
    let mut pending = 0usize;
    for b in bodies {
        let raw_id = match b.replay_of_raw {
            Some(id) => id,
            None => fresh_ids.next().unwrap_or_default(),
        };
        for e in &b.events {
            cols.push(b, raw_id, &e.event_id, e.item_index, e.kind.as_str(), &e.app_id, &e.identity);
            cols.key.push(e.idempotency_key.as_deref());
            cols.payload.push(Some(e.payload.as_str()));
            cols.status.push("pending");
            cols.error.push(None);
            pending += 1;
        }
        for r in &b.rejections {
            cols.push(b, raw_id, &r.event_id, r.item_index, "track", "", "");
            cols.key.push(None);
            cols.payload.push(None);
            cols.status.push("rejected");
            cols.error.push(Some(format!("{}: {}", r.field, r.message)));
        }
    }
    if !cols.event_id.is_empty() {
        tx.execute(
            "INSERT INTO events (event_id, raw_id, item_index, source, template, kind, app_id, identity,
                                 idempotency_key, payload, status, enqueued_at, next_attempt_at, received_at,
                                 updated_at, last_error)
             SELECT u.event_id, u.raw_id, u.item_index, u.source, u.template, u.kind, u.app_id, u.identity,
                    u.key, u.payload, u.status, $14, $14, u.received_at, $14, u.error
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[])
                  AS u(event_id, raw_id, item_index, source, template, kind, app_id, identity, key, payload, status,
                       received_at, error)",
            &[
                &cols.event_id,
                &cols.raw_id,
                &cols.item_index,
                &cols.source,
                &cols.template,
                &cols.kind,
                &cols.app_id,
                &cols.identity,
                &cols.key,
                &cols.payload,
                &cols.status,
                &cols.received_at,
                &cols.error,
                &now,
            ],
        )
        .await?;
    }
    if pending > 0 || !replays.is_empty() {
        // Delivered to listeners at COMMIT, and only if it commits.
        tx.execute("SELECT pg_notify($1, '')", &[&channel]).await?;
    }
    tx.commit().await
}

/// Column arrays for one `INSERT … SELECT … FROM unnest(…)` of event rows.
#[derive(Default)]
struct EventColumns<'a> {
    event_id: Vec<&'a str>,
    raw_id: Vec<i64>,
    item_index: Vec<i64>,
    source: Vec<&'a str>,
    template: Vec<&'a str>,
    kind: Vec<&'a str>,
    app_id: Vec<&'a str>,
    identity: Vec<&'a str>,
    key: Vec<Option<&'a str>>,
    payload: Vec<Option<&'a str>>,
    status: Vec<&'a str>,
    received_at: Vec<i64>,
    error: Vec<Option<String>>,
}

impl<'a> EventColumns<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        b: &'a Ingested,
        raw_id: i64,
        event_id: &'a str,
        item_index: i64,
        kind: &'a str,
        app_id: &'a str,
        identity: &'a str,
    ) {
        self.event_id.push(event_id);
        self.raw_id.push(raw_id);
        self.item_index.push(item_index);
        self.source.push(&b.source);
        self.template.push(&b.template);
        self.kind.push(kind);
        self.app_id.push(app_id);
        self.identity.push(identity);
        self.received_at.push(b.received_at);
    }
}
