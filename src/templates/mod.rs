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
pub mod output;
pub mod render;
#[cfg(test)]
mod specs;

use crate::domain::CallKind;
use bounds::LoadLimits;
use context::CtxObject;
use document::{Document, Rendered};
use render::{LeafError, RenderLimits};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

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
    doc: Document,
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
        let (kind, doc_text, leaves) = match serde_json::from_str::<Value>(text) {
            Ok(root) => {
                check_json_shape(&root).map_err(|m| err(None, None, m))?;
                let (doc, leaves) = document::json_to_document(text, limits).map_err(|(o, m)| at(o, m))?;
                (TemplateKind::Json, doc, leaves)
            }
            Err(_) => {
                bounds::check_loops(text, limits).map_err(|m| err(None, None, m))?;
                (TemplateKind::Text, text.to_owned(), Vec::new())
            }
        };
        let doc = match Document::parse(parser, doc_text, leaves) {
            Ok(d) => d,
            Err(e) if kind == TemplateKind::Json => return Err(json_leaf_error(parser, file, text, e)),
            Err(e) => return Err(err(e.line, e.column, e.message)),
        };
        Ok(Self { source: source.to_owned(), name: name.to_owned(), file: file.to_owned(), kind, version, doc })
    }

    /// Renders one item: the calls whose sections hold, or `Aborted`. The item shares one deadline
    /// (`limits.timeout`) and one output budget (`limits.max_event_bytes`).
    pub fn render_item(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Render, RenderError> {
        let wrap = |source| RenderError { file: self.file.clone(), source };
        let limits = &limits.started(std::time::Instant::now());
        let value = match self.doc.render(ctx, limits).map_err(wrap)? {
            Rendered::Aborted => return Ok(Render::Aborted),
            Rendered::Json(v) => v,
        };
        // The rendered text stayed within `limits.max_event_bytes` (the output sink stops it past that), and the
        // calls made from it are no longer than that text: no second count is needed.
        let drafts = shape(value).map_err(|message| wrap(LeafError { path: "template".into(), message }))?;
        Ok(Render::Calls(drafts))
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
        let Ok(source) = document::rewrite(leaf, false) else { continue };
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

/// From a rendered document to Heap calls: comments out, empty values out, `...` keys merged, sections chosen.
fn shape(value: Value) -> Result<Vec<Draft>, String> {
    let Value::Object(mut root) = value else {
        return Err(format!("the template must render to a JSON object, not {}", type_name(&value)));
    };
    root.retain(|k, _| !k.starts_with('_'));
    let sectioned = root.keys().any(|k| k == "track" || k == "add_user_properties");
    if !sectioned {
        return Ok(vec![Draft { kind: CallKind::Track, body: clean_object(root)? }]);
    }
    let mut out = Vec::new();
    for (key, section) in root {
        let kind = match key.as_str() {
            "track" => CallKind::Track,
            "add_user_properties" => CallKind::UserProperties,
            other => {
                return Err(format!(
                    "unknown section {other:?}: a template's sections are `track` and `add_user_properties`"
                ));
            }
        };
        let mut body = match section {
            Value::Object(m) => m,
            Value::Null => continue,
            other => return Err(format!("section {key:?} must be an object, not {}", type_name(&other))),
        };
        let on = match body.remove("when") {
            None => true,
            Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::String(s)) => !(s.trim().is_empty() || s.trim().eq_ignore_ascii_case("false")),
            Some(_) => true,
        };
        if on {
            out.push(Draft { kind, body: clean_object(body)? });
        }
    }
    // Track before user properties, as the sections of a JSON template were always sent.
    out.sort_by_key(|d| d.kind != CallKind::Track);
    Ok(out)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_nothing(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

fn clean(v: Value) -> Result<Value, String> {
    Ok(match v {
        Value::Object(m) => Value::Object(clean_object(m)?),
        Value::Array(mut a) => {
            a.retain(|v| !is_nothing(v));
            for item in &mut a {
                *item = clean(std::mem::take(item))?;
            }
            Value::Array(a)
        }
        other => other,
    })
}

/// Drops empty values and merges `...` keys, in place when there is nothing to merge (the common case).
fn clean_object(mut m: Map<String, Value>) -> Result<Map<String, Value>, String> {
    m.retain(|_, v| !is_nothing(v));
    if !m.keys().any(|k| k.starts_with("...")) {
        for v in m.values_mut() {
            if matches!(v, Value::Object(_) | Value::Array(_)) {
                *v = clean(std::mem::take(v))?;
            }
        }
        return Ok(m);
    }
    let mut out = Map::new();
    for (k, v) in m {
        if k.starts_with("...") {
            match clean(v)? {
                Value::Object(inner) => out.extend(inner),
                other => return Err(format!("a `...` key must render to an object, got {other}")),
            }
        } else {
            out.insert(k, clean(v)?);
        }
    }
    Ok(out)
}

/// Every template under a directory, by (source, name), and the ones that did not load.
#[derive(Debug, Default)]
pub struct TemplateSet {
    by_name: HashMap<(String, String), Arc<Template>>,
    broken: HashMap<(String, String), LoadError>,
}

/// A source's partials: `(name, text)` for each `_partials/<name>.liquid`, registered as `name` and
/// `name.liquid`, sorted by name.
fn read_partials(dir: &Path, errors: &mut Vec<LoadError>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir.join(PARTIALS_DIR)).into_iter().flatten().flatten() {
        let path = f.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("liquid" | "json")) {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => match document::rewrite(&text, true) {
                Ok(rewritten) => {
                    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    out.push((stem.to_owned(), rewritten.clone()));
                    out.push((file, rewritten));
                }
                Err((at, m)) => {
                    let (l, c) = document::line_col(&text, at);
                    errors.push(LoadError {
                        file: path.display().to_string(),
                        line: Some(l),
                        column: Some(c),
                        message: m,
                    });
                }
            },
            Err(e) => errors.push(LoadError {
                file: path.display().to_string(),
                line: None,
                column: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    out.sort();
    out
}

impl TemplateSet {
    /// Loads every template under `dir` under the default load limits.
    pub fn load_dir(dir: &Path) -> (Self, Vec<LoadError>) {
        Self::load_dir_with(dir, &LoadLimits::default())
    }

    /// Loads `dir/<source>/<name>.json` and `.liquid` for every source directory. Returns what loaded and every
    /// problem found; a template that failed is also listed in `broken`.
    pub fn load_dir_with(dir: &Path, limits: &LoadLimits) -> (Self, Vec<LoadError>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        let sources = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(LoadError {
                    file: dir.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read the templates directory: {e}"),
                });
                return (set, errors);
            }
        };
        let mut source_dirs: Vec<(String, PathBuf)> = sources
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(s, _)| !s.starts_with('.'))
            .collect();
        source_dirs.sort();
        for (source, path) in source_dirs {
            set.load_source(&source, &path, limits, &mut errors);
        }
        (set, errors)
    }

    fn load_source(&mut self, source: &str, dir: &Path, limits: &LoadLimits, errors: &mut Vec<LoadError>) {
        let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = f.path();
            if path.is_dir() || !matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "liquid")) {
                continue;
            }
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            files.entry(name).or_default().push(path);
        }
        let mut partial_errors = Vec::new();
        let partials = read_partials(dir, &mut partial_errors);
        let parser = dialect::parser(&partials).map_err(|e| format!("the partials in {PARTIALS_DIR}/: {e}"));
        errors.extend(partial_errors.iter().cloned());
        for (name, mut paths) in files {
            paths.sort();
            let path = &paths[0];
            let shown = path.display().to_string();
            let key = (source.to_owned(), name.clone());
            let fail = |message: String| LoadError { file: shown.clone(), line: None, column: None, message };
            let result = if !valid_name(&name) {
                Err(fail(format!("template names may hold only letters, digits, `_` and `-`: {name:?}")))
            } else if paths.len() > 1 {
                Err(fail(format!("two templates are named {name:?} ({} files); keep one", paths.len())))
            } else if let Some(e) = partial_errors.first() {
                Err(fail(format!("a partial of this source does not load: {e}")))
            } else {
                match &parser {
                    Err(m) => Err(fail(document::one_line(m))),
                    Ok(parser) => read_template(path, limits).and_then(|text| {
                        let version = version_of(&text, &partials);
                        Template::compile_versioned(parser, source, &name, &shown, &text, limits, version)
                    }),
                }
            };
            match result {
                Ok(t) => {
                    self.by_name.insert(key, Arc::new(t));
                }
                Err(e) => {
                    errors.push(e.clone());
                    self.broken.insert(key, e);
                }
            }
        }
    }

    pub fn insert(&mut self, template: Template) {
        self.by_name.insert((template.source.clone(), template.name.clone()), Arc::new(template));
    }

    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.by_name.get(&(source.to_owned(), name.to_owned())).cloned()
    }

    /// The load error of a template whose file exists but does not load.
    pub fn broken(&self, source: &str, name: &str) -> Option<&LoadError> {
        self.broken.get(&(source.to_owned(), name.to_owned()))
    }

    /// The (source, name) of every template that loaded, sorted.
    pub fn names(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }
}

