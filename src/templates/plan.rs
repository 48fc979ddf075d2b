//! A JSON template's direct plan: the common templates evaluated without liquid.
//!
//! Most templates are JSON whose leaves are plain reads with defaults and simple conditions
//! (`{{ Profile.Identity | default: Profile.Email }}`, `{% if KeyValues.heap_event %}…{% else %}…{% endif %}`,
//! `{% if type == 'track' or type == 'page' %}yes{% endif %}`). Rendering those through liquid costs a copy of
//! every value read, a JSON text and a parse of it. A plan is compiled once per template when every leaf uses only
//! that subset, and builds the JSON value straight from the variables:
//! - outputs `{{ path }}` and `{{ path | default: x | … }}` where `x` is a path, a quoted string or an integer;
//! - `{% if %}` / `{% elsif %}` / `{% else %}` / `{% unless %}` over paths, `==` and `!=`, `and` and `or`;
//! - literal text.
//!
//! Anything else (another filter or tag, whitespace control, `@` or spaced names, a float literal) leaves the
//! template to liquid. At render time a path that crosses an array or a scalar (where liquid has rules of its own:
//! `.size`, `.first`), or output that might pass the render limits, gives the item back to liquid too, so a plan
//! never decides anything liquid would decide differently. The plan follows the same rules as `output` (a leaf
//! that is exactly one `{{ }}` keeps its value's JSON type; anything else is a string) and `if_block` (Shopify's
//! `==`), reusing their functions; a property test renders random variables both ways and compares
//! (`specs::a_plan_renders_what_liquid_renders`).

use super::context::CtxObject;
use super::if_block::shopify_eq;
use super::output::resolve;
use super::render::RenderLimits;
use super::rewrite::{block_end, markup_end, next_open, single_expression};
use liquid_core::model::{State, ValueViewCmp};
use liquid_core::{Value as LiquidValue, ValueView};
use serde_json::{Map, Value};

/// A JSON template compiled for direct evaluation.
#[derive(Debug)]
pub struct Plan {
    root: Node,
}

#[derive(Debug)]
enum Node {
    /// Structure and strings without Liquid (and root comments), as written.
    Const(Value),
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    /// A leaf that is exactly one output: the value keeps its JSON type.
    Typed(Expr),
    /// Any other leaf with Liquid: a string.
    Text(Vec<Part>),
}

#[derive(Debug)]
enum Part {
    Lit(String),
    Out(Expr),
    /// `if` / `elsif` branches in order (a branch's `bool` is false for `unless`), then `else`.
    If(Vec<(Cond, bool, Vec<Part>)>, Vec<Part>),
}

#[derive(Debug)]
struct Expr {
    base: Operand,
    /// `| default: x` filters in order; `None` for a bare `| default`.
    defaults: Vec<Option<Operand>>,
}

#[derive(Debug)]
enum Operand {
    Path(Vec<String>),
    Lit(LiquidValue),
}

#[derive(Debug)]
enum Cond {
    Truthy(Operand),
    Eq(Operand, Operand, bool),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

/// Gives the item back to liquid.
struct Fallback;

/// Where a text template's markup was taken out of its JSON (see `Plan::compile_text`).
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

impl Plan {
    /// The plan of a JSON template's parsed `root`, or `None` when some leaf needs liquid.
    pub fn compile(root: &Value) -> Option<Self> {
        let Value::Object(m) = root else { return None };
        let mut entries = Vec::with_capacity(m.len());
        for (k, v) in m {
            // Root keys starting with `_` are comments: kept as written (shape drops them).
            let node = if k.starts_with('_') { Node::Const(v.clone()) } else { node(v, true)? };
            entries.push((k.clone(), node));
        }
        Some(Self { root: Node::Object(entries) })
    }

