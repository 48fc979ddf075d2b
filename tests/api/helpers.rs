//! Shared test helpers: start the real server on a free port against a mock Heap on loopback, post bodies, and
//! wait (with a deadline) for what Heap received.

use heap_relay::settings::Settings;
use heap_relay::startup::Application;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const APP_ID: &str = "1234567890";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixtures are JSON")
}

pub fn repo_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}

/// Settings for a test: a fresh store in a temp dir, port 0, fast delivery timings, Heap at `heap_uri`.
pub fn test_settings(dir: &Path, heap_uri: &str) -> Settings {
    let mut s = Settings::defaults();
    s.server.bind = "127.0.0.1:0".into();
    s.server.workers = 2;
    s.server.shutdown_grace_secs = 2;
    s.heap.base_url = heap_uri.to_owned();
    s.heap.app_id = APP_ID.into();
    s.heap.request_timeout_secs = 5;
    s.templates.dir = repo_templates();
    s.templates.reload_interval_secs = 0;
    s.store.path = dir.join("relay.db");
    s.delivery.workers = 1;
    s.delivery.linger_ms = 5;
    s.delivery.poll_interval_ms = 20;
    s.delivery.backoff_base_ms = 50;
    // Retry-After is capped at backoff_max_secs; 2 lets the delivery tests' Retry-After: 2 be honoured whole.
    s.delivery.backoff_max_secs = 2;
    s.admin.token = ADMIN_TOKEN.to_owned().into();
    s
}

pub struct TestApp {
    pub address: String,
    pub heap: MockServer,
    pub client: reqwest::Client,
    pub app: heap_relay::routes::AppState,
    /// Holds the store; deleted when the test ends.
    pub _dir: TempDir,
}

/// The relay on its defaults (test timings) against a mock Heap answering 200.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// As `spawn_app`, after `tweak` adjusted the settings.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    heap_relay::telemetry::init_for_tests();
    let heap = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).with_priority(10).mount(&heap).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path(), &heap.uri());
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("the relay starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    tokio::spawn(app.run_until_stopped());
    TestApp { address, heap, client: test_client(), app: state, _dir: dir }
}

/// The tests' HTTP client. Idle connections are dropped after 2 s, before the relay's keep-alive (5 s) closes
/// them: reusing one the server is closing at that instant fails with `IncompleteMessage` (seen once in CI).
pub fn test_client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2)).build().expect("HTTP client")
}

/// A templates directory holding the shipped templates plus `extra` (path under templates/, content).
pub fn templates_with(extra: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&repo_templates(), dir.path());
    for (rel, content) in extra {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(p, content).expect("write template");
    }
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// One call Heap received.
#[derive(Debug, Clone)]
pub struct HeapCall {
    pub path: String,
    pub body: Value,
}

impl TestApp {
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_hook(&self, source: &str, body: &Value) -> reqwest::Response {
        self.post(&format!("/hooks/{source}"), body.to_string()).await
    }

