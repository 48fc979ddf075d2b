//! The console over plain HTTP: when it exists, who may sign in and act, the cookie's flags, `POST /admin/preview`,
//! the store reads behind its pages (keyset pages, failures, the last hour) and their query plans.

use crate::helpers::{ADMIN_TOKEN, APP_ID, TestApp, json, spawn_app, spawn_app_with, templates_with};
use heap_relay::settings::EnvironmentSettings;
use heap_relay::store::queries::EventFilter;
use heap_relay::store::{Query, Scope, Status};
use serde_json::json;
use std::time::Duration;

const READONLY_TOKEN: &str = "test-readonly-token-42";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// Signs in with `token` and returns the answer (its Set-Cookie carries the session).
async fn sign_in_raw(app: &TestApp, token: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = no_redirects()
        .post(format!("{}/console/sign-in", app.address))
        .header("Origin", &app.address)
        .form(&[("token", token)]);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("sign-in sent")
}

/// A signed-in session: (cookie header value, CSRF token from a page).
async fn session(app: &TestApp, token: &str) -> (String, String) {
    let resp = sign_in_raw(app, token, &[]).await;
    assert_eq!(resp.status().as_u16(), 303, "a good token signs in");
    let set = resp.headers().get("set-cookie").and_then(|v| v.to_str().ok()).expect("a session cookie").to_owned();
    let cookie = set.split(';').next().unwrap_or_default().to_owned();
    let page = get(app, "/console/control", &cookie).await.text().await.unwrap_or_default();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("pages carry the CSRF token")
        .to_owned();
    (cookie, csrf)
}

async fn get(app: &TestApp, path: &str, cookie: &str) -> reqwest::Response {
    no_redirects().get(format!("{}{path}", app.address)).header("Cookie", cookie).send().await.expect("sent")
}

