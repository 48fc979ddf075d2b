//! PostgreSQL row of the benchmark: ingest and delivery throughput of the relay on PostgreSQL with one and with
//! three instances, as ratios to a bare actix-web server (parse nothing, answer 202) measured in the same run.
//!
//! A SQLite row (one instance) is measured in the same run for comparison. Delivery is measured apart from ingest:
//! a backlog written straight to the store, drained by fresh relays, against two bare tasks posting the same bulk
//! bodies to the same mock Heap.
//!
//! `cargo bench --bench pg` (PostgreSQL on 127.0.0.1:5432, database `test`, trust auth; override with
//! HEAP_RELAY_BENCH_PG). Bounded load on loopback from an in-process client: `BENCH_SECS` (default 5) seconds per
//! ingest row at `BENCH_CONNECTIONS` (default 32) concurrent requests, each an `/api/track` body of 10 events; a
//! backlog of `BENCH_BACKLOG` (default 40,000) events per delivery row. Delivery goes to an in-process mock Heap (actix, answers 200 and counts events). Everything shares this machine's cores
//! with PostgreSQL, so compare ratios, not absolute figures.

use actix_web::dev::ServerHandle;
use heap_relay::domain::CallKind;
use heap_relay::settings::Settings;
use heap_relay::startup::Application;
use heap_relay::store::{Ingested, NewEvent};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const APP_ID: &str = "1234567890";
const EVENTS_PER_BODY: usize = 10;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn body(n: u64) -> String {
    let events: Vec<serde_json::Value> = (0..EVENTS_PER_BODY)
        .map(|i| {
            serde_json::json!({"identity": format!("user-{}", (n as usize * 7 + i) % 500), "event": "Bench Load",
                "idempotency_key": format!("k-{n}-{i}"), "properties": {"plan": "pro", "step": i, "source": "bench"}})
        })
        .collect();
    serde_json::json!({"app_id": APP_ID, "events": events}).to_string()
}

// The load harness's servers: the same baseline and mock Heap, so both benches measure against one thing.
#[path = "load/servers.rs"]
#[allow(dead_code)]
mod servers;
use servers::{HeapCounters, spawn_actix};

/// The bare actix baseline (reads the body, answers 202).
fn bare_server() -> (String, ServerHandle) {
    let (port, handle) = spawn_actix(2, None);
    (format!("http://127.0.0.1:{port}"), handle)
}

/// A mock Heap that counts the events it receives and answers 200.
fn mock_heap(counters: Arc<HeapCounters>) -> (String, ServerHandle) {
    let (port, handle) = spawn_actix(1, Some(counters));
    (format!("http://127.0.0.1:{port}"), handle)
}

struct Load {
    accepted: u64,
    failed: u64,
    elapsed: Duration,
    p99: Duration,
}

/// Posts bodies to `targets` round-robin from `conns` concurrent tasks for `secs`.
async fn drive(targets: &[String], conns: usize, secs: u64) -> Load {
    let client = reqwest::Client::builder().pool_max_idle_per_host(conns).build().expect("client");
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let seq = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (client, seq, targets) = (client.clone(), seq.clone(), targets.to_vec());
            tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < stop {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let url = format!("{}/api/track", targets[n as usize % targets.len()]);
                    let t = Instant::now();
                    let r = client.post(url).header("Content-Type", "application/json").body(body(n)).send().await;
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    match r {
                        Ok(r) if r.status() == 202 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed, hist)
            })
        })
        .collect();
    let mut load = Load { accepted: 0, failed: 0, elapsed: Duration::ZERO, p99: Duration::ZERO };
    let mut all = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        let (ok, failed, hist) = t.await.expect("load task");
        load.accepted += ok;
        load.failed += failed;
        let _ = all.add(hist);
    }
    load.elapsed = start.elapsed();
    load.p99 = Duration::from_micros(all.value_at_quantile(0.99));
    load
}

async fn pg_schema(base: &str) -> (tokio_postgres::Client, String) {
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must answer at {base} for this benchmark: {e}"));
    tokio::spawn(conn);
    let name = format!("bench_{}", uuid::Uuid::now_v7().simple());
    client.batch_execute(&format!("CREATE SCHEMA {name}")).await.expect("create schema");
    (client, name)
}

