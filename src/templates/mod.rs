//! User-editable templates under `templates/<source>/`: `<name>.json` or `<name>.liquid`, one per Heap mapping.
//!
//! Two kinds, one renderer (see `document`):
//! - a **JSON template** is a JSON document whose string leaves may hold Liquid: a Heap track body (the form
//!   CleverTap's Heap guide uses: `app_id`, `identity`, `event`, `properties`), or an object with a `track`
//!   and/or an `add_user_properties` section, each in Heap's shape with an optional `when` leaf (the section is
//!   sent only when `when` renders to something other than nothing or `false`). Root keys starting with `_` are
//!   comments.
//! - a **text template** is any `.liquid` or `.json` file that is not itself valid JSON: the payload text exactly
//!   as written in CleverTap's webhook editor, Liquid around structure and unquoted outputs included. What it
//!   renders to must be JSON of the same shapes.
//!
//! Every output is escaped for the JSON context it lands in (`output`), so no value can end a string, add a field
//! or change `app_id`. Partials for `{% include %}` live in `templates/<source>/_partials/<name>.liquid`.
//! Examples (template tests) live beside a template in `<name>.tests/*.json` (see `commands::test`).
//!
//! A template that does not load never stops the relay: it is reported (`TemplateStore::broken`), the others
//! work, and a reload replaces templates one by one, keeping the last good version of a template whose edit is
//! broken. Each template has a version (`Template::version`): a short hash of its text and its source's partials.

pub mod bounds;
pub mod context;
pub mod dialect;
pub mod document;
mod if_block;
mod loading;
pub mod output;
mod plan;
pub mod render;
pub mod rewrite;
mod shape;
#[cfg(test)]
mod specs;
mod tags;

use crate::domain::CallKind;
use bounds::LoadLimits;
use context::CtxObject;
use document::{Document, Rendered};
pub use loading::{TemplateSet, TemplateStore};
use render::{LeafError, RenderLimits};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use shape::shape;

/// Largest template file accepted by default, in bytes (`templates.max_template_bytes`).
pub const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

/// Directory of a source's partials, for `{% include 'name' %}`.
pub const PARTIALS_DIR: &str = "_partials";

/// Checks a template name taken from a URL or the command line: `[A-Za-z0-9_-]`, 1 to 64 characters, so that no
/// name can reach outside `templates/<source>/`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A template that could not be loaded, with where.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {message}", location(*line, *column))]
pub struct LoadError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// A template that failed while rendering one item.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {source}")]
pub struct RenderError {
    pub file: String,
    pub source: LeafError,
}

impl RenderError {
    /// The rejection code: `render_timeout`, `render_too_large`, or `template_error`.
    pub fn code(&self) -> &'static str {
        let m = &self.source.message;
        if m.contains("templates.render_timeout_ms") {
            "render_timeout"
        } else if m.contains("templates.max_event_bytes") || m.contains("templates.max_leaf_bytes") {
            "render_too_large"
        } else {
            "template_error"
        }
    }
}

/// One Heap call a template produced, not yet validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub kind: CallKind,
    pub body: Map<String, Value>,
}

/// What rendering one item gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Render {
    /// The calls to make; empty when every section's `when` was false.
    Calls(Vec<Draft>),
    /// `{% abort %}` ran: send nothing for this item.
    Aborted,
}

/// The two kinds of template (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    Json,
    Text,
}

#[derive(Debug)]
pub struct Template {
    pub source: String,
    pub name: String,
    /// Path as shown in messages, e.g. `templates/clevertap/default.json`.
    pub file: String,
    pub kind: TemplateKind,
    /// First 16 hex digits of the SHA-256 of the template's text and its source's partials: names the version
    /// of the template that rendered an event.
    pub version: String,
    /// Whether the template may read the raw `body` variable (`reads("body")`, worked out once at load: sources
    /// build that variable only for templates that read it).
    pub reads_body: bool,
    /// What the identity renders to for a body with no fields, worked out on first use (see
    /// [`Template::constant_identities`]).
    constant_identities: std::sync::OnceLock<Vec<String>>,
    doc: Document,
    /// A JSON template in the subset `plan` evaluates without liquid.
    plan: Option<plan::Plan>,
}

