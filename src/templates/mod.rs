//! User-editable templates: `templates/<source>/<name>.json`, JSON documents whose string leaves may hold Liquid.
//!
//! A template is either a Heap track body (the form CleverTap's Heap guide uses: `app_id`, `identity`, `event`,
//! `properties`), or an object with a `track` and/or an `add_user_properties` section, each an object in Heap's
//! shape with an optional `when` leaf: the section is emitted only when `when` renders to something other than
//! nothing or `false`. Root keys starting with `_` are comments. The set is parsed once at load and reloaded when a
//! file changes; a reload that fails keeps the last good set and logs why.

pub mod bounds;
pub mod context;
pub mod render;

use crate::domain::CallKind;
use bounds::LoadLimits;
use context::CtxObject;
use render::{Leaf, LeafError, Node, RenderLimits, compile_leaf, json_len};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// Largest template file accepted by default, in bytes (`templates.max_template_bytes`).
pub const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

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

#[derive(Debug)]
struct Section {
    kind: CallKind,
    when: Option<Leaf>,
    body: Node,
}

#[derive(Debug)]
pub struct Template {
    pub source: String,
    pub name: String,
    /// Path as shown in messages, e.g. `templates/clevertap/default.json`.
    pub file: String,
    sections: Vec<Section>,
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

    /// Parses template `text`, refusing range loops past `limits` (see `bounds`).
    pub fn compile_with(
        parser: &liquid::Parser,
        source: &str,
        name: &str,
        file: &str,
        text: &str,
        limits: &LoadLimits,
    ) -> Result<Self, LoadError> {
        let err = |line, column, message: String| LoadError { file: file.to_owned(), line, column, message };
        let root: Value = serde_json::from_str(text)
            .map_err(|e| err(Some(e.line()), Some(e.column()), format!("not valid JSON: {e}")))?;
        let Value::Object(root) = root else {
            return Err(err(Some(1), None, "a template must be a JSON object".into()));
        };
        let compile_node = |v: &Value, path: &str| {
            compile_node(parser, v, path, text, limits).map_err(|(pos, m)| {
                let (line, column) = pos.map_or((None, None), |(l, c)| (Some(l), Some(c)));
                err(line, column, m)
            })
        };
        let sectioned = root.keys().any(|k| k == "track" || k == "add_user_properties");
        let mut sections = Vec::new();
        if sectioned {
            for (key, value) in root.iter().filter(|(k, _)| !k.starts_with('_')) {
                let kind = match key.as_str() {
                    "track" => CallKind::Track,
                    "add_user_properties" => CallKind::UserProperties,
                    other => {
                        return Err(err(
                            None,
                            None,
                            format!(
                                "unknown section {other:?}: a template's sections are `track` and `add_user_properties`"
                            ),
                        ));
                    }
                };
                let Value::Object(obj) = value else {
                    return Err(err(None, None, format!("section {key:?} must be an object")));
                };
                let when = match obj.get("when") {
                    None => None,
                    Some(Value::String(s)) => {
                        bounds::check_loops(s, limits).map_err(|m| {
                            let pos = find_leaf(text, s);
                            err(pos.map(|p| p.0), pos.map(|p| p.1), format!("leaf {key}.when: {m}"))
                        })?;
                        compile_leaf_guarded(parser, s, &format!("{key}.when"))
                            .map_err(|e| liquid_error(file, text, s, &format!("{key}.when"), &e))?
                    }
                    Some(_) => return Err(err(None, None, format!("{key}.when must be a string"))),
                };
                let body: Map<String, Value> =
                    obj.iter().filter(|(k, _)| *k != "when").map(|(k, v)| (k.clone(), v.clone())).collect();
                sections.push(Section { kind, when, body: compile_node(&Value::Object(body), key)? });
            }
        } else {
            let body: Map<String, Value> = root.into_iter().filter(|(k, _)| !k.starts_with('_')).collect();
            if !body.contains_key("event") {
                return Err(err(
                    None,
                    None,
                    "a template is a Heap track body (with `event`) or has `track` / `add_user_properties` sections"
                        .into(),
                ));
            }
            sections.push(Section { kind: CallKind::Track, when: None, body: compile_node(&Value::Object(body), "")? });
        }
        Ok(Self { source: source.to_owned(), name: name.to_owned(), file: file.to_owned(), sections })
    }

