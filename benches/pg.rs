//! PostgreSQL row of the benchmark: ingest and delivery throughput of the relay on PostgreSQL with one and with
//! three instances, as ratios to a bare actix-web server (parse nothing, answer 202) measured in the same run.
//!
//! Ingest posts the 2-profile CleverTap body (a fresh identity in every request, so the dedupe of retries never
//! answers in place of storing) to relays on the shipped configuration (rate budgets on; ingest does not wait on
//! delivery), beside two references in the same run: the bare server, and a minimal durable PostgreSQL writer (actix
//! reads the body, one connection appends every waiting body in one transaction, `INSERT … SELECT unnest(…)`,
//! `synchronous_commit` on, 202 after the commit), which is what any relay that answers after a PostgreSQL commit on
//! this machine costs at least. The PostgreSQL WAL written per accepted event is printed beside each PostgreSQL row.
//! A SQLite row (one instance) is measured in the same run for comparison. Delivery is measured apart from ingest,
//! with the rate budgets off: a backlog written straight to the store, drained by fresh relays, against two bare
//! tasks posting the same bulk bodies to the same mock Heap; the Heap mock counts what it gets, and the three
//! instances' row checks that no event came twice.
//!
//! `cargo bench --bench pg` (PostgreSQL on 127.0.0.1:5432, database `test`, trust auth; override with
//! HEAP_RELAY_BENCH_PG). Bounded load on loopback from an in-process client: `BENCH_SECS` (default 5) seconds per
//! ingest row at `BENCH_CONNECTIONS` (default 32) concurrent requests; a backlog of `BENCH_BACKLOG` (default 40,000)
//! events per delivery row. Delivery goes to an in-process mock Heap (actix, answers 200 and counts events).
//! Everything shares this machine's cores with PostgreSQL, so compare ratios, not absolute figures.

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
/// Events in the ingest body (the 2-profile CleverTap body).
const EVENTS_PER_BODY: usize = 2;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// The load harness's bodies: the same CleverTap sample with a placeholder the client makes fresh in every request.
#[path = "load/bodies.rs"]
#[allow(dead_code)]
mod bodies;

/// The 2-profile CleverTap body of request `n`: its identities (and emails) hold `n`, so no two requests are alike.
fn body(template: &str, n: u64) -> String {
    template.replace(bodies::FRESH, &format!("{n:012}"))
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

/// Posts the CleverTap body (fresh in each request) to `targets` round-robin from `conns` concurrent tasks for
/// `secs`; a 202 counts as accepted.
async fn drive(targets: &[String], conns: usize, secs: u64) -> Load {
    let client = reqwest::Client::builder().pool_max_idle_per_host(conns).build().expect("client");
    let template =
        Arc::new(serde_json::to_string(&bodies::clevertap_with(EVENTS_PER_BODY)).expect("the body serialises"));
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let seq = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (client, seq, targets, template) = (client.clone(), seq.clone(), targets.to_vec(), template.clone());
            tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < stop {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let url = format!("{}/hooks/clevertap", targets[n as usize % targets.len()]);
                    let t = Instant::now();
                    let r = client
                        .post(url)
                        .header("Content-Type", "application/json")
                        .body(body(&template, n))
                        .send()
                        .await;
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

    /// The shipped configuration (`Settings::defaults` is the committed config.toml) on this backend; with
    /// `budgets_off`, Heap's rate budgets set to 0 (the delivery rows).
    fn settings(&self, heap: &str, http_workers: usize, budgets_off: bool) -> Settings {
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
        if budgets_off {
            s.delivery.app_events_per_minute = 0;
            s.delivery.identity_events_per_minute = 0;
        }
        s
    }

    /// PostgreSQL's WAL position now (bytes since the cluster began), for the WAL written by a row.
    async fn wal_lsn(&self) -> Option<i64> {
        let (admin, _, _) = self.pg.as_ref()?;
        admin.query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8", &[]).await.ok().map(|r| r.get(0))
    }

    async fn drop_schema(self) {
        if let Some((admin, schema, _)) = self.pg {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
        }
    }
}

/// Starts `instances` relays; returns their addresses and stop handles.
async fn start_relays(
    backend: &Backend,
    heap: &str,
    instances: usize,
    budgets_off: bool,
) -> (Vec<String>, Vec<ServerHandle>) {
    let mut targets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..instances {
        let app = Application::build(backend.settings(heap, if instances == 1 { 2 } else { 1 }, budgets_off))
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

/// One ingest row: the load, and the PostgreSQL WAL it wrote (PostgreSQL rows only).
struct IngestRow {
    name: String,
    load: Load,
    wal_bytes: Option<i64>,
}

/// Ingest on the shipped configuration: posts for `secs`. Delivery runs at the shipped budgets meanwhile; the row
/// measures what the senders get, not the drain (the delivery rows do).
async fn ingest_row(base: Option<&str>, instances: usize, conns: usize, secs: u64) -> IngestRow {
    let backend = Backend::new(base).await;
    let delivered = Arc::new(HeapCounters::default());
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let (targets, handles) = start_relays(&backend, &heap, instances, false).await;
    let wal_before = backend.wal_lsn().await;
    let load = drive(&targets, conns, secs).await;
    let wal_bytes = backend.wal_lsn().await.zip(wal_before).map(|(after, before)| after - before);
    for h in handles {
        h.stop(true).await;
    }
    heap_handle.stop(true).await;
    let name = format!("relay on {}, {instances} instance(s), shipped config", backend.name());
    backend.drop_schema().await;
    IngestRow { name, load, wal_bytes }
}

/// The minimal durable PostgreSQL writer (see the module doc) in a schema of its own.
async fn minimal_pg_row(base: &str, conns: usize, secs: u64) -> IngestRow {
    let backend = Backend::new(Some(base)).await;
    let Some((_, schema, base)) = &backend.pg else { unreachable!("a PostgreSQL backend") };
    let url = format!("{base}?options=-csearch_path%3D{schema}");
    let (target, handle) = spawn_minimal_pg_writer(2, &url);
    let wal_before = backend.wal_lsn().await;
    let load = drive(&[target], conns, secs).await;
    let wal_bytes = backend.wal_lsn().await.zip(wal_before).map(|(after, before)| after - before);
    handle.stop(true).await;
    backend.drop_schema().await;
    IngestRow { name: "minimal durable PostgreSQL writer (whole body, group commit)".into(), load, wal_bytes }
}

/// One connection appends every body waiting in one transaction and answers each after the commit; the HTTP side is
/// the SQLite reference's (`servers::spawn_commit_front`).
fn spawn_minimal_pg_writer(workers: usize, url: &str) -> (String, ServerHandle) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<servers::Pending>(4096);
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute("CREATE TABLE bodies (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL)")
                .await
                .expect("table");
            let insert = client.prepare("INSERT INTO bodies (body) SELECT unnest($1::bytea[])").await.expect("prepare");
            // Blocking on the channel is fine here: nothing else runs on this thread while no query is in flight.
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                while let Ok(p) = rx.try_recv() {
                    group.push(p);
                }
                let rows: Vec<&[u8]> = group.iter().map(|(b, _)| b.as_ref()).collect();
                let ok = client.execute(&insert, &[&rows]).await.is_ok();
                for (_, reply) in group {
                    let _ = reply.send(ok);
                }
            }
        })
    });
    let (port, handle) = servers::spawn_commit_front(workers, tx, false);
    (format!("http://127.0.0.1:{port}"), handle)
}

