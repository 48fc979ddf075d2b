//! Property-based tests of flattening and rendering: whatever JSON a sender puts in any field, the relay builds
//! valid Heap JSON whose app_id and identity are the configured or template-given ones, never text from a value;
//! and the strict parser never panics, whatever the bytes.

use crate::helpers::*;
use heap_relay::domain::{Properties, PropertyLimits, Timestamp};
use heap_relay::ingest::{Pipeline, Route};
use heap_relay::json::{JsonLimits, parse};
use heap_relay::sources::Source;
use heap_relay::startup::build_pipeline;
use heap_relay::templates::TemplateStore;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Strings meant to break out of a field: quotes, JSON and Liquid syntax, app_id and identity lookalikes,
/// control characters and non-ASCII text.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#"","app_id":"666","identity":"attacker"#.to_owned()),
        Just("{{ app_id }}{% raw %}".to_owned()),
        Just("\"}]}".to_owned()),
        Just("app_id".to_owned()),
        Just("666".to_owned()),
        Just("\u{202e}\u{0007}\t\r\n".to_owned()),
        "[ -~]{0,40}",
        "\\PC{0,20}",
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((hostile_string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128)
}

const FIXED_TEMPLATE: &str = r#"{
  "identity": "fixed-user",
  "event": "{{ Profile.name | default: 'Fallback' }}",
  "properties": {"v": "{{ Profile.v }}", "text": "v={{ Profile.v }}", "...event": "{{ Event }}"}
}"#;

fn pipeline() -> (Pipeline, tempfile::TempDir) {
    let dir = templates_with(&[("clevertap/fixed.json", FIXED_TEMPLATE)]);
    let mut settings = heap_relay::settings::Settings::defaults();
    settings.heap.app_id = APP_ID.into();
    settings.templates.dir = dir.path().to_owned();
    let templates = TemplateStore::load(dir.path()).expect("templates load");
    (build_pipeline(&settings, Arc::new(templates)), dir)
}

/// Every accepted call serialises to JSON that parses back, with the configured app_id and `identity`.
fn assert_calls(p: &Pipeline, template: Option<&str>, body: &Value, identity: &str) -> Result<(), TestCaseError> {
    let route = Route::Hook { source: Source::CleverTap, template: template.map(str::to_owned) };
    let bytes = serde_json::to_vec(body).expect("serialises");
    let out = p.ingest(&route, &bytes, &Timestamp::now()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for a in &out.accepted {
        let text = a.call.single_body().to_string();
        let back: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back["app_id"], &json!(APP_ID), "{}", text);
        prop_assert_eq!(&back["identity"], &json!(identity), "{}", text);
        let keys: Vec<&String> = back.as_object().expect("object").keys().collect();
        for k in keys {
            prop_assert!(
                ["app_id", "identity", "event", "timestamp", "idempotency_key", "properties"].contains(&k.as_str()),
                "unexpected top-level key {k}: {text}"
            );
        }
        if let Some(props) = back.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                prop_assert!(!k.trim().is_empty());
                prop_assert!(v.is_string() || v.is_number() || v.is_boolean(), "{k}: {v}");
            }
        }
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES raises the count for a longer run (scripts/fuzz falls back to this when cargo-fuzz is missing).
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn flattening_any_value_gives_scalar_properties_or_an_error_naming_properties(v in any_json(), k in hostile_string()) {
        let limits = PropertyLimits { max_count: 50, max_key_chars: 64, max_value_chars: 64 };
        match Properties::flatten(&json!({ k.clone(): v }), &limits) {
            Ok(p) => {
                prop_assert!(p.len() <= 50);
                for (key, value) in p.as_map() {
                    prop_assert!(key.chars().count() <= 64 && !key.trim().is_empty());
                    prop_assert!(value.is_string() || value.is_number() || value.is_boolean(), "{}", value);
                    if let Value::String(s) = value {
                        prop_assert!(s.chars().count() <= 64);
                    }
                }
            }
            Err(e) => prop_assert!(e.field.starts_with("properties"), "{}", e.field),
        }
    }

    #[test]
    fn any_value_in_any_field_keeps_the_template_given_identity_and_configured_app_id(
        name in any_json(), v in any_json(), event in any_json(), extra in any_json()
    ) {
        let (p, _dir) = pipeline();
        let body = json!({"profiles": [{
            "identity": "someone-else", "app_id": "666",
            "profileData": {"name": name, "v": v, "app_id": "666", "identity": "attacker"},
            "event_properties": event, "extra": extra,
        }], "key_values": {"app_id": "666"}});
        assert_calls(&p, Some("fixed"), &body, "fixed-user")?;
    }

    #[test]
    fn any_value_in_the_default_template_fields_keeps_the_profile_identity_and_configured_app_id(
        data in any_json(), event in any_json(), kv in hostile_string(), target in any_json()
    ) {
        let (p, _dir) = pipeline();
        let body = json!({"targetId": target, "key_values": {"heap_event": kv, "app_id": "666"}, "profiles": [{
            "identity": "u-1", "profileData": data, "event_properties": event,
        }]});
        assert_calls(&p, None, &body, "u-1")?;
    }

    #[test]
    fn the_strict_parser_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse(&bytes, &JsonLimits::default());
    }

    #[test]
    fn the_strict_parser_agrees_with_serde_json_on_valid_json_without_duplicates(v in any_json()) {
        let text = serde_json::to_string(&v).expect("serialises");
        // serde_json's Map has unique keys and the generator nests 4 deep at most, so the strict parser accepts
        // the text and reads the same value serde_json does (floats included: both parse them the same way).
        let expected: Value = serde_json::from_str(&text).expect("serde_json reads its own output");
        if !text.contains("\\u0000") {
            prop_assert_eq!(parse(text.as_bytes(), &JsonLimits::default()).map_err(|e| e.to_string()), Ok(expected));
        }
    }
}
