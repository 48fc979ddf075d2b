//! Deliveries (the filtered delivery log, a keyset page at a time) and one event: its raw body, the Heap call as
//! stored, every attempt, and the buttons to replay or re-render it.

use super::views::{self, Nav, enc, status};
use super::{ConsoleError, Viewer, html, see_other};
use crate::filters::FilterParams;
use crate::replay::replay_all;
use crate::store::queries::Page;
use crate::store::{Selector, Status, StoreError};
use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html as m};
use serde::Deserialize;

/// Rows of a Deliveries page.
const PAGE_ROWS: i64 = 50;

pub async fn deliveries(v: Viewer, filters: web::Query<FilterParams>) -> Result<HttpResponse, ConsoleError> {
    let mut f = filters.into_inner();
    // The console's pages have one size; a `limit` in the address is not honoured.
    f.limit = None;
    let filter = f.parse(PAGE_ROWS, PAGE_ROWS).map_err(|e| ConsoleError::Invalid(e.to_string()))?;
    let page = v.state.intake.store.page(filter).await?;
    Ok(html(views::page("Deliveries", Nav::Deliveries, Some(&v.session), None, list(&f, &page))))
}

fn list(f: &FilterParams, page: &Page) -> Markup {
    let field = |name: &str, label: &str, value: &Option<String>| {
        m! { label { (label) input type="text" name=(name) value=(value.as_deref().unwrap_or("")); } }
    };
    let status_is = |s: Status| f.status.as_deref().map(str::trim) == Some(s.as_str());
    m! {
        form.filters method="get" action="/console/deliveries" {
            label { "Status" select name="status" {
                option value="" { "any" }
                @for s in Status::ALL { option value=(s.as_str()) selected[status_is(s)] { (s.as_str()) } }
            } }
            (field("source", "Source", &f.source))
            (field("environment", "Environment", &f.environment))
            (field("template", "Template", &f.template))
            (field("app_id", "app_id", &f.app_id))
            (field("identity", "Identity", &f.identity))
            (field("key", "Message id / idempotency key", &f.key))
            (field("since", "Since (ISO-8601)", &f.since))
            (field("until", "Until (ISO-8601)", &f.until))
            button type="submit" { "Filter" }
        }
        @if page.events.is_empty() { p.note { "No event matches." } } @else {
            table {
                thead { tr {
                    th { "Received (UTC)" } th { "Event" } th { "Status" } th { "Source / template" }
                    th { "app_id" } th { "Identity" } th.num { "Attempts" } th { "Last error" }
                } }
                tbody { @for e in &page.events { tr {
                    td { (e.received_at) }
                    td { a href={"/console/events/" (enc(&e.id))} { (e.id) } }
                    td { (status(e.status)) }
                    td { (e.source) " / " (e.template) @if !e.environment.is_empty() { " (" (e.environment) ")" } }
                    td { (e.app_id) } td { (views::clip(&e.identity, 40)) } td.num { (e.attempts) }
                    td { (views::clip(e.last_error.as_deref().unwrap_or(""), 120)) }
                } } }
            }
        }
        @if let Some(next) = &page.next {
            div.pager {
                @if page.truncated { span.note { "Looked through many entries without a match; " } }
                a href={"/console/deliveries?" (f.with_before(next, enc))} { "Older →" }
            }
        }
    }
}

