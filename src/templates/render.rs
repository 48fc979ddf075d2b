//! Renders a template one JSON string leaf at a time and builds the output with serde_json, so no value can
//! break out of its leaf: a value holding `","app_id":"1` stays a string inside the field it was meant for.
//!
//! Leaf rules:
//! - a string with no `{{` or `{%` is copied as is;
//! - a leaf that is exactly one `{{ expression }}` keeps the JSON type of its value (number, bool, object, array);
//! - anything else renders to a string;
//! - a leaf that renders to nothing (nil, or an empty or blank string) is left out, with its key;
//! - a key starting with `...` merges the object its value renders to into the enclosing object.

use super::context::{Ctx, CtxObject, Globals};
use liquid_core::model::{ScalarCow, Value as LiquidValue};
use liquid_core::{Display_filter, Filter, FilterReflection, ParseFilter, Runtime, ValueView};
use serde_json::{Map, Value};
use std::io::Write;

/// A parsed template tree.
#[derive(Debug)]
pub enum Node {
    Literal(Value),
    Liquid(Leaf),
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
}

pub struct Leaf {
    /// Dotted path of the leaf inside the template (`track.properties.total`), for error messages.
    pub path: String,
    /// True when the leaf is one `{{ expression }}` whose JSON type is kept.
    pub typed: bool,
    pub template: liquid::Template,
    /// For a typed leaf that is a plain variable path (`{{ Profile.Email }}`, `{{ Event }}`): its segments, so the
    /// value is looked up directly instead of running liquid, the `json` filter and a JSON parse per event.
    pub plain_path: Option<Vec<String>>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf").field("path", &self.path).field("typed", &self.typed).finish_non_exhaustive()
    }
}

/// Bounds on one render, so that a template cannot take unbounded memory or time.
#[derive(Debug, Clone, Copy)]
pub struct RenderLimits {
    /// Most bytes one leaf may render to.
    pub max_leaf_bytes: usize,
    /// Most bytes one item's calls may hold as JSON (checked by `Template::render`).
    pub max_event_bytes: usize,
    /// Most time one item's render may take.
    pub timeout: std::time::Duration,
    /// Set by `started`: when the item's render must stop. Checked as leaves write output.
    pub deadline: Option<std::time::Instant>,
}

impl Default for RenderLimits {
    fn default() -> Self {
        Self {
            max_leaf_bytes: 256 * 1024,
            max_event_bytes: 1024 * 1024,
            timeout: std::time::Duration::from_secs(1),
            deadline: None,
        }
    }
}

impl RenderLimits {
    /// These limits with the deadline of a render starting `now`.
    pub fn started(&self, now: std::time::Instant) -> Self {
        Self { deadline: Some(now + self.timeout), ..*self }
    }
}

/// A leaf failed to render for a reason other than a missing variable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("leaf {path}: {message}")]
pub struct LeafError {
    pub path: String,
    pub message: String,
}

/// Builds the parser every template uses: liquid's standard library plus the relay's `json` filter.
pub fn parser() -> Result<liquid::Parser, liquid::Error> {
    liquid::ParserBuilder::with_stdlib().filter(JsonFilterParser).build()
}

/// Parses one string leaf. Returns `Ok(None)` for a plain string with no Liquid in it.
pub fn compile_leaf(parser: &liquid::Parser, text: &str, path: &str) -> Result<Option<Leaf>, liquid::Error> {
    if !text.contains("{{") && !text.contains("{%") {
        return Ok(None);
    }
    let (source, typed, plain) = match single_expression(text) {
        Some(expr) => (format!("{{{{ {expr} | json }}}}"), true, plain_path(expr)),
        None => (text.to_owned(), false, None),
    };
    let template = match parser.parse(&source) {
        Ok(t) => t,
        // Report the user's own text, not our rewrite of it.
        Err(_) if typed => parser.parse(text)?,
        Err(e) => return Err(e),
    };
    Ok(Some(Leaf { path: path.to_owned(), typed, template, plain_path: plain }))
}

