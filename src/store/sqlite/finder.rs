//! The follower index of the delivery log's rare filters (identity, message id or idempotency key, template), kept
//! in delivery's books file so that the ingest commit writes nothing for it (the ingest commit appends, and nothing
//! else writes to what it waits on).
//!
//! A row is `(span, hash of the value, event number)`: the value hashed with its kind (FNV-1a, 64 bits, stable
//! across builds), so a rare identity's events are an index range read newest first instead of a walk of the log. A
//! template is indexed once per log entry (at its first event number). A hash can collide: every event found is
//! checked against the filter itself.
//!
//! The span (`seq >> SPAN_BITS`, 16,384 log entries) leads the key so that the follower's inserts land in the
//! newest span's small subtree: keyed by the hash alone, every step touched pages all over an index that grows with
//! the backlog (a million held events made it rewrite most of the index each step: about 8 KB written per event). A
//! lookup reads the value's range in each span, newest first (`max(span) … WHERE span < ?` jumps over empty ones).
//!
//! The follower (`SqliteStore`'s `log-follower` thread) reads the log past `finder_span_progress.upto` in bounded steps
//! under the books' lock, as delivery's other writes are made; so operator views through it may trail ingest by
//! about a second. A page reads the entries past `upto` from the log itself, so nothing recent is missed.
//! Retention deletes an entry's rows with the entry (`forget`).

