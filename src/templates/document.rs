//! A template as one Liquid document whose output is JSON text.
//!
//! Both kinds of template become a document:
//! - a text template (the payload text as CleverTap's editor has it) is its own document;
//! - a JSON template becomes one by writing each string leaf's Liquid out of its JSON string
//!   (`rewrite::json_to_document`),
//!   so its leaves render in document order and `assign` / `capture` carry from one leaf to the next.
//!
//! `rewrite::rewrite` then ends every `{{ }}` (outside `capture`, whose text is escaped when it is output) with the `__out`
//! filter, which escapes the value for the JSON context it lands in (see `output`), and applies CleverTap's
//! spellings: `{{ @Profile.city }}` is `{{ Profile.city }}`, and `{{ Event.NPS Score }}` reads the key
//! `NPS Score`. A render's text must parse as JSON; if it does not, the error names the template line and column
//! of the last output before the fault and shows the rendered text around it.

use super::context::{CtxObject, Globals};
use super::output::{OutputSink, Stop};
use super::render::{LeafError, RenderLimits};
use super::rewrite::{markup_end, next_open, rewrite};
use serde_json::Value;

/// A parsed document, ready to render.
pub struct Document {
    template: liquid::Template,
    /// The document before `rewrite`: positions in errors refer to it.
    text: String,
    /// JSON templates: where each Liquid leaf is in `text`, and its path, so errors can name the leaf.
    leaves: Vec<LeafSpan>,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document").field("bytes", &self.text.len()).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct LeafSpan {
    pub start: usize,
    pub end: usize,
    pub path: String,
}

/// What a render gave.
#[derive(Debug)]
pub enum Rendered {
    Json(Value),
    /// `{% abort %}` ran.
    Aborted,
}

/// Where a problem is in the template, as `(line, column)`, 1-based.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = offset - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

