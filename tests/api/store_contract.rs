//! One set of store promises, run against both backends: the embedded SQLite store and PostgreSQL (a fresh schema
//! per test on 127.0.0.1:5432, database `test`). Each promise is a function taking the store; `both!` makes a
//! `sqlite` and a `postgres` test of it.

use crate::postgres::TestSchema;
use heap_relay::domain::CallKind;
use heap_relay::store::postgres::PgOptions;
use heap_relay::store::sqlite::SqliteOptions;
use heap_relay::store::{
    AttemptLog, AttemptRecord, HeldItems, Ingested, NewEvent, NewRejection, Paused, PgStore, Query, Resolution,
    Selector, SqliteStore, Status, Store, StoreError, now_ms,
};
use tempfile::TempDir;

/// A store and what keeps it alive (its temp dir or its schema, dropped after the test).
pub struct Backend {
    pub store: Store,
    _dir: Option<TempDir>,
    _schema: Option<TestSchema>,
}

pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(
        &dir.path().join("s.db"),
        SqliteOptions { dedupe_window_ms: 60_000, ..SqliteOptions::default() },
    )
    .expect("sqlite opens");
    Backend { store: Store::Sqlite(store), _dir: Some(dir), _schema: None }
}

pub async fn postgres() -> Backend {
    let schema = TestSchema::create().await;
    let store = PgStore::open(&schema.url, PgOptions { max_bytes: 0, pool_size: 4, dedupe_window_ms: 60_000 })
        .await
        .expect("postgres opens");
    Backend { store: Store::Postgres(store), _dir: None, _schema: Some(schema) }
}

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
    appended_events_are_claimed_in_order_by_one_owner_and_recorded_with_their_attempts,
    a_claim_is_exclusive_until_its_lease_expires_and_then_another_owner_takes_it_over,
    a_worker_whose_lease_was_taken_over_cannot_record_a_result,
    events_a_worker_claimed_and_never_recorded_are_claimable_again_once_the_lease_is_over,
    a_release_puts_events_back_without_counting_an_attempt_and_release_owner_frees_leases,
    requeue_sends_delivered_and_dead_events_again_and_prune_deletes_old_delivered_ones,
    the_raw_body_is_kept_for_a_rerender_and_a_rerender_replaces_the_old_rows,
    a_retried_request_or_message_within_the_window_is_answered_with_the_first_ids_and_stored_once,
    each_event_keeps_the_environment_its_request_came_from_and_the_log_filters_by_it,
    held_items_and_template_versions_are_kept_and_a_rerender_can_select_by_them,
    a_held_body_is_kept_until_a_rerender_replaces_it_and_then_goes_with_the_retention,
);

/// One body with `n` track events (keys `{tag}-0..n`) and one rejected item.
pub fn body(tag: &str, n: usize) -> Ingested {
    Ingested {
        source: "heap".into(),
        environment: String::new(),
        template: "default".into(),
        body: format!("{{\"tag\":\"{tag}\"}}").into_bytes(),
        received_at: now_ms(),
        events: (0..n)
            .map(|i| NewEvent {
                event_id: uuid::Uuid::now_v7().to_string(),
                item_index: i as i64,
                kind: CallKind::Track,
                app_id: "1234567890".into(),
                identity: format!("user-{}", i % 7),
                idempotency_key: Some(format!("{tag}-{i}")),
                payload: format!(
                    "{{\"event\":\"E\",\"identity\":\"user-{}\",\"idempotency_key\":\"{tag}-{i}\"}}",
                    i % 7
                ),
                dedupe_key: None,
            })
            .collect(),
        rejections: vec![NewRejection {
            event_id: uuid::Uuid::now_v7().to_string(),
            item_index: n as i64,
            field: "event".into(),
            message: "must not be empty".into(),
        }],
        replay_of_raw: None,
        request_key: None,
        template_version: None,
        held: None,
    }
}

pub fn delivered(id: i64, lease_token: i64) -> AttemptRecord {
    AttemptRecord {
        id,
        lease_token,
        attempts: vec![AttemptLog {
            call: id as u64,
            at: now_ms(),
            http_status: Some(200),
            latency_ms: 3,
            batch_size: 1,
            error: None,
        }],
        resolution: Resolution::Delivered,
        error: None,
    }
}

const LEASE: i64 = 60_000;

