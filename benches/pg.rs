//! PostgreSQL row of the benchmark: ingest and delivery throughput of the relay on PostgreSQL with one and with
//! three instances, as ratios to a bare actix-web server (parse nothing, answer 202) measured in the same run.
//!
//! A SQLite row (one instance) is measured in the same run for comparison.
//!
//! `cargo bench --bench pg` (PostgreSQL on 127.0.0.1:5432, database `test`, trust auth; override with
//! HEAP_RELAY_BENCH_PG). Bounded load on loopback from an in-process client: `BENCH_SECS` (default 5) seconds per
//! row at `BENCH_CONNECTIONS` (default 32) concurrent requests, each an `/api/track` body of 10 events. Delivery
//! goes to an in-process mock Heap (actix, answers 200 and counts events). Everything shares this machine's cores
//! with PostgreSQL, so compare ratios, not absolute figures.

use actix_web::{App, HttpResponse, HttpServer, web};
use heap_relay::settings::Settings;
use heap_relay::startup::Application;
use std::net::TcpListener;
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

/// Starts a bare actix server answering 202 to anything: the baseline.
fn bare_server() -> (String, actix_web::dev::ServerHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server =
        HttpServer::new(|| App::new().default_service(web::to(|| async { HttpResponse::Accepted().finish() })))
            .workers(2)
            .listen(listener)
            .expect("listen")
            .run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://{addr}"), handle)
}

/// A mock Heap that counts the events it receives and answers 200.
fn mock_heap(count: Arc<AtomicU64>) -> (String, actix_web::dev::ServerHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = HttpServer::new(move || {
        let count = count.clone();
        App::new().app_data(web::PayloadConfig::new(64 << 20)).default_service(web::to(move |b: web::Bytes| {
            let count = count.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                let n = v.get("events").or_else(|| v.get("users")).and_then(|e| e.as_array()).map_or(0, Vec::len);
                count.fetch_add(n as u64, Ordering::Relaxed);
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .expect("listen")
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://{addr}"), handle)
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

struct Row {
    name: String,
    load: Load,
    /// Events delivered per second, from the start of the load until Heap had every accepted event.
    delivered_per_sec: Option<f64>,
}

/// The relay with `instances` instances on PostgreSQL at `base` (one fresh schema), or on SQLite when `base` is None.
async fn relay_row(base: Option<&str>, instances: usize, conns: usize, secs: u64) -> Row {
    let pg = match base {
        Some(b) => Some(pg_schema(b).await),
        None => None,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let delivered = Arc::new(AtomicU64::new(0));
    let (heap, heap_handle) = mock_heap(delivered.clone());
    let mut targets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..instances {
        let mut s = Settings::defaults();
        s.server.bind = "127.0.0.1:0".into();
        s.server.workers = if instances == 1 { 2 } else { 1 };
        s.heap.base_url = heap.clone();
        s.heap.app_id = APP_ID.into();
        s.templates.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        s.templates.reload_interval_secs = 0;
        match (&pg, base) {
            (Some((_, schema)), Some(base)) => s.store.url = format!("{base}?options=-csearch_path%3D{schema}").into(),
            _ => s.store.path = dir.path().join("relay.db"),
        }
        s.delivery.app_events_per_minute = 0;
        s.delivery.identity_events_per_minute = 0;
        let app = Application::build(s).await.expect("the relay starts");
        targets.push(format!("http://127.0.0.1:{}", app.port()));
        handles.push(app.handle());
        tokio::spawn(app.run_until_stopped());
    }
    let start = Instant::now();
    let load = drive(&targets, conns, secs).await;
    let want = load.accepted * EVENTS_PER_BODY as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    let delivered_per_sec = (got >= want).then(|| got as f64 / start.elapsed().as_secs_f64());
    for h in handles {
        h.stop(true).await;
    }
    heap_handle.stop(true).await;
    if let Some((admin, schema)) = pg {
        let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
    }
    let store = if base.is_some() { "PostgreSQL" } else { "SQLite" };
    Row { name: format!("relay on {store}, {instances} instance(s)"), load, delivered_per_sec }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let base = std::env::var("HEAP_RELAY_BENCH_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let secs = env_or("BENCH_SECS", 5);
        let conns = env_or("BENCH_CONNECTIONS", 32) as usize;
        let (bare, bare_handle) = bare_server();
        let baseline = drive(&[bare], conns, secs).await;
        bare_handle.stop(true).await;
        let rows = vec![
            Row { name: "bare actix-web, answers 202".into(), load: baseline, delivered_per_sec: None },
            relay_row(None, 1, conns, secs).await,
            relay_row(Some(&base), 1, conns, secs).await,
            relay_row(Some(&base), 3, conns, secs).await,
        ];
        let base_rps = rows[0].load.accepted as f64 / rows[0].load.elapsed.as_secs_f64();
        println!(
            "\n{} s per row, {conns} concurrent requests, {EVENTS_PER_BODY} events per body, loopback, {}",
            secs,
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        println!(
            "| server | ingest req/s | events/s | p99 | ratio to bare | delivered events/s | delivery ratio to bare events/s | failed |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for r in &rows {
            let rps = r.load.accepted as f64 / r.load.elapsed.as_secs_f64();
            let delivery = r.delivered_per_sec.map_or("-".into(), |d| format!("{d:.0}"));
            let delivery_ratio =
                r.delivered_per_sec.map_or("-".into(), |d| format!("{:.3}", d / (base_rps * EVENTS_PER_BODY as f64)));
            println!(
                "| {} | {rps:.0} | {:.0} | {:.1} ms | {:.3} | {delivery} | {delivery_ratio} | {} |",
                r.name,
                rps * EVENTS_PER_BODY as f64,
                r.load.p99.as_secs_f64() * 1000.0,
                rps / base_rps,
                r.load.failed
            );
        }
    });
}
