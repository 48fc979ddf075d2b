//! The group-commit writer: one task per instance takes every append waiting in its channel and writes them in one
//! transaction with array inserts, then NOTIFYs and commits, and only then answers each caller.

use super::pg_err;
use crate::domain::KeyScheme;
use crate::store::{Appended, Ingested, StoreError, now_ms};
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Appends waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

/// How long a measured schema size is trusted before the writer measures it again (store.max_bytes).
const SIZE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct PendingAppend {
    pub(super) ingested: Ingested,
    pub(super) reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The one task that writes appends: group commit.
pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) options: super::PgOptions,
    pub(super) channel: Arc<str>,
    /// Last measured size of the schema's tables and when it was measured.
    pub(super) size: Option<(i64, std::time::Instant)>,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<PendingAppend>) {
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
        let window = self.options.dedupe_window_ms;
        match append_all(&mut client, &bodies, &self.channel, window).await {
            Ok(answers) => {
                // A caller that gave up (timed-out request) is fine to ignore: its work is committed either way.
                for (p, a) in group.into_iter().zip(answers) {
                    let _ = p.reply.send(Ok(a));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.into_iter().next().map(|p| p.reply.send(Err(pg_err(e))));
            }
            Err(e) => {
                tracing::warn!(error = %e, appends = group.len(), "group append failed; writing each alone");
                for p in group {
                    let res = append_all(&mut client, &[&p.ingested], &self.channel, window).await.map_err(pg_err);
                    let _ = p.reply.send(res.map(|mut a| a.remove(0)));
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

/// What the dedupe found for one append: the whole request seen before (its first event ids), or per event the id
/// of the first delivery of the same message.
#[derive(Default)]
struct Seen {
    whole: Option<Vec<String>>,
    items: Vec<Option<String>>,
}

/// Claims the dedupe keys of `bodies` in the transaction: a key not held within `window_ms` is (re)written with this
/// append's ids; one held is a retry. Several instances claiming the same key wait on its row, so only one stores it.
async fn dedupe(
    tx: &deadpool_postgres::Transaction<'_>,
    bodies: &[&Ingested],
    window_ms: i64,
) -> Result<Vec<Seen>, tokio_postgres::Error> {
    let mut seen: Vec<Seen> = bodies.iter().map(|b| Seen { whole: None, items: vec![None; b.events.len()] }).collect();
    if window_ms <= 0 {
        return Ok(seen);
    }
    // Request keys first: a retried request writes no item keys.
    let mut group: HashMap<String, String> = HashMap::new();
    let mut claims: Vec<(String, i64, String, usize, Option<usize>)> = Vec::new();
    for (bi, b) in bodies.iter().enumerate().filter(|(_, b)| b.replay_of_raw.is_none()) {
        if let Some(key) = &b.request_key {
            let ids = b.events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>().join(",");
            match group.get(key) {
                Some(first) => seen[bi].whole = Some(split_ids(first)),
                None => {
                    group.insert(key.clone(), ids.clone());
                    claims.push((key.clone(), b.received_at, ids, bi, None));
                }
            }
        }
    }
    let held = claim_keys(tx, &claims, window_ms).await?;
    for (key, _, _, bi, _) in &claims {
        if let Some(ids) = held.get(key) {
            seen[*bi].whole = Some(split_ids(ids));
        }
    }
    let mut claims = Vec::new();
    let retried: Vec<bool> = seen.iter().map(|s| s.whole.is_some()).collect();
    for (bi, b) in bodies.iter().enumerate().filter(|(bi, b)| b.replay_of_raw.is_none() && !retried[*bi]) {
        for (ii, e) in b.events.iter().enumerate() {
            let Some(key) = &e.dedupe_key else { continue };
            match group.get(key) {
                Some(first) => seen[bi].items[ii] = Some(first.clone()),
                None => {
                    group.insert(key.clone(), e.event_id.clone());
                    claims.push((key.clone(), b.received_at, e.event_id.clone(), bi, Some(ii)));
                }
            }
        }
    }
    let held = claim_keys(tx, &claims, window_ms).await?;
    for (key, _, _, bi, ii) in &claims {
        if let (Some(ids), Some(ii)) = (held.get(key), ii) {
            seen[*bi].items[*ii] = Some(ids.clone());
        }
    }
    Ok(seen)
}

fn split_ids(ids: &str) -> Vec<String> {
    ids.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Writes the keys not held within the window; returns the ids of those that were held (retries).
async fn claim_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    claims: &[(String, i64, String, usize, Option<usize>)],
    window_ms: i64,
) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    if claims.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<&str> = claims.iter().map(|c| c.0.as_str()).collect();
    let ats: Vec<i64> = claims.iter().map(|c| c.1).collect();
    let ids: Vec<&str> = claims.iter().map(|c| c.2.as_str()).collect();
    let written: HashSet<String> = tx
        .query(
            &tx.prepare_cached(
                "INSERT INTO dedupe (key, at, event_ids) SELECT * FROM unnest($1::text[], $2::int8[], $3::text[])
                 ON CONFLICT (key) DO UPDATE SET at = excluded.at, event_ids = excluded.event_ids
                 WHERE dedupe.at < excluded.at - $4
                 RETURNING key",
            )
            .await?,
            &[&keys, &ats, &ids, &window_ms],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let held: Vec<&str> = keys.iter().copied().filter(|k| !written.contains(*k)).collect();
    if held.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(tx
        .query(&tx.prepare_cached("SELECT key, event_ids FROM dedupe WHERE key = ANY($1)").await?, &[&held])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Writes `bodies` (raw rows, event rows, rejection rows, re-render supersessions) in one transaction and NOTIFYs,
/// leaving out what the dedupe found to be a sender's retry; answers each body.
async fn append_all(
    client: &mut deadpool_postgres::Client,
    bodies: &[&Ingested],
    channel: &str,
    window_ms: i64,
) -> Result<Vec<Appended>, tokio_postgres::Error> {
    let now = now_ms();
    let tx = client.transaction().await?;
    let mut seen = dedupe(&tx, bodies, window_ms).await?;
    for (b, s) in bodies.iter().zip(seen.iter_mut()) {
        // Every event a retry of one stored before, and nothing refused: the request as a whole is a retry.
        if s.whole.is_none() && !b.events.is_empty() && b.rejections.is_empty() && s.items.iter().all(Option::is_some) {
            s.whole = Some(s.items.iter().flatten().cloned().collect());
        }
    }
    let answers: Vec<Appended> = bodies
        .iter()
        .zip(&seen)
        .map(|(b, s)| match &s.whole {
            Some(ids) => Appended { duplicates: ids.len(), event_ids: ids.clone(), duplicate: true, entry: None },
            None => Appended {
                event_ids: b
                    .events
                    .iter()
                    .zip(&s.items)
                    .map(|(e, first)| first.clone().unwrap_or(e.event_id.clone()))
                    .collect(),
                duplicate: false,
                duplicates: s.items.iter().filter(|i| i.is_some()).count(),
                entry: None,
            },
        })
        .collect();
    let kept: Vec<(&Ingested, &Seen)> =
        bodies.iter().copied().zip(seen.iter()).filter(|(_, s)| s.whole.is_none()).collect();
    let bodies: Vec<&Ingested> = kept.iter().map(|(b, _)| *b).collect();
    let replays: Vec<i64> = bodies.iter().filter_map(|b| b.replay_of_raw).collect();
    if !replays.is_empty() {
        // A re-render replaces the rows of its body: they must exist first.
        expand(&tx, Some(&replays)).await?;
        tx.execute(
            &tx.prepare_cached(
                "UPDATE events SET status = 'replaced', updated_at = $2, lease_owner = NULL, lease_expires_at = NULL
             WHERE raw_id = ANY($1) AND status != 'replaced'",
            )
            .await?,
            &[&replays, &now],
        )
        .await?;
    }
    // Each body's rows as they will be written: events not found to be retries, refusals, held items.
    let deferred: Vec<Deferred> = kept.iter().map(|(b, s)| Deferred::of(b, s, now)).collect();
    let pending: usize = deferred.iter().map(Deferred::pending).sum();
    let fresh: Vec<(&Ingested, &Deferred)> =
        kept.iter().map(|(b, _)| *b).zip(&deferred).filter(|(b, _)| b.replay_of_raw.is_none()).collect();
    if !fresh.is_empty() {
        // The ingest commit writes one row per body: its rows go in `items`, and become event rows (with every
        // index the operator views need) later, off this commit (`expand`).
        let sources: Vec<&str> = fresh.iter().map(|(b, _)| b.source.as_str()).collect();
        let templates: Vec<&str> = fresh.iter().map(|(b, _)| b.template.as_str()).collect();
        let received: Vec<i64> = fresh.iter().map(|(b, _)| b.received_at).collect();
        let raw: Vec<&[u8]> = fresh.iter().map(|(b, _)| b.body.as_slice()).collect();
        let items: Vec<Vec<u8>> = fresh.iter().map(|(_, d)| serde_json::to_vec(d).unwrap_or_default()).collect();
        let environments: Vec<&str> = fresh.iter().map(|(b, _)| b.environment.as_str()).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO raw_bodies (source, template, received_at, body, key_scheme, items, environment)
             SELECT u.source, u.template, u.received_at, u.body, $5::int2, u.items, u.environment
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::bytea[], $6::bytea[], $7::text[])
                  AS u(source, template, received_at, body, items, environment)",
            )
            .await?,
            // A body is stored once, by the intake, which renders new bodies with the default scheme.
            &[&sources, &templates, &received, &raw, &(KeyScheme::default().as_i64() as i16), &items, &environments],
        )
        .await?;
    }
    // A re-render's rows are written now, under the body they re-render.
    let mut cols = EventColumns::default();
    for (b, d) in kept.iter().map(|(b, _)| *b).zip(&deferred) {
        if let Some(raw_id) = b.replay_of_raw {
            cols.push_all(raw_id, &b.source, &b.template, b.received_at, d);
        }
    }
    insert_events(&tx, &cols, now).await?;
    if pending > 0 || !replays.is_empty() {
        // Delivered to listeners at COMMIT, and only if it commits.
        tx.execute(&tx.prepare_cached("SELECT pg_notify($1, '')").await?, &[&channel]).await?;
    }
    tx.commit().await?;
    Ok(answers)
}

/// A body's rows, kept with it by the ingest commit until they are written as event rows.
#[derive(serde::Serialize, serde::Deserialize)]
struct Deferred {
    /// When the append committed: the events are queued from then, whenever their rows are written.
    at: i64,
    environment: String,
    version: Option<String>,
    rows: Vec<DeferredRow>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeferredRow {
    id: String,
    index: i64,
    kind: String,
    app_id: String,
    identity: String,
    key: Option<String>,
    payload: Option<String>,
    status: String,
    error: Option<String>,
}

impl Deferred {
    fn of(b: &Ingested, s: &Seen, at: i64) -> Self {
        let mut rows = Vec::new();
        for (e, _) in b.events.iter().zip(&s.items).filter(|(_, first)| first.is_none()) {
            rows.push(DeferredRow {
                id: e.event_id.clone(),
                index: e.item_index,
                kind: e.kind.as_str().to_owned(),
                app_id: e.app_id.clone(),
                identity: e.identity.clone(),
                key: e.idempotency_key.clone(),
                payload: Some(e.payload.clone()),
                status: "pending".into(),
                error: None,
            });
        }
        let bare = |id: &str, index: i64, status: &str, error: String| DeferredRow {
            id: id.to_owned(),
            index,
            kind: "track".into(),
            app_id: String::new(),
            identity: String::new(),
            key: None,
            payload: None,
            status: status.into(),
            error: Some(error),
        };
        for r in &b.rejections {
            rows.push(bare(&r.event_id, r.item_index, "rejected", format!("{}: {}", r.field, r.message)));
        }
        if let Some(held) = &b.held {
            for i in 0..held.items {
                rows.push(bare(&uuid::Uuid::now_v7().to_string(), i as i64, "held", held.reason.clone()));
            }
        }
        Self { at, environment: b.environment.clone(), version: b.template_version.clone(), rows }
    }

    /// What stands for a body whose deferred rows cannot be decoded: one held row saying so, in the body's
    /// environment (`raw_bodies.environment`; the default one for a body stored before that column).
    fn unreadable(e: &serde_json::Error, received_at: i64, environment: Option<String>) -> Self {
        let row = DeferredRow {
            id: uuid::Uuid::now_v7().to_string(),
            index: 0,
            kind: "track".into(),
            app_id: String::new(),
            identity: String::new(),
            key: None,
            payload: None,
            status: "held".into(),
            error: Some(format!(
                "the rows stored with this body cannot be read ({e}); render it again: \
                 heap-relay replay --status held --rerender"
            )),
        };
        Self { at: received_at, environment: environment.unwrap_or_default(), version: None, rows: vec![row] }
    }

    fn pending(&self) -> usize {
        self.rows.iter().filter(|r| r.status == "pending").count()
    }
}

/// Bodies expanded per transaction.
pub(super) const EXPAND_BATCH: i64 = 256;

/// First key of the advisory lock each expanding transaction holds shared (the second is the schema's name hashed),
/// so that a read can wait for the expansions in flight (`PgStore::caught_up`) without locking any row.
pub const EXPANDING_LOCK: i32 = 0x6872_6578; // "hrex"

/// Writes the deferred rows of stored bodies as event rows: those of `only`, or the oldest `EXPAND_BATCH` bodies
/// no other transaction is expanding (`SKIP LOCKED`). Returns how many bodies it expanded.
pub(super) async fn expand(
    tx: &deadpool_postgres::Transaction<'_>,
    only: Option<&[i64]>,
) -> Result<usize, tokio_postgres::Error> {
    tx.execute(
        &tx.prepare_cached("SELECT pg_advisory_xact_lock_shared($1, hashtext(current_schema()))").await?,
        &[&EXPANDING_LOCK],
    )
    .await?;
    let rows = match only {
        Some(ids) => {
            tx.query(
                &tx.prepare_cached(
                    "SELECT id, source, template, received_at, items, environment FROM raw_bodies
                     WHERE id = ANY($1) AND items IS NOT NULL ORDER BY id FOR UPDATE",
                )
                .await?,
                &[&ids],
            )
            .await?
        }
        None => {
            tx.query(
                &tx.prepare_cached(
                    "SELECT id, source, template, received_at, items, environment FROM raw_bodies
                     WHERE items IS NOT NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                )
                .await?,
                &[&EXPAND_BATCH],
            )
            .await?
        }
    };
    if rows.is_empty() {
        return Ok(0);
    }
    let bodies: Vec<(i64, String, String, i64, Deferred)> = rows
        .iter()
        .map(|r| {
            let items: Vec<u8> = r.get(4);
            // Written by `append_all` from the same struct. An unreadable one (never expected) must neither block
            // every later body nor vanish: it becomes one held row, which `replay --status held --rerender`
            // renders again from the stored raw body.
            let d = serde_json::from_slice(&items).unwrap_or_else(|e| {
                tracing::error!(raw_id = r.get::<_, i64>(0), error = %e, "a stored body's rows cannot be read");
                Deferred::unreadable(&e, r.get(3), r.get(5))
            });
            (r.get(0), r.get(1), r.get(2), r.get(3), d)
        })
        .collect();
    let mut cols = EventColumns::default();
    for (raw_id, source, template, received_at, d) in &bodies {
        cols.push_all(*raw_id, source, template, *received_at, d);
    }
    insert_events(tx, &cols, now_ms()).await?;
    let ids: Vec<i64> = bodies.iter().map(|b| b.0).collect();
    tx.execute(&tx.prepare_cached("UPDATE raw_bodies SET items = NULL WHERE id = ANY($1)").await?, &[&ids]).await?;
    Ok(bodies.len())
}

async fn insert_events(
    tx: &deadpool_postgres::Transaction<'_>,
    cols: &EventColumns<'_>,
    now: i64,
) -> Result<(), tokio_postgres::Error> {
    if cols.event_id.is_empty() {
        return Ok(());
    }
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO events (event_id, raw_id, item_index, source, template, kind, app_id, identity,
                                 idempotency_key, payload, status, enqueued_at, next_attempt_at, received_at,
                                 updated_at, last_error, environment, template_version)
             SELECT u.event_id, u.raw_id, u.item_index, u.source, u.template, u.kind, u.app_id, u.identity,
                    u.key, u.payload, u.status, u.queued, u.queued, u.received_at, $14, u.error, u.environment,
                    u.version
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[], $15::text[],
                         $16::text[], $17::int8[])
                  AS u(event_id, raw_id, item_index, source, template, kind, app_id, identity, key, payload, status,
                       received_at, error, environment, version, queued)",
        )
        .await?,
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
            &cols.environment,
            &cols.version,
            &cols.queued,
        ],
    )
    .await?;
    Ok(())
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
    error: Vec<Option<&'a str>>,
    environment: Vec<&'a str>,
    version: Vec<Option<&'a str>>,
    /// Queued from (enqueued_at, next_attempt_at).
    queued: Vec<i64>,
}

impl<'a> EventColumns<'a> {
    fn push_all(&mut self, raw_id: i64, source: &'a str, template: &'a str, received_at: i64, d: &'a Deferred) {
        for r in &d.rows {
            self.event_id.push(&r.id);
            self.raw_id.push(raw_id);
            self.item_index.push(r.index);
            self.source.push(source);
            self.template.push(template);
            self.kind.push(&r.kind);
            self.app_id.push(&r.app_id);
            self.identity.push(&r.identity);
            self.key.push(r.key.as_deref());
            self.payload.push(r.payload.as_deref());
            self.status.push(&r.status);
            self.received_at.push(received_at);
            self.error.push(r.error.as_deref());
            self.environment.push(&d.environment);
            self.version.push(d.version.as_deref());
            self.queued.push(d.at);
        }
    }
}

pub(super) async fn schema_bytes(client: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'",
            &[],
        )
        .await
        .map(|r| r.get(0))
}