/// Where the relays under test keep their queue: a fresh PostgreSQL schema, or a SQLite file in a temp dir.
struct Backend {
    pg: Option<(tokio_postgres::Client, String, String)>,
    dir: tempfile::TempDir,
}

impl Backend {
    async fn new(base: Option<&str>) -> Self {
        let pg = match base {
            Some(b) => {
                let (client, schema) = pg_schema(b).await;
                Some((client, schema, b.to_owned()))
            }
            None => None,
        };
        Self { pg, dir: tempfile::tempdir().expect("temp dir") }
    }

    fn name(&self) -> &'static str {
        if self.pg.is_some() { "PostgreSQL" } else { "SQLite" }
    }

    fn settings(&self, heap: &str, http_workers: usize) -> Settings {
        let mut s = Settings::defaults();
        s.server.bind = "127.0.0.1:0".into();
        s.server.workers = http_workers;
        s.heap.base_url = heap.to_owned();
        s.heap.app_id = APP_ID.into();
        s.templates.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        s.templates.reload_interval_secs = 0;
        match &self.pg {
            Some((_, schema, base)) => s.store.url = format!("{base}?options=-csearch_path%3D{schema}").into(),
            None => s.store.path = self.dir.path().join("relay.db"),
        }
        s.delivery.app_events_per_minute = 0;
        s.delivery.identity_events_per_minute = 0;
        s
    }

    async fn drop_schema(self) {
        if let Some((admin, schema, _)) = self.pg {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
        }
    }
}

/// Starts `instances` relays; returns their addresses and stop handles.
async fn start_relays(backend: &Backend, heap: &str, instances: usize) -> (Vec<String>, Vec<ServerHandle>) {
    let mut targets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..instances {
        let app = Application::build(backend.settings(heap, if instances == 1 { 2 } else { 1 }))
            .await
            .expect("the relay starts");
        targets.push(format!("http://127.0.0.1:{}", app.port()));
        handles.push(app.handle());
        tokio::spawn(app.run_until_stopped());
    }
    (targets, handles)
}

