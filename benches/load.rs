//! Load harness: starts a bare actix-web baseline, the release relay binary (a child process, so its RSS can be
//! read from /proc) and a mock Heap, all on 127.0.0.1, drives each scenario from an in-process HTTP client with 32
//! connections (bounded in count and time), and prints one table. `-- --soak` runs the million-event soak instead.
//!
//! Run: `cargo bench --bench load` (see docs/benchmarks.md). Options after `--`: `--secs N` (measured seconds per
//! phase, default 10), `--scenario NAME` (run one), `--compare PATH` (also measure another relay binary, e.g. an
//! older build, against the same baseline), `--drain-secs N` (longest wait for delivery after the load, default
//! 240), `--soak`, `--soak-events N` (default 1,000,000). The relay inherits this process's environment, so
//! `HEAP_RELAY__...` variables set for the bench reach it (the harness's own settings win).

use actix_web::{App, HttpResponse, HttpServer, web};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 32;
const APP_ID: &str = "1234567890";
/// No phase sends more than this many requests, whatever its duration.
const MAX_REQUESTS_PER_PHASE: u64 = 3_000_000;
const WARMUP: Duration = Duration::from_secs(1);
/// How long to wait, by default, for the mock Heap to receive every accepted event after a scenario's load ends.
const DRAIN_DEADLINE_SECS: u64 = 240;

// ---------------------------------------------------------------------------------------------------------------
// Bodies

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The CleverTap sample with its profiles repeated to `n`, each with its own identity.
fn clevertap_with(n: usize) -> Value {
    let mut body = fixture("clevertap-profile-batch.json");
    let profiles = body["profiles"].as_array().expect("profiles").clone();
    let out: Vec<Value> = (0..n)
        .map(|i| {
            let mut p = profiles[i % profiles.len()].clone();
            p["identity"] = Value::String(format!("u_{i}"));
            p
        })
        .collect();
    body["profiles"] = Value::Array(out);
    body
}

/// The Segment batch sample (identify, page, track, screen) repeated to `n` messages with distinct messageIds.
fn segment_with(n: usize) -> Value {
    let mut body = fixture("segment-batch.json");
    let msgs = body["batch"].as_array().expect("batch").clone();
    let out: Vec<Value> = (0..n)
        .map(|i| {
            let mut m = msgs[i % msgs.len()].clone();
            let id = m["messageId"].as_str().unwrap_or("m").to_owned();
            m["messageId"] = Value::String(format!("{id}-{i}"));
            m
        })
        .collect();
    body["batch"] = Value::Array(out);
    body
}

struct Scenario {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
}

fn scenarios() -> Vec<Scenario> {
    let bytes = |v: Value| serde_json::to_vec(&v).expect("serialises");
    vec![
        Scenario {
            name: "clevertap-2",
            path: "/hooks/clevertap",
            body: bytes(fixture("clevertap-profile-batch.json")),
        },
        Scenario { name: "clevertap-100", path: "/hooks/clevertap", body: bytes(clevertap_with(100)) },
        Scenario { name: "segment-100", path: "/hooks/segment", body: bytes(segment_with(100)) },
        Scenario {
            name: "userpilot-1",
            path: "/hooks/userpilot",
            body: bytes(fixture("userpilot-experience-started.json")),
        },
    ]
}

// ---------------------------------------------------------------------------------------------------------------
// Servers in this process: the baseline and the mock Heap, each on its own actix system thread.

#[derive(Default)]
struct HeapCounters {
    events: AtomicU64,
    requests: AtomicU64,
    /// Requests answered 503 while `failing`.
    refused: AtomicU64,
    failing: AtomicBool,
}

impl HeapCounters {
    fn reset(&self) {
        self.events.store(0, Ordering::SeqCst);
        self.requests.store(0, Ordering::SeqCst);
        self.refused.store(0, Ordering::SeqCst);
    }
}

#[derive(Deserialize)]
struct Bulk {
    #[serde(default)]
    events: Vec<IgnoredAny>,
    #[serde(default)]
    users: Vec<IgnoredAny>,
}

