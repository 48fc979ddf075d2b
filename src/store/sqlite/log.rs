//! Reads of the delivery log and the queue (`list`, `get`, `stats`, `raw_bodies`), on the reader connection.

use super::super::*;
use super::{decompress_body, selector_sql};
use rusqlite::{Connection, OptionalExtension, params};

const VIEW_COLUMNS: &str =
    "id, event_id, status, source, template, kind, app_id, identity, idempotency_key, item_index,
     attempts, received_at, updated_at, next_attempt_at, last_error, payload";

fn view(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, EventView)> {
    let status: String = r.get(2)?;
    let status = Status::parse(&status).unwrap_or(Status::Pending);
    let kind: String = r.get(5)?;
    let payload: Option<String> = r.get(15)?;
    let waiting = matches!(status, Status::Pending | Status::Retrying);
    Ok((
        r.get(0)?,
        EventView {
            id: r.get(1)?,
            status: status.as_str(),
            source: r.get(3)?,
            template: r.get(4)?,
            kind: CallKind::parse(&kind).map_or("track", CallKind::as_str),
            app_id: r.get(6)?,
            identity: r.get(7)?,
            idempotency_key: r.get(8)?,
            item_index: r.get(9)?,
            attempts: r.get(10)?,
            received_at: iso(r.get(11)?),
            updated_at: iso(r.get(12)?),
            next_attempt_at: waiting.then(|| r.get::<_, i64>(13).map(iso)).transpose()?,
            last_error: r.get(14)?,
            payload: payload.and_then(|p| serde_json::from_str(&p).ok()),
            attempt_log: None,
        },
    ))
}

pub(super) fn list(c: &Connection, q: &Query) -> Result<Vec<EventView>, StoreError> {
    use rusqlite::types::Value as V;
    let mut cond = vec!["1 = 1".to_owned()];
    let mut args: Vec<V> = Vec::new();
    if let Some(s) = q.status {
        cond.push("status = ?".into());
        args.push(V::Text(s.as_str().into()));
    }
    if let Some(s) = &q.source {
        cond.push("source = ?".into());
        args.push(V::Text(s.clone()));
    }
    if let Some(t) = q.since {
        cond.push("received_at >= ?".into());
        args.push(V::Integer(t));
    }
    if let Some(t) = q.until {
        cond.push("received_at < ?".into());
        args.push(V::Integer(t));
    }
    args.push(V::Integer(if q.limit > 0 { q.limit } else { 100 }));
    let sql = format!("SELECT {VIEW_COLUMNS} FROM events WHERE {} ORDER BY id DESC LIMIT ?", cond.join(" AND "));
    let mut stmt = c.prepare(&sql)?;
    let rows =
        stmt.query_map(rusqlite::params_from_iter(args), view)?.map(|r| r.map(|(_, v)| v)).collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn get(c: &Connection, event_id: &str) -> Result<EventView, StoreError> {
    let found = c
        .query_row(&format!("SELECT {VIEW_COLUMNS} FROM events WHERE event_id = ?1"), params![event_id], view)
        .optional()?;
    let (row, mut v) = found.ok_or(StoreError::NotFound)?;
    let mut stmt = c.prepare(
        "SELECT at, http_status, latency_ms, batch_size, error FROM attempts WHERE event_row = ?1 ORDER BY id",
    )?;
    let log = stmt
        .query_map(params![row], |r| {
            Ok(AttemptView {
                at: iso(r.get(0)?),
                http_status: r.get::<_, Option<i64>>(1)?.map(|s| s as u16),
                latency_ms: r.get(2)?,
                batch_size: r.get(3)?,
                error: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    v.attempt_log = Some(log);
    Ok(v)
}

pub(super) fn stats(c: &Connection) -> Result<QueueStats, StoreError> {
    let (ready, oldest): (i64, Option<i64>) = c.query_row(
        "SELECT count(*), min(enqueued_at) FROM events WHERE status IN ('pending', 'retrying')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let dead: i64 = c.query_row("SELECT count(*) FROM events WHERE status = 'dead'", [], |r| r.get(0))?;
    let q = |p: &str| c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0);
    Ok(QueueStats {
        ready_or_waiting: ready,
        oldest_pending_ms: oldest,
        dead,
        db_bytes: q("page_count") * q("page_size"),
        commits: None,
        bodies_committed: None,
    })
}

pub(super) fn raw_bodies(c: &Connection, sel: &Selector) -> Result<Vec<RawBody>, StoreError> {
    let (cond, args) = selector_sql(sel);
    let sql = format!(
        "SELECT r.id, r.source, r.template, r.received_at, r.body FROM raw_bodies r
         WHERE r.id IN (SELECT raw_id FROM events WHERE {cond} AND status != 'replaced') ORDER BY r.id"
    );
    let mut stmt = c.prepare(&sql)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, Vec<u8>>(4)?))
        })?
        .map(|row| {
            let (id, source, template, at, body) = row?;
            Ok((id, source, template, at, decompress_body(body)?))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(rows)
}
