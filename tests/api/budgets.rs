//! Budgets before claims: a backlog that Heap's limits hold back waits in the ingest log, costs no store writes
//! while it waits, never goes out faster than the budget allows, and one busy identity never holds back others.
//! The relay's clock is moved forward instead of waiting for the budget to refill.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn bulk(identity: impl Fn(usize) -> String, from: usize, n: usize) -> String {
    let events: Vec<Value> = (from..from + n)
        .map(|i| json!({"identity": identity(i), "event": "Budgeted", "idempotency_key": format!("b-{i}")}))
        .collect();
    json!({"app_id": APP_ID, "events": events}).to_string()
}

#[tokio::test]
async fn a_backlog_held_by_the_app_budget_costs_one_commit_per_heap_call_none_on_ingest_and_never_exceeds_the_budget() {
    let app = app_budget_only(600).await;
    let clock = app.app.intake.clock.clone();
    let start = clock.now_ms();
    for part in 0..2 {
        let resp = app.post("/api/track", bulk(|i| format!("user-{i}"), part * 10_000, 10_000)).await;
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap_or_default());
    }
    let bound = |now: i64| 600.0 + 600.0 / 60.0 * (now - start) as f64 / 1000.0;
    // The bucket starts full: 600 go at once; the rest wait for the budget.
    app.wait_for_heap(600, WAIT).await;
    // Heap answers before the books record the call: snapshot only once they have, so that the window below holds
    // exactly the commits of the calls it counts.
    let before = recorded(&app).await;
    let calls_before = app.heap_calls().await.len() as u64;
    for _ in 0..3 {
        clock.advance(Duration::from_secs(30));
        let got = app.heap_calls().await;
        let target = items_of(&got).len() + 300;
        let items = app.wait_for_heap(target, WAIT).await;
        assert!(
            items.len() as f64 <= bound(clock.now_ms()),
            "{} events sent, budget allows {}",
            items.len(),
            bound(clock.now_ms())
        );
    }
    let after = recorded(&app).await;
    let calls = app.heap_calls().await.len() as u64 - calls_before;
    let delivery_commits = after.delivery_commits.expect("counted") - before.delivery_commits.expect("counted");
    assert!(calls >= 3, "{calls}");
    assert!(delivery_commits <= calls, "{delivery_commits} delivery commits for {calls} Heap calls while waiting");
    assert_eq!(after.commits, before.commits, "delivery never writes through the ingest log's writer");
    assert!(after.ready_or_waiting >= 18_000, "the backlog still waits: {}", after.ready_or_waiting);
    let items = items_of(&app.heap_calls().await);
    assert!(items.len() as f64 <= bound(clock.now_ms()), "{} events sent", items.len());
}

/// While the app budget holds a backlog back, delivery waits until the budget holds a batch and sends it in one
/// call, about once a second, rather than a call of an event or two every round: holding a backlog costs next to
/// no CPU, and one books commit a second.
#[tokio::test]
async fn a_backlog_held_by_the_app_budget_goes_in_about_one_call_a_second() {
    let app = app_budget_only(600).await;
    let resp = app.post("/api/track", bulk(|i| format!("user-{i}"), 0, 2_000)).await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap_or_default());
    // The bucket starts full: 600 go at once; then it refills at ten events a second.
    app.wait_for_heap(600, WAIT).await;
    let (calls_before, started) = (app.heap_calls().await.len(), std::time::Instant::now());
    app.wait_for_heap(630, WAIT).await;
    let elapsed = started.elapsed().as_secs_f64();
    let calls = app.heap_calls().await.len() - calls_before;
    assert!(calls as f64 <= elapsed + 2.0, "{calls} Heap calls in {elapsed:.1} s for the next 30 events");
}

/// A relay whose only rate budget is the app_id's, `per_min` events a minute.
async fn app_budget_only(per_min: u32) -> TestApp {
    spawn_app_with(|s| {
        s.delivery.app_events_per_minute = per_min;
        s.delivery.identity_events_per_minute = 0;
    })
    .await
}

/// The store's stats once delivery has recorded every event Heap has received (20,000 were sent in).
async fn recorded(app: &TestApp) -> heap_relay::store::QueueStats {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let sent = items_of(&app.heap_calls().await).len() as i64;
        let stats = app.app.intake.store.stats().await.expect("stats");
        if stats.ready_or_waiting == 20_000 - sent {
            return stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Heap got {sent} events but the books still count {} waiting",
            stats.ready_or_waiting
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn one_identity_over_its_budget_does_not_delay_another_identitys_events() {
    let app = spawn_app_with(|s| s.delivery.identity_events_per_minute = 60).await;
    let start = app.app.intake.clock.now_ms();
    let resp = app.post("/api/track", bulk(|_| "busy@example.com".into(), 0, 5_000)).await;
    assert!(resp.status().is_success());
    let resp = app.post("/api/track", bulk(|i| format!("quiet-{i}@example.com"), 5_000, 10)).await;
    assert!(resp.status().is_success());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let items = items_of(&app.heap_calls().await);
        let quiet =
            items.iter().filter(|(_, i)| i["identity"].as_str().is_some_and(|s| s.starts_with("quiet-"))).count();
        let busy = items.len() - quiet;
        let allowed = 60.0 + (app.app.intake.clock.now_ms() - start) as f64 / 1000.0;
        assert!(busy as f64 <= allowed, "the busy identity got {busy} out, its budget allows {allowed}");
        if quiet == 10 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the quiet identities waited behind the busy one: {quiet} of 10");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
