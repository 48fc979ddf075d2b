//! Request bodies for the scenarios, built from the test fixtures.

use serde_json::Value;

/// Stands for a number in a body (identities, message ids); the load client writes a new one in each request, so no
/// two requests are the same and the relay's dedupe of retries never answers the load in place of storing it.
pub const FRESH: &str = "000000000000";
use std::path::Path;

pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The CleverTap sample with its profiles repeated to `n`, each with its own identity, fresh in every request
/// (`FRESH`: the load client writes a new number there each time).
pub fn clevertap_with(n: usize) -> Value {
    let mut body = fixture("clevertap-profile-batch.json");
    let profiles = body["profiles"].as_array().expect("profiles").clone();
    let out: Vec<Value> = (0..n)
        .map(|i| {
            let mut p = profiles[i % profiles.len()].clone();
            p["identity"] = Value::String(format!("u_{FRESH}_{i}"));
            if p.get("email").is_some() {
                p["email"] = Value::String(format!("u{FRESH}.{i}@example.com"));
            }
            p
        })
        .collect();
    body["profiles"] = Value::Array(out);
    body
}

/// The Segment batch sample (identify, page, track, screen) repeated to `n` messages with distinct messageIds.
pub fn segment_with(n: usize) -> Value {
    let mut body = fixture("segment-batch.json");
    let msgs = body["batch"].as_array().expect("batch").clone();
    let out: Vec<Value> = (0..n)
        .map(|i| {
            let mut m = msgs[i % msgs.len()].clone();
            let id = m["messageId"].as_str().unwrap_or("m").to_owned();
            m["messageId"] = Value::String(format!("{id}-{FRESH}-{i}"));
            if m.get("userId").is_some() {
                m["userId"] = Value::String(format!("u_{FRESH}_{i}"));
            }
            m
        })
        .collect();
    body["batch"] = Value::Array(out);
    body
}

pub struct Scenario {
    pub name: &'static str,
    pub path: &'static str,
    pub body: Vec<u8>,
}

pub fn scenarios() -> Vec<Scenario> {
    let bytes = |v: Value| serde_json::to_vec(&v).expect("serialises");
    vec![
        Scenario { name: "clevertap-2", path: "/hooks/clevertap", body: bytes(clevertap_with(2)) },
        Scenario { name: "clevertap-100", path: "/hooks/clevertap", body: bytes(clevertap_with(100)) },
        Scenario { name: "segment-100", path: "/hooks/segment", body: bytes(segment_with(100)) },
        Scenario { name: "userpilot-1", path: "/hooks/userpilot", body: bytes(userpilot_fresh()) },
    ]
}

/// The Userpilot sample with a fresh user id in every request.
pub fn userpilot_fresh() -> Value {
    let mut body = fixture("userpilot-experience-started.json");
    body["user_id"] = Value::String(format!("u_{FRESH}"));
    body
}
