//! The ingest log: the only database file an ingest commit waits on, and the only writer that writes it.
//!
//! One append per request: a row holding the raw body and the items rendered from it (both compressed), keyed by a
//! sequence number that only grows. The dedupe record of a request (its body hash, or its items' message ids) is
//! written in the same commit, so that a sender's retry after a crash between commit and answer is recognised.
//! One writer thread takes every append waiting in its channel and commits them together (group commit); each
//! caller is answered only after the fsync. Delivery never writes here: its books are another file (`books`).

use super::codec::{self, pack};
use crate::store::{Appended, Ingested, Millis, StoreError};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use tokio::sync::oneshot;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    -- AUTOINCREMENT: a sequence number is never handed out twice, even after the newest entry is pruned.
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    environment TEXT    NOT NULL DEFAULT '',
    template    TEXT    NOT NULL,
    n_events    INTEGER NOT NULL,
    n_rejected  INTEGER NOT NULL,
    replay_of   INTEGER,
    body        BLOB,
    items       BLOB    NOT NULL
);
-- Only entries with refusals or re-renders are indexed: an ordinary append touches the table alone.
CREATE INDEX IF NOT EXISTS log_rejected ON log (seq) WHERE n_rejected > 0;
CREATE INDEX IF NOT EXISTS log_replays ON log (replay_of) WHERE replay_of IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedupe (
    key       TEXT    PRIMARY KEY,
    at        INTEGER NOT NULL,
    event_ids TEXT    NOT NULL
) WITHOUT ROWID;
";

/// Appends waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

