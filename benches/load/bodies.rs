//! Request bodies for the scenarios, built from the test fixtures.

use serde_json::Value;
use std::path::Path;

pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The CleverTap sample with its profiles repeated to `n`, each with its own identity.
pub fn clevertap_with(n: usize) -> Value {
    let mut body = fixture("clevertap-profile-batch.json");
    let profiles = body["profiles"].as_array().expect("profiles").clone();
    let out: Vec<Value> = (0..n)
        .map(|i| {
            let mut p = profiles[i % profiles.len()].clone();
            p["identity"] = Value::String(format!("u_{i}"));
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
            m["messageId"] = Value::String(format!("{id}-{i}"));
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
        Scenario {
            name: "clevertap-2",
            path: "/hooks/clevertap",
            body: bytes(fixture("clevertap-profile-batch.json")),
        },
        Scenario { name: "clevertap-100", path: "/hooks/clevertap", body: bytes(clevertap_with(100)) },
        Scenario { name: "segment-100", path: "/hooks/segment", body: bytes(segment_with(100)) },
        Scenario {
            name: "userpilot-1",
            path: "/hooks/userpilot",
            body: bytes(fixture("userpilot-experience-started.json")),
        },
    ]
}
