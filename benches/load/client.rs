//! The load client: 32 keep-alive HTTP/1.1 connections on one thread, bounded by count and time, with a latency
//! histogram; and the waits on the mock Heap.

use crate::CONNECTIONS;
use crate::servers::HeapCounters;
use hdrhistogram::Histogram;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct LoadResult {
    /// Answers with the expected status.
    pub ok: u64,
    /// Other statuses and transport errors.
    pub failed: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Pacing for one phase: `None` sends as fast as each connection gets answers.
#[derive(Clone, Copy)]
pub struct Load {
    pub duration: Duration,
    pub max_requests: u64,
    /// Each connection sends at most one request per this interval.
    pub per_connection_interval: Option<Duration>,
}

pub use crate::bodies::FRESH;
/// The next number a request gets, across every phase of a run.
static NEXT_FRESH: AtomicU64 = AtomicU64::new(1);

/// Where `FRESH` occurs in `bytes`.
fn fresh_offsets(bytes: &[u8]) -> Vec<usize> {
    let marker = FRESH.as_bytes();
    (0..bytes.len().saturating_sub(marker.len() - 1)).filter(|&i| &bytes[i..i + marker.len()] == marker).collect()
}

/// The request with a fresh number written over every `FRESH` (same length, so Content-Length holds).
fn freshen(request: &[u8], offsets: &[usize], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(request);
    let n = format!("{:012}", NEXT_FRESH.fetch_add(1, Ordering::Relaxed) % 1_000_000_000_000);
    for &at in offsets {
        out[at..at + FRESH.len()].copy_from_slice(n.as_bytes());
    }
}

pub async fn drive(url: &str, body: &[u8], expect: u16, load: Load) -> LoadResult {
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
    let offsets: Arc<[usize]> = fresh_offsets(&request).into();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (addr, request, issued, offsets) = (addr.clone(), request.clone(), issued.clone(), offsets.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(request.len());
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
                freshen(&request, &offsets, &mut buf);
                let status = match conn.as_mut() {
                    Some(c) => c.round_trip(&buf).await,
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
pub async fn probe(url: &str, body: &[u8]) -> u64 {
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

pub fn wait_for_heap(heap: &HeapCounters, n: u64, deadline: Duration) -> Option<Instant> {
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