pub enum Cmd {
    Append(Box<Prepared>, oneshot::Sender<Result<Appended, StoreError>>),
    /// Deletes the given entries and dedupe records older than `dedupe_before`; answers the events deleted.
    Prune {
        seqs: Vec<i64>,
        dedupe_before: Millis,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// An append with its items already encoded, on the caller's thread: the one writer thread only writes.
pub struct Prepared {
    pub ing: Ingested,
    /// `codec::encode_items` of every event (re-encoded by the writer only if the dedupe drops some).
    pub items: Vec<u8>,
    pub n_events: i64,
    pub n_rejected: i64,
}

impl Prepared {
    pub fn new(mut ing: Ingested) -> Result<Self, StoreError> {
        if ing.replay_of_raw.is_none() {
            ing.body = codec::compress(std::mem::take(&mut ing.body));
        }
        let (items, n_events, n_rejected) = codec::encode_items(&ing, &vec![true; ing.events.len()])?;
        Ok(Self { ing, items, n_events, n_rejected })
    }
}

/// What the writer has committed since start; read by `stats` for /metrics and by the tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub bodies: AtomicU64,
}

pub struct Writer {
    pub conn: Connection,
    pub max_bytes: u64,
    pub dedupe_window_ms: i64,
    pub counters: Arc<Counters>,
    /// Bytes the books file holds, kept up to date by the books; `max_bytes` counts both files.
    pub books_bytes: Arc<AtomicI64>,
}

enum Reply {
    Append(oneshot::Sender<Result<Appended, StoreError>>, Result<Appended, StoreError>),
    Count(oneshot::Sender<Result<usize, StoreError>>, Result<usize, StoreError>),
}

impl Writer {
    pub fn run(mut self, rx: mpsc::Receiver<Cmd>) {
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
        let full = if appends > 0 { self.over_limit() } else { None };
        let window = self.dedupe_window_ms;
        let mut replies = Vec::with_capacity(group.len());
        let commit = (|| -> Result<(), String> {
            let tx = self.conn.transaction().map_err(|e| e.to_string())?;
            // Keys written earlier in this same transaction: a retry can arrive in the same group as its original.
            let mut fresh: HashMap<String, String> = HashMap::new();
            for cmd in group {
                replies.push(match cmd {
                    Cmd::Append(prepared, r) => {
                        let res = match &full {
                            Some(why) => Err(StoreError::Full(why.clone())),
                            None => in_savepoint(&tx, |t| append(t, &prepared, window, &mut fresh)),
                        };
                        Reply::Append(r, res)
                    }
                    Cmd::Prune { seqs, dedupe_before, reply } => {
                        Reply::Count(reply, in_savepoint(&tx, |t| prune(t, &seqs, dedupe_before)))
                    }
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
                tracing::error!(error = %e, "ingest log commit failed; every append in the group is answered with an error")
            }
        }
        for r in replies {
            match r {
                Reply::Append(tx, res) => drop(tx.send(after_commit(res, &commit))),
                Reply::Count(tx, res) => drop(tx.send(after_commit(res, &commit))),
            }
        }
    }

    /// Why the store may take no more, if it may not: both files together against `store.max_bytes`.
    fn over_limit(&self) -> Option<String> {
        if self.max_bytes == 0 {
            return None;
        }
        let used = used_bytes(&self.conn) + self.books_bytes.load(Ordering::Relaxed);
        (used as u64 >= self.max_bytes)
            .then(|| format!("the store holds {used} bytes; store.max_bytes is {}", self.max_bytes))
    }
}

/// Bytes in use in a database file (pages minus free pages).
pub fn used_bytes(c: &Connection) -> i64 {
    let q = |p: &str| c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0);
    (q("page_count") - q("freelist_count")) * q("page_size")
}

fn after_commit<T>(r: Result<T, StoreError>, commit: &Result<(), String>) -> Result<T, StoreError> {
    match commit {
        Ok(()) => r,
        // A caller that gave up (timed-out request) is fine to ignore: its work is committed either way.
        Err(e) if e.contains("database or disk is full") || e.contains("No space left") => {
            Err(StoreError::Full(e.clone()))
        }
        Err(e) => Err(StoreError::Io(std::io::Error::other(e.clone()))),
    }
}

pub fn full_or(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == rusqlite::ErrorCode::DiskFull {
            return StoreError::Full("the disk is full".into());
        }
    }
    StoreError::Sqlite(e)
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

/// The first delivery's ids for `key`, if it was stored at or after `since`.
fn seen(
    c: &Connection,
    fresh: &HashMap<String, String>,
    key: &str,
    since: Millis,
) -> Result<Option<String>, StoreError> {
    if let Some(ids) = fresh.get(key) {
        return Ok(Some(ids.clone()));
    }
    Ok(c.prepare_cached("SELECT event_ids FROM dedupe WHERE key = ?1 AND at >= ?2")?
        .query_row(params![key, since], |r| r.get::<_, String>(0))
        .optional()?)
}

fn remember(
    c: &Connection,
    fresh: &mut HashMap<String, String>,
    key: &str,
    at: Millis,
    ids: &str,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO dedupe (key, at, event_ids) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET at = excluded.at, event_ids = excluded.event_ids",
    )
    .map_err(full_or)?
    .execute(params![key, at, ids])
    .map_err(full_or)?;
    fresh.insert(key.to_owned(), ids.to_owned());
    Ok(())
}

fn append(
    c: &Connection,
    prepared: &Prepared,
    window_ms: i64,
    fresh: &mut HashMap<String, String>,
) -> Result<Appended, StoreError> {
    let ing = &prepared.ing;
    let since = ing.received_at.saturating_sub(window_ms);
    let dedupes = window_ms > 0 && ing.replay_of_raw.is_none();
    if let Some(key) = ing.request_key.as_deref().filter(|_| dedupes) {
        if let Some(ids) = seen(c, fresh, key, since)? {
            let event_ids: Vec<String> = ids.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            return Ok(Appended { duplicates: event_ids.len(), event_ids, duplicate: true, entry: None });
        }
    }
    let mut earlier: Vec<Option<String>> = vec![None; ing.events.len()];
    if dedupes {
        for (i, e) in ing.events.iter().enumerate() {
            if let Some(key) = &e.dedupe_key {
                earlier[i] = seen(c, fresh, key, since)?;
            }
        }
    }
    let keep: Vec<bool> = earlier.iter().map(Option::is_none).collect();
    let duplicates = keep.iter().filter(|k| !**k).count();
    if duplicates > 0 && duplicates == ing.events.len() && ing.rejections.is_empty() {
        let event_ids = earlier.into_iter().flatten().collect();
        return Ok(Appended { event_ids, duplicate: true, duplicates, entry: None });
    }
    let reencoded = if duplicates > 0 { Some(codec::encode_items(ing, &keep)?) } else { None };
    let (items, n_events, n_rejected) = match &reencoded {
        Some((items, n, r)) => (items.as_slice(), *n, *r),
        None => (prepared.items.as_slice(), prepared.n_events, prepared.n_rejected),
    };
    let body: Option<&[u8]> = ing.replay_of_raw.is_none().then_some(ing.body.as_slice());
    c.prepare_cached(
        "INSERT INTO log (received_at, source, environment, template, n_events, n_rejected, replay_of, body, items)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .map_err(full_or)?
    .execute(params![
        ing.received_at,
        ing.source,
        ing.environment,
        ing.template,
        n_events,
        n_rejected,
        ing.replay_of_raw,
        body,
        items
    ])
    .map_err(full_or)?;
    let seq = c.last_insert_rowid();
    let mut next = 0;
    let mut event_ids = Vec::with_capacity(ing.events.len());
    for (e, first) in ing.events.iter().zip(earlier) {
        match first {
            Some(id) => event_ids.push(id),
            None => {
                let id = codec::event_id(pack(seq, next));
                next += 1;
                if let Some(key) = e.dedupe_key.as_deref().filter(|_| dedupes) {
                    remember(c, fresh, key, ing.received_at, &id)?;
                }
                event_ids.push(id);
            }
        }
    }
    if let Some(key) = ing.request_key.as_deref().filter(|_| dedupes) {
        remember(c, fresh, key, ing.received_at, &event_ids.join(","))?;
    }
    Ok(Appended { event_ids, duplicate: false, duplicates, entry: Some(seq) })
}

fn prune(c: &Connection, seqs: &[i64], dedupe_before: Millis) -> Result<usize, StoreError> {
    let mut events = 0;
    let mut count = c.prepare_cached("SELECT n_events FROM log WHERE seq = ?1")?;
    let mut delete = c.prepare_cached("DELETE FROM log WHERE seq = ?1")?;
    for seq in seqs {
        if let Some(n) = count.query_row(params![seq], |r| r.get::<_, i64>(0)).optional()? {
            delete.execute(params![seq])?;
            events += n as usize;
        }
    }
    c.execute("DELETE FROM dedupe WHERE at < ?1", params![dedupe_before])?;
    Ok(events)
}
