//! Contextual JSON escaping of a template's outputs, the way Go's html/template escapes HTML.
//!
//! A template document (a text template, or a JSON template turned into one) is rendered by liquid into an
//! [`OutputSink`]. The sink follows the JSON text as it is written: whether the next byte lands inside a string
//! literal, and whether that string is an object key. Every `{{ }}` of the document ends in the `__out` filter
//! (added by `document::rewrite`), which asks the sink where it is and returns the value escaped for that place:
//! - inside a string literal: the value's text with JSON string escaping, so it can never end the string;
//! - outside one: the value as a JSON value (a string quoted, a number as is, nil as `null`);
//! - a string value that is exactly one `{{ }}` keeps the value's JSON type, as a JSON template's leaf does: the
//!   sink writes the value as string text and, when the very next byte closes the string, replaces the whole
//!   literal with the value's JSON.
//!
//! So a value cannot end a string, add a field or change `app_id`, whatever it holds. The sink also enforces the
//! output budget and the render deadline, and records where each output came from for error messages.
//! One render runs on one thread; the sink in use is a thread-local for the filter to reach.

use super::context::{Ctx, CtxObject};
use liquid_core::{Display_filter, Expression, Filter, FilterParameters, FilterReflection, FromFilterParameters};
use liquid_core::{ParseFilter, Runtime, Value as LiquidValue, ValueView};
use std::cell::RefCell;
use std::io::Write;
use std::time::Instant;

/// The buffers an `OutputSink` owns, kept between renders.
type Buffers = (Vec<u8>, Vec<(usize, u32)>, Vec<bool>);

thread_local! {
    static SINK: RefCell<Option<OutputSink>> = const { RefCell::new(None) };
    /// Buffers of finished renders, reused by the next render on this thread (`OutputSink::recycle`).
    static SPARE: RefCell<Buffers> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Why a render stopped early, besides a liquid error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `{% abort %}` ran: the item is ignored.
    Abort,
    /// The output passed `max_bytes`.
    TooLarge,
    /// One string value passed `max_leaf`.
    LeafTooLarge,
    /// The deadline passed.
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Outside,
    InString { key: bool, escape: bool },
}

/// A value that becomes its JSON if its string literal closes right after it, else string text.
#[derive(Debug)]
struct Pending {
    /// Where the opening quote is in the buffer.
    quote_at: usize,
    json: String,
}

/// The buffer a document renders into, with the JSON lexical state of what has been written so far.
#[derive(Debug)]
pub struct OutputSink {
    pub(crate) buf: Vec<u8>,
    lex: Lex,
    /// Open containers, `true` for an object.
    stack: Vec<bool>,
    expect_key: bool,
    string_start: usize,
    pending: Option<Pending>,
    max: usize,
    /// Most bytes one string value may take (`templates.max_leaf_bytes`).
    max_leaf: usize,
    deadline: Option<Instant>,
    writes: u32,
    /// `(buffer offset, template offset)` of each output, in order: maps a fault in the rendered text back to the
    /// template.
    pub(crate) outputs: Vec<(usize, u32)>,
    /// Template offset of the output being evaluated (set by the `__at` tag before an output with filters).
    pub(crate) at: Option<u32>,
    pub(crate) stop: Option<Stop>,
    /// The render's variables, for `{% __var %}` (see `run_with`).
    globals: Option<std::ptr::NonNull<CtxObject<'static>>>,
}

impl OutputSink {
    pub fn new(max: usize, max_leaf: usize, deadline: Option<Instant>) -> Self {
        let (buf, outputs, stack) = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
        Self {
            buf,
            lex: Lex::Outside,
            stack,
            expect_key: false,
            string_start: 0,
            pending: None,
            max,
            max_leaf,
            deadline,
            writes: 0,
            outputs,
            at: None,
            stop: None,
            globals: None,
        }
    }

    /// Runs `render` with this sink installed for the `__out` filter; returns the sink with what was written.
    pub fn run<T>(self, render: impl FnOnce(&mut dyn Write) -> T) -> (Self, T) {
        self.run_with(None, render)
    }

