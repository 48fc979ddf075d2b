//! Servers in the bench process, each on its own actix system thread: the mock Heap (counts events, can answer
//! 503) and the baseline (reads the body, answers 202, nothing else).

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct HeapCounters {
    pub events: AtomicU64,
    pub requests: AtomicU64,
    /// Requests answered 503 while `failing`.
    pub refused: AtomicU64,
    pub failing: AtomicBool,
}

impl HeapCounters {
    pub fn reset(&self) {
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

/// The baseline: accepts the same body on any path (the relay's routes included) and answers 202, doing nothing
/// else.
async fn baseline(body: web::Bytes) -> HttpResponse {
    std::hint::black_box(body.len());
    HttpResponse::Accepted().finish()
}

pub fn spawn_actix(workers: usize, counters: Option<Arc<HeapCounters>>) -> (u16, actix_web::dev::ServerHandle) {
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
                    App::new().app_data(web::PayloadConfig::new(5 << 20)).default_service(web::to(baseline))
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

/// One request body waiting for a minimal writer's commit.
pub type Pending = (web::Bytes, tokio::sync::oneshot::Sender<bool>);

/// The durable reference: actix reads the body, one SQLite writer thread (WAL, `synchronous=FULL`) appends every
/// waiting body to one table in one transaction (group commit), and the 202 follows the commit. What any durable
/// relay on this machine's disk costs at least; the relay does this plus parsing, rendering and validation.
pub fn spawn_minimal_writer(workers: usize, dir: &std::path::Path) -> (u16, actix_web::dev::ServerHandle) {
    spawn_minimal_writer_storing(workers, dir, Stored::Whole)
}

/// What a minimal writer stores of each body.
#[derive(Clone, Copy, Debug)]
pub enum Stored {
    /// The body as received.
    Whole,
    /// Only its first bytes: the "300 bytes instead of the whole body" reference, the floor for a durable
    /// writer that stores next to nothing per request.
    First(usize),
    /// The body parsed as JSON (answered 400 when it is not) and stored zstd-compressed at the relay's level, on
    /// the HTTP workers: the least a relay that keeps each raw body compressed does, before any rendering.
    ParsedCompressed,
}

pub fn spawn_minimal_writer_storing(
    workers: usize,
    dir: &std::path::Path,
    stored: Stored,
) -> (u16, actix_web::dev::ServerHandle) {
    let conn = rusqlite::Connection::open(dir.join("minimal.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "FULL").expect("full");
    conn.execute_batch("CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .expect("table");
    let (tx, rx) = std::sync::mpsc::sync_channel::<Pending>(4096);
    std::thread::spawn(move || {
        let mut conn = conn;
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while let Ok(p) = rx.try_recv() {
                group.push(p);
            }
            let t = conn.transaction().expect("begin");
            {
                let mut ins = t.prepare_cached("INSERT INTO bodies (body) VALUES (?1)").expect("prepare");
                for (body, _) in &group {
                    let keep = match stored {
                        Stored::First(n) => n.min(body.len()),
                        Stored::Whole | Stored::ParsedCompressed => body.len(),
                    };
                    ins.execute([&body[..keep]]).expect("insert");
                }
            }
            let ok = t.commit().is_ok();
            for (_, reply) in group {
                let _ = reply.send(ok);
            }
        }
    });
    spawn_commit_front(workers, tx, matches!(stored, Stored::ParsedCompressed))
}

/// The HTTP side of a durable reference server: reads each body, hands it to the writer behind `tx` with a reply
/// channel, and answers 202 once the writer says its commit holds the body (503 if it failed or is gone).
/// With `parse_and_compress`, each body is parsed as JSON (400 when it is not) and handed to the writer
/// zstd-compressed, that work done on the HTTP workers as the relay does it.
pub fn spawn_commit_front(
    workers: usize,
    tx: std::sync::mpsc::SyncSender<Pending>,
    parse_and_compress: bool,
) -> (u16, actix_web::dev::ServerHandle) {
    let (ptx, prx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            let port = listener.local_addr().expect("local addr").port();
            let data = web::Data::new(tx);
            let server = HttpServer::new(move || {
                App::new().app_data(data.clone()).app_data(web::PayloadConfig::new(5 << 20)).default_service(web::to(
                    move |body: web::Bytes, w: web::Data<std::sync::mpsc::SyncSender<Pending>>| async move {
                        let body = if parse_and_compress {
                            if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                                return HttpResponse::BadRequest().finish();
                            }
                            match zstd::bulk::compress(&body, -1) {
                                Ok(z) => web::Bytes::from(z),
                                Err(_) => return HttpResponse::InternalServerError().finish(),
                            }
                        } else {
                            body
                        };
                        let (reply, done) = tokio::sync::oneshot::channel();
                        if w.send((body, reply)).is_err() {
                            return HttpResponse::ServiceUnavailable().finish();
                        }
                        match done.await {
                            Ok(true) => HttpResponse::Accepted().finish(),
                            _ => HttpResponse::ServiceUnavailable().finish(),
                        }
                    },
                ))
            })
            .workers(workers)
            .disable_signals()
            .listen(listener)
            .expect("listen")
            .run();
            ptx.send((port, server.handle())).expect("report port");
            let _ = server.await;
        })
    });
    prx.recv().expect("server thread started")
}
