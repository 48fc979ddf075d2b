//! The embedded default store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! All writes go through one writer thread. It takes every command waiting in its channel, applies them in one
//! transaction (each under its own savepoint, so one failure does not undo its neighbours) and answers them only
//! after the commit: concurrent requests share one fsync (group commit), and a 202 always follows a durable write.
//! Reads (the delivery log, queue figures) use a separate connection; WAL lets them run beside the writer.

use super::*;
use rusqlite::{Connection, params};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

mod log;
use log::{get, list, raw_bodies, stats};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_bodies (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    template    TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    body        BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id               INTEGER PRIMARY KEY,
    event_id         TEXT    NOT NULL UNIQUE,
    raw_id           INTEGER,
    item_index       INTEGER NOT NULL,
    source           TEXT    NOT NULL,
    template         TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    app_id           TEXT    NOT NULL,
    identity         TEXT    NOT NULL,
    idempotency_key  TEXT,
    payload          TEXT,
    status           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    enqueued_at      INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    lease_token      INTEGER NOT NULL DEFAULT 0,
    received_at      INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    last_error       TEXT
);
CREATE INDEX IF NOT EXISTS events_ready ON events (next_attempt_at) WHERE status IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS events_status_time ON events (status, received_at);
CREATE INDEX IF NOT EXISTS events_raw ON events (raw_id);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    event_row   INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    http_status INTEGER,
    latency_ms  INTEGER NOT NULL,
    batch_size  INTEGER NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS attempts_event ON attempts (event_row);
";

/// Commands waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// Refuse new bodies once the database holds this many bytes (0: no limit).
    pub max_bytes: u64,
}