    /// Renders every section whose `when` holds. An empty result means the template chose to send nothing.
    /// The whole item shares one deadline (`limits.timeout`) and one output budget (`limits.max_event_bytes`).
    pub fn render(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Vec<Draft>, RenderError> {
        let wrap = |source| RenderError { file: self.file.clone(), source };
        let limits = &limits.started(std::time::Instant::now());
        let mut event_bytes = 0usize;
        let mut out = Vec::with_capacity(self.sections.len());
        for section in &self.sections {
            if let Some(when) = &section.when {
                let on = match when.render_value(ctx, limits).map_err(wrap)? {
                    None | Some(Value::Bool(false)) => false,
                    Some(Value::String(s)) => !s.trim().eq_ignore_ascii_case("false"),
                    Some(_) => true,
                };
                if !on {
                    continue;
                }
            }
            if let Some(Value::Object(body)) = section.body.render(ctx, limits).map_err(wrap)? {
                event_bytes += json_len(&body);
                if event_bytes > limits.max_event_bytes {
                    return Err(wrap(LeafError {
                        path: section.kind.as_str().to_owned(),
                        message: format!(
                            "the item renders to more than {} bytes (templates.max_event_bytes)",
                            limits.max_event_bytes
                        ),
                    }));
                }
                out.push(Draft { kind: section.kind, body });
            }
        }
        Ok(out)
    }
}

type CompileError = (Option<(usize, usize)>, String);

fn compile_node(
    parser: &liquid::Parser,
    v: &Value,
    path: &str,
    file_text: &str,
    limits: &LoadLimits,
) -> Result<Node, CompileError> {
    let join = |k: &str| {
        if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") }
    };
    Ok(match v {
        Value::String(s) => {
            if let Err(message) = bounds::check_loops(s, limits) {
                return Err((find_leaf(file_text, s), format!("leaf {path}: {message}")));
            }
            match compile_leaf_guarded(parser, s, path) {
                Ok(None) => Node::Literal(v.clone()),
                Ok(Some(leaf)) => Node::Liquid(leaf),
                Err(e) => {
                    let pos = find_leaf(file_text, s);
                    return Err((pos, format!("leaf {path}: {e}")));
                }
            }
        }
        Value::Object(m) => Node::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), compile_node(parser, v, &join(k), file_text, limits)?)))
                .collect::<Result<_, _>>()?,
        ),
        Value::Array(a) => Node::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| compile_node(parser, v, &format!("{path}[{i}]"), file_text, limits))
                .collect::<Result<_, _>>()?,
        ),
        other => Node::Literal(other.clone()),
    })
}

/// `compile_leaf`, with a panic inside liquid's parser turned into an error: liquid-core panics on some inputs
/// (integer literals beyond i64, which `bounds` refuses first), and a template must never take the relay down.
fn compile_leaf_guarded(parser: &liquid::Parser, text: &str, path: &str) -> Result<Option<Leaf>, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compile_leaf(parser, text, path))) {
        Ok(Ok(leaf)) => Ok(leaf),
        Ok(Err(e)) => Err(one_line(&e.to_string())),
        Err(_) => Err("the Liquid parser failed on this leaf (a liquid-core panic)".into()),
    }
}

fn liquid_error(file: &str, file_text: &str, leaf: &str, path: &str, e: &str) -> LoadError {
    let pos = find_leaf(file_text, leaf);
    LoadError {
        file: file.to_owned(),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
        message: format!("leaf {path}: {e}"),
    }
}