    /// As `run`, with `globals` (the variables the render reads) reachable by `{% __var %}` for the duration.
    pub fn run_with<T>(
        mut self,
        globals: Option<&CtxObject<'_>>,
        render: impl FnOnce(&mut dyn Write) -> T,
    ) -> (Self, T) {
        // The variables' own lifetime is erased here and never used past this call (see `write_var`).
        self.globals = globals.map(|g| std::ptr::NonNull::from(g).cast::<CtxObject<'static>>());
        let previous = SINK.with(|s| s.borrow_mut().replace(self));
        let result = render(&mut ThreadSink);
        let mut sink = SINK
            .with(|s| {
                let mut slot = s.borrow_mut();
                let sink = slot.take();
                *slot = previous;
                sink
            })
            .unwrap_or_else(|| OutputSink::new(0, 0, None));
        sink.globals = None;
        sink.flush_pending();
        (sink, result)
    }

    /// Writes a pending value as string text: a string's own text, nothing for nil, anything else as its JSON
    /// text (a number as is; an array or object as JSON, escaped).
    /// Gives the buffers back for the next render on this thread (kept up to 64 KiB).
    pub fn recycle(mut self) {
        if self.buf.capacity() <= 64 * 1024 {
            self.buf.clear();
            self.outputs.clear();
            self.stack.clear();
            SPARE.with(|s| *s.borrow_mut() = (self.buf, self.outputs, self.stack));
        }
    }

    fn flush_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            let json = p.json.as_str();
            if json.starts_with('"') {
                self.buf.extend_from_slice(&json.as_bytes()[1..json.len() - 1]);
            } else if json != "null" {
                let mut escaped = String::with_capacity(json.len() + 8);
                escape_into(json, &mut escaped);
                self.buf.extend_from_slice(escaped.as_bytes());
            }
        }
    }

    fn push(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(p) = self.pending.take() {
            if data.first() == Some(&b'"') && self.buf.len() == p.quote_at + 1 {
                self.buf.truncate(p.quote_at);
                self.buf.extend_from_slice(p.json.as_bytes());
                self.lex = Lex::Outside;
                self.expect_key = false;
                data = &data[1..];
            } else {
                self.pending = Some(p);
                self.flush_pending();
            }
        }
        self.writes = self.writes.wrapping_add(1);
        if self.writes.is_multiple_of(64) && self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.stop = Some(Stop::Timeout);
            return Err(std::io::Error::other("render deadline reached"));
        }
        if self.buf.len() + data.len() > self.max {
            self.stop = Some(Stop::TooLarge);
            return Err(std::io::Error::other("render output limit reached"));
        }
        let base = self.buf.len();
        for (i, &b) in data.iter().enumerate() {
            self.lex_byte(b, base + i);
        }
        self.buf.extend_from_slice(data);
        if matches!(self.lex, Lex::InString { .. }) && self.buf.len() - self.string_start > self.max_leaf {
            self.stop = Some(Stop::LeafTooLarge);
            return Err(std::io::Error::other("render leaf limit reached"));
        }
        Ok(())
    }

    /// Follows one byte, which goes at `at` in `buf`.
    fn lex_byte(&mut self, b: u8, at: usize) {
        match self.lex {
            Lex::InString { key, escape: true } => self.lex = Lex::InString { key, escape: false },
            Lex::InString { key, escape: false } => match b {
                b'\\' => self.lex = Lex::InString { key, escape: true },
                b'"' => {
                    self.lex = Lex::Outside;
                    self.expect_key = false;
                }
                _ => {}
            },
            Lex::Outside => match b {
                b'"' => {
                    self.lex = Lex::InString { key: self.expect_key, escape: false };
                    self.string_start = at;
                }
                b'{' => {
                    self.stack.push(true);
                    self.expect_key = true;
                }
                b'[' => {
                    self.stack.push(false);
                    self.expect_key = false;
                }
                b'}' | b']' => {
                    self.stack.pop();
                    self.expect_key = false;
                }
                b',' => self.expect_key = self.stack.last() == Some(&true),
                b':' => self.expect_key = false,
                _ => {}
            },
        }
    }

    /// The text an output writes here: escaped for the current JSON context (see the module docs).
    pub(crate) fn escape(&mut self, v: &dyn ValueView, at: u32) -> String {
        self.flush_pending();
        self.outputs.push((self.buf.len(), at));
        self.at = None;
        match self.lex {
            Lex::InString { key: false, escape: false } if self.buf.len() == self.string_start + 1 => {
                let mut json = String::with_capacity(64);
                write_json(v, &mut json);
                self.pending = Some(Pending { quote_at: self.string_start, json });
                String::new()
            }
            Lex::InString { .. } => string_text(v),
            Lex::Outside => {
                let mut json = String::with_capacity(64);
                write_json(v, &mut json);
                json
            }
        }
    }

    /// As `escape`, appending the text to the buffer directly. The text is complete in its context (an escaped
    /// string's content, or a whole JSON value outside strings), so the lexical state it leaves is the one it
    /// found and it need not be lexed again.
    fn append(&mut self, v: &dyn ValueView, at: u32) -> std::io::Result<()> {
        let text = self.escape(v, at);
        if self.buf.len() + text.len() > self.max {
            self.stop = Some(Stop::TooLarge);
            return Err(std::io::Error::other("render output limit reached"));
        }
        self.buf.extend_from_slice(text.as_bytes());
        if matches!(self.lex, Lex::InString { .. }) && self.buf.len() - self.string_start > self.max_leaf {
            self.stop = Some(Stop::LeafTooLarge);
            return Err(std::io::Error::other("render leaf limit reached"));
        }
        if matches!(self.lex, Lex::Outside) {
            self.expect_key = false;
        }
        Ok(())
    }
}

