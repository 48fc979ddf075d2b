//! The console with a million events in the store: time to render the overview, a filtered deliveries page and the
//! failures page, beside `/healthz` in the same run (so the figures read as multiples of the relay's cheapest
//! answer on this machine).
//!
//! `cargo bench --bench console`. Fills a fresh SQLite store with `BENCH_EVENTS` (default 1,000,000) events in
//! bodies of 100 over the past week (so the last hour holds its share, about 6,000), 1% of bodies with a refused
//! item and 2,000 dead events under four reasons; everything else is delivered through delivery's own books (claim
//! and record, as workers do). Then starts the relay on that store, signs in, and times each page
//! `BENCH_ROUNDS` (default 20) times: median and slowest.

use heap_relay::domain::CallKind;
use heap_relay::settings::Settings;
use heap_relay::startup::Application;
use heap_relay::store::sqlite::SqliteOptions;
use heap_relay::store::{
    AttemptLog, AttemptRecord, Ingested, NewEvent, NewRejection, Resolution, SqliteStore, Store, now_ms,
};
use std::time::{Duration, Instant};

const APP_IDS: [&str; 4] = ["1000000001", "1000000002", "1000000003", "1000000004"];
const PER_BODY: usize = 100;
const TOKEN: &str = "bench-admin-token-0123456789";
const WEEK_MS: i64 = 7 * 24 * 3_600_000;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ingested(n: usize, bodies: usize, now: i64) -> Ingested {
    let received_at = now - WEEK_MS + (n as i64 * WEEK_MS / bodies as i64);
    let app_id = APP_IDS[n % APP_IDS.len()];
    let events = (0..PER_BODY)
        .map(|i| NewEvent {
            event_id: String::new(),
            item_index: i as i64,
            kind: CallKind::Track,
            app_id: app_id.to_owned(),
            identity: format!("user-{}", (n * 7 + i) % 5000),
            idempotency_key: Some(format!("k-{n}-{i}")),
            payload: serde_json::json!({"identity": format!("user-{}", (n * 7 + i) % 5000), "event": "Campaign Sent",
                "timestamp": "2026-12-01T00:00:00Z", "idempotency_key": format!("k-{n}-{i}"),
                "properties": {"campaign_id": n % 97, "step": i}})
            .to_string(),
            dedupe_key: None,
        })
        .collect();
    let rejections = if n.is_multiple_of(100) {
        vec![NewRejection {
            event_id: String::new(),
            item_index: PER_BODY as i64,
            field: "identity".into(),
            message: "is missing".into(),
        }]
    } else {
        Vec::new()
    };
    Ingested {
        source: if n.is_multiple_of(3) { "clevertap" } else { "segment" }.into(),
        environment: if n.is_multiple_of(5) { "dev" } else { "" }.into(),
        template: "default".into(),
        body: br#"{"bench": true}"#.to_vec(),
        received_at,
        events,
        rejections,
        replay_of_raw: None,
        request_key: None,
        template_version: None,
        held: None,
    }
}

