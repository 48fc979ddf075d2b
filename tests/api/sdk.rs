//! Segment's and RudderStack's libraries pointed at the relay by one URL: the exact requests they send (captured
//! from the real libraries, tests/fixtures/sdk/, each naming library and version) replayed against the relay, and
//! environments chosen by write key.

use crate::helpers::*;
use base64::Engine;
use heap_relay::settings::{EnvironmentSettings, Settings};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const PROD_APP: &str = "1111111111";
const DEV_APP: &str = "2222222222";
/// The write key the fixtures were captured with.
const PROD_KEY: &str = "wk_prod_test";
const DEV_KEY: &str = "wk_dev_test";

const FIXTURES: [&str; 5] = [
    "segment-analytics-python-2.4.0.json",
    "segment-analytics-python-2.4.0-gzip.json",
    "rudder-sdk-python-2.1.9.json",
    "segment-analytics-node-3.1.0.json",
    "rudderstack-rudder-sdk-node-3.0.13.json",
];

/// One captured HTTP request: path, headers and body exactly as the library sent them (gzip included).
struct Captured {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn captured(name: &str) -> (String, Vec<Captured>) {
    let f = fixture(&format!("sdk/{name}"));
    let label = format!("{} {}", f["library"].as_str().unwrap(), f["version"].as_str().unwrap());
    let requests = f["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Captured {
            path: r["path"].as_str().unwrap().to_owned(),
            headers: r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap().to_owned(), h[1].as_str().unwrap().to_owned()))
                .collect(),
            body: base64::engine::general_purpose::STANDARD.decode(r["body_base64"].as_str().unwrap()).unwrap(),
        })
        .collect();
    (label, requests)
}

impl Captured {
    /// Sends it again to `base` + `prefix` + its path, with its own headers (Content-Length is recomputed).
    async fn replay(&self, app: &TestApp, prefix: &str) -> (u16, Value) {
        let mut req = app.client.post(format!("{}{prefix}{}", app.address, self.path)).body(self.body.clone());
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("content-length") {
                req = req.header(k, v);
            }
        }
        json(req.send().await.expect("request sent")).await
    }
}

fn basic(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")))
}

/// Two environments, each with its own app_id and write key.
fn two_environments(s: &mut Settings) {
    s.environments.insert("prod".into(), EnvironmentSettings { app_id: PROD_APP.into() });
    s.environments.insert("dev".into(), EnvironmentSettings { app_id: DEV_APP.into() });
    s.sources.segment.write_keys.insert("prod".into(), vec![PROD_KEY.to_owned().into()]);
    s.sources.segment.write_keys.insert("dev".into(), vec![DEV_KEY.to_owned().into()]);
}

#[tokio::test]
async fn each_library_s_captured_batch_gets_200_success_and_heap_gets_each_call_once_even_when_retried() {
    for name in FIXTURES {
        let app = spawn_app_with(two_environments).await;
        let (library, requests) = captured(name);

        let mut ignored = 0;
        for r in &requests {
            let (status, body) = r.replay(&app, "").await;
            assert_eq!(status, 200, "{library}: the libraries treat only 200 as success: {body}");
            assert_eq!(body["success"], true, "{library}: {body}");
            ignored += body["ignored"].as_array().map_or(0, Vec::len);
        }
        assert_eq!(ignored, 2, "{library}: group and alias are reported ignored");
        let items = app.wait_until_idle(WAIT).await;
        let events: Vec<&str> = items.iter().filter_map(|(_, e)| e["event"].as_str()).collect();
        let mut sorted = events.clone();
        sorted.sort();
        assert_eq!(sorted, ["Page viewed", "Screen viewed", "Signed Up"], "{library}: {items:#?}");
        let users: Vec<&Value> =
            items.iter().filter(|(p, _)| p == "/api/add_user_properties").map(|(_, u)| u).collect();
        assert_eq!(users.len(), 1, "{library}: identify once, as user properties: {items:#?}");
        assert_eq!(users[0]["identity"], "u-1");
        assert_eq!(users[0]["properties"]["email"], "u-1@example.com", "{library}");
        assert!(items.iter().all(|(_, e)| e["app_id"] == PROD_APP), "{library}: the write key's environment");
        let track = items.iter().find(|(_, e)| e["event"] == "Signed Up").unwrap();
        assert_eq!(track.1["identity"], "u-1");
        assert_eq!(track.1["properties"]["plan"], "pro", "{library}");

        // The library retries (a timeout on its side, say): the same requests again make no copies.
        for r in &requests {
            let (status, body) = r.replay(&app, "").await;
            assert_eq!(status, 200, "{library}: {body}");
            assert_eq!(body["success"], true);
            assert!(body["duplicates"].as_u64().unwrap_or(0) >= 1, "{library}: {body}");
        }
        assert_eq!(app.wait_until_idle(WAIT).await.len(), 4, "{library}: a retried batch makes no copies");
    }
}

