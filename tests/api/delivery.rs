//! Delivery against a misbehaving Heap: outages, rate limits, refused events, crashes, a full store, replays.

use crate::helpers::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

fn track_bulk(from: usize, n: usize) -> Value {
    let events: Vec<Value> = (from..from + n)
        .map(
            |i| json!({"identity": format!("user-{}", i % 50), "event": "Load", "idempotency_key": format!("key-{i}")}),
        )
        .collect();
    json!({"app_id": APP_ID, "events": events})
}

fn keys(items: &[(String, Value)]) -> HashSet<String> {
    items.iter().filter_map(|(_, e)| e["idempotency_key"].as_str().map(str::to_owned)).collect()
}

async fn wait_for_keys(app: &TestApp, want: usize, within: Duration) -> HashSet<String> {
    wait_for_keys_after(app, 0, want, within).await
}

/// Distinct idempotency keys in the calls Heap received, skipping the first `skip` calls.
async fn wait_for_keys_after(app: &TestApp, skip: usize, want: usize, within: Duration) -> HashSet<String> {
    let deadline = Instant::now() + within;
    loop {
        let calls = app.heap_calls().await;
        let got = keys(&items_of(calls.get(skip..).unwrap_or_default()));
        if got.len() >= want {
            return got;
        }
        assert!(Instant::now() < deadline, "Heap has {} of {want} distinct events after {within:?}", got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_accepted_while_heap_answers_503_are_all_delivered_once_it_recovers() {
    let app = spawn_app().await;
    app.heap.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&app.heap).await;
    let outage = Instant::now();
    for batch in 0..20 {
        let (status, body) = json(app.post("/api/track", track_bulk(batch * 100, 100).to_string()).await).await;
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(400)).await; // spread the 2,000 events over the outage
    }
    while outage.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!app.heap_calls().await.is_empty(), "the relay kept trying during the outage");
    app.heap.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&app.heap).await;
    let got = wait_for_keys(&app, 2000, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2000);
    app.wait_until_idle(Duration::from_secs(10)).await;
    let (_, dead) = json(app.admin_get("/admin/deliveries?status=dead").await).await;
    assert_eq!(dead["count"], 0);
}

/// Answers 429 with Retry-After to the first call, 200 after; records when each call came.
struct RateLimitedOnce {
    seen: Arc<Mutex<Vec<Instant>>>,
    retry_after_secs: u64,
}

impl Respond for RateLimitedOnce {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut seen = self.seen.lock().unwrap();
        seen.push(Instant::now());
        if seen.len() == 1 {
            ResponseTemplate::new(429).insert_header("Retry-After", self.retry_after_secs.to_string().as_str())
        } else {
            ResponseTemplate::new(200)
        }
    }
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_that_app_id_at_least_that_long_and_then_delivers_all() {
    let app = spawn_app().await;
    app.heap.reset().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .respond_with(RateLimitedOnce { seen: seen.clone(), retry_after_secs: 2 })
        .mount(&app.heap)
        .await;
    assert_eq!(app.post("/api/track", track_bulk(0, 10).to_string()).await.status(), 202);
    // More events for the same app_id arrive during the pause; none may be sent before it ends.
    assert_eq!(app.post("/api/track", track_bulk(10, 10).to_string()).await.status(), 202);
    let got = wait_for_keys_after(&app, 1, 20, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 20, "every event is delivered after the pause");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    let gap = seen[1] - seen[0];
    assert!(gap >= Duration::from_secs(2), "the next call came {gap:?} after the 429; Retry-After said 2s");
}

