//! The store reads behind the console (and `/admin/deliveries`, `heap-relay deliveries`), with one meaning on both
//! backends: keyset pages under every filter, failures grouped by reason with their members, the last hour, and
//! the audit log.

use crate::postgres::TestSchema;
use crate::store_contract::{body, delivered, postgres, sqlite};
use heap_relay::store::postgres::PgOptions;
use heap_relay::store::queries::{AuditEntry, EventFilter};
use heap_relay::store::sqlite::SqliteOptions;
use heap_relay::store::{AttemptLog, AttemptRecord, Ingested, Paused, Query, Resolution, Scope, Status, Store, now_ms};
use heap_relay::store::{PgStore, SqliteStore};
use std::collections::HashSet;

macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::sqlite().await.store).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::postgres().await.store).await
            }
        }
    )*};
}

both!(
    pages_walk_the_log_newest_first_by_cursor_and_filter_by_identity_key_and_app_id,
    failures_group_dead_and_refused_events_by_reason_and_name_their_members,
    the_last_hour_counts_what_came_in_and_what_heap_accepted,
    the_audit_log_keeps_actions_newest_first,
    a_purge_moves_the_waiting_events_of_an_app_id_to_dead_letters_and_leaves_the_rest,
    a_paused_environment_is_not_claimed_and_a_purge_of_it_dead_letters_only_its_waiting_events,
);

fn in_environment(tag: &str, n: usize, environment: &str) -> Ingested {
    Ingested { environment: environment.into(), ..body(tag, n) }
}

async fn a_paused_environment_is_not_claimed_and_a_purge_of_it_dead_letters_only_its_waiting_events(store: Store) {
    store.append(in_environment("p", 3, "prod")).await.expect("append");
    store.append(in_environment("d", 2, "")).await.expect("append");
    let paused = Paused { environments: vec!["prod".into()], ..Default::default() };
    let claimed = store.claim("w", now_ms(), 60_000, 10, paused, None).await.expect("claim");
    let keys: Vec<String> = claimed.iter().map(|c| c.payload.clone()).collect();
    assert_eq!(claimed.len(), 2, "only the default environment's events go: {keys:?}");
    assert!(keys.iter().all(|k| k.contains("\"d-")), "{keys:?}");
    store.release_owner("w").await.expect("release");

    let default_paused = Paused { environments: vec![String::new()], ..Default::default() };
    let claimed = store.claim("w", now_ms(), 60_000, 10, default_paused, None).await.expect("claim");
    assert_eq!(claimed.len(), 3, "pausing the default environment leaves prod's events to go");
    store.release_owner("w").await.expect("release");

    assert_eq!(store.purge(Scope::Environment("dev".into())).await.expect("purge"), 0, "another environment");
    assert_eq!(store.purge(Scope::Environment("prod".into())).await.expect("purge"), 3);
    let left = store.claim("w", now_ms(), 60_000, 10, Paused::default(), None).await.expect("claim");
    assert_eq!(left.len(), 2, "the default environment's events still wait");
    assert!(left.iter().all(|c| c.payload.contains("\"d-")));
    let groups = store.failures().await.expect("failures");
    let purged = groups.iter().find(|g| g.reason == heap_relay::store::queries::PURGED).expect("a purged group");
    assert_eq!((purged.status, purged.count), ("dead", 3));
}

async fn a_purge_moves_the_waiting_events_of_an_app_id_to_dead_letters_and_leaves_the_rest(store: Store) {
    store.append(body("a", 3)).await.expect("append");
    let claimed = store.claim("w", now_ms(), 60_000, 1, Default::default(), None).await.expect("claim");
    store.record(vec![delivered(claimed[0].id, claimed[0].lease_token)]).await.expect("record");
    store.append(body("b", 2)).await.expect("append");
    assert_eq!(store.purge(Scope::AppId("999".into())).await.expect("purge"), 0, "another app_id's events stay");
    assert_eq!(
        store.purge(Scope::AppId("1234567890".into())).await.expect("purge"),
        4,
        "2 left of the first body, 2 of the second"
    );
    assert!(
        store.claim("w", now_ms(), 60_000, 10, Default::default(), None).await.expect("claim").is_empty(),
        "nothing left to send"
    );
    assert_eq!(store.get(&claimed[0].event_id).await.expect("get").status, "delivered", "the delivered one stays");
    let groups = store.failures().await.expect("failures");
    let purged = groups.iter().find(|g| g.reason == heap_relay::store::queries::PURGED).expect("a purged group");
    assert_eq!((purged.status, purged.count), ("dead", 4));
    assert_eq!(store.stats().await.expect("stats").ready_or_waiting, 0);
}

