//! CleverTap webhooks: what Heap receives for each documented body shape.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn by_identity<'a>(items: &'a [(String, Value)], identity: &str) -> &'a Value {
    &items
        .iter()
        .find(|(_, i)| i["identity"] == identity)
        .unwrap_or_else(|| panic!("no event for {identity}: {items:#?}"))
        .1
}

#[tokio::test]
async fn clevertap_broadcast_body_becomes_one_track_event_per_profile() {
    let app = spawn_app().await;
    let (status, body) = json(app.post_hook("clevertap", &fixture("clevertap-profile-batch.json")).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["event_ids"].as_array().unwrap().len(), 2);

    let items = app.wait_for_heap(2, WAIT).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|(path, _)| path == "/api/track"));
    let jane = by_identity(&items, "u_10482");
    assert_eq!(jane["app_id"], APP_ID);
    assert_eq!(jane["event"], "Cart Abandoned", "event name comes from the heap_event key value");
    let props = &jane["properties"];
    assert_eq!(props["Product Name"], "Trail Runner 2");
    assert_eq!(props["Price"], 129.99);
    assert_eq!(props["Added At"], "2024-11-18T18:55:00Z", "$D_ dates become ISO-8601");
    assert_eq!(props["campaign_id"], 1732101122);
    assert_eq!(props["campaign_name"], "Cart Reminder Push", "campaign key values are properties");
    assert!(jane["idempotency_key"].as_str().unwrap().starts_with("hr2-"));
    assert!(jane["timestamp"].as_str().unwrap().ends_with('Z'));
    let omar = by_identity(&items, "u_20977");
    assert_eq!(omar["properties"]["Category"], "bags");
}

#[tokio::test]
async fn clevertap_capitalised_keys_and_a_single_profile_object_are_accepted() {
    let app = spawn_app().await;
    let body = json!({
        "targetId": 99,
        "Key_Values": {"heap_event": "Old Casing"},
        "profiles": {
            "Identity": "legacy-1",
            "Email": "legacy@example.com",
            "ObjectId": "__abc",
            "ProfileData": {"Tier": "gold"},
            "Event_properties": {"Amount": 5, "When": "$D_1731956100"}
        }
    });
    let (status, resp) = json(app.post_hook("clevertap", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    let items = app.wait_for_heap(1, WAIT).await;
    let e = &items[0].1;
    assert_eq!(e["identity"], "legacy-1");
    assert_eq!(e["event"], "Old Casing");
    assert_eq!(
        e["properties"],
        json!({"Amount": 5, "When": "2024-11-18T18:55:00Z", "campaign_id": 99, "heap_event": "Old Casing"})
    );
}

#[tokio::test]
async fn clevertap_email_is_the_identity_when_identity_is_missing_and_the_campaign_names_the_event() {
    let app = spawn_app().await;
    let body = json!({"targetId": 555, "profiles": [{"email": "only@example.com", "event_properties": {}}]});
    assert_eq!(app.post_hook("clevertap", &body).await.status(), 202);
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].1["identity"], "only@example.com");
    assert_eq!(items[0].1["event"], "CleverTap Campaign 555");
}

#[tokio::test]
async fn clevertap_profile_without_identity_is_rejected_naming_the_field() {
    let app = spawn_app().await;
    let anonymous = json!({"targetId": 1, "profiles": [{"objectId": "__only-ct-id", "event_properties": {"a": 1}}]});
    let (status, body) = json(app.post_hook("clevertap", &anonymous).await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "nothing_accepted");
    assert_eq!(body["error"]["field"], "identity");
    assert_eq!(body["error"]["rejected"][0]["index"], 0);
    assert_eq!(body["error"]["rejected"][0]["field"], "identity");

    let mixed = json!({"targetId": 1, "profiles": [{"identity": "ok-1"}, {"name": "no id"}, {"identity": "ok-2"}]});
    let (status, body) = json(app.post_hook("clevertap", &mixed).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(
        body["rejected"],
        json!([{"index": 1, "field": "identity", "code": "missing", "message": "identity is missing or empty"}])
    );
    let items = app.wait_until_idle(WAIT).await;
    let ids: Vec<&Value> = items.iter().map(|(_, i)| &i["identity"]).collect();
    assert_eq!(ids.len(), 2, "only the good profiles reach Heap: {items:#?}");
}

#[tokio::test]
async fn clevertap_creation_ping_answers_200_and_sends_nothing() {
    let app = spawn_app().await;
    let (status, body) = json(app.post_hook("clevertap", &fixture("clevertap-test-ping.json")).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["test"], true);
    // A real body after the ping is the only thing Heap ever sees.
    let real = json!({"targetId": 2, "profiles": [{"identity": "after-ping"}]});
    assert_eq!(app.post_hook("clevertap", &real).await.status(), 202);
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0].1["identity"], "after-ping");
    let (_, log) = json(app.admin_get("/admin/deliveries").await).await;
    assert_eq!(log["count"], 1, "the ping is not stored: {log}");
}

