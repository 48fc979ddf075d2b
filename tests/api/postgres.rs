//! Several relay instances on one PostgreSQL schema: every event delivered once with each instance taking a share,
//! a SIGKILLed instance's leased work taken over, racing workers that never both deliver an event, shared rate
//! budgets, and LISTEN/NOTIFY wake-ups across instances.
//!
//! PostgreSQL must run on 127.0.0.1:5432 with database `test` and trust auth (`scripts/test` starts it). Each test
//! makes its own schema and drops it afterwards; a missing server fails the test with a clear message.

use crate::helpers::{APP_ID, items_of, repo_templates};
use crate::store_contract::{body, delivered};
use heap_relay::delivery::heap_client::HeapClient;
use heap_relay::delivery::rate_limit::RateLimiter;
use heap_relay::delivery::{Delivery, DeliveryConfig, Worker};
use heap_relay::metrics::Metrics;
use heap_relay::store::postgres::PgOptions;
use heap_relay::store::{PgStore, Store, now_ms};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The server the tests use; override with HEAP_RELAY_TEST_PG (a URL without search_path).
fn pg_base() -> String {
    std::env::var("HEAP_RELAY_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn connect() -> tokio_postgres::Client {
    let base = pg_base();
    let (client, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is required for the PostgreSQL store tests and does not answer at {base}: {e}\n\
             Start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             (scripts/test does this), or point HEAP_RELAY_TEST_PG at a server with a database `test`."
        )
    });
    tokio::spawn(conn);
    client
}

/// A schema of its own for one test, dropped (with everything in it) when this is dropped.
pub struct TestSchema {
    pub name: String,
    /// A store URL whose search_path is this schema.
    pub url: String,
}

impl TestSchema {
    pub async fn create() -> Self {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        connect().await.batch_execute(&format!("CREATE SCHEMA {name}")).await.expect("create the test schema");
        let url = format!("{}?options=-csearch_path%3D{name}", pg_base());
        Self { name, url }
    }

    /// Runs `sql` (statements separated by `;`) in this schema.
    pub async fn execute(&self, sql: &str) {
        let c = connect().await;
        c.batch_execute(&format!("SET search_path = {}; {sql}", self.name)).await.expect(sql);
    }

    pub async fn query_i64(&self, sql: &str) -> i64 {
        let c = connect().await;
        c.batch_execute(&format!("SET search_path = {}", self.name)).await.expect("search_path");
        c.query_one(sql, &[]).await.expect(sql).get(0)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Bounded: a relay of the test may still hold a lock in the schema from a task of the test's runtime, which
        // cannot run while this waits (the runtime's thread is in this drop). Then the schema is left behind.
        let sql = format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        // Drop may run inside a runtime: use a thread with a runtime of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&pg_base(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&sql).await;
                }
            })
        });
        let _ = done.join();
    }
}

fn track_bulk(from: usize, n: usize) -> String {
    let events: Vec<Value> = (from..from + n)
        .map(
            |i| json!({"identity": format!("user-{}", i % 97), "event": "Load", "idempotency_key": format!("key-{i}")}),
        )
        .collect();
    json!({"app_id": APP_ID, "events": events}).to_string()
}

/// Idempotency keys Heap received, with how often each came.
async fn received_keys(heap: &MockServer) -> HashMap<String, usize> {
    let calls: Vec<crate::helpers::HeapCall> = heap
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| crate::helpers::HeapCall {
            path: r.url.path().to_owned(),
            body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        })
        .collect();
    let mut keys = HashMap::new();
    for (_, item) in items_of(&calls) {
        if let Some(k) = item["idempotency_key"].as_str() {
            *keys.entry(k.to_owned()).or_insert(0) += 1;
        }
    }
    keys
}

