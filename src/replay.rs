//! Replay: put stored events back in the queue, or, with re-render, run their stored raw bodies through today's
//! templates again, so a template fixed after a bad deploy repairs the events it broke. Shared by
//! `heap-relay replay` and `POST /admin/replay`.

use crate::domain::Timestamp;
use crate::ingest::{Pipeline, Route};
use crate::intake::to_rows;
use crate::store::{Millis, RawBody, Selector, Status, Store, StoreError};
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events put back in the queue as they were.
    pub requeued: i64,
    /// Raw bodies rendered again.
    pub bodies: usize,
    /// Events the re-render produced (queued for delivery).
    pub accepted: usize,
    /// Items the re-render still rejected.
    pub rejected: usize,
    /// Raw bodies that could not be re-rendered at all (unknown template, malformed).
    pub failed: usize,
}

/// Parses the selector given on the command line or in an admin request.
pub fn selector(
    id: Option<&str>,
    status: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<Selector, String> {
    let status = status.map(parse_status).transpose()?;
    if let Some(id) = id {
        return Ok(Selector::Id(id.to_owned()));
    }
    match (time_range(since, until)?, status) {
        (Some((from, to)), status) => Ok(Selector::Range { from, to, status }),
        (None, Some(status)) => Ok(Selector::Status(status)),
        (None, None) => Err("say which events: an id, a status, or a time range (since/until)".to_owned()),
    }
}

/// The events of template `spec` (`<source>/<name>`) that a version other than today's rendered, or that were
/// held because it did not load: what a re-render after a template fix should repair.
pub fn stale_template(pipeline: &Pipeline, spec: &str) -> Result<Selector, String> {
    let (source, name) = spec
        .split_once('/')
        .ok_or_else(|| format!("{spec:?}: name a template as <source>/<name>, e.g. clevertap/default"))?;
    let current = pipeline
        .templates
        .get(source, name)
        .ok_or_else(|| format!("template {spec} does not load now; fix it first (heap-relay check)"))?;
    Ok(Selector::StaleTemplate {
        source: source.to_owned(),
        template: name.to_owned(),
        current: current.version.clone(),
    })
}

/// A status named in a selection or a listing; the error lists every status there is.
pub fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {s:?}; one of {}", all.join(", "))
    })
}

/// `since`/`until` (ISO-8601, either may be missing) as a millisecond range; `None` when both are missing.
pub fn time_range(since: Option<&str>, until: Option<&str>) -> Result<Option<(Millis, Millis)>, String> {
    let time = |t: &str| {
        Timestamp::parse(&serde_json::Value::String(t.to_owned()))
            .ok()
            .and_then(|ts| chrono::DateTime::parse_from_rfc3339(ts.as_str()).ok())
            .map(|d| d.timestamp_millis())
            .ok_or_else(|| format!("{t:?} is not a time; use ISO-8601 such as 2024-11-18T19:00:00Z"))
    };
    if since.is_none() && until.is_none() {
        return Ok(None);
    }
    Ok(Some((since.map(time).transpose()?.unwrap_or(0), until.map(time).transpose()?.unwrap_or(Millis::MAX))))
}

pub async fn replay(
    store: &Store,
    pipeline: &Pipeline,
    selector: Selector,
    rerender: bool,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<ReplayReport, StoreError> {
    replay_all(store, pipeline, vec![selector], rerender, progress).await
}

/// As [`replay`], for several selections at once (a failure group's events): a body behind several of them is
/// re-rendered once.
pub async fn replay_all(
    store: &Store,
    pipeline: &Pipeline,
    selectors: Vec<Selector>,
    rerender: bool,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<ReplayReport, StoreError> {
    let mut report = ReplayReport::default();
    if !rerender {
        let total = selectors.len();
        for (done, selector) in selectors.into_iter().enumerate() {
            report.requeued += store.requeue(selector).await?;
            progress(done + 1, total);
        }
        return Ok(report);
    }
    // The bodies' ids first, then one body at a time: only one body is in memory, however large the selection (a
    // whole status, a failure group of a million events).
    let total = selectors.len();
    let mut seen = std::collections::HashSet::new();
    for (done, selector) in selectors.into_iter().enumerate() {
        for id in store.raw_body_ids(selector).await? {
            // A body behind several selected events is re-rendered once.
            if seen.insert(id)
                && let Some(raw) = store.raw_body(id).await?
            {
                rerender_body(store, pipeline, raw, &mut report).await?;
            }
        }
        progress(done + 1, total);
    }
    Ok(report)
}

/// Renders one stored body again with today's templates and appends what it renders, as a re-render of it.
async fn rerender_body(
    store: &Store,
    pipeline: &Pipeline,
    raw: RawBody,
    report: &mut ReplayReport,
) -> Result<(), StoreError> {
    let RawBody { id: raw_id, source, environment, template, received_at, body, key_scheme } = raw;
    let Some(route) = Route::from_stored(&source, &template) else {
        tracing::warn!(raw_id, source, template, "cannot re-render: unknown route");
        report.failed += 1;
        return Ok(());
    };
    let ts = chrono::DateTime::from_timestamp_millis(received_at)
        .map(Timestamp::from_datetime)
        .unwrap_or_else(Timestamp::now);
    // The same environment as the first time: its app_id, not the default one.
    // The keys the body's first render derived: Heap dedupes a redelivery of an event it already has.
    match pipeline.ingest_in(&environment, &route, &body, &ts, key_scheme) {
        Ok(outcome) => {
            let (mut ingested, summary) = to_rows(route.source_name(), outcome, Vec::new(), received_at, Some(raw_id));
            ingested.environment = environment;
            report.accepted += summary.accepted;
            report.rejected += summary.rejected.len();
            report.bodies += 1;
            store.append(ingested).await?;
        }
        Err(e) => {
            tracing::warn!(raw_id, error = %e, "cannot re-render a stored body");
            report.failed += 1;
        }
    }
    Ok(())
}
