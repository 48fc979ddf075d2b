//! The attacks of the hardening issue, each against the real server on loopback: the documented 4xx, no 5xx,
//! /healthz still answering, and the bound the attack exercises. Memory is read as the relay process's peak RSS
//! (VmHWM), one process per memory test, since a peak only grows. docs/security.md lists each attack and its test.

use crate::helpers::*;
use heap_relay::auth::AuthMode;
use heap_relay::startup::Application;
use serde_json::{Value, json};
use std::io::Write;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const UP_SECRET: &str = "up-signing-secret-hardening";
const WAIT: Duration = Duration::from_secs(15);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// 1 GiB of zeros as concatenated zstd frames of 1 MiB each (about 40 KB): every decoder must go on to the next
/// frame, so it inflates the whole GiB unless something stops it.
fn zstd_bomb() -> Vec<u8> {
    zstd::encode_all(&vec![0u8; 1 << 20][..], 3).expect("zstd").repeat(1024)
}

/// 1 GiB of zeros as 1,024 gzip members of 1 MiB each (about 1 MB).
fn gzip_bomb() -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 1 << 20]).expect("gzip");
    gz.finish().expect("gzip").repeat(1024)
}

async fn healthz(client: &reqwest::Client, address: &str) {
    let r = client.get(format!("{address}/healthz")).timeout(Duration::from_secs(5)).send().await;
    assert_eq!(r.expect("/healthz answers").status(), 200);
}

#[tokio::test]
async fn a_1_gib_compression_bomb_keeps_the_relay_under_100_mib_above_idle_even_before_authentication() {
    let heap = MockServer::start().await;
    let relay = RelayProcess::start(
        &heap.uri(),
        &[
            ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__MODE", "hmac_userpilot"),
            ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__SECRET", UP_SECRET),
        ],
    )
    .await;
    let idle = relay.rss_mib();
    let client = crate::helpers::test_client();
    let (zstd, gzip) = (zstd_bomb(), gzip_bomb());
    // Three at once to /hooks/userpilot with a made-up signature, and one to the open /api/track.
    let signature = format!("t={},v1=00", now());
    let hooks = (0..3).map(|_| {
        client
            .post(format!("{}/hooks/userpilot", relay.address))
            .header("Content-Encoding", "zstd")
            .header("X-Signature", &signature)
            .body(zstd.clone())
            .send()
    });
    let track = client
        .post(format!("{}/api/track", relay.address))
        .header("Content-Encoding", "gzip")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(gzip.clone())
        .send();
    let (hooks, track) = tokio::join!(futures_util::future::join_all(hooks), track);
    for r in hooks.into_iter().chain([track]) {
        let (status, body) = json(r.expect("answered")).await;
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["error"]["code"], "body_too_large");
    }
    healthz(&client, &relay.address).await;
    let peak = relay.peak_rss_mib();
    println!("bomb: idle {idle:.1} MiB, peak {peak:.1} MiB, +{:.1} MiB", peak - idle);
    assert!(peak - idle < 100.0, "peak RSS {peak:.1} MiB is {:.1} MiB above idle {idle:.1} MiB", peak - idle);
}

/// A Segment batch whose 2,000-key `context` applies to each of its 8,000 tiny messages.
fn amplification_body() -> String {
    let context: serde_json::Map<String, Value> = (0..2000).map(|i| (format!("k{i}"), json!(i))).collect();
    let batch: Vec<Value> =
        (0..8000).map(|i| json!({"type": "track", "event": "e", "userId": format!("u{i}")})).collect();
    json!({"batch": batch, "context": context}).to_string()
}

