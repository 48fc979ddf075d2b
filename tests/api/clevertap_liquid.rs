//! CleverTap payloads work unchanged: text templates pasted from CleverTap's editor, Liquid that forgives missing
//! data, CleverTap's dialect, and template examples run by `heap-relay test` and `heap-relay check`.

use crate::helpers::*;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn charged_template() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clevertap-liquid/charged.liquid");
    std::fs::read_to_string(path).expect("fixture")
}

async fn app_with(extra: &[(&str, &str)]) -> (TestApp, tempfile::TempDir) {
    let templates = templates_with(extra);
    let dir = templates.path().to_owned();
    (spawn_app_with(|s| s.templates.dir = dir).await, templates)
}

#[tokio::test]
async fn a_payload_pasted_from_clevertaps_editor_renders_unchanged_against_a_full_and_a_sparse_profile() {
    let (app, _t) = app_with(&[("clevertap/charged.liquid", &charged_template())]).await;
    let full = json!({
        "identity": "u_1", "email": "jane@example.com",
        "profileData": {"points": 1200, "credit_points": 300, "city": "Pune"},
        "event_properties": {"Amount": 129.5, "Charged Date": "$D_1731956100", "NPS Score": 9,
            "Items": [{"name": "trail RUNNER", "price": 99.5}, {"name": "socks", "price": 30}]}
    });
    let sparse = json!({"email": "omar@example.com"});
    let body = json!({"targetId": 1732101122, "profiles": [full, sparse]});
    let (status, resp) = json(app.post_hook_template("clevertap", "charged", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 2, "{resp}");
    let items = app.wait_for_heap(2, WAIT).await;
    let by = |who: &str| items.iter().find(|(_, e)| e["identity"] == who).map(|(_, e)| e.clone()).expect(who);

    let jane = by("jane@example.com");
    assert_eq!(jane["app_id"], APP_ID);
    let p = &jane["properties"];
    assert_eq!(p["total"], 129.5);
    assert_eq!(p["points_after"], 1400);
    assert_eq!(p["credit_left"], 4700);
    assert_eq!(p["charged_on"], "2024-11-18");
    assert_eq!(p["charged_at"], "2024-11-18 18:55:00", "CleverTap's default date format");
    assert_eq!(p["nps"], 9);
    assert_eq!(p["city"], "Pune");
    assert_eq!(p["campaign"], 1732101122);
    assert_eq!(p["link"], "https://shop.example/r?u=jane@example.com");
    // Heap properties are flat: the relay's validation sends an array of objects as its JSON text.
    let items: Value = serde_json::from_str(p["items"].as_str().expect("items as text")).expect("JSON");
    assert_eq!(items, json!([{"name": "Trail runner", "price": 99.5}, {"name": "Socks", "price": 30}]), "{p}");
    assert_eq!(p["item_count"], 2);
    assert_eq!(p["tier"], "gold", "assign carries from the prelude into the payload");

    let omar = by("omar@example.com");
    let p = &omar["properties"];
    assert_eq!(p["points_after"], 200, "nil + 200 is 200, as in Shopify");
    assert_eq!(p["credit_left"], 5000);
    assert_eq!(p["city"], "unknown");
    assert_eq!(p["item_count"], 0);
    assert_eq!(p["tier"], "silver");
    for absent in ["total", "charged_on", "charged_at", "nps", "nickname"] {
        assert!(p.get(absent).is_none(), "{absent} renders to nothing and is left out: {p}");
    }
}

#[tokio::test]
async fn abort_skips_the_profile_and_reports_it_ignored_not_refused() {
    let (app, _t) = app_with(&[("clevertap/charged.liquid", &charged_template())]).await;
    let body = json!({"targetId": 1, "profiles": [
        {"email": "gone@example.com", "profileData": {"unsubscribed": true}},
        {"email": "kept@example.com"}
    ]});
    let (status, resp) = json(app.post_hook_template("clevertap", "charged", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["ignored"], json!([0]), "{resp}");
    assert_eq!(resp["rejected"], json!([]), "{resp}");
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].1["identity"], "kept@example.com");
}