/// `Profile.Email` → `["Profile", "Email"]`: dotted identifiers only, and not a liquid literal (`nil`, `true`,
/// `empty`, ...). Anything else (filters, brackets, ranges) goes through liquid.
fn plain_path(expr: &str) -> Option<Vec<String>> {
    let ident = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let segments: Vec<&str> = expr.split('.').collect();
    if !segments.iter().all(|s| ident(s))
        || matches!(segments[0], "nil" | "null" | "true" | "false" | "empty" | "blank")
    {
        return None;
    }
    Some(segments.into_iter().map(str::to_owned).collect())
}

/// Follows a plain path the way a lenient liquid lookup does: a missing key, or any key below nil, is nil.
/// `None` when the path crosses a scalar or an array, where liquid has rules of its own (`size`, `first`): the
/// caller then renders through liquid.
fn resolve<'a>(ctx: &'a CtxObject, path: &[String]) -> Option<Option<&'a Ctx>> {
    let (first, rest) = path.split_first()?;
    let mut cur = ctx.lookup(first);
    for key in rest {
        cur = match cur {
            None | Some(Ctx::Nil) => None,
            // `.size` of an object without such a key is liquid's to answer (the key count).
            Some(Ctx::Object(o)) if key == "size" && o.lookup(key).is_none() => return None,
            Some(Ctx::Object(o)) => o.lookup(key),
            Some(Ctx::Scalar(_) | Ctx::Array(_)) => return None,
        };
    }
    Some(cur)
}

/// What `{{ value | json }}` parsed back gives, without the round trip through liquid values and JSON text.
fn ctx_to_json(v: &Ctx) -> Value {
    match v {
        Ctx::Nil => Value::Null,
        Ctx::Scalar(s) => scalar_to_json(s.as_ref()),
        Ctx::Array(a) => Value::Array(a.iter().map(ctx_to_json).collect()),
        Ctx::Object(o) => Value::Object(o.entries().map(|(k, v)| (k.clone(), ctx_to_json(v))).collect()),
    }
}

/// Bytes `v` takes as JSON text, counted without building the text (leaf and event size limits).
pub(crate) fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0 += data.len();
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// `{{ expr }}` (with optional `-` trim markers) and nothing else → `expr`.
fn single_expression(text: &str) -> Option<&str> {
    let t = text.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.trim().is_empty() {
        return None;
    }
    Some(inner.trim())
}

impl Node {
    /// Renders the tree against `ctx`. `None` means the node rendered to nothing and should be left out.
    pub fn render(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Option<Value>, LeafError> {
        match self {
            Node::Literal(v) => Ok(Some(v.clone())),
            Node::Liquid(leaf) => leaf.render_value(ctx, limits),
            Node::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(v) = item.render(ctx, limits)? {
                        out.push(v);
                    }
                }
                Ok(Some(Value::Array(out)))
            }
            Node::Object(entries) => {
                let mut out = Map::new();
                for (key, node) in entries {
                    let Some(v) = node.render(ctx, limits)? else {
                        continue;
                    };
                    if key.starts_with("...") {
                        match v {
                            Value::Object(m) => out.extend(m),
                            other => {
                                return Err(LeafError {
                                    path: key.clone(),
                                    message: format!("a `...` key must render to an object, got {other}"),
                                });
                            }
                        }
                    } else {
                        out.insert(key.clone(), v);
                    }
                }
                Ok(Some(Value::Object(out)))
            }
        }
    }
}