async fn mock_heap(body: web::Bytes, c: web::Data<HeapCounters>) -> HttpResponse {
    if c.failing.load(Ordering::SeqCst) {
        c.refused.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::ServiceUnavailable().finish();
    }
    match serde_json::from_slice::<Bulk>(&body) {
        Ok(b) => {
            c.events.fetch_add((b.events.len() + b.users.len()) as u64, Ordering::SeqCst);
            c.requests.fetch_add(1, Ordering::SeqCst);
            HttpResponse::Ok().finish()
        }
        Err(_) => HttpResponse::BadRequest().finish(),
    }
}

/// The baseline: accepts the same body on the same path and answers 202, doing nothing else.
async fn baseline(body: web::Bytes) -> HttpResponse {
    std::hint::black_box(body.len());
    HttpResponse::Accepted().finish()
}

fn spawn_actix(workers: usize, counters: Option<Arc<HeapCounters>>) -> (u16, actix_web::dev::ServerHandle) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            let port = listener.local_addr().expect("local addr").port();
            let server = match counters {
                Some(c) => {
                    let data = web::Data::from(c);
                    HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .app_data(web::PayloadConfig::new(64 << 20))
                            .default_service(web::to(mock_heap))
                    })
                    .workers(workers)
                    .disable_signals()
                    .listen(listener)
                    .expect("listen")
                    .run()
                }
                None => HttpServer::new(|| {
                    App::new()
                        .app_data(web::PayloadConfig::new(5 << 20))
                        .route("/hooks/{source}", web::post().to(baseline))
                        .route("/hooks/{source}/{template}", web::post().to(baseline))
                })
                .workers(workers)
                .disable_signals()
                .listen(listener)
                .expect("listen")
                .run(),
            };
            tx.send((port, server.handle())).expect("report port");
            let _ = server.await;
        })
    });
    rx.recv().expect("server thread started")
}

// ---------------------------------------------------------------------------------------------------------------
// The relay as a child process

struct Relay {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().expect("addr").port()
}

impl Relay {
    fn start(bin: &Path, heap_port: u16, extra_env: &[(&str, &str)]) -> Relay {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).expect("target tmp dir");
        let dir = tempfile::Builder::new().prefix("relay-bench-").tempdir_in(&base).expect("temp dir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .current_dir(manifest)
            .env("HEAP_RELAY__HEAP__APP_ID", APP_ID)
            .env("HEAP_RELAY__HEAP__BASE_URL", format!("http://127.0.0.1:{heap_port}"))
            .env("HEAP_RELAY__STORE__PATH", dir.path().join("relay.db"))
            .env("HEAP_RELAY__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("HEAP_RELAY__TEMPLATES__DIR", manifest.join("templates"))
            // Throughput runs: the client-side rate budgets are off, so delivery is bound by the relay alone.
            .env("HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE", "0")
            .env("HEAP_RELAY__DELIVERY__IDENTITY_EVENTS_PER_MINUTE", "0")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the relay binary");
        let relay = Relay { child, port, dir };
        relay.wait_ready();
        relay
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 32];
                // Any answer means the server is up (/healthz says 503 when the relay runs no delivery workers).
                if s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 ")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the relay did not answer /healthz within 30 s; log: {}", self.dir.path().join("relay.log").display());
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn store_bytes(&self) -> u64 {
        ["relay.db", "relay.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.path().join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// SIGTERM, then a bounded wait, then SIGKILL.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (VmRSS, VmHWM) of a process in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) a process has used so far, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------------------------
// The load client

#[derive(Clone)]
struct LoadResult {
    /// Answers with the expected status.
    ok: u64,
    /// Other statuses and transport errors.
    failed: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Pacing for one phase: `None` sends as fast as each connection gets answers.
#[derive(Clone, Copy)]
struct Load {
    duration: Duration,
    max_requests: u64,
    /// Each connection sends at most one request per this interval.
    per_connection_interval: Option<Duration>,
}

async fn drive(url: &str, body: &[u8], expect: u16, load: Load) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let (addr, path) = split_url(url);
    let request: Arc<[u8]> = Arc::from(
        [
            format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat(),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (addr, request, issued) = (addr.clone(), request.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut conn: Option<Conn> = None;
            let mut next = Instant::now();
            while started.elapsed() < load.duration && issued.fetch_add(1, Ordering::Relaxed) < load.max_requests {
                if let Some(every) = load.per_connection_interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += every;
                }
                let t = Instant::now();
                if conn.is_none() {
                    conn = Conn::open(&addr).await;
                }
                let status = match conn.as_mut() {
                    Some(c) => c.round_trip(&request).await,
                    None => None,
                };
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                match status {
                    Some(code) if code == expect => ok += 1,
                    Some(_) => failed += 1,
                    None => {
                        failed += 1;
                        conn = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, failed, hist)
        }));
    }
    let mut out = LoadResult {
        ok: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    };
    for t in tasks {
        let (ok, failed, hist) = t.await.expect("load task");
        out.ok += ok;
        out.failed += failed;
        out.hist.add(hist).expect("same bounds");
    }
    out.elapsed = started.elapsed();
    out
}

/// `http://127.0.0.1:8080/hooks/x` → ("127.0.0.1:8080", "/hooks/x").
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let at = rest.find('/').unwrap_or(rest.len());
    assert!(rest.starts_with("127.0.0.1:"), "load goes to loopback only");
    (rest[..at].to_owned(), rest[at..].to_owned())
}

/// A minimal HTTP/1.1 keep-alive connection, so that the client costs about what `wrk` does and the baseline is
/// bound by the server rather than by the client: write a prepared request, read one response (Content-Length or
/// chunked), return its status.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Option<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Conn { stream, buf: Vec::with_capacity(16 * 1024) })
    }