enum Cmd {
    Append(Ingested, oneshot::Sender<Result<(), StoreError>>),
    Claim {
        owner: String,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Vec<String>,
        reply: oneshot::Sender<Result<Vec<Claimed>, StoreError>>,
    },
    Record(Vec<AttemptRecord>, oneshot::Sender<Result<usize, StoreError>>),
    Requeue(Selector, Millis, oneshot::Sender<Result<i64, StoreError>>),
    Release {
        owner: String,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    Prune {
        before: Millis,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    tx: mpsc::SyncSender<Cmd>,
    reader: Arc<Mutex<Connection>>,
    counters: Arc<WriterCounters>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts its writer thread.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        let reader = open(path)?;
        let (tx, rx) = mpsc::sync_channel::<Cmd>(4096);
        let counters = Arc::new(WriterCounters::default());
        let writer_counters = counters.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || Writer { conn: writer, options, counters: writer_counters }.run(rx))?;
        Ok(Self { tx, reader: Arc::new(Mutex::new(reader)), counters, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = make(reply);
        // The channel is bounded; a full channel means the writer is far behind, and waiting is the right answer.
        // Waiting blocks, so only then is a blocking thread worth its hand-off (measured: one per request cost more
        // than the send itself).
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(StoreError::Closed),
            Err(mpsc::TrySendError::Full(cmd)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(cmd))
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .map_err(|_| StoreError::Closed)?;
            }
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes a body and everything rendered from it, durably, in one transaction.
    pub async fn append(&self, mut ingested: Ingested) -> Result<(), StoreError> {
        // Compressed here, on the caller's thread, so the one writer thread only writes (fewer bytes per fsync).
        if ingested.replay_of_raw.is_none() {
            ingested.body = compress_body(std::mem::take(&mut ingested.body));
        }
        self.call(|r| Cmd::Append(ingested, r)).await
    }

    /// Leases up to `limit` ready events (oldest first) to `owner` until `now + lease_ms`. Events of `paused`
    /// app_ids are left alone.
    pub async fn claim(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Vec<String>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let owner = owner.to_owned();
        self.call(|reply| Cmd::Claim { owner, now, lease_ms, limit, paused, reply }).await
    }

    /// Records attempts and their outcomes. A record whose lease token is stale (the lease expired and another
    /// worker took the event) is ignored; the count of applied records is returned.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<usize, StoreError> {
        self.call(|r| Cmd::Record(records, r)).await
    }

    /// Puts the selected events back in the queue, due now. Returns how many.
    pub async fn requeue(&self, selector: Selector) -> Result<i64, StoreError> {
        self.call(|r| Cmd::Requeue(selector, now_ms(), r)).await
    }

    /// Gives back every lease `owner` holds (shutdown), so another worker can take the events at once.
    pub async fn release_owner(&self, owner: &str) -> Result<usize, StoreError> {
        let owner = owner.to_owned();
        self.call(|reply| Cmd::Release { owner, reply }).await
    }

    /// Deletes delivered and replaced events (with their attempts) last updated before `before`, and raw bodies no
    /// event refers to any more. Returns the number of events deleted.
    pub async fn prune(&self, before: Millis) -> Result<usize, StoreError> {
        self.call(|reply| Cmd::Prune { before, reply }).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    pub async fn list(&self, q: Query) -> Result<Vec<EventView>, StoreError> {
        self.read(move |c| list(c, &q)).await
    }

    pub async fn get(&self, event_id: &str) -> Result<EventView, StoreError> {
        let id = event_id.to_owned();
        self.read(move |c| get(c, &id)).await
    }

    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        let mut s = self.read(stats).await?;
        s.commits = Some(self.counters.commits.load(Ordering::Relaxed));
        s.bodies_committed = Some(self.counters.bodies.load(Ordering::Relaxed));
        Ok(s)
    }

    /// The raw bodies behind the selected events, for a re-render: (raw id, source, template, received_at, body).
    pub async fn raw_bodies(
        &self,
        selector: Selector,
    ) -> Result<Vec<(i64, String, String, Millis, Vec<u8>)>, StoreError> {
        self.read(move |c| raw_bodies(c, &selector)).await
    }

    /// Checks that the database answers (for /readyz).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }
}

struct Writer {
    conn: Connection,
    options: SqliteOptions,
    counters: Arc<WriterCounters>,
}

/// What the writer has committed since start; read by `stats` for /metrics and by the group-commit test.
#[derive(Debug, Default)]
struct WriterCounters {
    commits: AtomicU64,
    bodies: AtomicU64,
}

/// A command's answer, held until its transaction commits.
enum Reply {
    Unit(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
    Claimed(oneshot::Sender<Result<Vec<Claimed>, StoreError>>, Result<Vec<Claimed>, StoreError>),
    Count(oneshot::Sender<Result<usize, StoreError>>, Result<usize, StoreError>),
    Long(oneshot::Sender<Result<i64, StoreError>>, Result<i64, StoreError>),
}

impl Reply {
    fn send(self, commit: &Result<(), String>) {
        fn after<T>(r: Result<T, StoreError>, commit: &Result<(), String>) -> Result<T, StoreError> {
            match commit {
                Ok(()) => r,
                Err(e) if is_full_message(e) => Err(StoreError::Full(e.clone())),
                Err(e) => Err(StoreError::Io(std::io::Error::other(e.clone()))),
            }
        }
        // A caller that gave up (timed-out request) is fine to ignore: its work is committed either way.
        match self {
            Reply::Unit(tx, r) => drop(tx.send(after(r, commit))),
            Reply::Claimed(tx, r) => drop(tx.send(after(r, commit))),
            Reply::Count(tx, r) => drop(tx.send(after(r, commit))),
            Reply::Long(tx, r) => drop(tx.send(after(r, commit))),
        }
    }
}

fn is_full_message(e: &str) -> bool {
    e.contains("database or disk is full") || e.contains("No space left")
}

fn full_or(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == rusqlite::ErrorCode::DiskFull {
            return StoreError::Full("the disk is full".into());
        }
    }
    StoreError::Sqlite(e)
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            self.apply(group);
        }
    }

    fn apply(&mut self, group: Vec<Cmd>) {
        let appends = group.iter().filter(|c| matches!(c, Cmd::Append(..))).count() as u64;
        let has_append = appends > 0;
        let full = if has_append { self.over_limit() } else { None };
        let mut replies = Vec::with_capacity(group.len());
        let commit = (|| -> Result<(), String> {
            let tx = self.conn.transaction().map_err(|e| e.to_string())?;
            for cmd in group {
                replies.push(match cmd {
                    Cmd::Append(ing, r) => {
                        let res = match &full {
                            Some(why) => Err(StoreError::Full(why.clone())),
                            None => in_savepoint(&tx, |t| append(t, &ing)),
                        };
                        Reply::Unit(r, res)
                    }
                    Cmd::Claim { owner, now, lease_ms, limit, paused, reply } => {
                        Reply::Claimed(reply, in_savepoint(&tx, |t| claim(t, &owner, now, lease_ms, limit, &paused)))
                    }
                    Cmd::Record(recs, r) => Reply::Count(r, in_savepoint(&tx, |t| record(t, &recs))),
                    Cmd::Requeue(sel, now, r) => Reply::Long(r, in_savepoint(&tx, |t| requeue(t, &sel, now))),
                    Cmd::Release { owner, reply } => Reply::Count(reply, in_savepoint(&tx, |t| release(t, &owner))),
                    Cmd::Prune { before, reply } => Reply::Count(reply, in_savepoint(&tx, |t| prune(t, before))),
                });
            }
            tx.commit().map_err(|e| e.to_string())
        })();
        match &commit {
            Ok(()) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.bodies.fetch_add(appends, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; every command in the group is answered with an error")
            }
        }
        for r in replies {
            r.send(&commit);
        }
    }

    /// Why the database may take no more, if it may not.
    fn over_limit(&self) -> Option<String> {
        if self.options.max_bytes == 0 {
            return None;
        }
        let q = |p: &str| self.conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0);
        let used = (q("page_count") - q("freelist_count")) * q("page_size");
        (used as u64 >= self.options.max_bytes)
            .then(|| format!("the database holds {used} bytes; store.max_bytes is {}", self.options.max_bytes))
    }
}

