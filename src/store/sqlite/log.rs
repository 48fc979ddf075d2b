//! The ingest log: the only database file an ingest commit waits on, and the only writer that writes it.
//!
//! One append per request: a row holding the raw body and the items rendered from it (both compressed), keyed by a
//! sequence number that only grows. The dedupe keys of a request (its body hash, or its items' message ids) are
//! written in that same row, so a sender's retry after a crash between commit and answer is recognised; they are
//! looked up in memory (`DedupeIndex`, rebuilt from the log's last window at start), so no index page with random
//! keys is written on the ingest commit.
//! One writer thread takes every append waiting in its channel and commits them together (group commit); each
//! caller is answered only after the fsync. Delivery never writes here: its books are another file (`books`).

use super::codec::{self, pack};
use crate::domain::KeyScheme;
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
    n_held      INTEGER NOT NULL DEFAULT 0,
    template_version TEXT,
    replay_of   INTEGER,
    body        BLOB,
    items       BLOB    NOT NULL,
    -- Dedupe keys, one a line: `r <key>` for the request, `m <event index> <key>` for a message.
    dedupe      TEXT,
    -- How the body's derived idempotency keys hash its items (KeyScheme); NULL: written before schemes existed (1).
    key_scheme  INTEGER
);
-- Only entries with refusals or re-renders are indexed: an ordinary append touches the table alone.
CREATE INDEX IF NOT EXISTS log_rejected ON log (seq) WHERE n_rejected > 0;
CREATE INDEX IF NOT EXISTS log_replays ON log (replay_of) WHERE replay_of IS NOT NULL;
";

/// A log written before bodies kept their key scheme gets the column; its entries read as scheme 1 (NULL).
pub fn add_key_scheme(c: &Connection) -> Result<(), StoreError> {
    let has: bool =
        c.query_row("SELECT count(*) > 0 FROM pragma_table_info('log') WHERE name = 'key_scheme'", [], |r| r.get(0))?;
    if !has {
        c.execute_batch("ALTER TABLE log ADD COLUMN key_scheme INTEGER")?;
    }
    Ok(())
}

/// Appends waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

pub enum Cmd {
    Append(Box<Prepared>, oneshot::Sender<Result<Appended, StoreError>>),
    /// Deletes the given entries; answers the events deleted.
    Prune {
        seqs: Vec<i64>,
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
    /// Bytes this file holds, measured after each commit (for `/readyz`).
    pub log_bytes: Arc<AtomicI64>,
    pub index: DedupeIndex,
}

/// Where a dedupe key was first stored: the event ids `seq-first` … `seq-(first + count - 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstSeen {
    at: Millis,
    seq: i64,
    first: u32,
    count: u32,
}

impl FirstSeen {
    fn event_ids(&self) -> Vec<String> {
        (self.first..self.first + self.count).map(|i| codec::event_id(pack(self.seq, i as usize))).collect()
    }
}

/// The dedupe keys of the window, in memory: a 64-bit keyed hash of each key (SipHash with a per-process key, so a
/// sender cannot aim collisions), where it was stored, oldest first for eviction. At most `MAX_DEDUPE_KEYS` are
/// kept: under a flood the window shortens rather than memory growing (about 40 bytes a key).
pub struct DedupeIndex {
    map: HashMap<u64, FirstSeen>,
    order: std::collections::VecDeque<(Millis, u64)>,
    hasher: std::collections::hash_map::RandomState,
    window_ms: i64,
}

pub const MAX_DEDUPE_KEYS: usize = 1_000_000;

impl DedupeIndex {
    pub fn new(window_ms: i64) -> Self {
        Self { map: HashMap::new(), order: Default::default(), hasher: Default::default(), window_ms }
    }

    fn hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn get(&self, key: &str, since: Millis) -> Option<FirstSeen> {
        self.map.get(&self.hash(key)).copied().filter(|s| s.at >= since)
    }