async fn post_form(app: &TestApp, path: &str, cookie: &str, origin: &str, form: &[(&str, &str)]) -> reqwest::Response {
    no_redirects()
        .post(format!("{}{path}", app.address))
        .header("Cookie", cookie)
        .header("Origin", origin)
        .form(form)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn the_console_does_not_exist_without_an_admin_token() {
    let app = spawn_app_with(|s| s.admin.token = String::new().into()).await;
    for path in ["/console", "/console/sign-in", "/console/failures"] {
        let status = app.client.get(format!("{}{path}", app.address)).send().await.expect("sent").status();
        assert_eq!(status.as_u16(), 404, "{path}");
    }
}

#[tokio::test]
async fn pages_send_a_visitor_without_a_session_to_sign_in_and_carry_no_script() {
    let app = spawn_app().await;
    let resp = get(&app, "/console/deliveries", "heap_relay_console=admin.99999999999999.00.forged").await;
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(resp.headers()["location"], "/console/sign-in");
    let (cookie, _) = session(&app, ADMIN_TOKEN).await;
    for path in ["/console", "/console/deliveries", "/console/failures", "/console/templates", "/console/control"] {
        let resp = get(&app, path, &cookie).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let page = resp.text().await.unwrap_or_default();
        assert!(!page.contains("<script"), "{path} works without JavaScript: it has no script");
    }
}

#[tokio::test]
async fn the_session_cookie_is_httponly_strict_expiring_and_secure_behind_a_trusted_tls_proxy() {
    let app = spawn_app_with(|s| s.server.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let plain = sign_in_raw(&app, ADMIN_TOKEN, &[]).await;
    let cookie = plain.headers()["set-cookie"].to_str().expect("ascii").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/console"] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "not Secure over plain HTTP: {cookie}");
    let tls =
        sign_in_raw(&app, ADMIN_TOKEN, &[("X-Forwarded-Proto", "https"), ("Origin", "https://relay.example")]).await;
    // Behind the proxy the page's origin is https://<Host>: the Origin above names another host, so it is refused.
    assert_eq!(tls.status().as_u16(), 403);
    let host = app.address.trim_start_matches("http://").to_owned();
    let resp = no_redirects()
        .post(format!("{}/console/sign-in", app.address))
        .header("X-Forwarded-Proto", "https")
        .header("Origin", format!("https://{host}"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .expect("sent");
    let cookie = resp.headers()["set-cookie"].to_str().expect("ascii").to_owned();
    assert!(cookie.contains("Secure"), "Secure over TLS through a trusted proxy: {cookie}");
}

#[tokio::test]
async fn sign_in_attempts_are_throttled_per_address() {
    let app = spawn_app_with(|s| s.console.sign_in_attempts_per_minute = 3).await;
    for i in 0..3 {
        assert_eq!(sign_in_raw(&app, "wrong", &[]).await.status().as_u16(), 401, "attempt {i}");
    }
    let throttled = sign_in_raw(&app, ADMIN_TOKEN, &[]).await;
    assert_eq!(throttled.status().as_u16(), 429, "even the right token waits out the minute");
    assert_eq!(throttled.headers()["retry-after"], "60");
}

#[tokio::test]
async fn state_changes_need_the_csrf_token_the_same_origin_and_an_admin_session() {
    let app = spawn_app_with(|s| s.console.readonly_token = READONLY_TOKEN.to_owned().into()).await;
    let (cookie, csrf) = session(&app, ADMIN_TOKEN).await;
    let origin = app.address.clone();
    let pause = |cookie: String, origin: String, form: Vec<(&'static str, String)>| {
        let app = &app;
        async move {
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(app, "/console/control/pause", &cookie, &origin, &form).await.status().as_u16()
        }
    };
    assert_eq!(pause(cookie.clone(), origin.clone(), vec![("app_id", APP_ID.into())]).await, 403, "no CSRF token");
    assert_eq!(
        pause(cookie.clone(), origin.clone(), vec![("csrf", "0".repeat(64)), ("app_id", APP_ID.into())]).await,
        403
    );
    assert_eq!(
        pause(cookie.clone(), "http://evil.example".into(), vec![("csrf", csrf.clone()), ("app_id", APP_ID.into())])
            .await,
        403,
        "another origin"
    );
    assert!(app.app.intake.delivery.pauses(0).is_empty());

    let (ro_cookie, ro_csrf) = session(&app, READONLY_TOKEN).await;
    assert_eq!(get(&app, "/console/failures", &ro_cookie).await.status().as_u16(), 200, "read-only looks");
    assert_eq!(pause(ro_cookie, origin.clone(), vec![("csrf", ro_csrf), ("app_id", APP_ID.into())]).await, 403);
    assert!(app.app.intake.delivery.pauses(0).is_empty(), "read-only may not act");

    assert_eq!(pause(cookie.clone(), origin, vec![("csrf", csrf), ("app_id", APP_ID.into())]).await, 303);
    assert_eq!(app.app.intake.delivery.pauses(0).first().map(|p| p.0.clone()), Some(Scope::AppId(APP_ID.into())));
    let audit = app.app.intake.store.audit_log(10).await.expect("audit log");
    assert_eq!((audit[0].action.as_str(), audit[0].selection.as_str()), ("pause", "app_id 1234567890"));
    // The Bearer API keeps working beside the console.
    assert_eq!(app.admin_get("/admin/deliveries").await.status().as_u16(), 200);
}

#[tokio::test]
async fn admin_preview_renders_a_pasted_body_and_compares_a_stored_event() {
    let app = spawn_app().await;
    let body = json!({"type": "track", "userId": "u-1", "event": "Signed Up", "messageId": "m-prev"});
    let (status, preview) =
        json(app.admin_post("/admin/preview", &json!({"source": "segment", "body": body})).await).await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["calls"][0]["event"]["event"], "Signed Up");
    assert_eq!(preview["calls"][0]["path"], "/api/track");

    let (_, refused) = json(
        app.admin_post("/admin/preview", &json!({"source": "segment", "body": {"type": "track", "event": "X"}})).await,
    )
    .await;
    assert_eq!(refused["calls"].as_array().map(Vec::len), Some(0), "{refused}");
    assert!(refused["refused"][0]["field"].is_string(), "each refusal names its field: {refused}");

    let (_, accepted) = json(app.post_hook("segment", &body).await).await;
    let id = accepted["event_ids"][0].as_str().expect("an event id").to_owned();
    let (status, stored) = json(app.admin_post("/admin/preview", &json!({"event_id": id})).await).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["stored"]["changed"], json!([]), "today's template renders it as stored: {stored}");

    let (status, err) = json(app.admin_post("/admin/preview", &json!({"event_id": "999999-0"})).await).await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("not_found")));
    let unauth = app.client.post(format!("{}/admin/preview", app.address)).json(&json!({})).send().await.expect("sent");
    assert_eq!(unauth.status().as_u16(), 401);
}

