//! Load harness: starts a bare actix-web baseline, the release relay binary (a child process, so its RSS can be
//! read from /proc) and a mock Heap, all on 127.0.0.1, drives each scenario from an in-process HTTP client with 32
//! connections (bounded in count and time), and prints one table. The relay runs on the shipped `config.toml`
//! (rate budgets on); every request carries fresh identities, so the relay's dedupe of retries never answers the
//! load. `-- --backlog` measures ingest and idle cost with a million events held back by the budgets, then delivery
//! of that backlog with the budgets off; `-- --soak` runs the million-event soak.
//!
//! Run: `cargo bench --bench load` (see docs/benchmarks.md). Options after `--`: `--secs N` (measured seconds per
//! phase, default 10), `--scenario NAME` (run one), `--compare PATH` (also measure another relay binary, e.g. an
//! older build, against the same baseline), `--drain-secs N` (longest wait for delivery after the load, default
//! 240), `--soak`, `--soak-events N` (default 1,000,000), `--floor` (what durable ingest can reach on this machine:
//! bare actix, the minimal durable writer storing the whole body, 300 bytes of it, and the body parsed and
//! compressed, then the relay; twice, interleaved). The relay inherits this process's environment, so
//! `HEAP_RELAY__...` variables set for the bench reach it (the harness's own settings win).

mod bodies;
mod client;
mod relay;
mod servers;

use bodies::{Scenario, clevertap_with, scenarios};
use client::{Load, LoadResult, drive, probe, wait_for_heap};
use relay::{Relay, Sampler, cpu_time, mb, rss_kb, write_bytes};
use servers::{HeapCounters, Stored, spawn_actix, spawn_minimal_writer, spawn_minimal_writer_storing};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 32;
const APP_ID: &str = "1234567890";
/// No phase sends more than this many requests, whatever its duration.
const MAX_REQUESTS_PER_PHASE: u64 = 3_000_000;
const WARMUP: Duration = Duration::from_secs(1);
/// How long to wait, by default, for the mock Heap to receive every accepted event after a scenario's load ends.
/// Short: on the shipped config the rate budgets (not the relay) bound delivery, so the table shows how much
/// arrived and that it stayed within the budget.
const DRAIN_DEADLINE_SECS: u64 = 10;
/// The shipped budgets (config.toml): events per minute per app_id; a bucket that starts full.
const APP_BUDGET_PER_MIN: f64 = 15_000.0;
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
    /// Bytes the relay wrote to storage during the measured load phase.
    written: u64,
    /// Heap never got more than the app budget allows since the relay started (bucket + rate x elapsed).
    within_budget: bool,
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | body B | ev/req | baseline req/s | relay req/s | ratio | relay ev/s | p50 ms | p99 ms | p99.9 ms | \
         baseline p99 ms | non-202 | e2e s | delivery ev/s | Heap reqs | ev/Heap req | drain after load s | \
         peak RSS MB | final RSS MB | store MB per 1M ev | relay CPU µs/req | bytes written per ev | Heap within budget |"
    );
    println!("|{}", "---|".repeat(23));
    for r in rows {
        let e2e = r.e2e.map_or("timeout".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
        let drain = r.drain_after_load.map_or("timeout".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
        let delivery = r.e2e.map_or(format!("{} of {}", r.delivered, r.expected), |d| {
            format!("{:.0}", r.delivered as f64 / d.as_secs_f64())
        });
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {:.0} | \
             {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
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
            r.written as f64 / (r.relay.ok * r.events_per_req).max(1) as f64,
            if r.within_budget { "yes" } else { "NO" },
        );
    }
}

// Runs

struct Args {
    secs: u64,
    scenario: Option<String>,
    soak: bool,
    soak_events: u64,
    backlog: bool,
    backlog_events: u64,
    /// The floors: bare actix and three minimal durable writers beside the relay (`floor`).
    floor: bool,
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
        backlog: false,
        backlog_events: 1_000_000,
        floor: false,
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
            "--backlog" => a.backlog = true,
            "--floor" => a.floor = true,
            "--backlog-events" => {
                a.backlog_events = next.and_then(|v| v.parse().ok()).expect("--backlog-events N");
                i += 1;
            }
            _ => {} // `cargo bench` passes --bench; anything else unknown is ignored.
        }
        i += 1;
    }
    a.secs = a.secs.clamp(1, 600);
    a
}

