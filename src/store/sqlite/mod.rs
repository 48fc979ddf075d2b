//! The embedded default store, in two SQLite files (WAL, `synchronous=FULL`):
//!
//! - the ingest log (`store.path`, module `log`): one append per request, written by one thread with group commit;
//!   an ingest's 202 follows the fsync of its commit, and nothing else writes to this file but retention;
//! - delivery's books (`<store.path stem>.delivery.db`, module `books`): progress through the log, one record per
//!   Heap call, and rows only for events that need more than one clean delivery.
//!
//! Because the books are another file with another writer, delivery's claims and records never wait for, nor make
//! wait, an ingest commit. `views` reads both for the delivery log and the queue figures.

mod books;
mod codec;
mod console;
mod finder;
mod log;
mod views;

use super::*;
use books::State;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

pub use codec::parse_event_id;

#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteOptions {
    /// Refuse new bodies once both files hold this many bytes (0: no limit).
    pub max_bytes: u64,
    /// A request or message id seen again within this many milliseconds is a sender's retry (0: no dedupe).
    pub dedupe_window_ms: i64,
}

/// Rows deleted per prune call, so one prune never holds a write lock for long.
const PRUNE_CHUNK: i64 = 5000;

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    tx: mpsc::SyncSender<log::Cmd>,
    books: Arc<Mutex<State>>,
    counters: Arc<log::Counters>,
    books_bytes: Arc<AtomicI64>,
    log_bytes: Arc<AtomicI64>,
    max_bytes: u64,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

/// The books' file beside the log: `relay.db` → `relay.delivery.db`.
pub fn books_path(path: &Path) -> PathBuf {
    path.with_extension("delivery.db")
}

fn table_exists(c: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(c.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })? > 0)
}