use super::books::State;
use super::codec::{self, pack, unpack};
use crate::store::StoreError;
use rusqlite::params;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS finder_by_span (
    span INTEGER NOT NULL,
    h    INTEGER NOT NULL,
    id   INTEGER NOT NULL,
    PRIMARY KEY (span, h, id)
) WITHOUT ROWID;
-- Where the follower has read the log to. Its own table: the previous layout's `finder_progress` must not say
-- its (dropped) index is built, should that version run on this file again.
CREATE TABLE IF NOT EXISTS finder_span_progress (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO finder_span_progress (id, upto) VALUES (0, 0);
";

/// A span is 2^SPAN_BITS log entries.
const SPAN_BITS: u32 = 14;

/// The span of a log entry.
pub fn span_of_entry(seq: i64) -> i64 {
    seq >> SPAN_BITS
}

/// The span of an event number.
pub fn span_of(id: i64) -> i64 {
    span_of_entry(unpack(id).0)
}

/// A books file last opened by a version before spans has its index keyed by the hash alone (`finder`): it is
/// dropped, with its progress set back to the start (so that version, run again, rebuilds it rather than trusting
/// an empty table), and the follower rebuilds this index from the log (derived data; operator views read the log
/// itself past it meanwhile). Whatever this layout held from an earlier run is dropped too: that version may have
/// appended and pruned entries since, without it.
pub fn migrate(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let old: bool =
        conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'finder'", [], |r| {
            r.get(0)
        })?;
    if old {
        tracing::info!("rebuilding the follower index of the delivery log in its new layout, in the background");
        conn.execute_batch(
            "BEGIN;
             DROP TABLE finder;
             UPDATE finder_progress SET upto = 0 WHERE id = 0;
             DELETE FROM finder_by_span;
             UPDATE finder_span_progress SET upto = 0 WHERE id = 0;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// Log entries one step reads at most.
const STEP_ENTRIES: i64 = 1024;
/// Events one step indexes at most (it stops after the entry that reaches this), so one hold of the books' lock
/// stays short.
const STEP_EVENTS: usize = 5000;

/// What a finder row names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Identity,
    /// A message id or idempotency key.
    Key,
    Template,
}

/// The row key of a value: FNV-1a over the kind's tag and the value's bytes.
pub fn hash(kind: Kind, value: &str) -> i64 {
    let tag: u8 = match kind {
        Kind::Identity => b'i',
        Kind::Key => b'k',
        Kind::Template => b't',
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(tag).chain(value.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// The rows of one log entry (span, hash, event number): its template once, then each event's identity and key.
fn rows(seq: i64, template: &str, items: &[codec::StoredItem]) -> Vec<(i64, i64, i64)> {
    let span = span_of_entry(seq);
    let mut out = vec![(span, hash(Kind::Template, template), pack(seq, 0))];
    for (pos, item) in items.iter().enumerate() {
        if let Some(ev) = &item.event {
            out.push((span, hash(Kind::Identity, &ev.identity), pack(seq, pos)));
            if let Some(k) = &ev.idempotency_key {
                out.push((span, hash(Kind::Key, k), pack(seq, pos)));
            }
        }
    }
    out
}

impl State {
    /// Where the follower has read the log to (every entry at or below is indexed).
    pub fn finder_upto(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT upto FROM finder_span_progress WHERE id = 0", [], |r| r.get(0))?)
    }

    /// One step of the follower: indexes the log entries past `upto` (a bounded number), in one transaction of the
    /// books. Returns how many entries it read (0: it has caught up).
    pub fn follow(&mut self) -> Result<usize, StoreError> {
        let upto = self.finder_upto()?;
        let mut entries: Vec<(i64, String, Vec<u8>)> = Vec::new();
        {
            let mut stmt = self.log.prepare_cached(
                "SELECT seq, template, items, n_events + n_rejected + n_held FROM log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut q = stmt.query(params![upto, STEP_ENTRIES])?;
            let mut events = 0;
            while let Some(r) = q.next()? {
                entries.push((r.get(0)?, r.get(1)?, r.get(2)?));
                events += r.get::<_, i64>(3)?.max(0) as usize;
                if events >= STEP_EVENTS {
                    break;
                }
            }
        }
        let Some(last) = entries.last().map(|e| e.0) else { return Ok(0) };
        let mut all = Vec::new();
        for (seq, template, items) in &entries {
            all.extend(rows(*seq, template, &codec::decode_items(items)?));
        }
        // In key order: within a span the hashes scatter, and sorted inserts touch each page once.
        all.sort_unstable();
        // The index is derived from the log, and its progress row commits with its rows: this commit need not wait
        // for its own fsync (the next `synchronous=FULL` commit of the books syncs the WAL frames before it too; a
        // power cut loses at most the last steps, consistently, and the follower redoes them). Ingest's fsyncs then
        // share the disk with delivery's alone.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let step = self.index_step(all, last);
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        step?;
        // Not counted in `commits` (delivery's own, about one per Heap call, as /metrics reports them): the index
        // costs one commit per step whatever delivery does.
        Ok(entries.len())
    }

    fn index_step(&mut self, all: Vec<(i64, i64, i64)>, last: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut ins =
                tx.prepare_cached("INSERT OR IGNORE INTO finder_by_span (span, h, id) VALUES (?1, ?2, ?3)")?;
            for (span, h, id) in all {
                ins.execute(params![span, h, id])?;
            }
            tx.prepare_cached("UPDATE finder_span_progress SET upto = ?1 WHERE id = 0")?.execute(params![last])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes the rows of log entries retention is about to delete (`seq`, template, items of each).
    pub fn forget(&mut self, entries: &[(i64, String, Vec<codec::StoredItem>)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM finder_by_span WHERE span = ?1 AND h = ?2 AND id = ?3")?;
            for (seq, template, items) in entries {
                for (span, h, id) in rows(*seq, template, items) {
                    del.execute(params![span, h, id])?;
                }
            }
        }
        tx.commit()?;
        self.commits += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_keyed_by_hash_alone_is_dropped_and_both_layouts_start_again_from_the_first_entry() {
        let c = rusqlite::Connection::open_in_memory().expect("db");
        // A books file the previous version wrote: its index and its progress.
        c.execute_batch(
            "CREATE TABLE finder (h INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (h, id)) WITHOUT ROWID;
             INSERT INTO finder VALUES (1, 2);
             CREATE TABLE finder_progress (id INTEGER PRIMARY KEY CHECK (id = 0), upto INTEGER NOT NULL);
             INSERT INTO finder_progress VALUES (0, 42);",
        )
        .expect("old layout");
        c.execute_batch(SCHEMA).expect("schema");
        // As if this version had run on it before (and the previous one again since).
        c.execute_batch("INSERT INTO finder_by_span VALUES (0, 1, 2); UPDATE finder_span_progress SET upto = 40;")
            .expect("an earlier run of this layout");
        migrate(&c).expect("migrates");
        let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql);
        assert_eq!(q("SELECT count(*) FROM sqlite_master WHERE name = 'finder'"), 0, "the old table is gone");
        assert_eq!(q("SELECT upto FROM finder_span_progress"), 0, "the follower starts again from the first entry");
        assert_eq!(q("SELECT count(*) FROM finder_by_span"), 0, "and from an empty index");
        assert_eq!(q("SELECT upto FROM finder_progress"), 0, "the previous version, run again, rebuilds its own");
        c.execute_batch("INSERT INTO finder_by_span VALUES (0, 1, 2)").expect("a row");
        migrate(&c).expect("a second start changes nothing");
        assert_eq!(q("SELECT count(*) FROM finder_by_span"), 1);
    }

    #[test]
    fn a_value_hashes_the_same_every_time_and_differently_by_kind() {
        assert_eq!(hash(Kind::Identity, "u-1"), hash(Kind::Identity, "u-1"));
        assert_ne!(hash(Kind::Identity, "u-1"), hash(Kind::Key, "u-1"));
        assert_ne!(hash(Kind::Identity, "u-1"), hash(Kind::Identity, "u-2"));
        // FNV-1a of "i" alone: a fixed value, so an index written by one build is read by the next.
        assert_eq!(hash(Kind::Identity, ""), 0xaf63_e44c_8601_fa24_u64 as i64);
    }
}