#[tokio::test]
async fn delivery_log_pages_follow_their_cursor_and_filter_by_app_identity_and_key() {
    let app = spawn_app().await;
    for i in 0..5 {
        let body =
            json!({"type": "track", "userId": format!("u-{}", i % 2), "event": "E", "messageId": format!("k-{i}")});
        assert_eq!(app.post_hook("segment", &body).await.status().as_u16(), 202);
    }
    let store = &app.app.intake.store;
    let page = |before: Option<String>| EventFilter {
        query: Query { limit: 2, ..Default::default() },
        before,
        ..Default::default()
    };
    let first = store.page(page(None)).await.expect("page 1");
    let second = store.page(page(first.next.clone())).await.expect("page 2");
    let third = store.page(page(second.next.clone())).await.expect("page 3");
    let ids: Vec<String> =
        [&first, &second, &third].iter().flat_map(|p| p.events.iter().map(|e| e.id.clone())).collect();
    assert_eq!(ids.len(), 5, "every event once across pages: {ids:?}");
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique, ids);

    let by_identity = EventFilter {
        identity: Some("u-1".into()),
        query: Query { limit: 10, ..Default::default() },
        ..Default::default()
    };
    assert_eq!(store.page(by_identity).await.expect("by identity").events.len(), 2);
    let by_key =
        EventFilter { key: Some("k-3".into()), query: Query { limit: 10, ..Default::default() }, ..Default::default() };
    let found = store.page(by_key).await.expect("by key").events;
    assert_eq!((found.len(), found[0].identity.as_str()), (1, "u-1"));
    let other_app = EventFilter {
        app_id: Some("999".into()),
        query: Query { limit: 10, ..Default::default() },
        ..Default::default()
    };
    assert!(store.page(other_app).await.expect("by app").events.is_empty());
    // The admin API reads the same function.
    let (status, listed) = json(app.admin_get("/admin/deliveries?key=k-3").await).await;
    assert_eq!((status, listed["count"].as_i64()), (200, Some(1)), "{listed}");
}

#[tokio::test]
async fn the_last_hour_counts_what_came_in_and_what_was_delivered() {
    let app = spawn_app().await;
    let body = json!({"batch": [
        {"type": "track", "userId": "u-1", "event": "A", "messageId": "h-1"},
        {"type": "track", "event": "no identity", "messageId": "h-2"}
    ]});
    let (status, accepted) = json(app.post_hook("segment", &body).await).await;
    assert_eq!(status, 202);
    let id = accepted["event_ids"][0].as_str().expect("an event id").to_owned();
    // Heap's answer is recorded after it arrives: wait for the record, not only for Heap.
    app.wait_for_status(&id, "delivered", Duration::from_secs(10)).await;
    let flow = app.app.intake.store.flow(heap_relay::store::now_ms()).await.expect("flow");
    assert_eq!(flow.minutes.len(), 60);
    assert_eq!(flow.minutes.iter().map(|m| m.received).sum::<i64>(), 2);
    assert_eq!(flow.minutes.iter().map(|m| m.delivered).sum::<i64>(), 1);
    assert_eq!(flow.refused, 1);
    let row = &flow.rows.iter().find(|r| r.app_id == APP_ID).expect("the app's row");
    assert_eq!((row.source.as_str(), row.received, row.delivered), ("segment", 1, 1));
    let failures = app.app.intake.store.failures().await.expect("failures");
    assert_eq!((failures[0].status, failures[0].count), ("rejected", 1), "{failures:?}");
    let members = app.app.intake.store.failure_members(Status::Rejected, failures[0].reason.clone(), 10).await;
    assert_eq!(members.expect("members"), [failures[0].newest.clone()]);
}