async fn wait_for_distinct_keys(heap: &MockServer, want: usize, within: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + within;
    loop {
        let keys = received_keys(heap).await;
        if keys.len() >= want {
            return keys;
        }
        assert!(Instant::now() < deadline, "Heap received {} of {want} distinct events within {within:?}", keys.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn heap_answering(status: u16, delay: Duration) -> MockServer {
    let heap = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(status).set_delay(delay)).mount(&heap).await;
    heap
}

/// A `heap-relay serve` child process; killed when dropped.
struct RelayProcess {
    child: Child,
    address: String,
    log: std::path::PathBuf,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Starts the relay binary on `url` with Heap at `heap`, and waits until it is ready.
async fn spawn_relay(url: &str, heap: &str, dir: &Path, name: &str, lease_secs: u64) -> RelayProcess {
    let port = free_port();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_heap-relay"))
        .current_dir(dir)
        .env("HEAP_RELAY__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("HEAP_RELAY__SERVER__WORKERS", "1")
        .env("HEAP_RELAY__STORE__URL", url)
        .env("HEAP_RELAY__STORE__POOL_SIZE", "4")
        .env("HEAP_RELAY__HEAP__BASE_URL", heap)
        .env("HEAP_RELAY__HEAP__APP_ID", APP_ID)
        .env("HEAP_RELAY__HEAP__REQUEST_TIMEOUT_SECS", "60")
        .env("HEAP_RELAY__TEMPLATES__DIR", repo_templates())
        .env("HEAP_RELAY__TEMPLATES__RELOAD_INTERVAL_SECS", "0")
        .env("HEAP_RELAY__DELIVERY__WORKERS", "2")
        .env("HEAP_RELAY__DELIVERY__LINGER_MS", "5")
        .env("HEAP_RELAY__DELIVERY__POLL_INTERVAL_MS", "250")
        .env("HEAP_RELAY__DELIVERY__LEASE_SECS", lease_secs.to_string())
        .env("HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE", "0")
        .env("HEAP_RELAY__DELIVERY__IDENTITY_EVENTS_PER_MINUTE", "0")
        .env("HEAP_RELAY__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("the heap-relay binary starts");
    let mut relay = RelayProcess { child, address: format!("http://127.0.0.1:{port}"), log };
    let client = crate::helpers::test_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", relay.address)).send().await
            && r.status() == 200
        {
            return relay;
        }
        if let Ok(Some(status)) = relay.child.try_wait() {
            panic!("{name} exited with {status}: {}", std::fs::read_to_string(&relay.log).unwrap_or_default());
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready: {}",
            std::fs::read_to_string(&relay.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events an instance delivered, from its /metrics.
async fn delivered_by(client: &reqwest::Client, address: &str) -> u64 {
    let text = client.get(format!("{address}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find(|l| l.starts_with("heap_relay_delivery_events_total{result=\"delivered\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Posts bodies `range` (each of `per_body` events) round-robin, one at a time; returns the keys acknowledged (202).
async fn post_round_robin(
    client: &reqwest::Client,
    addresses: &[String],
    range: std::ops::Range<usize>,
    per_body: usize,
) -> HashSet<String> {
    let mut acked = HashSet::new();
    for b in range {
        let address = &addresses[b % addresses.len()];
        let resp = client
            .post(format!("{address}/api/track"))
            .header("Content-Type", "application/json")
            .body(track_bulk(b * per_body, per_body))
            .send()
            .await;
        if resp.is_ok_and(|r| r.status() == 202) {
            acked.extend((b * per_body..(b + 1) * per_body).map(|i| format!("key-{i}")));
        }
    }
    acked
}

#[tokio::test]
async fn three_instances_on_one_schema_deliver_30000_events_exactly_once_each_delivering_a_share() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut relays = Vec::new();
    for name in ["relay-a", "relay-b", "relay-c"] {
        relays.push(spawn_relay(&schema.url, &heap.uri(), dir.path(), name, 30).await);
    }
    let addresses: Vec<String> = relays.iter().map(|r| r.address.clone()).collect();
    let client = crate::helpers::test_client();

    let acked = post_round_robin(&client, &addresses, 0..60, 500).await;
    assert_eq!(acked.len(), 30_000, "every body is acknowledged");

    wait_for_distinct_keys(&heap, 30_000, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while schema.query_i64("SELECT count(*) FROM events WHERE status <> 'delivered'").await > 0 {
        assert!(Instant::now() < deadline, "events left undelivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = received_keys(&heap).await;
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(keys.keys().cloned().collect::<HashSet<_>>(), acked, "every acknowledged event, nothing else");

    let mut shares = Vec::new();
    for a in &addresses {
        shares.push(delivered_by(&client, a).await);
    }
    eprintln!("per-instance deliveries: {shares:?}");
    assert_eq!(shares.iter().sum::<u64>(), 30_000, "{shares:?}");
    assert!(shares.iter().all(|n| *n > 0), "each instance delivered a share: {shares:?}");
}

#[tokio::test]
async fn a_sigkilled_instances_leased_work_is_delivered_by_the_others_after_its_lease_expires() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::ZERO).await;
    // The victim's Heap never answers in time: whatever it claims stays leased and in flight until it dies.
    let victims_heap = heap_answering(200, Duration::from_secs(120)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let lease_secs = 3;
    let mut victim = spawn_relay(&schema.url, &victims_heap.uri(), dir.path(), "victim", lease_secs).await;
    let client = crate::helpers::test_client();
    // The load starts on the victim alone, so that it surely claims work (with three instances the others may take
    // everything first).
    let mut acked = post_round_robin(&client, std::slice::from_ref(&victim.address), 0..6, 500).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while victims_heap.received_requests().await.unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "the victim never claimed anything");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = spawn_relay(&schema.url, &heap.uri(), dir.path(), "relay-a", lease_secs).await;
    let b = spawn_relay(&schema.url, &heap.uri(), dir.path(), "relay-b", lease_secs).await;
    let addresses = vec![victim.address.clone(), a.address.clone(), b.address.clone()];
    acked.extend(post_round_robin(&client, &addresses, 6..12, 500).await);
    // Kill it mid-load, while its send is in flight to its Heap and its leases are held (and renewed).
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    let killed_at = Instant::now();
    acked.extend(post_round_robin(&client, &addresses, 12..24, 500).await);
    assert!(acked.len() >= 12 * 500 && acked.len() < 24 * 500, "bodies posted to the dead instance are refused");

    let in_flight: HashSet<String> = received_keys(&victims_heap).await.into_keys().collect();
    assert!(!in_flight.is_empty());
    let keys = wait_for_distinct_keys(&heap, acked.len(), Duration::from_secs(45)).await;
    let got: HashSet<String> = keys.keys().cloned().collect();
    assert!(acked.is_subset(&got), "{} acknowledged events lost", acked.difference(&got).count());
    assert!(in_flight.is_subset(&got), "the victim's in-flight events are delivered by the others");
    let listed: Vec<String> = in_flight.iter().map(|k| format!("'{k}'")).collect();
    let sql =
        format!("SELECT count(*) FROM events WHERE idempotency_key IN ({}) AND status = 'delivered'", listed.join(","));
    let deadline = Instant::now() + Duration::from_secs(10);
    while schema.query_i64(&sql).await < in_flight.len() as i64 {
        assert!(Instant::now() < deadline, "the victim's in-flight events are recorded delivered by their new holder");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed_at.elapsed() < Duration::from_secs(60));
}

fn delivery_on(store: PgStore, heap: &str, lease: Duration) -> Arc<Delivery> {
    // Small claims (4 × max_batch), so racing workers keep colliding on the oldest rows.
    let config = DeliveryConfig { linger: Duration::ZERO, lease, max_batch: 50, ..DeliveryConfig::default() };
    delivery_with(store, heap, config, RateLimiter::new(0, 0), Default::default())
}

/// Delivery on `store` to the mock Heap at `heap`, with these settings, budgets and clock.
fn delivery_with(
    store: PgStore,
    heap: &str,
    config: DeliveryConfig,
    budgets: RateLimiter,
    clock: heap_relay::clock::Clock,
) -> Arc<Delivery> {
    let client = HeapClient::new(heap, Duration::from_secs(30)).expect("client");
    Arc::new(Delivery::new(Store::Postgres(store), client, config, budgets, Arc::new(Metrics::new()), clock))
}

async fn pg_store(schema: &TestSchema) -> PgStore {
    pg_store_at(&schema.url).await.expect("postgres opens")
}

/// A store on `url` with the tests' options.
async fn pg_store_at(url: &str) -> Result<PgStore, heap_relay::store::StoreError> {
    PgStore::open(url, PgOptions { max_bytes: 0, pool_size: 4, dedupe_window_ms: 60_000 }).await
}

#[tokio::test]
async fn two_workers_racing_for_the_same_rows_never_both_deliver_one() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::from_millis(20)).await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    for i in 0..10 {
        s1.append(body(&format!("race{i}"), 500)).await.expect("append");
    }
    let workers: Vec<Worker> = [(s1, "instance-1"), (s2, "instance-2")]
        .into_iter()
        .flat_map(|(s, name)| {
            let d = delivery_on(s, &heap.uri(), Duration::from_secs(60));
            (0..2).map(move |i| (d.clone(), format!("{name}-{i}")))
        })
        .map(|(d, owner)| Worker::new(d, owner))
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(workers.len()));
    let rounds: Vec<_> = workers
        .into_iter()
        .map(|w| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut delivered = 0;
                for _ in 0..40 {
                    barrier.wait().await; // every worker claims at the same moment
                    delivered += w.try_deliver_once().await.expect("round").delivered;
                }
                delivered
            })
        })
        .collect();
    let mut per_worker = Vec::new();
    for r in rounds {
        per_worker.push(r.await.expect("worker"));
    }
    assert_eq!(per_worker.iter().sum::<usize>(), 5_000, "{per_worker:?}");
    assert!(per_worker.iter().filter(|n| **n > 0).count() >= 2, "the race happened: {per_worker:?}");
    let keys = received_keys(&heap).await;
    assert_eq!(keys.len(), 5_000);
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "delivered by both: {twice:?}");
}

#[tokio::test]
async fn ingest_and_claims_write_no_event_row_and_two_workers_settle_on_half_the_partitions_each() {
    let schema = TestSchema::create().await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    let spread = |tag: &str| {
        let mut b = body(tag, 200);
        for (i, e) in b.events.iter_mut().enumerate() {
            e.identity = format!("{tag}-{i}");
        }
        b
    };
    s1.append(spread("one")).await.expect("append");
    // The append stores the body with its rows; the event rows are written off the ingest commit, by the next
    // read of the store.
    assert_eq!(schema.query_i64("SELECT count(*) FROM events").await, 0, "the ingest commit wrote no event row");
    assert_eq!(s1.stats().await.expect("stats").ready_or_waiting, 200);
    let before = schema.query_i64("SELECT max(xmin::text::bigint) FROM events").await;
    let t = now_ms();
    let first = s1.claim("a", t, 60_000, 1_000, Default::default()).await.expect("claim");
    assert_eq!(first.len(), 200, "alone, one worker holds every partition");
    let touched = format!("SELECT count(*) FROM events WHERE xmin::text::bigint > {before}");
    assert_eq!(schema.query_i64(&touched).await, 0, "the claim wrote no event row");
    s1.record(first.iter().map(|c| delivered(c.id, c.lease_token)).collect()).await.expect("record");

    s1.append(spread("two")).await.expect("append");
    let t = now_ms();
    let none = s2.claim("b", t + 1, 60_000, 1_000, Default::default()).await.expect("claim");
    assert!(none.is_empty(), "every partition is a's until a sees b: {}", none.len());
    let a = s1.claim("a", t + 2, 60_000, 1_000, Default::default()).await.expect("claim");
    let b = s2.claim("b", t + 3, 60_000, 1_000, Default::default()).await.expect("claim");
    let (ids_a, ids_b): (HashSet<i64>, HashSet<i64>) =
        (a.iter().map(|c| c.id).collect(), b.iter().map(|c| c.id).collect());
    assert!(ids_a.is_disjoint(&ids_b), "no event is claimed by both");
    assert_eq!(ids_a.len() + ids_b.len(), 200, "between them they claim the whole backlog");
    assert!(!a.is_empty() && !b.is_empty(), "each claims a share: {} and {}", a.len(), b.len());
    for owner in ["a", "b"] {
        let held = schema.query_i64(&format!("SELECT count(*) FROM claim_parts WHERE owner = '{owner}'")).await;
        assert_eq!(held, 32, "{owner} holds half of the 64 partitions");
    }
}

/// Budgets before claims on PostgreSQL: a round claims no more of an app_id than its shared budget holds, and what
/// an identity's budget holds back is released without writing its rows.
#[tokio::test]
async fn under_the_shared_budgets_a_claim_takes_only_what_the_app_budget_holds_and_a_hold_writes_no_event_row() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::ZERO).await;
    let s = pg_store(&schema).await;
    s.append(body("budget", 2_000)).await.expect("append");
    assert_eq!(s.stats().await.expect("stats").ready_or_waiting, 2_000, "the event rows are written");
    let before = schema.query_i64("SELECT max(xmin::text::bigint) FROM events").await;
    let touched = format!("SELECT count(*) FROM events WHERE xmin::text::bigint > {before}");
    let clock = heap_relay::clock::Clock::default();
    let config = DeliveryConfig { linger: Duration::ZERO, max_batch: 1_000, ..DeliveryConfig::default() };
    // 600 a minute for the app_id, 60 a minute for each of the body's 7 identities.
    let delivery = delivery_with(s, &heap.uri(), config, RateLimiter::new(600, 60), clock.clone());
    let worker = Worker::new(delivery, "w-0".into());
    let started = Instant::now();

    let first = worker.try_deliver_once().await.expect("round");
    assert_eq!(first.claimed, 600, "the app budget's full bucket, not the 4,000 a round may take");
    assert_eq!(first.delivered, 7 * 60, "each identity's bucket");
    assert_eq!(first.held, 600 - 7 * 60);
    assert_eq!(schema.query_i64(&touched).await, 7 * 60, "only the delivered events' rows were written");

    let second = worker.try_deliver_once().await.expect("round");
    assert_eq!(second.delivered, 0, "every identity's budget is spent");
    assert_eq!(second.held, second.claimed, "what the app budget let it claim, the identity budgets held back");
    let left = 180.0 + 600.0 / 60.0 * started.elapsed().as_secs_f64();
    assert!(second.claimed as f64 <= left, "no more than the app budget had left: {}", second.claimed);
    assert_eq!(schema.query_i64(&touched).await, 7 * 60, "holding back wrote no event row");

    // A minute later every bucket is full again: the app_id's 600 go, held events first.
    clock.advance(Duration::from_secs(60));
    let third = worker.try_deliver_once().await.expect("round");
    let refill = 600.0 / 60.0 * started.elapsed().as_secs_f64();
    assert!(third.claimed as f64 <= 600.0 + refill, "a full bucket and what refilled since: {}", third.claimed);
    assert_eq!(third.delivered, 7 * 60, "each identity's full bucket");
    let events = received_keys(&heap).await.values().sum::<usize>();
    assert_eq!(events, 2 * 7 * 60, "Heap got what the budgets let go, each event once");
}

/// As on SQLite: while the shared app budget holds a backlog back, a worker waits until the budget holds a batch
/// and sends it in one call, about once a second, rather than a call of an event or two every round (each round
/// is a budget read, a claim and the books' writes on the shared database).
#[tokio::test]
async fn under_a_binding_shared_app_budget_a_backlog_goes_in_about_one_call_a_second() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::ZERO).await;
    let s = pg_store(&schema).await;
    s.append(body("budget", 2_000)).await.expect("append");
    let delivery =
        delivery_with(s, &heap.uri(), DeliveryConfig::default(), RateLimiter::new(600, 0), Default::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(Worker::new(delivery, "w-0".into()).run(stopped));
    // The bucket starts full: 600 go at once; then it refills at ten events a second.
    wait_for_distinct_keys(&heap, 600, Duration::from_secs(30)).await;
    let calls = || async { heap.received_requests().await.unwrap_or_default().len() };
    let (calls_before, started) = (calls().await, Instant::now());
    wait_for_distinct_keys(&heap, 630, Duration::from_secs(30)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let made = calls().await - calls_before;
    assert!(made as f64 <= elapsed + 2.0, "{made} Heap calls in {elapsed:.1} s for the next 30 events");
    let sent: usize = received_keys(&heap).await.values().sum();
    let allowed = 600.0 + 10.0 * (elapsed + 1.0);
    assert!(sent as f64 <= allowed, "{sent} events sent; the budget allowed about {allowed:.0}");
    stop.send(true).expect("the worker listens");
    worker.await.expect("the worker stops");
}

#[tokio::test]
async fn a_stored_body_whose_rows_cannot_be_read_is_held_for_a_rerender_not_lost() {
    let schema = TestSchema::create().await;
    let s = pg_store(&schema).await;
    s.append(body("kept", 3)).await.expect("append");
    let mut for_dev = body("broken", 3);
    for_dev.environment = "dev".into();
    s.append(for_dev).await.expect("append");
    let broken = schema.query_i64("SELECT max(id) FROM raw_bodies").await;
    schema.execute(&format!("UPDATE raw_bodies SET items = '\\x00ff'::bytea WHERE id = {broken}")).await;
    let stats = s.stats().await.expect("stats");
    assert_eq!(stats.ready_or_waiting, 3, "the readable body's events are queued");
    let held = schema
        .query_i64(&format!(
            "SELECT count(*) FROM events WHERE raw_id = {broken} AND status = 'held' AND environment = 'dev'
             AND last_error LIKE '%cannot be read%replay --status held --rerender%'"
        ))
        .await;
    assert_eq!(held, 1, "the unreadable body stands as one held event of its environment that says what to do");
    let ids = s.raw_body_ids(heap_relay::store::Selector::Status(heap_relay::store::Status::Held)).await.expect("ids");
    assert_eq!(ids, vec![broken], "a re-render of the held events renders that body again");
    let body_kept = schema.query_i64(&format!("SELECT count(*) FROM raw_bodies WHERE id = {broken}")).await;
    assert_eq!(body_kept, 1, "its raw body is kept");
}

/// A read right after an append sees its events even while another connection (a claim) is writing them: it waits
/// for that transaction, and writes them itself if it gave them back unwritten.
#[tokio::test]
async fn a_read_waits_for_the_rows_another_connection_is_writing_instead_of_missing_them() {
    let schema = TestSchema::create().await;
    let s = pg_store(&schema).await;
    s.append(body("busy", 1)).await.expect("append");
    let expander = connect().await;
    expander
        .batch_execute(&format!(
            "SET search_path = {}; BEGIN; SELECT pg_advisory_xact_lock_shared({}, hashtext(current_schema()));
             SELECT id FROM raw_bodies WHERE items IS NOT NULL FOR UPDATE",
            schema.name,
            heap_relay::store::postgres::EXPANDING_LOCK
        ))
        .await
        .expect("lock the body as an expanding claim does");
    let reader = s.clone();
    let mut stats = tokio::spawn(async move { reader.stats().await.expect("stats") });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut stats).await;
    assert!(early.is_err(), "the read answered while the body's rows were being written: {early:?}");
    expander.batch_execute("ROLLBACK").await.expect("give the body back unwritten");
    let stats = tokio::time::timeout(Duration::from_secs(10), stats).await.expect("the read goes on").expect("task");
    assert_eq!(stats.ready_or_waiting, 1, "the read wrote the rows the other connection gave back");
}

#[tokio::test]
async fn a_lease_is_renewed_while_a_slow_send_is_in_flight_so_no_other_instance_takes_it_over() {
    let schema = TestSchema::create().await;
    let heap = heap_answering(200, Duration::from_millis(2_500)).await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    s1.append(body("slow", 20)).await.expect("append");
    let slow = Worker::new(delivery_on(s1, &heap.uri(), Duration::from_secs(1)), "slow-0".into());
    let other = Worker::new(delivery_on(s2, &heap.uri(), Duration::from_secs(1)), "other-0".into());
    let sending = tokio::spawn(async move { slow.try_deliver_once().await.expect("round") });
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stolen = other.try_deliver_once().await.expect("round");
        assert_eq!(stolen.claimed, 0, "the 1 s lease was renewed while the 2.5 s send was in flight");
    }
    assert_eq!(sending.await.expect("slow worker").delivered, 20);
    assert_eq!(received_keys(&heap).await.len(), 20);
    assert_eq!(heap.received_requests().await.unwrap_or_default().len(), 1, "one call, never a second");
}

#[tokio::test]
async fn the_rate_budget_is_shared_so_two_instances_together_keep_to_one_app_budget() {
    let schema = TestSchema::create().await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    let now = now_ms();
    let wants: Vec<(String, String)> = (0..100).map(|i| (APP_ID.to_owned(), format!("user-{i}"))).collect();
    let wants: Vec<(&str, &str)> = wants.iter().map(|(a, i)| (a.as_str(), i.as_str())).collect();
    let (w1, w2) = (wants.clone(), wants.clone());
    let (r1, r2) = tokio::join!(s1.take_budget(&w1, 150, 1_000, now), s2.take_budget(&w2, 150, 1_000, now));
    let admitted = r1.unwrap().iter().chain(r2.unwrap().iter()).filter(|v| v.is_none()).count();
    assert_eq!(admitted, 150, "two instances share the app's 150/min, not 150 each");

    let later = s1.take_budget(&wants[..10], 150, 1_000, now + 2_000).await.unwrap();
    assert_eq!(later.iter().filter(|v| v.is_none()).count(), 5, "2 s refill 5 tokens at 150/min");
    let one_identity = vec![(APP_ID, "busy"); 5];
    let held = s2.take_budget(&one_identity, 0, 3, now).await.unwrap();
    assert_eq!(held.iter().filter(|v| v.is_none()).count(), 3, "the identity budget holds too: {held:?}");
}

/// A new identity's bucket is written once, with what is left in it; when two instances meet on the same new
/// bucket, the one that finds it created under it takes again from what the other left. Either way the two
/// together grant no more than one bucket.
#[tokio::test]
async fn instances_racing_to_create_the_same_identity_budget_together_grant_one_bucket() {
    let schema = TestSchema::create().await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    let now = now_ms();
    for round in 0..5 {
        let who = format!("new-{round}");
        let takes = (0..12).map(|k| {
            let store = if k % 2 == 0 { s1.clone() } else { s2.clone() };
            let who = who.clone();
            tokio::spawn(async move { store.take_budget(&[(APP_ID, &who), (APP_ID, &who)], 0, 10, now).await })
        });
        let mut granted = 0;
        for verdicts in futures_util::future::join_all(takes).await {
            granted += verdicts.expect("task").expect("take").iter().filter(|v| v.is_none()).count();
        }
        assert_eq!(granted, 10, "24 events of {who} asked for a bucket of 10");
    }
    let left = schema.query_i64("SELECT count(*) FROM rate_budget WHERE tokens <> 0").await;
    assert_eq!(left, 0, "every bucket was spent, once");
    let rows = schema.query_i64("SELECT count(*) FROM rate_budget").await;
    assert_eq!(rows, 5, "one bucket per identity");
}

#[tokio::test]
async fn an_append_on_one_instance_wakes_the_idle_workers_of_another_through_listen_notify() {
    let schema = TestSchema::create().await;
    let (s1, s2) = (pg_store(&schema).await, pg_store(&schema).await);
    let woken = Arc::new(tokio::sync::Notify::new());
    let w = woken.clone();
    let listener = s2.spawn_listener(move || w.notify_one());
    // Wait for LISTEN to be in place (a NOTIFY before it would be missed, and covered by the poll interval).
    let listening =
        format!("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN \"heap_relay.{}\"'", schema.name);
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.query_i64(&listening).await == 0 {
        assert!(Instant::now() < deadline, "the listener never LISTENed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s1.append(body("wake", 1)).await.expect("append");
    tokio::time::timeout(Duration::from_secs(5), woken.notified()).await.expect("woken by NOTIFY within 5 s");
    listener.abort();
}

#[tokio::test]
async fn a_store_url_naming_no_reachable_server_fails_at_start_with_a_clear_error() {
    let err = PgStore::open(
        "postgres://postgres@127.0.0.1:1/test",
        PgOptions { max_bytes: 0, pool_size: 2, dedupe_window_ms: 0 },
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
    let schema = TestSchema::create().await;
    let missing = schema.url.replace(&schema.name, "no_such_schema");
    let err = PgStore::open(&missing, PgOptions { max_bytes: 0, pool_size: 2, dedupe_window_ms: 0 })
        .await
        .expect_err("no schema");
    assert!(err.to_string().contains("search_path"), "{err}");
}

#[tokio::test]
async fn the_admin_api_and_the_cli_list_and_replay_events_on_postgres_as_on_sqlite() {
    let schema = TestSchema::create().await;
    let url = schema.url.clone();
    let app = crate::helpers::spawn_app_with(|s| s.store.url = url.into()).await;
    let (status, body) =
        crate::helpers::json(app.post_hook("segment", &crate::helpers::fixture("segment-track.json")).await).await;
    assert_eq!(status, 202, "{body}");
    let id = body["event_ids"][0].as_str().expect("an event id").to_owned();
    app.wait_until_idle(Duration::from_secs(10)).await;
    let (status, ev) = crate::helpers::json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["status"], "delivered");
    assert_eq!(ev["attempt_log"][0]["http_status"], 200);
    assert_eq!(schema.query_i64("SELECT count(*) FROM events").await, 1, "the rows are in the test's schema");

    let (status, report) = crate::helpers::json(app.admin_post("/admin/replay", &json!({"id": id})).await).await;
    assert_eq!((status, &report["requeued"]), (200, &json!(1)), "{report}");
    app.wait_for_heap(2, Duration::from_secs(10)).await;

    // Off the test's runtime thread: the in-process relay's workers must keep running while the CLI waits on the store.
    let cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let url = schema.url.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_heap-relay"))
                .args(args)
                .env("HEAP_RELAY__STORE__URL", url)
                .env("HEAP_RELAY__TEMPLATES__DIR", repo_templates())
                .output()
                .expect("the binary runs");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, out, err) = cli(&["deliveries", "--source", "segment", "--json"]).await.expect("cli");
    assert_eq!(code, Some(0), "{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed[0]["id"], id.as_str());
    let (code, out, err) = cli(&["replay", "--id", &id]).await.expect("cli");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).expect("JSON")["requeued"], 1);
    app.wait_for_heap(3, Duration::from_secs(10)).await;
}

/// PostgreSQL compresses the raw body and the rows kept with it (a 2-profile CleverTap body makes a row above its
/// 2 KB TOAST threshold) with lz4, not with pglz, its default (14% of the server's CPU under ingest). A schema
/// migrated before this gets lz4 at the next start. The test server must have lz4 (every PostgreSQL 14+ package on
/// Debian does); the test says so if it has not.
#[tokio::test]
async fn stored_bodies_are_compressed_by_postgresql_with_lz4_not_pglz() {
    let schema = TestSchema::create().await;
    let lz4 = schema
        .query_i64(
            "SELECT count(*) FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)",
        )
        .await;
    assert_eq!(lz4, 1, "the test server should have lz4 (PostgreSQL 14+ built --with-lz4)");
    let s = pg_store(&schema).await;
    let long_body = |tag: &str| {
        let mut b = body(tag, 2);
        b.body = format!("{{\"padding\": \"{}\"}}", "0123456789abcdef".repeat(400)).into_bytes();
        b
    };
    s.append(long_body("first")).await.expect("append");
    let compressed = |col: &str| format!("SELECT count(*) FROM raw_bodies WHERE pg_column_compression({col}) = 'lz4'");
    assert_eq!(schema.query_i64(&compressed("body")).await, 1, "the raw body is compressed with lz4");
    drop(s);
    // As a schema written by an earlier version: the default compression on the columns.
    schema.execute("ALTER TABLE raw_bodies ALTER COLUMN body SET COMPRESSION pglz").await;
    let s = pg_store(&schema).await;
    s.append(long_body("second")).await.expect("append");
    assert_eq!(schema.query_i64(&compressed("body")).await, 2, "the next start sets lz4 again");
    let lz4_columns = schema
        .query_i64(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'raw_bodies'::regclass
             AND attname IN ('body', 'items') AND attcompression = 'l'",
        )
        .await;
    assert_eq!(lz4_columns, 2, "both columns use lz4");
    let stats = s.stats().await.expect("stats");
    assert_eq!(stats.ready_or_waiting, 4, "the rows kept with the bodies read back");
}

/// Setting lz4 needs the tables' owner. A role that may only read and write them (a schema a DBA migrated) still
/// starts, and its bodies are stored and queued; PostgreSQL keeps pglz for them.
#[tokio::test]
async fn a_role_that_does_not_own_the_tables_still_starts_when_it_cannot_set_lz4() {
    let schema = TestSchema::create().await;
    drop(pg_store(&schema).await);
    schema.execute("ALTER TABLE raw_bodies ALTER COLUMN body SET COMPRESSION pglz").await;
    let role = format!("r_{}", uuid::Uuid::now_v7().simple());
    let admin = connect().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {s} TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {role};
             GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {s} TO {role}",
            s = schema.name
        ))
        .await
        .expect("a role with rights on the rows only");
    let url = schema.url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let opened = pg_store_at(&url).await;
    let result = match opened {
        Ok(s) => {
            let appended = s.append(body("not-owner", 2)).await;
            let stats = s.stats().await;
            drop(s);
            Ok((appended.is_ok(), stats.map(|st| st.ready_or_waiting)))
        }
        Err(e) => Err(e.to_string()),
    };
    admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.expect("drop the role");
    let (appended, queued) = result.expect("a role that cannot set lz4 still opens the store");
    assert!(appended, "its bodies are stored");
    assert_eq!(queued.expect("stats"), 2, "and their events queued");
    let pglz = schema
        .query_i64(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'raw_bodies'::regclass AND attname = 'body'
             AND attcompression = 'p'",
        )
        .await;
    assert_eq!(pglz, 1, "the column it could not change keeps pglz");
}