#[tokio::test]
async fn a_base_url_with_a_path_works_under_hooks_segment() {
    let app = spawn_app_with(two_environments).await;
    let (library, requests) = captured("rudder-sdk-python-2.1.9.json");
    let (status, body) = requests[0].replay(&app, "/hooks/segment").await;
    assert_eq!(status, 200, "{library}: {body}");
    assert_eq!(app.wait_until_idle(WAIT).await.len(), 4);
}

#[tokio::test]
async fn each_write_key_s_events_reach_its_own_app_id_and_the_log_and_metrics_show_the_environment() {
    let app = spawn_app_with(two_environments).await;
    let (_, requests) = captured("segment-analytics-python-2.4.0.json");
    // The same batch sent with the dev key (header and body): same messageIds, another project.
    let (status, body) = requests[0].replay(&app, "").await;
    assert_eq!((status, body["success"].clone()), (200, json!(true)), "{body}");
    let mut dev_body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    dev_body["writeKey"] = json!(DEV_KEY);
    let resp = app
        .client
        .post(format!("{}/v1/batch", app.address))
        .header("Authorization", basic(DEV_KEY))
        .header("Content-Type", "application/json")
        .body(dev_body.to_string())
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 200, "{body}");

    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items.iter().filter(|(_, e)| e["app_id"] == PROD_APP).count(), 4, "{items:#?}");
    assert_eq!(items.iter().filter(|(_, e)| e["app_id"] == DEV_APP).count(), 4, "{items:#?}");

    let (_, listed) = json(app.admin_get("/admin/deliveries?environment=dev").await).await;
    assert_eq!(listed["count"], 4, "{listed}");
    assert!(listed["events"].as_array().unwrap().iter().all(|e| e["environment"] == "dev" && e["app_id"] == DEV_APP));
    app.wait_for_metric(
        r#"heap_relay_environment_items_total{source="segment",environment="prod",outcome="accepted"} 4"#,
        WAIT,
    )
    .await;
    app.wait_for_metric(
        r#"heap_relay_environment_items_total{source="segment",environment="dev",outcome="ignored"} 2"#,
        WAIT,
    )
    .await;
}