    /// The plan of a text template whose Liquid sits inside JSON strings or stands for whole values
    /// (`"total": {{ Event.Amount }}`), with `{% comment %}` blocks between values; `None` when Liquid builds
    /// structure (a loop around an array, a tag between fields), which only liquid can render.
    ///
    /// Each markup is taken out and replaced with a placeholder (inside quotes where it stood outside a string),
    /// the rest is parsed as JSON, and the markup is put back into the string leaves. A leaf then renders as it
    /// would in the text: its literal text with JSON escapes read, each output as `output` writes it.
    pub fn compile_text(text: &str) -> Option<Self> {
        if text.contains([MARK_OPEN, MARK_CLOSE]) {
            return None;
        }
        let mut json = String::with_capacity(text.len());
        let mut marks: Vec<&str> = Vec::new();
        let mut lex = JsonLex::default();
        let mut i = 0;
        while let Some(start) = next_open(text, i) {
            lex.follow(&text[i..start]);
            json.push_str(&text[i..start]);
            let tag = text[start..].starts_with("{%");
            let end = markup_end(text, start + 2, if tag { "%}" } else { "}}" })?;
            let markup = &text[start..end];
            i = end;
            if lex.escape {
                return None;
            }
            if !lex.in_string {
                let inner = markup[2..markup.len() - 2].trim_matches('-').trim();
                match inner.split_whitespace().next() {
                    Some("comment") if tag => {
                        i = block_end(text, end, "endcomment")?;
                        continue;
                    }
                    _ if tag => return None,
                    _ => {}
                }
            }
            let placeholder = format!("{MARK_OPEN}{}{MARK_CLOSE}", marks.len());
            marks.push(markup);
            if lex.in_string {
                json.push_str(&placeholder);
            } else {
                json.push('"');
                json.push_str(&placeholder);
                json.push('"');
            }
        }
        json.push_str(&text[i..]);
        let root: Value = serde_json::from_str(&json).ok()?;
        let Value::Object(m) = restore(root, &marks)? else { return None };
        // Text templates render every leaf, comments included; and their leaves are not trimmed.
        let mut entries = Vec::with_capacity(m.len());
        for (k, v) in &m {
            entries.push((k.clone(), node(v, false)?));
        }
        Some(Self { root: Node::Object(entries) })
    }