fn in_savepoint<T>(
    tx: &rusqlite::Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Cached statements: parsing these two for every command showed in the writer's profile.
    tx.prepare_cached("SAVEPOINT cmd").and_then(|mut s| s.execute([])).map_err(full_or)?;
    match f(tx) {
        Ok(v) => {
            tx.prepare_cached("RELEASE cmd").and_then(|mut s| s.execute([])).map_err(full_or)?;
            Ok(v)
        }
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
            Err(e)
        }
    }
}

fn append(c: &Connection, ing: &Ingested) -> Result<(), StoreError> {
    let raw_id = match ing.replay_of_raw {
        Some(id) => {
            c.execute(
                "UPDATE events SET status = 'replaced', updated_at = ?2, lease_owner = NULL, lease_expires_at = NULL
                 WHERE raw_id = ?1 AND status != 'replaced'",
                params![id, now_ms()],
            )
            .map_err(full_or)?;
            id
        }
        None => {
            c.prepare_cached("INSERT INTO raw_bodies (source, template, received_at, body) VALUES (?1, ?2, ?3, ?4)")
                .map_err(full_or)?
                .execute(params![ing.source, ing.template, ing.received_at, ing.body])
                .map_err(full_or)?;
            c.last_insert_rowid()
        }
    };
    let now = now_ms();
    let mut ins = c
        .prepare_cached(
            "INSERT INTO events (event_id, raw_id, item_index, source, template, kind, app_id, identity, idempotency_key,
                                 payload, status, enqueued_at, next_attempt_at, received_at, updated_at, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?12, ?14)",
        )
        .map_err(full_or)?;
    for e in &ing.events {
        ins.execute(params![
            e.event_id,
            raw_id,
            e.item_index,
            ing.source,
            ing.template,
            e.kind.as_str(),
            e.app_id,
            e.identity,
            e.idempotency_key,
            e.payload,
            "pending",
            now,
            ing.received_at,
            Option::<String>::None
        ])
        .map_err(full_or)?;
    }
    for r in &ing.rejections {
        ins.execute(params![
            r.event_id,
            raw_id,
            r.item_index,
            ing.source,
            ing.template,
            "track",
            "",
            "",
            Option::<String>::None,
            Option::<String>::None,
            "rejected",
            now,
            ing.received_at,
            format!("{}: {}", r.field, r.message)
        ])
        .map_err(full_or)?;
    }
    Ok(())
}