fn filter(limit: i64) -> EventFilter {
    EventFilter { query: Query { limit, ..Default::default() }, ..Default::default() }
}

async fn pages_walk_the_log_newest_first_by_cursor_and_filter_by_identity_key_and_app_id(store: Store) {
    store.append(body("a", 3)).await.expect("append");
    store.append(body("b", 2)).await.expect("append");
    let mut seen = Vec::new();
    let mut before = None;
    for _ in 0..10 {
        let page = store.page(EventFilter { before: before.clone(), ..filter(2) }).await.expect("page");
        seen.extend(page.events.iter().map(|e| e.idempotency_key.clone().unwrap_or_else(|| e.id.clone())));
        before = page.next;
        if before.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 7, "5 events and 2 refused items, each once: {seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7, "{seen:?}");
    assert_eq!(seen.iter().filter(|k| k.starts_with("b-")).count(), 2);
    let first_b = seen.iter().position(|k| k.starts_with("b-"));
    let first_a = seen.iter().position(|k| k.starts_with("a-"));
    assert!(first_b < first_a, "newest first: {seen:?}");

    let by = |f: EventFilter| {
        let store = store.clone();
        async move { store.page(f).await.expect("page").events }
    };
    let found = by(EventFilter { key: Some("a-1".into()), ..filter(10) }).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].identity, "user-1");
    assert_eq!(by(EventFilter { identity: Some("user-0".into()), ..filter(10) }).await.len(), 2);
    assert_eq!(by(EventFilter { app_id: Some("1234567890".into()), ..filter(10) }).await.len(), 5);
    assert!(by(EventFilter { app_id: Some("999".into()), ..filter(10) }).await.is_empty());
    assert_eq!(by(EventFilter { template: Some("default".into()), ..filter(10) }).await.len(), 7);
}

fn dead(id: i64, lease_token: i64, why: &str) -> AttemptRecord {
    AttemptRecord {
        id,
        lease_token,
        attempts: vec![AttemptLog {
            call: id as u64,
            at: now_ms(),
            http_status: Some(400),
            latency_ms: 3,
            batch_size: 1,
            error: Some(why.into()),
        }],
        resolution: Resolution::Dead,
        error: Some(why.into()),
    }
}

async fn failures_group_dead_and_refused_events_by_reason_and_name_their_members(store: Store) {
    store.append(body("a", 4)).await.expect("append");
    let claimed = store.claim("w", now_ms(), 60_000, 10, Default::default(), None).await.expect("claim");
    let records = vec![
        dead(claimed[0].id, claimed[0].lease_token, "Heap answered 400: x"),
        dead(claimed[1].id, claimed[1].lease_token, "Heap answered 400: x"),
        dead(claimed[2].id, claimed[2].lease_token, "Heap answered 400: y"),
        delivered(claimed[3].id, claimed[3].lease_token),
    ];
    store.record(records).await.expect("record");
    let groups = store.failures().await.expect("failures");
    let summary: Vec<(&str, &str, i64)> = groups.iter().map(|g| (g.status, g.reason.as_str(), g.count)).collect();
    assert_eq!(summary.len(), 3, "{summary:?}");
    assert_eq!(summary[0], ("dead", "Heap answered 400: x", 2), "most events first: {summary:?}");
    assert!(summary.contains(&("dead", "Heap answered 400: y", 1)), "{summary:?}");
    assert!(summary.iter().any(|g| g.0 == "rejected" && g.2 == 1), "{summary:?}");
    assert_eq!(groups[0].newest, claimed[1].event_id, "the newest example");

    let members = store.failure_members(Status::Dead, "Heap answered 400: x".into(), 10).await.expect("members");
    assert_eq!(
        members.into_iter().collect::<HashSet<_>>(),
        HashSet::from([claimed[0].event_id.clone(), claimed[1].event_id.clone()])
    );
    let refused = groups.iter().find(|g| g.status == "rejected").expect("refused group");
    let members = store.failure_members(Status::Rejected, refused.reason.clone(), 10).await.expect("members");
    assert_eq!(members, [refused.newest.clone()]);
}