    /// Renders against `ctx`: the document's JSON, or `None` for liquid to render it.
    pub fn eval(&self, ctx: &CtxObject, limits: &RenderLimits) -> Option<Value> {
        let mut budget = Budget { left: limits.max_event_bytes / 8, leaf: limits.max_leaf_bytes / 8 };
        eval_node(&self.root, ctx, &mut budget).ok()
    }
}

/// Output this far below the render limits needs no exact count: past it, liquid counts (6 is the most JSON
/// escaping can grow a byte; the rest covers structure).
struct Budget {
    left: usize,
    leaf: usize,
}

impl Budget {
    fn take(&mut self, bytes: usize) -> Result<(), Fallback> {
        self.left = self.left.checked_sub(bytes + 2).ok_or(Fallback)?;
        Ok(())
    }
}

/// The plan of a value; `trimmed`: a JSON template's leaf that is one output with whitespace around it is that
/// output (`rewrite::leaf_source` writes it without the whitespace), where a text template's keeps the whitespace.
fn node(v: &Value, trimmed: bool) -> Option<Node> {
    Some(match v {
        Value::String(s) if s.contains("{{") || s.contains("{%") => match single_expression(s).filter(|_| trimmed) {
            Some(inner) => Node::Typed(expr(inner)?),
            None => Node::Text(parts(s)?),
        },
        Value::Object(m) => {
            let mut entries = Vec::with_capacity(m.len());
            for (k, v) in m {
                entries.push((k.clone(), node(v, trimmed)?));
            }
            Node::Object(entries)
        }
        Value::Array(a) => Node::Array(a.iter().map(|v| node(v, trimmed)).collect::<Option<_>>()?),
        other => Node::Const(other.clone()),
    })
}

/// Follows JSON text: whether the next byte is inside a string literal, right after a backslash in one.
#[derive(Default)]
struct JsonLex {
    in_string: bool,
    escape: bool,
}

impl JsonLex {
    fn follow(&mut self, text: &str) {
        for b in text.bytes() {
            match (self.in_string, self.escape, b) {
                (true, true, _) => self.escape = false,
                (true, false, b'\\') => self.escape = true,
                (true, false, b'"') => self.in_string = false,
                (false, _, b'"') => self.in_string = true,
                _ => {}
            }
        }
    }
}

/// Puts the markup back where the placeholders are; `None` if a placeholder ended up in a key.
fn restore(v: Value, marks: &[&str]) -> Option<Value> {
    Some(match v {
        Value::String(s) if s.contains(MARK_OPEN) => {
            let mut out = String::with_capacity(s.len() + 32);
            let mut rest = s.as_str();
            while let Some(at) = rest.find(MARK_OPEN) {
                out.push_str(&rest[..at]);
                let after = &rest[at + MARK_OPEN.len_utf8()..];
                let close = after.find(MARK_CLOSE)?;
                out.push_str(marks.get(after[..close].parse::<usize>().ok()?)?);
                rest = &after[close + MARK_CLOSE.len_utf8()..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                if k.contains(MARK_OPEN) {
                    return None;
                }
                out.insert(k, restore(v, marks)?);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|v| restore(v, marks)).collect::<Option<_>>()?),
        other => other,
    })
}

/// A leaf's text, outputs and conditions; `None` for anything else.
fn parts(s: &str) -> Option<Vec<Part>> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(start) = next_open(s, i) {
        if start > i {
            tokens.push(Token::Text(&s[i..start]));
        }
        let tag = s[start..].starts_with("{%");
        let end = markup_end(s, start + 2, if tag { "%}" } else { "}}" })?;
        let inner = &s[start + 2..end - 2];
        if inner.starts_with('-') || inner.ends_with('-') {
            return None;
        }
        tokens.push(if tag { Token::Tag(inner.trim()) } else { Token::Out(inner.trim()) });
        i = end;
    }
    if i < s.len() {
        tokens.push(Token::Text(&s[i..]));
    }
    let mut it = tokens.into_iter();
    let (body, end) = block(&mut it)?;
    end.is_none().then_some(body)
}

enum Token<'a> {
    Text(&'a str),
    Out(&'a str),
    Tag(&'a str),
}

/// Parts up to a closing tag (`elsif`, `else`, `endif`, `endunless`), which is returned with them.
fn block<'a>(it: &mut std::vec::IntoIter<Token<'a>>) -> Option<(Vec<Part>, Option<&'a str>)> {
    let mut out = Vec::new();
    while let Some(t) = it.next() {
        match t {
            Token::Text(s) => out.push(Part::Lit(s.to_owned())),
            Token::Out(e) => out.push(Part::Out(expr(e)?)),
            Token::Tag(tag) => {
                let (name, rest) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
                match name {
                    "if" | "unless" => out.push(conditional(cond(rest)?, name == "if", it)?),
                    "elsif" | "else" | "endif" | "endunless" => return Some((out, Some(tag))),
                    _ => return None,
                }
            }
        }
    }
    Some((out, None))
}

fn conditional<'a>(first: Cond, mode: bool, it: &mut std::vec::IntoIter<Token<'a>>) -> Option<Part> {
    let mut branches = Vec::new();
    let mut current = (first, mode);
    loop {
        let (body, end) = block(it)?;
        branches.push((current.0, current.1, body));
        let end = end?;
        let (name, rest) = end.split_once(char::is_whitespace).unwrap_or((end, ""));
        match name {
            // `elsif` belongs to `if` only; liquid refuses it in `unless`.
            "elsif" if mode => current = (cond(rest)?, true),
            "else" if rest.trim().is_empty() => {
                let (otherwise, end) = block(it)?;
                return closes(end?, mode).then_some(Part::If(branches, otherwise));
            }
            _ if rest.trim().is_empty() && closes(end, mode) => return Some(Part::If(branches, Vec::new())),
            _ => return None,
        }
    }
}

fn closes(tag: &str, mode: bool) -> bool {
    tag == if mode { "endif" } else { "endunless" }
}

/// `a`, `a == b`, `a != b`, joined by `and` (binding tighter) and `or`, as `if_block` parses them.
fn cond(s: &str) -> Option<Cond> {
    let words = words(s)?;
    let mut ors: Vec<Cond> = Vec::new();
    for group in words.split(|w| *w == "or") {
        let mut ands: Vec<Cond> = Vec::new();
        for atom in group.split(|w| *w == "and") {
            ands.push(match atom {
                [a] => Cond::Truthy(operand(a)?),
                [a, "==", b] => Cond::Eq(operand(a)?, operand(b)?, true),
                [a, "!=" | "<>", b] => Cond::Eq(operand(a)?, operand(b)?, false),
                _ => return None,
            });
        }
        ors.push(fold(ands, Cond::And)?);
    }
    fold(ors, Cond::Or)
}

/// Left to right, as `if_block` builds its chains.
fn fold(conds: Vec<Cond>, join: fn(Box<Cond>, Box<Cond>) -> Cond) -> Option<Cond> {
    let mut it = conds.into_iter();
    let first = it.next()?;
    Some(it.fold(first, |l, r| join(Box::new(l), Box::new(r))))
}

/// Splits on whitespace outside quotes; `None` for an unterminated quote.
fn words(s: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let mut quote = None;
        while i < b.len() {
            match quote {
                Some(q) if b[i] == q => quote = None,
                Some(_) => {}
                None if b[i] == b'"' || b[i] == b'\'' => quote = Some(b[i]),
                None if b[i].is_ascii_whitespace() => break,
                None => {}
            }
            i += 1;
        }
        if quote.is_some() {
            return None;
        }
        out.push(&s[start..i]);
    }
    Some(out)
}