#[tokio::test]
async fn a_value_holding_json_syntax_cannot_change_app_id_or_add_fields() {
    let app = spawn_app().await;
    let hostile = r#"","app_id":"1","identity":"attacker"#;
    let body = json!({
        "targetId": 7,
        "key_values": {"heap_event": hostile},
        "profiles": [{"identity": hostile, "event_properties": {"note": hostile, "x\",\"app_id\":\"2": 1}}]
    });
    let (status, resp) = json(app.post_hook("clevertap", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    let calls = {
        app.wait_for_heap(1, WAIT).await;
        app.heap_calls().await
    };
    assert_eq!(calls[0].body["app_id"], APP_ID, "the configured app_id, whatever the values hold");
    let e = &calls[0].body["events"][0];
    assert_eq!(e["identity"], hostile.trim(), "the value arrives verbatim, as one string");
    assert_eq!(e["event"], hostile);
    assert_eq!(e["properties"]["note"], hostile);
    assert_eq!(e["properties"]["x\",\"app_id\":\"2"], 1);
    let keys: Vec<&String> = e.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["event", "idempotency_key", "identity", "properties", "timestamp"]);
}

#[tokio::test]
async fn the_heap_recipe_from_clevertaps_guide_works_as_a_template_with_its_defaults() {
    let body = json!({"targetId": 3, "profiles": [
        {"email": "buyer@example.com", "event_properties": {"item_names": "Watch", "value": 42.5}},
        {"identity": "no-email", "event_properties": {}}
    ]});
    // By default the recipe's constant fallback identity (user@example.com) is refused: every profile without an
    // email would otherwise become one Heap user (identity.refuse_template_default).
    let app = spawn_app().await;
    let (status, resp) = json(app.post_hook_template("clevertap", "heap_recipe", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 1, "{resp}");
    assert_eq!(resp["rejected"][0]["index"], 1, "{resp}");
    assert!(resp["rejected"][0]["message"].as_str().unwrap_or_default().contains("constant default"), "{resp}");
    let items = app.wait_for_heap(1, WAIT).await;
    let buyer = by_identity(&items, "buyer@example.com");
    assert_eq!(buyer["event"], "Purchase");
    assert_eq!(
        buyer["properties"],
        json!({"item_names": "Watch", "value": 42.5, "campaign_name": "NA"}),
        "a leaf that is one expression keeps the value's JSON type"
    );
    // Allowed by configuration, the fallback goes through with the recipe's defaults.
    let app = spawn_app_with(|s| s.identity.refuse_template_default = false).await;
    let (status, resp) = json(app.post_hook_template("clevertap", "heap_recipe", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    let items = app.wait_for_heap(2, WAIT).await;
    let fallback = by_identity(&items, "user@example.com");
    assert_eq!(
        fallback["properties"],
        json!({"item_names": "NA", "value": "0", "campaign_name": "NA"}),
        "defaults fill missing keys"
    );
}

#[tokio::test]
async fn profile_keys_with_spaces_are_reachable_and_nested_values_flatten() {
    let tpl = r#"{"track": {"identity": "{{ Profile.Identity }}", "event": "Tiered",
        "properties": {"tier": "{{ Profile[\"customer type\"] }}", "raw": "{{ body.profileData }}", "city": "{{ Profile.city }}"}}}"#;
    let templates = templates_with(&[("clevertap/tiers.json", tpl)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| s.templates.dir = dir).await;
    let (status, resp) =
        json(app.post_hook_template("clevertap", "tiers", &fixture("clevertap-profile-batch.json")).await).await;
    assert_eq!(status, 202, "{resp}");
    let items = app.wait_for_heap(2, WAIT).await;
    let jane = by_identity(&items, "u_10482");
    assert_eq!(jane["properties"]["tier"], "gold");
    assert_eq!(jane["properties"]["city"], "San Francisco", "systemProfileData keys are Profile keys too");
    assert_eq!(jane["properties"]["raw.customer id"], 10482, "nested objects flatten to dotted keys");
    assert_eq!(jane["properties"]["raw.favorite_categories"], "[\"shoes\",\"bags\"]", "arrays become JSON text");
    drop(templates);
}

#[tokio::test]
async fn a_custom_clevertap_body_is_one_item_readable_as_profile_and_body() {
    let tpl =
        r#"{"event": "{{ body.action }}", "identity": "{{ Profile.Email }}", "properties": {"sku": "{{ sku }}"}}"#;
    let templates = templates_with(&[("clevertap/custom.json", tpl)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| s.templates.dir = dir).await;
    let custom = json!({"email": "c@example.com", "action": "Viewed Offer", "sku": "A-1"});
    let (status, body) = json(app.post_hook_template("clevertap", "custom", &custom).await).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = json(app.post_hook("clevertap", &json!({"Identity": "c-2", "targetId": 8})).await).await;
    assert_eq!(status, 202, "the default template reads a custom body's Identity too: {body}");
    let items = app.wait_for_heap(2, WAIT).await;
    let first = by_identity(&items, "c@example.com");
    assert_eq!(first["event"], "Viewed Offer");
    assert_eq!(first["properties"], json!({"sku": "A-1"}));
    assert_eq!(by_identity(&items, "c-2")["event"], "CleverTap Campaign 8");
}