fn main() {
    let a = args();
    check_cpu_time();
    // The client runs on one thread, like `wrk -t1`; the servers under test get the rest of the machine.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let heap = Arc::new(HeapCounters::default());
    let (heap_port, heap_handle) = spawn_actix(1, Some(heap.clone()));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "heap-relay load harness: {} CPUs, {CONNECTIONS} connections, relay {} on the shipped config.toml \
         (rate budgets on; fresh identities in every request)",
        cpus,
        env!("CARGO_BIN_EXE_heap-relay")
    );
    if a.floor {
        floor(&rt, heap_port, Duration::from_secs(a.secs));
    } else if a.backlog {
        backlog(&rt, &heap, heap_port, Duration::from_secs(a.secs), a.backlog_events);
    } else if a.soak {
        // The shipped config first (its rate budgets deliver 250 events/s, so the drain is cut short and what is left
        // is reported as held), then with the budgets off, where every event must arrive within the run.
        soak(&rt, &heap, heap_port, a.soak_events, false);
        soak(&rt, &heap, heap_port, a.soak_events, true);
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
            let (per_req, warm_res, res, relay_cpu, written) = rt.block_on(async {
                let per_req = probe(&url, &s.body).await;
                let w = drive(&url, &s.body, 202, warm).await;
                let (cpu0, w0) = (cpu_time(relay.pid()), write_bytes(relay.pid()));
                let r = drive(&url, &s.body, 202, load).await;
                (per_req, w, r, cpu_time(relay.pid()).saturating_sub(cpu0), write_bytes(relay.pid()).saturating_sub(w0))
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
                written,
                within_budget: within_budget(heap, t0),
            };
            relay.stop();
            row
        })
        .collect()
}

/// Whether the mock Heap got no more than one app_id's budget allows since `since`: a full bucket plus the rate.
fn within_budget(heap: &HeapCounters, since: Instant) -> bool {
    let allowed = APP_BUDGET_PER_MIN + APP_BUDGET_PER_MIN / 60.0 * since.elapsed().as_secs_f64();
    heap.events.load(Ordering::SeqCst) as f64 <= allowed
}

