//! A small WebDriver client for the console's browser tests: starts Debian's chromedriver on a free loopback port,
//! opens headless Chromium with a fresh profile at 1366×768, and speaks the W3C WebDriver protocol over HTTP
//! (reqwest). Screenshots go to `target/console-screenshots/<name>.png`.
//!
//! `scripts/test` installs `chromium` and `chromium-driver` when missing.

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

pub fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

impl Browser {
    pub async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the console's browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); \
             scripts/test installs them (apt-get install chromium chromium-driver)"
        );
        let port = super::helpers::free_loopback_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().build().expect("HTTP client");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await.ok();
            let ready = match ready {
                Some(r) => r.json::<Value>().await.ok().is_some_and(|v| v["value"]["ready"] == true),
                None => false,
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver was not ready on {base} within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1366,768".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
        } } });
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session sent")
            .json()
            .await
            .expect("new session answered");
        let id = resp["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {resp}"));
        let b = Browser { http, session: format!("{base}/session/{id}"), driver, _profile: profile };
        b.call("POST", "/window/rect", json!({"width": 1366, "height": 768})).await;
        b
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp: Value = req.send().await.expect("WebDriver call sent").json().await.expect("WebDriver answered");
        if let Some(err) = resp["value"]["error"].as_str() {
            panic!("WebDriver {method} {path}: {err}: {}", resp["value"]["message"]);
        }
        resp["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    pub async fn url(&self) -> String {
        self.call("GET", "/url", Value::Null).await.as_str().unwrap_or_default().to_owned()
    }

    async fn element(&self, css: &str) -> String {
        let v = self.call("POST", "/element", json!({"using": "css selector", "value": css})).await;
        v.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("an element reference").to_owned()
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.call("POST", &format!("/element/{e}/clear"), json!({})).await;
        self.call("POST", &format!("/element/{e}/value"), json!({ "text": text })).await;
    }

    pub async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call("POST", &format!("/element/{e}/click"), json!({})).await;
    }

    pub async fn exec(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        self.exec("return document.body.innerText").await.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the page (reloading itself or not) shows `text`.
    pub async fn wait_for_text(&self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let page = self.text().await;
            if page.contains(text) {
                return page;
            }
            assert!(Instant::now() < deadline, "the page never showed {text:?} within {within:?}; it shows:\n{page}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the page fits the window's width (no horizontal scrolling).
    pub async fn fits_width(&self) -> (bool, Value) {
        let v = self
            .exec("return [document.documentElement.scrollWidth, document.documentElement.clientWidth, window.innerWidth]")
            .await;
        let fits = v[0].as_i64().unwrap_or(i64::MAX) <= v[1].as_i64().unwrap_or(0);
        (fits, v)
    }

    pub async fn assert_fits_width(&self, page: &str) {
        let (fits, sizes) = self.fits_width().await;
        assert!(fits, "{page} scrolls horizontally at 1366x768: [scrollWidth, clientWidth, innerWidth] = {sizes}");
    }

    pub async fn cookies(&self) -> Vec<Value> {
        self.call("GET", "/cookie", Value::Null).await.as_array().cloned().unwrap_or_default()
    }

    /// Saves a PNG of the window as `target/console-screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let data = self.call("GET", "/screenshot", Value::Null).await;
        let png =
            base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap_or_default()).expect("base64 PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        path
    }

    /// Ends the session (Chromium exits) and stops chromedriver.
    pub async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
        // Drop stops chromedriver (its DELETE of the ended session is answered at once).
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test skips close(): end the session (so Chromium exits) with a plain blocking request, then stop
        // chromedriver.
        delete_session(&self.session);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn delete_session(session_url: &str) {
    use std::io::{Read, Write};
    let Some(rest) = session_url.strip_prefix("http://") else { return };
    let Some((host, path)) = rest.split_once('/') else { return };
    let Ok(mut s) = std::net::TcpStream::connect(host) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_ok() {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}
