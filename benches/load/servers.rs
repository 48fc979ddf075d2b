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
