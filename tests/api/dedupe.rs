//! Retries are deduplicated at the door, repeats are not: a sender's retry within the dedupe window is answered
//! with the first delivery's event ids and never reaches Heap twice; the same content received later is a new
//! event with a new idempotency key. The relay's clock is moved forward instead of waiting.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The items' idempotency keys, sorted.
fn keys(items: &[(String, Value)]) -> Vec<String> {
    let mut keys: Vec<String> =
        items.iter().map(|(_, i)| i["idempotency_key"].as_str().unwrap_or_default().to_owned()).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_clevertap_body_sent_three_times_within_a_minute_reaches_heap_once_and_every_answer_has_the_same_ids() {
    let app = spawn_app().await;
    let body = fixture("clevertap-profile-batch.json");
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (status, resp) = json(app.post_hook("clevertap", &body).await).await;
        assert_eq!(status, 202, "{resp}");
        answers.push(resp);
        // CleverTap re-sends after about 3 s when it saw a timeout or an error.
        app.app.intake.clock.advance(Duration::from_secs(20));
    }
    assert!(answers[0].get("duplicate").is_none(), "the first send is new: {}", answers[0]);
    for retry in &answers[1..] {
        assert_eq!(retry["duplicate"], true, "{retry}");
        assert_eq!(retry["event_ids"], answers[0]["event_ids"], "a retry is answered with the first ids");
    }
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items.len(), 2, "each profile once: {items:#?}");
    app.wait_for_metric(r#"heap_relay_ingest_items_total{source="clevertap",outcome="duplicate"} 4"#, WAIT).await;
}

#[tokio::test]
async fn the_same_clevertap_body_a_day_later_is_a_new_campaign_delivered_again_with_new_keys() {
    let app = spawn_app().await;
    let body = fixture("clevertap-profile-batch.json");
    let (_, first) = json(app.post_hook("clevertap", &body).await).await;
    let earlier = app.wait_for_heap(2, WAIT).await;
    app.app.intake.clock.advance(Duration::from_secs(25 * 3600));
    let (status, again) = json(app.post_hook("clevertap", &body).await).await;
    assert_eq!(status, 202);
    assert!(again.get("duplicate").is_none(), "{again}");
    assert_ne!(again["event_ids"], first["event_ids"]);
    let all = app.wait_for_heap(4, WAIT).await;
    let (old, new) = (keys(&earlier), keys(&all[2..]));
    assert!(new.iter().all(|k| !old.contains(k)), "a repeat must not reuse keys Heap dedupes on: {old:?} {new:?}");
}

#[tokio::test]
async fn the_same_segment_message_id_twice_reaches_heap_once() {
    let app = spawn_app().await;
    let message = fixture("segment-track.json");
    let (_, first) = json(app.post_hook("segment", &message).await).await;
    let (status, retry) = json(app.post_hook("segment", &message).await).await;
    assert_eq!(status, 202);
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["event_ids"], first["event_ids"]);
    // A batch that carries the old message beside a new one: only the new one is stored.
    let mut fresh = message.clone();
    fresh["messageId"] = json!("a-new-message-id");
    let (_, mixed) = json(app.post_hook("segment", &json!({"batch": [message, fresh]})).await).await;
    assert_eq!(mixed["duplicates"], 1, "{mixed}");
    assert_eq!(mixed["event_ids"][0], first["event_ids"][0]);
    let items = app.wait_until_idle(WAIT).await;
    let tracks: Vec<_> = items.iter().filter(|(p, _)| p.ends_with("/track")).collect();
    assert_eq!(tracks.len(), 2, "the first message once, the new one once: {items:#?}");
}

#[tokio::test]
async fn two_identical_heap_track_bodies_without_key_or_timestamp_are_two_events_with_different_keys() {
    let app = spawn_app().await;
    let body = json!({"app_id": APP_ID, "identity": "repeat@example.com", "event": "Clicked"});
    assert!(app.post("/api/track", body.to_string()).await.status().is_success());
    app.app.intake.clock.advance(Duration::from_millis(1200));
    let (status, second) = json(app.post("/api/track", body.to_string()).await).await;
    assert!((200..300).contains(&status), "{second}");
    let items = app.wait_for_heap(2, WAIT).await;
    let k = keys(&items);
    assert_ne!(k[0], k[1], "Heap's API counts every call; the relay must not make it drop the second");
}

#[tokio::test]
async fn a_heap_body_with_its_own_idempotency_key_sent_twice_reaches_heap_once() {
    let app = spawn_app().await;
    let body = json!({"app_id": APP_ID, "identity": "k@example.com", "event": "Paid", "idempotency_key": "order-77"});
    for _ in 0..2 {
        assert!(app.post("/api/track", body.to_string()).await.status().is_success());
    }
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(keys(&items), vec!["order-77"], "{items:#?}");
}

#[tokio::test]
async fn a_rerender_derives_the_keys_of_the_first_render_and_a_body_stored_before_key_schemes_keeps_the_old_scheme() {
    let app = spawn_app().await;
    let (status, resp) = json(app.post_hook("clevertap", &fixture("clevertap-profile-batch.json")).await).await;
    assert_eq!(status, 202, "{resp}");
    let first = keys(&app.wait_until_idle(WAIT).await);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|k| k.starts_with("hr2-")), "new bodies get the canonical scheme: {first:?}");

    let rerender = || async {
        let (status, report) =
            json(app.admin_post("/admin/replay", &json!({"status": "delivered", "rerender": true})).await).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["accepted"], 2, "{report}");
    };
    rerender().await;
    let items = app.wait_for_heap(4, WAIT).await;
    assert_eq!(keys(&items[2..]), first, "a re-render reaches Heap under the keys Heap already has");

    // A log written by the relay before key schemes: its bodies have no scheme, and read as the text scheme.
    let log = rusqlite::Connection::open(app._dir.path().join("relay.db")).expect("the log opens");
    log.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    assert_eq!(log.execute("UPDATE log SET key_scheme = NULL WHERE body IS NOT NULL", []).expect("updates"), 1);
    rerender().await;
    let items = app.wait_for_heap(6, WAIT).await;
    let old = keys(&items[4..]);
    assert!(old.iter().all(|k| k.starts_with("hr1-")), "the text scheme's keys: {old:?}");
    rerender().await;
    let items = app.wait_for_heap(8, WAIT).await;
    assert_eq!(keys(&items[6..]), old, "and stays on it");
}