    fn insert(&mut self, key: &str, seen: FirstSeen) {
        let h = self.hash(key);
        self.map.insert(h, seen);
        self.order.push_back((seen.at, h));
        let horizon = seen.at.saturating_sub(self.window_ms);
        while let Some(&(at, old)) = self.order.front() {
            if at >= horizon && self.order.len() <= MAX_DEDUPE_KEYS {
                break;
            }
            self.order.pop_front();
            if self.map.get(&old).is_some_and(|s| s.at == at) {
                self.map.remove(&old);
            }
        }
    }

    /// Reads the keys of the log's entries received within the window before `now`, newest first, stopping at the
    /// first entry a minute older than the window (entries commit in about the order they arrive).
    pub fn rebuild(&mut self, c: &Connection, now: Millis) -> Result<(), StoreError> {
        if self.window_ms <= 0 {
            return Ok(());
        }
        let horizon = now.saturating_sub(self.window_ms);
        let mut found = Vec::new();
        let mut stmt =
            c.prepare("SELECT seq, received_at, n_events, dedupe FROM log WHERE replay_of IS NULL ORDER BY seq DESC")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (seq, at, n): (i64, Millis, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            if at < horizon - 60_000 || found.len() >= MAX_DEDUPE_KEYS {
                break;
            }
            let Some(keys) = r.get::<_, Option<String>>(3)? else { continue };
            for line in keys.lines() {
                if let Some(key) = line.strip_prefix("r ") {
                    found.push((key.to_owned(), FirstSeen { at, seq, first: 0, count: n as u32 }));
                } else if let Some((idx, key)) = line.strip_prefix("m ").and_then(|l| l.split_once(' '))
                    && let Ok(idx) = idx.parse::<u32>()
                {
                    found.push((key.to_owned(), FirstSeen { at, seq, first: idx, count: 1 }));
                }
            }
        }
        for (key, seen) in found.into_iter().rev().filter(|(_, s)| s.at >= horizon) {
            self.insert(&key, seen);
        }
        Ok(())
    }
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
        // Keys written in this transaction: a retry can arrive in the same group as its original. They join the
        // index only once the commit succeeds.
        let mut fresh: HashMap<String, FirstSeen> = HashMap::new();
        let index = &self.index;
        let conn = &mut self.conn;
        let commit = (|| -> Result<(), String> {
            let tx = conn.transaction().map_err(|e| e.to_string())?;
            for cmd in group {
                replies.push(match cmd {
                    Cmd::Append(prepared, r) => {
                        let res = match &full {
                            Some(why) => Err(StoreError::Full(why.clone())),
                            None => {
                                let mut mine = Vec::new();
                                let res = in_savepoint(&tx, |t| append(t, &prepared, window, index, &fresh, &mut mine));
                                if res.is_ok() {
                                    fresh.extend(mine);
                                }
                                res
                            }
                        };
                        Reply::Append(r, res)
                    }
                    Cmd::Prune { seqs, reply } => Reply::Count(reply, in_savepoint(&tx, |t| prune(t, &seqs))),
                });
            }
            tx.commit().map_err(|e| e.to_string())
        })();
        match &commit {
            Ok(()) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.bodies.fetch_add(appends, Ordering::Relaxed);
                for (key, seen) in fresh {
                    self.index.insert(&key, seen);
                }
                if self.max_bytes > 0 {
                    self.log_bytes.store(used_bytes(&self.conn), Ordering::Relaxed);
                }
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
    /// (Sizes as measured after each file's last commit: no query on the way to a commit.)
    fn over_limit(&self) -> Option<String> {
        full_reason(&self.log_bytes, &self.books_bytes, self.max_bytes)
    }
}

/// Why both files together may take no more (`store.max_bytes`, 0: no limit), from their last measured sizes.
pub fn full_reason(log_bytes: &AtomicI64, books_bytes: &AtomicI64, max_bytes: u64) -> Option<String> {
    let used = log_bytes.load(Ordering::Relaxed) + books_bytes.load(Ordering::Relaxed);
    (max_bytes > 0 && used as u64 >= max_bytes)
        .then(|| format!("the store holds {used} bytes; store.max_bytes is {max_bytes}"))
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
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == rusqlite::ErrorCode::DiskFull
    {
        return StoreError::Full("the disk is full".into());
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

/// Where `key` was first stored, if at or after `since`: in this transaction, or in the index.
fn seen(index: &DedupeIndex, fresh: &HashMap<String, FirstSeen>, key: &str, since: Millis) -> Option<FirstSeen> {
    fresh.get(key).copied().filter(|s| s.at >= since).or_else(|| index.get(key, since))
}

fn append(
    c: &Connection,
    prepared: &Prepared,
    window_ms: i64,
    index: &DedupeIndex,
    fresh: &HashMap<String, FirstSeen>,
    mine: &mut Vec<(String, FirstSeen)>,
) -> Result<Appended, StoreError> {
    let ing = &prepared.ing;
    let since = ing.received_at.saturating_sub(window_ms);
    let dedupes = window_ms > 0 && ing.replay_of_raw.is_none();
    if let Some(first) = ing.request_key.as_deref().filter(|_| dedupes).and_then(|k| seen(index, fresh, k, since)) {
        let event_ids = first.event_ids();
        return Ok(Appended { duplicates: event_ids.len(), event_ids, duplicate: true, entry: None });
    }
    let mut earlier: Vec<Option<String>> = vec![None; ing.events.len()];
    if dedupes {
        for (i, e) in ing.events.iter().enumerate() {
            let first = e.dedupe_key.as_deref().and_then(|k| seen(index, fresh, k, since));
            earlier[i] = first.map(|f| codec::event_id(pack(f.seq, f.first as usize)));
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
    // The keys this entry is the first of, for the index (after the commit) and for a rebuild after a restart.
    let mut keys = String::new();
    if dedupes {
        if let Some(key) = &ing.request_key {
            keys.push_str(&format!("r {key}\n"));
        }
        let mut idx = 0;
        for (e, first) in ing.events.iter().zip(&earlier) {
            if first.is_none() {
                if let Some(key) = &e.dedupe_key {
                    keys.push_str(&format!("m {idx} {key}\n"));
                }
                idx += 1;
            }
        }
    }
    let dedupe: Option<&str> = (!keys.is_empty()).then_some(keys.as_str());
    c.prepare_cached(
        "INSERT INTO log (received_at, source, environment, template, n_events, n_rejected, replay_of, body, items,
                          dedupe, n_held, template_version, key_scheme)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
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
        items,
        dedupe,
        ing.held.as_ref().map_or(0, |h| h.items as i64),
        ing.template_version,
        // A body is stored once, by the intake, which renders new bodies with the default scheme.
        body.is_some().then(|| KeyScheme::default().as_i64())
    ])
    .map_err(full_or)?;
    let seq = c.last_insert_rowid();
    let mut next = 0;
    let mut event_ids = Vec::with_capacity(ing.events.len());
    for (e, first) in ing.events.iter().zip(earlier) {
        match first {
            Some(id) => event_ids.push(id),
            None => {
                if let Some(key) = e.dedupe_key.as_deref().filter(|_| dedupes) {
                    mine.push((key.to_owned(), FirstSeen { at: ing.received_at, seq, first: next as u32, count: 1 }));
                }
                event_ids.push(codec::event_id(pack(seq, next)));
                next += 1;
            }
        }
    }
    if let Some(key) = ing.request_key.as_deref().filter(|_| dedupes) {
        mine.push((key.to_owned(), FirstSeen { at: ing.received_at, seq, first: 0, count: next as u32 }));
    }
    Ok(Appended { event_ids, duplicate: false, duplicates, entry: Some(seq) })
}

fn prune(c: &Connection, seqs: &[i64]) -> Result<usize, StoreError> {
    let mut events = 0;
    let mut count = c.prepare_cached("SELECT n_events FROM log WHERE seq = ?1")?;
    let mut delete = c.prepare_cached("DELETE FROM log WHERE seq = ?1")?;
    for seq in seqs {
        if let Some(n) = count.query_row(params![seq], |r| r.get::<_, i64>(0)).optional()? {
            delete.execute(params![seq])?;
            events += n as usize;
        }
    }
    Ok(events)
}
