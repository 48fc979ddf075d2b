//! Failures: dead and refused events grouped by reason (a count and the newest example per reason), and the bulk
//! replay or re-render of a whole group, run in the background with a progress page.

use super::views::{self, Nav, enc, status};
use super::{ConsoleError, Viewer, html, see_other};
use crate::replay::replay_all;
use crate::store::queries::{FAILURE_SCAN, REFUSED_SCAN};
use crate::store::{Selector, Status, Store, now_ms};
use actix_web::{HttpRequest, HttpResponse, web};
use maud::html as m;
use serde::Deserialize;

/// Events of one group a bulk action takes at most (the rest stay for the next run).
pub const GROUP_LIMIT: usize = 10_000;

pub async fn page(v: Viewer) -> Result<HttpResponse, ConsoleError> {
    let groups = v.state.intake.store.failures().await?;
    let s = &v.session;
    let body = m! {
        p.note { "Dead: Heap refused them for good, or retries ran out. Refused: the template or validation turned them away at ingest. Fix the template, then re-render the group: today's template renders the stored bodies again." }
        p.note { (bounds_note(&v.state.intake.store)) }
        @if groups.is_empty() { p { "No failures." } } @else {
            table {
                thead { tr { th { "Status" } th { "Reason" } th.num { "Events" } th { "Newest" } th { "Act on the group" } } }
                tbody { @for g in &groups { tr {
                    td { (status(g.status)) }
                    td { (views::clip(&g.reason, 300)) }
                    td.num { (g.count) }
                    td { a href={"/console/events/" (enc(&g.newest))} { (g.newest) } br; span.note { (views::time(g.newest_at)) } }
                    td { @if views::may_act(s) {
                        div.actions {
                            @if g.status == "dead" { (group_button(s, g.status, &g.reason, false, "Replay")) }
                            (group_button(s, g.status, &g.reason, true, "Re-render"))
                        }
                    } @else { span.note { "read-only" } } }
                } } }
            }
        }
    };
    Ok(html(views::page("Failures", Nav::Failures, Some(s), None, body)))
}

/// What the groups count: each backend looks at a bounded number of failures, so the page stays fast.
fn bounds_note(store: &Store) -> String {
    match store {
        Store::Sqlite(_) => format!(
            "Counts every dead event, and the refused items of the newest {} log entries that hold refusals.",
            REFUSED_SCAN
        ),
        Store::Postgres(_) => format!("Counts the newest {FAILURE_SCAN} dead or refused events."),
    }
}

fn group_button(s: &super::session::Session, st: &str, reason: &str, rerender: bool, label: &str) -> maud::Markup {
    m! {
        form.inline method="post" action="/console/failures/replay" {
            (views::csrf(s))
            input type="hidden" name="status" value=(st);
            input type="hidden" name="reason" value=(reason);
            @if rerender { input type="hidden" name="rerender" value="1"; }
            button type="submit" class=[(!rerender).then_some("secondary")] { (label) }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct GroupForm {
    #[serde(default)]
    csrf: String,
    status: String,
    reason: String,
    #[serde(default)]
    rerender: String,
}

pub async fn replay_group(
    req: HttpRequest,
    v: Viewer,
    form: web::Form<GroupForm>,
) -> Result<HttpResponse, ConsoleError> {
    v.act(&req, &form.csrf)?;
    let status = match Status::parse(&form.status) {
        Some(s @ (Status::Dead | Status::Rejected)) => s,
        _ => return Err(ConsoleError::Invalid(format!("no failure group has status {:?}", form.status))),
    };
    let rerender = !form.rerender.is_empty();
    let store = v.state.intake.store.clone();
    let ids = store.failure_members(status, form.reason.clone(), GROUP_LIMIT).await?;
    let action = if rerender { "rerender" } else { "replay" };
    let selection =
        format!("{} {} event(s) with reason {}", ids.len(), status.as_str(), views::clip(&form.reason, 200));
    let verb = if rerender { "Re-render" } else { "Replay" };
    let (id, job) = v.console.jobs.start(format!("{verb} {selection}"));
    let intake = v.state.intake.clone();
    tokio::spawn(async move {
        if rerender {
            super::fresh_templates(&intake.pipeline);
        }
        let selectors: Vec<Selector> = ids.into_iter().map(Selector::Id).collect();
        let progress_job = job.clone();
        let mut progress = move |done: usize, total: usize| {
            let mut j = progress_job.lock().unwrap_or_else(|p| p.into_inner());
            (j.done, j.total) = (done, total);
        };
        let result = replay_all(&intake.store, &intake.pipeline, selectors, rerender, &mut progress).await;
        intake.delivery.wake();
        let count = match &result {
            Ok(r) if rerender => r.bodies as i64,
            Ok(r) => r.requeued,
            Err(_) => 0,
        };
        let entry = crate::store::queries::AuditEntry {
            at: now_ms(),
            actor: "admin".into(),
            action: action.into(),
            selection,
            count,
        };
        if let Err(e) = intake.store.audit(entry).await {
            tracing::error!(error = %e, "console: cannot write the audit log");
        }
        let mut j = job.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(r) => j.report = Some(r),
            Err(e) => {
                tracing::error!(error = %e, "console: a bulk action failed");
                j.error = Some(e.to_string());
            }
        }
    });
    Ok(see_other(&format!("/console/jobs/{id}")))
}

pub async fn job(v: Viewer, id: web::Path<u64>) -> Result<HttpResponse, ConsoleError> {
    let job = v.console.jobs.get(*id).ok_or_else(|| ConsoleError::NotFound(format!("no job {id}")))?;
    let finished = job.report.is_some() || job.error.is_some();
    let body = m! {
        p { (job.label) }
        @if !finished {
            progress max=(job.total.max(1)) value=(job.done) {}
            p id="job-state" { "Running: " (job.done) " of " (job.total) " done. This page refreshes itself." }
        }
        @if let Some(r) = &job.report {
            p id="job-state" { "Done." }
            dl.facts {
                dt { "Put back in the queue" } dd { (r.requeued) }
                dt { "Bodies re-rendered" } dd { (r.bodies) }
                dt { "Events the re-render queued" } dd { (r.accepted) }
                dt { "Items still refused" } dd { (r.rejected) }
                dt { "Bodies that could not be re-rendered" } dd { (r.failed) }
            }
        }
        @if let Some(e) = &job.error { p.error id="job-state" { "Failed: " (e) } }
        p { a href="/console/failures" { "Back to failures" } " · " a href="/console/deliveries" { "Deliveries" } }
    };
    let refresh = (!finished).then_some(1);
    Ok(html(views::page("Bulk action", Nav::Failures, Some(&v.session), refresh, body)))
}
