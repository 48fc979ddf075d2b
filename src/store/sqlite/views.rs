//! Reads of the delivery log and the queue (`list`, `get`, `stats`, `raw_bodies`, and the selections replay acts
//! on), put together from the ingest log, delivery's books and the window in memory.
//!
//! An event's status: its row of its own if it has one; a refusal is `rejected`; at or below the cursor, or closed
//! in the window, `delivered`; otherwise `pending`. Listings walk the log newest first and stop after
//! `SCAN_ENTRIES` entries, so a rare filter costs a bounded scan rather than the whole log.

use super::books::{State, ids_of};
use super::codec::{self, StoredItem, entry_range, pack, unpack};
use crate::domain::CallKind;
use crate::store::*;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;

/// Log entries a listing looks at, at most.
pub(super) const SCAN_ENTRIES: usize = 200_000;
/// Entries read per query while scanning.
const PAGE: i64 = 256;
/// How far `received_at` may run behind the log's order (requests commit in about the order they arrive).
pub(super) const ORDER_SLACK_MS: i64 = 60_000;

pub struct LogEntry {
    pub seq: i64,
    pub received_at: Millis,
    pub source: String,
    pub environment: String,
    pub template: String,
    pub template_version: Option<String>,
    pub replay_of: Option<i64>,
    pub items: Vec<StoredItem>,
}

pub struct OwnRow {
    pub status: Status,
    pub attempts: i64,
    pub next_attempt_at: Millis,
    pub updated_at: Millis,
    pub last_error: Option<String>,
    pub calls: Vec<i64>,
}

const ENTRY_COLUMNS: &str = "seq, received_at, source, environment, template, replay_of, items, template_version";

/// A log row as read, before its items are decoded.
type EntryRow = (i64, Millis, String, String, String, Option<i64>, Vec<u8>, Option<String>);

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<EntryRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
}

fn decode(row: EntryRow) -> Result<LogEntry, StoreError> {
    let (seq, received_at, source, environment, template, replay_of, items, template_version) = row;
    let items = codec::decode_items(&items)?;
    Ok(LogEntry { seq, received_at, source, environment, template, template_version, replay_of, items })
}

pub fn read_entry(log: &Connection, seq: i64) -> Result<Option<LogEntry>, StoreError> {
    let row = log
        .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM log WHERE seq = ?1"))?
        .query_row(params![seq], entry)
        .optional()?;
    row.map(decode).transpose()
}

/// Entries older than `before` (a seq), newest first, a page at a time; only those with refusals if `rejected`.
pub(super) fn page_desc(log: &Connection, before: i64, rejected: bool) -> Result<Vec<LogEntry>, StoreError> {
    page_between(log, before, 0, rejected)
}

/// As [`page_desc`], only entries newer than `above` too.
pub(super) fn page_between(
    log: &Connection,
    before: i64,
    above: i64,
    rejected: bool,
) -> Result<Vec<LogEntry>, StoreError> {
    let filter = if rejected { "AND n_rejected > 0" } else { "" };
    let sql =
        format!("SELECT {ENTRY_COLUMNS} FROM log WHERE seq < ?1 AND seq > ?2 {filter} ORDER BY seq DESC LIMIT ?3");
    let rows: Vec<_> =
        log.prepare_cached(&sql)?.query_map(params![before, above, PAGE], entry)?.collect::<Result<_, _>>()?;
    rows.into_iter().map(decode).collect()
}

