//! A template preview: renders a body (pasted, or a stored event's raw body) with today's template files and says
//! which Heap calls it would make and which items it would refuse; for a stored event, also what differs from what
//! was stored (and sent). Nothing is stored or sent. The console's Templates page and `POST /admin/preview` share it.

use crate::domain::{KeyScheme, Timestamp};
use crate::ingest::{Pipeline, Route};
use crate::sources::Source;
use crate::store::{Selector, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What to preview: a `body` for a `source` (and optional `template`), or a stored `event_id`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    pub source: Option<String>,
    pub template: Option<String>,
    /// The body as JSON text (the console's textarea) or any JSON value (`POST /admin/preview`).
    pub body: Option<Value>,
    pub event_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreviewCall {
    /// The body item it came from.
    pub item_index: usize,
    /// `/api/track` or `/api/add_user_properties` (bulk: one element of its array).
    pub path: &'static str,
    pub event: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreviewRefusal {
    pub item_index: usize,
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

/// A stored event beside what today's templates make of the same item.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDiff {
    pub event_id: String,
    pub item_index: i64,
    /// What was stored for the event (and sent, if it went): none for a refused item.
    pub stored: Option<Value>,
    /// Today's rendering of the same item: none if it is refused now.
    pub now: Option<Value>,
    /// Top-level keys whose values differ (`properties.plan` for a nested one).
    pub changed: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub source: String,
    pub template: String,
    pub calls: Vec<PreviewCall>,
    pub refused: Vec<PreviewRefusal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredDiff>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("{0}")]
    Invalid(String),
    #[error("no stored event {0:?}")]
    NoEvent(String),
    #[error("{0}")]
    Render(#[from] crate::ingest::IngestError),
    #[error(transparent)]
    Store(StoreError),
}

pub async fn preview(store: &Store, pipeline: &Pipeline, req: PreviewRequest) -> Result<Preview, PreviewError> {
    super::fresh_templates(pipeline);
    match req.event_id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => preview_stored(store, pipeline, id).await,
        None => preview_body(pipeline, &req),
    }
}

fn preview_body(pipeline: &Pipeline, req: &PreviewRequest) -> Result<Preview, PreviewError> {
    let source = req.source.as_deref().map(str::trim).unwrap_or("");
    let template = req.template.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let route = match (source, template) {
        ("heap", t) => Route::from_stored("heap", t.unwrap_or("track")),
        (s, t) => Source::parse(s).map(|source| Route::Hook { source, template: t.map(str::to_owned) }),
    }
    .ok_or_else(|| {
        PreviewError::Invalid(format!("unknown source {source:?}; one of clevertap, userpilot, segment, heap"))
    })?;
    let body = match &req.body {
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(v) => v.to_string().into_bytes(),
        None => return Err(PreviewError::Invalid("give a body, or a stored event's id".into())),
    };
    let (calls, refused, template) = render(pipeline, "", &route, &body, (&Timestamp::now(), KeyScheme::default()))?;
    Ok(Preview { source: route.source_name().to_owned(), template, calls, refused, stored: None })
}

async fn preview_stored(store: &Store, pipeline: &Pipeline, id: &str) -> Result<Preview, PreviewError> {
    let event = store.get(id).await.map_err(|e| match e {
        StoreError::NotFound => PreviewError::NoEvent(id.to_owned()),
        e => PreviewError::Store(e),
    })?;
    let bodies = store.raw_bodies(Selector::Id(id.to_owned())).await.map_err(PreviewError::Store)?;
    let Some(crate::store::RawBody { source, template, received_at, body, key_scheme, environment, .. }) =
        bodies.into_iter().next()
    else {
        return Err(PreviewError::Invalid(format!("event {id:?} has no stored body (replaced, or pruned)")));
    };
    let route = Route::from_stored(&source, &template).ok_or_else(|| {
        PreviewError::Invalid(format!("event {id:?} came through an unknown route {source}/{template}"))
    })?;
    let ts = chrono::DateTime::from_timestamp_millis(received_at)
        .map(Timestamp::from_datetime)
        .unwrap_or_else(Timestamp::now);
    // As a re-render would: the body's environment and key scheme, so that only what the template changes differs.
    let (calls, refused, template) = render(pipeline, &environment, &route, &body, (&ts, key_scheme))?;
    let index = usize::try_from(event.item_index).unwrap_or(usize::MAX);
    let now = calls.iter().find(|c| c.item_index == index).map(|c| c.event.clone());
    let changed = changed_keys(event.payload.as_ref(), now.as_ref());
    let stored = StoredDiff { event_id: event.id, item_index: event.item_index, stored: event.payload, now, changed };
    Ok(Preview { source, template, calls, refused, stored: Some(stored) })
}

type Rendered = (Vec<PreviewCall>, Vec<PreviewRefusal>, String);

fn render(
    pipeline: &Pipeline,
    environment: &str,
    route: &Route,
    body: &[u8],
    (ts, keys): (&Timestamp, KeyScheme),
) -> Result<Rendered, PreviewError> {
    let outcome = pipeline.ingest_in(environment, route, body, ts, keys)?;
    let calls = outcome
        .accepted
        .iter()
        .map(|a| PreviewCall { item_index: a.index, path: a.call.kind().path(), event: a.call.bulk_item() })
        .collect();
    let refused = outcome
        .rejected
        .into_iter()
        .map(|r| PreviewRefusal { item_index: r.index, field: r.field, code: r.code, message: r.message })
        .collect();
    Ok((calls, refused, outcome.template))
}

/// Keys whose values differ between two events, one level into objects (`properties.plan`).
pub fn changed_keys(a: Option<&Value>, b: Option<&Value>) -> Vec<String> {
    let empty = serde_json::Map::new();
    let obj = |v: Option<&Value>| v.and_then(Value::as_object).cloned().unwrap_or_else(|| empty.clone());
    let (a, b) = (obj(a), obj(b));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let mut inner: Vec<&String> = x.keys().chain(y.keys()).collect();
                inner.sort();
                inner.dedup();
                out.extend(inner.into_iter().filter(|i| x.get(*i) != y.get(*i)).map(|i| format!("{k}.{i}")));
            }
            (x, y) if x != y => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::changed_keys;
    use serde_json::json;

    #[test]
    fn changed_keys_name_nested_properties() {
        let a = json!({"event": "A", "properties": {"plan": "x", "n": 1}, "identity": "u"});
        let b = json!({"event": "B", "properties": {"plan": "y", "n": 1}, "identity": "u", "extra": true});
        assert_eq!(changed_keys(Some(&a), Some(&b)), ["event", "extra", "properties.plan"]);
        assert!(changed_keys(Some(&a), Some(&a)).is_empty());
    }
}