/// `operand ( | default[: operand] )*`.
fn expr(s: &str) -> Option<Expr> {
    let mut pieces = split_pipes(s)?.into_iter();
    let base = operand(pieces.next()?.trim())?;
    let mut defaults = Vec::new();
    for filter in pieces {
        let filter = filter.trim();
        if filter == "default" {
            defaults.push(None);
            continue;
        }
        let arg = filter.strip_prefix("default")?.trim_start().strip_prefix(':')?.trim();
        defaults.push(Some(operand(arg)?));
    }
    Some(Expr { base, defaults })
}

fn split_pipes(s: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut quote = None;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '|' => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            None => {}
        }
    }
    if quote.is_some() {
        return None;
    }
    out.push(&s[start..]);
    Some(out)
}

/// A quoted string, an integer, or a dotted path of plain names and quoted brackets.
fn operand(s: &str) -> Option<Operand> {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        let inner = &s[1..s.len() - 1];
        return (!inner.contains(b[0] as char)).then(|| Operand::Lit(LiquidValue::scalar(inner.to_owned())));
    }
    match s {
        "nil" | "null" => return Some(Operand::Lit(LiquidValue::Nil)),
        "true" | "false" => return Some(Operand::Lit(LiquidValue::scalar(s == "true"))),
        _ => {}
    }
    if b.first().is_some_and(|c| c.is_ascii_digit() || *c == b'-') {
        return s.parse::<i64>().ok().map(|n| Operand::Lit(LiquidValue::scalar(n)));
    }
    path(s).map(Operand::Path)
}

fn path(s: &str) -> Option<Vec<String>> {
    let ident = |w: &str| {
        w.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let name = &rest[..end];
        if !name.is_empty() {
            if !ident(name) {
                return None;
            }
            out.push(name.to_owned());
        } else if out.is_empty() {
            return None;
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix('[') {
            let q = r.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let close = r[1..].find(q)? + 1;
            if !r[close + 1..].starts_with(']') {
                return None;
            }
            out.push(r[1..close].to_owned());
            rest = &r[close + 2..];
            if rest.is_empty() {
                break;
            }
            if !rest.starts_with(['.', '[']) {
                return None;
            }
            if let Some(r) = rest.strip_prefix('.') {
                rest = r;
            }
        } else if let Some(r) = rest.strip_prefix('.') {
            rest = r;
        } else {
            break;
        }
    }
    // Liquid's own names for literals, never variables.
    if matches!(out[0].as_str(), "nil" | "null" | "true" | "false" | "empty" | "blank")
        || out.iter().any(String::is_empty)
    {
        return None;
    }
    Some(out)
}

// ---- evaluation --------------------------------------------------------------------------------------------------

static NIL: LiquidValue = LiquidValue::Nil;

fn eval_node(n: &Node, ctx: &CtxObject, budget: &mut Budget) -> Result<Value, Fallback> {
    Ok(match n {
        Node::Const(v) => v.clone(),
        Node::Object(entries) => {
            let mut m = Map::new();
            for (k, v) in entries {
                budget.take(k.len())?;
                m.insert(k.clone(), eval_node(v, ctx, budget)?);
            }
            Value::Object(m)
        }
        Node::Array(items) => Value::Array(items.iter().map(|v| eval_node(v, ctx, budget)).collect::<Result<_, _>>()?),
        Node::Typed(e) => to_json(eval_expr(e, ctx)?, budget)?,
        Node::Text(parts) => {
            let mut out = TextOut { text: String::new(), pending: None };
            write_parts(parts, ctx, &mut out)?;
            if let Some(v) = out.pending {
                // The one thing the string rendered to was an output: it keeps its type (`output`'s rule).
                return to_json(v, budget);
            }
            if out.text.len() > budget.leaf {
                return Err(Fallback);
            }
            budget.take(out.text.len())?;
            Value::String(out.text)
        }
    })
}

/// A string leaf as it renders. As in `output::OutputSink`, an output written where the string is still empty is
/// held back: if nothing follows it, the leaf is that value with its JSON type; anything written after it makes
/// it text (its JSON text, as the sink writes it, for a value other than a string).
struct TextOut<'v> {
    text: String,
    pending: Option<&'v dyn ValueView>,
}