#[tokio::test]
async fn batch_fields_are_not_copied_into_every_item_and_too_many_items_are_refused_before_building_any() {
    let heap = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&heap).await;
    let relay = RelayProcess::start(&heap.uri(), &[]).await;
    let idle = relay.rss_mib();
    let client = crate::helpers::test_client();
    let body = amplification_body();
    let started = Instant::now();
    let r = client.post(format!("{}/hooks/segment", relay.address)).body(body.clone()).send().await;
    let (status, answer) = json(r.expect("answered")).await;
    let took = started.elapsed();
    assert!(status < 500, "{status} {answer}");
    assert_eq!(answer["items"], 8000, "{answer}");
    // 60,000 tiny messages: refused by count before any item exists.
    let many: Vec<Value> = (0..60_000).map(|_| json!({"type": "track"})).collect();
    let r = client.post(format!("{}/hooks/segment", relay.address)).body(Value::Array(many).to_string()).send().await;
    let (status, answer) = json(r.expect("answered")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (413, Some("too_many_items")), "{answer}");
    healthz(&client, &relay.address).await;
    let peak = relay.peak_rss_mib();
    println!("amplification: {} KB body in {took:?}; idle {idle:.1} MiB, peak {peak:.1} MiB", body.len() / 1000);
    assert!(peak - idle < 200.0, "peak RSS {peak:.1} MiB is {:.1} MiB above idle {idle:.1} MiB", peak - idle);
}

#[tokio::test]
async fn a_thousand_auth_failures_write_at_most_20_log_lines_and_count_1000_in_metrics() {
    let heap = MockServer::start().await;
    let relay = RelayProcess::start(
        &heap.uri(),
        &[
            ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__MODE", "hmac_userpilot"),
            ("HEAP_RELAY__SOURCES__USERPILOT__AUTH__SECRET", UP_SECRET),
            // The test client is the trusted proxy: the client address logged comes from X-Forwarded-For.
            ("HEAP_RELAY__SERVER__TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    let client = crate::helpers::test_client();
    let before = relay.log().lines().count();
    let body = br#"{"event": "flow_started", "user_id": "u"}"#;
    for i in 0..1000 {
        // Half fail on the header alone, half on the signature over the body.
        let sig = if i % 2 == 0 { "v1=zz".to_owned() } else { format!("t={},v1=00", now()) };
        let r = client
            .post(format!("{}/hooks/userpilot", relay.address))
            .header("X-Forwarded-For", "198.51.100.7, 203.0.113.9")
            .header("X-Signature", sig)
            .body(&body[..])
            .send()
            .await
            .expect("answered");
        assert_eq!(r.status(), 401);
    }
    let text = client.get(format!("{}/metrics", relay.address)).send().await.expect("metrics").text().await;
    let text = text.expect("metrics text");
    assert!(
        text.lines().any(|l| l == r#"heap_relay_auth_failures_total{source="userpilot"} 1000"#),
        "/metrics:\n{text}"
    );
    let log = relay.log();
    let lines = log.lines().count() - before;
    println!("auth failures: {lines} log lines for 1,000 failures");
    assert!(lines <= 20, "{lines} log lines for 1,000 auth failures:\n{log}");
    assert!(log.contains("authentication failed"), "the first failure is logged:\n{log}");
    assert!(log.contains("203.0.113.9"), "the client named by the trusted proxy is logged:\n{log}");

    // A 30 KB body of 10,000 items that are all refused: a summary in the log, never the 10,000 reasons.
    let refused: Vec<Value> = (0..10_000).map(|_| json!({})).collect();
    let before = log.len();
    let r = client
        .post(format!("{}/hooks/clevertap", relay.address))
        .body(json!({"profiles": refused}).to_string())
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 422);
    let grown = relay.log().len() - before;
    println!("10,000 refused items: {grown} bytes of log");
    assert!(grown < 4096, "a refused body wrote {grown} bytes of log:\n{}", &relay.log()[before..]);
}

/// A fake Heap on loopback that answers every call with `status` and a body of `body_bytes` zeros, written until
/// the client hangs up. Returns its address and the number of calls it got.
async fn endless_heap(status: u16, body_bytes: u64) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_millis(500), sock.read(&mut buf)).await;
                let head =
                    format!("HTTP/1.1 {status} Oops\r\nContent-Length: {body_bytes}\r\nConnection: close\r\n\r\n");
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 256 * 1024];
                let mut sent = 0u64;
                while sent < body_bytes {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                }
            });
        }
    });
    (format!("http://{addr}"), calls)
}

