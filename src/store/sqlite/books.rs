//! Delivery's books: what has been sent from the ingest log, kept in a database file of its own so that nothing
//! delivery writes holds up an ingest commit.
//!
//! - `progress.cursor`: every log entry at or below it is resolved (each event delivered, or given a row of its own).
//! - `calls`: one row per Heap call (when, its answer, and which events it carried), not one per event.
//! - `own`: rows only for events that need more than one clean delivery: a retry, a dead letter, a replay, a
//!   replacement by a re-render.
//!
//! In memory: a window of log entries read past the cursor, with each event open (not yet delivered) or closed,
//! leases of claimed events (owner, expiry, fencing token), and events released until a time. Claims ask the rate
//! budgets first, so a backlog held back by Heap's limits is neither claimed nor written back: it waits in the log,
//! and the window stays at most `WINDOW_EVENTS` open events. After a crash the window is rebuilt from the cursor and
//! the calls recorded past it.

use super::codec::{self, StoredItem, entry_range, pack, unpack};
use crate::domain::CallKind;
use crate::store::{Admission, AttemptRecord, Claimed, Held, Millis, Paused, Resolution, StoreError};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS progress (
    id     INTEGER PRIMARY KEY CHECK (id = 0),
    cursor INTEGER NOT NULL
);
INSERT OR IGNORE INTO progress (id, cursor) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS calls (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    app_id      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    http_status INTEGER,
    latency_ms  INTEGER NOT NULL,
    batch_size  INTEGER NOT NULL,
    error       TEXT,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    events      BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_last_seq ON calls (last_seq);
CREATE INDEX IF NOT EXISTS calls_at ON calls (at);
CREATE TABLE IF NOT EXISTS own (
    id              INTEGER PRIMARY KEY,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    enqueued_at     INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    calls           TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS own_due ON own (next_attempt_at) WHERE status IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS own_status ON own (status, id);
-- Operators' replays, re-renders, pauses and purges (the console's audit log).
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    selection TEXT    NOT NULL,
    count     INTEGER NOT NULL
);
";

/// A log row as the window reads it: seq, received_at, source, environment, n_events, items (none when it holds no
/// event).
type WindowRow = (i64, Millis, String, String, i64, Option<Vec<u8>>);

/// Open events the window holds at most; the log is read further only when fewer are open.
pub const WINDOW_EVENTS: usize = 20_000;
/// Log entries read per query while filling the window.
const READ_CHUNK: i64 = 256;

/// An event of the window.
pub struct Slot {
    pub id: i64,
    pub kind: CallKind,
    pub app_id: Arc<str>,
    pub identity: String,
    pub payload: String,
    /// Not yet delivered, and no row of its own.
    pub open: bool,
}

pub struct Entry {
    pub seq: i64,
    pub received_at: Millis,
    pub source: Arc<str>,
    /// The environment of the request (`""`: the default one), for pauses by environment.
    pub environment: Arc<str>,
    pub slots: Vec<Slot>,
}

struct Lease {
    owner: String,
    expires: Millis,
    token: i64,
    /// Claimed from `own` (a retry or replay) rather than from the window.
    own: bool,
    app_id: String,
    identity: String,
    kind: CallKind,
}

/// What a claim needs of an event with a row of its own, read back from the log.
struct OwnDue {
    id: i64,
    attempts: i64,
    enqueued_at: Millis,
}

pub struct State {
    pub conn: Connection,
    /// A read connection to the ingest log.
    pub log: Connection,
    pub cursor: i64,
    pub read_upto: i64,
    pub window: VecDeque<Entry>,
    pub open: usize,
    /// The app_ids of the window's events since it was last empty (a few; more than are open, never fewer): once a
    /// round has blocked them all, it stops walking the window.
    window_apps: Vec<Arc<str>>,
    /// Events delivered past the cursor before a restart (from `calls`), closed as the window reaches them.
    delivered_above: HashSet<i64>,
    leases: HashMap<i64, Lease>,
    held: HashMap<i64, Millis>,
    next_token: i64,
    cursor_dirty: bool,
    pub commits: u64,
    /// User-property calls waiting for a retry, by (app_id, identity): later ones of that identity wait behind them,
    /// because Heap keeps the last value it receives. (In memory: after a restart, until those retries resolve,
    /// later calls are not held back.)
    retrying_user_properties: HashMap<(String, String), HashSet<i64>>,
}