pub async fn event(v: Viewer, id: web::Path<String>) -> Result<HttpResponse, ConsoleError> {
    let store = &v.state.intake.store;
    let ev = match store.get(&id).await {
        Ok(e) => e,
        Err(StoreError::NotFound) => return Err(ConsoleError::NotFound(format!("no event {:?}", id.as_str()))),
        Err(e) => return Err(e.into()),
    };
    let raw = store.raw_bodies(Selector::Id(id.to_string())).await?.into_iter().next();
    let raw_text = raw.map(|raw| match serde_json::from_slice::<serde_json::Value>(&raw.body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&raw.body).into_owned(),
    });
    let s = &v.session;
    let attempts = ev.attempt_log.clone().unwrap_or_default();
    let body = m! {
        div.cols {
            dl.facts {
                dt { "Status" } dd { (status(ev.status)) }
                dt { "Received" } dd { (ev.received_at) }
                dt { "Source / template" } dd { (ev.source) " / " (ev.template) }
                dt { "Environment" } dd { @if ev.environment.is_empty() { "default" } @else { (ev.environment) } }
                dt { "Heap call" } dd { (ev.kind) " for app_id " (ev.app_id) }
                dt { "Identity" } dd { (ev.identity) }
                dt { "Idempotency key" } dd { (ev.idempotency_key.as_deref().unwrap_or("none")) }
                dt { "Item of the body" } dd { (ev.item_index) }
                dt { "Attempts" } dd { (ev.attempts) }
                @if let Some(n) = &ev.next_attempt_at { dt { "Next attempt" } dd { (n) } }
                @if let Some(e) = &ev.last_error { dt { "Last error" } dd { (e) } }
            }
            div {
                @if views::may_act(s) {
                    div.actions {
                        (action_button(s, &ev.id, false, "Replay (send again as stored)"))
                        (action_button(s, &ev.id, true, "Re-render with today's template"))
                    }
                    form method="post" action="/console/templates/preview" {
                        (views::csrf(s))
                        input type="hidden" name="event_id" value=(ev.id);
                        button.secondary type="submit" { "Preview today's rendering beside this one" }
                    }
                } @else { p.note { "Signed in read-only: replay and re-render need the admin token." } }
            }
        }
        h2 { "Attempts" }
        (attempt_table(&attempts))
        div.cols {
            div { h2 { "Heap call as stored (one element of the bulk array)" }
                @match &ev.payload { Some(p) => (views::json_block(p)), None => p.note { "None: refused at ingest." } } }
            div { h2 { "Raw body as received" }
                @match &raw_text { Some(t) => pre.json { (t) }, None => p.note { "Not kept (replaced or pruned)." } } }
        }
    };
    Ok(html(views::page(&format!("Event {}", ev.id), Nav::Deliveries, Some(s), None, body)))
}

fn action_button(s: &super::session::Session, id: &str, rerender: bool, label: &str) -> Markup {
    m! {
        form.inline method="post" action={"/console/events/" (enc(id)) "/replay"} {
            (views::csrf(s))
            @if rerender { input type="hidden" name="rerender" value="1"; }
            button type="submit" class=[(!rerender).then_some("secondary")] { (label) }
        }
    }
}

fn attempt_table(attempts: &[crate::store::AttemptView]) -> Markup {
    m! {
        @if attempts.is_empty() { p.note { "No attempt yet." } } @else {
            table {
                thead { tr { th { "At (UTC)" } th { "Heap's status" } th.num { "Latency" } th.num { "Batch" } th { "Answer / error" } } }
                tbody { @for a in attempts { tr {
                    td { (a.at) }
                    td { @match a.http_status { Some(s) => (s), None => "no answer" } }
                    td.num { (a.latency_ms) " ms" } td.num { (a.batch_size) }
                    td { (a.error.as_deref().unwrap_or("")) }
                } } }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    rerender: String,
}

pub async fn replay(
    req: HttpRequest,
    v: Viewer,
    id: web::Path<String>,
    form: web::Form<ReplayForm>,
) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let rerender = !form.rerender.is_empty();
    let i = &v.state.intake;
    if rerender {
        super::fresh_templates(&i.pipeline);
    }
    let report =
        replay_all(&i.store, &i.pipeline, vec![Selector::Id(id.to_string())], rerender, &mut |_, _| {}).await?;
    i.delivery.wake();
    let count = if rerender { report.bodies as i64 } else { report.requeued };
    v.audit(if rerender { "rerender" } else { "replay" }, format!("event {}", id.as_str()), count).await;
    Ok(see_other(&format!("/console/events/{}", enc(&id))))
}