impl TextOut<'_> {
    fn flush(&mut self) {
        let Some(v) = self.pending.take() else { return };
        match v.as_scalar() {
            Some(s) if s.type_name() == "string" => self.text.push_str(s.to_kstr().as_str()),
            _ if v.is_nil() || v.as_state().is_some() => {}
            _ => super::output::write_json(v, &mut self.text),
        }
    }
}

fn write_parts<'v>(parts: &'v [Part], ctx: &'v CtxObject<'_>, out: &mut TextOut<'v>) -> Result<(), Fallback> {
    for p in parts {
        match p {
            Part::Lit(s) => {
                out.flush();
                out.text.push_str(s);
            }
            Part::Out(e) => {
                let v = eval_expr(e, ctx)?;
                out.flush();
                if out.text.is_empty() {
                    out.pending = Some(v);
                } else {
                    write_text(v, &mut out.text);
                }
            }
            Part::If(branches, otherwise) => {
                let mut taken = None;
                for (c, mode, body) in branches {
                    if eval_cond(c, ctx)? == *mode {
                        taken = Some(body);
                        break;
                    }
                }
                write_parts(taken.unwrap_or(otherwise), ctx, out)?;
            }
        }
    }
    Ok(())
}

fn eval_operand<'a>(o: &'a Operand, ctx: &'a CtxObject<'_>) -> Result<&'a dyn ValueView, Fallback> {
    match o {
        Operand::Lit(v) => Ok(v),
        Operand::Path(p) => match resolve(ctx, p) {
            Some(Some(found)) => Ok(found),
            Some(None) => Ok(&NIL),
            None => Err(Fallback),
        },
    }
}

fn eval_expr<'a>(e: &'a Expr, ctx: &'a CtxObject<'_>) -> Result<&'a dyn ValueView, Fallback> {
    let mut v = eval_operand(&e.base, ctx)?;
    for d in &e.defaults {
        if v.query_state(State::DefaultValue) {
            v = match d {
                Some(arg) => eval_operand(arg, ctx)?,
                None => &NIL,
            };
        }
    }
    Ok(v)
}

fn eval_cond(c: &Cond, ctx: &CtxObject) -> Result<bool, Fallback> {
    Ok(match c {
        Cond::Truthy(o) => eval_operand(o, ctx)?.query_state(State::Truthy),
        Cond::Eq(a, b, want) => {
            let (a, b) = (eval_operand(a, ctx)?, eval_operand(b, ctx)?);
            shopify_eq(a, b, ValueViewCmp::new(a) == ValueViewCmp::new(b)) == *want
        }
        Cond::And(l, r) => eval_cond(l, ctx)? && eval_cond(r, ctx)?,
        Cond::Or(l, r) => eval_cond(l, ctx)? || eval_cond(r, ctx)?,
    })
}