/// What durable ingest can reach on this machine at all, in one run: bare actix; the minimal durable writer storing
/// the whole 2-profile body, 300 bytes of it (the two references), and the body parsed and zstd-compressed
/// (the least the ingest log stores); then the relay, each driven the same way. Each is measured twice,
/// interleaved, so that a drift of the machine shows as a spread.
fn floor(rt: &tokio::runtime::Runtime, heap_port: u16, secs: Duration) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_heap-relay"));
    let small = serde_json::to_vec(&clevertap_with(2)).expect("serialises");
    let load = Load { duration: secs, max_requests: MAX_REQUESTS_PER_PHASE, per_connection_interval: None };
    let warm = Load { duration: WARMUP, ..load };
    let drive_url = |url: &str| {
        rt.block_on(async {
            drive(url, &small, 202, warm).await;
            drive(url, &small, 202, load).await
        })
    };
    // (row name, what is measured): `None` is bare actix, `Some(Stored)` a minimal writer; the relay comes last.
    let servers: [(&str, Option<Stored>); 4] = [
        ("bare actix, answers 202", None),
        ("minimal durable writer, whole body", Some(Stored::Whole)),
        ("minimal durable writer, 300 bytes of the body", Some(Stored::First(300))),
        (
            "minimal durable writer, body parsed and stored zstd-compressed (the relay's raw body, nothing rendered)",
            Some(Stored::ParsedCompressed),
        ),
    ];
    let relay_name = "heap-relay, shipped config";
    let names: Vec<&str> = servers.iter().map(|(n, _)| *n).chain([relay_name]).collect();
    let mut results: Vec<Vec<LoadResult>> = vec![Vec::new(); names.len()];
    for round in 0..2 {
        for (i, name) in names.iter().enumerate() {
            eprintln!("[floor] {name}, round {} ({} s) ...", round + 1, secs.as_secs());
            let r = match servers.get(i).map(|(_, stored)| *stored) {
                Some(None) => {
                    let (port, handle) = spawn_actix(cpus(), None);
                    let r = drive_url(&format!("http://127.0.0.1:{port}/hooks/clevertap"));
                    rt.block_on(handle.stop(false));
                    r
                }
                Some(Some(stored)) => {
                    let scratch = tempfile::Builder::new()
                        .prefix("minimal-writer-")
                        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                        .expect("temp dir");
                    let (port, handle) = spawn_minimal_writer_storing(cpus(), scratch.path(), stored);
                    let r = drive_url(&format!("http://127.0.0.1:{port}/hooks/clevertap"));
                    rt.block_on(handle.stop(false));
                    r
                }
                None => {
                    let relay = Relay::start(&bin, heap_port, &[]);
                    let r = drive_url(&relay.url("/hooks/clevertap"));
                    relay.stop();
                    r
                }
            };
            results[i].push(r);
        }
    }
    println!();
    println!(
        "| server (2-profile CleverTap body, fresh identities) | req/s, round 1 / 2 | p99 ms, round 1 / 2 | ratio to bare actix of the same round |"
    );
    println!("|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let r = &results[i];
        println!(
            "| {name} | {:.0} / {:.0} | {:.1} / {:.1} | {:.3} / {:.3} |",
            r[0].rps(),
            r[1].rps(),
            r[0].ms(0.99),
            r[1].ms(0.99),
            r[0].rps() / results[0][0].rps(),
            r[1].rps() / results[0][1].rps()
        );
    }
}