#[tokio::test]
async fn an_800_mib_answer_from_heap_is_read_only_in_part_and_the_event_is_retried_not_delivered() {
    let (heap, calls) = endless_heap(500, 800 << 20).await;
    let relay = RelayProcess::start(&heap, &[("HEAP_RELAY__ADMIN__TOKEN", ADMIN_TOKEN)]).await;
    let idle = relay.rss_mib();
    let client = crate::helpers::test_client();
    let body = json!({"app_id": APP_ID, "identity": "u", "event": "E"}).to_string();
    let (status, answer) =
        json(client.post(format!("{}/api/track", relay.address)).body(body).send().await.unwrap()).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["event_ids"][0].as_str().expect("an event id").to_owned();
    let deadline = Instant::now() + WAIT;
    let ev = loop {
        let r = client.get(format!("{}/admin/deliveries/{id}", relay.address)).bearer_auth(ADMIN_TOKEN).send().await;
        let (_, ev) = json(r.expect("admin answers")).await;
        if ev["attempts"].as_i64().unwrap_or(0) >= 2 {
            break ev;
        }
        assert!(Instant::now() < deadline, "no second attempt within {WAIT:?}: {ev}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ev["status"], "retrying", "{ev}");
    assert!(ev["last_error"].as_str().unwrap_or_default().contains("500"), "{ev}");
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    healthz(&client, &relay.address).await;
    let peak = relay.peak_rss_mib();
    println!("800 MiB answer: idle {idle:.1} MiB, peak {peak:.1} MiB");
    assert!(peak - idle < 100.0, "peak RSS {peak:.1} MiB is {:.1} MiB above idle {idle:.1} MiB", peak - idle);
}

async fn wait_for_attempts(app: &TestApp, id: &str, n: i64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
        if ev["attempts"].as_i64().unwrap_or(0) >= n {
            return ev;
        }
        assert!(Instant::now() < deadline, "fewer than {n} attempts within {WAIT:?}: {ev}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn heap_redirects_are_never_followed_and_never_count_as_delivered() {
    // Every mock stays alive to the end: wiremock reuses a dropped server, and an earlier relay still retrying
    // into it would look like a leak.
    let mut keep = Vec::new();
    for code in [301u16, 307] {
        let elsewhere = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&elsewhere).await;
        Mock::given(method("GET")).respond_with(ResponseTemplate::new(200)).mount(&elsewhere).await;
        let app = spawn_app().await;
        app.heap.reset().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(code).insert_header("Location", format!("{}/api/track", elsewhere.uri())),
            )
            .mount(&app.heap)
            .await;
        let (status, body) = json(app.post_hook("segment", &fixture("segment-track.json")).await).await;
        assert_eq!(status, 202, "{body}");
        let id = body["event_ids"][0].as_str().expect("an event id").to_owned();
        let ev = wait_for_attempts(&app, &id, 2).await;
        assert_eq!(ev["status"], "retrying", "{code}: {ev}");
        assert!(ev["last_error"].as_str().unwrap_or_default().contains("not followed"), "{code}: {ev}");
        let leaked = elsewhere.received_requests().await.unwrap_or_default();
        assert!(leaked.is_empty(), "{code}: the batch went to the redirect target: {leaked:?}");
        keep.push((app, elsewhere));
    }
}

#[tokio::test]
async fn a_huge_or_overflowing_retry_after_is_capped_at_backoff_max() {
    let mut keep = Vec::new();
    for retry_after in ["99999999999999", "18446744073709551615"] {
        let app = spawn_app().await;
        app.heap.reset().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", retry_after))
            .mount(&app.heap)
            .await;
        let (_, body) = json(app.post_hook("segment", &fixture("segment-track.json")).await).await;
        let id = body["event_ids"][0].as_str().expect("an event id").to_owned();
        // Retried again within backoff_max_secs (2 s in tests) plus slack: not parked forever ...
        let ev = wait_for_attempts(&app, &id, 2).await;
        assert_eq!(ev["status"], "retrying", "{retry_after}: {ev}");
        // ... and not retried in a tight loop either (a wrapped value once made 36 attempts in 2 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
        let attempts = ev["attempts"].as_i64().unwrap_or(0);
        assert!(attempts <= 4, "{retry_after}: {attempts} attempts: {ev}");
        keep.push(app);
    }
}

#[tokio::test]
async fn a_browser_post_from_a_site_not_listed_is_refused_and_vendors_without_origin_pass() {
    let app = spawn_app_with(|s| s.server.allowed_origins = vec!["https://app.example.com".into()]).await;
    let body = fixture("segment-track.json").to_string();
    let post = |origin: Option<&'static str>| {
        let mut r = app
            .client
            .post(format!("{}/hooks/segment", app.address))
            .header("Content-Type", "text/plain")
            .body(body.clone());
        if let Some(o) = origin {
            r = r.header("Origin", o);
        }
        r.send()
    };
    let (status, answer) = json(post(Some("https://evil.example")).await.unwrap()).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "forbidden_origin");
    assert_eq!(answer["error"]["field"], "Origin");
    assert_eq!(json(post(Some("null")).await.unwrap()).await.0, 403, "a sandboxed page's Origin: null");
    assert_eq!(json(post(None).await.unwrap()).await.0, 202, "vendors and SDKs send no Origin");
    assert_eq!(json(post(Some("https://app.example.com")).await.unwrap()).await.0, 202, "a listed site");
}