/// Renders what the sink's owner asked for into the thread's sink.
struct ThreadSink;

impl Write for ThreadSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        SINK.with(|s| match s.borrow_mut().as_mut() {
            Some(sink) => sink.push(data).map(|()| data.len()),
            None => Err(std::io::Error::other("no output sink")),
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes the value at `path` of the render's variables, escaped for where it lands: `{% __var N path %}`, which
/// `document::rewrite` puts in place of `{{ path }}` when `path` is a plain dotted path of global variables.
/// liquid copies every global it reads (the whole `Event` object for `{{ Event }}`); this reads it where it is.
/// `Ok(false)` when the path has to be left to liquid (it crosses an array or a scalar, where liquid has rules of
/// its own such as `.size` and `.first`).
/// Written straight into the sink, not through liquid's writer: `rewrite` emits `__var` only where liquid writes
/// to the sink itself (not inside `capture` or `ifchanged`, which buffer).
pub fn write_var(path: &[String], at: u32) -> std::io::Result<bool> {
    SINK.with(|s| {
        let mut slot = s.borrow_mut();
        let Some(sink) = slot.as_mut() else { return Ok(false) };
        let Some(globals) = sink.globals else { return Ok(false) };
        // SAFETY: `globals` points at the `CtxObject` given to `run_with`, which outlives the render it wraps; it
        // is set only for that call and cleared before `run_with` returns. Renders run on this one thread.
        let globals = unsafe { globals.as_ref() };
        match resolve(globals, path) {
            Some(found) => sink.append(found.unwrap_or(&NIL), at).map(|()| true),
            None => Ok(false),
        }
    })
}

static NIL: Ctx = Ctx::Nil;

/// Follows a plain path the way a lenient liquid lookup does: a missing key, or any key below nil, is nil.
/// `None` when the path crosses a scalar or an array, or asks an object for a `size` it does not have.
pub(super) fn resolve<'c>(ctx: &'c CtxObject<'_>, path: &[String]) -> Option<Option<&'c dyn ValueView>> {
    let (first, rest) = path.split_first()?;
    let mut cur = ctx.lookup(first).map(Ctx::view);
    for key in rest {
        cur = match cur {
            None => None,
            Some(v) if v.is_nil() => None,
            Some(v) => match v.as_object() {
                Some(o) if key == "size" && !o.contains_key(key) => return None,
                Some(o) => o.get(key),
                None => return None,
            },
        };
    }
    Some(cur)
}

/// Records the template offset of the output about to be evaluated (`{% __at N %}`), for render errors.
pub fn set_position(at: u32) {
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink.at = Some(at);
        }
    });
}

/// Marks the render as stopped by `{% abort %}`.
pub fn set_abort() {
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink.stop = Some(Stop::Abort);
        }
    });
}