#[tokio::test]
async fn an_event_heap_refuses_with_400_is_dead_lettered_with_its_answer_and_its_batch_neighbours_delivered() {
    let app = spawn_app().await;
    app.heap.reset().await;
    Mock::given(method("POST"))
        .and(body_string_contains("poison"))
        .respond_with(ResponseTemplate::new(400).set_body_string(r#"{"error":"property poison is not allowed"}"#))
        .with_priority(1)
        .mount(&app.heap)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).with_priority(5).mount(&app.heap).await;
    let mut body = track_bulk(0, 10);
    body["events"][6]["properties"] = json!({"poison": true});
    let (status, resp) = json(app.post("/api/track", body.to_string()).await).await;
    assert_eq!(status, 202, "{resp}");
    let bad_id = resp["event_ids"][6].as_str().unwrap().to_owned();
    app.wait_until_idle(Duration::from_secs(10)).await;

    let delivered: HashSet<String> = app
        .heap_calls()
        .await
        .iter()
        .filter(|c| !c.body.to_string().contains("poison"))
        .flat_map(|c| c.body["events"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["idempotency_key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(delivered.len(), 9, "every neighbour is delivered: {delivered:?}");
    assert!(!delivered.contains("key-6"));
    let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{bad_id}")).await).await;
    assert_eq!(ev["status"], "dead");
    assert!(ev["last_error"].as_str().unwrap().contains("property poison is not allowed"), "{ev}");
    assert!(ev["attempts"].as_i64().unwrap() >= 2, "the split attempts are logged too: {ev}");
}

#[tokio::test]
async fn a_full_store_answers_503_with_retry_after_and_takes_bodies_again_when_space_returns() {
    let app = spawn_app_with(|s| {
        s.store.max_bytes = 400_000;
        s.store.retry_after_secs = 7;
    })
    .await;
    let mut accepted = 0;
    let refused = loop {
        let resp = app.post("/api/track", track_bulk(accepted * 50, 50).to_string()).await;
        if resp.status() == 503 {
            break resp;
        }
        assert_eq!(resp.status(), 202);
        accepted += 1;
        assert!(accepted < 2000, "the store never filled");
    };
    assert_eq!(refused.headers()["retry-after"], "7");
    let (_, body) = json(refused).await;
    assert_eq!(body["error"]["code"], "store_full");
    let ready = |app: &TestApp| {
        let url = format!("{}/readyz", app.address);
        let client = app.client.clone();
        async move { json(client.get(url).send().await.expect("readyz")).await }
    };
    let (status, why) = ready(&app).await;
    assert_eq!(status, 503, "/readyz tells the truth while bodies are refused: {why}");
    assert!(why["error"]["message"].as_str().unwrap_or_default().contains("full"), "{why}");
    // Everything acknowledged is delivered; pruning delivered rows frees the space.
    let got = wait_for_keys(&app, accepted * 50, Duration::from_secs(30)).await;
    assert_eq!(got.len(), accepted * 50);
    app.wait_until_idle(Duration::from_secs(10)).await;
    while app.app.intake.store.prune(heap_relay::store::now_ms() + 1).await.unwrap() > 0 {}
    let (status, body) = json(app.post("/api/track", track_bulk(1_000_000, 50).to_string()).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(ready(&app).await.0, 200, "ready again once there is room");
}

#[tokio::test]
async fn replay_with_rerender_after_a_template_fix_delivers_the_corrected_payloads() {
    let typo =
        r#"{"event": "{{ evnt }}", "identity": "{{ userId }}", "properties": {"plan": "{{ properties.plan }}"}}"#;
    let templates = templates_with(&[("segment/fixme.json", typo)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| {
        s.templates.dir = dir.clone();
        s.templates.reload_interval_secs = 1;
    })
    .await;
    let msg = json!({"type": "track", "event": "Upgraded", "userId": "u-9", "properties": {"plan": "pro"}});
    let (status, body) = json(app.post_hook_template("segment", "fixme", &msg).await).await;
    assert_eq!(status, 422, "the typo leaves the event name empty: {body}");
    assert_eq!(body["error"]["field"], "event");

    std::fs::write(dir.join("segment/fixme.json"), typo.replace("evnt", "event")).unwrap();
    app.wait_for_metric("heap_relay_template_reloads_total{result=\"ok\"} 1", Duration::from_secs(10)).await;
    let (status, report) =
        json(app.admin_post("/admin/replay", &json!({"status": "rejected", "rerender": true})).await).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["bodies"], 1);
    assert_eq!(report["accepted"], 1);
    let items = app.wait_for_heap(1, Duration::from_secs(10)).await;
    assert_eq!(items[0].1["event"], "Upgraded");
    assert_eq!(items[0].1["properties"], json!({"plan": "pro"}));
    let (_, replaced) = json(app.admin_get("/admin/deliveries?status=replaced").await).await;
    assert_eq!(replaced["count"], 1, "the broken row is kept, marked replaced");
}