async fn fill(path: &std::path::Path, total: usize) -> anyhow::Result<()> {
    let store = Store::Sqlite(SqliteStore::open(path, SqliteOptions::default())?);
    let bodies = total / PER_BODY;
    let now = now_ms();
    let started = Instant::now();
    let mut pending = Vec::new();
    for n in 0..bodies {
        let s = store.clone();
        pending.push(tokio::spawn(async move { s.append(ingested(n, bodies, now)).await }));
        if pending.len() >= 512 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending.drain(..) {
        p.await??;
    }
    println!("filled {total} events in {bodies} bodies in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let (mut delivered, mut dead, mut call) = (0usize, 0usize, 0u64);
    loop {
        let claimed = store.claim("bench", now_ms(), 600_000, 2000, Default::default(), None).await?;
        if claimed.is_empty() {
            break;
        }
        call += 1;
        let records = claimed
            .iter()
            .map(|c| {
                let refused = dead < 2000 && c.id % 97 == 0;
                let reason = format!("Heap answered 400: {{\"error\":\"reason {}\"}}", c.id % 4);
                if refused {
                    dead += 1;
                } else {
                    delivered += 1;
                }
                AttemptRecord {
                    id: c.id,
                    lease_token: c.lease_token,
                    attempts: vec![AttemptLog {
                        call,
                        at: now_ms(),
                        http_status: Some(if refused { 400 } else { 200 }),
                        latency_ms: 12,
                        batch_size: claimed.len() as i64,
                        error: refused.then(|| reason.clone()),
                    }],
                    resolution: if refused { Resolution::Dead } else { Resolution::Delivered },
                    error: refused.then_some(reason),
                }
            })
            .collect();
        store.record(records).await?;
    }
    println!("delivered {delivered}, dead {dead} through the books in {:.1} s", started.elapsed().as_secs_f64());
    // The follower index of identities, keys and templates: the store's follower thread has been indexing while
    // the store filled and delivered; whatever it has not read yet is read now, as a relay that has run a while
    // has it. Then the index is built again from nothing and timed (what an upgraded store costs).
    if let Store::Sqlite(s) = &store {
        let started = Instant::now();
        let rest = s.index_log().await?;
        println!("the follower read its last {rest} log entries in {:.1} s", started.elapsed().as_secs_f64());
        let books = rusqlite::Connection::open(heap_relay::store::sqlite::books_path(path))?;
        books.execute_batch("DELETE FROM finder; UPDATE finder_progress SET upto = 0")?;
        let started = Instant::now();
        s.index_log().await?;
        println!("the follower index of {total} events built from nothing in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

fn settings(path: &std::path::Path) -> Settings {
    let mut s = Settings::defaults();
    s.server.bind = "127.0.0.1:0".into();
    s.server.workers = 2;
    // Nothing is pending; a Heap that is not there is never called.
    s.heap.base_url = "http://127.0.0.1:9".into();
    s.heap.app_id = APP_IDS[0].into();
    s.store.path = path.to_owned();
    s.delivery.workers = 1;
    // The filled events span a week: keep them all.
    s.store.retention_hours = 24 * 365;
    s.admin.token = TOKEN.to_owned().into();
    s.templates.dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    s
}

async fn time(
    client: &reqwest::Client,
    url: &str,
    cookie: &str,
    rounds: usize,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut times = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let resp = client.get(url).header("Cookie", cookie).send().await?;
        anyhow::ensure!(resp.status().is_success(), "{url}: HTTP {}", resp.status());
        bytes = resp.bytes().await?.len();
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1], bytes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = env_or("BENCH_EVENTS", 1_000_000) as usize;
    let rounds = env_or("BENCH_ROUNDS", 20) as usize;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("relay.db");
    fill(&path, total).await?;

    let app = Application::build(settings(&path)).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let signed =
        client.post(format!("{base}/console/sign-in")).header("Origin", &base).form(&[("token", TOKEN)]).send().await?;
    let cookie = signed
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| anyhow::anyhow!("no session cookie"))?
        .to_owned();

    println!("\n{total} events in the store; {rounds} rounds per page, in the same run:");
    println!("{:<58} {:>10} {:>10} {:>9}", "page", "median", "slowest", "bytes");
    let pages = [
        ("/healthz (baseline)", "/healthz".to_owned()),
        ("overview", "/console".to_owned()),
        (
            "deliveries, filtered by app_id and status=delivered",
            format!("/console/deliveries?app_id={}&status=delivered", APP_IDS[2]),
        ),
        ("deliveries, filtered by identity", "/console/deliveries?identity=user-42".to_owned()),
        ("deliveries, by the message id of a week-old event", "/console/deliveries?key=k-3-5".to_owned()),
        (
            "deliveries, filtered by template and status=dead",
            "/console/deliveries?template=default&status=dead".to_owned(),
        ),
        ("failures", "/console/failures".to_owned()),
    ];
    for (label, path) in pages {
        let (median, slowest, bytes) = time(&client, &format!("{base}{path}"), &cookie, rounds).await?;
        println!("{label:<58} {:>8.2}ms {:>8.2}ms {bytes:>9}", median.as_secs_f64() * 1e3, slowest.as_secs_f64() * 1e3);
    }
    Ok(())
}