/// The value's text inside a string, JSON-string-escaped (no quotes): a scalar as liquid prints it, nothing for
/// nil, an array or object as its JSON text (liquid would glue its items together).
fn string_text(v: &dyn ValueView) -> String {
    let mut out = String::new();
    if v.is_nil() || v.as_state().is_some() {
        return out;
    }
    match v.as_scalar() {
        Some(s) => escape_into(s.to_kstr().as_str(), &mut out),
        None => {
            let mut json = String::new();
            write_json(v, &mut json);
            escape_into(&json, &mut out);
        }
    }
    out
}

/// JSON string escaping of `s` into `out`, without quotes.
pub fn escape_into(s: &str, out: &mut String) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// The value as JSON text: nil and liquid states are `null`, scalars keep their type, objects and arrays nest.
pub fn write_json(v: &dyn ValueView, out: &mut String) {
    if v.is_nil() || v.as_state().is_some() {
        out.push_str("null");
    } else if let Some(s) = v.as_scalar() {
        match s.type_name() {
            "boolean" => out.push_str(if s.to_bool().unwrap_or(false) { "true" } else { "false" }),
            "whole number" => out.push_str(&s.to_integer().unwrap_or(0).to_string()),
            "fractional number" => match s.to_float().and_then(serde_json::Number::from_f64) {
                Some(n) => out.push_str(&n.to_string()),
                None => out.push_str("null"),
            },
            _ => {
                out.push('"');
                escape_into(s.to_kstr().as_str(), out);
                out.push('"');
            }
        }
    } else if let Some(a) = v.as_array() {
        out.push('[');
        for (i, item) in a.values().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json(item, out);
        }
        out.push(']');
    } else if let Some(o) = v.as_object() {
        // Keys sorted, as the relay's own objects iterate: a value a filter copied into liquid's hash map would
        // otherwise print its keys in an order that changes from run to run.
        let mut entries: Vec<_> = o.iter().collect();
        if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out.push('{');
        for (i, (k, item)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            escape_into(k.as_str(), out);
            out.push_str("\":");
            write_json(item, out);
        }
        out.push('}');
    } else {
        out.push_str("null");
    }
}

#[derive(Debug, FilterParameters)]
struct OutArgs {
    #[parameter(description = "Where the output is in the template text.", arg_type = "integer")]
    at: Expression,
}

/// `__out`: appended to every `{{ }}` of a document by `document::rewrite`; not for template authors.
#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "__out",
    description = "Escapes an output for the JSON context it lands in (added by the relay).",
    parameters(OutArgs),
    parsed(OutFilter)
)]
pub struct OutFilterParser;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "__out"]
struct OutFilter {
    #[parameters]
    args: OutArgs,
}

/// The text `v` writes at the current place of the render's sink (as the `__out` filter does).
pub fn escape_value(v: &dyn ValueView, at: u32) -> String {
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(sink) => sink.escape(v, at),
        None => string_text(v),
    })
}

impl Filter for OutFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        let args = self.args.evaluate(runtime)?;
        let at = u32::try_from(args.at).unwrap_or(u32::MAX);
        Ok(LiquidValue::scalar(escape_value(input, at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lexed(text: &str) -> OutputSink {
        let mut s = OutputSink::new(1 << 20, 1 << 20, None);
        s.push(text.as_bytes()).unwrap();
        s
    }

    #[test]
    fn the_lexer_knows_keys_values_and_escapes() {
        assert_eq!(lexed(r#"{"a"#).lex, Lex::InString { key: true, escape: false });
        assert_eq!(lexed(r#"{"a": "x"#).lex, Lex::InString { key: false, escape: false });
        assert_eq!(lexed(r#"{"a": "x\"#).lex, Lex::InString { key: false, escape: true });
        assert_eq!(lexed(r#"{"a": "x\" y"#).lex, Lex::InString { key: false, escape: false });
        assert_eq!(lexed(r#"{"a": ["x", "#).lex, Lex::Outside);
        assert_eq!(lexed(r#"{"a": ["x", "y"], "b"#).lex, Lex::InString { key: true, escape: false });
        assert_eq!(lexed(r#"{"a": "x", "b": "#).string_start, 11);
    }

    #[test]
    fn escaping_covers_quotes_backslashes_and_control_characters() {
        let mut s = String::new();
        escape_into("a\"b\\c\nd\u{1}", &mut s);
        assert_eq!(s, r#"a\"b\\c\nd\u0001"#);
    }
}