async fn wait_for(count: &AtomicU64, want: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while count.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Ingest: posts for `secs`, then waits until Heap has every accepted event.
async fn ingest_row(base: Option<&str>, instances: usize, conns: usize, secs: u64) -> (String, Load) {
    let backend = Backend::new(base).await;
    let delivered = Arc::new(HeapCounters::default());
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let (targets, handles) = start_relays(&backend, &heap, instances).await;
    let load = drive(&targets, conns, secs).await;
    let all = wait_for(&delivered.events, load.accepted * EVENTS_PER_BODY as u64, Duration::from_secs(120)).await;
    assert!(all, "every accepted event is delivered");
    for h in handles {
        h.stop(true).await;
    }
    heap_handle.stop(true).await;
    let name = format!("relay on {}, {instances} instance(s)", backend.name());
    backend.drop_schema().await;
    (name, load)
}

/// Delivery: a backlog of `events` written straight to the store, then drained by `instances` fresh relays.
/// Returns events/s from their start until Heap had every one.
async fn drain_row(base: Option<&str>, instances: usize, events: usize) -> (String, f64) {
    let backend = Backend::new(base).await;
    {
        let store = heap_relay::startup::open_store(&backend.settings("http://127.0.0.1:9", 1)).await.expect("store");
        for b in 0..events / 500 {
            store.append(backlog(b, 500)).await.expect("append");
        }
    }
    let delivered = Arc::new(HeapCounters::default());
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let start = Instant::now();
    let (_, handles) = start_relays(&backend, &heap, instances).await;
    assert!(wait_for(&delivered.events, events as u64, Duration::from_secs(120)).await, "the backlog drains");
    let rate = events as f64 / start.elapsed().as_secs_f64();
    for h in handles {
        h.stop(true).await;
    }
    heap_handle.stop(true).await;
    let name = format!("relay on {}, {instances} instance(s)", backend.name());
    backend.drop_schema().await;
    (name, rate)
}

fn backlog(b: usize, n: usize) -> Ingested {
    let events = (0..n)
        .map(|i| {
            let identity = format!("user-{}", (b * n + i) % 500);
            let key = format!("d-{b}-{i}");
            NewEvent {
                event_id: uuid::Uuid::now_v7().to_string(),
                item_index: i as i64,
                kind: CallKind::Track,
                app_id: APP_ID.into(),
                payload: serde_json::json!({"identity": identity, "event": "Bench Load", "idempotency_key": key,
                    "properties": {"plan": "pro", "step": i, "source": "bench"}})
                .to_string(),
                identity,
                idempotency_key: Some(key),
                dedupe_key: None,
            }
        })
        .collect();
    Ingested {
        source: "heap".into(),
        environment: String::new(),
        template: "default".into(),
        body: b"{}".to_vec(),
        received_at: heap_relay::store::now_ms(),
        events,
        rejections: vec![],
        replay_of_raw: None,
        request_key: None,
        template_version: None,
        held: None,
    }
}

/// The bare delivery ceiling: two tasks (as two workers) posting 1000-event bodies straight to the mock Heap.
async fn bare_drain(events: usize) -> f64 {
    let delivered = Arc::new(HeapCounters::default());
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let items: Vec<String> = backlog(0, 1000).events.into_iter().map(|e| e.payload).collect();
    let body = format!("{{\"app_id\":\"{APP_ID}\",\"events\":[{}]}}", items.join(","));
    let client = reqwest::Client::new();
    let start = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let (client, heap, body) = (client.clone(), heap.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..events / 2000 {
                    let _ = client.post(format!("{heap}/api/track")).body(body.clone()).send().await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let rate = delivered.events.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    heap_handle.stop(true).await;
    rate
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and must not run a minute of load.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benches/pg.rs measures only under `cargo bench --bench pg`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let base =
            std::env::var("HEAP_RELAY_BENCH_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let base = Some(base.as_str());
        let secs = env_or("BENCH_SECS", 5);
        let conns = env_or("BENCH_CONNECTIONS", 32) as usize;
        let backlog_events = env_or("BENCH_BACKLOG", 40_000) as usize;

        let (bare, bare_handle) = bare_server();
        let baseline = drive(&[bare], conns, secs).await;
        bare_handle.stop(true).await;
        let mut ingest = vec![("bare actix-web, answers 202".to_owned(), baseline)];
        for (b, n) in [(None, 1), (base, 1), (base, 3)] {
            ingest.push(ingest_row(b, n, conns, secs).await);
        }
        let mut drain =
            vec![("bare: 2 tasks post 1000-event bodies to the mock".to_owned(), bare_drain(backlog_events).await)];
        for (b, n) in [(None, 1), (base, 1), (base, 3)] {
            drain.push(drain_row(b, n, backlog_events).await);
        }

        println!(
            "\nheap-relay pg bench, {}; loopback, in-process client and mock Heap",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        println!(
            "\nIngest: {secs} s per row, {conns} concurrent requests, /api/track bodies of {EVENTS_PER_BODY} events"
        );
        println!("| server | req/s | events/s | p99 | ratio to bare | failed |");
        println!("|---|---|---|---|---|---|");
        let rps = |l: &Load| l.accepted as f64 / l.elapsed.as_secs_f64();
        let base_rps = rps(&ingest[0].1);
        for (name, l) in &ingest {
            println!(
                "| {name} | {:.0} | {:.0} | {:.1} ms | {:.3} | {} |",
                rps(l),
                rps(l) * EVENTS_PER_BODY as f64,
                l.p99.as_secs_f64() * 1000.0,
                rps(l) / base_rps,
                l.failed
            );
        }
        println!(
            "\nDelivery: a backlog of {backlog_events} stored events drained to the mock Heap (2 workers per instance)"
        );
        println!("| deliverer | events/s | ratio to bare |");
        println!("|---|---|---|");
        for (name, rate) in &drain {
            println!("| {name} | {rate:.0} | {:.3} |", rate / drain[0].1);
        }
    });
}
