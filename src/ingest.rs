//! The pure ingest pipeline: parse a body → source items → template → validated Heap calls, plus a per-item
//! account of what was rejected and why. No I/O; the route stores what this returns.

use crate::domain::heap_call::{BuildContext, KeySeed};
use crate::domain::{
    AppIdPolicy, CallKind, FieldError, HeapCall, IdentityPolicy, KeyScheme, PropertyLimits, Seed, Timestamp,
    TrackEvent, UserProperties,
};
use crate::json::{JsonError, JsonLimits};
use crate::sources::{self, Shape, Source, SourceOptions};
use crate::templates::render::RenderLimits;
use crate::templates::{Draft, Render, Template, TemplateStore, valid_name};
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
    /// Items the template chose to send nothing for (a Segment `group` message, say, or `{% abort %}`).
    pub ignored: Vec<usize>,
    /// Version of the template that rendered the accepted items (`Template::version`): store it with each event,
    /// so that a re-render can select events by the version that produced them. `None` for Heap-compatible routes.
    pub template_version: Option<String>,
    /// Set when the route's template exists as a file but does not load (and has no last good version): the
    /// template's load error, `file:line:column: message`. Then `accepted`, `rejected` and `ignored` are empty and
    /// `items` counts the body's items: store the raw body with its items held, and render them again once the
    /// template is fixed. Only returned when `Pipeline::hold_broken_templates` is on; otherwise such a body is
    /// refused with `IngestError::UnknownTemplate` naming the load error.
    pub held: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("source {0:?} is disabled in config.toml")]
    SourceDisabled(&'static str),
    #[error("{}", unknown_template(source_name, name, broken.as_deref()))]
    UnknownTemplate {
        source_name: &'static str,
        name: String,
        /// The template's load error when its file exists but does not load.
        broken: Option<String>,
    },
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
    /// Answer a body whose template does not load with `Outcome::held` instead of `UnknownTemplate`: the store
    /// keeps such bodies with their items held, and a re-render after the fix delivers them.
    pub hold_broken_templates: bool,
}

fn unknown_template(source: &str, name: &str, broken: Option<&str>) -> String {
    match broken {
        Some(e) => format!("template {name:?} of source {source} does not load: {e}"),
        None => {
            format!("no template {name:?} for source {source} (looked for templates/{source}/{name}.json)")
        }
    }
}

impl Pipeline {
    pub fn ingest(&self, route: &Route, body: &[u8], received_at: &Timestamp) -> Result<Outcome, IngestError> {
        self.ingest_in("", route, body, received_at, KeyScheme::default())
    }

    /// As [`Pipeline::ingest`], in an environment (`""`: the default one): its app_id is the one events get, and
    /// a call naming another environment's app_id is refused (`wrong_environment`). `keys`: how derived
    /// idempotency keys hash an item (a new body: the default; a stored body: the scheme it was stored with).
    pub fn ingest_in(
        &self,
        environment: &str,
        route: &Route,
        body: &[u8],
        received_at: &Timestamp,
        keys: KeyScheme,
    ) -> Result<Outcome, IngestError> {
        let value = crate::json::parse(body, &self.json_limits)?;
        self.ingest_value_in(environment, route, &value, received_at, keys)
    }

    pub fn ingest_value(&self, route: &Route, value: &Value, received_at: &Timestamp) -> Result<Outcome, IngestError> {
        self.ingest_value_in("", route, value, received_at, KeyScheme::default())
    }