#[tokio::test]
async fn an_unknown_write_key_gets_401_with_the_code_and_message_the_libraries_read() {
    let app = spawn_app_with(two_environments).await;
    let body = json!({"batch": [{"type": "track", "event": "E", "userId": "u"}]}).to_string();
    for (how, auth) in [("Basic user", Some(basic("wk_unknown"))), ("no credential", None)] {
        let mut req = app.client.post(format!("{}/v1/batch", app.address)).body(body.clone());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let (status, answer) = json(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{how}: {answer}");
        assert_eq!(answer["code"], "unauthorized", "{how}: top-level code for the SDKs: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("write key"), "{how}: {answer}");
        assert_eq!(answer["error"]["code"], "unauthorized", "{how}: the relay's own error object too");
        assert!(!answer.to_string().contains("wk_unknown"), "a presented key is never echoed");
    }
    let (status, answer) = json(
        app.client
            .post(format!("{}/v1/track", app.address))
            .body(json!({"event": "E", "userId": "u", "writeKey": "wk_wrong"}).to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, answer["error"]["field"].clone()), (401, json!("writeKey")), "{answer}");
    assert!(app.heap_calls().await.is_empty());
}

#[tokio::test]
async fn a_write_key_in_the_body_authenticates_routes_and_is_not_stored() {
    let app = spawn_app_with(two_environments).await;
    for (path, id) in [("/v1/track", "m-1"), ("/hooks/segment", "m-2")] {
        let mut body = json!({"event": "Clicked", "userId": "u-9", "messageId": id, "writeKey": DEV_KEY});
        if path == "/hooks/segment" {
            body["type"] = json!("track");
        }
        let (status, answer) = json(app.post(path, body.to_string()).await).await;
        assert!(status == 200 || status == 202, "{path}: {answer}");
        let event_id = answer["event_ids"][0].as_str().unwrap().to_owned();
        let raw = app.app.intake.store.raw_bodies(heap_relay::store::Selector::Id(event_id)).await.unwrap();
        assert_eq!(raw.len(), 1);
        let stored = String::from_utf8_lossy(&raw[0].body).to_string();
        assert!(!stored.contains(DEV_KEY) && !stored.contains("writeKey"), "{path}: a secret, not stored: {stored}");
    }
    let items = app.wait_for_heap(2, WAIT).await;
    assert!(items.iter().all(|(_, e)| e["event"] == "Clicked" && e["app_id"] == DEV_APP), "{items:#?}");
}

#[tokio::test]
async fn the_single_call_routes_take_the_type_from_the_path() {
    let app = spawn_app().await;
    let calls = [
        ("track", json!({"userId": "u-1", "event": "Signed Up", "properties": {"plan": "pro"}})),
        ("identify", json!({"userId": "u-1", "traits": {"email": "u-1@example.com"}})),
        ("page", json!({"userId": "u-1", "name": "Pricing"})),
        ("screen", json!({"userId": "u-1", "name": "Home"})),
        ("group", json!({"userId": "u-1", "groupId": "g"})),
        ("alias", json!({"userId": "u-1", "previousId": "old"})),
    ];
    for (call, body) in &calls {
        let (status, answer) = json(app.post(&format!("/v1/{call}"), body.to_string()).await).await;
        assert_eq!(status, 200, "{call}: {answer}");
        assert_eq!(answer["success"], true, "{call}");
        let ignored = answer["ignored"].as_array().unwrap().len();
        assert_eq!(ignored, usize::from(*call == "group" || *call == "alias"), "{call}: {answer}");
    }
    let items = app.wait_until_idle(WAIT).await;
    let mut events: Vec<&str> = items.iter().filter_map(|(_, e)| e["event"].as_str()).collect();
    events.sort();
    assert_eq!(events, ["Page viewed", "Screen viewed", "Signed Up"]);
    assert_eq!(items.len(), 4, "{items:#?}");
    let (status, answer) = json(app.post("/v1/purchase", "{}").await).await;
    assert_eq!((status, answer["code"].clone()), (404, json!("not_found")), "{answer}");
}

#[tokio::test]
async fn segment_s_size_limits_each_have_their_own_error() {
    let app = spawn_app().await;
    let big = "x".repeat(33 * 1024);
    let (status, answer) =
        json(app.post("/v1/track", json!({"userId": "u", "event": "E", "properties": {"p": big}}).to_string()).await)
            .await;
    assert_eq!((status, answer["code"].clone()), (400, json!("message_too_large")), "{answer}");

    let small = json!({"type": "track", "userId": "u", "event": "E"});
    let batch =
        json!({"batch": [small.clone(), {"type": "track", "userId": "u", "event": "E", "properties": {"p": big}}]});
    let (status, answer) = json(app.post("/v1/batch", batch.to_string()).await).await;
    assert_eq!((status, answer["code"].clone()), (400, json!("message_too_large")), "{answer}");
    assert_eq!(answer["error"]["field"], "batch[1]");

    let many: Vec<Value> = (0..30)
        .map(|i| json!({"type": "track", "userId": "u", "event": "E", "properties": {"p": "y".repeat(20_000), "i": i}}))
        .collect();
    let (status, answer) = json(app.post("/v1/batch", json!({"batch": many}).to_string()).await).await;
    assert_eq!((status, answer["code"].clone()), (400, json!("batch_too_large")), "{answer}");
    assert_eq!(answer["success"], false);

    let (status, answer) = json(app.post("/v1/batch", "{\"batch\": [").await).await;
    assert_eq!((status, answer["code"].clone()), (400, json!("malformed_json")), "{answer}");
    assert!(app.heap_calls().await.is_empty());
}

#[tokio::test]
async fn integrations_heap_false_or_all_false_keep_a_message_out_of_heap() {
    let app = spawn_app().await;
    let m = |id: &str, integrations: Value| json!({"type": "track", "userId": "u", "event": id, "messageId": id, "integrations": integrations});
    let batch = json!({"batch": [
        m("off", json!({"Heap": false})),
        m("all-off", json!({"All": false})),
        m("all-off-heap-on", json!({"All": false, "Heap": true})),
        m("others-off", json!({"Mixpanel": false})),
    ]});
    let (status, answer) = json(app.post("/v1/batch", batch.to_string()).await).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ignored"], json!([0, 1]), "{answer}");
    let items = app.wait_until_idle(WAIT).await;
    let mut events: Vec<&str> = items.iter().filter_map(|(_, e)| e["event"].as_str()).collect();
    events.sort();
    assert_eq!(events, ["all-off-heap-on", "others-off"]);
}

#[tokio::test]
async fn a_device_clock_an_hour_fast_is_corrected_by_received_at_minus_sent_at() {
    let app = spawn_app().await;
    let now = chrono::Utc::now();
    let fast = |d: chrono::Duration| (now + chrono::Duration::hours(1) + d).to_rfc3339();
    // The event happened 10 s before the device sent it, by the device's clock (one hour fast).
    let batch = json!({"batch": [{"type": "track", "userId": "u", "event": "E", "timestamp": fast(chrono::Duration::seconds(-10))}],
        "sentAt": fast(chrono::Duration::zero())});
    let (status, answer) = json(app.post("/v1/batch", batch.to_string()).await).await;
    assert_eq!(status, 200, "{answer}");
    let items = app.wait_for_heap(1, WAIT).await;
    let sent = chrono::DateTime::parse_from_rfc3339(items[0].1["timestamp"].as_str().unwrap()).unwrap();
    let off = (sent.with_timezone(&chrono::Utc) - (now - chrono::Duration::seconds(10))).num_milliseconds().abs();
    assert!(off < 5_000, "the timestamp Heap got is {off} ms from when the event happened: {items:#?}");
}

#[tokio::test]
async fn a_template_naming_another_environment_s_app_id_has_its_items_refused() {
    let templates = templates_with(&[(
        "segment/pinned.json",
        &format!(
            r#"{{"track": {{"app_id": "{DEV_APP}", "identity": "{{{{ identity }}}}", "event": "{{{{ heap_event }}}}"}}}}"#
        ),
    )]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| {
        two_environments(s);
        s.templates.dir = dir;
    })
    .await;
    let body = json!({"type": "track", "userId": "u", "event": "E"}).to_string();
    let send = |key: &'static str| {
        app.client
            .post(format!("{}/hooks/segment/pinned", app.address))
            .header("Authorization", basic(key))
            .body(body.clone())
            .send()
    };
    let (status, answer) = json(send(PROD_KEY).await.unwrap()).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["rejected"][0]["code"], "wrong_environment", "{answer}");
    assert_eq!(answer["error"]["rejected"][0]["field"], "app_id");
    let (status, answer) = json(send(DEV_KEY).await.unwrap()).await;
    assert_eq!(status, 202, "the template's app_id is dev's own: {answer}");
    let items = app.wait_until_idle(WAIT).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].1["app_id"], DEV_APP);
}