async fn the_last_hour_counts_what_came_in_and_what_heap_accepted(store: Store) {
    store.append(body("a", 3)).await.expect("append");
    let claimed = store.claim("w", now_ms(), 60_000, 10, Default::default(), None).await.expect("claim");
    store.record(claimed.iter().take(2).map(|c| delivered(c.id, c.lease_token)).collect()).await.expect("record");
    let flow = store.flow(now_ms()).await.expect("flow");
    assert_eq!(flow.minutes.len(), 60);
    assert_eq!(flow.minutes.iter().map(|m| m.received).sum::<i64>(), 4, "3 events and a refused item");
    assert_eq!(flow.minutes.iter().map(|m| m.delivered).sum::<i64>(), 2);
    assert_eq!(flow.refused, 1);
    let row = flow.rows.iter().find(|r| r.app_id == "1234567890").expect("the app's row");
    assert_eq!((row.received, row.delivered, row.waiting), (3, 2, 1), "{row:?}");
    assert_eq!(flow.last_call.map(|c| c.1), Some(Some(200)));
}

async fn the_audit_log_keeps_actions_newest_first(store: Store) {
    for (i, action) in ["pause", "rerender"].into_iter().enumerate() {
        let entry = AuditEntry {
            at: now_ms() + i as i64,
            actor: "admin".into(),
            action: action.into(),
            selection: format!("selection {i}"),
            count: i as i64 * 10,
        };
        store.audit(entry).await.expect("audit");
    }
    let log = store.audit_log(10).await.expect("audit log");
    let actions: Vec<(&str, i64)> = log.iter().map(|e| (e.action.as_str(), e.count)).collect();
    assert_eq!(actions, [("rerender", 10), ("pause", 0)]);
}

/// 120,000 events over the last 33 hours (one a second): a tenth of app_id 1234567890, 5,000 identities, 1% dead,
/// 1% refused, 1% waiting; a delivery call per event.
const PG_EVENTS: &str = "
INSERT INTO events (event_id, raw_id, item_index, source, template, kind, app_id, identity, idempotency_key, payload,
                    status, attempts, enqueued_at, next_attempt_at, received_at, updated_at, last_error, environment)
SELECT 'e-' || g, g, 0, 'segment', 'default', 'track',
       CASE WHEN g % 10 = 0 THEN '1234567890' ELSE (1000000000 + g % 50)::text END,
       'user-' || (g % 5000), 'key-' || g, '{}',
       CASE g % 100 WHEN 10 THEN 'dead' WHEN 20 THEN 'rejected' WHEN 30 THEN 'pending' ELSE 'delivered' END,
       1, t, t, t, t, CASE WHEN g % 100 IN (10, 20) THEN 'HTTP 400 ' || (g % 7) END, ''
FROM generate_series(1, 120000) g,
     LATERAL (SELECT (extract(epoch FROM now()) * 1000)::bigint - (120000 - g) * 1000 AS t) x;
INSERT INTO attempts (event_row, at, http_status, latency_ms, batch_size)
SELECT id, received_at, 200, 5, 1 FROM events;
ANALYZE events;
ANALYZE attempts;
";

#[tokio::test]
async fn on_postgresql_the_overview_filtered_deliveries_and_failures_do_not_scan_the_events_table() {
    let schema = TestSchema::create().await;
    let pg = PgStore::open(&schema.url, PgOptions { max_bytes: 0, pool_size: 2, dedupe_window_ms: 60_000 })
        .await
        .expect("postgres opens");
    schema.execute(PG_EVENTS).await;
    assert!(schema.query_i64("SELECT count(*) FROM events").await >= 100_000);
    let store = Store::Postgres(pg);
    let plans = store.console_plans().await.expect("plans");
    let served: HashSet<&str> = plans.iter().map(|p| p.0.as_str()).collect();
    for page in ["overview", "deliveries by app_id and status", "deliveries by identity", "failures"] {
        assert!(served.contains(page), "{page} is planned: {served:?}");
    }
    for (page, sql, plan) in &plans {
        assert!(!plan.contains("Seq Scan on events"), "{page}: {sql}\nscans the events table: {plan}");
        assert!(!plan.contains("Seq Scan on attempts"), "{page}: {sql}\nscans the attempts table: {plan}");
    }
    // The bounded failures page still groups by reason.
    let groups = store.failures().await.expect("failures");
    assert_eq!(groups.iter().map(|g| g.count).sum::<i64>(), 2_400, "1% dead and 1% refused of 120,000");
}

