//! Load harness: starts a bare actix-web baseline, the release relay binary (a child process, so its RSS can be
//! read from /proc) and a mock Heap, all on 127.0.0.1, drives each scenario from an in-process HTTP client with 32
//! connections (bounded in count and time), and prints one table. `-- --soak` runs the million-event soak instead.
//!
//! Run: `cargo bench --bench load` (see docs/benchmarks.md). Options after `--`: `--secs N` (measured seconds per
//! phase, default 10), `--scenario NAME` (run one), `--compare PATH` (also measure another relay binary, e.g. an
//! older build, against the same baseline), `--drain-secs N` (longest wait for delivery after the load, default
//! 240), `--soak`, `--soak-events N` (default 1,000,000). The relay inherits this process's environment, so
//! `HEAP_RELAY__...` variables set for the bench reach it (the harness's own settings win).

mod bodies;
mod client;
mod relay;
mod servers;

use bodies::{Scenario, clevertap_with, scenarios};
use client::{Load, LoadResult, drive, probe, wait_for_heap};
use relay::{Relay, Sampler, cpu_time, mb, rss_kb};
use servers::{HeapCounters, spawn_actix};
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
const DRAIN_DEADLINE_SECS: u64 = 240;
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
         HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE=0, ..._IDENTITY_EVENTS_PER_MINUTE=0, sources.*.requests_per_minute=0)",
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