#[tokio::test]
async fn the_console_pages_queries_do_not_scan_the_whole_log() {
    let app = spawn_app().await;
    let plans = app.app.intake.store.console_plans().await.expect("plans");
    assert!(plans.len() >= 5, "{plans:?}");
    for (page, sql, plan) in &plans {
        // SQLite says `SCAN <table>` for a full table scan, `SEARCH <table> USING ...` for an index or rowid range.
        let scans_log = plan.split("; ").any(|step| {
            step.starts_with("SCAN log")
                || step == "SCAN own"
                || step == "SCAN calls"
                || step.starts_with("SCAN finder_by_span")
        });
        assert!(!scans_log, "{page}: {sql}\nscans a whole table: {plan}");
    }
}

#[tokio::test]
async fn a_purge_from_the_console_moves_an_apps_backlog_to_dead_letters_and_is_audited() {
    // No delivery worker: the backlog waits.
    let app = spawn_app_with(|s| s.delivery.workers = 0).await;
    for i in 0..3 {
        let body = json!({"type": "track", "userId": "u-1", "event": "Wrong Campaign", "messageId": format!("w-{i}")});
        assert_eq!(app.post_hook("segment", &body).await.status().as_u16(), 202);
    }
    let (cookie, csrf) = session(&app, ADMIN_TOKEN).await;
    let unconfirmed = [("csrf", csrf.as_str()), ("app_id", APP_ID)];
    let unconfirmed = post_form(&app, "/console/control/purge", &cookie, &app.address, &unconfirmed);
    assert_eq!(unconfirmed.await.status().as_u16(), 400, "a purge must be confirmed");
    let form = [("csrf", csrf.as_str()), ("app_id", APP_ID), ("confirm", "yes")];
    assert_eq!(post_form(&app, "/console/control/purge", &cookie, &app.address, &form).await.status().as_u16(), 303);

    let store = &app.app.intake.store;
    assert_eq!(store.stats().await.expect("stats").ready_or_waiting, 0);
    let audit = store.audit_log(1).await.expect("audit");
    assert_eq!((audit[0].action.as_str(), audit[0].count), ("purge", 3));
    let failures = get(&app, "/console/failures", &cookie).await.text().await.unwrap_or_default();
    assert!(failures.contains("purged by an operator"), "the purged events can be replayed from Failures");
}

#[tokio::test]
async fn an_environment_paused_from_the_console_is_held_until_resumed_and_its_backlog_can_be_purged() {
    let app = spawn_app_with(|s| {
        s.environments.insert("prod".into(), EnvironmentSettings { app_id: "2222222222".into() });
    })
    .await;
    let (cookie, csrf) = session(&app, ADMIN_TOKEN).await;
    let act = |path: &'static str, form: Vec<(&'static str, &'static str)>| {
        let (app, cookie, csrf) = (&app, cookie.clone(), csrf.clone());
        async move {
            let mut form = form;
            form.push(("csrf", csrf.as_str()));
            post_form(app, path, &cookie, &app.address, &form).await.status().as_u16()
        }
    };
    assert_eq!(act("/console/control/pause", vec![("app_id", APP_ID), ("environment", "prod")]).await, 400, "not both");
    assert_eq!(act("/console/control/pause", vec![("environment", "Prod!")]).await, 400, "not a name");
    assert_eq!(act("/console/control/pause", vec![("environment", "prod")]).await, 303);
    assert_eq!(app.app.intake.delivery.pauses(0), [(Scope::Environment("prod".into()), i64::MAX)]);
    let control = get(&app, "/console/control", &cookie).await.text().await.unwrap_or_default();
    assert!(control.contains("environment prod"), "the Control page lists the pause");

    let event = |key: &str| json!({"type": "track", "userId": "u-1", "event": "E", "messageId": key});
    let (_, held) = json(app.post("/env/prod/hooks/segment", event("prod-1").to_string()).await).await;
    let held = held["event_ids"][0].as_str().expect("an event id").to_owned();
    assert_eq!(app.post_hook("segment", &event("default-1")).await.status().as_u16(), 202);
    let sent = app.wait_for_heap(1, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 1, "only the default environment's event went: {sent:?}");
    assert_eq!(app.app.intake.store.get(&held).await.expect("get").status, "pending", "prod's event waits");

    assert_eq!(act("/console/control/resume", vec![("environment", "prod")]).await, 303);
    app.wait_for_status(&held, "delivered", Duration::from_secs(10)).await;
    assert!(app.app.intake.delivery.pauses(0).is_empty());

    assert_eq!(act("/console/control/pause", vec![("environment", "prod")]).await, 303);
    for key in ["prod-2", "prod-3"] {
        assert_eq!(app.post("/env/prod/hooks/segment", event(key).to_string()).await.status().as_u16(), 202);
    }
    assert_eq!(act("/console/control/purge", vec![("environment", "prod"), ("confirm", "yes")]).await, 303);
    let audit = app.app.intake.store.audit_log(10).await.expect("audit");
    let actions: Vec<(&str, &str, i64)> =
        audit.iter().map(|a| (a.action.as_str(), a.selection.as_str(), a.count)).collect();
    assert_eq!(
        actions,
        [
            ("purge", "waiting events of environment prod", 2),
            ("pause", "environment prod", 0),
            ("resume", "environment prod", 0),
            ("pause", "environment prod", 0),
        ]
    );
    assert_eq!(app.app.intake.store.stats().await.expect("stats").ready_or_waiting, 0, "nothing of prod waits");
}

