//! Templates: broken ones are reported with file and line, edits are picked up without a restart.

use crate::helpers::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_broken_template_does_not_stop_the_relay_its_bodies_are_held_and_a_rerender_after_the_fix_delivers_them() {
    let broken = "{\n  \"event\": \"E\",\n  \"identity\": \"{{ Profile.Email | no_such_filter }}\"\n}\n";
    let templates = templates_with(&[("clevertap/broken.json", broken)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| {
        s.templates.dir = dir.clone();
        s.templates.reload_interval_secs = 1;
    })
    .await;

    let track = json!({"type": "track", "event": "Still Works", "userId": "u1", "messageId": "m-1"});
    assert_eq!(app.post_hook("segment", &track).await.status(), 202);
    let items = app.wait_for_heap(1, Duration::from_secs(10)).await;
    assert_eq!(items[0].1["event"], "Still Works");

    let (status, body) =
        json(app.post_hook_template("clevertap", "broken", &fixture("clevertap-profile-batch.json")).await).await;
    assert_eq!(status, 202, "the broken route keeps taking bodies: {body}");
    let m = body["held"].as_str().unwrap_or_default();
    assert!(m.contains("clevertap/broken.json:3:15: leaf identity:") && m.contains("no_such_filter"), "{m}");
    let (_, held) = json(app.admin_get("/admin/deliveries?status=held").await).await;
    assert_eq!(held["count"], 2, "each profile is held with the template's error: {held}");

    // The fix: the file is corrected; once it loads, a re-render of what was held delivers it.
    std::fs::write(dir.join("clevertap/broken.json"), "{\"event\": \"E\", \"identity\": \"{{ Profile.Email }}\"}")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, report) =
            json(app.admin_post("/admin/replay", &json!({"status": "held", "rerender": true})).await).await;
        assert_eq!(status, 200, "{report}");
        if report["accepted"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the fixed template never repaired the held items: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let items = app.wait_for_heap(3, Duration::from_secs(10)).await;
    let repaired: Vec<_> = items.iter().filter(|(_, e)| e["event"] == "E").collect();
    assert_eq!(repaired.len(), 2, "{items:#?}");
    let (_, left) = json(app.admin_get("/admin/deliveries?status=held").await).await;
    assert_eq!(left["count"], 0, "the held items are replaced by their re-render: {left}");
}

#[tokio::test]
async fn an_edited_template_is_used_without_a_restart_and_a_broken_edit_keeps_the_old_one() {
    let templates = templates_with(&[("segment/live.json", r#"{"event": "Before", "identity": "{{ userId }}"}"#)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| {
        s.templates.dir = dir.clone();
        s.templates.reload_interval_secs = 1;
    })
    .await;
    let msg = json!({"type": "track", "event": "x", "userId": "u1"});
    assert_eq!(app.post_hook_template("segment", "live", &msg).await.status(), 202);
    std::fs::write(dir.join("segment/live.json"), r#"{"event": "After", "identity": "{{ userId }}"}"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(app.post_hook_template("segment", "live", &msg).await.status(), 202);
        let items = app.wait_until_idle(Duration::from_secs(5)).await;
        if items.iter().any(|(_, e)| e["event"] == "After") {
            break;
        }
        assert!(Instant::now() < deadline, "the edited template was not picked up: {items:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(dir.join("segment/live.json"), r#"{"event": "{{ broken", "identity": "u"}"#).unwrap();
    app.wait_for_metric("heap_relay_template_reloads_total{result=\"failed\"} 1", Duration::from_secs(10)).await;
    let (status, body) = json(app.post_hook_template("segment", "live", &msg).await).await;
    assert_eq!(status, 202, "the last good template stays in use: {body}");
}

#[tokio::test]
async fn a_render_error_rejects_only_that_item_naming_template_and_leaf() {
    let tpl = r#"{"event": "E", "identity": "{{ identity }}", "properties": {"n": "{{ n | divided_by: 0 }}"}}"#;
    let templates = templates_with(&[("userpilot/div.json", tpl)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| s.templates.dir = dir).await;
    let (status, body) =
        json(app.post_hook_template("userpilot", "div", &json!({"event": "e", "identity": "u", "n": 4})).await).await;
    assert_eq!(status, 422, "{body}");
    let r = &body["error"]["rejected"][0];
    assert_eq!(r["field"], "template");
    assert_eq!(r["code"], "template_error");
    let m = r["message"].as_str().unwrap();
    assert!(m.contains("userpilot/div.json") && m.contains("leaf properties.n"), "{m}");
}

#[tokio::test]
async fn a_rerender_can_select_the_events_an_older_version_of_a_template_rendered() {
    let templates = templates_with(&[("segment/live.json", r#"{"event": "Old", "identity": "{{ userId }}"}"#)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| {
        s.templates.dir = dir.clone();
        s.templates.reload_interval_secs = 1;
    })
    .await;
    let msg = json!({"type": "track", "event": "x", "userId": "u1"});
    let (_, first) = json(app.post_hook_template("segment", "live", &msg).await).await;
    app.wait_for_heap(1, Duration::from_secs(10)).await;
    let id = first["event_ids"][0].as_str().unwrap().to_owned();
    let (_, ev) = json(app.admin_get(&format!("/admin/deliveries/{id}")).await).await;
    let old_version = ev["template_version"].as_str().expect("the event keeps its template's version").to_owned();

    std::fs::write(dir.join("segment/live.json"), r#"{"event": "New", "identity": "{{ userId }}"}"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, report) =
            json(app.admin_post("/admin/replay", &json!({"stale_template": "segment/live", "rerender": true})).await)
                .await;
        assert_eq!(status, 200, "{report}");
        if report["accepted"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the edited template was never picked up: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let items = app.wait_for_heap(2, Duration::from_secs(10)).await;
    assert_eq!(items[1].1["event"], "New", "{items:#?}");
    let (_, after) = json(app.admin_get("/admin/deliveries?status=pending").await).await;
    let (_, all) = json(app.admin_get("/admin/deliveries").await).await;
    let versions: Vec<&str> =
        all["events"].as_array().unwrap().iter().filter_map(|e| e["template_version"].as_str()).collect();
    assert!(versions.iter().any(|v| *v != old_version), "the re-render carries the new version: {versions:?} {after}");
}