#[tokio::test]
async fn the_heap_compatible_routes_accept_only_configured_app_ids() {
    let app = spawn_app().await;
    let other = json!({"app_id": "999", "identity": "u", "event": "E"});
    let (status, body) = json(app.post("/api/track", other.to_string()).await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "app_id");
    let configured = json!({"app_id": APP_ID, "identity": "u", "event": "E"});
    assert_eq!(app.post("/api/track", configured.to_string()).await.status(), 202);
}

fn signed_userpilot(app: &TestApp, body: &'static [u8], signature: String) -> reqwest::RequestBuilder {
    app.client.post(format!("{}/hooks/userpilot", app.address)).header("X-Signature", signature).body(body)
}

#[tokio::test]
async fn forged_signatures_do_not_spend_the_real_senders_request_budget() {
    let app = spawn_app_with(|s| {
        s.sources.userpilot.auth.mode = AuthMode::HmacUserpilot;
        s.sources.userpilot.auth.secret = UP_SECRET.to_owned().into();
        s.sources.userpilot.requests_per_minute = 60;
    })
    .await;
    let body: &'static [u8] = br#"{"event": "flow_started", "user_id": "u1", "flow_id": "f"}"#;
    for _ in 0..120 {
        let r = signed_userpilot(&app, body, format!("t={},v1=00", now())).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = signed_userpilot(&app, body, userpilot_signature(UP_SECRET, body, now())).send().await.unwrap();
    let (status, answer) = json(r).await;
    assert!(status == 202 || status == 422, "the real sender is not rate-limited: {status} {answer}");
}

/// Waits until the decoded bytes of bodies in flight satisfy `done`, or fails after `within`.
async fn wait_for_inflight(app: &TestApp, done: impl Fn(usize) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    while !done(app.app.inflight.used()) {
        assert!(Instant::now() < deadline, "in-flight bytes stayed at {} for {within:?}", app.app.inflight.used());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_request_refused_because_the_relay_is_overloaded_gives_the_senders_request_budget_back() {
    let app = spawn_app_with(|s| {
        s.server.max_body_bytes = 4096;
        s.server.max_inflight_body_bytes = 4096;
        s.sources.clevertap.requests_per_minute = 1;
        s.sources.segment.requests_per_minute = 1;
    })
    .await;
    // Another source's body declares 4,096 bytes and sends one: it holds the whole in-flight budget.
    let port = app.address.rsplit(':').next().expect("port");
    let mut holder = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.expect("connect");
    let head = "POST /api/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                Content-Length: 4096\r\n\r\n{";
    holder.write_all(head.as_bytes()).await.expect("headers sent");
    wait_for_inflight(&app, |used| used >= 4096, WAIT).await;

    let profile = json!({"profiles": [{"identity": "u"}]});
    let track = json!({"userId": "u", "event": "E"}).to_string();
    for i in 0..3 {
        let (status, answer) = json(app.post_hook("clevertap", &profile).await).await;
        assert_eq!((status, &answer["error"]["code"]), (503, &json!("overloaded")), "hook {i}: {answer}");
        let (status, answer) = json(app.post("/v1/track", track.clone()).await).await;
        assert_eq!((status, &answer["code"]), (503, &json!("overloaded")), "/v1 {i}: {answer}");
    }

    drop(holder);
    wait_for_inflight(&app, |used| used == 0, WAIT).await;
    // Each source's one request a minute is still there: the 503s gave theirs back.
    assert_eq!(app.post_hook("clevertap", &profile).await.status(), 202);
    assert_eq!(app.post("/v1/track", track.clone()).await.status(), 200);
    assert_eq!(app.post_hook("clevertap", &profile).await.status(), 429, "and the budget is spent by a real request");
    healthz(&app.client, &app.address).await;
}

/// A console sign-in with `token`, from the client `X-Forwarded-For` names.
async fn sign_in_as(app: &TestApp, token: &str, forwarded_for: &str) -> u16 {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let resp = client
        .post(format!("{}/console/sign-in", app.address))
        .header("Origin", &app.address)
        .header("X-Forwarded-For", forwarded_for)
        .form(&[("token", token)])
        .send()
        .await
        .expect("sign-in sent");
    resp.status().as_u16()
}

#[tokio::test]
async fn the_sign_in_throttle_believes_x_forwarded_for_only_from_a_trusted_proxy() {
    // No trusted proxy: X-Forwarded-For is the client's own claim, and changing it does not escape the throttle.
    let app = spawn_app_with(|s| s.console.sign_in_attempts_per_minute = 2).await;
    assert_eq!(sign_in_as(&app, "wrong", "198.51.100.1").await, 401);
    assert_eq!(sign_in_as(&app, "wrong", "198.51.100.2").await, 401);
    assert_eq!(sign_in_as(&app, ADMIN_TOKEN, "198.51.100.3").await, 429, "one client (the peer), whatever it claims");

    // Behind a trusted proxy (loopback here, as every test connection is), each forwarded client counts alone.
    let app = spawn_app_with(|s| {
        s.console.sign_in_attempts_per_minute = 2;
        s.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    assert_eq!(sign_in_as(&app, "wrong", "198.51.100.1").await, 401);
    assert_eq!(sign_in_as(&app, "wrong", "198.51.100.1").await, 401);
    assert_eq!(sign_in_as(&app, "wrong", "198.51.100.1").await, 429, "the forwarded client's own count");
    assert_eq!(sign_in_as(&app, ADMIN_TOKEN, "198.51.100.2").await, 303, "another client behind the same proxy");
    assert_eq!(sign_in_as(&app, ADMIN_TOKEN, "6.6.6.6, 198.51.100.1").await, 429, "the right-most untrusted address");
}

#[tokio::test]
async fn two_secrets_are_valid_at_once_for_rotation_and_a_stored_secret_is_trimmed() {
    let app = spawn_app_with(|s| {
        s.sources.segment.auth.mode = AuthMode::Bearer;
        s.sources.segment.auth.secret = " new-token \n".to_owned().into();
        s.sources.segment.auth.previous_secret = "old-token".to_owned().into();
    })
    .await;
    let body = fixture("segment-track.json").to_string();
    for (token, want) in [("new-token", 202), ("old-token", 202), ("other-token", 401)] {
        let r = app.client.post(format!("{}/hooks/segment", app.address)).bearer_auth(token).body(body.clone());
        assert_eq!(r.send().await.unwrap().status(), want, "{token}");
    }
}

#[tokio::test]
async fn a_nul_or_lone_surrogate_in_a_value_is_removed_and_the_answer_names_the_field() {
    let app = spawn_app().await;
    let body = r#"{"batch": [{"type": "track", "event": "E", "userId": "u1", "messageId": "m-nul",
        "properties": {"note": "a\u0000b", "mark": "x\ud800y"}}]}"#;
    let (status, answer) = json(app.post("/hooks/segment", body).await).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["sanitized"],
        json!([
            {"field": "batch[0].properties.note", "change": "nul_removed"},
            {"field": "batch[0].properties.mark", "change": "lone_surrogate_replaced"}
        ])
    );
    let got = app.wait_for_heap(1, WAIT).await;
    assert_eq!(got[0].1["properties"]["note"], "ab");
    assert_eq!(got[0].1["properties"]["mark"], "x\u{fffd}y");
}

#[tokio::test]
async fn on_segment_s_v1_routes_a_nul_or_lone_surrogate_is_removed_and_the_200_success_answer_names_the_field() {
    let app = spawn_app().await;
    let batch = r#"{"batch": [{"type": "track", "event": "E", "userId": "u1", "messageId": "v1-nul",
        "properties": {"note": "a\u0000b"}}]}"#;
    let (status, answer) = json(app.post("/v1/batch", batch).await).await;
    assert_eq!((status, &answer["success"]), (200, &json!(true)), "{answer}");
    assert_eq!(answer["sanitized"], json!([{"field": "batch[0].properties.note", "change": "nul_removed"}]));
    assert_eq!(answer["sanitized_count"], 1);

    let track = r#"{"event": "E", "userId": "u2", "messageId": "v1-sur", "properties": {"mark": "x\ud800y"}}"#;
    let (status, answer) = json(app.post("/hooks/segment/v1/track", track).await).await;
    assert_eq!((status, &answer["success"]), (200, &json!(true)), "{answer}");
    assert_eq!(answer["sanitized"], json!([{"field": "properties.mark", "change": "lone_surrogate_replaced"}]));

    let (status, clean) = json(app.post("/v1/track", r#"{"event": "E", "userId": "u3"}"#).await).await;
    assert_eq!(status, 200, "{clean}");
    assert!(clean.get("sanitized").is_none(), "nothing repaired, nothing listed: {clean}");

    let mut got = app.wait_for_heap(3, WAIT).await;
    got.sort_by_key(|(_, e)| e["identity"].as_str().map(str::to_owned));
    assert_eq!(got[0].1["properties"]["note"], "ab");
    assert_eq!(got[1].1["properties"]["mark"], "x\u{fffd}y");
    app.wait_for_metric("heap_relay_sanitized_values_total{source=\"segment\"} 2", WAIT).await;
}

#[tokio::test]
async fn a_public_bind_with_an_unauthenticated_source_refuses_to_start_unless_opted_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path(), "http://127.0.0.1:9");
    s.server.bind = "0.0.0.0:0".into();
    let err = Application::build(s.clone()).await.err().expect("refused").to_string();
    assert!(err.contains("allow_unauthenticated_public_bind"), "{err}");
    assert!(err.contains("clevertap"), "names the open sources: {err}");
    s.server.allow_unauthenticated_public_bind = true;
    let addr = "0.0.0.0:8080".parse().unwrap();
    assert!(heap_relay::exposure::check_public_bind(&s, addr).is_ok(), "the explicit opt-in");
    assert!(!heap_relay::settings::Settings::defaults().server.allow_unauthenticated_public_bind);
}

