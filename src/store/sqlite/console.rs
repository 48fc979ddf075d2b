//! The operator reads of `store::queries` on the ingest log and delivery's books: keyset pages of the delivery log,
//! the last hour, failures by reason, and the audit log (a table of the books' file, never of the ingest log).
//!
//! Every read walks an index or the log's primary key from the newest end and stops at a bound: the last hour, or
//! `SCAN_ENTRIES` entries, or `REFUSED_SCAN` entries with refusals (`log_rejected`). `PLANS` lists the statements,
//! so a test can check with EXPLAIN QUERY PLAN that none scans a whole table.

use super::SqliteStore;
use super::books::State;
use super::codec::{self, pack, unpack};
use super::finder::{self, Kind, hash};
use super::views::{
    self, LogEntry, ORDER_SLACK_MS, OwnRow, SCAN_ENTRIES, matches_query, own_rows, page_between, page_desc, read_entry,
};
use crate::store::queries::*;
use crate::store::{Millis, Scope, Status, StoreError};
use rusqlite::{Connection, params};
use std::collections::HashMap;

/// Log entries the last-hour view decodes at most.
const FLOW_SCAN: usize = 50_000;
const PAGE: i64 = 256;

const OWN_BY_STATUS: &str = "SELECT id FROM own WHERE status = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3";
const DELIVERED_PER_MINUTE: &str = "SELECT at - (at % 60000), sum(batch_size) FROM calls
     WHERE at >= ?1 AND http_status BETWEEN 200 AND 299 GROUP BY 1";
const LAST_CALL: &str = "SELECT at, http_status, error FROM calls ORDER BY at DESC LIMIT 1";
const DEAD_GROUPS: &str = "SELECT coalesce(last_error, ''), count(*), max(id), max(updated_at) FROM own
     WHERE status = 'dead' GROUP BY 1";
const DEAD_MEMBERS: &str =
    "SELECT id FROM own WHERE status = 'dead' AND coalesce(last_error, '') = ?1 ORDER BY id DESC LIMIT ?2";
const FINDER_PAGE: &str =
    "SELECT id FROM finder_by_span WHERE span = ?1 AND h = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?4";
const FINDER_SPAN_BELOW: &str = "SELECT max(span) FROM finder_by_span WHERE span < ?1";
const REFUSED_PAGE: &str = "SELECT seq FROM log WHERE n_rejected > 0 AND seq < ?1 ORDER BY seq DESC LIMIT ?2";

/// The statements behind the overview, a filtered page and the failures page, with the connection each runs on
/// (`log` or `books`), for EXPLAIN QUERY PLAN.
const PLANS: [(&str, &str, &str); 8] = [
    ("log", "page, overview", "SELECT seq, received_at, items FROM log WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"),
    ("books", "page by status", OWN_BY_STATUS),
    ("books", "page by identity, key or template", FINDER_PAGE),
    ("books", "page by identity, key or template", FINDER_SPAN_BELOW),
    ("books", "overview", DELIVERED_PER_MINUTE),
    ("books", "overview", LAST_CALL),
    ("books", "failures", DEAD_GROUPS),
    ("log", "failures", REFUSED_PAGE),
];

impl SqliteStore {
    pub async fn page(&self, f: EventFilter) -> Result<Page, StoreError> {
        self.books(move |st| page(st, &f)).await
    }

    pub async fn flow(&self, now: Millis) -> Result<Flow, StoreError> {
        self.books(move |st| flow(st, now)).await
    }