    pub fn ingest_value_in(
        &self,
        environment: &str,
        route: &Route,
        value: &Value,
        received_at: &Timestamp,
        keys: KeyScheme,
    ) -> Result<Outcome, IngestError> {
        let mut out = match route {
            Route::Heap(kind) => self.ingest_heap(*kind, value, received_at, keys)?,
            Route::Hook { source, template } => {
                self.ingest_hook(*source, template.as_deref(), value, (received_at, keys), environment)?
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
        (received_at, keys): (&Timestamp, KeyScheme),
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
        let unknown =
            |broken| IngestError::UnknownTemplate { source_name: source.as_str(), name: name.to_owned(), broken };
        if !valid_name(name) {
            return Err(unknown(None));
        }
        let tpl = self.templates.get(source.as_str(), name);
        let held = match &tpl {
            Some(_) => None,
            None => match self.templates.broken(source.as_str(), name) {
                Some(e) if self.hold_broken_templates => Some(e.to_string()),
                Some(e) => return Err(unknown(Some(e.to_string()))),
                None => return Err(unknown(None)),
            },
        };
        // Counted before any item is built: a body past limits.max_items costs nothing more.
        let items = sources::count(source, value);
        self.check_count(items)?;
        let Some(tpl) = tpl else {
            // Held: the body is stored as it came, its items wait for the template to load.
            if sources::for_each(source, value, &cfg.options, &mut |_| {}).map_err(IngestError::Body)? == Shape::Ping {
                return Ok(Outcome { ping: true, template: name.to_owned(), ..Default::default() });
            }
            return Ok(Outcome { template: name.to_owned(), items, held, ..Default::default() });
        };
        let app_id = match self.environments.get(environment) {
            Some(id) => Some(id.as_str()),
            None => cfg.app_id.as_deref().or(self.default_app_id.as_deref()),
        };
        let mut out =
            Outcome { template: name.to_owned(), template_version: Some(tpl.version.clone()), ..Default::default() };
        let defaults: &[String] = if self.identity_policy.refuses_template_default() {
            tpl.constant_identities(&self.render_limits)
        } else {
            &[]
        };
        let mut options = cfg.options;
        options.raw_body = tpl.reads_body;
        let mut index = 0usize;
        let shape = sources::for_each(source, value, &options, &mut |item| {
            let at = ItemAt { index, source, name, app_id, defaults, keys };
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

    fn ingest_heap(
        &self,
        kind: CallKind,
        value: &Value,
        received_at: &Timestamp,
        keys: KeyScheme,
    ) -> Result<Outcome, IngestError> {
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
            let built = item.and_then(|body| {
                let draft = Draft { kind, body };
                let cx = BuildContext {
                    policy: &self.heap_compat_policy,
                    default_app_id: self.default_app_id.as_deref(),
                    limits: &self.limits,
                    received_at,
                    key: KeySeed { scheme: keys, parts: &["heap", kind.as_str()], seed: Seed::Object(&draft.body) },
                };
                build(&draft, &cx).and_then(|c| self.admit_identity(c, &[]))
            });
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
        let ItemAt { index, source, name, app_id, defaults, keys } = *at;
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
        let drafts = match tpl.render_item(&item.ctx, &self.render_limits) {
            Ok(Render::Calls(d)) => d,
            // `{% abort %}`: the template chose to send nothing for this item.
            Ok(Render::Aborted) => {
                out.ignored.push(index);
                return;
            }
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
        let parts = [source.as_str(), name];
        let cx = BuildContext {
            policy: &self.policy,
            default_app_id: app_id,
            limits: &self.limits,
            received_at,
            key: KeySeed { scheme: keys, parts: &parts, seed: item.seed },
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
    keys: KeyScheme,
}

/// A Segment message's `messageId`, as the sender set it.
fn message_id_of(source: Source, ctx: &crate::templates::context::CtxObject<'_>) -> Option<String> {
    use liquid_core::ValueView;
    if source != Source::Segment {
        return None;
    }
    let id = ctx.lookup("messageId")?.as_scalar()?.to_kstr().to_string();
    (!id.trim().is_empty()).then_some(id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline_with(files: &[(&str, &str)], hold: bool) -> (Pipeline, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let mut settings = crate::settings::Settings::defaults();
        settings.heap.app_id = "1234567890".into();
        let (store, _) = TemplateStore::open_with(dir.path(), Default::default());
        let mut p = crate::startup::build_pipeline(&settings, Arc::new(store));
        p.hold_broken_templates = hold;
        (p, dir)
    }

    fn route(name: &str) -> Route {
        Route::Hook { source: Source::Segment, template: Some(name.into()) }
    }

    #[test]
    fn an_outcome_names_the_version_of_the_template_that_rendered_it() {
        let (p, _d) = pipeline_with(&[("segment/t.json", r#"{"event": "E", "identity": "{{ userId }}"}"#)], false);
        let out = p.ingest_value(&route("t"), &json!({"type": "track", "userId": "u"}), &Timestamp::now()).unwrap();
        assert_eq!(out.accepted.len(), 1);
        let version = out.template_version.expect("a version");
        assert_eq!(version, p.templates.get("segment", "t").unwrap().version);
        assert_eq!(out.held, None);
    }

    #[test]
    fn a_body_for_a_template_that_does_not_load_is_held_with_the_load_error_when_holding_is_on() {
        let broken = "{\n \"event\": \"{{ x | nosuch }}\", \"identity\": \"u\"\n}";
        let body = json!({"batch": [{"type": "track", "userId": "u"}, {"type": "track", "userId": "v"}]});
        let (p, _d) = pipeline_with(&[("segment/b.json", broken)], true);
        let out = p.ingest_value(&route("b"), &body, &Timestamp::now()).unwrap();
        let held = out.held.expect("held");
        assert!(held.contains("segment/b.json:2:") && held.contains("nosuch"), "{held}");
        assert_eq!((out.items, out.accepted.len(), out.rejected.len(), out.ignored.len()), (2, 0, 0, 0));
        assert_eq!(out.template_version, None);

        let (p, _d) = pipeline_with(&[("segment/b.json", broken)], false);
        let err = p.ingest_value(&route("b"), &body, &Timestamp::now()).unwrap_err();
        assert!(matches!(&err, IngestError::UnknownTemplate { broken: Some(_), .. }), "{err}");
        assert!(err.to_string().contains("does not load") && err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn a_clevertap_template_that_reads_body_gets_the_profile_as_sent() {
        let t = r#"{"event": "E", "identity": "{{ body.identity }}", "properties": {"d": "{{ body.event_properties.When }}"}}"#;
        let (p, _d) = pipeline_with(
            &[("clevertap/b.json", t), ("clevertap/n.json", r#"{"event": "E", "identity": "u"}"#)],
            false,
        );
        assert!(p.templates.get("clevertap", "b").unwrap().reads("body"));
        assert!(!p.templates.get("clevertap", "n").unwrap().reads("body"));
        let body = json!({"profiles": [{"identity": "u_9", "event_properties": {"When": "$D_1731956100"}}]});
        let route = Route::Hook { source: Source::CleverTap, template: Some("b".into()) };
        let out = p.ingest_value(&route, &body, &Timestamp::now()).unwrap();
        let v = out.accepted[0].call.single_body();
        assert_eq!(v["identity"], "u_9");
        assert_eq!(v["properties"]["d"], "2024-11-18T18:55:00Z");
    }
}
