//! The group-commit writer: one task per instance takes every append waiting in its channel and writes them in one
//! transaction with array inserts, then NOTIFYs and commits, and only then answers each caller.

use super::pg_err;
use crate::store::{Ingested, StoreError, now_ms};
use deadpool_postgres::Pool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Appends waiting at most this many to a transaction.
const MAX_GROUP: usize = 512;

/// How long a measured schema size is trusted before the writer measures it again (store.max_bytes).
const SIZE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct PendingAppend {
    pub(super) ingested: Ingested,
    pub(super) reply: oneshot::Sender<Result<(), StoreError>>,
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
        match append_all(&mut client, &bodies, &self.channel).await {
            Ok(()) => {
                // A caller that gave up (timed-out request) is fine to ignore: its work is committed either way.
                for p in group {
                    let _ = p.reply.send(Ok(()));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.into_iter().next().map(|p| p.reply.send(Err(pg_err(e))));
            }
            Err(e) => {
                tracing::warn!(error = %e, appends = group.len(), "group append failed; writing each alone");
                for p in group {
                    let res = append_all(&mut client, &[&p.ingested], &self.channel).await.map_err(pg_err);
                    let _ = p.reply.send(res);
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

/// Writes `bodies` (raw rows, event rows, rejection rows, re-render supersessions) in one transaction and NOTIFYs.
async fn append_all(
    client: &mut deadpool_postgres::Client,
    bodies: &[&Ingested],
    channel: &str,
) -> Result<(), tokio_postgres::Error> {
    let now = now_ms();
    let tx = client.transaction().await?;
    let replays: Vec<i64> = bodies.iter().filter_map(|b| b.replay_of_raw).collect();
    if !replays.is_empty() {
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
    let fresh: Vec<&Ingested> = bodies.iter().copied().filter(|b| b.replay_of_raw.is_none()).collect();
    let mut raw_ids: Vec<i64> = Vec::new();
    if !fresh.is_empty() {
        raw_ids = tx
            .query(
                &tx.prepare_cached(
                    "SELECT nextval(pg_get_serial_sequence('raw_bodies', 'id')) FROM generate_series(1, $1::int4)",
                )
                .await?,
                &[&(fresh.len() as i32)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let sources: Vec<&str> = fresh.iter().map(|b| b.source.as_str()).collect();
        let templates: Vec<&str> = fresh.iter().map(|b| b.template.as_str()).collect();
        let received: Vec<i64> = fresh.iter().map(|b| b.received_at).collect();
        let raw: Vec<&[u8]> = fresh.iter().map(|b| b.body.as_slice()).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO raw_bodies (id, source, template, received_at, body)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::bytea[])",
            )
            .await?,
            &[&raw_ids, &sources, &templates, &received, &raw],
        )
        .await?;
    }
    let mut fresh_ids = raw_ids.into_iter();
    let mut cols = EventColumns::default();
    let mut pending = 0usize;
    for b in bodies {
        let raw_id = match b.replay_of_raw {
            Some(id) => id,
            None => fresh_ids.next().unwrap_or_default(),
        };
        for e in &b.events {
            cols.push(b, raw_id, &e.event_id, e.item_index, e.kind.as_str(), &e.app_id, &e.identity);
            cols.key.push(e.idempotency_key.as_deref());
            cols.payload.push(Some(e.payload.as_str()));
            cols.status.push("pending");
            cols.error.push(None);
            pending += 1;
        }
        for r in &b.rejections {
            cols.push(b, raw_id, &r.event_id, r.item_index, "track", "", "");
            cols.key.push(None);
            cols.payload.push(None);
            cols.status.push("rejected");
            cols.error.push(Some(format!("{}: {}", r.field, r.message)));
        }
    }
    if !cols.event_id.is_empty() {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO events (event_id, raw_id, item_index, source, template, kind, app_id, identity,
                                 idempotency_key, payload, status, enqueued_at, next_attempt_at, received_at,
                                 updated_at, last_error)
             SELECT u.event_id, u.raw_id, u.item_index, u.source, u.template, u.kind, u.app_id, u.identity,
                    u.key, u.payload, u.status, $14, $14, u.received_at, $14, u.error
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[])
                  AS u(event_id, raw_id, item_index, source, template, kind, app_id, identity, key, payload, status,
                       received_at, error)",
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
            ],
        )
        .await?;
    }
    if pending > 0 || !replays.is_empty() {
        // Delivered to listeners at COMMIT, and only if it commits.
        tx.execute(&tx.prepare_cached("SELECT pg_notify($1, '')").await?, &[&channel]).await?;
    }
    tx.commit().await
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
    error: Vec<Option<String>>,
}

impl<'a> EventColumns<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        b: &'a Ingested,
        raw_id: i64,
        event_id: &'a str,
        item_index: i64,
        kind: &'a str,
        app_id: &'a str,
        identity: &'a str,
    ) {
        self.event_id.push(event_id);
        self.raw_id.push(raw_id);
        self.item_index.push(item_index);
        self.source.push(&b.source);
        self.template.push(&b.template);
        self.kind.push(kind);
        self.app_id.push(app_id);
        self.identity.push(identity);
        self.received_at.push(b.received_at);
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