impl State {
    pub fn open(conn: Connection, log: Connection) -> Result<Self, StoreError> {
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(super::finder::SCHEMA)?;
        super::finder::migrate(&conn)?;
        let cursor: i64 = conn.query_row("SELECT cursor FROM progress WHERE id = 0", [], |r| r.get(0))?;
        let mut delivered_above = HashSet::new();
        {
            let mut stmt =
                conn.prepare("SELECT events FROM calls WHERE last_seq > ?1 AND http_status BETWEEN 200 AND 299")?;
            let rows = stmt.query_map(params![cursor], |r| r.get::<_, Vec<u8>>(0))?;
            for blob in rows {
                delivered_above.extend(ids_of(&blob?).into_iter().filter(|id| unpack(*id).0 > cursor));
            }
        }
        Ok(Self {
            conn,
            log,
            cursor,
            read_upto: cursor,
            window: VecDeque::new(),
            open: 0,
            window_apps: Vec::new(),
            delivered_above,
            leases: HashMap::new(),
            held: HashMap::new(),
            next_token: 1,
            cursor_dirty: false,
            commits: 0,
            retrying_user_properties: HashMap::new(),
        })
    }

    /// Reads log entries past the window until it holds `WINDOW_EVENTS` open events or the log ends.
    pub fn fill(&mut self) -> Result<(), StoreError> {
        while self.open < WINDOW_EVENTS {
            let rows: Vec<WindowRow> = {
                let mut stmt = self.log.prepare_cached(
                    "SELECT seq, received_at, source, environment, n_events, CASE WHEN n_events > 0 THEN items END
                     FROM log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                stmt.query_map(params![self.read_upto, READ_CHUNK], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                .collect::<Result<_, _>>()?
            };
            let Some(last) = rows.last().map(|r| r.0) else { break };
            let owned = self.owned_between(rows[0].0, last)?;
            for (seq, received_at, source, environment, n_events, items) in rows {
                self.read_upto = seq;
                let Some(items) = items.filter(|_| n_events > 0) else { continue };
                let source: Arc<str> = source.into();
                let environment: Arc<str> = environment.into();
                let mut slots = Vec::with_capacity(n_events as usize);
                for (pos, item) in codec::decode_items(&items)?.into_iter().enumerate() {
                    let Some(ev) = item.event else { continue };
                    let id = pack(seq, pos);
                    let open = !owned.contains(&id) && !self.delivered_above.remove(&id);
                    self.open += open as usize;
                    let kind = ev.kind();
                    // One shared copy of each app_id, noted once.
                    let app_id = match self.window_apps.iter().find(|a| ***a == *ev.app_id) {
                        Some(a) => a.clone(),
                        None => {
                            let a: Arc<str> = ev.app_id.into();
                            self.window_apps.push(a.clone());
                            a
                        }
                    };
                    slots.push(Slot {
                        id,
                        kind,
                        app_id,
                        identity: ev.identity,
                        // A closed event is never sent from the window: its payload is not kept.
                        payload: if open { ev.payload.get().to_owned() } else { String::new() },
                        open,
                    });
                }
                self.window.push_back(Entry { seq, received_at, source, environment, slots });
            }
            // Resolved entries leave as they are read (after a restart, or a bulk replay, many may be).
            self.advance();
        }
        self.advance();
        Ok(())
    }

    /// Whether an event past the window was delivered before a restart (the window closes it when it reads it).
    pub fn delivered_before_restart(&self, id: i64) -> bool {
        self.delivered_above.contains(&id)
    }

    /// Ids of events with rows of their own among the entries `from..=to`.
    fn owned_between(&self, from: i64, to: i64) -> Result<HashSet<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT id FROM own WHERE id BETWEEN ?1 AND ?2")?;
        let ids = stmt
            .query_map(params![entry_range(from).0, entry_range(to).1], |r| r.get::<_, i64>(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Drops resolved entries from the front of the window and moves the cursor past them.
    fn advance(&mut self) {
        while self.window.front().is_some_and(|e| e.slots.iter().all(|s| !s.open)) {
            if let Some(e) = self.window.pop_front() {
                self.cursor = e.seq;
                self.cursor_dirty = true;
            }
        }
        if self.window.is_empty() && self.cursor < self.read_upto {
            self.cursor = self.read_upto;
            self.cursor_dirty = true;
        }
        if self.window.is_empty() {
            self.window_apps.clear();
        }
    }

    pub fn slot_mut(&mut self, id: i64) -> Option<&mut Slot> {
        let seq = unpack(id).0;
        let i = self.window.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.window[i].slots.iter_mut().find(|s| s.id == id)
    }

    pub fn slot(&self, id: i64) -> Option<&Slot> {
        let seq = unpack(id).0;
        let i = self.window.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.window[i].slots.iter().find(|s| s.id == id)
    }

    /// Closes an event of the window (delivered, or given a row of its own).
    fn close(&mut self, id: i64) {
        if let Some(s) = self.slot_mut(id)
            && s.open
        {
            s.open = false;
            self.open -= 1;
        }
    }

    fn token(&mut self) -> i64 {
        self.next_token += 1;
        self.next_token
    }

    fn lease_free(&self, id: i64, now: Millis) -> bool {
        self.leases.get(&id).is_none_or(|l| l.expires < now) && self.held.get(&id).is_none_or(|until| *until <= now)
    }

    pub fn claim(
        &mut self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
        paused: &Paused,
        admission: Option<&dyn Admission>,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.fill()?;
        self.held.retain(|_, until| *until > now);
        let limit = limit.max(0) as usize;
        let mut gate = Gate { blocked_apps: paused.app_ids.to_vec(), ordered: HashSet::new(), admission, now };
        let mut out = Vec::new();

        // Retries and replays first: they are the oldest events.
        for due in self.due_own(now, limit)? {
            if out.len() >= limit {
                break;
            }
            if !self.lease_free(due.id, now) {
                continue;
            }
            let (seq, pos) = unpack(due.id);
            let Some((source, environment, item)) = read_item(&self.log, seq, pos)? else { continue };
            let Some(ev) = item.event else { continue };
            let kind = ev.kind();
            if paused.environments.contains(&environment) || !gate.lets_go(&ev.app_id, &ev.identity, kind) {
                continue;
            }
            let token = self.token();
            self.leases.insert(
                due.id,
                Lease {
                    owner: owner.to_owned(),
                    expires: now + lease_ms,
                    token,
                    own: true,
                    app_id: ev.app_id.clone(),
                    identity: ev.identity.clone(),
                    kind,
                },
            );
            out.push(Claimed {
                id: due.id,
                event_id: codec::event_id(due.id),
                source,
                kind,
                app_id: ev.app_id,
                identity: ev.identity,
                payload: ev.payload.get().to_owned(),
                attempts: due.attempts,
                enqueued_at: due.enqueued_at,
                lease_token: token,
            });
        }

        // From the log, a user-property call waits behind one of its identity that waits for a retry.
        gate.ordered.extend(self.retrying_user_properties.keys().cloned());
        let mut picked = Vec::new();
        // Nothing of the window may go once every app_id in it is blocked (its budget spent, or paused): the walk
        // stops there rather than looking at up to 20,000 events that cannot go.
        let all_blocked = |gate: &Gate<'_>| self.window_apps.iter().all(|a| gate.blocks_app(a));
        let mut blocked_seen = usize::MAX;
        'entries: for (ei, entry) in self.window.iter().enumerate() {
            if gate.blocked_apps.len() != blocked_seen {
                blocked_seen = gate.blocked_apps.len();
                if all_blocked(&gate) {
                    break;
                }
            }
            if paused.environments.iter().any(|e| **e == *entry.environment) {
                continue;
            }
            for (si, slot) in entry.slots.iter().enumerate() {
                if out.len() + picked.len() >= limit {
                    break 'entries;
                }
                // A blocked app_id first: it is the cheapest check, and past a spent app budget the one that
                // answers for nearly every event of the window.
                if !slot.open || gate.blocks_app(&slot.app_id) {
                    continue;
                }
                if !self.lease_free(slot.id, now) {
                    // In flight or held: later user-property calls of this identity wait behind it.
                    gate.keep_order(&slot.app_id, &slot.identity, slot.kind);
                    continue;
                }
                if gate.lets_go(&slot.app_id, &slot.identity, slot.kind) {
                    picked.push((ei, si));
                }
            }
        }
        // Another process on the same files (`heap-relay replay` while `serve` runs) may have given some of these
        // events a row of their own since the window read them: those go through their own row, not twice.
        let owned = match (picked.first(), picked.last()) {
            (Some(&(first, _)), Some(&(last, _))) => {
                self.owned_between(self.window[first].seq, self.window[last].seq)?
            }
            _ => HashSet::new(),
        };
        for (ei, si) in picked {
            if owned.contains(&self.window[ei].slots[si].id) {
                let id = self.window[ei].slots[si].id;
                self.close(id);
                continue;
            }
            let token = self.token();
            let entry = &self.window[ei];
            let slot = &entry.slots[si];
            self.leases.insert(
                slot.id,
                Lease {
                    owner: owner.to_owned(),
                    expires: now + lease_ms,
                    token,
                    own: false,
                    app_id: slot.app_id.to_string(),
                    identity: slot.identity.clone(),
                    kind: slot.kind,
                },
            );
            out.push(Claimed {
                id: slot.id,
                event_id: codec::event_id(slot.id),
                source: entry.source.to_string(),
                kind: slot.kind,
                app_id: slot.app_id.to_string(),
                identity: slot.identity.clone(),
                payload: slot.payload.clone(),
                attempts: 0,
                enqueued_at: entry.received_at,
                lease_token: token,
            });
        }
        Ok(out)
    }

    fn due_own(&self, now: Millis, limit: usize) -> Result<Vec<OwnDue>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, attempts, enqueued_at FROM own
             WHERE status IN ('pending', 'retrying') AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![now, (limit + self.leases.len()) as i64], |r| {
                Ok(OwnDue { id: r.get(0)?, attempts: r.get(1)?, enqueued_at: r.get(2)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records a round: one `calls` row per Heap call, a row of its own for each event that needs more, and the
    /// cursor, in one transaction of the books. Records whose lease token is stale are ignored.
    pub fn record(&mut self, records: Vec<AttemptRecord>, now: Millis) -> Result<usize, StoreError> {
        let live: Vec<(AttemptRecord, bool, String, CallKind)> = records
            .into_iter()
            .filter_map(|r| {
                let l = self.leases.get(&r.id).filter(|l| l.token == r.lease_token)?;
                let (own, app, kind) = (l.own, l.app_id.clone(), l.kind);
                Some((r, own, app, kind))
            })
            .collect();
        // Which identities' user-property calls now wait for a retry (or no longer do), applied after the commit.
        let mut ordering: Vec<((String, String), i64, bool)> = Vec::new();
        for (r, _, app, kind) in &live {
            if *kind != CallKind::UserProperties {
                continue;
            }
            let who = self.leases.get(&r.id).map(|l| l.identity.clone()).unwrap_or_default();
            match r.resolution {
                Resolution::Retry { .. } => ordering.push(((app.clone(), who), r.id, true)),
                Resolution::Delivered | Resolution::Dead => ordering.push(((app.clone(), who), r.id, false)),
                Resolution::Release { .. } => {}
            }
        }
        let applied = live.len();
        // One row per call: every event it carried shares the call's number.
        let mut calls: Vec<(u64, CallRow)> = Vec::new();
        for (r, _, app, kind) in &live {
            for a in &r.attempts {
                let row = match calls.iter_mut().find(|(n, _)| *n == a.call) {
                    Some((_, row)) => row,
                    None => {
                        calls.push((
                            a.call,
                            CallRow {
                                at: a.at,
                                app_id: app.clone(),
                                kind: *kind,
                                http_status: a.http_status,
                                latency_ms: a.latency_ms,
                                batch_size: a.batch_size,
                                error: a.error.clone(),
                                events: Vec::new(),
                                row_id: 0,
                            },
                        ));
                        &mut calls.last_mut().expect("just pushed").1
                    }
                };
                row.events.push(r.id);
            }
        }
        let mut enqueued = HashMap::new();
        for (r, own, _, _) in &live {
            if *own || !matches!(r.resolution, Resolution::Delivered | Resolution::Release { .. }) {
                enqueued.insert(r.id, self.enqueued_at(r.id)?);
            }
        }
        let mut closed = Vec::new();
        let mut released = Vec::new();
        let writes = !calls.is_empty()
            || self.cursor_dirty
            || live.iter().any(|(r, own, _, _)| match r.resolution {
                Resolution::Release { .. } => false,
                Resolution::Delivered => *own,
                _ => true,
            });
        if !writes {
            // Nothing to keep (events given back unattempted): memory only, no commit.
            for (r, _, _, _) in &live {
                self.leases.remove(&r.id);
                if let Resolution::Release { at } = r.resolution {
                    self.held.insert(r.id, at);
                }
            }
            return Ok(applied);
        }
        let tx = self.conn.transaction()?;
        // The cursor as of the previous round rides along (one commit per round); it lags by at most one round,
        // which costs only a re-read after a restart.
        if self.cursor_dirty {
            tx.prepare_cached("UPDATE progress SET cursor = ?1 WHERE id = 0")?.execute(params![self.cursor])?;
        }
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO calls (at, app_id, kind, http_status, latency_ms, batch_size, error, first_seq, last_seq, events)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for (_, c) in &mut calls {
                let first = c.events.iter().map(|id| unpack(*id).0).min().unwrap_or(0);
                let last = c.events.iter().map(|id| unpack(*id).0).max().unwrap_or(0);
                let blob: Vec<u8> = c.events.iter().flat_map(|id| id.to_le_bytes()).collect();
                ins.execute(params![
                    c.at,
                    c.app_id,
                    c.kind.as_str(),
                    c.http_status,
                    c.latency_ms,
                    c.batch_size,
                    c.error,
                    first,
                    last,
                    blob
                ])?;
                c.row_id = tx.last_insert_rowid();
            }
            let mut upsert = tx.prepare_cached(UPSERT_OWN)?;
            for (r, own, _, _) in &live {
                let call_ids: String = r
                    .attempts
                    .iter()
                    .filter_map(|a| calls.iter().find(|(n, _)| *n == a.call).map(|(_, c)| format!("{},", c.row_id)))
                    .collect();
                let n = r.attempts.len() as i64;
                let (status, next) = match r.resolution {
                    Resolution::Release { at } => {
                        released.push((r.id, at));
                        continue;
                    }
                    Resolution::Delivered if !own => {
                        closed.push(r.id);
                        continue;
                    }
                    Resolution::Delivered => ("delivered", now),
                    Resolution::Retry { at } => ("retrying", at),
                    Resolution::Dead => ("dead", now),
                };
                let enqueued = enqueued.get(&r.id).copied().unwrap_or(now);
                upsert.execute(params![r.id, status, n, next, enqueued, now, r.error, call_ids])?;
                closed.push(r.id);
            }
        }
        tx.commit()?;
        self.commits += 1;
        self.cursor_dirty = false;
        for (who, id, waits) in ordering {
            let set = self.retrying_user_properties.entry(who.clone()).or_default();
            if waits {
                set.insert(id);
            } else {
                set.remove(&id);
            }
            if set.is_empty() {
                self.retrying_user_properties.remove(&who);
            }
        }
        for (r, _, _, _) in &live {
            self.leases.remove(&r.id);
        }
        for id in closed {
            self.close(id);
        }
        for (id, at) in released {
            self.held.insert(id, at);
        }
        self.advance();
        Ok(applied)
    }

    /// When an event was queued: from its own row if it has one, else from its log entry.
    fn enqueued_at(&self, id: i64) -> Result<Millis, StoreError> {
        if let Some(t) = self
            .conn
            .prepare_cached("SELECT enqueued_at FROM own WHERE id = ?1")?
            .query_row(params![id], |r| r.get::<_, i64>(0))
            .optional()?
        {
            return Ok(t);
        }
        let seq = unpack(id).0;
        if let Some(e) = self.window.iter().find(|e| e.seq == seq) {
            return Ok(e.received_at);
        }
        Ok(self
            .log
            .prepare_cached("SELECT received_at FROM log WHERE seq = ?1")?
            .query_row(params![seq], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Writes the cursor if it moved. A cursor that lags costs only a re-read of the log after a restart.
    pub fn save_cursor(&mut self) -> Result<(), StoreError> {
        if self.cursor_dirty {
            self.conn.execute("UPDATE progress SET cursor = ?1 WHERE id = 0", params![self.cursor])?;
            self.commits += 1;
            self.cursor_dirty = false;
        }
        Ok(())
    }

    pub fn release_owner(&mut self, owner: &str) -> usize {
        let before = self.leases.len();
        self.leases.retain(|_, l| l.owner != owner);
        before - self.leases.len()
    }

    /// Gives the events `ids` a row of their own with `status` (a replay: `pending`, due now; a re-render:
    /// `replaced`), closing them in the window and dropping their leases.
    pub fn set_own(&mut self, ids: &[i64], status: &str, now: Millis) -> Result<usize, StoreError> {
        let mut enqueued = Vec::with_capacity(ids.len());
        for id in ids {
            enqueued.push(if status == "pending" { now } else { self.enqueued_at(*id)? });
        }
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO own (id, status, attempts, next_attempt_at, enqueued_at, updated_at, last_error, calls)
                 VALUES (?1, ?2, 0, ?3, ?4, ?3, NULL, '')
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, next_attempt_at = excluded.next_attempt_at,
                                                enqueued_at = excluded.enqueued_at, updated_at = excluded.updated_at",
            )?;
            for (id, enq) in ids.iter().zip(enqueued) {
                stmt.execute(params![id, status, now, enq])?;
            }
        }
        tx.commit()?;
        self.commits += 1;
        for id in ids {
            self.leases.remove(id);
            self.held.remove(id);
            self.close(*id);
        }
        self.advance();
        self.save_cursor()?;
        Ok(ids.len())
    }

    /// Deletes delivered rows of their own, and call records, older than `before`; returns the log entries that
    /// may go (and deletes their own rows): resolved, older than `before`, with no event waiting or dead, not the
    /// body of a re-render, holding no held item a re-render has not replaced, and holding no refusal
    /// (`refused: false`) or holding one (`refused: true`, their own retention).
    ///
    /// With `refused` and `max_refused` > 0: when the entries holding refusals hold more than `max_refused` refused
    /// items, the oldest of them go whatever their age (the cap), up to `chunk` entries a call.
    pub fn prune(
        &mut self,
        before: Millis,
        chunk: i64,
        refused: bool,
        max_refused: i64,
    ) -> Result<Vec<i64>, StoreError> {
        self.conn.execute(
            // Replaced rows stay with their entry: they are how a repaired held body is told from one still held.
            "DELETE FROM own WHERE id IN (SELECT id FROM own WHERE status = 'delivered' AND updated_at < ?1 LIMIT ?2)",
            params![before, chunk],
        )?;
        self.conn.execute(
            "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE at < ?1 ORDER BY at LIMIT ?2)",
            params![before, chunk],
        )?;
        self.commits += 2;
        // Refused items past the cap: the oldest go until this many are gone, whatever their age.
        let mut excess = if refused && max_refused > 0 {
            let kept: i64 =
                self.log
                    .query_row("SELECT coalesce(sum(n_rejected), 0) FROM log WHERE n_rejected > 0", [], |r| r.get(0))?;
            kept - max_refused
        } else {
            0
        };
        let cutoff = if excess > 0 { Millis::MAX } else { before };
        let candidates: Vec<(i64, Millis, i64, i64)> = {
            // Held items stay until a re-render repairs them (checked below).
            let refusals = if refused { "n_rejected > 0 AND n_held = 0" } else { "n_rejected = 0" };
            let mut stmt = self.log.prepare(&format!(
                "SELECT seq, received_at, n_rejected, n_held FROM log l
                 WHERE (seq <= ?1 OR n_events = 0) AND received_at < ?2 AND {refusals}
                   AND NOT EXISTS (SELECT 1 FROM log r WHERE r.replay_of = l.seq)
                 ORDER BY seq LIMIT ?3"
            ))?;
            stmt.query_map(params![self.cursor, cutoff, chunk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut waiting = self.conn.prepare_cached(
            "SELECT 1 FROM own WHERE id BETWEEN ?1 AND ?2 AND status IN ('pending', 'retrying', 'dead') LIMIT 1",
        )?;
        let mut replaced =
            self.conn.prepare_cached("SELECT count(*) FROM own WHERE id BETWEEN ?1 AND ?2 AND status = 'replaced'")?;
        let mut out = Vec::with_capacity(candidates.len());
        for (seq, received_at, n_rejected, n_held) in candidates {
            if received_at >= before && excess <= 0 {
                continue; // young, and the cap is met
            }
            let (lo, hi) = entry_range(seq);
            // A re-render replaces every item of the body it re-renders, held ones included.
            if n_held > 0 && replaced.query_row(params![lo, hi], |r| r.get::<_, i64>(0))? < n_held {
                continue;
            }
            if waiting.query_row(params![lo, hi], |_| Ok(())).optional()?.is_none() {
                out.push(seq);
                excess -= n_rejected;
            }
        }
        drop(waiting);
        drop(replaced);
        // Their rows of the follower index go with them. An entry the follower has not read yet (one step is taken
        // here) waits for a later round: indexed after its rows were looked for, it would leave rows behind.
        if self.finder_upto()? < out.last().copied().unwrap_or(0) {
            self.follow()?;
        }
        let upto = self.finder_upto()?;
        out.retain(|seq| *seq <= upto);
        let mut going = Vec::new();
        {
            let mut stmt = self.log.prepare_cached("SELECT template, items FROM log WHERE seq = ?1")?;
            for seq in &out {
                if let Some((template, items)) = stmt
                    .query_row(params![seq], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
                    .optional()?
                {
                    going.push((*seq, template, codec::decode_items(&items)?));
                }
            }
        }
        if !going.is_empty() {
            self.forget(&going)?;
        }
        if !out.is_empty() {
            let tx = self.conn.transaction()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM own WHERE id BETWEEN ?1 AND ?2")?;
                for seq in &out {
                    let (lo, hi) = entry_range(*seq);
                    del.execute(params![lo, hi])?;
                }
            }
            tx.commit()?;
            self.commits += 1;
        }
        Ok(out)
    }
}

const UPSERT_OWN: &str = "
INSERT INTO own (id, status, attempts, next_attempt_at, enqueued_at, updated_at, last_error, calls)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (id) DO UPDATE SET status = excluded.status, attempts = own.attempts + excluded.attempts,
    next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at,
    last_error = coalesce(excluded.last_error, own.last_error),
    -- The newest calls only (about 25): an event retried for 72 h must not grow without bound. A leading `~`
    -- marks the cut, so the partial first number is never read.
    calls = CASE WHEN length(own.calls || excluded.calls) > 240
                 THEN '~' || substr(own.calls || excluded.calls, -240) ELSE own.calls || excluded.calls END";

struct CallRow {
    at: Millis,
    app_id: String,
    kind: CallKind,
    http_status: Option<u16>,
    latency_ms: i64,
    batch_size: i64,
    error: Option<String>,
    events: Vec<i64>,
    row_id: i64,
}

/// The event ids a call row carried.
pub fn ids_of(blob: &[u8]) -> Vec<i64> {
    blob.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
}

/// One item of a log entry, with the entry's source and environment.
pub fn read_item(log: &Connection, seq: i64, pos: usize) -> Result<Option<(String, String, StoredItem)>, StoreError> {
    let row: Option<(String, String, Vec<u8>)> = log
        .prepare_cached("SELECT source, environment, items FROM log WHERE seq = ?1")?
        .query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((source, environment, items)) = row else { return Ok(None) };
    let item = codec::decode_items(&items)?.into_iter().nth(pos);
    Ok(item.map(|i| (source, environment, i)))
}

/// The budget checks of one claim: app_ids found spent are not asked again, and a user-property call waits behind
/// an earlier one of the same identity that could not go (Heap keeps the last value it receives).
struct Gate<'a> {
    /// App_ids nothing more of goes this round (paused, or their budget spent): a handful at most, so a list whose
    /// check is a string comparison, not a hash. A round walks up to the whole window (20,000 events) past a
    /// spent app budget, and hashing each event's app_id there was most of the relay's CPU while it held a backlog.
    blocked_apps: Vec<String>,
    ordered: HashSet<(String, String)>,
    admission: Option<&'a dyn Admission>,
    now: Millis,
}

impl Gate<'_> {
    fn keep_order(&mut self, app: &str, identity: &str, kind: CallKind) {
        if kind == CallKind::UserProperties {
            self.ordered.insert((app.to_owned(), identity.to_owned()));
        }
    }

    fn blocks_app(&self, app: &str) -> bool {
        self.blocked_apps.iter().any(|a| a == app)
    }

    fn lets_go(&mut self, app: &str, identity: &str, kind: CallKind) -> bool {
        if self.blocks_app(app) {
            return false;
        }
        if kind == CallKind::UserProperties && self.ordered.contains(&(app.to_owned(), identity.to_owned())) {
            return false;
        }
        match self.admission.map(|a| a.admit(app, identity, self.now)) {
            None | Some(Ok(())) => true,
            Some(Err(Held::App { .. })) => {
                self.blocked_apps.push(app.to_owned());
                false
            }
            Some(Err(Held::Identity { .. })) => {
                self.keep_order(app, identity, kind);
                false
            }
        }
    }
}