async fn appended_events_are_claimed_in_order_by_one_owner_and_recorded_with_their_attempts(store: Store) {
    store.append(body("a", 3)).await.expect("append");
    let now = now_ms();
    let claimed = store.claim("w1", now, LEASE, 10, Default::default(), None).await.expect("claim");
    let keys: Vec<String> = claimed.iter().map(|c| c.payload.clone()).collect();
    assert_eq!(claimed.len(), 3, "the rejection is never claimed: {keys:?}");
    assert!(claimed.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    assert!(keys[0].contains("a-0") && keys[2].contains("a-2"), "{keys:?}");
    assert!(
        store.claim("w2", now, LEASE, 10, Default::default(), None).await.unwrap().is_empty(),
        "leased rows are not claimed twice"
    );
    assert!(store.claim("w2", now, LEASE, 10, Paused::apps(vec!["1234567890".into()]), None).await.unwrap().is_empty());

    let applied = store.record(claimed.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    assert_eq!(applied, 3);
    let ev = store.get(&claimed[1].event_id).await.unwrap();
    assert_eq!(ev.status, "delivered");
    assert_eq!(ev.attempts, 1);
    assert_eq!(ev.attempt_log.as_ref().map(Vec::len), Some(1));
    assert_eq!(ev.attempt_log.unwrap()[0].http_status, Some(200));
    assert_eq!(ev.payload.unwrap()["idempotency_key"], "a-1");

    let rejected = store.list(Query { status: Some(Status::Rejected), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].last_error.as_deref(), Some("event: must not be empty"));
    let all = store.list(Query { source: Some("heap".into()), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(all.len(), 4);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.ready_or_waiting, 0);
    assert!(stats.db_bytes > 0);
    store.ping().await.unwrap();
    assert!(matches!(store.get("no-such-id").await, Err(StoreError::NotFound)));
}

async fn a_claim_is_exclusive_until_its_lease_expires_and_then_another_owner_takes_it_over(store: Store) {
    store.append(body("b", 4)).await.unwrap();
    let t = now_ms();
    let first = store.claim("dead-instance", t, 1_000, 10, Default::default(), None).await.unwrap();
    assert_eq!(first.len(), 4);
    assert!(
        store.claim("other", t + 500, 1_000, 10, Default::default(), None).await.unwrap().is_empty(),
        "the lease still holds"
    );
    let taken = store.claim("other", t + 1_001, 1_000, 10, Default::default(), None).await.unwrap();
    assert_eq!(taken.len(), 4, "an expired lease is taken over");
    for (old, new) in first.iter().zip(&taken) {
        assert_eq!(old.id, new.id);
        assert!(new.lease_token > old.lease_token, "each claim bumps the fencing token");
    }
}

async fn a_worker_whose_lease_was_taken_over_cannot_record_a_result(store: Store) {
    store.append(body("c", 2)).await.unwrap();
    let t = now_ms();
    let stale = store.claim("slow", t, 1_000, 10, Default::default(), None).await.unwrap();
    let fresh = store.claim("fast", t + 2_000, LEASE, 10, Default::default(), None).await.unwrap();
    assert_eq!(fresh.len(), 2);

    let applied = store.record(stale.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    assert_eq!(applied, 0, "stale tokens are fenced off");
    let ev = store.get(&stale[0].event_id).await.unwrap();
    assert_eq!(ev.status, "pending");
    assert_eq!(ev.attempt_log.map(|l| l.len()), Some(0), "the stale worker's attempts are not logged");

    let dead: Vec<AttemptRecord> = fresh
        .iter()
        .map(|c| AttemptRecord {
            resolution: Resolution::Dead,
            error: Some("400".into()),
            ..delivered(c.id, c.lease_token)
        })
        .collect();
    assert_eq!(store.record(dead).await.unwrap(), 2, "the holder of the current token records");
    let ev = store.get(&fresh[0].event_id).await.unwrap();
    assert_eq!(ev.status, "dead");
    assert_eq!(ev.last_error.as_deref(), Some("400"));
}

/// A round whose record failed (the store was unreachable) leaves its events pending: the same worker claims them
/// again after the lease, not never.
async fn events_a_worker_claimed_and_never_recorded_are_claimable_again_once_the_lease_is_over(store: Store) {
    store.append(body("r", 2)).await.unwrap();
    let t = now_ms();
    let first = store.claim("w", t, 1_000, 10, Default::default(), None).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(store.claim("w", t + 500, 1_000, 10, Default::default(), None).await.unwrap().is_empty(), "in flight");
    let again = store.claim("w", t + 1_001, 1_000, 10, Default::default(), None).await.unwrap();
    assert_eq!(again.len(), 2, "claimable again after the lease");
    let applied = store.record(again.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    assert_eq!(applied, 2, "and recorded by the claim that holds them");
}

async fn a_release_puts_events_back_without_counting_an_attempt_and_release_owner_frees_leases(store: Store) {
    store.append(body("d", 3)).await.unwrap();
    let t = now_ms();
    let claimed = store.claim("w", t, LEASE, 10, Default::default(), None).await.unwrap();
    let release = AttemptRecord {
        attempts: vec![],
        resolution: Resolution::Release { at: t + 5_000 },
        ..delivered(claimed[0].id, claimed[0].lease_token)
    };
    assert_eq!(store.record(vec![release]).await.unwrap(), 1);
    let ev = store.get(&claimed[0].event_id).await.unwrap();
    assert_eq!((ev.status, ev.attempts), ("pending", 0));
    // The same worker: on PostgreSQL another worker may not hold the partitions at all.
    assert!(
        store.claim("w", t, LEASE, 10, Default::default(), None).await.unwrap().is_empty(),
        "released until t + 5 s, and the other two are still in flight"
    );
    assert_eq!(store.claim("w", t + 5_000, LEASE, 10, Default::default(), None).await.unwrap().len(), 1);

    assert_eq!(store.release_owner("w").await.unwrap(), 3, "three claimed and not recorded");
    assert_eq!(
        store.claim("y", t + 5_000, LEASE, 10, Default::default(), None).await.unwrap().len(),
        3,
        "freed leases are claimable at once"
    );
}

async fn requeue_sends_delivered_and_dead_events_again_and_prune_deletes_old_delivered_ones(store: Store) {
    store.append(body("e", 3)).await.unwrap();
    let claimed = store.claim("w", now_ms(), LEASE, 10, Default::default(), None).await.unwrap();
    store.record(claimed.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    assert_eq!(store.requeue(Selector::Id(claimed[0].event_id.clone())).await.unwrap(), 1);
    assert_eq!(store.requeue(Selector::Status(Status::Rejected)).await.unwrap(), 0, "rejections have no payload");
    let again = store.claim("w", now_ms(), LEASE, 10, Default::default(), None).await.unwrap();
    assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), vec![claimed[0].id]);
    store.record(again.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();

    let range = Selector::Range { from: 0, to: i64::MAX, status: Some(Status::Delivered) };
    assert_eq!(store.requeue(range).await.unwrap(), 3);
    let all = store.claim("w", now_ms(), LEASE, 10, Default::default(), None).await.unwrap();
    store.record(all.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();

    // A body whose events were all delivered goes after the retention; a refusal is kept for its repair.
    let mut clean = body("p", 2);
    clean.rejections.clear();
    store.append(clean).await.unwrap();
    let done = store.claim("w", now_ms(), LEASE, 10, Default::default(), None).await.unwrap();
    assert_eq!(done.len(), 2);
    store.record(done.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    assert_eq!(store.prune(now_ms() - 60_000).await.unwrap(), 0, "nothing is old enough yet");
    assert!(store.prune(now_ms() + 1).await.unwrap() >= 2);
    assert!(matches!(store.get(&done[0].event_id).await, Err(StoreError::NotFound)));
    let rejected = store.list(Query { status: Some(Status::Rejected), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(rejected.len(), 1, "the refusal stays: {rejected:?}");
    // Refusals have a retention of their own.
    let refused =
        || async { store.list(Query { status: Some(Status::Rejected), limit: 10, ..Query::default() }).await };
    store.prune_refused(now_ms() - 60_000, 0).await.unwrap();
    assert_eq!(refused().await.unwrap().len(), 1);
    store.prune_refused(now_ms() - 60_000, 1).await.unwrap();
    assert_eq!(refused().await.unwrap().len(), 1, "at the cap, nothing goes");
    let mut young = body("over-the-cap", 0);
    young.rejections[0].field = "young".into();
    store.append(young).await.unwrap();
    store.prune_refused(now_ms() - 60_000, 1).await.unwrap();
    let kept = refused().await.unwrap();
    assert_eq!(kept.len(), 1, "over the cap the oldest refusal goes, young as it is: {kept:?}");
    assert!(kept[0].last_error.as_deref().unwrap_or_default().starts_with("young"), "{kept:?}");
    store.prune_refused(now_ms() + 1, 0).await.unwrap();
    let left = store.list(Query { status: Some(Status::Rejected), limit: 10, ..Query::default() }).await.unwrap();
    assert!(left.is_empty(), "past their retention refusals go: {left:?}");
}

async fn the_raw_body_is_kept_for_a_rerender_and_a_rerender_replaces_the_old_rows(store: Store) {
    store.append(body("f", 2)).await.unwrap();
    let rejected = store.list(Query { status: Some(Status::Rejected), limit: 1, ..Query::default() }).await.unwrap();
    let raws = store.raw_bodies(Selector::Id(rejected[0].id.clone())).await.unwrap();
    assert_eq!(raws.len(), 1);
    let raw = raws[0].clone();
    let raw_id = raw.id;
    assert_eq!(
        raw.key_scheme,
        heap_relay::domain::KeyScheme::default(),
        "a new body keeps the scheme it was keyed with"
    );
    assert_eq!(
        (raw.source.as_str(), raw.template.as_str(), raw.body.as_slice()),
        ("heap", "default", &b"{\"tag\":\"f\"}"[..])
    );

    let mut again = body("g", 3);
    again.rejections.clear();
    again.replay_of_raw = Some(raw_id);
    store.append(again).await.unwrap();
    let replaced = store.list(Query { status: Some(Status::Replaced), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(replaced.len(), 3, "both old events and the old rejection are superseded");
    let pending = store.list(Query { status: Some(Status::Pending), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(pending.len(), 3);
    assert_eq!(store.raw_bodies(Selector::Status(Status::Pending)).await.unwrap().len(), 1, "no new raw row");
}

/// The backends open with a 60 s dedupe window.
async fn a_retried_request_or_message_within_the_window_is_answered_with_the_first_ids_and_stored_once(store: Store) {
    let t = now_ms();
    let request =
        |tag: &str, at: i64| Ingested { request_key: Some("body:abc".into()), received_at: at, ..body(tag, 2) };
    let first = store.append(request("r1", t)).await.unwrap();
    assert!(!first.duplicate);
    let retry = store.append(request("r2", t + 3_000)).await.unwrap();
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!(retry.event_ids, first.event_ids);
    let later = store.append(request("r3", t + 61_000)).await.unwrap();
    assert!(!later.duplicate, "past the window the same body is a new request");

    let message = |tag: &str, key: &str| {
        let mut b = body(tag, 1);
        b.rejections.clear();
        b.events[0].dedupe_key = Some(key.into());
        b
    };
    let m1 = store.append(message("m1", "msg:segment:1:abc")).await.unwrap();
    let mut two = message("m2", "msg:segment:1:abc");
    let mut fresh = message("m3", "msg:segment:1:def");
    two.events.append(&mut fresh.events);
    let m2 = store.append(two).await.unwrap();
    assert_eq!((m2.duplicate, m2.duplicates), (false, 1), "{m2:?}");
    assert_eq!(m2.event_ids[0], m1.event_ids[0], "the retried message keeps its first id");
    assert_ne!(m2.event_ids[1], m1.event_ids[0]);

    let claimed = store.claim("w", now_ms() + 120_000, LEASE, 100, Default::default(), None).await.unwrap();
    let mut tags: Vec<String> = claimed
        .iter()
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(&c.payload).unwrap()["idempotency_key"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    tags.sort();
    assert_eq!(tags, vec!["m1-0", "m3-0", "r1-0", "r1-1", "r3-0", "r3-1"], "each stored once; the retries not at all");
}

async fn each_event_keeps_the_environment_its_request_came_from_and_the_log_filters_by_it(store: Store) {
    store.append(Ingested { environment: "dev".into(), ..body("dev", 2) }).await.unwrap();
    store.append(body("default", 1)).await.unwrap();
    let dev = store.list(Query { environment: Some("dev".into()), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(dev.len(), 3, "two events and a refusal: {dev:?}");
    assert!(dev.iter().all(|e| e.environment == "dev"));
    let one = store.get(&dev[0].id).await.unwrap();
    assert_eq!(one.environment, "dev");
    let all = store.list(Query { limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(all.iter().filter(|e| e.environment.is_empty()).count(), 2);
}

async fn held_items_and_template_versions_are_kept_and_a_rerender_can_select_by_them(store: Store) {
    let reason = "clevertap/t.json:1:2: unknown filter";
    let mut held = body("held", 0);
    held.rejections.clear();
    held.held = Some(HeldItems { items: 2, reason: reason.into() });
    store.append(held).await.unwrap();
    let listed = store.list(Query { status: Some(Status::Held), limit: 10, ..Query::default() }).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|e| e.last_error.as_deref() == Some(reason)));
    assert_eq!(store.raw_bodies(Selector::Status(Status::Held)).await.unwrap().len(), 1);

    store.append(Ingested { template_version: Some("v1".into()), ..body("v1", 1) }).await.unwrap();
    store.append(Ingested { template_version: Some("v2".into()), ..body("v2", 1) }).await.unwrap();
    let stale = Selector::StaleTemplate { source: "heap".into(), template: "default".into(), current: "v2".into() };
    let bodies = store.raw_bodies(stale).await.unwrap();
    let tags: Vec<String> = bodies.iter().map(|b| String::from_utf8_lossy(&b.body).into_owned()).collect();
    assert_eq!(tags.len(), 2, "the held body and the one rendered by v1, not v2's: {tags:?}");
    assert!(tags.iter().all(|t| !t.contains("v2")), "{tags:?}");
    let v1 = store.list(Query { status: Some(Status::Pending), limit: 10, ..Query::default() }).await.unwrap();
    let versions: Vec<Option<String>> = v1.iter().map(|e| e.template_version.clone()).collect();
    assert!(versions.contains(&Some("v1".into())) && versions.contains(&Some("v2".into())), "{versions:?}");
}

async fn a_held_body_is_kept_until_a_rerender_replaces_it_and_then_goes_with_the_retention(store: Store) {
    let mut held = body("held", 0);
    held.rejections.clear();
    held.held = Some(HeldItems { items: 2, reason: "clevertap/t.json:1:2: unknown filter".into() });
    store.append(held).await.unwrap();
    let everything = || async { store.list(Query { limit: 100, ..Query::default() }).await.unwrap() };
    store.prune(now_ms() + 1).await.unwrap();
    assert_eq!(everything().await.len(), 2, "held items wait for their repair, however old");

    let root = store.raw_bodies(Selector::Status(Status::Held)).await.unwrap();
    // A large re-render reads the ids first, then one body at a time: the same bodies.
    let ids = store.raw_body_ids(Selector::Status(Status::Held)).await.unwrap();
    assert_eq!(ids, root.iter().map(|r| r.id).collect::<Vec<_>>());
    assert_eq!(store.raw_body(ids[0]).await.unwrap().map(|r| r.body), Some(root[0].body.clone()));
    let mut fixed = body("fixed", 2);
    fixed.rejections.clear();
    fixed.replay_of_raw = Some(root[0].id);
    store.append(fixed).await.unwrap();
    let claimed = store.claim("w", now_ms(), LEASE, 10, Default::default(), None).await.unwrap();
    assert_eq!(claimed.len(), 2, "the re-render's events, not the held items");
    store.record(claimed.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.unwrap();
    // The re-render goes first, then the body it repaired, which nothing refers to any more.
    for _ in 0..3 {
        store.prune(now_ms() + 1).await.unwrap();
    }
    let left = everything().await;
    assert!(left.is_empty(), "a repaired held body goes with the retention: {left:?}");
}

/// A store already over `store.max_bytes` refuses the append as `Full` (503 store_full upstream) and writes nothing.
async fn an_append_over_the_size_limit_is_refused_as_full_and_writes_nothing(store: Store) {
    let err = store.append(body("h", 3)).await.expect_err("over the limit");
    assert!(matches!(err, StoreError::Full(_)), "{err}");
    assert!(store.list(Query { limit: 10, ..Query::default() }).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_append_over_the_size_limit_is_refused_as_full_and_writes_nothing_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("s.db"), SqliteOptions { max_bytes: 1, ..SqliteOptions::default() })
        .expect("sqlite opens");
    an_append_over_the_size_limit_is_refused_as_full_and_writes_nothing(Store::Sqlite(store)).await;
}

#[tokio::test]
async fn an_append_over_the_size_limit_is_refused_as_full_and_writes_nothing_on_postgres() {
    let schema = TestSchema::create().await;
    let store = PgStore::open(&schema.url, PgOptions { max_bytes: 1, pool_size: 2, dedupe_window_ms: 0 })
        .await
        .expect("postgres opens");
    an_append_over_the_size_limit_is_refused_as_full_and_writes_nothing(Store::Postgres(store)).await;
}