#[tokio::test]
async fn the_templates_page_shows_the_live_sets_status_and_a_broken_edit_keeps_the_last_good_version() {
    let templates = templates_with(&[]);
    let dir = templates.path().to_owned();
    let app = spawn_app_with(|s| s.templates.dir = dir.clone()).await;
    let (cookie, _) = session(&app, ADMIN_TOKEN).await;
    let page = get(&app, "/console/templates", &cookie).await.text().await.unwrap_or_default();
    assert!(page.contains("segment/default") && !page.contains("broken:"), "every shipped template loads:\n{page}");

    std::fs::write(dir.join("segment/default.json"), "{\"event\": \"{{ properties.x \"}\n").expect("break it");
    let page = get(&app, "/console/templates", &cookie).await.text().await.unwrap_or_default();
    assert!(page.contains("broken:") && page.contains("default.json"), "the edit is reported as broken:\n{page}");
    assert!(page.contains("the last good version is in use"), "and the running relay keeps the good one:\n{page}");
    let still = json!({"type": "track", "userId": "u-1", "event": "Still Works", "messageId": "t-1"});
    assert_eq!(app.post_hook("segment", &still).await.status().as_u16(), 202, "ingest keeps rendering");
}

#[tokio::test]
async fn a_bulk_rerender_of_a_group_reads_one_body_at_a_time_and_renders_each_once() {
    let app = spawn_app_with(|s| s.delivery.workers = 0).await;
    for i in 0..70 {
        // The second has no userId: refused at ingest, kept for a re-render.
        let body = json!({"batch": [
            {"type": "track", "userId": "u-1", "event": "E", "messageId": format!("ok-{i}")},
            {"type": "track", "event": "E", "messageId": format!("r-{i}")}
        ]});
        assert_eq!(app.post_hook("segment", &body).await.status().as_u16(), 202);
    }
    let store = &app.app.intake.store;
    let group = store.failures().await.expect("failures").into_iter().next().expect("the refused group");
    assert_eq!(group.count, 70);
    let ids = store.failure_members(Status::Rejected, group.reason, 100).await.expect("members");
    let selectors = ids.into_iter().map(heap_relay::store::Selector::Id).collect();
    let mut progress = Vec::new();
    let report =
        heap_relay::replay::replay_all(store, &app.app.intake.pipeline, selectors, true, &mut |done, total| {
            progress.push((done, total))
        })
        .await
        .expect("re-render");
    assert_eq!(report.bodies, 70, "each body once: {report:?}");
    let expected: Vec<(usize, usize)> = (1..=70).map(|done| (done, 70)).collect();
    assert_eq!(progress, expected, "progress after each selected event");
}
