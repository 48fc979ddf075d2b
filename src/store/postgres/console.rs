//! The operator reads of `store::queries` on PostgreSQL: keyset pages of `events` (by id, newest first), the last
//! hour, failures by reason, and the audit log (`console_audit`, shared by every instance).
//!
//! The indexes these reads need are part of the store's schema (`postgres::SCHEMA`): built once at start, never on
//! a page view (building one on a large table would hold every writer). The audit table is created on first use,
//! once per process and schema (`ensure_console`).

use super::log::{VIEW_COLUMNS, view};
use super::{PgStore, params};
use crate::store::queries::*;
use crate::store::{Millis, Scope, Status, StoreError};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use tokio_postgres::types::ToSql;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS console_audit (
    id        BIGSERIAL PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    selection TEXT   NOT NULL,
    count     BIGINT NOT NULL
);
";

const FLOW: &str = "SELECT source, environment, app_id, status, received_at - (received_at % 60000), count(*)
     FROM events WHERE received_at >= $1 AND status != 'replaced' GROUP BY 1, 2, 3, 4, 5";
const DELIVERED_PER_MINUTE: &str = "SELECT at - (at % 60000), count(*) FROM attempts
     WHERE at >= $1 AND http_status BETWEEN 200 AND 299 GROUP BY 1";
const LAST_CALL: &str = "SELECT at, http_status, error FROM attempts ORDER BY at DESC LIMIT 1";
/// Failures are grouped over the newest `FAILURE_SCAN` dead or refused events (the partial index `events_failed_id`,
/// walked backwards), so the page costs the same with a million dead letters; the page says so.
const FAILURES: &str = "SELECT status, coalesce(last_error, ''), count(*), (array_agg(event_id ORDER BY id DESC))[1],
     max(received_at)
     FROM (SELECT id, status, last_error, event_id, received_at FROM events WHERE status IN ('dead', 'rejected')
           ORDER BY id DESC LIMIT $1) newest
     GROUP BY 1, 2";

/// Waiting events a purge moves per transaction.
const PURGE_CHUNK: i64 = 5000;

/// Schemas whose console objects this process has made sure of.
fn ensured() -> &'static Mutex<HashSet<String>> {
    static SET: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    SET.get_or_init(Default::default)
}

