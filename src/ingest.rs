//! The pure ingest pipeline: parse a body → source items → template → validated Heap calls, plus a per-item
//! account of what was rejected and why. No I/O; the route stores what this returns.

use crate::domain::heap_call::BuildContext;
use crate::domain::{
    AppIdPolicy, CallKind, FieldError, HeapCall, IdentityPolicy, PropertyLimits, Timestamp, TrackEvent, UserProperties,
};
use crate::json::{JsonError, JsonLimits};
use crate::sources::{self, Shape, Source, SourceOptions};
use crate::templates::render::RenderLimits;
use crate::templates::{Draft, Template, TemplateStore, valid_name};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a body came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/hooks/{source}[/{template}]`; `None` uses the source's configured template.
    Hook { source: Source, template: Option<String> },
    /// Heap-compatible `/api/track` or `/api/add_user_properties`.
    Heap(CallKind),
}

impl Route {
    /// Names stored with each raw body, so that a replay can run the same route again.
    pub fn source_name(&self) -> &'static str {
        match self {
            Route::Hook { source, .. } => source.as_str(),
            Route::Heap(_) => "heap",
        }
    }

    /// Rebuilds a route from what the store keeps (`source`, `template`).
    pub fn from_stored(source: &str, template: &str) -> Option<Self> {
        if source == "heap" {
            return CallKind::parse(template).map(Route::Heap);
        }
        Some(Route::Hook { source: Source::parse(source)?, template: Some(template.to_owned()) })
    }
}

/// Per-source settings the pipeline needs.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub enabled: bool,
    pub template: String,
    pub app_id: Option<String>,
    pub options: SourceOptions,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Rejection {
    pub index: usize,
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug)]
pub struct Accepted {
    pub index: usize,
    pub call: HeapCall,
    /// The sender's own id of the item (a Segment `messageId`): a retry of a call Heap gives no idempotency key
    /// (add_user_properties) is still recognised by it.
    pub message_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// A vendor connection test: answer 200, store nothing.
    pub ping: bool,
    /// The template used (or the Heap endpoint for Heap-compatible routes).
    pub template: String,
    pub items: usize,
    pub accepted: Vec<Accepted>,
    pub rejected: Vec<Rejection>,
    /// Items the template chose to send nothing for (a Segment `group` message, say).
    pub ignored: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("source {0:?} is disabled in config.toml")]
    SourceDisabled(&'static str),
    #[error("no template {name:?} for source {source_name} (looked for templates/{source_name}/{name}.json)")]
    UnknownTemplate { source_name: &'static str, name: String },
    #[error("{0}")]
    Body(FieldError),
    #[error("{items} items in one body; the limit is {limit} (limits.max_items)")]
    TooManyItems { items: usize, limit: usize },
}

/// Everything ingest needs, built once from settings.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub templates: Arc<TemplateStore>,
    pub policy: AppIdPolicy,
    /// Identities refused although well formed (placeholders, "0"/"-1", a template's constant default).
    pub identity_policy: IdentityPolicy,
    /// Which app_ids the Heap-compatible routes accept: only configured ones (`AppIdPolicy::only`).
    pub heap_compat_policy: AppIdPolicy,
    pub default_app_id: Option<String>,
    pub limits: PropertyLimits,
    pub render_limits: RenderLimits,
    pub sources: HashMap<Source, SourceConfig>,
    pub heap_compat_enabled: bool,
    pub max_items: usize,
    /// Bounds a body must meet before it is parsed (nesting depth).
    pub json_limits: JsonLimits,
    /// Each named environment's Heap app_id (`[environments.<name>]`); the default environment (`""`) has none
    /// and uses the source's or `heap.app_id`.
    pub environments: HashMap<String, String>,
}

impl Pipeline {
    pub fn ingest(&self, route: &Route, body: &[u8], received_at: &Timestamp) -> Result<Outcome, IngestError> {
        self.ingest_in("", route, body, received_at)
    }

    /// As [`Pipeline::ingest`], in an environment (`""`: the default one): its app_id is the one events get, and
    /// a call naming another environment's app_id is refused (`wrong_environment`).
    pub fn ingest_in(
        &self,
        environment: &str,
        route: &Route,
        body: &[u8],
        received_at: &Timestamp,
    ) -> Result<Outcome, IngestError> {
        let value = crate::json::parse(body, &self.json_limits)?;
        self.ingest_value_in(environment, route, &value, received_at)
    }

    pub fn ingest_value(&self, route: &Route, value: &Value, received_at: &Timestamp) -> Result<Outcome, IngestError> {
        self.ingest_value_in("", route, value, received_at)
    }

    pub fn ingest_value_in(
        &self,
        environment: &str,
        route: &Route,
        value: &Value,
        received_at: &Timestamp,
    ) -> Result<Outcome, IngestError> {
        let mut out = match route {
            Route::Heap(kind) => self.ingest_heap(*kind, value, received_at)?,
            Route::Hook { source, template } => {
                self.ingest_hook(*source, template.as_deref(), value, received_at, environment)?
            }
        };
        if !self.environments.is_empty() {
            self.refuse_other_environments(environment, &mut out);
        }
        Ok(out)
    }

    /// The environment decides the app_id: an item with a call whose app_id is another environment's project (a
    /// template's literal app_id, or a Heap body's) is refused whole, as every rejection is.
    fn refuse_other_environments(&self, environment: &str, out: &mut Outcome) {
        // The default environment's own app_ids are heap.app_id and the sources' (one may equal a named
        // environment's: a default that is also "prod" stays valid).
        let own: Vec<&str> = match self.environments.get(environment) {
            Some(id) => vec![id.as_str()],
            None => self
                .default_app_id
                .iter()
                .chain(self.sources.values().filter_map(|c| c.app_id.as_ref()))
                .map(String::as_str)
                .collect(),
        };
        let foreign = |app_id: &str| {
            !own.contains(&app_id) && self.environments.iter().any(|(name, id)| name != environment && id == app_id)
        };
        let bad: Vec<(usize, String)> = out
            .accepted
            .iter()
            .filter(|a| foreign(a.call.app_id().as_str()))
            .map(|a| (a.index, a.call.app_id().as_str().to_owned()))
            .collect();
        if bad.is_empty() {
            return;
        }
        let mut refused = std::collections::BTreeMap::new();
        for (index, app_id) in bad {
            refused.entry(index).or_insert(app_id);
        }
        out.accepted.retain(|a| !refused.contains_key(&a.index));
        let here = if environment.is_empty() {
            "the default environment".to_owned()
        } else {
            format!("environment {environment:?}")
        };
        for (index, app_id) in refused {
            let owner = self.environments.iter().find(|(_, id)| **id == app_id).map(|(n, _)| n.as_str()).unwrap_or("");
            out.rejected.push(Rejection {
                index,
                field: "app_id".into(),
                code: "wrong_environment",
                message: format!(
                    "app_id {app_id} is environment {owner:?}'s Heap project; this request is in {here}, which \
                     decides the app_id (drop the literal app_id from the template or body, or send with {owner:?}'s credential)"
                ),
            });
        }
        out.rejected.sort_by_key(|r| r.index);
    }

    fn ingest_hook(
        &self,
        source: Source,
        template: Option<&str>,
        value: &Value,
        received_at: &Timestamp,
        environment: &str,
    ) -> Result<Outcome, IngestError> {
        let cfg = self.sources.get(&source).cloned().unwrap_or_else(|| SourceConfig {
            enabled: true,
            template: "default".into(),
            app_id: None,
            options: SourceOptions::default(),
        });
        if !cfg.enabled {
            return Err(IngestError::SourceDisabled(source.as_str()));
        }
        let name = template.unwrap_or(&cfg.template);
        let unknown = || IngestError::UnknownTemplate { source_name: source.as_str(), name: name.to_owned() };
        if !valid_name(name) {
            return Err(unknown());
        }
        let tpl = self.templates.get(source.as_str(), name).ok_or_else(unknown)?;
        // Counted before any item is built: a body past limits.max_items costs nothing more.
        self.check_count(sources::count(source, value))?;
        let app_id = match self.environments.get(environment) {
            Some(id) => Some(id.as_str()),
            None => cfg.app_id.as_deref().or(self.default_app_id.as_deref()),
        };
        let mut out = Outcome { template: name.to_owned(), ..Default::default() };
        let defaults = self.template_defaults(&tpl);
        let mut index = 0usize;
        let shape = sources::for_each(source, value, &cfg.options, &mut |item| {
            let at = ItemAt { index, source, name, app_id, defaults: &defaults };
            self.take_item(&mut out, item, &tpl, &at, received_at);
            index += 1;
        })
        .map_err(IngestError::Body)?;
        if shape == Shape::Ping {
            return Ok(Outcome { ping: true, template: name.to_owned(), ..Default::default() });
        }
        out.items = index;
        Ok(out)
    }

    fn ingest_heap(&self, kind: CallKind, value: &Value, received_at: &Timestamp) -> Result<Outcome, IngestError> {
        if !self.heap_compat_enabled {
            return Err(IngestError::SourceDisabled("heap"));
        }
        // Counted before the items are built (each is a copy of its object).
        if let Some(Value::Array(list)) = value.get(kind.bulk_field()) {
            self.check_count(list.len())?;
        }
        let items = sources::heap::items(kind, value).map_err(IngestError::Body)?;
        self.check_count(items.len())?;
        let prefix = if value.get(kind.bulk_field()).is_some() { kind.bulk_field() } else { "" };
        let mut out = Outcome { template: kind.as_str().to_owned(), items: items.len(), ..Default::default() };
        for (index, item) in items.into_iter().enumerate() {
            // Serialised from the borrowed map: the same bytes as the object's JSON, without copying the item.
            let seed_text = item.as_ref().ok().and_then(|o| serde_json::to_string(o).ok()).unwrap_or_default();
            let seed = ["heap", kind.as_str(), seed_text.as_str()];
            let cx = BuildContext {
                policy: &self.heap_compat_policy,
                default_app_id: self.default_app_id.as_deref(),
                limits: &self.limits,
                received_at,
                key_seed: &seed,
            };
            let built =
                item.and_then(|body| build(&Draft { kind, body }, &cx).and_then(|c| self.admit_identity(c, &[])));
            let built = built.map_err(|e| {
                if prefix.is_empty() || e.field.starts_with(prefix) {
                    e
                } else {
                    e.under(&format!("{prefix}[{index}]"))
                }
            });
            match built {
                Ok(call) => out.accepted.push(Accepted { index, call, message_id: None }),
                Err(e) => out.rejected.push(rejection(index, e)),
            }
        }
        Ok(out)
    }

    /// What the template's identity renders to for a body with no fields (sections without a `when` that an
    /// empty body fails): a constant default such as `| default: 'user@example.com'`, which would make every item
    /// without the field one Heap user (`identity.refuse_template_default`).
    fn template_defaults(&self, tpl: &Template) -> Vec<String> {
        if !self.identity_policy.refuses_template_default() {
            return Vec::new();
        }
        let empty = crate::templates::context::CtxObject::new();
        let Ok(drafts) = tpl.render(&empty, &self.render_limits) else {
            return Vec::new();
        };
        drafts
            .iter()
            .filter_map(|d| match d.body.get("identity") {
                Some(Value::String(s)) => Some(s.trim().to_owned()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The identity policy for a built call.
    fn admit_identity(&self, call: HeapCall, defaults: &[String]) -> Result<HeapCall, FieldError> {
        if let Some(identity) = call.named_identity() {
            self.identity_policy.check(identity, defaults)?;
        }
        Ok(call)
    }

    /// Renders and builds one item into `out`.
    fn take_item(
        &self,
        out: &mut Outcome,
        item: Result<sources::Item, FieldError>,
        tpl: &Template,
        at: &ItemAt<'_>,
        received_at: &Timestamp,
    ) {
        let ItemAt { index, source, name, app_id, defaults } = *at;
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                out.rejected.push(rejection(index, e));
                return;
            }
        };
        if item.excluded {
            out.ignored.push(index);
            return;
        }
        let drafts = match tpl.render(&item.ctx, &self.render_limits) {
            Ok(d) => d,
            Err(e) => {
                out.rejected.push(Rejection {
                    index,
                    field: "template".into(),
                    code: e.code(),
                    message: e.to_string(),
                });
                return;
            }
        };
        // A user-properties section whose properties all rendered to nothing has nothing to set: left out,
        // like any empty leaf, rather than failing the item (and its track event with it).
        let drafts: Vec<Draft> = drafts.into_iter().filter(|d| !is_empty_user_properties(d)).collect();
        if drafts.is_empty() {
            out.ignored.push(index);
            return;
        }
        let seed = [source.as_str(), name, item.seed.as_str()];
        let cx = BuildContext {
            policy: &self.policy,
            default_app_id: app_id,
            limits: &self.limits,
            received_at,
            key_seed: &seed,
        };
        // All of an item's calls are accepted, or none: half an item in Heap is harder to repair than none.
        match drafts
            .iter()
            .map(|d| build(d, &cx).and_then(|c| self.admit_identity(c, defaults)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(calls) => {
                let message_id = message_id_of(source, &item.ctx);
                out.accepted.extend(calls.into_iter().map(|call| Accepted {
                    index,
                    call,
                    message_id: message_id.clone(),
                }))
            }
            Err(e) => out.rejected.push(rejection(index, e)),
        }
    }

    fn check_count(&self, items: usize) -> Result<(), IngestError> {
        if items > self.max_items {
            return Err(IngestError::TooManyItems { items, limit: self.max_items });
        }
        Ok(())
    }
}

/// Where an item sits: its index and the route's source, template and app_id, and the template's constant
/// identity defaults.
#[derive(Clone, Copy)]
struct ItemAt<'a> {
    index: usize,
    source: Source,
    name: &'a str,
    app_id: Option<&'a str>,
    defaults: &'a [String],
}

/// A Segment message's `messageId`, as the sender set it.
fn message_id_of(source: Source, ctx: &crate::templates::context::CtxObject) -> Option<String> {
    use crate::templates::context::Ctx;
    use liquid_core::ValueView;
    if source != Source::Segment {
        return None;
    }
    match ctx.lookup("messageId") {
        Some(Ctx::Scalar(s)) => Some(s.to_kstr().to_string()).filter(|m| !m.trim().is_empty()),
        _ => None,
    }
}

fn is_empty_user_properties(d: &Draft) -> bool {
    d.kind == CallKind::UserProperties
        && match d.body.get("properties") {
            None | Some(Value::Null) => true,
            Some(Value::Object(m)) => m.values().all(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty())),
            Some(_) => false,
        }
}

fn build(draft: &Draft, cx: &BuildContext<'_>) -> Result<HeapCall, FieldError> {
    Ok(match draft.kind {
        CallKind::Track => HeapCall::Track(TrackEvent::build(&draft.body, cx)?),
        CallKind::UserProperties => HeapCall::UserProperties(UserProperties::build(&draft.body, cx)?),
    })
}

fn rejection(index: usize, e: FieldError) -> Rejection {
    Rejection { index, field: e.field, code: e.code, message: e.message }
}

/// Parses a body as strict JSON under the default limits (see `crate::json`), with line and column on failure.
pub fn parse_json(body: &[u8]) -> Result<Value, IngestError> {
    Ok(crate::json::parse(body, &JsonLimits::default())?)
}