impl Leaf {
    /// Renders the leaf; `None` when it renders to nothing.
    pub fn render_value(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Option<Value>, LeafError> {
        if let Some(found) = self.plain_path.as_deref().and_then(|p| resolve(ctx, p)) {
            let v = found.map_or(Value::Null, ctx_to_json);
            let small = match &v {
                Value::Object(_) | Value::Array(_) => json_len(&v) <= limits.max_leaf_bytes,
                Value::String(s) => s.len() * 6 + 2 <= limits.max_leaf_bytes || json_len(&v) <= limits.max_leaf_bytes,
                _ => true,
            };
            if small {
                return Ok(match v {
                    Value::Null => None,
                    Value::String(s) if s.trim().is_empty() => None,
                    other => Some(other),
                });
            }
            // Over the limit: liquid renders it and reports the error exactly as it always has.
        }
        let mut buf =
            LimitedWriter { buf: Vec::new(), max: limits.max_leaf_bytes, deadline: limits.deadline, writes: 0 };
        let mut patched: Option<CtxObject> = None;
        let mut tries = 0;
        while let Err(e) = self.template.render_to(&mut buf, &Globals(patched.as_ref().unwrap_or(ctx))) {
            let message = e.to_string();
            // A strict copy (loop variable, `assign`) missed a key: render again with that key present as nil,
            // which is what a lenient lookup gives. Bounded, and only paid on this path.
            if let Some(key) = requested_index(&message).filter(|_| tries < MAX_FILL_RETRIES) {
                tries += 1;
                patched.get_or_insert_with(|| ctx.clone()).fill_missing_key(key);
                buf.buf.clear();
                continue;
            }
            // A missing variable renders as nothing; never lose an event over it.
            if message.contains("Unknown variable") || message.contains("Unknown index") {
                return Ok(None);
            }
            let message = if buf.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                format!("rendering took longer than {} ms (templates.render_timeout_ms)", limits.timeout.as_millis())
            } else if buf.buf.len() >= buf.max {
                format!("renders to more than {} bytes (templates.max_leaf_bytes)", buf.max)
            } else {
                message.trim().replace('\n', " ")
            };
            return Err(LeafError { path: self.path.clone(), message });
        }
        let text = String::from_utf8_lossy(&buf.buf);
        if self.typed {
            let v: Value = serde_json::from_str(&text).map_err(|e| LeafError {
                path: self.path.clone(),
                message: format!("internal: json filter output: {e}"),
            })?;
            return Ok(match v {
                Value::Null => None,
                Value::String(s) if s.trim().is_empty() => None,
                other => Some(other),
            });
        }
        if text.trim().is_empty() { Ok(None) } else { Ok(Some(Value::String(text.into_owned()))) }
    }
}

const MAX_FILL_RETRIES: usize = 8;

/// The key named by liquid's "Unknown index" error (`requested index=name`).
fn requested_index(message: &str) -> Option<&str> {
    if !message.contains("Unknown index") {
        return None;
    }
    let rest = &message[message.find("requested index=")? + "requested index=".len()..];
    let key = rest.lines().next()?.trim();
    (!key.is_empty()).then_some(key)
}

struct LimitedWriter {
    buf: Vec<u8>,
    max: usize,
    deadline: Option<std::time::Instant>,
    writes: u32,
}

impl Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // The clock is read every 64 writes: cheap, and a loop that writes cannot outlive its deadline by much.
        self.writes = self.writes.wrapping_add(1);
        if self.writes.is_multiple_of(64) && self.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err(std::io::Error::other("render deadline reached"));
        }
        if self.buf.len() + data.len() > self.max {
            self.buf.resize(self.max, 0);
            return Err(std::io::Error::other("render output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `{{ value | json }}`: the value as JSON text. Used by typed leaves and available to template authors.
#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(name = "json", description = "Writes the value as JSON.", parsed(JsonFilter))]
pub struct JsonFilterParser;

#[derive(Debug, Default, Display_filter)]
#[name = "json"]
struct JsonFilter;

impl Filter for JsonFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        let text = serde_json::to_string(&to_json(&input.to_value()))
            .map_err(|e| liquid_core::Error::with_msg(format!("json: {e}")))?;
        Ok(LiquidValue::scalar(text))
    }
}

fn to_json(v: &LiquidValue) -> Value {
    match v {
        LiquidValue::Nil | LiquidValue::State(_) => Value::Null,
        LiquidValue::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        LiquidValue::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect()),
        LiquidValue::Scalar(s) => scalar_to_json(s.as_ref()),
    }
}