impl Document {
    /// Parses a document; `text` is the document before `rewrite`. A parse error comes back with the line and
    /// column liquid reports for the author's own text.
    pub fn parse(parser: &liquid::Parser, text: String, leaves: Vec<LeafSpan>) -> Result<Self, DocError> {
        let rewritten = rewrite(&text, false).map_err(|(at, message)| DocError::at(&text, at, message))?;
        let template = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse(&rewritten))) {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                // Report the author's text: parse it without the relay's additions for liquid's position.
                let shown = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse(&text))) {
                    Ok(Err(original)) => original,
                    _ => e,
                };
                return Err(DocError::from_liquid(&shown.to_string()));
            }
            Err(_) => {
                return Err(DocError {
                    line: None,
                    column: None,
                    message: "the Liquid parser failed on this template (a liquid-core panic)".into(),
                });
            }
        };
        Ok(Self { template, text, leaves })
    }

    /// Whether `name` appears as a name in the document's Liquid, or the document includes partials.
    pub fn reads(&self, name: &str) -> bool {
        let mut i = 0;
        while let Some(start) = next_open(&self.text, i) {
            let close = if self.text[start..].starts_with("{%") { "%}" } else { "}}" };
            let end = markup_end(&self.text, start + 2, close).unwrap_or(self.text.len());
            let markup = &self.text[start + 2..end.saturating_sub(2).max(start + 2)];
            let is_name_char = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
            if markup.split(|c: char| !is_name_char(c)).any(|w| w == name || w == "include" || w == "render") {
                return true;
            }
            i = end;
        }
        false
    }

    /// The leaf of a JSON template at `offset` of the document.
    fn leaf_at(&self, offset: usize) -> Option<&LeafSpan> {
        self.leaves.iter().find(|l| l.start <= offset && offset < l.end)
    }

    /// Names a template position for an error: the leaf of a JSON template, else line and column.
    pub fn describe(&self, offset: u32) -> String {
        if offset == u32::MAX {
            return "in a partial".into();
        }
        let offset = offset as usize;
        if let Some(leaf) = self.leaf_at(offset) {
            return format!("leaf {}", leaf.path);
        }
        let (l, c) = line_col(&self.text, offset);
        format!("line {l} column {c}")
    }

    /// Renders against `ctx` and parses the text as JSON.
    pub fn render(&self, ctx: &CtxObject, limits: &RenderLimits) -> Result<Rendered, LeafError> {
        let mut patched: Option<CtxObject> = None;
        for _ in 0..=MAX_FILL_RETRIES {
            let sink = OutputSink::new(limits.max_event_bytes, limits.max_leaf_bytes, limits.deadline);
            let globals = Globals(patched.as_ref().unwrap_or(ctx));
            let (sink, result) = sink.run_with(Some(globals.0), |w| self.template.render_to(w, &globals));
            match (result, sink.stop) {
                (_, Some(Stop::Abort)) => return Ok(Rendered::Aborted),
                (Err(_), Some(Stop::TooLarge)) => {
                    return Err(self.error(
                        &sink,
                        format!("renders to more than {} bytes (templates.max_event_bytes)", limits.max_event_bytes),
                    ));
                }
                (Err(_), Some(Stop::LeafTooLarge)) => {
                    return Err(self.error(
                        &sink,
                        format!(
                            "a string renders to more than {} bytes (templates.max_leaf_bytes)",
                            limits.max_leaf_bytes
                        ),
                    ));
                }
                (Err(_), Some(Stop::Timeout)) => {
                    return Err(self.error(
                        &sink,
                        format!(
                            "rendering took longer than {} ms (templates.render_timeout_ms)",
                            limits.timeout.as_millis()
                        ),
                    ));
                }
                (Err(e), None) => {
                    let message = e.to_string();
                    // A strict copy of a value (a loop variable, `assign`) missed a key: render again with that key
                    // present as nil, which is what a lenient lookup gives. Bounded; paid only on this path.
                    if let Some(key) = requested_index(&message) {
                        patched.get_or_insert_with(|| ctx.clone()).fill_missing_key(key);
                        continue;
                    }
                    return Err(self.error(&sink, one_line(&message)));
                }
                (Ok(()), _) => {
                    let parsed = self.parse_output(&sink);
                    sink.recycle();
                    return parsed;
                }
            }
        }
        Err(LeafError { path: "template".into(), message: "too many missing keys in copied values".into() })
    }

    fn error(&self, sink: &OutputSink, message: String) -> LeafError {
        let at = sink.at.or_else(|| sink.outputs.last().map(|o| o.1));
        LeafError { path: at.map_or_else(|| "template".into(), |a| self.describe(a)), message }
    }

    fn parse_output(&self, sink: &OutputSink) -> Result<Rendered, LeafError> {
        let e = match serde_json::from_slice::<Value>(&sink.buf) {
            Ok(v) => return Ok(Rendered::Json(v)),
            Err(e) => e,
        };
        let text = String::from_utf8_lossy(&sink.buf);
        let fault = offset_of(&text, e.line(), e.column());
        let near = sink.outputs.iter().rev().find(|(pos, _)| *pos <= fault);
        let place = match near {
            Some((_, at)) => format!("after the output at {}", self.describe(*at)),
            // Nothing was output before the fault: the text so far is the template's own.
            None => format!("line {} column {}", e.line(), e.column()),
        };
        let lo = floor_char(&text, fault.saturating_sub(40));
        let hi = floor_char(&text, (fault + 40).min(text.len()));
        let around = format!("{}⟨here⟩{}", &text[lo..floor_char(&text, fault)], &text[floor_char(&text, fault)..hi]);
        Err(LeafError {
            path: place,
            message: format!(
                "the rendered payload is not valid JSON ({e}; rendered line {}, column {}): …{}…",
                e.line(),
                e.column(),
                around.replace('\n', "⏎")
            ),
        })
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

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Byte offset of serde_json's 1-based line and column.
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    (start + column.saturating_sub(1)).min(text.len())
}

pub fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

/// A document that does not parse.
#[derive(Debug, Clone)]
pub struct DocError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl DocError {
    fn at(text: &str, offset: usize, message: String) -> Self {
        let (l, c) = line_col(text, offset);
        Self { line: Some(l), column: Some(c), message }
    }

    /// liquid's parse errors carry ` --> line:column` for syntax errors.
    fn from_liquid(message: &str) -> Self {
        let pos = message.find("-->").and_then(|i| {
            let rest = message[i + 3..].trim_start();
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == ':')).unwrap_or(rest.len());
            let mut it = rest[..end].split(':');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        });
        Self { line: pos.map(|p: (usize, usize)| p.0), column: pos.map(|p| p.1), message: one_line(message) }
    }
}
