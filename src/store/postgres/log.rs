//! The delivery log on PostgreSQL: the queries behind `/admin/deliveries`, `heap-relay deliveries`, `/metrics`
//! queue figures and re-render (raw bodies), with the same meaning as the SQLite store's.

use super::writer::schema_bytes;
use super::{PgStore, params, selector_sql};
use crate::domain::CallKind;
use crate::store::{AttemptView, EventView, QueueStats, RawBody, Selector, Status, StoreError, iso, stored_key_scheme};

impl PgStore {
    pub async fn get(&self, event_id: &str) -> Result<EventView, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        let row = client
            .query_opt(&format!("SELECT {VIEW_COLUMNS} FROM events WHERE event_id = $1"), &[&event_id])
            .await?
            .ok_or(StoreError::NotFound)?;
        let (id, mut v) = view(&row);
        let log = client
            .query(&client.prepare_cached("SELECT at, http_status, latency_ms, batch_size, error FROM attempts WHERE event_row = $1 ORDER BY id").await?,
                &[&id],
            )
            .await?
            .iter()
            .map(|r| AttemptView {
                at: iso(r.get(0)),
                http_status: r.get::<_, Option<i32>>(1).map(|s| s as u16),
                latency_ms: r.get(2),
                batch_size: r.get(3),
                error: r.get(4),
            })
            .collect();
        v.attempt_log = Some(log);
        Ok(v)
    }

    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        let r = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT (SELECT count(*) FROM events WHERE status IN ('pending', 'retrying')),
                        (SELECT min(enqueued_at) FROM events WHERE status IN ('pending', 'retrying')),
                        (SELECT count(*) FROM events WHERE status = 'dead')",
                    )
                    .await?,
                &[],
            )
            .await?;
        Ok(QueueStats {
            delivery_commits: None,
            index_lag_entries: None,
            ready_or_waiting: r.get(0),
            oldest_pending_ms: r.get(1),
            dead: r.get(2),
            db_bytes: schema_bytes(&client).await?,
            commits: None,
            bodies_committed: None,
        })
    }

    /// The raw bodies behind the selected events, for a re-render.
    /// The ids of the raw bodies behind the selected events, in order.
    pub async fn raw_body_ids(&self, selector: Selector) -> Result<Vec<i64>, StoreError> {
        self.caught_up().await?;
        let (cond, args) = selector_sql(&selector, 1);
        let sql = format!(
            "SELECT DISTINCT raw_id FROM events WHERE {cond} AND status != 'replaced' AND raw_id IS NOT NULL ORDER BY raw_id"
        );
        let client = self.pool.get().await?;
        Ok(client.query(&sql, &params(&args)).await?.iter().map(|r| r.get(0)).collect())
    }

    /// One raw body by id, if it is still kept.
    pub async fn raw_body(&self, id: i64) -> Result<Option<RawBody>, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT r.id, r.source, r.template, r.received_at, r.body,
                        coalesce((SELECT e.environment FROM events e WHERE e.raw_id = r.id LIMIT 1), ''),
                        coalesce(r.key_scheme, 1)::int8
                 FROM raw_bodies r WHERE r.id = $1",
                &[&id],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        let scheme: i64 = r.get(6);
        Ok(Some(RawBody {
            id: r.get(0),
            source: r.get(1),
            template: r.get(2),
            received_at: r.get(3),
            body: r.get(4),
            environment: r.get(5),
            key_scheme: stored_key_scheme(scheme)?,
        }))
    }
}

pub(super) const VIEW_COLUMNS: &str =
    "id, event_id, status, source, template, kind, app_id, identity, idempotency_key, item_index,
     attempts, received_at, updated_at, next_attempt_at, last_error, payload, environment, template_version";

pub(super) fn view(r: &tokio_postgres::Row) -> (i64, EventView) {
    let status = Status::parse(r.get(2)).unwrap_or(Status::Pending);
    let payload: Option<&str> = r.get(15);
    let waiting = matches!(status, Status::Pending | Status::Retrying);
    (
        r.get(0),
        EventView {
            id: r.get(1),
            status: status.as_str(),
            source: r.get(3),
            environment: r.get(16),
            template: r.get(4),
            template_version: r.get(17),
            kind: CallKind::parse(r.get(5)).map_or("track", CallKind::as_str),
            app_id: r.get(6),
            identity: r.get(7),
            idempotency_key: r.get(8),
            item_index: r.get(9),
            attempts: r.get(10),
            received_at: iso(r.get(11)),
            updated_at: iso(r.get(12)),
            next_attempt_at: waiting.then(|| iso(r.get(13))),
            last_error: r.get(14),
            payload: payload.and_then(|p| serde_json::from_str(p).ok()),
            attempt_log: None,
        },
    )
}