fn claim(
    c: &Connection,
    owner: &str,
    now: Millis,
    lease_ms: i64,
    limit: i64,
    paused: &[String],
) -> Result<Vec<Claimed>, StoreError> {
    let paused = serde_json::to_string(paused).unwrap_or_else(|_| "[]".into());
    let mut stmt = c.prepare_cached(
        "UPDATE events SET lease_owner = ?1, lease_expires_at = ?2, lease_token = lease_token + 1
         WHERE id IN (
             SELECT id FROM events
             WHERE status IN ('pending', 'retrying') AND next_attempt_at <= ?3
               AND (lease_expires_at IS NULL OR lease_expires_at < ?3)
               AND app_id NOT IN (SELECT value FROM json_each(?5))
             ORDER BY id LIMIT ?4)
         RETURNING id, event_id, kind, app_id, identity, payload, attempts, enqueued_at, lease_token, source",
    )?;
    let mut rows: Vec<Claimed> = stmt
        .query_map(params![owner, now + lease_ms, now, limit, paused], |r| {
            Ok(Claimed {
                id: r.get(0)?,
                event_id: r.get(1)?,
                kind: CallKind::parse(&r.get::<_, String>(2)?).unwrap_or(CallKind::Track),
                app_id: r.get(3)?,
                identity: r.get(4)?,
                payload: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                attempts: r.get(6)?,
                enqueued_at: r.get(7)?,
                lease_token: r.get(8)?,
                source: r.get(9)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

fn record(c: &Connection, recs: &[AttemptRecord]) -> Result<usize, StoreError> {
    let now = now_ms();
    let mut applied = 0;
    for r in recs {
        let n = match &r.resolution {
            Resolution::Release { at } => c
                .prepare_cached(
                    "UPDATE events SET next_attempt_at = ?3, lease_owner = NULL, lease_expires_at = NULL
                     WHERE id = ?1 AND lease_token = ?2 AND status IN ('pending', 'retrying')",
                )?
                .execute(params![r.id, r.lease_token, at])?,
            resolution => {
                let (status, next) = match resolution {
                    Resolution::Delivered => ("delivered", now),
                    Resolution::Retry { at } => ("retrying", *at),
                    _ => ("dead", now),
                };
                c.prepare_cached(
                    "UPDATE events SET status = ?3, attempts = attempts + ?4, next_attempt_at = ?5,
                                       last_error = coalesce(?6, last_error), lease_owner = NULL, lease_expires_at = NULL,
                                       updated_at = ?7
                     WHERE id = ?1 AND lease_token = ?2 AND status IN ('pending', 'retrying')",
                )?
                .execute(params![r.id, r.lease_token, status, r.attempts.len() as i64, next, r.error, now])?
            }
        };
        // A stale lease token means another worker owns the event now: its attempts are its own to record.
        if n == 1 {
            applied += 1;
            let mut att = c.prepare_cached(
                "INSERT INTO attempts (event_row, at, http_status, latency_ms, batch_size, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for a in &r.attempts {
                att.execute(params![r.id, a.at, a.http_status, a.latency_ms, a.batch_size, a.error])?;
            }
        }
    }
    Ok(applied)
}

fn selector_sql(sel: &Selector) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    match sel {
        Selector::Id(id) => ("event_id = ?".into(), vec![V::Text(id.clone())]),
        Selector::Status(s) => ("status = ?".into(), vec![V::Text(s.as_str().into())]),
        Selector::Range { from, to, status } => {
            let mut sql = "received_at >= ? AND received_at < ?".to_owned();
            let mut args = vec![V::Integer(*from), V::Integer(*to)];
            if let Some(s) = status {
                sql.push_str(" AND status = ?");
                args.push(V::Text(s.as_str().into()));
            }
            (sql, args)
        }
    }
}

fn requeue(c: &Connection, sel: &Selector, now: Millis) -> Result<i64, StoreError> {
    let (cond, args) = selector_sql(sel);
    let sql = format!(
        "UPDATE events SET status = 'pending', next_attempt_at = ?, enqueued_at = ?, updated_at = ?,
                lease_owner = NULL, lease_expires_at = NULL
         WHERE {cond} AND status IN ('dead', 'delivered', 'retrying', 'pending') AND payload IS NOT NULL"
    );
    let mut all = vec![rusqlite::types::Value::Integer(now); 3];
    all.extend(args);
    Ok(c.execute(&sql, rusqlite::params_from_iter(all))? as i64)
}

fn release(c: &Connection, owner: &str) -> Result<usize, StoreError> {
    Ok(c.execute(
        "UPDATE events SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = ?1 AND status IN ('pending', 'retrying')",
        params![owner],
    )?)
}

/// Rows deleted per prune call, so one prune never holds the write lock for long.
const PRUNE_CHUNK: i64 = 5000;

fn prune(c: &Connection, before: Millis) -> Result<usize, StoreError> {
    c.execute(
        "DELETE FROM attempts WHERE event_row IN (
             SELECT id FROM events WHERE status IN ('delivered', 'replaced') AND updated_at < ?1 LIMIT ?2)",
        params![before, PRUNE_CHUNK],
    )?;
    let n = c.execute(
        "DELETE FROM events WHERE id IN (
             SELECT id FROM events WHERE status IN ('delivered', 'replaced') AND updated_at < ?1 LIMIT ?2)",
        params![before, PRUNE_CHUNK],
    )?;
    c.execute(
        "DELETE FROM raw_bodies WHERE id IN (
             SELECT r.id FROM raw_bodies r WHERE r.received_at < ?1
               AND NOT EXISTS (SELECT 1 FROM events e WHERE e.raw_id = r.id) LIMIT ?2)",
        params![before, PRUNE_CHUNK],
    )?;
    Ok(n)
}

/// zstd's frame magic. A JSON body cannot start with it, so bodies stored before compression read back as they are.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Fast level: bodies are small and the CPU is shared with rendering; level 1 already takes JSON to a third or less.
const ZSTD_LEVEL: i32 = 1;

/// A raw body as stored: zstd-compressed when that is smaller, else as received.
fn compress_body(body: Vec<u8>) -> Vec<u8> {
    thread_local! {
        // One context per thread: creating a zstd context costs more than compressing a 3 KB body (profiled).
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    }
    let compressed = COMPRESSOR.with(|c| c.borrow_mut().as_mut().map(|c| c.compress(&body)));
    match compressed {
        Some(Ok(z)) if z.len() < body.len() => z,
        _ => body,
    }
}

fn decompress_body(stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if !stored.starts_with(&ZSTD_MAGIC) {
        return Ok(stored);
    }
    zstd::stream::decode_all(stored.as_slice()).map_err(StoreError::Io)
}

#[cfg(test)]
mod tests {

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteOptions { max_bytes: 0 }).unwrap();
        let appends = (0..64).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(Ingested {
                        source: "heap".into(),
                        template: "track".into(),
                        body: format!("{{\"n\": {i}}}").into_bytes(),
                        received_at: 0,
                        events: Vec::new(),
                        rejections: Vec::new(),
                        replay_of_raw: None,
                    })
                    .await
            })
        });
        for a in futures_util::future::join_all(appends).await {
            a.unwrap().unwrap();
        }
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.bodies_committed, Some(64));
        let commits = stats.commits.unwrap();
        assert!(commits < 32, "64 concurrent appends took {commits} commits; group commit should share them");
    }
    use super::*;

    #[test]
    fn raw_bodies_read_back_as_received_whether_stored_compressed_or_not() {
        let body = br#"{"profiles":[{"identity":"u_1"},{"identity":"u_1"},{"identity":"u_1"}]}"#.repeat(20);
        let stored = compress_body(body.clone());
        assert!(stored.starts_with(&ZSTD_MAGIC) && stored.len() < body.len());
        assert_eq!(decompress_body(stored).unwrap(), body);
        // Stored before compression existed, or not worth compressing: kept as received.
        let small = br#"{}"#.to_vec();
        assert_eq!(compress_body(small.clone()), small);
        assert_eq!(decompress_body(small.clone()).unwrap(), small);
    }
}