    async fn round_trip(&mut self, request: &[u8]) -> Option<u16> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await.ok()?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.read_more().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).ok()?.to_ascii_lowercase();
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let length =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
        match length {
            Some(n) => {
                while self.buf.len() < head_end + n {
                    self.read_more().await?;
                }
            }
            None if head.contains("transfer-encoding: chunked") => {
                while find(&self.buf[head_end..], b"0\r\n\r\n").is_none() {
                    self.read_more().await?;
                }
            }
            None => {}
        }
        Some(status)
    }

    async fn read_more(&mut self) -> Option<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How many events the relay accepts per request for this body (one probe request, which is delivered too).
async fn probe(url: &str, body: &[u8]) -> u64 {
    let r = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .expect("probe request");
    let status = r.status();
    let v: Value = r.json().await.expect("probe answer is JSON");
    assert_eq!(status.as_u16(), 202, "probe answer: {v}");
    v["accepted"].as_u64().expect("accepted count")
}

// ---------------------------------------------------------------------------------------------------------------
// RSS sampling

struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Duration, u64)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32, every: Duration, on_sample: Option<Box<dyn Fn(Duration, u64) + Send>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let (rss, _) = rss_kb(pid);
                v.lock().expect("samples").push((t0.elapsed(), rss));
                if let Some(f) = &on_sample {
                    f(t0.elapsed(), rss);
                }
                let until = Instant::now() + every;
                while Instant::now() < until && !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Sampler { stop, samples, thread }
    }

    fn finish(self) -> Vec<(Duration, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        let v = self.samples.lock().expect("samples").clone();
        v
    }
}

