//! Segment-spec messages (Customer.io, Astronomer, RudderStack, Jitsu).

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn segment_track_is_flattened_and_keyed_by_message_id() {
    let app = spawn_app().await;
    let (status, body) = json(app.post_hook("segment", &fixture("segment-track.json")).await).await;
    assert_eq!(status, 202, "{body}");
    let items = app.wait_for_heap(1, WAIT).await;
    let (path, e) = &items[0];
    assert_eq!(path, "/api/track");
    assert_eq!(e["identity"], "u_10482");
    assert_eq!(e["event"], "Order Completed");
    assert_eq!(e["idempotency_key"], "ajs-next-1731957000123-3f1c9a2e-5b7d-4c8e-9f0a-1b2c3d4e5f60");
    assert_eq!(e["timestamp"], "2024-11-18T19:10:00.123Z");
    let p = &e["properties"];
    assert_eq!(p["shipping.address.city"], "San Francisco");
    assert_eq!(p["first_order"], true);
    assert!(p.get("gift_note").is_none(), "nulls are dropped");
    assert!(p["products"].as_str().unwrap().starts_with("[{"), "arrays become JSON text");
}

#[tokio::test]
async fn segment_identify_becomes_add_user_properties_from_traits() {
    let app = spawn_app().await;
    assert_eq!(app.post_hook("segment", &fixture("segment-identify.json")).await.status(), 202);
    let items = app.wait_for_heap(1, WAIT).await;
    let (path, u) = &items[0];
    assert_eq!(path, "/api/add_user_properties");
    assert_eq!(u["identity"], "u_10482");
    assert_eq!(u["app_id"], APP_ID);
    let p = &u["properties"];
    assert_eq!(p["email"], "jane.doe@example.com");
    assert_eq!(p["address.city"], "San Francisco");
    assert_eq!(p["company.employee_count"], 48);
    assert_eq!(p["anonymous_id"], "507f191e810c19729de860ea");
    assert!(p.get("company.id").is_some(), "only a bare `id` key is reserved by Heap");
}

#[tokio::test]
async fn segment_batch_names_page_and_screen_as_the_peers_do() {
    let app = spawn_app().await;
    let (status, body) = json(app.post_hook("segment", &fixture("segment-batch.json")).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 4);
    let items = app.wait_for_heap(4, WAIT).await;
    let page = items.iter().find(|(_, e)| e["event"] == "Page viewed").expect("page");
    assert_eq!(page.1["properties"]["name"], "Pricing");
    assert_eq!(page.1["properties"]["path"], "/pricing");
    let screen = items.iter().find(|(_, e)| e["event"] == "Screen viewed").expect("screen");
    assert_eq!(screen.1["properties"]["name"], "Home");
    assert_eq!(screen.1["idempotency_key"], "0d3c8a7e-7d0a-4a3f-9c9c-5b1f7a3d2e10");
    assert_eq!(items.iter().filter(|(p, _)| p == "/api/add_user_properties").count(), 1);
}

#[tokio::test]
async fn segment_bare_arrays_astronomer_user_id_spelling_and_anonymous_ids_are_accepted() {
    let app = spawn_app().await;
    let body = json!([
        {"type": "track", "event": "A", "userID": "astro-1", "messageId": "m-astro-1"},
        {"type": "track", "event": "B", "anonymousId": "anon-1", "messageId": "m-anon-1"},
        {"type": "group", "groupId": "g1", "userId": "u", "messageId": "m-group"},
    ]);
    let (status, resp) = json(app.post_hook("segment", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 2);
    assert_eq!(resp["ignored"], json!([2]), "group has no Heap equivalent and is ignored, not rejected");
    let items = app.wait_for_heap(2, WAIT).await;
    let ids: Vec<&Value> = items.iter().map(|(_, e)| &e["identity"]).collect();
    assert!(ids.contains(&&json!("astro-1")) && ids.contains(&&json!("anon-1")), "{ids:?}");
}

#[tokio::test]
async fn anonymous_segment_messages_are_refused_when_configured() {
    let app = spawn_app_with(|s| s.sources.segment.allow_anonymous = false).await;
    let body = json!({"batch": [
        {"type": "track", "event": "B", "anonymousId": "anon-1"},
        {"type": "track", "event": "C", "userId": "known"}
    ]});
    let (status, resp) = json(app.post_hook("segment", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["rejected"][0]["index"], 0);
    assert_eq!(resp["rejected"][0]["field"], "identity");
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].1["identity"], "known");
}

#[tokio::test]
async fn a_segment_message_without_type_or_event_is_rejected_naming_the_field() {
    let app = spawn_app().await;
    let body = json!({"batch": [{"event": "no type", "userId": "u"}, {"type": "track", "userId": "u"}]});
    let (status, resp) = json(app.post_hook("segment", &body).await).await;
    assert_eq!(status, 422, "{resp}");
    let rejected = &resp["error"]["rejected"];
    assert_eq!(rejected[0]["field"], "batch[0].type");
    assert_eq!(rejected[1]["field"], "event");
}

#[tokio::test]
async fn gzip_encoded_and_byte_order_marked_bodies_are_accepted() {
    use std::io::Write;
    let app = spawn_app().await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(fixture("segment-track.json").to_string().as_bytes()).unwrap();
    let resp = app
        .client
        .post(format!("{}/hooks/segment", app.address))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 202, "{body}");
    let bom = [b"\xEF\xBB\xBF".as_slice(), br#"{"type": "track", "event": "BOM", "userId": "u"}"#].concat();
    let (status, body) = json(app.post("/hooks/segment", bom).await).await;
    assert_eq!(status, 202, "{body}");
    let items = app.wait_for_heap(2, WAIT).await;
    assert!(items.iter().any(|(_, e)| e["event"] == "Order Completed"));
    assert!(items.iter().any(|(_, e)| e["event"] == "BOM"));
}

#[tokio::test]
async fn an_identify_with_nothing_to_set_is_ignored_not_rejected() {
    let app = spawn_app().await;
    let body = json!({"type": "identify", "userId": "u-1", "messageId": "m-1"});
    let (status, resp) = json(app.post_hook("segment", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 0);
    assert_eq!(resp["ignored"], json!([0]));
}
