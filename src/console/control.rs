//! Control: pause and resume delivery per app_id or environment, purge their waiting events to dead letters, the
//! estimated time to drain the backlog at the current budget, and the audit log of every replay, re-render, pause,
//! resume and purge.

use super::views::{self, Nav, duration};
use super::{ConsoleError, Viewer, html, see_other};
use crate::domain::AppId;
use crate::settings::{DEFAULT_ENVIRONMENT_KEY, valid_environment_name};
use crate::store::{Millis, Scope, now_ms};
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
        h2 { "Paused" }
        @if pauses.is_empty() { p.note { "Nothing: every app_id and environment is delivered." } } @else {
            table id="pauses" {
                thead { tr { th { "What" } th { "Paused" } th { "" } } }
                tbody { @for (scope, u) in &pauses { tr {
                    td { (scope.describe()) } td { (until(*u)) }
                    td { @if views::may_act(s) { form.inline method="post" action="/console/control/resume" {
                        (views::csrf(s)) (scope_fields(scope)) button type="submit" { "Resume" } } } }
                } } }
            }
        }
        @if views::may_act(s) {
            p.note { "Give an app_id or an environment (\"default\" for the default one), not both." }
            form.filters method="post" action="/console/control/pause" {
                (views::csrf(s))
                label { "Pause delivery of app_id" input type="text" name="app_id"; }
                label { "or of environment" input type="text" name="environment"; }
                span.note { "(on this instance)" }
                button type="submit" { "Pause" }
            }
            form.filters method="post" action="/console/control/purge" {
                (views::csrf(s))
                label { "Purge every waiting event of app_id" input type="text" name="app_id"; }
                label { "or of environment" input type="text" name="environment"; }
                span.note { "to dead letters (a wrong campaign's backlog)" }
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

/// The hidden fields that name a scope again (the Resume button of a pause).
fn scope_fields(scope: &Scope) -> maud::Markup {
    match scope {
        Scope::AppId(a) => m! { input type="hidden" name="app_id" value=(a); },
        Scope::Environment(e) => {
            let name = if e.is_empty() { DEFAULT_ENVIRONMENT_KEY } else { e.as_str() };
            m! { input type="hidden" name="environment" value=(name); }
        }
    }
}

/// The pause, resume and purge forms: an app_id or an environment (`default`: the default one), not both.
#[derive(Debug, Deserialize)]
pub struct ScopeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    app_id: String,
    #[serde(default)]
    environment: String,
    /// A purge's confirmation (`yes`).
    #[serde(default)]
    confirm: String,
}

/// What a form names: an app_id, or an environment.
pub fn scope(app_id: &str, environment: &str) -> Result<Scope, ConsoleError> {
    match (app_id.trim(), environment.trim()) {
        ("", "") => Err(ConsoleError::Invalid("give an app_id or an environment".into())),
        (app, "") => AppId::parse(app)
            .map(|a| Scope::AppId(a.as_str().to_owned()))
            .map_err(|e| ConsoleError::Invalid(e.to_string())),
        ("", DEFAULT_ENVIRONMENT_KEY) => Ok(Scope::Environment(String::new())),
        ("", env) if valid_environment_name(env) => Ok(Scope::Environment(env.to_owned())),
        ("", env) => Err(ConsoleError::Invalid(format!(
            "environment {:?}: names hold only a-z, 0-9, _ and - (at most 64); \"default\" is the default one",
            views::clip(env, 70)
        ))),
        _ => Err(ConsoleError::Invalid("give an app_id or an environment, not both".into())),
    }
}

pub async fn pause(req: HttpRequest, v: Viewer, form: web::Form<ScopeForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let scope = scope(&form.app_id, &form.environment)?;
    v.state.intake.delivery.hold(scope.clone(), Millis::MAX);
    v.audit("pause", scope.describe(), 0).await;
    Ok(see_other("/console/control"))
}

/// Waiting events of an app_id or an environment become dead letters (reason `purged by an operator`; replayable
/// from Failures).
pub async fn purge(req: HttpRequest, v: Viewer, form: web::Form<ScopeForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    if form.confirm != "yes" {
        return Err(ConsoleError::Invalid("confirm the purge".into()));
    }
    let scope = scope(&form.app_id, &form.environment)?;
    let n = v.state.intake.store.purge(scope.clone()).await?;
    v.audit("purge", format!("waiting events of {}", scope.describe()), n).await;
    Ok(see_other("/console/control"))
}

pub async fn resume(req: HttpRequest, v: Viewer, form: web::Form<ScopeForm>) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let scope = scope(&form.app_id, &form.environment)?;
    v.state.intake.delivery.resume(&scope);
    v.state.intake.delivery.wake();
    v.audit("resume", scope.describe(), 0).await;
    Ok(see_other("/console/control"))
}