/// A file written by the store before the ingest log (one row per event in `events`) is never misread: the relay
/// refuses it and says what to do.
fn refuse_old_schema(c: &Connection, path: &Path) -> Result<(), StoreError> {
    if table_exists(c, "events")? && !table_exists(c, "log")? {
        return Err(StoreError::Config(format!(
            "{} holds a queue in the format of heap-relay before the ingest log (tables raw_bodies, events, \
             attempts), which this version does not read. Back the file up, then either let the previous version \
             drain it (until `heap-relay deliveries --status pending` and `--status retrying` show nothing) and \
             move it aside, or point store.path at a new file. See README, \"Upgrade notes\".",
            path.display()
        )));
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the log at `path` and the books beside it, and starts the log's writer thread.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let writer = connect(path)?;
        refuse_old_schema(&writer, path)?;
        writer.execute_batch(log::SCHEMA)?;
        log::add_key_scheme(&writer)?;
        let books_conn = connect(&books_path(path))?;
        let state = State::open(books_conn, connect(path)?)?;
        let books_bytes = Arc::new(AtomicI64::new(log::used_bytes(&state.conn)));
        let (tx, rx) = mpsc::sync_channel::<log::Cmd>(4096);
        let counters = Arc::new(log::Counters::default());
        let log_bytes = Arc::new(AtomicI64::new(log::used_bytes(&writer)));
        let mut index = log::DedupeIndex::new(options.dedupe_window_ms);
        index.rebuild(&writer, now_ms())?;
        let w = log::Writer {
            conn: writer,
            max_bytes: options.max_bytes,
            dedupe_window_ms: options.dedupe_window_ms,
            counters: counters.clone(),
            books_bytes: books_bytes.clone(),
            log_bytes: log_bytes.clone(),
            index,
        };
        std::thread::Builder::new().name("ingest-log-writer".into()).spawn(move || w.run(rx))?;
        let books = Arc::new(Mutex::new(state));
        let follower = Arc::downgrade(&books);
        let follower_bytes = books_bytes.clone();
        std::thread::Builder::new().name("log-follower".into()).spawn(move || follow(follower, follower_bytes))?;
        Ok(Self { tx, books, counters, books_bytes, log_bytes, max_bytes: options.max_bytes, path: path.to_owned() })
    }

    /// Brings the follower index of the delivery log's filters up to the end of the log now (it otherwise trails
    /// by about `FOLLOW_IDLE`); returns the entries it read. For tools and benchmarks that fill a store and then
    /// measure it.
    pub async fn index_log(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            match self.books(|st| st.follow()).await? {
                0 => break,
                n => total += n,
            }
        }
        let bytes = self.books_bytes.clone();
        self.books(move |st| {
            bytes.store(log::used_bytes(&st.conn), Ordering::Relaxed);
            Ok(())
        })
        .await?;
        Ok(total)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> log::Cmd,
    ) -> Result<T, StoreError> {
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

    /// Work on delivery's books (and the in-memory window), off the async threads.
    async fn books<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let books = self.books.clone();
        let bytes = self.books_bytes.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = books.lock().unwrap_or_else(|p| p.into_inner());
            let before = st.commits;
            let out = f(&mut st);
            if st.commits != before {
                bytes.store(log::used_bytes(&st.conn), Ordering::Relaxed);
            }
            out
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Appends a body and everything rendered from it, durably (see [`Store::append`]). A re-render then marks
    /// what it replaces in the books.
    pub async fn append(&self, ingested: Ingested) -> Result<Appended, StoreError> {
        let replay_of = ingested.replay_of_raw;
        // Compressed and encoded here, on the caller's thread, so the one writer thread only writes.
        let prepared = Box::new(log::Prepared::new(ingested)?);
        let appended = self.call(|r| log::Cmd::Append(prepared, r)).await?;
        if let (Some(root), Some(seq)) = (replay_of, appended.entry) {
            let now = now_ms();
            self.books(move |st| {
                let ids = views::superseded_by(st, root, seq)?;
                st.set_own(&ids, Status::Replaced.as_str(), now)
            })
            .await?;
        }
        Ok(appended)
    }

    /// Leases up to `limit` events to `owner`: due retries and replays first, then the log in order. With
    /// `admission`, an event is claimed only if the budgets let it go now.
    pub async fn claim(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: Paused,
        admission: Option<Arc<dyn Admission>>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let owner = owner.to_owned();
        self.books(move |st| st.claim(&owner, now, lease_ms, limit, &paused, admission.as_deref())).await
    }

    /// Records attempts and their outcomes; records with a stale lease token are ignored. Returns how many applied.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<usize, StoreError> {
        let now = now_ms();
        self.books(move |st| st.record(records, now)).await
    }

    /// Puts the selected events back in the queue, due now. Returns how many.
    pub async fn requeue(&self, selector: Selector) -> Result<i64, StoreError> {
        let now = now_ms();
        self.books(move |st| {
            let ids: Vec<i64> = views::select(st, &selector)?
                .into_iter()
                .filter(|(_, s)| matches!(s, Status::Dead | Status::Delivered | Status::Retrying | Status::Pending))
                .map(|(id, _)| id)
                .collect();
            st.set_own(&ids, Status::Pending.as_str(), now).map(|n| n as i64)
        })
        .await
    }

    /// Gives back every lease `owner` holds (shutdown), so another worker can take the events at once.
    pub async fn release_owner(&self, owner: &str) -> Result<usize, StoreError> {
        let owner = owner.to_owned();
        self.books(move |st| Ok(st.release_owner(&owner))).await
    }

    /// Deletes delivered log entries (with their books) older than `before`, and dedupe records past the window.
    /// Entries holding a refusal, a waiting or dead event, or a body a re-render points at are kept. Returns the
    /// number of events deleted.
    pub async fn prune(&self, before: Millis) -> Result<usize, StoreError> {
        let seqs = self.books(move |st| st.prune(before, PRUNE_CHUNK, false, 0)).await?;
        self.call(|reply| log::Cmd::Prune { seqs, reply }).await
    }

    /// Deletes bodies holding refused items received before `before` (their own retention), or the oldest of them
    /// while more than `max_items` refused items are kept (their cap), unless an event of theirs still waits or is
    /// dead. Returns how many entries went.
    pub async fn prune_refused(&self, before: Millis, max_items: i64) -> Result<usize, StoreError> {
        let seqs = self.books(move |st| st.prune(before, PRUNE_CHUNK, true, max_items)).await?;
        let entries = seqs.len();
        self.call(|reply| log::Cmd::Prune { seqs, reply }).await?;
        Ok(entries)
    }

    pub async fn get(&self, event_id: &str) -> Result<EventView, StoreError> {
        let id = event_id.to_owned();
        self.books(move |st| views::get(st, &id)).await
    }

    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        let mut s = self.books(|st| views::stats(st)).await?;
        s.commits = Some(self.counters.commits.load(Ordering::Relaxed));
        s.bodies_committed = Some(self.counters.bodies.load(Ordering::Relaxed));
        Ok(s)
    }

    /// The ids of the raw bodies behind the selected events, for a re-render that reads them one at a time.
    pub async fn raw_body_ids(&self, selector: Selector) -> Result<Vec<i64>, StoreError> {
        self.books(move |st| views::raw_body_ids(st, &selector)).await
    }

    pub async fn raw_body(&self, id: i64) -> Result<Option<RawBody>, StoreError> {
        self.books(move |st| views::raw_body(st, id)).await
    }

    /// Why the store takes no more bodies now, if it does not: both files together at `store.max_bytes`.
    pub fn full_reason(&self) -> Option<String> {
        log::full_reason(&self.log_bytes, &self.books_bytes, self.max_bytes)
    }

    /// Checks that both files answer (for /readyz).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.books(|st| {
            st.log.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(st.conn.query_row("SELECT 1", [], |_| Ok(()))?)
        })
        .await
    }
}

