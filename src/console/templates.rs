//! Templates: each file's load status as it is on disk now (file:line:column for a broken one), and the preview
//! (`preview`) as a form here and as `POST /admin/preview` for scripts. The console never edits templates: they
//! stay files under version control.

use super::preview::{Preview, PreviewError, PreviewRequest, preview};
use super::views::{self, Nav, enc};
use super::{ConsoleError, Viewer, html};
use crate::error::{ApiError, ErrorCode};
use crate::routes::AppState;
use crate::routes::admin::Admin;
use crate::templates::TemplateSet;
use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html as m};
use serde::Deserialize;

/// The live template set as the files are now: reloaded first only if a file changed since the last load (a stat
/// of each file, no compile), so the page shows what a re-render would use.
fn load_status(v: &Viewer) -> std::sync::Arc<TemplateSet> {
    super::fresh_templates(&v.state.intake.pipeline);
    v.state.intake.pipeline.templates.snapshot()
}

fn status_and_form(v: &Viewer, form: &PreviewForm, result: Option<Result<Preview, String>>) -> Markup {
    let set = load_status(v);
    let errors = set.problems();
    let s = &v.session;
    m! {
        h2 { "Load status" }
        p.note { "The files in " code { (v.console.templates_dir.display()) } " as they are now. A broken file does not replace the last good one in use." }
        table {
            thead { tr { th { "Template" } th { "State" } } }
            tbody {
                @for e in errors { tr { td { (e.file) } td.error { "broken: " (e) } } }
                @for (source, name) in &set.names() { tr {
                    td { (source) "/" (name) }
                    @if set.broken(source, name).is_some() { td { "the last good version is in use" } }
                    @else { td { "loaded" } }
                } }
            }
        }
        h2 { "Preview" }
        p.note { "Renders a body with today's files and shows the Heap calls and each item's refusal. Nothing is stored or sent. Give a stored event's id to see what differs from what was stored." }
        form.filters method="post" action="/console/templates/preview" {
            (views::csrf(s))
            label { "Source" select name="source" {
                @for src in ["clevertap", "userpilot", "segment", "heap"] { option value=(src) selected[form.source == src] { (src) } }
            } }
            label { "Template (empty: the source's)" input type="text" name="template" value=(form.template); }
            label { "Or a stored event's id" input type="text" name="event_id" value=(form.event_id); }
            label style="grid-column: 1 / -1" { "Body (JSON)" textarea name="body" rows="8" { (form.body) } }
            button type="submit" { "Preview" }
        }
        @match result {
            None => {},
            Some(Err(e)) => p.error id="preview-result" { (e) },
            Some(Ok(p)) => (rendered(&p)),
        }
    }
}

fn rendered(p: &Preview) -> Markup {
    m! {
        div id="preview-result" {
            h2 { "Result: " (p.calls.len()) " Heap call(s), " (p.refused.len()) " refusal(s), with " (p.source) "/" (p.template) }
            @if let Some(d) = &p.stored {
                h2 { "Stored event " a href={"/console/events/" (enc(&d.event_id))} { (d.event_id) } " beside today's rendering" }
                @if d.changed.is_empty() { p { "Today's template renders this item as it was stored." } }
                @else { p { "Differs in: " @for (i, k) in d.changed.iter().enumerate() { @if i > 0 { ", " } code { (k) } } } }
                div.cols {
                    div { h2 { "Stored" } @match &d.stored { Some(v) => (views::json_block(v)), None => p.note { "Refused at ingest." } } }
                    div { h2 { "Today" } @match &d.now { Some(v) => (views::json_block(v)), None => p.note { "Refused today (see below)." } } }
                }
            }
            @for c in &p.calls { div { p { "Item " (c.item_index) " → " code { (c.path) } } (views::json_block(&c.event)) } }
            @if !p.refused.is_empty() {
                table {
                    thead { tr { th.num { "Item" } th { "Field" } th { "Code" } th { "Why" } } }
                    tbody { @for r in &p.refused { tr { td.num { (r.item_index) } td { (r.field) } td { (r.code) } td { (r.message) } } } }
                }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PreviewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    event_id: String,
}

pub async fn page(v: Viewer) -> Result<HttpResponse, ConsoleError> {
    let form = PreviewForm { source: "clevertap".into(), ..Default::default() };
    let body = status_and_form(&v, &form, None);
    Ok(html(views::page("Templates", Nav::Templates, Some(&v.session), None, body)))
}

/// The preview form's answer. Looking only, so a read-only session may use it; it still needs the session's CSRF
/// token and a same-origin request, as every form does.
pub async fn preview_form(
    req: HttpRequest,
    v: Viewer,
    form: web::Form<PreviewForm>,
) -> Result<HttpResponse, ConsoleError> {
    super::check_origin(&req)?;
    if !super::session::Sessions::csrf_ok(&v.session, &form.csrf) {
        return Err(ConsoleError::BadCsrf);
    }
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.to_owned());
    let request = PreviewRequest {
        source: non_empty(&form.source),
        template: non_empty(&form.template),
        body: non_empty(&form.body).map(serde_json::Value::String),
        event_id: non_empty(&form.event_id),
    };
    let i = &v.state.intake;
    let result = match preview(&i.store, &i.pipeline, request).await {
        Ok(p) => Ok(p),
        Err(PreviewError::Store(e)) => return Err(e.into()),
        Err(e) => Err(e.to_string()),
    };
    let body = status_and_form(&v, &form, Some(result));
    Ok(html(views::page("Templates", Nav::Templates, Some(&v.session), None, body)))
}

/// Largest `/admin/preview` body.
const MAX_PREVIEW_BODY: usize = 1024 * 1024;

/// `POST /admin/preview` (Bearer admin token): `{"source", "template"?, "body"}` or `{"event_id"}` → the preview.
pub async fn admin_preview(
    _: Admin,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let limit = MAX_PREVIEW_BODY.max(state.max_body_bytes);
    let request: PreviewRequest = crate::routes::body::read_json(
        &req,
        payload,
        limit,
        &state,
        "preview",
        r#"{"source", "template"?, "body"} or {"event_id"}"#,
    )
    .await?;
    let i = &state.intake;
    match preview(&i.store, &i.pipeline, request).await {
        Ok(p) => Ok(HttpResponse::Ok().json(p)),
        Err(PreviewError::Invalid(m)) => Err(ApiError::new(ErrorCode::InvalidBody, m)),
        Err(PreviewError::NoEvent(id)) => {
            Err(ApiError::new(ErrorCode::NotFound, format!("no event {id:?}")).with_field("event_id"))
        }
        Err(PreviewError::Render(e)) => Err(ApiError::new(ErrorCode::InvalidBody, e.to_string()).with_field("body")),
        Err(PreviewError::Store(e)) => Err(ApiError::internal(&e)),
    }
}