fn scalar_to_json(s: ScalarCow<'_>) -> Value {
    match s.type_name() {
        "boolean" => s.to_bool().map_or(Value::Null, Value::Bool),
        "whole number" => s.to_integer().map_or(Value::Null, Value::from),
        "fractional number" => s.to_float().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number),
        _ => Value::String(s.to_kstr().as_str().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::context::{Ctx, CtxObject};
    use serde_json::json;

    fn render(text: &str, ctx: Value) -> Option<Value> {
        let p = parser().unwrap();
        let ctx = CtxObject::from_json(ctx.as_object().unwrap());
        match compile_leaf(&p, text, "leaf").unwrap() {
            None => Some(Value::String(text.to_owned())),
            Some(leaf) => leaf.render_value(&ctx, &RenderLimits::default()).unwrap(),
        }
    }

    #[test]
    fn default_works_on_missing_keys_at_any_depth() {
        let ctx = json!({"Profile": {"Name": "Jane"}});
        assert_eq!(
            render("{{ Profile.Email | default: 'user@example.com' }}", ctx.clone()),
            Some(json!("user@example.com"))
        );
        assert_eq!(render("{{ Profile.address.city | default: 'x' }}", ctx.clone()), Some(json!("x")));
        assert_eq!(render("{{ Nope.deep.er | default: 'y' }}", ctx.clone()), Some(json!("y")));
        assert_eq!(render("{{ Profile.Email }}", ctx.clone()), None, "missing without default renders as nothing");
        assert_eq!(render("{% if Profile.Email %}has{% else %}none{% endif %}", ctx), Some(json!("none")));
    }

    #[test]
    fn single_expressions_keep_json_types_and_mixed_text_is_a_string() {
        let ctx = json!({"n": 42, "f": 1.5, "b": true, "o": {"a": [1, "x"]}, "s": "42"});
        assert_eq!(render("{{ n }}", ctx.clone()), Some(json!(42)));
        assert_eq!(render("{{ f }}", ctx.clone()), Some(json!(1.5)));
        assert_eq!(render("{{ b }}", ctx.clone()), Some(json!(true)));
        assert_eq!(render("{{ o }}", ctx.clone()), Some(json!({"a": [1, "x"]})));
        assert_eq!(
            render("{{ s }}", ctx.clone()),
            Some(json!("42")),
            "a string that looks like a number stays a string"
        );
        assert_eq!(render("n={{ n }}", ctx), Some(json!("n=42")));
    }

    #[test]
    fn size_counts_keys_unless_the_object_has_a_size_key() {
        assert_eq!(render("{{ o.size }}", json!({"o": {"a": 1, "b": 2}})), Some(json!(2)));
        assert_eq!(render("{{ o.size }}", json!({"o": {"size": "XL"}})), Some(json!("XL")));
        assert_eq!(render("{% if missing.size > 0 %}y{% else %}n{% endif %}", json!({})), Some(json!("n")));
    }

    #[test]
    fn keys_are_case_insensitive_when_no_exact_match() {
        assert_eq!(render("{{ Profile.Email }}", json!({"profile": {"email": "a@b.co"}})), Some(json!("a@b.co")));
    }

    #[test]
    fn loop_variables_missing_keys_render_as_nothing_not_an_error() {
        let ctx = json!({"items": [{"a": 1}, {"b": 2}]});
        assert_eq!(render("{% for i in items %}{{ i.a }}{% endfor %}", ctx.clone()), Some(json!("1")));
        assert_eq!(render("{{ items[1].a | default: 'd' }}", ctx), Some(json!("d")));
    }

    #[test]
    fn output_past_the_limit_is_an_error_naming_the_leaf() {
        let p = parser().unwrap();
        let leaf =
            compile_leaf(&p, "{% for i in (1..100000) %}xxxxxxxxxx{% endfor %}", "track.event").unwrap().unwrap();
        let err = leaf
            .render_value(&CtxObject::new(), &RenderLimits { max_leaf_bytes: 1000, ..RenderLimits::default() })
            .unwrap_err();
        assert_eq!(err.path, "track.event");
        assert!(err.message.contains("more than 1000 bytes"), "{}", err.message);
        let _ = Ctx::Nil;
    }
}
