//! The overview: the last hour per minute as a chart, the queue's figures, whether Heap is answering, and a table
//! per source × environment × app_id. Refreshes itself every 30 seconds.

use super::views::{self, Nav, duration};
use super::{ConsoleError, Viewer, html};
use crate::store::queries::Flow;
use crate::store::{Millis, QueueStats, Scope, now_ms};
use actix_web::HttpResponse;
use maud::{Markup, html as m};

/// Heap's state in words, and how worrying it is (`ok`, `warn`, `bad`).
pub fn heap_health(flow: &Flow, pauses: &[(Scope, Millis)], now: Millis) -> (&'static str, String) {
    if let Some((scope, until)) = pauses.first() {
        let how = if *until == Millis::MAX {
            "by an operator, until resumed".to_owned()
        } else {
            format!("by a 429 from Heap for another {}", duration(until - now))
        };
        let more = if pauses.len() > 1 { format!(" (and {} more)", pauses.len() - 1) } else { String::new() };
        return ("warn", format!("Delivery of {} is paused {how}{more}.", scope.describe()));
    }
    match &flow.last_call {
        None => ("ok", "No call to Heap yet.".to_owned()),
        Some((at, Some(s), _)) if (200..300).contains(s) => {
            ("ok", format!("Heap is answering: the last call got HTTP {s}, {} ago.", duration(now - at)))
        }
        Some((at, status, error)) => {
            let what = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
            let why = error.as_deref().map(|e| format!(": {}", views::clip(e, 160))).unwrap_or_default();
            ("bad", format!("Heap is failing: the last call, {} ago, got {what}{why}", duration(now - at)))
        }
    }
}

pub async fn page(v: Viewer) -> Result<HttpResponse, ConsoleError> {
    let store = &v.state.intake.store;
    let now = now_ms();
    let (flow, stats) = (store.flow(now).await?, store.stats().await?);
    let pauses = v.state.intake.delivery.pauses(now);
    let body = body(&flow, &stats, &pauses, now, v.console.app_events_per_minute);
    Ok(html(views::page("Overview", Nav::Overview, Some(&v.session), Some(30), body)))
}

fn body(flow: &Flow, stats: &QueueStats, pauses: &[(Scope, Millis)], now: Millis, budget: u32) -> Markup {
    let (level, words) = heap_health(flow, pauses, now);
    let card = |label: &str, value: String| m! { div.card { div.label { (label) } div.value { (value) } } };
    m! {
        p class={"health " (level)} { (words) }
        div.cards {
            (card("Waiting", stats.ready_or_waiting.to_string()))
            (card("Oldest waiting", stats.oldest_pending_ms.map_or("none".into(), |t| duration(now - t))))
            (card("Dead", stats.dead.to_string()))
            (card("Refused (last hour)", flow.refused.to_string()))
            (card("Time to drain", super::control::drain_estimate(stats.ready_or_waiting, budget)))
        }
        (views::chart(&flow.minutes))
        @if flow.truncated { p.note { "A busy hour: the figures count the newest entries only." } }
        h2 { "Last hour by source, environment and app_id" }
        @if flow.rows.is_empty() { p.note { "Nothing received in the last hour." } } @else {
            table {
                thead { tr {
                    th { "Source" } th { "Environment" } th { "app_id" } th.num { "Received" } th.num { "Delivered" }
                    th.num { "Waiting" } th.num { "Dead" } th.num { "Refused" }
                } }
                tbody { @for r in &flow.rows { tr {
                    td { (r.source) } td { @if r.environment.is_empty() { "default" } @else { (r.environment) } }
                    td { @if r.app_id.is_empty() { span.note { "none (refused)" } } @else {
                        a href={"/console/deliveries?app_id=" (views::enc(&r.app_id))} { (r.app_id) } } }
                    td.num { (r.received) } td.num { (r.delivered) } td.num { (r.waiting) }
                    td.num { (r.dead) } td.num { (r.refused) }
                } } }
            }
        }
        p.note { "Refreshes every 30 seconds. Times are UTC." }
    }
}
