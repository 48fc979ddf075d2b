//! Every documented 4xx, with its whole body: `{"error": {"code", "message", "field"}}`.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn malformed_json_is_400_with_line_and_column() {
    let app = spawn_app().await;
    let (status, body) =
        json(app.post("/hooks/clevertap", "{\n  \"profiles\": [\n    {\"identity\": \"u\",}\n  ]\n}").await).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"code": "malformed_json", "field": "body",
            "message": "malformed JSON at line 3, column 22: trailing comma"}})
    );
}

#[tokio::test]
async fn unknown_template_and_traversal_attempts_are_404_naming_the_template() {
    let app = spawn_app().await;
    let (status, body) = json(app.post("/hooks/clevertap/nope", "{}").await).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": {"code": "unknown_template", "field": "template",
            "message": "no template \"nope\" for source clevertap (looked for templates/clevertap/nope.json)"}})
    );
    for path in ["/hooks/clevertap/..%2F..%2Fetc%2Fpasswd", "/hooks/clevertap/default.json", "/hooks/segment/%2e%2e"] {
        let (status, body) = json(app.post(path, "{}").await).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body["error"]["code"] == "unknown_template" || body["error"]["code"] == "not_found", "{path}: {body}");
    }
}

#[tokio::test]
async fn unknown_source_is_404_and_a_wrong_method_is_405() {
    let app = spawn_app().await;
    let (status, body) = json(app.post("/hooks/mixpanel", "{}").await).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_source");
    assert_eq!(body["error"]["field"], "source");
    let resp = app.client.get(format!("{}/hooks/clevertap", app.address)).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_nothing_is_stored() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 1000).await;
    let big = json!({"profiles": [{"identity": "u", "pad": "x".repeat(2000)}]}).to_string();
    let (status, body) = json(app.post("/hooks/clevertap", big).await).await;
    assert_eq!(status, 413);
    assert_eq!(
        body,
        json!({"error": {"code": "body_too_large", "field": null,
            "message": "the body is larger than 1000 bytes (server.max_body_bytes)"}})
    );
    let (_, log) = json(app.admin_get("/admin/deliveries").await).await;
    assert_eq!(log["count"], 0);
}

#[tokio::test]
async fn a_body_that_is_not_the_sources_shape_is_400_naming_the_field() {
    let app = spawn_app().await;
    let (status, body) = json(app.post("/hooks/clevertap", r#"{"targetId": 1, "profiles": "everyone"}"#).await).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"code": "invalid_body", "field": "profiles", "message": "profiles must be an array or an object"}})
    );
    let (status, body) = json(app.post("/hooks/segment", "\"just a string\"").await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "body");
}

#[tokio::test]
async fn without_an_app_id_events_are_rejected_naming_app_id() {
    let app = spawn_app_with(|s| s.heap.app_id = String::new()).await;
    let (status, body) = json(app.post_hook("clevertap", &json!({"profiles": [{"identity": "u"}]})).await).await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "app_id");
    assert!(body["error"]["rejected"][0]["message"].as_str().unwrap().contains("heap.app_id"));
}