/// Waits until the mock Heap has `n` events, or the deadline passes; returns when it got there.
fn wait_for_heap(heap: &HeapCounters, n: u64, deadline: Duration) -> Option<Instant> {
    let until = Instant::now() + deadline;
    loop {
        if heap.events.load(Ordering::SeqCst) >= n {
            return Some(Instant::now());
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The table

struct Row {
    name: String,
    body_bytes: usize,
    events_per_req: u64,
    base: LoadResult,
    relay: LoadResult,
    delivered: u64,
    expected: u64,
    e2e: Option<Duration>,
    drain_after_load: Option<Duration>,
    heap_requests: u64,
    peak_rss_kb: u64,
    final_rss_kb: u64,
    store_bytes: u64,
    /// Relay CPU time (all threads, user + system) during the measured load phase.
    relay_cpu: Duration,
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | body B | ev/req | baseline req/s | relay req/s | ratio | relay ev/s | p50 ms | p99 ms | p99.9 ms | \
         baseline p99 ms | non-202 | e2e s | delivery ev/s | Heap reqs | ev/Heap req | drain after load s | \
         peak RSS MB | final RSS MB | store MB per 1M ev | relay CPU µs/req |"
    );
    println!("|{}", "---|".repeat(21));
    for r in rows {
        let e2e = r.e2e.map_or("timeout".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
        let drain = r.drain_after_load.map_or("timeout".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
        let delivery = r.e2e.map_or(format!("{} of {}", r.delivered, r.expected), |d| {
            format!("{:.0}", r.delivered as f64 / d.as_secs_f64())
        });
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {:.0} | \
             {} | {:.1} | {:.1} | {:.0} | {:.0} |",
            r.name,
            r.body_bytes,
            r.events_per_req,
            r.base.rps(),
            r.relay.rps(),
            r.relay.rps() / r.base.rps(),
            r.relay.rps() * r.events_per_req as f64,
            r.relay.ms(0.5),
            r.relay.ms(0.99),
            r.relay.ms(0.999),
            r.base.ms(0.99),
            r.relay.failed + r.base.failed,
            e2e,
            delivery,
            r.heap_requests,
            r.delivered as f64 / r.heap_requests.max(1) as f64,
            drain,
            mb(r.peak_rss_kb),
            mb(r.final_rss_kb),
            r.store_bytes as f64 / (1024.0 * 1024.0) * 1e6 / r.expected.max(1) as f64,
            r.relay_cpu.as_secs_f64() * 1e6 / (r.relay.ok + r.relay.failed).max(1) as f64,
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Runs

struct Args {
    secs: u64,
    scenario: Option<String>,
    soak: bool,
    soak_events: u64,
    /// Another relay binary (an older build) measured in the same run, against the same baseline.
    compare: Option<PathBuf>,
    /// Longest wait for Heap to receive everything after a scenario's load.
    drain_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        secs: 10,
        scenario: None,
        soak: false,
        soak_events: 1_000_000,
        compare: None,
        drain_secs: DRAIN_DEADLINE_SECS,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let next = argv.get(i + 1).cloned();
        match argv[i].as_str() {
            "--secs" => {
                a.secs = next.and_then(|v| v.parse().ok()).expect("--secs N");
                i += 1;
            }
            "--scenario" => {
                a.scenario = next;
                i += 1;
            }
            "--soak-events" => {
                a.soak_events = next.and_then(|v| v.parse().ok()).expect("--soak-events N");
                i += 1;
            }
            "--compare" => {
                a.compare = next.map(PathBuf::from);
                i += 1;
            }
            "--drain-secs" => {
                a.drain_secs = next.and_then(|v| v.parse().ok()).expect("--drain-secs N");
                i += 1;
            }
            "--soak" => a.soak = true,
            _ => {} // `cargo bench` passes --bench; anything else unknown is ignored.
        }
        i += 1;
    }
    a.secs = a.secs.clamp(1, 600);
    a
}

fn main() {
    let a = args();
    // The client runs on one thread, like `wrk -t1`; the servers under test get the rest of the machine.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let heap = Arc::new(HeapCounters::default());
    let (heap_port, heap_handle) = spawn_actix(1, Some(heap.clone()));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "heap-relay load harness: {} CPUs, {CONNECTIONS} connections, relay {} (rate budgets off: \
         HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE=0, ..._IDENTITY_EVENTS_PER_MINUTE=0)",
        cpus,
        env!("CARGO_BIN_EXE_heap-relay")
    );
    if a.soak {
        soak(&rt, &heap, heap_port, a.soak_events);
    } else {
        let mut bins = vec![("", PathBuf::from(env!("CARGO_BIN_EXE_heap-relay")))];
        if let Some(other) = &a.compare {
            bins.push((" (compare)", other.clone()));
        }
        let rows: Vec<Row> = scenarios()
            .into_iter()
            .filter(|s| a.scenario.as_deref().is_none_or(|n| n == s.name))
            .flat_map(|s| {
                run_scenario(
                    &rt,
                    &heap,
                    heap_port,
                    &s,
                    Duration::from_secs(a.secs),
                    Duration::from_secs(a.drain_secs),
                    &bins,
                )
            })
            .collect();
        print_table(&rows);
    }
    rt.block_on(heap_handle.stop(false));
}

fn run_scenario(
    rt: &tokio::runtime::Runtime,
    heap: &HeapCounters,
    heap_port: u16,
    s: &Scenario,
    secs: Duration,
    drain: Duration,
    bins: &[(&str, PathBuf)],
) -> Vec<Row> {
    let load = Load { duration: secs, max_requests: MAX_REQUESTS_PER_PHASE, per_connection_interval: None };
    let warm = Load { duration: WARMUP, ..load };
    eprintln!("[{}] baseline ({} s) ...", s.name, secs.as_secs());
    let (base_port, base_handle) = spawn_actix(cpus(), None);
    let base_url = format!("http://127.0.0.1:{base_port}{}", s.path);
    let base = rt.block_on(async {
        drive(&base_url, &s.body, 202, warm).await;
        drive(&base_url, &s.body, 202, load).await
    });
    rt.block_on(base_handle.stop(false));
    bins.iter()
        .map(|(label, bin)| {
            let name = format!("{}{label}", s.name);
            eprintln!("[{name}] relay ({} s) ...", secs.as_secs());
            heap.reset();
            let relay = Relay::start(bin, heap_port, &[]);
            let url = relay.url(s.path);
            let sampler = Sampler::start(relay.pid(), Duration::from_millis(200), None);
            let t0 = Instant::now();
            let (per_req, warm_res, res, relay_cpu) = rt.block_on(async {
                let per_req = probe(&url, &s.body).await;
                let w = drive(&url, &s.body, 202, warm).await;
                let cpu0 = cpu_time(relay.pid());
                let r = drive(&url, &s.body, 202, load).await;
                (per_req, w, r, cpu_time(relay.pid()).saturating_sub(cpu0))
            });
            let load_end = Instant::now();
            let expected = per_req * (1 + warm_res.ok + res.ok);
            eprintln!("[{name}] waiting for Heap to receive {expected} events ...");
            let done = wait_for_heap(heap, expected, drain);
            let samples = sampler.finish();
            let (final_rss, hwm) = rss_kb(relay.pid());
            let peak = samples.iter().map(|s| s.1).max().unwrap_or(0).max(hwm);
            let row = Row {
                name,
                body_bytes: s.body.len(),
                events_per_req: per_req,
                base: base.clone(),
                relay: res,
                delivered: heap.events.load(Ordering::SeqCst),
                expected,
                e2e: done.map(|d| d - t0),
                drain_after_load: done.map(|d| d - load_end),
                heap_requests: heap.requests.load(Ordering::SeqCst),
                peak_rss_kb: peak,
                final_rss_kb: final_rss,
                store_bytes: relay.store_bytes(),
                relay_cpu,
            };
            relay.stop();
            row
        })
        .collect()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One million events (by default) through the relay: a third at full speed with Heap answering 200, then a
/// minute of paced ingest while Heap answers 503, then the rest at full speed; RSS every 2 s; every event must
/// arrive.
fn soak(rt: &tokio::runtime::Runtime, heap: &Arc<HeapCounters>, heap_port: u16, total_events: u64) {
    let body = serde_json::to_vec(&clevertap_with(100)).expect("serialises");
    // Retries back off to at most 5 s here (default 600 s), so the backlog drains within the run after the outage.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_heap-relay"));
    let relay = Relay::start(&bin, heap_port, &[("HEAP_RELAY__DELIVERY__BACKOFF_MAX_SECS", "5")]);
    let url = relay.url("/hooks/clevertap");
    heap.reset();
    let phase = Arc::new(Mutex::new("normal"));
    let log: Arc<Mutex<Vec<(f64, &'static str, f64, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let (p, l, h) = (phase.clone(), log.clone(), heap.clone());
    let sampler = Sampler::start(
        relay.pid(),
        Duration::from_secs(2),
        Some(Box::new(move |t, rss| {
            let ph = *p.lock().expect("phase");
            let row = (t.as_secs_f64(), ph, mb(rss), h.events.load(Ordering::SeqCst), h.refused.load(Ordering::SeqCst));
            eprintln!(
                "  t={:>5.0}s {:<10} RSS {:>6.1} MB  Heap got {:>8} events, refused {} requests",
                row.0, row.1, row.2, row.3, row.4
            );
            l.lock().expect("log").push(row);
        })),
    );
    let per_req = rt.block_on(probe(&url, &body));
    let requests_total = total_events.div_ceil(per_req);
    let third = requests_total * 2 / 5;
    let outage_reqs = requests_total / 5;
    let t0 = Instant::now();
    let fast = |n: u64| Load { duration: Duration::from_secs(600), max_requests: n, per_connection_interval: None };
    let mut ok = 1u64; // the probe
    let mut failed = 0u64;
    let mut run = |load: Load| {
        let r = rt.block_on(drive(&url, &body, 202, load));
        ok += r.ok;
        failed += r.failed;
        r
    };
    eprintln!("soak: {total_events} events in {requests_total} requests of {per_req}; phase 1: Heap answers 200");
    run(fast(third));
    *phase.lock().expect("phase") = "heap-503";
    heap.failing.store(true, Ordering::SeqCst);
    eprintln!("soak: phase 2: Heap answers 503 for 60 s while ingest continues (paced)");
    let interval = Duration::from_secs_f64(60.0 * CONNECTIONS as f64 / outage_reqs.max(1) as f64);
    let outage = run(Load {
        duration: Duration::from_secs(60),
        max_requests: outage_reqs,
        per_connection_interval: Some(interval),
    });
    heap.failing.store(false, Ordering::SeqCst);
    *phase.lock().expect("phase") = "recovered";
    eprintln!("soak: phase 3: Heap answers 200 again");
    let rest = requests_total.saturating_sub(third + outage.ok + outage.failed + 1);
    run(fast(rest));
    *phase.lock().expect("phase") = "draining";
    let expected = ok * per_req;
    let done = wait_for_heap(heap, expected, Duration::from_secs(600));
    let samples = sampler.finish();
    let (final_rss, hwm) = rss_kb(relay.pid());
    let got = heap.events.load(Ordering::SeqCst);
    let store = relay.store_bytes();
    relay.stop();

    let log = log.lock().expect("log").clone();
    println!();
    println!("| t s | phase | RSS MB | events at Heap |");
    println!("|---|---|---|---|");
    for (t, ph, rss, ev, _) in &log {
        println!("| {t:.0} | {ph} | {rss:.1} | {ev} |");
    }
    let after_warmup: Vec<u64> = samples.iter().skip(samples.len() / 10).map(|s| s.1).collect();
    let (lo, hi) = (after_warmup.iter().copied().min().unwrap_or(0), after_warmup.iter().copied().max().unwrap_or(0));
    let outage_rss: Vec<f64> = log.iter().filter(|r| r.1 == "heap-503").map(|r| r.2).collect();
    println!();
    println!("accepted requests {ok} ({expected} events), failed requests {failed}");
    println!(
        "events at Heap {got} ({}), in {:.0} s; Heap refused {} requests during the outage",
        if got >= expected { "every event arrived" } else { "MISSING EVENTS" },
        done.map_or(f64::NAN, |d| (d - t0).as_secs_f64()),
        heap.refused.load(Ordering::SeqCst)
    );
    println!(
        "RSS: peak {:.1} MB (VmHWM), final {:.1} MB; after warm-up min {:.1} / max {:.1} MB (spread {:.0}%)",
        mb(hwm),
        mb(final_rss),
        mb(lo),
        mb(hi),
        (hi as f64 / lo.max(1) as f64 - 1.0) * 100.0
    );
    if let (Some(first), Some(last)) = (outage_rss.first(), outage_rss.last()) {
        println!("RSS while Heap answered 503: {first:.1} MB at the start, {last:.1} MB at the end");
    }
    println!(
        "store on disk {:.1} MB ({:.0} MB per 1M events)",
        store as f64 / 1048576.0,
        store as f64 / 1048576.0 * 1e6 / expected.max(1) as f64
    );
}
