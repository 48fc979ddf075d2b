//! The Heap-compatible routes: an existing integration switches its base URL to the relay.

use crate::helpers::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn heap_track_single_and_bulk_bodies_are_validated_and_forwarded() {
    let app = spawn_app().await;
    let (status, body) = json(app.post("/api/track", fixture("clevertap-custom-body.json").to_string()).await).await;
    assert_eq!(status, 202, "{body}");
    let bulk = json!({"app_id": APP_ID, "events": [
        {"identity": "u1", "event": "Phone Call", "timestamp": "2024-05-01T12:00:00Z", "idempotency_key": "k-1", "properties": {"rep": "Joe"}},
        {"user_id": "8325872782136936", "event": "Phone Call", "idempotency_key": "k-2"}
    ]});
    let (status, body) = json(app.post("/api/track", bulk.to_string()).await).await;
    assert_eq!(status, 202, "{body}");
    let items = app.wait_for_heap(3, WAIT).await;
    let custom = items.iter().find(|(_, e)| e["identity"] == "jane.doe@example.com").unwrap();
    assert_eq!(custom.1["app_id"], "1234567890");
    assert_eq!(
        custom.1["properties"],
        json!({"item_names": "Watch", "value": "42.5", "campaign_name": "Cart Reminder Push"})
    );
    let k1 = items.iter().find(|(_, e)| e["idempotency_key"] == "k-1").unwrap();
    assert_eq!(k1.1["timestamp"], "2024-05-01T12:00:00.000Z");
    let k2 = items.iter().find(|(_, e)| e["idempotency_key"] == "k-2").unwrap();
    assert_eq!(k2.1["user_id"], "8325872782136936");
}

#[tokio::test]
async fn heap_add_user_properties_single_and_bulk_are_forwarded() {
    let app = spawn_app().await;
    let single = json!({"app_id": APP_ID, "identity": "u1", "properties": {"plan": "pro", "Email": "a@b.co"}});
    assert_eq!(app.post("/api/add_user_properties", single.to_string()).await.status(), 202);
    let bulk = json!({"app_id": APP_ID, "users": [{"identity": "u2", "properties": {"plan": "free"}}]});
    assert_eq!(app.post("/api/add_user_properties", bulk.to_string()).await.status(), 202);
    let items = app.wait_for_heap(2, WAIT).await;
    assert!(items.iter().all(|(p, _)| p == "/api/add_user_properties"));
    let u1 = items.iter().find(|(_, u)| u["identity"] == "u1").unwrap();
    assert_eq!(
        u1.1["properties"],
        json!({"plan": "pro", "email": "a@b.co"}),
        "email is written lower-case for Heap's Email"
    );
}

#[tokio::test]
async fn an_app_id_outside_the_allow_list_is_rejected_naming_app_id() {
    let app = spawn_app_with(|s| s.heap.allowed_app_ids = vec![APP_ID.into()]).await;
    let body = json!({"app_id": "999", "identity": "u", "event": "E"});
    let (status, resp) = json(app.post("/api/track", body.to_string()).await).await;
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["error"]["field"], "app_id");
    assert_eq!(resp["error"]["rejected"][0]["code"], "not_allowed");
    let bad = json!({"app_id": "12ab", "identity": "u", "event": "E"});
    let (_, resp) = json(app.post("/api/track", bad.to_string()).await).await;
    assert_eq!(resp["error"]["rejected"][0]["code"], "invalid");
}

#[tokio::test]
async fn heap_bodies_with_both_identities_or_a_bad_item_are_rejected_per_item() {
    let app = spawn_app().await;
    let bulk = json!({"app_id": APP_ID, "events": [
        {"identity": "u", "user_id": "1", "event": "E"},
        {"identity": "u", "event": "E", "properties": {"k": {"deep": true}}},
        {"identity": "u", "event": "x".repeat(1025)}
    ]});
    let (status, resp) = json(app.post("/api/track", bulk.to_string()).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 1);
    let fields: Vec<_> =
        resp["rejected"].as_array().unwrap().iter().map(|r| (r["index"].clone(), r["field"].clone())).collect();
    assert_eq!(fields, vec![(json!(0), json!("events[0].identity")), (json!(2), json!("events[2].event"))]);
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items[0].1["properties"], json!({"k.deep": true}));
}