pub(super) fn own_rows(conn: &Connection, seq: i64) -> Result<HashMap<i64, OwnRow>, StoreError> {
    let (lo, hi) = entry_range(seq);
    let mut stmt = conn.prepare_cached(
        "SELECT id, status, attempts, next_attempt_at, updated_at, last_error, calls FROM own WHERE id BETWEEN ?1 AND ?2",
    )?;
    let rows = stmt
        .query_map(params![lo, hi], |r| {
            let status: String = r.get(1)?;
            let calls: String = r.get(6)?;
            Ok((
                r.get::<_, i64>(0)?,
                OwnRow {
                    status: Status::parse(&status).unwrap_or(Status::Pending),
                    attempts: r.get(2)?,
                    next_attempt_at: r.get(3)?,
                    updated_at: r.get(4)?,
                    last_error: r.get(5)?,
                    calls: calls.split(',').filter_map(|c| c.parse().ok()).collect(),
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub fn status_of(st: &State, id: i64, item: &StoredItem, own: Option<&OwnRow>) -> Status {
    if let Some(o) = own {
        return o.status;
    }
    if item.held.is_some() {
        return Status::Held;
    }
    if item.event.is_none() {
        return Status::Rejected;
    }
    let seq = unpack(id).0;
    if seq <= st.cursor {
        Status::Delivered
    } else if seq > st.read_upto {
        Status::Pending
    } else {
        match st.slot(id) {
            Some(s) if s.open => Status::Pending,
            _ => Status::Delivered,
        }
    }
}

/// The call that delivered an event straight from the log (events with a row of their own list their calls).
fn stream_call(conn: &Connection, id: i64) -> Result<Option<AttemptView>, StoreError> {
    let seq = unpack(id).0;
    let mut stmt = conn.prepare_cached(
        "SELECT at, http_status, latency_ms, batch_size, error, events, first_seq
         FROM (SELECT * FROM calls WHERE last_seq >= ?1 ORDER BY last_seq LIMIT 256) WHERE first_seq <= ?1",
    )?;
    let mut rows = stmt.query(params![seq])?;
    while let Some(r) = rows.next()? {
        let events: Vec<u8> = r.get(5)?;
        if ids_of(&events).contains(&id) {
            return Ok(Some(attempt_view(r)?));
        }
    }
    Ok(None)
}

fn attempt_view(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptView> {
    Ok(AttemptView {
        at: iso(r.get(0)?),
        http_status: r.get::<_, Option<i64>>(1)?.map(|s| s as u16),
        latency_ms: r.get(2)?,
        batch_size: r.get(3)?,
        error: r.get(4)?,
    })
}

fn calls_by_id(conn: &Connection, ids: &[i64]) -> Result<Vec<AttemptView>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT at, http_status, latency_ms, batch_size, error FROM calls WHERE id = ?1")?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(v) = stmt.query_row(params![id], attempt_view).optional()? {
            out.push(v);
        }
    }
    Ok(out)
}

pub(super) fn view(
    st: &State,
    e: &LogEntry,
    pos: usize,
    own: Option<&OwnRow>,
    detail: bool,
) -> Result<EventView, StoreError> {
    let item = &e.items[pos];
    let id = pack(e.seq, pos);
    let status = status_of(st, id, item, own);
    let waiting = matches!(status, Status::Pending | Status::Retrying);
    let stream = match (detail, own, status) {
        (true, None, Status::Delivered) => stream_call(&st.conn, id)?,
        _ => None,
    };
    let attempt_log = match (detail, own) {
        (false, _) => None,
        (true, Some(o)) => Some(calls_by_id(&st.conn, &o.calls)?),
        (true, None) => Some(stream.iter().cloned().collect()),
    };
    let attempts = match (own, status) {
        (Some(o), _) => o.attempts,
        (None, Status::Delivered) => 1,
        _ => 0,
    };
    let ev = item.event.as_ref();
    Ok(EventView {
        id: codec::event_id(id),
        status: status.as_str(),
        source: e.source.clone(),
        environment: e.environment.clone(),
        template: e.template.clone(),
        template_version: e.template_version.clone(),
        kind: ev.map_or(CallKind::Track, |v| v.kind()).as_str(),
        app_id: ev.map(|v| v.app_id.clone()).unwrap_or_default(),
        identity: ev.map(|v| v.identity.clone()).unwrap_or_default(),
        idempotency_key: ev.and_then(|v| v.idempotency_key.clone()),
        item_index: item.item_index,
        attempts,
        received_at: iso(e.received_at),
        updated_at: iso(own.map(|o| o.updated_at).unwrap_or(e.received_at)),
        next_attempt_at: waiting.then(|| iso(own.map(|o| o.next_attempt_at).unwrap_or(e.received_at))),
        last_error: own
            .and_then(|o| o.last_error.clone())
            .or_else(|| item.rejected.clone())
            .or_else(|| item.held.clone()),
        payload: ev.and_then(|v| serde_json::from_str(v.payload.get()).ok()),
        attempt_log,
    })
}

pub fn get(st: &State, event_id: &str) -> Result<EventView, StoreError> {
    let id = codec::parse_event_id(event_id).ok_or(StoreError::NotFound)?;
    let (seq, pos) = unpack(id);
    let e = read_entry(&st.log, seq)?.ok_or(StoreError::NotFound)?;
    if pos >= e.items.len() {
        return Err(StoreError::NotFound);
    }
    let own = own_rows(&st.conn, seq)?;
    view(st, &e, pos, own.get(&id), true)
}

pub(super) fn matches_query(q: &Query, e: &LogEntry) -> bool {
    q.source.as_ref().is_none_or(|s| *s == e.source)
        && q.environment.as_ref().is_none_or(|s| *s == e.environment)
        && q.since.is_none_or(|t| e.received_at >= t)
        && q.until.is_none_or(|t| e.received_at < t)
}

pub fn stats(st: &State) -> Result<QueueStats, StoreError> {
    let (own_waiting, own_oldest): (i64, Option<i64>) = st.conn.query_row(
        "SELECT count(*), min(enqueued_at) FROM own WHERE status IN ('pending', 'retrying')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (unread, unread_oldest): (i64, Option<i64>) = st.log.query_row(
        "SELECT coalesce(sum(n_events), 0), min(CASE WHEN n_events > 0 THEN received_at END) FROM log WHERE seq > ?1",
        params![st.read_upto],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let window_oldest = st.window.iter().find(|e| e.slots.iter().any(|s| s.open)).map(|e| e.received_at);
    let dead: i64 = st.conn.query_row("SELECT count(*) FROM own WHERE status = 'dead'", [], |r| r.get(0))?;
    let bytes = |c: &Connection| {
        let q = |p: &str| c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0);
        q("page_count") * q("page_size")
    };
    Ok(QueueStats {
        ready_or_waiting: own_waiting + unread + st.open as i64,
        oldest_pending_ms: [own_oldest, unread_oldest, window_oldest].into_iter().flatten().min(),
        dead,
        db_bytes: bytes(&st.log) + bytes(&st.conn),
        commits: None,
        bodies_committed: None,
        delivery_commits: Some(st.commits),
        index_lag_entries: Some(
            st.log.query_row("SELECT coalesce(max(seq), 0) FROM log", [], |r| r.get::<_, i64>(0))?
                - st.finder_upto()?,
        ),
    })
}

/// The events a selector names, with their status.
pub fn select(st: &State, sel: &Selector) -> Result<Vec<(i64, Status)>, StoreError> {
    let mut out = Vec::new();
    match sel {
        Selector::Id(event_id) => {
            let Some(id) = codec::parse_event_id(event_id) else { return Ok(out) };
            let (seq, pos) = unpack(id);
            if let Some(e) = read_entry(&st.log, seq)?.filter(|e| pos < e.items.len()) {
                let own = own_rows(&st.conn, seq)?;
                out.push((id, status_of(st, id, &e.items[pos], own.get(&id))));
            }
        }
        Selector::Status(status @ (Status::Dead | Status::Retrying | Status::Replaced)) => {
            let mut stmt = st.conn.prepare_cached("SELECT id FROM own WHERE status = ?1 ORDER BY id")?;
            let ids: Vec<i64> = stmt.query_map(params![status.as_str()], |r| r.get(0))?.collect::<Result<_, _>>()?;
            out.extend(ids.into_iter().map(|id| (id, *status)));
        }
        Selector::Status(status) => scan_all(st, |_| true, |id, s| (s == *status).then_some((id, s)), &mut out)?,
        Selector::StaleTemplate { source, template, current } => scan_all(
            st,
            |e| e.source == *source && e.template == *template && e.template_version.as_deref() != Some(current),
            |id, s| (s != Status::Replaced).then_some((id, s)),
            &mut out,
        )?,
        Selector::Range { from, to, status } => scan_all(
            st,
            |e| e.received_at >= *from && e.received_at < *to,
            |id, s| status.is_none_or(|want| want == s).then_some((id, s)),
            &mut out,
        )?,
    }
    Ok(out)
}

/// Every entry of the log, oldest first, a page at a time.
fn scan_all(
    st: &State,
    entry_filter: impl Fn(&LogEntry) -> bool,
    pick: impl Fn(i64, Status) -> Option<(i64, Status)>,
    out: &mut Vec<(i64, Status)>,
) -> Result<(), StoreError> {
    let mut after = 0;
    loop {
        let rows: Vec<_> = st
            .log
            .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM log WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?
            .query_map(params![after, PAGE], entry)?
            .collect::<Result<_, _>>()?;
        let Some(last) = rows.last().map(|r| r.0) else { return Ok(()) };
        after = last;
        for row in rows {
            let e = decode(row)?;
            if !entry_filter(&e) {
                continue;
            }
            let own = own_rows(&st.conn, e.seq)?;
            for (pos, item) in e.items.iter().enumerate() {
                let id = pack(e.seq, pos);
                out.extend(pick(id, status_of(st, id, item, own.get(&id))));
            }
        }
    }
}

/// The raw bodies behind the selected events (not those already replaced): a re-render's entry points at the body
/// it re-rendered, so the original body is returned once.
/// The ids of the raw bodies behind the selected events (the first body of a re-rendered one), in order, once each.
pub fn raw_body_ids(st: &State, sel: &Selector) -> Result<Vec<i64>, StoreError> {
    let mut roots: Vec<i64> = Vec::new();
    let mut last_seq = None;
    for (id, status) in select(st, sel)? {
        let seq = unpack(id).0;
        // The events of one entry come together: its root is read once.
        if status == Status::Replaced || last_seq == Some(seq) {
            continue;
        }
        last_seq = Some(seq);
        if let Some(e) = read_entry(&st.log, seq)? {
            roots.push(e.replay_of.unwrap_or(seq));
        }
    }
    roots.sort_unstable();
    roots.dedup();
    Ok(roots)
}

/// One raw body by id, if it is still kept.
pub fn raw_body(st: &State, id: i64) -> Result<Option<RawBody>, StoreError> {
    let mut stmt = st.log.prepare_cached(
        "SELECT source, environment, template, received_at, body, coalesce(key_scheme, 1) FROM log
         WHERE seq = ?1 AND body IS NOT NULL",
    )?;
    let row: Option<(String, String, String, Millis, Vec<u8>, i64)> = stmt
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .optional()?;
    row.map(|(source, environment, template, received_at, body, scheme)| {
        Ok(RawBody {
            id,
            source,
            environment,
            template,
            received_at,
            body: codec::decompress(body)?,
            key_scheme: stored_key_scheme(scheme)?,
        })
    })
    .transpose()
}

/// Every event of a body and of its earlier re-renders, except the re-render `keep`: what a new re-render replaces.
pub fn superseded_by(st: &State, root: i64, keep: i64) -> Result<Vec<i64>, StoreError> {
    let mut seqs = vec![root];
    let mut stmt = st.log.prepare_cached("SELECT seq FROM log WHERE replay_of = ?1")?;
    let replays: Vec<i64> = stmt.query_map(params![root], |r| r.get(0))?.collect::<Result<_, _>>()?;
    seqs.extend(replays.into_iter().filter(|s| *s != keep));
    let mut out = Vec::new();
    for seq in seqs {
        let Some(e) = read_entry(&st.log, seq)? else { continue };
        let own = own_rows(&st.conn, seq)?;
        for pos in 0..e.items.len() {
            let id = pack(seq, pos);
            if own.get(&id).is_none_or(|o| o.status != Status::Replaced) {
                out.push(id);
            }
        }
    }
    Ok(out)
}
