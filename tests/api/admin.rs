//! The delivery log and replay over HTTP, behind the admin token; health, readiness and metrics.

use crate::helpers::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn admin_endpoints_need_the_token_and_are_off_without_one() {
    let app = spawn_app().await;
    for token in [None, Some("wrong")] {
        let mut req = app.client.get(format!("{}/admin/deliveries", app.address));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let (status, body) = json(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let off = spawn_app_with(|s| s.admin.token = String::new().into()).await;
    let (status, body) = json(off.admin_get("/admin/deliveries").await).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("admin.token"));
}

#[tokio::test]
async fn every_event_and_its_attempts_can_be_looked_up_by_the_id_ingest_returned() {
    let app = spawn_app().await;
    let (_, body) = json(app.post_hook("segment", &fixture("segment-track.json")).await).await;
    let id = body["event_ids"][0].as_str().unwrap().to_owned();
    app.wait_until_idle(WAIT).await;
    let (status, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["status"], "delivered");
    assert_eq!(ev["source"], "segment");
    assert_eq!(ev["attempts"], 1);
    assert_eq!(ev["attempt_log"][0]["http_status"], 200);
    assert_eq!(ev["payload"]["event"], "Order Completed");
    let (_, list) = json(app.admin_get("/admin/deliveries?status=delivered&source=segment").await).await;
    assert_eq!(list["count"], 1);
    let (status, _) = json(app.admin_get("/admin/deliveries/nope").await).await;
    assert_eq!(status, 404);
    let (status, body) = json(app.admin_get("/admin/deliveries?status=lost").await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "status");
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    assert_eq!(app.post_hook("segment", &fixture("segment-track.json")).await.status(), 202);
    app.wait_until_idle(WAIT).await;
    for path in ["/healthz", "/readyz"] {
        let resp = app.client.get(format!("{}{path}", app.address)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let metrics = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    for want in [
        "heap_relay_ingest_items_total{source=\"segment\",outcome=\"accepted\"} 1",
        "heap_relay_delivery_attempts_total{result=\"delivered\"} 1",
        "heap_relay_queue_depth 0",
        "heap_relay_delivery_batch_size_bucket",
        "heap_relay_oldest_pending_age_seconds",
        "heap_relay_store_commits",
        "heap_relay_store_bodies_committed 1",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
}

#[tokio::test]
async fn replaying_dead_events_sends_them_again() {
    let app = spawn_app().await;
    app.heap.reset().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(404).set_body_string("no such app"))
        .mount(&app.heap)
        .await;
    let (_, body) = json(app.post_hook("segment", &fixture("segment-track.json")).await).await;
    let id = body["event_ids"][0].as_str().unwrap().to_owned();
    app.wait_until_idle(WAIT).await;
    let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
    assert_eq!(ev["status"], "dead");
    assert!(ev["last_error"].as_str().unwrap().contains("404: no such app"), "{ev}");

    app.heap.reset().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&app.heap)
        .await;
    let (status, report) = json(app.admin_post("/admin/replay", &json!({"status": "dead"})).await).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["requeued"], 1);
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].1["event"], "Order Completed");
    app.wait_until_idle(WAIT).await;
    let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
    assert_eq!(ev["status"], "delivered");
    assert_eq!(ev["attempts"], 2, "both attempts are in the log");
}

#[tokio::test]
async fn retention_deletes_delivered_events_and_their_bodies_but_never_waiting_ones() {
    let app = spawn_app().await;
    assert_eq!(app.post_hook("segment", &fixture("segment-track.json")).await.status(), 202);
    app.wait_until_idle(WAIT).await;
    app.heap.reset().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(503))
        .mount(&app.heap)
        .await;
    let (_, waiting) = json(app.post_hook("segment", &fixture("segment-identify.json")).await).await;
    let waiting_id = waiting["event_ids"][0].as_str().unwrap().to_owned();

    let store = &app.app.intake.store;
    let mut deleted = 0;
    loop {
        let n = store.prune(heap_relay::store::now_ms() + 1).await.unwrap();
        if n == 0 {
            break;
        }
        deleted += n;
    }
    assert_eq!(deleted, 1, "the delivered event is pruned");
    let (_, delivered) = json(app.admin_get("/admin/deliveries?status=delivered").await).await;
    assert_eq!(delivered["count"], 0);
    let (status, ev) = json(app.admin_get(&format!("/admin/deliveries/{waiting_id}")).await).await;
    assert_eq!(status, 200, "the undelivered event is kept: {ev}");
    assert!(ev["status"] == "pending" || ev["status"] == "retrying", "{ev}");
}