    pub async fn failures(&self) -> Result<Vec<FailureGroup>, StoreError> {
        self.books(|st| {
            let mut groups: Vec<FailureGroup> = st
                .conn
                .prepare_cached(DEAD_GROUPS)?
                .query_map([], |r| {
                    Ok(FailureGroup {
                        status: "dead",
                        reason: r.get(0)?,
                        count: r.get(1)?,
                        newest: codec::event_id(r.get(2)?),
                        newest_at: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut refused = Vec::new();
            refused_items(st, |id, reason, at| {
                refused.push(("rejected", reason.to_owned(), codec::event_id(id), at));
                true
            })?;
            groups.extend(group_failures(refused));
            Ok(groups)
        })
        .await
    }

    pub async fn failure_members(
        &self,
        status: Status,
        reason: String,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.books(move |st| {
            let mut out = Vec::new();
            match status {
                Status::Dead => {
                    let ids: Vec<i64> = st
                        .conn
                        .prepare_cached(DEAD_MEMBERS)?
                        .query_map(params![reason, limit as i64], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    out.extend(ids.into_iter().map(codec::event_id));
                }
                Status::Rejected => refused_items(st, |id, r, _| {
                    if r == reason {
                        out.push(codec::event_id(id));
                    }
                    out.len() < limit
                })?,
                _ => {}
            }
            Ok(out)
        })
        .await
    }

    pub async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.books(move |st| {
            st.conn.execute(
                "INSERT INTO audit (at, actor, action, selection, count) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![entry.at, entry.actor, entry.action, entry.selection, entry.count],
            )?;
            st.commits += 1;
            Ok(())
        })
        .await
    }

    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        self.books(move |st| {
            let rows = st
                .conn
                .prepare_cached("SELECT at, actor, action, selection, count FROM audit ORDER BY id DESC LIMIT ?1")?
                .query_map(params![limit], |r| {
                    Ok(AuditEntry {
                        at: r.get(0)?,
                        actor: r.get(1)?,
                        action: r.get(2)?,
                        selection: r.get(3)?,
                        count: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Moves every waiting (pending or retrying) event of `scope` to dead letters, with `PURGED` as its error, a
    /// bounded step at a time (`purge_step`), giving the books back to delivery between steps.
    pub async fn purge(&self, scope: Scope) -> Result<i64, StoreError> {
        let now = crate::store::now_ms();
        let mut at = None;
        let mut total = 0;
        loop {
            let scope = scope.clone();
            let (n, next) = self.books(move |st| purge_step(st, &scope, at, now)).await?;
            total += n;
            match next {
                Some(next) => at = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// EXPLAIN QUERY PLAN of each statement the console's pages run: (what it serves, statement, plan lines).
    pub async fn console_plans(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        self.books(|st| {
            let mut out = Vec::new();
            for (conn, what, sql) in PLANS {
                let c: &Connection = if conn == "log" { &st.log } else { &st.conn };
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let n = stmt.parameter_count();
                let args: Vec<i64> = vec![1; n];
                let lines: Vec<String> = stmt
                    .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))?
                    .collect::<Result<_, _>>()?;
                out.push((what.to_owned(), sql.to_owned(), lines.join("; ")));
            }
            Ok(out)
        })
        .await
    }
}

/// Where a purge has got to: the waiting rows of their own (by status, above an id), then the log from the
/// cursor onwards (the window and what it has not read), above a seq.
#[derive(Debug, Clone, Copy)]
enum PurgeAt {
    Own(usize, i64),
    Log(i64),
}

const WAITING: [&str; 2] = ["pending", "retrying"];

/// One bounded step of a purge, under one hold of the books: up to `PAGE` rows of their own or `PAGE` log entries
/// are looked at and their waiting events of `scope` get a dead row of their own. Whether an event still waits is
/// decided under the same hold, so an event delivered between two steps is never marked dead. Returns how many were
/// purged and where the next step starts (`None`: done).
fn purge_step(
    st: &mut State,
    scope: &Scope,
    at: Option<PurgeAt>,
    now: Millis,
) -> Result<(i64, Option<PurgeAt>), StoreError> {
    let in_scope = |e: &LogEntry, pos: usize| match scope {
        Scope::AppId(app) => e.items.get(pos).and_then(|i| i.event.as_ref()).is_some_and(|v| v.app_id == *app),
        Scope::Environment(env) => e.environment == *env && e.items.get(pos).is_some_and(|i| i.event.is_some()),
    };
    let mut ids = Vec::new();
    let next = match at.unwrap_or(PurgeAt::Own(0, 0)) {
        PurgeAt::Own(status, above) => {
            let rows: Vec<i64> = st
                .conn
                .prepare_cached("SELECT id FROM own WHERE status = ?1 AND id > ?2 ORDER BY id LIMIT ?3")?
                .query_map(params![WAITING[status], above, PAGE], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &rows {
                let (seq, pos) = unpack(*id);
                if read_entry(&st.log, seq)?.is_some_and(|e| in_scope(&e, pos)) {
                    ids.push(*id);
                }
            }
            match (rows.last(), status + 1 < WAITING.len()) {
                (Some(last), _) => Some(PurgeAt::Own(status, *last)),
                (None, true) => Some(PurgeAt::Own(status + 1, 0)),
                (None, false) => Some(PurgeAt::Log(st.cursor)),
            }
        }
        PurgeAt::Log(after) => {
            let seqs: Vec<i64> = st
                .log
                .prepare_cached("SELECT seq FROM log WHERE seq > ?1 AND n_events > 0 ORDER BY seq LIMIT ?2")?
                .query_map(params![after, PAGE], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for seq in &seqs {
                let Some(e) = read_entry(&st.log, *seq)? else { continue };
                let own = own_rows(&st.conn, *seq)?;
                for pos in (0..e.items.len()).filter(|p| in_scope(&e, *p)) {
                    let id = pack(*seq, pos);
                    // Rows of their own were the first phase's; here: open in the window, or not read yet.
                    let waits = !own.contains_key(&id)
                        && *seq > st.cursor
                        && if *seq > st.read_upto {
                            !st.delivered_before_restart(id)
                        } else {
                            st.slot(id).is_some_and(|s| s.open)
                        };
                    if waits {
                        ids.push(id);
                    }
                }
            }
            seqs.last().map(|last| PurgeAt::Log(*last))
        }
    };
    if !ids.is_empty() {
        st.set_own(&ids, Status::Dead.as_str(), now)?;
        let tx = st.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("UPDATE own SET last_error = ?1 WHERE id = ?2")?;
            for id in &ids {
                stmt.execute(params![PURGED, id])?;
            }
        }
        tx.commit()?;
        st.commits += 1;
    }
    if next.is_none() {
        // Read the purged entries into the window (as closed), so the queue's figures stop counting them as unread.
        st.fill()?;
    }
    Ok((ids.len() as i64, next))
}

/// The next event id below `before` (an opaque cursor is an event id).
fn cursor(before: Option<&str>) -> i64 {
    before.and_then(codec::parse_event_id).unwrap_or(i64::MAX)
}

/// The filter the follower index answers, if the page has one: a key is the rarest, then an identity, then a
/// template.
fn indexed(f: &EventFilter) -> Option<(Kind, &str)> {
    f.key
        .as_deref()
        .map(|k| (Kind::Key, k))
        .or_else(|| f.identity.as_deref().map(|i| (Kind::Identity, i)))
        .or_else(|| f.template.as_deref().map(|t| (Kind::Template, t)))
}

fn page(st: &State, f: &EventFilter) -> Result<Page, StoreError> {
    // Dead, retrying and replaced events have their own index (`own_status`), rarer than a template's events.
    let own_status = matches!(f.query.status, Some(Status::Dead | Status::Retrying | Status::Replaced));
    match indexed(f) {
        Some((Kind::Template, _)) if own_status => {}
        Some((kind, value)) => return indexed_page(st, f, kind, value),
        None => {}
    }
    let limit = if f.query.limit > 0 { f.query.limit as usize } else { 100 };
    let before = cursor(f.before.as_deref());
    let mut out = Vec::new();
    let mut last_seen: Option<i64> = None;
    let mut seen = 0;
    let mut exhausted = false;
    if let Some(status @ (Status::Dead | Status::Retrying | Status::Replaced)) = f.query.status {
        let mut below = before;
        while out.len() < limit && seen < SCAN_ENTRIES {
            let ids: Vec<i64> = st
                .conn
                .prepare_cached(OWN_BY_STATUS)?
                .query_map(params![status.as_str(), below, PAGE], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let Some(last) = ids.last() else {
                exhausted = true;
                break;
            };
            below = *last;
            seen += ids.len();
            for id in ids {
                last_seen = Some(id);
                let (seq, pos) = unpack(id);
                let Some(e) = read_entry(&st.log, seq)? else { continue };
                if pos >= e.items.len() || !matches_query(&f.query, &e) {
                    continue;
                }
                let own = own_rows(&st.conn, seq)?;
                let v = views::view(st, &e, pos, own.get(&id), false)?;
                if f.keeps(&v) {
                    out.push(v);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
    } else {
        let (before_seq, before_pos) = if before == i64::MAX { (i64::MAX, usize::MAX) } else { unpack(before) };
        // The entry the cursor is in still has older items; start there.
        let mut next_seq = before_seq.saturating_add(1);
        'scan: while seen < SCAN_ENTRIES {
            let entries = page_desc(&st.log, next_seq, f.query.status == Some(Status::Rejected))?;
            let Some(last) = entries.last() else {
                exhausted = true;
                break;
            };
            next_seq = last.seq;
            seen += entries.len();
            for e in &entries {
                if f.query.since.is_some_and(|t| e.received_at < t - ORDER_SLACK_MS) {
                    exhausted = true;
                    break 'scan;
                }
                let top = if e.seq == before_seq { before_pos.min(e.items.len()) } else { e.items.len() };
                if !matches_query(&f.query, e) {
                    last_seen = Some(pack(e.seq, 0));
                    continue;
                }
                if pick_from_entry(st, f, e, top, limit, &mut out, &mut last_seen)? {
                    break 'scan;
                }
            }
        }
    }
    let full = out.len() >= limit;
    let next = if full {
        out.last().and_then(|v| codec::parse_event_id(&v.id)).map(codec::event_id)
    } else if !exhausted {
        last_seen.map(codec::event_id)
    } else {
        None
    };
    Ok(Page { events: out, truncated: !full && next.is_some(), next })
}

/// A page under a filter the follower index answers: the entries the follower has not read yet from the log (the
/// newest; a second's worth), then the index's rows for the value, newest first, each checked against every
/// filter. Old events are found as fast as new ones.
fn indexed_page(st: &State, f: &EventFilter, kind: Kind, value: &str) -> Result<Page, StoreError> {
    let limit = if f.query.limit > 0 { f.query.limit as usize } else { 100 };
    let before = cursor(f.before.as_deref());
    let (before_seq, before_pos) = if before == i64::MAX { (i64::MAX, usize::MAX) } else { unpack(before) };
    let top_of = |e: &LogEntry| if e.seq == before_seq { before_pos.min(e.items.len()) } else { e.items.len() };
    let too_old = |e: &LogEntry| f.query.since.is_some_and(|t| e.received_at < t - ORDER_SLACK_MS);
    let upto = st.finder_upto()?;
    let mut out = Vec::new();
    let mut last_seen: Option<i64> = None;
    let done = |out: Vec<crate::store::EventView>, next: Option<i64>, truncated: bool| -> Result<Page, StoreError> {
        let full = out.len() >= limit;
        let next = if full { out.last().and_then(|v| codec::parse_event_id(&v.id)) } else { next };
        Ok(Page { events: out, next: next.map(codec::event_id), truncated: !full && truncated })
    };

    // The tail the follower has not read yet.
    let mut next_seq = before_seq.saturating_add(1);
    let mut seen = 0;
    while next_seq > upto.saturating_add(1) && seen < SCAN_ENTRIES {
        let entries = page_between(&st.log, next_seq, upto, false)?;
        let Some(last) = entries.last() else { break };
        next_seq = last.seq;
        seen += entries.len();
        for e in &entries {
            if too_old(e) {
                return done(out, None, false);
            }
            if matches_query(&f.query, e) && pick_from_entry(st, f, e, top_of(e), limit, &mut out, &mut last_seen)? {
                return done(out, None, false);
            }
        }
    }
    if next_seq > upto.saturating_add(1) && seen >= SCAN_ENTRIES {
        // The follower is far behind (a store just upgraded): the rest of the tail is past the bound.
        return done(out, last_seen.or(Some(pack(next_seq, 0))), true);
    }

    // The indexed part, newest first.
    let h = hash(kind, value);
    let mut below = match kind {
        // Template rows are an entry's first event number: the cursor's own entry is still to be looked at.
        Kind::Template if before != i64::MAX => pack(before_seq, 0) + 1,
        _ => before,
    };
    let mut rows = 0;
    // The span the rows below the cursor start in (the newest indexed one for the first page).
    let mut span = if below == i64::MAX { finder::span_of_entry(upto) } else { finder::span_of(below) };
    // The entry of the ids being looked at, with its own rows (read once per entry, not per id).
    let mut entry: Option<(LogEntry, HashMap<i64, OwnRow>)> = None;
    while rows < SCAN_ENTRIES {
        let ids: Vec<i64> = st
            .conn
            .prepare_cached(FINDER_PAGE)?
            .query_map(params![span, h, below, PAGE], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let Some(last) = ids.last() else {
            // This span has no more: the next older span that has rows, if any.
            let older: Option<i64> =
                st.conn.prepare_cached(FINDER_SPAN_BELOW)?.query_row(params![span], |r| r.get(0))?;
            match older {
                Some(s) => {
                    span = s;
                    continue;
                }
                None => return done(out, None, false),
            }
        };
        below = *last;
        rows += ids.len();
        for id in ids {
            let (seq, pos) = unpack(id);
            if entry.as_ref().is_none_or(|(e, _)| e.seq != seq) {
                entry = match read_entry(&st.log, seq)? {
                    Some(e) if e.seq == seq => Some((e, own_rows(&st.conn, seq)?)),
                    _ => None,
                };
            }
            // Gone (retention): nothing here.
            let Some((e, own)) = entry.as_ref() else { continue };
            if too_old(e) {
                return done(out, None, false);
            }
            if !matches_query(&f.query, e) {
                last_seen = Some(id);
                continue;
            }
            if kind == Kind::Template {
                if pick_from_entry(st, f, e, top_of(e), limit, &mut out, &mut last_seen)? {
                    return done(out, None, false);
                }
                continue;
            }
            last_seen = Some(id);
            if pos < e.items.len() && pick(st, f, e, pos, own, limit, &mut out)? {
                return done(out, None, false);
            }
        }
    }
    // The bound of rows looked at: more may be older than `next`.
    done(out, last_seen, true)
}

/// Adds the entry's items below `top` that pass the filters, newest first; true once the page is full.
fn pick_from_entry(
    st: &State,
    f: &EventFilter,
    e: &LogEntry,
    top: usize,
    limit: usize,
    out: &mut Vec<crate::store::EventView>,
    last_seen: &mut Option<i64>,
) -> Result<bool, StoreError> {
    let own = own_rows(&st.conn, e.seq)?;
    for pos in (0..top).rev() {
        *last_seen = Some(pack(e.seq, pos));
        if pick(st, f, e, pos, &own, limit, out)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Adds item `pos` of `e` to the page if it passes the filters; true once the page is full.
fn pick(
    st: &State,
    f: &EventFilter,
    e: &LogEntry,
    pos: usize,
    own: &HashMap<i64, OwnRow>,
    limit: usize,
    out: &mut Vec<crate::store::EventView>,
) -> Result<bool, StoreError> {
    let id = pack(e.seq, pos);
    if f.query.status.is_some_and(|s| s != views::status_of(st, id, &e.items[pos], own.get(&id))) {
        return Ok(false);
    }
    let v = views::view(st, e, pos, own.get(&id), false)?;
    if !f.keeps(&v) {
        return Ok(false);
    }
    out.push(v);
    Ok(out.len() >= limit)
}

fn flow(st: &State, now: Millis) -> Result<Flow, StoreError> {
    let since = now - 3_600_000;
    let mut flow = Flow { since, minutes: empty_hour(now), ..Default::default() };
    let mut before = i64::MAX;
    let mut seen = 0;
    'scan: loop {
        if seen >= FLOW_SCAN {
            flow.truncated = true;
            break;
        }
        let entries = page_desc(&st.log, before, false)?;
        let Some(last) = entries.last() else { break };
        before = last.seq;
        seen += entries.len();
        for e in &entries {
            if e.received_at < since - ORDER_SLACK_MS {
                break 'scan;
            }
            if e.received_at < since || e.replay_of.is_some() {
                continue;
            }
            let own = own_rows(&st.conn, e.seq)?;
            for (pos, item) in e.items.iter().enumerate() {
                let id = pack(e.seq, pos);
                let status = views::status_of(st, id, item, own.get(&id));
                let app_id = item.event.as_ref().map(|v| v.app_id.as_str()).unwrap_or("");
                tally(&mut flow.rows, &e.source, &e.environment, app_id, status);
                bump(&mut flow.minutes, e.received_at, 1, 0);
                if item.event.is_none() {
                    flow.refused += 1;
                }
            }
        }
    }
    let delivered: Vec<(Millis, i64)> = st
        .conn
        .prepare_cached(DELIVERED_PER_MINUTE)?
        .query_map(params![since], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (minute, n) in delivered {
        bump(&mut flow.minutes, minute, 0, n);
    }
    flow.last_call = st
        .conn
        .prepare_cached(LAST_CALL)?
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.map(|s| s as u16), r.get(2)?)))?
        .next()
        .transpose()?;
    Ok(flow)
}

/// Calls `each(event number, reason, received_at)` for items refused at ingest and not re-rendered since, newest
/// first, over the newest `REFUSED_SCAN` entries with refusals, until it returns false.
fn refused_items(st: &State, mut each: impl FnMut(i64, &str, Millis) -> bool) -> Result<(), StoreError> {
    let mut before = i64::MAX;
    let mut seen = 0;
    while seen < REFUSED_SCAN {
        let seqs: Vec<i64> = st
            .log
            .prepare_cached(REFUSED_PAGE)?
            .query_map(params![before, PAGE], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let Some(last) = seqs.last() else { return Ok(()) };
        before = *last;
        seen += seqs.len();
        for seq in seqs {
            let Some(e) = read_entry(&st.log, seq)? else { continue };
            let own = own_rows(&st.conn, seq)?;
            for (pos, item) in e.items.iter().enumerate().rev() {
                let id = pack(seq, pos);
                let Some(reason) = &item.rejected else { continue };
                if views::status_of(st, id, item, own.get(&id)) == Status::Rejected && !each(id, reason, e.received_at)
                {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
