//! Userpilot event webhooks: Heap's own Userpilot event names, metadata as properties.

use crate::helpers::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn userpilot_experience_started_becomes_the_event_heaps_integration_names() {
    let app = spawn_app().await;
    let (status, body) = json(app.post_hook("userpilot", &fixture("userpilot-experience-started.json")).await).await;
    assert_eq!(status, 202, "{body}");
    let items = app.wait_for_heap(1, WAIT).await;
    let (path, e) = &items[0];
    assert_eq!(path, "/api/track");
    assert_eq!(e["identity"], "u_10482");
    assert_eq!(e["event"], "Userpilot Experience (started)");
    assert_eq!(e["timestamp"], "2024-11-18T19:10:00.000Z", "Userpilot's epoch seconds become ISO-8601");
    assert_eq!(
        e["properties"],
        json!({
            "experience_id": 448, "experience_title": "New project tour", "experience_type": "flow",
            "step_id": "s_1", "step_number": 1, "total_steps": 5,
            "userpilot_event": "flow_started", "company_id": "c_acme",
            "hostname": "app.acme.example", "pathname": "/projects/new"
        })
    );
}

#[tokio::test]
async fn userpilot_nps_checklist_form_and_unknown_types_are_named_as_documented() {
    let app = spawn_app().await;
    let mut nps = fixture("userpilot-nps-score.json");
    assert_eq!(app.post_hook("userpilot", &nps).await.status(), 202);
    for (event, _) in
        [("checklist_task_completed", 0), ("form_submitted", 1), ("nps_ask_later", 2), ("banner_clicked", 3)]
    {
        nps["event"] = json!(event);
        nps["metadata"] = json!({"responses": [{"question": "Why?", "answer": "Because \"quotes\""}]});
        assert_eq!(app.post_hook("userpilot", &nps).await.status(), 202);
    }
    let items = app.wait_for_heap(5, WAIT).await;
    let mut names: Vec<&str> = items.iter().map(|(_, e)| e["event"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Userpilot Checklist (task completed)",
            "Userpilot Form (submitted)",
            "Userpilot NPS (ask later)",
            "Userpilot NPS (score)",
            "Userpilot banner_clicked"
        ]
    );
    let score = items.iter().find(|(_, e)| e["event"] == "Userpilot NPS (score)").unwrap();
    assert_eq!(score.1["properties"]["score"], 9);
    assert_eq!(score.1["properties"]["survey_title"], "Quarterly NPS");
    let form = items.iter().find(|(_, e)| e["event"] == "Userpilot Form (submitted)").unwrap();
    assert_eq!(form.1["properties"]["responses"], r#"[{"answer":"Because \"quotes\"","question":"Why?"}]"#);
}

#[tokio::test]
async fn userpilot_user_properties_go_to_add_user_properties_when_the_template_asks() {
    let app = spawn_app().await;
    let (status, body) = json(
        app.post_hook_template("userpilot", "with_user_properties", &fixture("userpilot-experience-started.json"))
            .await,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2);
    let items = app.wait_for_heap(2, WAIT).await;
    let (_, users) = items.iter().find(|(p, _)| p == "/api/add_user_properties").expect("a user-properties call");
    assert_eq!(users["identity"], "u_10482");
    assert_eq!(
        users["properties"],
        json!({"name": "Jane Doe", "email": "jane.doe@example.com", "plan": "growth", "created_at": "2024-02-11T09:30:00Z",
               "company.name": "Acme Inc", "company.plan": "enterprise", "company.seats": 48})
    );
    assert!(items.iter().any(|(p, _)| p == "/api/track"));
}

#[tokio::test]
async fn a_userpilot_event_without_user_id_is_rejected_naming_identity() {
    let app = spawn_app().await;
    let mut body = fixture("userpilot-nps-score.json");
    body.as_object_mut().unwrap().remove("user_id");
    let (status, resp) = json(app.post_hook("userpilot", &body).await).await;
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["error"]["field"], "identity");
}

#[tokio::test]
async fn an_event_without_user_properties_still_sends_its_track_event_with_the_user_properties_template() {
    let app = spawn_app().await;
    let mut body = fixture("userpilot-nps-score.json");
    body["user_properties"] = json!({});
    body["company_properties"] = json!({});
    let (status, resp) = json(app.post_hook_template("userpilot", "with_user_properties", &body).await).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["accepted"], 1, "the track event alone: {resp}");
    let items = app.wait_for_heap(1, WAIT).await;
    assert_eq!(items[0].0, "/api/track");
}