    pub async fn post_hook_template(&self, source: &str, template: &str, body: &Value) -> reqwest::Response {
        self.post(&format!("/hooks/{source}/{template}"), body.to_string()).await
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.address)).bearer_auth(ADMIN_TOKEN).send().await.expect("request sent")
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Every call Heap has received so far, in order.
    pub async fn heap_calls(&self) -> Vec<HeapCall> {
        self.heap
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| HeapCall {
                path: r.url.path().to_owned(),
                body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            })
            .collect()
    }

    /// Waits until Heap has received at least `n` items (events and users, across bulk calls) and returns every
    /// item with the path it went to; fails with what did arrive when the deadline passes.
    pub async fn wait_for_heap(&self, n: usize, within: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + within;
        loop {
            let items = items_of(&self.heap_calls().await);
            if items.len() >= n {
                return items;
            }
            if Instant::now() > deadline {
                panic!("Heap received {} of {n} items within {within:?}:\n{items:#?}", items.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the stored event `id` has `status` (as the delivery log lists it), or fails with the status it
    /// has when the deadline passes.
    pub async fn wait_for_status(&self, id: &str, status: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.app.intake.store.get(id).await.expect("get").status;
            if now == status {
                return;
            }
            assert!(Instant::now() < deadline, "event {id} is {now}, not {status}, after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the queue to drain (nothing pending or retrying), then returns what Heap received.
    pub async fn wait_until_idle(&self, within: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.app.intake.store.stats().await.expect("stats");
            if stats.ready_or_waiting == 0 {
                return items_of(&self.heap_calls().await);
            }
            if Instant::now() > deadline {
                panic!("{} events still queued after {within:?}", stats.ready_or_waiting);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/metrics` holds `line` (e.g. a counter reaching a value).
    pub async fn wait_for_metric(&self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let text = self.client.get(format!("{}/metrics", self.address)).send().await.expect("metrics").text().await;
            let text = text.unwrap_or_default();
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(Instant::now() < deadline, "/metrics never showed {line:?} within {within:?}:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Flattens bulk calls into (path, item-with-app_id) pairs.
pub fn items_of(calls: &[HeapCall]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for c in calls {
        let app_id = c.body.get("app_id").cloned().unwrap_or(Value::Null);
        let list = c.body.get("events").or_else(|| c.body.get("users"));
        match list.and_then(Value::as_array) {
            Some(items) => {
                for item in items {
                    let mut item = item.clone();
                    item["app_id"] = app_id.clone();
                    out.push((c.path.clone(), item));
                }
            }
            None => out.push((c.path.clone(), c.body.clone())),
        }
    }
    out
}

pub async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// A free loopback port (bound, read and released).
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The relay as a process of its own, for tests that read its memory (peak RSS only grows, so one process per
/// memory test) or its log. Loopback only; killed when dropped. Its log goes to a file in its temp dir.
pub struct RelayProcess {
    pub child: std::process::Child,
    pub address: String,
    pub dir: TempDir,
}

impl RelayProcess {
    /// Starts the relay binary against `heap_uri` with the test timings plus `env` (HEAP_RELAY__... pairs), and
    /// waits (deadline 20 s) until /healthz answers.
    pub async fn start(heap_uri: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_loopback_port();
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_heap-relay"));
        cmd.arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HEAP_RELAY__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("HEAP_RELAY__SERVER__WORKERS", "2")
            .env("HEAP_RELAY__SERVER__SHUTDOWN_GRACE_SECS", "1")
            .env("HEAP_RELAY__HEAP__BASE_URL", heap_uri)
            .env("HEAP_RELAY__HEAP__APP_ID", APP_ID)
            .env("HEAP_RELAY__STORE__PATH", dir.path().join("relay.db"))
            .env("HEAP_RELAY__TEMPLATES__RELOAD_INTERVAL_SECS", "0")
            .env("HEAP_RELAY__DELIVERY__LINGER_MS", "5")
            .env("HEAP_RELAY__DELIVERY__POLL_INTERVAL_MS", "50")
            .env("HEAP_RELAY__DELIVERY__BACKOFF_BASE_MS", "50")
            .env("HEAP_RELAY__DELIVERY__BACKOFF_MAX_SECS", "1")
            .env("HEAP_RELAY__LOG__FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::from(log.try_clone().expect("log file")))
            .stderr(std::process::Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the relay binary starts");
        let relay = Self { child, address: format!("http://127.0.0.1:{port}"), dir };
        let client = crate::helpers::test_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.get(format!("{}/healthz", relay.address)).send().await.is_err() {
            assert!(Instant::now() < deadline, "the relay did not come up:\n{}", relay.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay
    }

    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/<pid>/status"))
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_kib("VmHWM:") as f64 / 1024.0
    }

    /// Resident memory now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_kib("VmRSS:") as f64 / 1024.0
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Userpilot signature header value: `t=<t>,v1=<hex HMAC-SHA256 of body + "." + t>`.
pub fn userpilot_signature(secret: &str, body: &[u8], t: i64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.update(b".");
    mac.update(t.to_string().as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}
