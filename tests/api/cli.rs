//! `heap-relay render` and `heap-relay check`, run as a user would.

use crate::helpers::*;
use serde_json::Value;
use std::process::Command;

fn relay(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_heap-relay"))
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn render_prints_the_heap_calls_a_body_would_produce() {
    let (code, out, err) = relay(
        &["render", "clevertap", "tests/fixtures/clevertap-profile-batch.json"],
        &[("HEAP_RELAY__HEAP__APP_ID", APP_ID)],
    );
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).expect("JSON on stdout");
    let calls = doc["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["endpoint"], "/api/track");
    assert_eq!(calls[0]["body"]["app_id"], APP_ID);
    assert_eq!(calls[0]["body"]["event"], "Cart Abandoned");
}

#[test]
fn render_names_the_rejected_field_and_a_malformed_file_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"profiles\": [\n {\"name\": \"x\"}\n]}").unwrap();
    let (code, out, _) =
        relay(&["render", "clevertap", bad.to_str().unwrap()], &[("HEAP_RELAY__HEAP__APP_ID", APP_ID)]);
    assert_eq!(code, 1);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rejected"][0]["field"], "identity");
    std::fs::write(&bad, "{\"profiles\": [\n {\"name\": }\n]}").unwrap();
    let (code, _, err) = relay(&["render", "clevertap", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("line 2, column 11"), "{err}");
}

#[test]
fn check_passes_on_the_shipped_templates_and_names_each_broken_one() {
    let (code, out, err) = relay(&["check"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok:"), "{out}");
    let templates =
        templates_with(&[("segment/one.json", "{\n\"event\": \"{% if %}\"\n}"), ("segment/two.json", "{ not json")]);
    let (code, out, _) = relay(&["check"], &[("HEAP_RELAY__TEMPLATES__DIR", templates.path().to_str().unwrap())]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("segment/one.json:2:"), "{out}");
    // Not JSON, so a text template: it loads, and rendering it against an empty profile shows the fault.
    assert!(out.contains("segment/two.json") && out.contains("line 1 column 3"), "{out}");
    assert!(out.contains("2 problem(s)"), "{out}");
}

#[test]
fn a_named_config_file_that_cannot_be_read_is_fatal() {
    let (code, _, err) = relay(&["--config", "/nonexistent/relay.toml", "check"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/relay.toml"), "{err}");
}

#[test]
fn render_repairs_a_nul_or_lone_surrogate_as_serve_does_and_prints_what_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nul.json");
    let body =
        r#"{"type": "track", "event": "E", "userId": "u1", "properties": {"note": "a\u0000b", "mark": "x\ud800y"}}"#;
    std::fs::write(&file, body).unwrap();
    let (code, out, err) =
        relay(&["render", "segment", file.to_str().unwrap()], &[("HEAP_RELAY__HEAP__APP_ID", APP_ID)]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(
        doc["sanitized"],
        serde_json::json!([
            {"field": "properties.note", "change": "nul_removed"},
            {"field": "properties.mark", "change": "lone_surrogate_replaced"}
        ]),
        "{out}"
    );
    assert_eq!(doc["sanitized_count"], 2);
    assert_eq!(doc["calls"][0]["body"]["properties"]["note"], "ab");
    assert_eq!(doc["calls"][0]["body"]["properties"]["mark"], "x\u{fffd}y");
    assert!(err.contains("2 value(s) repaired"), "{err}");
}

#[test]
fn deliveries_checks_its_filters_as_the_admin_listing_does_and_names_every_status() {
    let (code, _, err) = relay(&["deliveries", "--status", "lost"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("one of pending, retrying, delivered, dead, rejected, replaced, held"), "{err}");
}