#[tokio::test]
async fn hostile_values_in_a_text_template_stay_inside_their_fields() {
    let tpl = r##"{"app_id": "{{ KeyValues.app | default: "1234567890" | replace: "x", "" }}""##.to_owned()
        + r#", "identity": "{{ Profile.Identity }}", "event": "E {{ Profile.name }}", "#
        + r#""properties": {"n": {{ Profile.name }}, "q": "{{ Profile.name | upcase }}!"}}"#;
    let (app, _t) = app_with(&[("clevertap/hostile.liquid", &tpl)]).await;
    let hostile = [
        "\",\"app_id\":\"1",
        "\\\"}, \"app_id\": \"2\", \"x\": {\"",
        "new\nline\ttab\\",
        "{{ Profile.Identity }}{% abort %}",
    ];
    let profiles: Vec<Value> =
        hostile.iter().enumerate().map(|(i, h)| json!({"identity": format!("h{i}"), "name": h})).collect();
    let (status, resp) =
        json(app.post_hook_template("clevertap", "hostile", &json!({"targetId": 1, "profiles": profiles})).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 4, "{resp}");
    let items = app.wait_for_heap(4, WAIT).await;
    for (i, h) in hostile.iter().enumerate() {
        let (_, e) = items.iter().find(|(_, e)| e["identity"] == format!("h{i}")).expect("each profile arrives");
        assert_eq!(e["app_id"], APP_ID, "{h:?}");
        assert_eq!(e["event"], format!("E {h}"));
        assert_eq!(e["properties"], json!({"n": h, "q": format!("{}!", h.to_uppercase())}), "{h:?}");
    }
}

#[tokio::test]
async fn partials_from_the_sources_partials_directory_are_included_and_escaped() {
    let (app, _t) = app_with(&[
        (
            "clevertap/_partials/who.liquid",
            r#""identity": "{{ Profile.Identity }}", "properties": {"who": "{{ Profile.name }}"}"#,
        ),
        ("clevertap/with_partial.liquid", r#"{"event": "E", {% include 'who' %}}"#),
    ])
    .await;
    let body = json!({"profiles": [{"identity": "p1", "name": "A \"quoted\" name"}]});
    let (status, resp) = json(app.post_hook_template("clevertap", "with_partial", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].1["identity"], "p1");
    assert_eq!(items[0].1["properties"]["who"], "A \"quoted\" name");
}

fn relay(args: &[&str], templates: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_heap-relay"))
        .args(args)
        .env("HEAP_RELAY__TEMPLATES__DIR", templates)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn heap_relay_test_passes_on_the_shipped_templates_and_fails_with_a_diff_on_a_wrong_expectation() {
    let (code, out) = relay(&["test"], &repo_templates());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 failed"), "{out}");

    let templates = templates_with(&[]);
    let case = templates.path().join("clevertap/default.tests/broadcast.json");
    let mut example: Value = serde_json::from_str(&std::fs::read_to_string(&case).unwrap()).unwrap();
    example["calls"][0]["body"]["event"] = json!("Wrong Name");
    std::fs::write(&case, example.to_string()).unwrap();
    let (code, out) = relay(&["test"], templates.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL") && out.contains("broadcast.json"), "{out}");
    assert!(out.contains("-         \"event\": \"Wrong Name\","), "{out}");
    assert!(out.contains("+         \"event\": \"Cart Abandoned\","), "{out}");
}

#[test]
fn check_reports_render_time_failures_before_deploy() {
    let templates = templates_with(&[
        ("clevertap/no_partial.liquid", r#"{"event": "E", {% include 'missing' %}}"#),
        (
            "clevertap/div.json",
            r#"{"event": "E", "identity": "u", "properties": {"r": "{{ 10 | divided_by: Profile.n }}"}}"#,
        ),
    ]);
    let (code, out) = relay(&["check"], templates.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no_partial.liquid") && out.contains("missing"), "{out}");
    assert!(out.contains("div.json") && out.contains("leaf properties.r"), "{out}");
    assert!(out.contains("empty profile"), "{out}");
    assert!(out.contains("2 problem(s)"), "{out}");
}