/// An output inside a string, as `output::string_text` writes it before the JSON is parsed: a scalar as liquid
/// prints it, nothing for nil, an array or object as its JSON text.
fn write_text(v: &dyn ValueView, out: &mut String) {
    if v.is_nil() || v.as_state().is_some() {
        return;
    }
    match v.as_scalar() {
        Some(s) => out.push_str(s.to_kstr().as_str()),
        None => super::output::write_json(v, out),
    }
}

/// A typed leaf's value, as `output::write_json` writes it and serde_json then reads it.
fn to_json(v: &dyn ValueView, budget: &mut Budget) -> Result<Value, Fallback> {
    if v.is_nil() || v.as_state().is_some() {
        return Ok(Value::Null);
    }
    if let Some(s) = v.as_scalar() {
        budget.take(8)?;
        return Ok(match s.type_name() {
            "boolean" => Value::Bool(s.to_bool().unwrap_or(false)),
            "whole number" => Value::from(s.to_integer().unwrap_or(0)),
            // Through the text, as the rendered document goes, so the number read back is the same.
            "fractional number" => match s.to_float().and_then(serde_json::Number::from_f64) {
                Some(n) => serde_json::from_str(&n.to_string()).map_err(|_| Fallback)?,
                None => Value::Null,
            },
            _ => {
                let text = s.to_kstr();
                budget.take(text.len())?;
                Value::String(text.as_str().to_owned())
            }
        });
    }
    if let Some(a) = v.as_array() {
        return Ok(Value::Array(a.values().map(|x| to_json(x, budget)).collect::<Result<_, _>>()?));
    }
    if let Some(o) = v.as_object() {
        let mut m = Map::new();
        for (k, x) in o.iter() {
            budget.take(k.len())?;
            m.insert(k.as_str().to_owned(), to_json(x, budget)?);
        }
        return Ok(Value::Object(m));
    }
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compiles(leaf: &str) -> bool {
        Plan::compile(&json!({ "event": leaf })).is_some()
    }

    #[test]
    fn the_shipped_idioms_compile_and_everything_else_is_left_to_liquid() {
        for ok in [
            "{{ Profile.Identity | default: Profile.Email }}",
            "{% if KeyValues.heap_event %}{{ KeyValues.heap_event }}{% else %}CleverTap Campaign {{ Campaign.id }}{% endif %}",
            "{% if type == 'track' or type == 'page' or type == 'screen' %}yes{% endif %}",
            "{% if type == 'identify' and heap_traits %}yes{% endif %}",
            "{{ Event['Added At'] | default: 'NA' }}",
            "{% unless x %}a{% else %}b{% endunless %}",
            "{% if a %}1{% elsif b != \"x\" %}2{% endif %}",
            "{{ x | default }} and {{ y | default: 0 }}",
        ] {
            assert!(compiles(ok), "{ok}");
        }
        for left in [
            "{{ x | upcase }}",
            "a {{- x -}}",
            "{% assign a = 1 %}{{ a }}",
            "{% if x > 1 %}a{% endif %}",
            "{{ x | default: 1.5 }}",
            "{{ @Profile.city }}",
            "{{ Event.NPS Score }}",
            "{% if x %}a",
            "{% unless x %}a{% elsif y %}b{% endunless %}",
            "{{ empty }}",
            "{% abort %}",
        ] {
            assert!(!compiles(left), "{left}");
        }
    }

    #[test]
    fn a_text_template_has_a_plan_unless_liquid_builds_its_structure() {
        let plan = |t: &str| Plan::compile_text(t).is_some();
        assert!(plan(r#"{"event": "E", "v": {{ x }}, "s": "a \" {{ x | default: 'q' }}"}"#));
        assert!(plan(r#"{% comment %} "x {% endcomment %}{"event": "E"}"#));
        assert!(!plan(r#"{"event": "E", "v": [{% for i in x %}{{ i }}{% endfor %}]}"#));
        assert!(!plan(r#"{"event": "E"{% if x %}, "v": 1{% endif %}}"#));
        assert!(!plan(r#"{"event": "E", "{{ k }}": 1}"#), "Liquid in a key");
        assert!(!plan(r#"{"event": "E", "v": "a\{{ x }}"}"#), "an output right after a backslash");
        assert!(!plan(r#"{"event": "E", "v": {{ x }}.5}"#));
    }
}