/// Version hash of a template's text and the partials it may include.
pub fn version_of(text: &str, partials: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    for (name, body) in partials {
        h.update([0u8]);
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(body.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

impl Template {
    /// Parses template `text` under the default load limits. `file` is used in error messages.
    pub fn compile(
        parser: &liquid::Parser,
        source: &str,
        name: &str,
        file: &str,
        text: &str,
    ) -> Result<Self, LoadError> {
        Self::compile_with(parser, source, name, file, text, &LoadLimits::default())
    }

    /// Parses template `text`, refusing range loops past `limits` (see `bounds`). Valid JSON is a JSON template;
    /// anything else is a text template.
    pub fn compile_with(
        parser: &liquid::Parser,
        source: &str,
        name: &str,
        file: &str,
        text: &str,
        limits: &LoadLimits,
    ) -> Result<Self, LoadError> {
        Self::compile_versioned(parser, source, name, file, text, limits, version_of(text, &[]))
    }

    fn compile_versioned(
        parser: &liquid::Parser,
        source: &str,
        name: &str,
        file: &str,
        text: &str,
        limits: &LoadLimits,
        version: String,
    ) -> Result<Self, LoadError> {
        let err = |line, column, message: String| LoadError { file: file.to_owned(), line, column, message };
        let at = |offset: usize, message: String| {
            let (l, c) = document::line_col(text, offset);
            err(Some(l), Some(c), message)
        };
        let (kind, doc_text, leaves, plan) = match serde_json::from_str::<Value>(text) {
            Ok(root) => {
                check_json_shape(&root).map_err(|m| err(None, None, m))?;
                let (doc, leaves) = rewrite::json_to_document(text, limits).map_err(|(o, m)| at(o, m))?;
                (TemplateKind::Json, doc, leaves, plan::Plan::compile(&root))
            }
            Err(_) => {
                bounds::check_loops(text, limits).map_err(|m| err(None, None, m))?;
                (TemplateKind::Text, text.to_owned(), Vec::new(), plan::Plan::compile_text(text))
            }
        };
        let doc = match Document::parse(parser, doc_text, leaves) {
            Ok(d) => d,
            Err(e) if kind == TemplateKind::Json => return Err(json_leaf_error(parser, file, text, e)),
            Err(e) => return Err(err(e.line, e.column, e.message)),
        };
        Ok(Self {
            source: source.to_owned(),
            name: name.to_owned(),
            file: file.to_owned(),
            kind,
            version,
            reads_body: doc.reads("body"),
            constant_identities: std::sync::OnceLock::new(),
            doc,
            plan,
        })
    }

    /// The identities the template renders for a body with no fields, in every section whatever its `when` says:
    /// a constant default such as `| default: 'user@example.com'`, which would make every item without the field
    /// one Heap user (a section an empty body turns off still sends that constant for a body that turns it on).
    /// Rendered once per loaded template, not per body.
    pub fn constant_identities(&self, limits: &RenderLimits) -> &[String] {
        self.constant_identities.get_or_init(|| {
            let empty = CtxObject::new();
            let limits = &limits.started(std::time::Instant::now());
            let value = match self.plan.as_ref().and_then(|p| p.eval(&empty, limits)) {
                Some(v) => v,
                None => match self.doc.render(&empty, limits) {
                    Ok(Rendered::Json(v)) => v,
                    _ => return Vec::new(),
                },
            };
            let Value::Object(root) = value else { return Vec::new() };
            let sections: Vec<&Value> = if root.contains_key("track") || root.contains_key("add_user_properties") {
                ["track", "add_user_properties"].iter().filter_map(|k| root.get(*k)).collect()
            } else {
                vec![&Value::Null]
            };
            let identity_of = |section: &Value| match section {
                Value::Null => root.get("identity").cloned(),
                other => other.get("identity").cloned(),
            };
            sections
                .into_iter()
                .filter_map(|section| match identity_of(section) {
                    Some(Value::String(s)) => Some(s.trim().to_owned()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                })
                .filter(|s| !s.is_empty())
                .collect()
        })
    }

    /// Renders one item: the calls whose sections hold, or `Aborted`. The item shares one deadline
    /// (`limits.timeout`) and one output budget (`limits.max_event_bytes`).
    pub fn render_item(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Render, RenderError> {
        self.render_item_through(self.plan.as_ref(), ctx, limits)
    }

    /// Renders through `plan` where it can, else through liquid.
    fn render_item_through(
        &self,
        plan: Option<&plan::Plan>,
        ctx: &CtxObject,
        limits: &RenderLimits,
    ) -> Result<Render, RenderError> {
        let wrap = |source| RenderError { file: self.file.clone(), source };
        let limits = &limits.started(std::time::Instant::now());
        let rendered = match plan.and_then(|p| p.eval(ctx, limits)) {
            Some(v) => Rendered::Json(v),
            None => self.doc.render(ctx, limits).map_err(wrap)?,
        };
        let value = match rendered {
            Rendered::Aborted => return Ok(Render::Aborted),
            Rendered::Json(v) => v,
        };
        // The rendered text stayed within `limits.max_event_bytes` (the output sink stops it past that), and the
        // calls made from it are no longer than that text: no second count is needed.
        let drafts = shape(value).map_err(|message| wrap(LeafError { path: "template".into(), message }))?;
        Ok(Render::Calls(drafts))
    }

    /// Whether the template renders through a direct plan (see `plan`) where it can.
    pub fn has_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// Whether the plan rendered `ctx` itself (without giving it back to liquid).
    #[cfg(test)]
    pub(crate) fn plan_renders(&self, ctx: &CtxObject, limits: &RenderLimits) -> bool {
        self.plan.as_ref().is_some_and(|p| p.eval(ctx, limits).is_some())
    }

    /// As `render_item`, always through liquid: what a plan must agree with.
    #[cfg(test)]
    pub(crate) fn render_item_with_liquid(
        &self,
        ctx: &CtxObject,
        limits: &RenderLimits,
    ) -> Result<Render, RenderError> {
        self.render_item_through(None, ctx, limits)
    }

    /// Whether the template may read the variable `name`: it appears as a name in its Liquid (or the template
    /// includes partials, which may read anything). Lets a source skip building variables nobody reads.
    pub fn reads(&self, name: &str) -> bool {
        self.doc.reads(name)
    }

    /// As `render_item`, with an abort reported as no calls.
    pub fn render(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Vec<Draft>, RenderError> {
        Ok(match self.render_item(ctx, limits)? {
            Render::Calls(d) => d,
            Render::Aborted => Vec::new(),
        })
    }
}

/// The load-time checks a JSON template's shape gets (a text template's shape is known only once rendered).
fn check_json_shape(root: &Value) -> Result<(), String> {
    let Value::Object(root) = root else {
        return Err("a template must be a JSON object".into());
    };
    let sectioned = root.keys().any(|k| k == "track" || k == "add_user_properties");
    if sectioned {
        for (key, value) in root.iter().filter(|(k, _)| !k.starts_with('_')) {
            if key != "track" && key != "add_user_properties" {
                return Err(format!(
                    "unknown section {key:?}: a template's sections are `track` and `add_user_properties`"
                ));
            }
            let Value::Object(obj) = value else {
                return Err(format!("section {key:?} must be an object"));
            };
            if obj.get("when").is_some_and(|w| !w.is_string()) {
                return Err(format!("{key}.when must be a string"));
            }
        }
    } else if !root.contains_key("event") {
        return Err(
            "a template is a Heap track body (with `event`) or has `track` / `add_user_properties` sections".into()
        );
    }
    Ok(())
}

/// A JSON template whose document does not parse: find the leaf that fails on its own, for its path and line.
fn json_leaf_error(parser: &liquid::Parser, file: &str, text: &str, whole: document::DocError) -> LoadError {
    fn leaves<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
        match v {
            Value::String(s) => out.push((path, s)),
            Value::Object(m) => {
                for (k, v) in m {
                    if path.is_empty() && k.starts_with('_') {
                        continue;
                    }
                    leaves(v, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    leaves(v, format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let root: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let mut all = Vec::new();
    leaves(&root, String::new(), &mut all);
    for (path, leaf) in all {
        let Ok(source) = rewrite::rewrite(leaf, false) else { continue };
        let failed = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse(&source))) {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => parser.parse(leaf).err().map_or_else(|| whole.message.clone(), |e| e.to_string()),
            Err(_) => "the Liquid parser failed on this leaf (a liquid-core panic)".into(),
        };
        let pos = find_leaf(text, leaf);
        return LoadError {
            file: file.to_owned(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message: format!("leaf {path}: {}", document::one_line(&failed)),
        };
    }
    LoadError { file: file.to_owned(), line: whole.line, column: whole.column, message: whole.message }
}

/// Line and column (1-based) where the JSON string `leaf` appears in the file.
fn find_leaf(file_text: &str, leaf: &str) -> Option<(usize, usize)> {
    let needle = serde_json::to_string(leaf).ok()?;
    let at = file_text.find(&needle)?;
    Some(document::line_col(file_text, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Template, LoadError> {
        Template::compile(&render::parser().unwrap(), "s", "t", "templates/s/t.json", text)
    }

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        for bad in ["", "..", "../x", "a/b", "a.b", "a%2F", "x y", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("with_user-props2"));
    }

    #[test]
    fn a_liquid_syntax_error_names_file_line_and_leaf() {
        let text = "{\n  \"event\": \"x\",\n  \"identity\": \"{{ Profile.Email | nosuchfilter }}\"\n}";
        let err = compile(text).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.to_string().starts_with("templates/s/t.json:3:15: leaf identity:"), "{err}");
    }

    #[test]
    fn a_template_with_an_unbounded_range_loop_fails_to_load_naming_the_leaf() {
        let text = "{\n  \"event\": \"x\",\n  \"identity\": \"{% for i in (1..100000000) %}a{% endfor %}\"\n}";
        let err = compile(text).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("leaf identity") && err.message.contains("max_loop_iterations"), "{err}");
        let text = r#"{"track": {"when": "{% for i in (1..n) %}y{% endfor %}", "event": "E"}}"#;
        assert!(compile(text).unwrap_err().message.contains("integer literals"));
    }

    #[test]
    fn an_item_rendering_past_the_event_budget_is_a_render_too_large_error() {
        let t = compile(r#"{"event": "E", "identity": "{{ big }}", "properties": {"a": "{{ big }}"}}"#).unwrap();
        let mut ctx = CtxObject::new();
        ctx.insert("big", context::Ctx::str("x".repeat(600)));
        let limits = RenderLimits { max_event_bytes: 1000, ..RenderLimits::default() };
        let err = t.render(&ctx, &limits).unwrap_err();
        assert_eq!(err.code(), "render_too_large", "{err}");
        assert!(t.render(&ctx, &RenderLimits::default()).is_ok());
    }

    #[test]
    fn an_item_rendering_past_its_deadline_is_a_render_timeout_error() {
        let text = r#"{"event": "E", "identity": "{% for i in (1..300000) %}{{ i }}{% endfor %}"}"#;
        let loose = LoadLimits { max_loop_iterations: u64::MAX, ..LoadLimits::default() };
        let t = Template::compile_with(&render::parser().unwrap(), "s", "t", "t.json", text, &loose).unwrap();
        let limits = RenderLimits {
            max_leaf_bytes: usize::MAX,
            timeout: std::time::Duration::from_millis(1),
            ..RenderLimits::default()
        };
        let started = std::time::Instant::now();
        let err = t.render(&CtxObject::new(), &limits).unwrap_err();
        assert_eq!(err.code(), "render_timeout", "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn an_integer_literal_beyond_i64_is_a_load_error_not_a_panic() {
        // Found by the `render` fuzz target: liquid-core's parser panics on such literals.
        let err =
            compile(r#"{"event": "E", "identity": "{% for x in 44444444444444444444444 %}{% endfor %}"}"#).unwrap_err();
        assert!(err.message.contains("leaf identity") && err.message.contains("64-bit"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_json_is_a_text_template_and_its_bad_output_names_line_and_column() {
        let t = compile("{\n \"event\": \"x\",,\n}").unwrap();
        assert_eq!(t.kind, TemplateKind::Text);
        let err = t.render(&CtxObject::new(), &RenderLimits::default()).unwrap_err();
        assert!(err.source.message.contains("not valid JSON") && err.source.message.contains("line 2"), "{err}");
    }

    #[test]
    fn a_constant_default_identity_is_found_in_a_section_an_empty_body_turns_off() {
        for text in [
            // A plan renders it.
            r#"{"track": {"when": "{% if type == 'track' %}yes{% endif %}", "event": "E",
                          "identity": "{{ userId | default: 'anon@example.com' }}"},
                "add_user_properties": {"identity": "{{ userId }}"}}"#,
            // Liquid renders it.
            r#"{"track": {"when": "{% if type == 'track' %}yes{% endif %}", "event": "E",
                          "identity": "{{ userId | default: 'ANON@example.com' | downcase }}"}}"#,
        ] {
            let t = compile(text).unwrap();
            assert_eq!(t.constant_identities(&RenderLimits::default()), ["anon@example.com"], "{text}");
        }
        let t = compile(r#"{"event": "E", "identity": "{{ userId }}"}"#).unwrap();
        assert!(t.constant_identities(&RenderLimits::default()).is_empty());
    }

    #[test]
    fn sections_render_only_when_their_condition_holds() {
        let t = compile(
            r#"{"track": {"when": "{% if type == 'track' %}yes{% endif %}", "event": "E"},
                           "add_user_properties": {"when": "{% if type == 'identify' %}yes{% endif %}", "identity": "u"}}"#,
        );
        let t = t.unwrap();
        let mut ctx = CtxObject::new();
        ctx.insert("type", context::Ctx::str("track"));
        let drafts = t.render(&ctx, &RenderLimits::default()).unwrap();
        assert_eq!(drafts.len(), 1);
        assert_eq!(drafts[0].kind, CallKind::Track);
    }

    #[test]
    fn a_reload_replaces_templates_one_by_one_and_a_broken_edit_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("segment");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.json"), r#"{"event": "A1", "identity": "u"}"#).unwrap();
        std::fs::write(src.join("b.json"), r#"{"event": "{{ broken", "identity": "u"}"#).unwrap();
        let (store, errors) = TemplateStore::open_with(dir.path(), LoadLimits::default());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(store.get("segment", "b").is_none() && store.broken("segment", "b").is_some());
        let v1 = store.get("segment", "a").unwrap().version.clone();

        std::fs::write(src.join("a.json"), r#"{"event": "{% if %}", "identity": "u"}"#).unwrap();
        std::fs::write(src.join("b.json"), r#"{"event": "B2", "identity": "u"}"#).unwrap();
        std::fs::write(src.join("c.liquid"), r#"{"event": "C{{ n }}", "identity": "u"}"#).unwrap();
        let errors = store.reload_if_changed().unwrap_err();
        assert!(errors[0].to_string().contains("a.json"), "{errors:?}");
        assert_eq!(store.get("segment", "a").unwrap().version, v1, "the last good version of a stays in use");
        assert!(store.broken("segment", "a").is_some(), "and its edit is reported");
        assert!(store.broken("segment", "b").is_none(), "the fixed template is no longer broken");
        assert_eq!(store.get("segment", "b").unwrap().kind, TemplateKind::Json);
        assert_eq!(store.get("segment", "c").unwrap().kind, TemplateKind::Json, "valid JSON is a JSON template");
        assert_ne!(store.get("segment", "b").unwrap().version, v1);
        assert_eq!(store.get("segment", "a").unwrap().version.len(), 16);
    }
}