/// Delivery: a backlog of `events` written straight to the store, then drained by `instances` fresh relays.
/// Returns events/s from their start until Heap had every one.
async fn drain_row(base: Option<&str>, instances: usize, events: usize) -> (String, f64) {
    let backend = Backend::new(base).await;
    {
        let store =
            heap_relay::startup::open_store(&backend.settings("http://127.0.0.1:9", 1, true)).await.expect("store");
        for b in 0..events / 500 {
            store.append(backlog(b, 500)).await.expect("append");
        }
    }
    let delivered = Arc::new(HeapCounters::default());
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let start = Instant::now();
    let (_, handles) = start_relays(&backend, &heap, instances, true).await;
    assert!(wait_for(&delivered.events, events as u64, Duration::from_secs(120)).await, "the backlog drains");
    let rate = events as f64 / start.elapsed().as_secs_f64();
    // Every event was delivered; no more than that arrives (no event twice, whichever instance sent it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = delivered.events.load(Ordering::Relaxed);
    assert_eq!(got, events as u64, "{instances} instance(s) delivered {got} events for a backlog of {events}");
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
        let pg_url = base.as_str();
        let base = Some(pg_url);
        let secs = env_or("BENCH_SECS", 5);
        let conns = env_or("BENCH_CONNECTIONS", 32) as usize;
        let backlog_events = env_or("BENCH_BACKLOG", 40_000) as usize;

        let (bare, bare_handle) = bare_server();
        let baseline = drive(&[bare], conns, secs).await;
        bare_handle.stop(true).await;
        let mut ingest =
            vec![IngestRow { name: "bare actix-web, answers 202".to_owned(), load: baseline, wal_bytes: None }];
        ingest.push(minimal_pg_row(pg_url, conns, secs).await);
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
            "\nIngest: {secs} s per row, {conns} concurrent requests, the 2-profile CleverTap body \
             ({EVENTS_PER_BODY} events, fresh identities)"
        );
        println!("| server | req/s | events/s | p99 | ratio to bare | ratio to the minimal PostgreSQL writer | PostgreSQL WAL bytes per event | failed |");
        println!("|---|---|---|---|---|---|---|---|");
        let rps = |l: &Load| l.accepted as f64 / l.elapsed.as_secs_f64();
        let (base_rps, floor_rps) = (rps(&ingest[0].load), rps(&ingest[1].load));
        for row in &ingest {
            let l = &row.load;
            let wal = match row.wal_bytes {
                Some(w) if l.accepted > 0 => format!("{:.0}", w as f64 / (l.accepted * EVENTS_PER_BODY as u64) as f64),
                _ => "-".into(),
            };
            println!(
                "| {} | {:.0} | {:.0} | {:.1} ms | {:.3} | {:.3} | {wal} | {} |",
                row.name,
                rps(l),
                rps(l) * EVENTS_PER_BODY as f64,
                l.p99.as_secs_f64() * 1000.0,
                rps(l) / base_rps,
                rps(l) / floor_rps,
                l.failed
            );
        }
        println!(
            "\nDelivery, rate budgets off: a backlog of {backlog_events} stored events drained to the mock Heap (2 workers per instance)"
        );
        println!("| deliverer | events/s | ratio to bare |");
        println!("|---|---|---|");
        for (name, rate) in &drain {
            println!("| {name} | {rate:.0} | {:.3} |", rate / drain[0].1);
        }
    });
}