/// How long the follower waits when it has caught up with the log.
const FOLLOW_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

/// The follower thread: indexes the log for the operator's filters (`finder`) a bounded step at a time under the
/// books' lock, resting after each step as long as it took, and `FOLLOW_IDLE` when it has caught up. It ends with
/// the store (its last handle dropped).
fn follow(books: std::sync::Weak<Mutex<State>>, bytes: Arc<AtomicI64>) {
    loop {
        let Some(books) = books.upgrade() else { return };
        let started = std::time::Instant::now();
        let step = {
            let mut st = books.lock().unwrap_or_else(|p| p.into_inner());
            let step = st.follow();
            if matches!(step, Ok(n) if n > 0) {
                bytes.store(log::used_bytes(&st.conn), Ordering::Relaxed);
            }
            step
        };
        drop(books);
        match step {
            Ok(0) => std::thread::sleep(FOLLOW_IDLE),
            // Rest as long as the step held the lock: while it catches up with a burst, the follower has the books
            // at most half the time, and delivery the rest (a mutex is not fair: without the rest, the follower
            // would take the lock again at once).
            Ok(_) => std::thread::sleep(started.elapsed()),
            Err(e) => {
                tracing::warn!(error = %e, "the log follower could not index the delivery log; retrying");
                std::thread::sleep(FOLLOW_IDLE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: i64) -> Ingested {
        Ingested {
            source: "heap".into(),
            environment: String::new(),
            template: "track".into(),
            body: format!("{{\"n\": {n}}}").into_bytes(),
            received_at: n,
            events: Vec::new(),
            rejections: Vec::new(),
            replay_of_raw: None,
            request_key: None,
            template_version: None,
            held: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let appends = (0..64).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append(body(i)).await })
        });
        for a in futures_util::future::join_all(appends).await {
            a.unwrap().unwrap();
        }
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.bodies_committed, Some(64));
        let commits = stats.commits.unwrap();
        assert!(commits < 32, "64 concurrent appends took {commits} commits; group commit should share them");
    }

    #[tokio::test]
    async fn a_retry_is_recognised_after_a_restart_from_the_keys_kept_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let options = SqliteOptions { dedupe_window_ms: 60_000, ..SqliteOptions::default() };
        let now = now_ms();
        let keyed = || Ingested { request_key: Some("body:1".into()), received_at: now, ..body(now) };
        let first = SqliteStore::open(&path, options).unwrap().append(keyed()).await.unwrap();
        assert!(!first.duplicate);
        let again = SqliteStore::open(&path, options).unwrap().append(keyed()).await.unwrap();
        assert!(again.duplicate, "the index was rebuilt from the log: {again:?}");
        let later = Ingested { received_at: now + 61_000, ..keyed() };
        assert!(!SqliteStore::open(&path, options).unwrap().append(later).await.unwrap().duplicate);
    }

    #[tokio::test]
    async fn an_event_re_rendered_by_another_process_while_the_window_holds_it_is_not_sent() {
        let event = |name: &str| crate::store::NewEvent {
            event_id: String::new(),
            item_index: 0,
            kind: crate::domain::CallKind::Track,
            app_id: "11".into(),
            identity: "u".into(),
            idempotency_key: None,
            payload: format!(r#"{{"identity":"u","event":"{name}"}}"#),
            dedupe_key: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let serve = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let mut first = body(now_ms());
        first.events.push(event("Old"));
        let seq = serve.append(first).await.unwrap().entry.unwrap();
        assert!(
            serve.claim("w", now_ms(), 60_000, 0, Default::default(), None).await.unwrap().is_empty(),
            "fills the window"
        );
        // `heap-relay replay --rerender` from another process, on the same files, while `serve` runs.
        let cli = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let mut again = body(now_ms());
        again.events.push(event("New"));
        again.replay_of_raw = Some(seq);
        cli.append(again).await.unwrap();
        let claimed = serve.claim("w", now_ms(), 60_000, 10, Default::default(), None).await.unwrap();
        let sent: Vec<&str> = claimed.iter().map(|c| c.payload.as_str()).collect();
        assert_eq!(sent.len(), 1, "only the re-rendered event goes: {sent:?}");
        assert!(sent[0].contains("New"), "{sent:?}");
    }

    #[tokio::test]
    async fn a_user_property_call_waits_behind_an_earlier_one_of_its_identity_that_waits_for_a_retry() {
        let props = |plan: &str| crate::store::NewEvent {
            event_id: String::new(),
            item_index: 0,
            kind: crate::domain::CallKind::UserProperties,
            app_id: "11".into(),
            identity: "u".into(),
            idempotency_key: None,
            payload: format!(r#"{{"identity":"u","properties":{{"plan":"{plan}"}}}}"#),
            dedupe_key: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let t = now_ms();
        let mut first = body(t);
        first.events.push(props("basic"));
        store.append(first).await.unwrap();
        let claimed = store.claim("w", t, 60_000, 10, Default::default(), None).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let retry = AttemptRecord {
            id: claimed[0].id,
            lease_token: claimed[0].lease_token,
            attempts: vec![AttemptLog {
                call: 1,
                at: t,
                http_status: Some(503),
                latency_ms: 1,
                batch_size: 1,
                error: None,
            }],
            resolution: Resolution::Retry { at: t + 10_000 },
            error: Some("503".into()),
        };
        store.record(vec![retry]).await.unwrap();
        let mut later = body(t);
        later.events.push(props("pro"));
        store.append(later).await.unwrap();
        assert!(
            store.claim("w", t + 1_000, 60_000, 10, Default::default(), None).await.unwrap().is_empty(),
            "the later value must not reach Heap before the earlier one's retry"
        );
        let due = store.claim("w", t + 10_000, 60_000, 10, Default::default(), None).await.unwrap();
        assert_eq!(due.len(), 1, "the retry goes first");
        assert!(due[0].payload.contains("basic"));
        let delivered = AttemptRecord {
            id: due[0].id,
            lease_token: due[0].lease_token,
            attempts: vec![AttemptLog {
                call: 2,
                at: t,
                http_status: Some(200),
                latency_ms: 1,
                batch_size: 1,
                error: None,
            }],
            resolution: Resolution::Delivered,
            error: None,
        };
        store.record(vec![delivered]).await.unwrap();
        let next = store.claim("w", t + 10_001, 60_000, 10, Default::default(), None).await.unwrap();
        assert_eq!(next.len(), 1);
        assert!(next[0].payload.contains("pro"), "then the later value");
    }

    #[tokio::test]
    async fn a_log_from_before_key_schemes_gains_the_column_and_its_bodies_keep_the_text_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let old = store.append(body(1)).await.unwrap().entry.unwrap();
        drop(store);
        // The previous release's log: no key_scheme column.
        Connection::open(&path).unwrap().execute_batch("ALTER TABLE log DROP COLUMN key_scheme").unwrap();
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let new = store.append(body(2)).await.unwrap().entry.unwrap();
        assert_eq!(store.raw_body(old).await.unwrap().unwrap().key_scheme, KeyScheme::Text);
        assert_eq!(store.raw_body(new).await.unwrap().unwrap().key_scheme, KeyScheme::Canonical);
    }

    #[test]
    fn a_database_in_the_format_before_the_ingest_log_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-schema-v1.db");
        std::fs::copy(fixture, &path).unwrap();
        let err = SqliteStore::open(&path, SqliteOptions::default()).expect_err("the old format is refused");
        let msg = err.to_string();
        assert!(msg.contains("before the ingest log") && msg.contains("Back the file up"), "{msg}");
        // Nothing was written to it: the previous version can still drain it.
        let c = Connection::open(&path).unwrap();
        assert!(!table_exists(&c, "log").unwrap());
        let pending: i64 = c.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).unwrap();
        assert_eq!(pending, 3);
    }
}