/// Setting lz4 takes a lock on the table; a start that cannot get it (a long transaction reads the table) waits at
/// most 2 s, then starts on pglz, so an upgrade never hangs behind an open transaction.
#[tokio::test]
async fn a_start_that_cannot_lock_a_table_for_lz4_within_two_seconds_starts_on_pglz() {
    let schema = TestSchema::create().await;
    drop(pg_store(&schema).await);
    schema.execute("ALTER TABLE raw_bodies ALTER COLUMN body SET COMPRESSION pglz").await;
    let reader = connect().await;
    reader
        .batch_execute(&format!("SET search_path = {}; BEGIN; SELECT count(*) FROM raw_bodies", schema.name))
        .await
        .expect("a transaction that holds a lock on raw_bodies");
    let started = Instant::now();
    let opened = tokio::time::timeout(Duration::from_secs(10), pg_store_at(&schema.url)).await;
    let waited = started.elapsed();
    reader.batch_execute("ROLLBACK").await.expect("rollback");
    let store = opened.expect("the start does not wait for the transaction").expect("postgres opens");
    assert!(waited < Duration::from_secs(8), "it waited {waited:?} for the lock");
    let pglz = schema
        .query_i64(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'raw_bodies'::regclass AND attname = 'body'
             AND attcompression = 'p'",
        )
        .await;
    assert_eq!(pglz, 1, "the column it could not lock keeps pglz until a later start");
    store.append(body("after", 1)).await.expect("the store works");
}

#[tokio::test]
async fn an_instance_or_cli_opening_a_busy_schema_does_not_queue_behind_open_write_transactions() {
    let schema = TestSchema::create().await;
    let _first = pg_store(&schema).await;
    let writer = connect().await;
    // A write transaction left open on events (as a worker's record is, mid-round).
    writer
        .batch_execute(&format!(
            "SET search_path = {}; BEGIN; UPDATE events SET attempts = attempts WHERE false",
            schema.name
        ))
        .await
        .expect("open a write transaction");
    let opened = tokio::time::timeout(Duration::from_secs(5), pg_store(&schema)).await;
    writer.batch_execute("ROLLBACK").await.expect("rollback");
    assert!(opened.is_ok(), "opening a migrated schema ran DDL and waited for the open transaction");
}