/// Ingest and idle cost with a backlog held back by the shipped budgets, then delivery of it with the budgets off.
/// Every figure is printed beside its same-run reference.
fn backlog(rt: &tokio::runtime::Runtime, heap: &Arc<HeapCounters>, heap_port: u16, secs: Duration, events: u64) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_heap-relay"));
    let small = serde_json::to_vec(&clevertap_with(2)).expect("serialises");
    let big = serde_json::to_vec(&clevertap_with(100)).expect("serialises");
    let load = Load { duration: secs, max_requests: MAX_REQUESTS_PER_PHASE, per_connection_interval: None };
    let warm = Load { duration: WARMUP, ..load };

    eprintln!("[backlog] baseline ({} s) ...", secs.as_secs());
    let (base_port, base_handle) = spawn_actix(cpus(), None);
    let base_url = format!("http://127.0.0.1:{base_port}/hooks/clevertap");
    let base = rt.block_on(async {
        drive(&base_url, &small, 202, warm).await;
        drive(&base_url, &small, 202, load).await
    });
    rt.block_on(base_handle.stop(false));
    eprintln!("[backlog] minimal durable writer ({} s) ...", secs.as_secs());
    let scratch =
        tempfile::Builder::new().prefix("minimal-writer-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let (min_port, min_handle) = spawn_minimal_writer(cpus(), scratch.path());
    let min_url = format!("http://127.0.0.1:{min_port}/hooks/clevertap");
    let minimal = rt.block_on(async {
        drive(&min_url, &small, 202, warm).await;
        drive(&min_url, &small, 202, load).await
    });
    rt.block_on(min_handle.stop(false));

    heap.reset();
    let relay = Relay::start(&bin, heap_port, &[]);
    let t0 = Instant::now();
    let url = relay.url("/hooks/clevertap");
    eprintln!("[backlog] relay, empty queue ({} s) ...", secs.as_secs());
    let (empty, empty_written, per_small, warm1) = rt.block_on(async {
        let per = probe(&url, &small).await;
        let w = drive(&url, &small, 202, warm).await;
        let w0 = write_bytes(relay.pid());
        let r = drive(&url, &small, 202, load).await;
        (r, write_bytes(relay.pid()).saturating_sub(w0), per, w.ok)
    });
    let per_big = rt.block_on(probe(&url, &big));
    let requests = events.div_ceil(per_big);
    eprintln!("[backlog] filling: {requests} requests of {per_big} events ...");
    let fill_started = Instant::now();
    let fill = rt.block_on(drive(
        &url,
        &big,
        202,
        Load { duration: Duration::from_secs(900), max_requests: requests, per_connection_interval: None },
    ));
    let fill_secs = fill_started.elapsed().as_secs_f64();
    // Twice with the backlog held: right after the fill, while the operator views' index (SQLite's follower) is
    // still indexing the fill, and again once it has caught up (the backlog is still held then; only the fill's
    // one-time indexing is over).
    eprintln!("[backlog] relay with the backlog, right after the fill ({} s) ...", secs.as_secs());
    let (full, warm2) = rt.block_on(async {
        let w = drive(&url, &small, 202, warm).await;
        (drive(&url, &small, 202, load).await, w.ok)
    });
    // The index catches up with what was just ingested: work ingest caused, measured on its own.
    eprintln!("[backlog] waiting for the operator index to catch up ...");
    let (cpu_c0, catch_t0) = (cpu_time(relay.pid()), Instant::now());
    let catch_deadline = catch_t0 + Duration::from_secs(600);
    while relay.gauge("heap_relay_store_index_lag_entries").is_some_and(|lag| lag > 0.0)
        && Instant::now() < catch_deadline
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let catch_secs = catch_t0.elapsed().as_secs_f64();
    let catch_cpu = cpu_time(relay.pid()).saturating_sub(cpu_c0).as_secs_f64() / catch_secs;
    eprintln!("[backlog] relay with the backlog, index caught up ({} s) ...", secs.as_secs());
    let (settled, warm3) = rt.block_on(async {
        let w = drive(&url, &small, 202, warm).await;
        (drive(&url, &small, 202, load).await, w.ok)
    });
    while relay.gauge("heap_relay_store_index_lag_entries").is_some_and(|lag| lag > 0.0)
        && Instant::now() < catch_deadline
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    // Probes and warm-ups were accepted too: count what the relay said it took.
    let accepted = per_small * (1 + warm1 + empty.ok + warm2 + full.ok + warm3 + settled.ok) + per_big * (1 + fill.ok);
    // The empty-queue reference again, on a fresh relay beside this one: the machine's speed drifts over the minutes
    // the fill takes, and a ratio against a figure taken before the fill alone would count that drift as the
    // backlog's cost.
    eprintln!("[backlog] a fresh relay, empty queue, again ({} s) ...", secs.as_secs());
    let empty_after = {
        // A mock Heap of its own, so that what this relay delivers is not counted as the held relay's.
        let (other_heap, other_handle) = spawn_actix(1, Some(Arc::new(HeapCounters::default())));
        let fresh = Relay::start(&bin, other_heap, &[]);
        let fresh_url = fresh.url("/hooks/clevertap");
        let r = rt.block_on(async {
            drive(&fresh_url, &small, 202, warm).await;
            drive(&fresh_url, &small, 202, load).await
        });
        fresh.stop();
        rt.block_on(other_handle.stop(false));
        r
    };
    // Idle: no ingest; the relay holds the backlog and delivers at the budget's rate.
    std::thread::sleep(Duration::from_secs(2));
    let idle = secs.max(Duration::from_secs(10));
    eprintln!("[backlog] idle with the backlog ({} s) ...", idle.as_secs());
    let (cpu0, heap0, idle_t0) = (cpu_time(relay.pid()), heap.events.load(Ordering::SeqCst), Instant::now());
    std::thread::sleep(idle);
    let idle_cpu = cpu_time(relay.pid()).saturating_sub(cpu0).as_secs_f64() / idle_t0.elapsed().as_secs_f64();
    let idle_delivered = heap.events.load(Ordering::SeqCst) - heap0;
    let budget_ok = within_budget(heap, t0);
    let held_events = heap.events.load(Ordering::SeqCst);
    let store = relay.store_bytes();
    let (_, hwm) = rss_kb(relay.pid());

    eprintln!("[backlog] restart with budgets off; delivering {} events ...", accepted - held_events);
    let requests_before = heap.requests.load(Ordering::SeqCst);
    let relay = relay.restart(
        &bin,
        heap_port,
        &[
            ("HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE", "0"),
            ("HEAP_RELAY__DELIVERY__IDENTITY_EVENTS_PER_MINUTE", "0"),
        ],
    );
    let drain_t0 = Instant::now();
    let done = wait_for_heap(heap, accepted, Duration::from_secs(600));
    let drained = heap.events.load(Ordering::SeqCst) - held_events;
    let calls = heap.requests.load(Ordering::SeqCst) - requests_before;
    let drain_secs = done.map(|d| (d - drain_t0).as_secs_f64());
    relay.stop();

    println!();
    println!("| figure | value | same-run reference | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| ingest req/s, clevertap-2, empty queue (p99 {:.1} ms) | {:.0} | bare actix {:.0} (p99 {:.1} ms) | {:.3} |",
        empty.ms(0.99),
        empty.rps(),
        base.rps(),
        base.ms(0.99),
        empty.rps() / base.rps()
    );
    println!(
        "| minimal durable writer req/s (actix + one SQLite group-commit writer, whole body; p99 {:.1} ms) | {:.0} | bare actix {:.0} | {:.3} |",
        minimal.ms(0.99),
        minimal.rps(),
        base.rps(),
        minimal.rps() / base.rps()
    );
    println!(
        "| relay ingest, empty queue, beside the minimal durable writer | {:.0} | minimal writer {:.0} | {:.3} |",
        empty.rps(),
        minimal.rps(),
        empty.rps() / minimal.rps()
    );
    println!(
        "| ingest req/s, clevertap-2, {} events held back, right after the fill, the index still catching up (p99 {:.1} ms) | {:.0} | empty queue {:.0} | {:.3} |",
        accepted - held_events,
        full.ms(0.99),
        full.rps(),
        empty.rps(),
        full.rps() / empty.rps()
    );
    println!(
        "| ingest req/s, clevertap-2, {} events held back, the index caught up (p99 {:.1} ms) | {:.0} | empty queue {:.0} | {:.3} |",
        accepted - held_events,
        settled.ms(0.99),
        settled.rps(),
        empty.rps(),
        settled.rps() / empty.rps()
    );
    println!(
        "| ingest req/s, clevertap-2, empty queue, a fresh relay measured after the backlog rows (p99 {:.1} ms) | {:.0} | empty queue before {:.0} | {:.3} |",
        empty_after.ms(0.99),
        empty_after.rps(),
        empty.rps(),
        empty_after.rps() / empty.rps()
    );
    println!(
        "| the index caught up, against the empty queue before and after (mean) | {:.0} | {:.0} | {:.3} |",
        settled.rps(),
        (empty.rps() + empty_after.rps()) / 2.0,
        settled.rps() / ((empty.rps() + empty_after.rps()) / 2.0)
    );
    println!("| backlog fill, clevertap-100 (events/s) | {:.0} | - | - |", (fill.ok * per_big) as f64 / fill_secs);
    println!(
        "| operator index catching up after the fill (s; relay CPU, % of one core) | {:.1} ({:.1} %) | - | - |",
        catch_secs,
        catch_cpu * 100.0
    );
    println!(
        "| relay CPU while holding the backlog, no ingest (% of one core) | {:.2} | target < 2 | - |",
        idle_cpu * 100.0
    );
    println!(
        "| delivered while idle (events/s) | {:.0} | app budget {:.0}/s | {:.3} |",
        idle_delivered as f64 / idle.as_secs_f64(),
        APP_BUDGET_PER_MIN / 60.0,
        idle_delivered as f64 / idle.as_secs_f64() / (APP_BUDGET_PER_MIN / 60.0)
    );
    println!("| Heap got at most bucket + rate x elapsed | {} | - | - |", if budget_ok { "yes" } else { "NO" });
    println!(
        "| delivery from the backlog, budgets off (events/s) | {} | shipped budgets {:.0}/s | - |",
        drain_secs.map_or("timeout".into(), |s| format!("{:.0}", drained as f64 / s)),
        APP_BUDGET_PER_MIN / 60.0
    );
    println!(
        "| events per Heap call, budgets off | {:.0} | max_batch 1000 | - |",
        drained as f64 / calls.max(1) as f64
    );
    println!(
        "| bytes written per accepted event (clevertap-2, empty queue) | {:.0} | body {} B | - |",
        empty_written as f64 / (empty.ok * per_small).max(1) as f64,
        small.len()
    );
    println!("| store MB per 1M events | {:.0} | - | - |", store as f64 / 1048576.0 * 1e6 / accepted.max(1) as f64);
    println!("| relay peak RSS MB | {:.1} | - | - |", mb(hwm));
}

