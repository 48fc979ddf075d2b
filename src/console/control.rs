//! Control: pause and resume delivery per app_id, the estimated time to drain the backlog at the current budget,
//! and the audit log of every replay, re-render, pause and resume.

use super::views::{self, Nav, duration};
use super::{ConsoleError, Viewer, html, see_other};
use crate::domain::AppId;
use crate::store::{Millis, now_ms};
use actix_web::{HttpRequest, HttpResponse, web};
use maud::html as m;
use serde::Deserialize;

/// The backlog's drain time at the app budget (`delivery.app_events_per_minute`), in words.
pub fn drain_estimate(waiting: i64, per_minute: u32) -> String {
    match (waiting, per_minute) {
        (0, _) => "nothing waiting".to_owned(),
        (_, 0) => "no budget set: as fast as Heap takes it".to_owned(),
        (n, b) => format!("about {} at {b}/min", duration(n * 60_000 / i64::from(b))),
    }
}

pub async fn page(v: Viewer) -> Result<HttpResponse, ConsoleError> {
    let now = now_ms();
    let store = &v.state.intake.store;
    let (stats, audit) = (store.stats().await?, store.audit_log(100).await?);
    let pauses = v.state.intake.delivery.pauses(now);
    let s = &v.session;
    let until = |u: Millis| {
        if u == Millis::MAX { "until resumed".to_owned() } else { format!("for {} more (a 429)", duration(u - now)) }
    };
    let body = m! {
        div.cards {
            div.card { div.label { "Waiting" } div.value { (stats.ready_or_waiting) } }
            div.card { div.label { "Time to drain" } div.value { (drain_estimate(stats.ready_or_waiting, v.console.app_events_per_minute)) } }
        }
        h2 { "Paused app_ids" }
        @if pauses.is_empty() { p.note { "None: every app_id is delivered." } } @else {
            table {
                thead { tr { th { "app_id" } th { "Paused" } th { "" } } }
                tbody { @for (app, u) in &pauses { tr {
                    td { (app) } td { (until(*u)) }
                    td { @if views::may_act(s) { form.inline method="post" action="/console/control/resume" {
                        (views::csrf(s)) input type="hidden" name="app_id" value=(app); button type="submit" { "Resume" } } } }
                } } }
            }
        }
        @if views::may_act(s) {
            form.filters method="post" action="/console/control/pause" {
                (views::csrf(s))
                label { "Pause delivery of app_id (on this instance)" input type="text" name="app_id" required; }
                button type="submit" { "Pause" }
            }
            form.filters method="post" action="/console/control/purge" {
                (views::csrf(s))
                label { "Purge every waiting event of app_id to dead letters (a wrong campaign's backlog)"
                    input type="text" name="app_id" required; }
                label { "Confirm" select name="confirm" required {
                    option value="" { "choose" } option value="yes" { "yes, purge them" } } }
                button type="submit" { "Purge" }
            }
        }
        h2 { "Audit log" }
        @if audit.is_empty() { p.note { "No action yet." } } @else {
            table id="audit" {
                thead { tr { th { "When (UTC)" } th { "Who" } th { "Action" } th { "Selection" } th.num { "Count" } } }
                tbody { @for a in &audit { tr {
                    td { (views::time(a.at)) } td { (a.actor) } td { (a.action) } td { (a.selection) } td.num { (a.count) }
                } } }
            }
        }
    };
    Ok(html(views::page("Control", Nav::Control, Some(s), None, body)))
}

#[derive(Debug, Deserialize)]
pub struct AppForm {
    #[serde(default)]
    csrf: String,
    app_id: String,
}

fn app_id(form: &AppForm) -> Result<String, ConsoleError> {
    AppId::parse(form.app_id.trim()).map(|a| a.as_str().to_owned()).map_err(|e| ConsoleError::Invalid(e.to_string()))
}

pub async fn pause(req: HttpRequest, v: Viewer, form: web::Form<AppForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let app = app_id(&form)?;
    v.state.intake.delivery.hold(&app, Millis::MAX);
    v.audit("pause", format!("app_id {app}"), 0).await;
    Ok(see_other("/console/control"))
}

#[derive(Debug, Deserialize)]
pub struct PurgeForm {
    #[serde(default)]
    csrf: String,
    app_id: String,
    #[serde(default)]
    confirm: String,
}

/// Waiting events of an app_id become dead letters (reason `purged by an operator`; replayable from Failures).
pub async fn purge(req: HttpRequest, v: Viewer, form: web::Form<PurgeForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    if form.confirm != "yes" {
        return Err(ConsoleError::Invalid("confirm the purge".into()));
    }
    let app = app_id(&AppForm { csrf: String::new(), app_id: form.app_id.clone() })?;
    let n = v.state.intake.store.purge(app.clone()).await?;
    v.audit("purge", format!("waiting events of app_id {app}"), n).await;
    Ok(see_other("/console/control"))
}

pub async fn resume(req: HttpRequest, v: Viewer, form: web::Form<AppForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let app = app_id(&form)?;
    v.state.intake.delivery.resume(&app);
    v.state.intake.delivery.wake();
    v.audit("resume", format!("app_id {app}"), 0).await;
    Ok(see_other("/console/control"))
}