#[tokio::test]
async fn a_path_prefix_chooses_the_environment_of_a_sender_without_credentials() {
    let app = spawn_app_with(two_environments).await;
    let (status, answer) =
        json(app.post("/env/dev/hooks/userpilot", fixture("userpilot-nps-score.json").to_string()).await).await;
    assert_eq!(status, 202, "{answer}");
    let items = app.wait_until_idle(WAIT).await;
    assert!(!items.is_empty() && items.iter().all(|(_, e)| e["app_id"] == DEV_APP), "{items:#?}");

    let (status, answer) = json(app.post("/env/staging/hooks/userpilot", "{}").await).await;
    assert_eq!((status, answer["error"]["code"].clone()), (404, json!("unknown_environment")), "{answer}");

    // A credential's environment wins; a path naming another one is refused.
    let resp = app
        .client
        .post(format!("{}/env/prod/v1/track", app.address))
        .header("Authorization", basic(DEV_KEY))
        .body(json!({"userId": "u", "event": "E"}).to_string())
        .send()
        .await
        .unwrap();
    let (status, answer) = json(resp).await;
    assert_eq!((status, answer["code"].clone()), (403, json!("wrong_environment")), "{answer}");
}

#[tokio::test]
async fn a_bearer_token_or_signing_secret_listed_for_an_environment_routes_there() {
    let app = spawn_app_with(|s| {
        two_environments(s);
        s.sources.heap.auth.mode = heap_relay::auth::AuthMode::Bearer;
        s.sources.heap.auth.secret = "tok-default".to_owned().into();
        s.sources.heap.auth.environments.insert("prod".into(), "tok-prod".to_owned().into());
        s.sources.userpilot.auth.mode = heap_relay::auth::AuthMode::HmacUserpilot;
        s.sources.userpilot.auth.secret = "whsec-default".to_owned().into();
        s.sources.userpilot.auth.environments.insert("dev".into(), "whsec-dev".to_owned().into());
    })
    .await;
    // A Heap body names its app_id: prod's token may send to prod's project, not to dev's.
    let heap_body = |app_id: &str| json!({"app_id": app_id, "identity": "u", "event": "E"}).to_string();
    let post_heap = |token: &'static str, body: String| {
        app.client.post(format!("{}/api/track", app.address)).bearer_auth(token).body(body).send()
    };
    let (status, answer) = json(post_heap("tok-prod", heap_body(PROD_APP)).await.unwrap()).await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = json(post_heap("tok-prod", heap_body(DEV_APP)).await.unwrap()).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["rejected"][0]["code"], "wrong_environment");

    let body = fixture("userpilot-nps-score.json").to_string();
    let t = chrono::Utc::now().timestamp();
    let resp = app
        .client
        .post(format!("{}/hooks/userpilot", app.address))
        .header("X-Signature", userpilot_signature("whsec-dev", body.as_bytes(), t))
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, answer) = json(resp).await;
    assert_eq!(status, 202, "{answer}");
    let items = app.wait_until_idle(WAIT).await;
    let userpilot: Vec<_> = items.iter().filter(|(_, e)| e["identity"] != "u").collect();
    assert!(!userpilot.is_empty() && userpilot.iter().all(|(_, e)| e["app_id"] == DEV_APP), "{items:#?}");
    let (_, listed) = json(app.admin_get("/admin/deliveries?environment=prod").await).await;
    let statuses: Vec<&str> =
        listed["events"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["rejected", "delivered"], "the refusal is in the delivery log too: {listed}");
}