impl PgStore {
    async fn ensure_console(&self) -> Result<(), StoreError> {
        let key = self.schema.to_string();
        if ensured().lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(());
        }
        self.pool.get().await?.batch_execute(SCHEMA).await?;
        ensured().lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        Ok(())
    }

    pub async fn page(&self, f: EventFilter) -> Result<Page, StoreError> {
        self.caught_up().await?;
        let (sql, args, limit) = page_sql(&f);
        let client = self.pool.get().await?;
        let rows = client.query(&sql, &params(&args)).await?;
        let views: Vec<(i64, _)> = rows.iter().map(view).collect();
        let next = (views.len() as i64 >= limit).then(|| views.last().map(|v| v.0.to_string())).flatten();
        Ok(Page { events: views.into_iter().map(|v| v.1).collect(), next, truncated: false })
    }

    pub async fn flow(&self, now: Millis) -> Result<Flow, StoreError> {
        self.caught_up().await?;
        self.ensure_console().await?;
        let since = now - 3_600_000;
        let mut flow = Flow { since, minutes: empty_hour(now), ..Default::default() };
        let client = self.pool.get().await?;
        for r in client.query(FLOW, &[&since]).await? {
            let status = Status::parse(r.get(3)).unwrap_or(Status::Pending);
            let n: i64 = r.get(5);
            for _ in 0..n {
                tally(&mut flow.rows, r.get(0), r.get(1), r.get(2), status);
            }
            bump(&mut flow.minutes, r.get(4), n, 0);
            if status == Status::Rejected {
                flow.refused += n;
            }
        }
        for r in client.query(DELIVERED_PER_MINUTE, &[&since]).await? {
            bump(&mut flow.minutes, r.get(0), 0, r.get(1));
        }
        flow.last_call = client
            .query_opt(LAST_CALL, &[])
            .await?
            .map(|r| (r.get(0), r.get::<_, Option<i32>>(1).map(|s| s as u16), r.get(2)));
        Ok(flow)
    }

    pub async fn failures(&self) -> Result<Vec<FailureGroup>, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        Ok(client
            .query(FAILURES, &[&(FAILURE_SCAN as i64)])
            .await?
            .iter()
            .map(|r| FailureGroup {
                status: if r.get::<_, &str>(0) == "dead" { "dead" } else { "rejected" },
                reason: r.get(1),
                count: r.get(2),
                newest: r.get(3),
                newest_at: r.get(4),
            })
            .collect())
    }

    pub async fn failure_members(
        &self,
        status: Status,
        reason: String,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.caught_up().await?;
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT event_id FROM events WHERE status = $1 AND coalesce(last_error, '') = $2 ORDER BY id DESC LIMIT $3",
                &[&status.as_str(), &reason, &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn audit(&self, e: AuditEntry) -> Result<(), StoreError> {
        self.ensure_console().await?;
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO console_audit (at, actor, action, selection, count) VALUES ($1, $2, $3, $4, $5)",
                &[&e.at, &e.actor, &e.action, &e.selection, &e.count],
            )
            .await?;
        Ok(())
    }

    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        self.ensure_console().await?;
        let rows = self
            .pool
            .get()
            .await?
            .query("SELECT at, actor, action, selection, count FROM console_audit ORDER BY id DESC LIMIT $1", &[&limit])
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                at: r.get(0),
                actor: r.get(1),
                action: r.get(2),
                selection: r.get(3),
                count: r.get(4),
            })
            .collect())
    }

    /// Moves every waiting event of `scope` to dead letters (a lease held on one is fenced off), `PURGE_CHUNK` rows
    /// a transaction, so a large backlog never holds its row locks for long.
    pub async fn purge(&self, scope: Scope) -> Result<i64, StoreError> {
        self.caught_up().await?;
        let (column, value) = match scope {
            Scope::AppId(a) => ("app_id", a),
            Scope::Environment(e) => ("environment", e),
        };
        // The waiting rows are found through the partial index of waiting rows (`events_ready_id`).
        let sql = format!(
            "UPDATE events SET status = 'dead', last_error = $2, updated_at = $3, lease_owner = NULL,
                    lease_expires_at = NULL, lease_token = lease_token + 1
             WHERE id = ANY(ARRAY(SELECT id FROM events WHERE {column} = $1 AND status IN ('pending', 'retrying')
                                  ORDER BY id LIMIT $4))"
        );
        let client = self.pool.get().await?;
        let mut total = 0;
        loop {
            let n = client.execute(&sql, &[&value, &PURGED, &crate::store::now_ms(), &PURGE_CHUNK]).await?;
            total += n as i64;
            if (n as i64) < PURGE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// EXPLAIN of each statement the console's pages run, with the arguments a page passes: (what it serves,
    /// statement, plan). The deliveries page is planned for a filter by app_id and status and one by identity.
    pub async fn console_plans(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        self.ensure_console().await?;
        let client = self.pool.get().await?;
        let mut out = Vec::new();
        let hour: i64 = crate::store::now_ms() - 3_600_000;
        let scan = FAILURE_SCAN as i64;
        let filter = |app_id: Option<&str>, status: Option<Status>, identity: Option<&str>| EventFilter {
            query: crate::store::Query { status, limit: 50, ..Default::default() },
            app_id: app_id.map(str::to_owned),
            identity: identity.map(str::to_owned),
            ..Default::default()
        };
        let pages = [
            ("deliveries by app_id and status", filter(Some("1234567890"), Some(Status::Dead), None)),
            ("deliveries by identity", filter(None, None, Some("user-1"))),
            ("deliveries, first page", filter(None, None, None)),
        ];
        for (what, f) in pages {
            let (sql, args, _) = page_sql(&f);
            let plan: Vec<String> =
                client.query(&format!("EXPLAIN {sql}"), &params(&args)).await?.iter().map(|r| r.get(0)).collect();
            out.push((what.to_owned(), sql, plan.join("; ")));
        }
        let statements: [(&str, &str, &[&(dyn ToSql + Sync)]); 4] = [
            ("overview", FLOW, &[&hour]),
            ("overview", DELIVERED_PER_MINUTE, &[&hour]),
            ("overview", LAST_CALL, &[]),
            ("failures", FAILURES, &[&scan]),
        ];
        for (what, sql, args) in statements {
            let plan: Vec<String> =
                client.query(&format!("EXPLAIN {sql}"), args).await?.iter().map(|r| r.get(0)).collect();
            out.push((what.to_owned(), sql.to_owned(), plan.join("; ")));
        }
        Ok(out)
    }
}

/// A page's statement, its arguments, and its limit: every filter in the WHERE clause, newest first by id.
fn page_sql(f: &EventFilter) -> (String, Vec<Box<dyn ToSql + Sync + Send>>, i64) {
    let q = &f.query;
    let mut cond = vec!["1 = 1".to_owned()];
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut push = |sql: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        cond.push(format!("{sql} ${}", args.len()));
    };
    if let Some(s) = q.status {
        push("status =", Box::new(s.as_str()));
    }
    for (col, v) in [
        ("source =", &q.source),
        ("environment =", &q.environment),
        ("template =", &f.template),
        ("app_id =", &f.app_id),
        ("identity =", &f.identity),
        ("idempotency_key =", &f.key),
    ] {
        if let Some(v) = v {
            push(col, Box::new(v.clone()));
        }
    }
    if let Some(t) = q.since {
        push("received_at >=", Box::new(t));
    }
    if let Some(t) = q.until {
        push("received_at <", Box::new(t));
    }
    if let Some(b) = f.before.as_deref().and_then(|b| b.parse::<i64>().ok()) {
        push("id <", Box::new(b));
    }
    let limit = if q.limit > 0 { q.limit } else { 100 };
    args.push(Box::new(limit));
    let sql = format!(
        "SELECT {VIEW_COLUMNS} FROM events WHERE {} ORDER BY id DESC LIMIT ${}",
        cond.join(" AND "),
        args.len()
    );
    (sql, args, limit)
}