/// The CPU figures read `/proc/<pid>/stat`; a parse that picks the wrong fields reads system time alone and makes
/// the relay look several times cheaper than it is. Spinning 300 ms on this thread must show as about that much.
fn check_cpu_time() {
    let before = cpu_time(std::process::id());
    let spin = Instant::now();
    let mut x = 0u64;
    while spin.elapsed() < Duration::from_millis(300) {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    let used = cpu_time(std::process::id()).saturating_sub(before);
    assert!(used >= Duration::from_millis(200), "cpu_time reads {used:?} for 300 ms of spinning: fix its parse");
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One million events (by default) through the relay: a third at full speed with Heap answering 200, then a
/// minute of paced ingest while Heap answers 503, then the rest at full speed; RSS every 2 s; every event must
/// arrive (with `budgets_off`; on the shipped budgets, what they still hold after a minute of draining is reported).
fn soak(rt: &tokio::runtime::Runtime, heap: &Arc<HeapCounters>, heap_port: u16, total_events: u64, budgets_off: bool) {
    let body = serde_json::to_vec(&clevertap_with(100)).expect("serialises");
    // With `budgets_off`, retries back off to at most 5 s (default 600 s) and the rate budgets are off (the shipped
    // 15,000 events a minute would take over an hour to deliver a million; `--backlog` measures the budgets), so the
    // backlog drains within the run after the outage. On the shipped config the drain is cut after a minute.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_heap-relay"));
    let changed: &[(&str, &str)] = if budgets_off {
        &[
            ("HEAP_RELAY__DELIVERY__BACKOFF_MAX_SECS", "5"),
            ("HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE", "0"),
            ("HEAP_RELAY__DELIVERY__IDENTITY_EVENTS_PER_MINUTE", "0"),
        ]
    } else {
        &[]
    };
    println!();
    println!("soak: the shipped config.toml with {changed:?}");
    let relay = Relay::start(&bin, heap_port, changed);
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
    let done = wait_for_heap(heap, expected, Duration::from_secs(if budgets_off { 600 } else { 60 }));
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
    let arrival = match (got >= expected, budgets_off) {
        (true, _) => "every event arrived".to_owned(),
        (false, true) => "MISSING EVENTS".to_owned(),
        (false, false) => format!("{} still held by the rate budgets when the drain was cut", expected - got),
    };
    println!(
        "events at Heap {got} ({arrival}), in {:.0} s; Heap refused {} requests during the outage",
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