#[tokio::test]
async fn the_default_environment_may_share_its_app_id_with_a_named_one() {
    let app = spawn_app_with(|s| {
        two_environments(s);
        s.heap.app_id = PROD_APP.into();
    })
    .await;
    // Userpilot has no credential here: the default environment.
    let (status, answer) = json(app.post_hook("userpilot", &fixture("userpilot-nps-score.json")).await).await;
    assert_eq!(status, 202, "the default environment's own app_id is not another environment's: {answer}");
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].1["app_id"], PROD_APP);
}

#[tokio::test]
async fn a_segment_route_s_error_body_has_success_code_and_message_beside_the_relay_s_error_object() {
    let app = spawn_app().await;
    let (status, body) = json(app.post("/v1/purchase", "{}").await).await;
    let message = "no Segment call \"purchase\"; calls are batch, track, identify, page, screen, group, alias";
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"success": false, "code": "not_found", "message": message,
            "error": {"code": "not_found", "field": null, "message": message}})
    );
    let resp = app.client.get(format!("{}/v1/batch", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 405, "the route exists for POST");
    let resp = app.client.get(format!("{}/hooks/segment/v1/track", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn a_rerender_keeps_the_environment_and_its_app_id() {
    let app = spawn_app_with(two_environments).await;
    let body = json!({"event": "Clicked", "userId": "u-7", "messageId": "rr-1"});
    let resp = app.client.post(format!("{}/v1/track", app.address)).header("Authorization", basic(DEV_KEY)).json(&body);
    let (status, answer) = json(resp.send().await.expect("sent")).await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["event_ids"][0].as_str().unwrap().to_owned();
    app.wait_for_heap(1, WAIT).await;
    let (status, report) = json(app.admin_post("/admin/replay", &json!({"id": id, "rerender": true})).await).await;
    assert_eq!((status, &report["accepted"]), (200, &json!(1)), "{report}");
    let items = app.wait_for_heap(2, WAIT).await;
    assert!(items.iter().all(|(_, e)| e["app_id"] == DEV_APP), "the re-render went to dev's app_id too: {items:#?}");
    let (_, listed) = json(app.admin_get("/admin/deliveries?environment=dev").await).await;
    assert_eq!(listed["count"], 2, "the original (replaced) and its re-render, both in dev: {listed}");
}

#[tokio::test]
async fn a_malformed_body_that_should_carry_its_write_key_is_named_malformed_not_unauthorized() {
    let app = spawn_app_with(two_environments).await;
    let (status, answer) = json(app.post("/v1/track", r#"{"writeKey": "wk_dev_test", "event": "#).await).await;
    assert_eq!((status, answer["code"].clone()), (400, json!("malformed_json")), "{answer}");
    assert!(app.heap_calls().await.is_empty());
}
