//! The console in headless Chromium through WebDriver: what an operator does, page by page, each test saving a
//! screenshot (target/console-screenshots/). Every page visited is checked for horizontal scrolling at 1366×768.

use crate::browser::Browser;
use crate::helpers::{ADMIN_TOKEN, spawn_app, spawn_app_with, templates_with};
use serde_json::json;
use std::time::Duration;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

const WAIT: Duration = Duration::from_secs(15);

async fn sign_in(b: &Browser, address: &str, token: &str) {
    b.goto(&format!("{address}/console")).await;
    assert!(b.url().await.ends_with("/console/sign-in"), "an anonymous visit is sent to the sign-in form");
    b.fill("input[name=token]", token).await;
    b.click("form.signin button").await;
}

#[tokio::test]
async fn an_operator_signs_in_and_sees_a_just_ingested_event_with_its_attempts() {
    // Arrange: a Segment event, delivered, beside a small batch with one item the relay refuses.
    let app = spawn_app().await;
    let body = json!({"type": "track", "userId": "u-42", "event": "Plan Upgraded", "messageId": "msg-console-1"});
    assert_eq!(app.post_hook("segment", &body).await.status().as_u16(), 202);
    let batch: Vec<_> = (0..4)
        .map(|i| json!({"type": "track", "userId": format!("u-{i}"), "event": "Trial Started", "messageId": format!("b-{i}")}))
        .chain([json!({"type": "track", "event": "no user", "messageId": "b-refused"})])
        .collect();
    assert_eq!(app.post_hook("segment", &json!({ "batch": batch })).await.status().as_u16(), 202);
    app.wait_for_heap(5, WAIT).await;
    let b = Browser::start().await;

    // Act: sign in.
    sign_in(&b, &app.address, ADMIN_TOKEN).await;

    // Assert: the overview, in words and figures.
    let overview = b.wait_for_text("Heap is answering", WAIT).await;
    assert!(overview.contains("segment"), "the source row is listed:\n{overview}");
    b.assert_fits_width("the overview").await;
    b.screenshot("overview").await;

    // The session cookie carries its flags.
    let cookies = b.cookies().await;
    let c = cookies.iter().find(|c| c["name"] == "heap_relay_console").expect("the session cookie is set");
    assert_eq!(c["httpOnly"], true, "{c}");
    assert_eq!(c["sameSite"], "Strict", "{c}");
    assert_eq!(c["secure"], false, "plain HTTP from a client that is no trusted proxy: not Secure ({c})");
    assert!(c["expiry"].as_i64().is_some(), "the session expires: {c}");

    // The deliveries page filtered by the message id finds the event; its page shows the attempt.
    b.goto(&format!("{}/console/deliveries?key=msg-console-1", app.address)).await;
    b.assert_fits_width("deliveries").await;
    b.click("table tbody a").await;
    let event = b.wait_for_text("Attempts", WAIT).await;
    assert!(event.contains("delivered"), "the event is delivered:\n{event}");
    assert!(event.contains("Plan Upgraded"), "the Heap call as stored is shown:\n{event}");
    assert!(event.contains("200"), "the attempt shows Heap's status:\n{event}");
    b.assert_fits_width("the event page").await;
    b.screenshot("event").await;
    for page in ["failures", "control"] {
        b.goto(&format!("{}/console/{page}", app.address)).await;
        b.assert_fits_width(page).await;
    }

    // The template preview renders a pasted body without storing or sending it.
    b.goto(&format!("{}/console/templates", app.address)).await;
    b.exec("document.querySelector('select[name=source]').value = 'segment'").await;
    b.fill("textarea[name=body]", r#"{"type": "track", "userId": "u-9", "event": "Previewed"}"#).await;
    b.click("form[action='/console/templates/preview'] button").await;
    let preview = b.wait_for_text("Result:", WAIT).await;
    assert!(preview.contains("1 Heap call(s), 0 refusal(s)") && preview.contains("Previewed"), "{preview}");
    b.assert_fits_width("templates").await;
    b.exec("document.getElementById('preview-result').scrollIntoView()").await;
    b.screenshot("templates-preview").await;
    b.close().await;
}

#[tokio::test]
async fn a_refused_event_is_found_under_failures_fixed_in_its_template_and_re_rendered_into_heap() {
    // Arrange: a template that names the event so that Heap refuses it.
    let templates =
        templates_with(&[("segment/promo.json", r#"{"event": "Broken {{ event }}", "identity": "{{ userId }}"}"#)]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| s.templates.dir = dir.clone()).await;
    Mock::given(method("POST"))
        .and(body_string_contains("Broken"))
        .respond_with(ResponseTemplate::new(400).set_body_string(r#"{"error":"event name not allowed"}"#))
        .with_priority(1)
        .mount(&app.heap)
        .await;
    let body = json!({"type": "track", "userId": "u-7", "event": "Trial Started", "messageId": "msg-promo-1"});
    assert_eq!(app.post_hook_template("segment", "promo", &body).await.status().as_u16(), 202);
    let b = Browser::start().await;
    sign_in(&b, &app.address, ADMIN_TOKEN).await;

    // Act 1: the refusal shows as a group under Failures.
    b.goto(&format!("{}/console/failures", app.address)).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !b.text().await.contains("event name not allowed") {
        assert!(std::time::Instant::now() < deadline, "no failure group appeared:\n{}", b.text().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.goto(&format!("{}/console/failures", app.address)).await;
    }
    b.assert_fits_width("failures").await;
    b.screenshot("failures").await;

    // Act 2: fix the template file, re-render the group.
    std::fs::write(
        dir.join("segment/promo.json"),
        r#"{"event": "{{ event }}", "identity": "{{ userId }}", "properties": {"fixed": "yes"}}"#,
    )
    .expect("template fixed");
    b.click("form[action='/console/failures/replay'] input[name=rerender] ~ button").await;
    let job = b.wait_for_text("Done.", WAIT).await;
    let rerendered = job.split("Bodies re-rendered").nth(1).map(str::trim_start);
    assert!(rerendered.is_some_and(|r| r.starts_with('1')), "one body re-rendered:\n{job}");
    b.screenshot("rerender-done").await;

    // Assert: Heap receives the event as today's template renders it; the audit log keeps the action.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let items = crate::helpers::items_of(&app.heap_calls().await);
        if items.iter().any(|(_, i)| i["event"] == "Trial Started" && i["properties"]["fixed"] == "yes") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the re-rendered event never reached Heap: {items:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.goto(&format!("{}/console/control", app.address)).await;
    let control = b.text().await;
    assert!(control.contains("rerender") && control.contains("event name not allowed"), "audit log:\n{control}");
    b.goto(&format!("{}/console/failures", app.address)).await;
    assert!(b.text().await.contains("No failures."), "the group is gone once re-rendered");
    b.close().await;
}

#[tokio::test]
async fn a_wrong_token_and_a_missing_csrf_token_are_refused() {
    let app = spawn_app().await;
    let b = Browser::start().await;

    // A wrong token: the form again, with why, and no session.
    sign_in(&b, &app.address, "not-the-token").await;
    let page = b.wait_for_text("not this relay's", WAIT).await;
    assert!(page.contains("Sign in"), "{page}");
    assert!(b.cookies().await.iter().all(|c| c["name"] != "heap_relay_console"), "no session after a wrong token");
    b.screenshot("wrong-token").await;

    // The right token; then a form posted with the session but without its CSRF token is refused.
    b.fill("input[name=token]", ADMIN_TOKEN).await;
    b.click("form.signin button").await;
    b.wait_for_text("Overview", WAIT).await;
    b.goto(&format!("{}/console/control", app.address)).await;
    b.exec("document.querySelector(\"form[action='/console/control/pause'] input[name=csrf]\").remove()").await;
    b.fill("form[action='/console/control/pause'] input[name=app_id]", "1234567890").await;
    b.click("form[action='/console/control/pause'] button").await;
    let refused = b.wait_for_text("CSRF token is missing", WAIT).await;
    assert!(refused.contains("Not done"), "{refused}");
    b.screenshot("missing-csrf").await;
    assert!(app.app.intake.delivery.pauses(0).is_empty(), "nothing was paused");

    // With its token, a pause of an environment goes through, and the Control page lists it.
    b.goto(&format!("{}/console/control", app.address)).await;
    b.fill("form[action='/console/control/pause'] input[name=environment]", "prod").await;
    b.click("form[action='/console/control/pause'] button").await;
    let control = b.wait_for_text("until resumed", WAIT).await;
    assert!(control.contains("environment prod"), "{control}");
    b.assert_fits_width("control").await;
    b.screenshot("control").await;
    let paused = app.app.intake.delivery.pauses(0);
    assert_eq!(paused, [(heap_relay::store::Scope::Environment("prod".into()), i64::MAX)]);
    b.close().await;
}
