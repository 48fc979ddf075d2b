//! The relay as a real process: killed with SIGKILL mid-load and restarted, or stopped with SIGTERM. Every
//! request that got a 202 is delivered.

use crate::helpers::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn start_relay(port: u16, heap: &str, dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_heap-relay"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HEAP_RELAY__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("HEAP_RELAY__SERVER__WORKERS", "2")
        .env("HEAP_RELAY__SERVER__SHUTDOWN_GRACE_SECS", "5")
        .env("HEAP_RELAY__HEAP__BASE_URL", heap)
        .env("HEAP_RELAY__HEAP__APP_ID", APP_ID)
        .env("HEAP_RELAY__STORE__PATH", dir.join("relay.db"))
        .env("HEAP_RELAY__DELIVERY__LEASE_SECS", "2")
        .env("HEAP_RELAY__DELIVERY__LINGER_MS", "5")
        .env("HEAP_RELAY__DELIVERY__POLL_INTERVAL_MS", "50")
        .env("HEAP_RELAY__DELIVERY__BACKOFF_BASE_MS", "50")
        .env("HEAP_RELAY__DELIVERY__BACKOFF_MAX_SECS", "1")
        .env("HEAP_RELAY__DELIVERY__APP_EVENTS_PER_MINUTE", "0")
        .env("HEAP_RELAY__DELIVERY__IDENTITY_EVENTS_PER_MINUTE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the relay binary starts")
}

async fn wait_healthy(client: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the relay did not come up on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn body(first: usize, n: usize) -> Value {
    let events: Vec<Value> = (first..first + n)
        .map(|i| {
            json!({"identity": format!("user-{}", i % 97), "event": "Crash Load", "idempotency_key": format!("k-{i}"),
                        "properties": {"i": i}})
        })
        .collect();
    json!({"app_id": APP_ID, "events": events})
}

/// Events Heap received, by idempotency key, with every body seen for that key.
async fn received(heap: &MockServer) -> HashMap<String, Vec<Value>> {
    let mut by_key: HashMap<String, Vec<Value>> = HashMap::new();
    for r in heap.received_requests().await.unwrap_or_default() {
        let Ok(v) = serde_json::from_slice::<Value>(&r.body) else { continue };
        for e in v["events"].as_array().cloned().unwrap_or_default() {
            if let Some(k) = e["idempotency_key"].as_str() {
                by_key.entry(k.to_owned()).or_default().push(e);
            }
        }
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_two_sigkills_mid_load() {
    let heap = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(30)))
        .mount(&heap)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut relay = start_relay(port, &heap.uri(), dir.path());
    wait_healthy(&client, port).await;

    let acked: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(Mutex::new(0usize));
    let stop_at = Instant::now() + Duration::from_secs(40);
    let total_events = 6000;
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (client, acked, next) = (client.clone(), acked.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let first = {
                        let mut n = next.lock().unwrap();
                        if *n >= total_events || Instant::now() > stop_at {
                            return;
                        }
                        *n += 25;
                        *n - 25
                    };
                    let resp =
                        client.post(format!("http://127.0.0.1:{port}/api/track")).json(&body(first, 25)).send().await;
                    match resp {
                        Ok(r) if r.status() == 202 => {
                            acked.lock().unwrap().extend((first..first + 25).map(|i| format!("k-{i}")));
                        }
                        // Refused or cut off by the kill: not acknowledged, so not promised.
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();

    for kill_after in [1500, 3500] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < kill_after {
            assert!(Instant::now() < deadline, "load stalled at {} acknowledged events", acked.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        relay.kill().expect("SIGKILL"); // std's kill() sends SIGKILL on Unix
        relay.wait().expect("reaped");
        relay = start_relay(port, &heap.uri(), dir.path());
        wait_healthy(&client, port).await;
    }
    for l in loaders {
        l.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 3500, "the load ran: {} acknowledged", acked.len());

    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = received(&heap).await;
        if acked.iter().all(|k| got.contains_key(k)) {
            break got;
        }
        let missing = acked.iter().filter(|k| !got.contains_key(*k)).count();
        assert!(Instant::now() < deadline, "{missing} acknowledged events never reached Heap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (key, copies) in &got {
        assert!(copies.windows(2).all(|w| w[0] == w[1]), "a duplicate of {key} differs from the original: {copies:?}");
    }
    // Work the killed processes had claimed is taken over when their leases expire: the queue drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics =
            client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l == "heap_relay_queue_depth 0") {
            break;
        }
        assert!(Instant::now() < deadline, "events stayed queued after the restarts:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.kill().ok();
    relay.wait().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_relay_within_its_grace_and_queued_events_are_delivered_after_restart() {
    let heap = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&heap).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = crate::helpers::test_client();
    let mut relay = start_relay(port, &heap.uri(), dir.path());
    wait_healthy(&client, port).await;
    let resp = client.post(format!("http://127.0.0.1:{port}/api/track")).json(&body(0, 50)).send().await.unwrap();
    assert_eq!(resp.status(), 202);

    let term = Command::new("kill").args(["-TERM", &relay.id().to_string()]).status().expect("kill runs");
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = relay.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the relay did not stop within its grace after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");

    heap.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&heap).await;
    let mut relay = start_relay(port, &heap.uri(), dir.path());
    wait_healthy(&client, port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while received(&heap).await.len() < 50 {
        assert!(Instant::now() < deadline, "queued events were not delivered after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill().ok();
    relay.wait().ok();
}