#[tokio::test]
async fn query_errors_oversized_admin_bodies_and_a_doubled_slash_answer_as_documented() {
    let app = spawn_app().await;
    let (status, body) = json(app.admin_get("/admin/deliveries?limit=abc").await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_query")), "{body}");
    let big = json!({"status": "dead", "pad": "x".repeat(100_000)});
    let (status, body) = json(app.admin_post("/admin/replay", &big).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("body_too_large")), "{body}");
    let (status, body) = json(app.post("//hooks/segment", fixture("segment-track.json").to_string()).await).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn health_answers_on_its_own_listener_while_slow_clients_hold_every_connection() {
    let health_port = free_loopback_port();
    let app = spawn_app_with(|s| {
        s.server.max_connections = 20;
        s.server.health_bind = format!("127.0.0.1:{health_port}");
    })
    .await;
    let main = app.address.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..40 {
        let Ok(Ok(mut sock)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(&main)).await
        else {
            continue;
        };
        let head = "POST /hooks/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"batch\": [";
        let _ = sock.write_all(head.as_bytes()).await;
        held.push(sock);
    }
    let client = crate::helpers::test_client();
    let started = Instant::now();
    for path in ["/healthz", "/readyz"] {
        let r = client
            .get(format!("http://127.0.0.1:{health_port}{path}"))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} on the health listener: {e}"));
        assert_eq!(r.status(), 200, "{path}");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // The main port too: under pressure stalled bodies are cut after a second, so a probe gets a connection.
    let started = Instant::now();
    let r = client.get(format!("{}/healthz", app.address)).timeout(Duration::from_secs(10)).send().await;
    assert_eq!(r.expect("/healthz on the main port").status(), 200);
    println!("main-port /healthz under a slow-body flood answered in {:?}", started.elapsed());
    drop(held);
}

#[tokio::test]
async fn identity_policy_refuses_placeholders_zero_and_a_templates_constant_default_but_real_addresses_pass() {
    let recipe = r#"{"track": {"identity": "{{ Profile.Email | default: 'user@example.com' }}", "event": "E"}}"#;
    let templates = templates_with(&[("clevertap/recipe.json", recipe)]);
    let dir = templates.path().to_owned();
    let body = json!({"profiles": [
        {"email": "someone@example.com"},
        {"name": "no email"},
        {"email": "0"},
        {"email": "Undefined"},
        {"email": "user@example.com"}
    ]});
    let app = spawn_app_with(|s| s.templates.dir = dir.clone()).await;
    let (status, answer) = json(app.post_hook_template("clevertap", "recipe", &body).await).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1, "only the real address: {answer}");
    let rejected: Vec<(i64, String)> = answer["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| (r["index"].as_i64().unwrap_or(-1), r["field"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4], "{answer}");
    assert!(rejected.iter().all(|r| r.1.ends_with("identity")), "{answer}");

    let lenient = spawn_app_with(|s| {
        s.templates.dir = dir.clone();
        s.identity.allow_zero_and_minus_one = true;
        s.identity.refuse_template_default = false;
    })
    .await;
    let (_, answer) = json(lenient.post_hook_template("clevertap", "recipe", &body).await).await;
    assert_eq!(answer["accepted"], 4, "0 and the default allowed; the placeholder still refused: {answer}");
    let minus_one = json!({"app_id": APP_ID, "identity": "-1", "event": "E"});
    let (status, answer) = json(app.post("/api/track", minus_one.to_string()).await).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("identity")), "{answer}");
}

#[tokio::test]
async fn a_replay_on_a_full_store_is_503_store_full_not_500() {
    let first = spawn_app().await;
    let (_, body) = json(first.post_hook("segment", &fixture("segment-track.json")).await).await;
    assert!(body["event_ids"][0].is_string(), "{body}");
    first.wait_until_idle(WAIT).await;
    let db = first._dir.path().join("relay.db");
    let full = spawn_app_with(|s| {
        s.store.path = db.clone();
        s.store.max_bytes = 1;
    })
    .await;
    let (status, answer) =
        json(full.admin_post("/admin/replay", &json!({"status": "delivered", "rerender": true})).await).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("store_full")), "{answer}");
}