/// Every page of `filter` (two events a page), following the cursor: the keys (or ids of refused items) in order.
async fn every_page(store: &Store, filter: EventFilter) -> Vec<String> {
    let mut seen = Vec::new();
    let mut before = None;
    for _ in 0..20 {
        let page = store.page(EventFilter { before: before.clone(), ..filter.clone() }).await.expect("page");
        seen.extend(page.events.iter().map(|e| e.idempotency_key.clone().unwrap_or_else(|| e.id.clone())));
        before = page.next;
        if before.is_none() {
            return seen;
        }
    }
    panic!("more than 20 pages: {seen:?}");
}

#[tokio::test]
async fn on_sqlite_filters_by_identity_key_and_template_read_the_follower_index_across_spans_and_the_log_past_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = SqliteStore::open(&dir.path().join("s.db"), SqliteOptions::default()).expect("opens");
    let store = Store::Sqlite(sqlite.clone());
    store.append(body("old", 9)).await.expect("append");
    // Indexed now, by this call or by the follower thread if it got there first.
    sqlite.index_log().await.expect("index");
    let lag = store.stats().await.expect("stats").index_lag_entries;
    assert_eq!(lag, Some(0), "the follower index has read the old entry");
    // The next entry three spans on (a span is 16,384 log entries): lookups go from span to span, over empty ones.
    let log = rusqlite::Connection::open(sqlite.path()).expect("log");
    log.execute("UPDATE sqlite_sequence SET seq = seq + 3 * 16384 WHERE name = 'log'", []).expect("skip ahead");
    // Appended after: in the log past the index until the follower's next step.
    store.append(body("new", 9)).await.expect("append");
    let two = |f: EventFilter| EventFilter { query: Query { limit: 2, ..Default::default() }, ..f };

    let by_identity = every_page(&store, two(EventFilter { identity: Some("user-1".into()), ..Default::default() }));
    assert_eq!(by_identity.await, ["new-8", "new-1", "old-8", "old-1"], "newest first, across the index's edge");
    let by_key = every_page(&store, two(EventFilter { key: Some("old-4".into()), ..Default::default() })).await;
    assert_eq!(by_key, ["old-4"]);
    let by_template = every_page(&store, two(EventFilter { template: Some("default".into()), ..Default::default() }));
    assert_eq!(by_template.await.len(), 20, "9 events and a refused item of each body, each once");
    let none = every_page(&store, two(EventFilter { template: Some("other".into()), ..Default::default() })).await;
    assert!(none.is_empty());
    let dead_of_identity = EventFilter {
        identity: Some("user-1".into()),
        query: Query { status: Some(Status::Dead), limit: 10, ..Default::default() },
        ..Default::default()
    };
    assert!(store.page(dead_of_identity).await.expect("page").events.is_empty(), "the other filters still apply");

    sqlite.index_log().await.expect("index");
    let again = every_page(&store, two(EventFilter { identity: Some("user-1".into()), ..Default::default() }));
    assert_eq!(again.await, ["new-8", "new-1", "old-8", "old-1"], "the same once the follower has read it all");

    // Retention takes an entry's index rows with it.
    let books = rusqlite::Connection::open(heap_relay::store::sqlite::books_path(sqlite.path())).expect("books");
    let rows = || books.query_row("SELECT count(*) FROM finder_by_span", [], |r| r.get::<_, i64>(0)).expect("count");
    assert_eq!(rows(), 2 * (1 + 9 + 9), "per entry: its template, and each event's identity and key");
    let claimed = store.claim("w", now_ms(), 60_000, 100, Paused::default(), None).await.expect("claim");
    store.record(claimed.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.expect("record");
    assert_eq!(store.prune_refused(now_ms() + 60_000, 0).await.expect("prune"), 2, "both entries go");
    assert_eq!(rows(), 0);
    let gone = EventFilter { key: Some("old-4".into()), ..Default::default() };
    assert!(store.page(gone).await.expect("page").events.is_empty());
}