/// Line and column (1-based) where the JSON string `leaf` appears in the file.
fn find_leaf(file_text: &str, leaf: &str) -> Option<(usize, usize)> {
    let needle = serde_json::to_string(leaf).ok()?;
    let at = file_text.find(&needle)?;
    let before = &file_text[..at];
    let line = before.matches('\n').count() + 1;
    let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Some((line, column))
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

/// Every template under a directory, by (source, name).
#[derive(Debug, Default)]
pub struct TemplateSet {
    by_name: HashMap<(String, String), Arc<Template>>,
}

impl TemplateSet {
    /// Loads `dir/<source>/<name>.json` for every source directory under the default load limits.
    pub fn load_dir(dir: &Path) -> (Self, Vec<LoadError>) {
        Self::load_dir_with(dir, &LoadLimits::default())
    }

    /// Loads `dir/<source>/<name>.json` for every source directory. Returns what loaded and every problem found.
    pub fn load_dir_with(dir: &Path, limits: &LoadLimits) -> (Self, Vec<LoadError>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        let parser = match render::parser() {
            Ok(p) => p,
            Err(e) => {
                errors.push(LoadError {
                    file: dir.display().to_string(),
                    line: None,
                    column: None,
                    message: e.to_string(),
                });
                return (set, errors);
            }
        };
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
        let mut files: Vec<(String, String, PathBuf)> = Vec::new();
        for entry in sources.flatten() {
            let source = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || source.starts_with('.') {
                continue;
            }
            for f in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                files.push((source.clone(), name, path));
            }
        }
        files.sort();
        for (source, name, path) in files {
            let shown = path.display().to_string();
            let fail = |message: String| LoadError { file: shown.clone(), line: None, column: None, message };
            if !valid_name(&name) {
                errors.push(fail(format!("template names may hold only letters, digits, `_` and `-`: {name:?}")));
                continue;
            }
            let text = match std::fs::metadata(&path) {
                Ok(m) if m.len() > limits.max_template_bytes => {
                    errors.push(fail(format!(
                        "template is {} bytes; the limit is {} (templates.max_template_bytes)",
                        m.len(),
                        limits.max_template_bytes
                    )));
                    continue;
                }
                _ => match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(fail(format!("cannot read: {e}")));
                        continue;
                    }
                },
            };
            match Template::compile_with(&parser, &source, &name, &shown, &text, limits) {
                Ok(t) => {
                    set.by_name.insert((source, name), Arc::new(t));
                }
                Err(e) => errors.push(e),
            }
        }
        (set, errors)
    }

    pub fn insert(&mut self, template: Template) {
        self.by_name.insert((template.source.clone(), template.name.clone()), Arc::new(template));
    }

    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.by_name.get(&(source.to_owned(), name.to_owned())).cloned()
    }

    pub fn names(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.by_name.keys().cloned().collect();
        v.sort();
        v
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
    /// Loads `dir`; fails with every problem when any template is broken, so a bad deploy is caught at start.
    pub fn load(dir: &Path) -> Result<Self, Vec<LoadError>> {
        Self::load_with(dir, LoadLimits::default())
    }

    /// As `load`, under `limits`; reloads use the same limits.
    pub fn load_with(dir: &Path, limits: LoadLimits) -> Result<Self, Vec<LoadError>> {
        let (set, errors) = TemplateSet::load_dir_with(dir, &limits);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            dir: dir.to_owned(),
            limits,
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        })
    }

    pub fn from_set(dir: &Path, set: TemplateSet) -> Self {
        Self {
            dir: dir.to_owned(),
            limits: LoadLimits::default(),
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        }
    }

    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).get(source, name)
    }

    pub fn snapshot(&self) -> Arc<TemplateSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads when any file under the directory changed. Returns the problems of a failed reload (the previous
    /// set stays in use), or `Ok(true)` when a new set was installed.
    pub fn reload_if_changed(&self) -> Result<bool, Vec<LoadError>> {
        let now = fingerprint(&self.dir);
        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        *seen = now;
        let (set, errors) = TemplateSet::load_dir_with(&self.dir, &self.limits);
        if !errors.is_empty() {
            return Err(errors);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(true)
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            if let Ok(m) = f.metadata() {
                out.push((f.path(), m.modified().ok(), m.len()));
            }
        }
    }
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
    fn invalid_json_names_line_and_column() {
        let err = compile("{\n \"event\": \"x\",,\n}").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("not valid JSON"));
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
}