fn read_template(path: &Path, limits: &LoadLimits) -> Result<String, LoadError> {
    let fail = |message: String| LoadError { file: path.display().to_string(), line: None, column: None, message };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > limits.max_template_bytes => Err(fail(format!(
            "template is {} bytes; the limit is {} (templates.max_template_bytes)",
            m.len(),
            limits.max_template_bytes
        ))),
        _ => std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}"))),
    }
}

/// The live template set, reloaded from disk when a file changes.
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
    limits: LoadLimits,
    current: RwLock<Arc<TemplateSet>>,
    fingerprint: Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl TemplateStore {
    /// Loads `dir`, failing with every problem when any template does not load (for tools and tests that want
    /// all or nothing; `serve` uses `open_with`).
    pub fn load(dir: &Path) -> Result<Self, Vec<LoadError>> {
        Self::load_with(dir, LoadLimits::default())
    }

    /// As `load`, under `limits`; reloads use the same limits.
    pub fn load_with(dir: &Path, limits: LoadLimits) -> Result<Self, Vec<LoadError>> {
        match Self::open_with(dir, limits) {
            (store, errors) if errors.is_empty() => Ok(store),
            (_, errors) => Err(errors),
        }
    }

    /// Loads `dir` under `limits`. Templates that do not load are returned as problems and listed by `broken`;
    /// the others work. Reloads use the same limits.
    pub fn open_with(dir: &Path, limits: LoadLimits) -> (Self, Vec<LoadError>) {
        let (set, errors) = TemplateSet::load_dir_with(dir, &limits);
        let store = Self {
            dir: dir.to_owned(),
            limits,
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        };
        (store, errors)
    }

    pub fn from_set(dir: &Path, set: TemplateSet) -> Self {
        Self {
            dir: dir.to_owned(),
            limits: LoadLimits::default(),
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        }
    }

    /// The template to render with: the current file's, or the last good version of a file whose edit is broken.
    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).get(source, name)
    }

    /// The load error of a template whose file exists but does not load (whether or not an older version is
    /// still in use).
    pub fn broken(&self, source: &str, name: &str) -> Option<LoadError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).broken(source, name).cloned()
    }

    pub fn snapshot(&self) -> Arc<TemplateSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads when any file under the directory changed, template by template: a template whose new text does
    /// not load keeps its last good version. Returns `Ok(true)` when everything loaded, `Err(problems)` when some
    /// template did not (the rest of the new set is installed all the same), `Ok(false)` when nothing changed.
    pub fn reload_if_changed(&self) -> Result<bool, Vec<LoadError>> {
        let now = fingerprint(&self.dir);
        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        *seen = now;
        let (mut set, errors) = TemplateSet::load_dir_with(&self.dir, &self.limits);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        for key in set.broken.keys().cloned().collect::<Vec<_>>() {
            if let Some(good) = current.by_name.get(&key) {
                set.by_name.insert(key, good.clone());
            }
        }
        *current = Arc::new(set);
        if errors.is_empty() { Ok(true) } else { Err(errors) }
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Option<SystemTime>, u64)>) {
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = f.path();
            if let Ok(m) = f.metadata() {
                if m.is_dir() {
                    if depth < 2 {
                        walk(&path, depth + 1, out);
                    }
                } else {
                    out.push((path, m.modified().ok(), m.len()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out.sort();
    out
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
