//! The relay's changes to a template's text before liquid parses it.
//!
//! - `rewrite` ends every `{{ }}` outside `capture` with the `__out` filter, which escapes the value for the JSON
//!   context it lands in (see `output`), puts `{% __at N %}` before an output with filters (so a render error can
//!   say where), turns `{{ path }}` of a global into `{% __var N path %}` (read in place), and applies CleverTap's
//!   spellings: `{{ @Profile.city }}` is `{{ Profile.city }}`, `{{ Event.NPS Score }}` (and the same name in a
//!   condition or an `assign`) reads the key `NPS Score`.
//! - `json_to_document` writes a JSON template's string leaves out of their JSON strings, so the whole template is
//!   one Liquid document.

use super::bounds::{self, LoadLimits};
use super::document::LeafSpan;
use super::output;

/// End of the markup opened at `from` (just after `{{` or `{%`): the index after `close`, skipping quoted strings.
pub(super) fn markup_end(text: &str, from: usize, close: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = from;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        match quote {
            Some(q) if b[i] == q => quote = None,
            Some(_) => {}
            None if b[i] == b'"' || b[i] == b'\'' => quote = Some(b[i]),
            None if text[i..].starts_with(close) => return Some(i + close.len()),
            None => {}
        }
        i += 1;
    }
    None
}

pub(super) fn next_open(text: &str, from: usize) -> Option<usize> {
    let rest = &text[from..];
    match (rest.find("{{"), rest.find("{%")) {
        (Some(a), Some(b)) => Some(from + a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(from + a),
        (None, None) => None,
    }
}

fn tag_name(inner: &str) -> &str {
    let t = inner.trim_start_matches('-').trim_start();
    let end = t.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(t.len());
    &t[..end]
}

/// Index after the `{% end<name> %}` that closes a raw or comment block starting after `from`.
pub(super) fn block_end(text: &str, from: usize, end_name: &str) -> Option<usize> {
    let mut i = from;
    while let Some(at) = text[i..].find("{%").map(|a| a + i) {
        let end = markup_end(text, at + 2, "%}")?;
        if tag_name(&text[at + 2..end - 2]) == end_name {
            return Some(end);
        }
        i = end;
    }
    None
}

/// Byte index of the first `|` outside quotes.
fn first_pipe(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '|' => return Some(i),
            None => {}
        }
    }
    None
}

/// CleverTap's `@Profile.x` personalisation: drops an `@` that starts a name, outside quotes.
fn strip_at(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '@' && chars.peek().is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') => continue,
            None => {}
        }
        out.push(c);
    }
    out
}

/// `Event.NPS Score` → `Event["NPS Score"]`: an output's variable whose last name has spaces. Only where the
/// expression is nothing but names, dots and spaces (in an output nothing else may follow a variable).
fn spaced_name(base: &str) -> Option<String> {
    let b = base.trim();
    let space = b.find(' ')?;
    if !b.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == ' ' || c == '-') {
        return None;
    }
    let head = &b[..space];
    let dot = head.rfind('.')?;
    let key = format!("{}{}", &head[dot + 1..], &b[space..]);
    if key.contains('.') || head[..dot].is_empty() {
        return None;
    }
    Some(format!("{}[\"{}\"]", &head[..dot], key))
}

/// Words that end an operand in a condition.
const OPERATORS: [&str; 10] = ["==", "!=", "<>", "<", ">", "<=", ">=", "contains", "and", "or"];

/// Spaced names inside a tag: each operand of an `if`, `elsif`, `unless`, `case` or `when` condition, and the value
/// of an `assign` (up to its first filter), that is nothing but names, dots and spaces is read as in an output
/// (`{% if Event.NPS Score > 8 %}`). A key that itself contains an operator word (`and`, `or`, `contains`) cannot
/// be told from the operator; bracket it (`Event["Salt and Pepper"]`).
fn spaced_names_in_tag(inner: &str) -> Option<String> {
    let name = tag_name(inner);
    let start = inner.find(name)? + name.len();
    let expr_from = match name {
        "if" | "elsif" | "unless" | "case" | "when" => start,
        "assign" => start + inner[start..].find('=')? + 1,
        _ => return None,
    };
    let expr_to = match name {
        "assign" => first_pipe(&inner[expr_from..]).map_or(inner.len(), |p| expr_from + p),
        // A trailing `-` (whitespace control) is not part of the last operand.
        _ => inner.trim_end().strip_suffix('-').map_or(inner.len(), str::len),
    };
    // Operands: runs of words between operators (and `when`'s commas), as byte ranges of `inner`.
    let mut operands: Vec<(usize, usize)> = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for (from, to) in words(&inner[expr_from..expr_to]) {
        let (from, to) = (expr_from + from, expr_from + to);
        let word = &inner[from..to];
        if OPERATORS.contains(&word) || word == "," {
            operands.extend(current.take());
        } else {
            current = Some(current.map_or((from, to), |(f, _)| (f, to)));
        }
    }
    operands.extend(current);
    let mut out = String::with_capacity(inner.len() + 8);
    let mut at = 0;
    let mut changed = false;
    for (from, to) in operands {
        if let Some(named) = spaced_name(&inner[from..to]) {
            out.push_str(&inner[at..from]);
            out.push_str(&named);
            at = to;
            changed = true;
        }
    }
    out.push_str(&inner[at..]);
    changed.then_some(out)
}

/// Byte ranges of the whitespace-separated words of `s`, a quoted string being one word.
fn words(s: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c.is_whitespace() => {
                if let Some(f) = start.take() {
                    out.push((f, i));
                }
                continue;
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            None => {}
        }
        start.get_or_insert(i);
    }
    if let Some(f) = start {
        out.push((f, s.len()));
    }
    out
}

/// Ends every output (outside `capture`) with `__out`, marks outputs with filters with `{% __at N %}`, and
/// applies CleverTap's spellings. `N` is the output's offset in `text`; in a partial (`partial`) it is unknown.
pub fn rewrite(text: &str, partial: bool) -> Result<String, (usize, String)> {
    let locals = if partial { None } else { local_names(text) };
    let mut out = String::with_capacity(text.len() + text.len() / 4 + 16);
    let mut i = 0;
    let mut capture_depth = 0usize;
    // `ifchanged` renders into a buffer of its own: outputs there go through liquid's writer (no `__var`).
    let mut buffered_depth = 0usize;
    while let Some(start) = next_open(text, i) {
        out.push_str(&text[i..start]);
        let at = if partial { u32::MAX } else { u32::try_from(start).unwrap_or(u32::MAX) };
        if text[start..].starts_with("{%") {
            let end = markup_end(text, start + 2, "%}").ok_or((start, "a `{%` without its `%}`".to_string()))?;
            let inner = &text[start + 2..end - 2];
            match tag_name(inner) {
                name @ ("raw" | "comment") => {
                    let close = block_end(text, end, &format!("end{name}"))
                        .ok_or((start, format!("a `{{% {name} %}}` without its `{{% end{name} %}}`")))?;
                    out.push_str(&text[start..close]);
                    i = close;
                    continue;
                }
                "capture" => capture_depth += 1,
                "endcapture" => capture_depth = capture_depth.saturating_sub(1),
                "ifchanged" => buffered_depth += 1,
                "endifchanged" => buffered_depth = buffered_depth.saturating_sub(1),
                _ => {}
            }
            let inner = strip_at(inner);
            out.push_str("{%");
            out.push_str(spaced_names_in_tag(&inner).as_deref().unwrap_or(&inner));
            out.push_str("%}");
            i = end;
        } else {
            let end = markup_end(text, start + 2, "}}").ok_or((start, "a `{{` without its `}}`".to_string()))?;
            let inner = &text[start + 2..end - 2];
            let ltrim = inner.starts_with('-');
            let rtrim = inner.len() > 1 && inner.ends_with('-');
            let body = &inner[usize::from(ltrim)..inner.len() - usize::from(rtrim)];
            let mut body = strip_at(body);
            let pipe = first_pipe(&body);
            if let Some(named) = spaced_name(&body[..pipe.unwrap_or(body.len())]) {
                body = format!("{named} {}", &body[pipe.unwrap_or(body.len())..]);
            }
            let global_path = plain_global_path(body.trim(), locals.as_ref()).filter(|_| buffered_depth == 0);
            if body.trim().is_empty() || capture_depth > 0 {
                out.push_str(&text[start..start + 2 + usize::from(ltrim)]);
                out.push_str(&body);
                out.push_str(&text[end - 2 - usize::from(rtrim)..end]);
            } else if let Some(path) = global_path {
                out.push_str(if ltrim { "{%- __var " } else { "{% __var " });
                out.push_str(&at.to_string());
                out.push(' ');
                out.push_str(path);
                out.push_str(if rtrim { " -%}" } else { " %}" });
            } else {
                if pipe.is_some() {
                    out.push_str(if ltrim { "{%- __at " } else { "{% __at " });
                    out.push_str(&at.to_string());
                    out.push_str(" %}");
                }
                out.push_str(if ltrim { "{{-" } else { "{{" });
                out.push_str(&body);
                out.push_str(" | __out: ");
                out.push_str(&at.to_string());
                out.push_str(if rtrim { " -}}" } else { " }}" });
            }
            i = end;
        }
    }
    out.push_str(&text[i..]);
    Ok(out)
}

/// Names a template binds itself (`assign`, `capture`, loop variables, `increment`), which shadow the globals;
/// `None` when it includes partials, which may bind any name.
fn local_names(text: &str) -> Option<std::collections::HashSet<String>> {
    let mut names: std::collections::HashSet<String> =
        ["forloop", "tablerowloop"].into_iter().map(str::to_owned).collect();
    let mut i = 0;
    while let Some(at) = text[i..].find("{%").map(|a| a + i) {
        let end = markup_end(text, at + 2, "%}").unwrap_or(text.len());
        let inner = text[at + 2..end.saturating_sub(2).max(at + 2)].trim_matches('-').trim();
        let mut words = inner.split_whitespace();
        match words.next() {
            Some("include" | "render") => return None,
            Some("assign" | "capture" | "for" | "increment" | "decrement" | "tablerow") => {
                if let Some(w) = words.next() {
                    let name: String =
                        w.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-').collect();
                    names.insert(name);
                }
            }
            _ => {}
        }
        i = end;
    }
    Some(names)
}

/// `Event`, `Profile.Email`: a dotted path of names whose root is a global variable (not bound by the template,
/// not a literal), so `{% __var %}` may read it in place.
fn plain_global_path<'a>(expr: &'a str, locals: Option<&std::collections::HashSet<String>>) -> Option<&'a str> {
    let locals = locals?;
    let ident = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let root = expr.split('.').next()?;
    if !expr.split('.').all(ident)
        || locals.contains(root)
        || matches!(root, "nil" | "null" | "true" | "false" | "empty" | "blank")
    {
        return None;
    }
    Some(expr)
}

// ---- JSON template → document ------------------------------------------------------------------------------------

fn has_liquid(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// `{{ expr }}` (with optional `-` trim markers) and nothing else → `expr`.
pub fn single_expression(text: &str) -> Option<&str> {
    let t = text.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.trim().is_empty() {
        return None;
    }
    Some(inner.trim())
}

/// Writes a leaf's Liquid out of its JSON string: markup as it is, the text between JSON-escaped.
fn leaf_source(leaf: &str, out: &mut String) {
    if let Some(expr) = single_expression(leaf) {
        out.push_str("\"{{ ");
        out.push_str(expr);
        out.push_str(" }}\"");
        return;
    }
    out.push('"');
    let mut i = 0;
    while let Some(start) = next_open(leaf, i) {
        output::escape_into(&leaf[i..start], out);
        let close = if leaf[start..].starts_with("{%") { "%}" } else { "}}" };
        let end = markup_end(leaf, start + 2, close).unwrap_or(leaf.len());
        let inner = &leaf[start..end];
        out.push_str(inner);
        i = end;
    }
    output::escape_into(&leaf[i..], out);
    out.push('"');
}

#[derive(Debug)]
struct Frame {
    object: bool,
    key: Option<String>,
    index: usize,
}

fn path_of(stack: &[Frame]) -> String {
    let mut p = String::new();
    for f in stack {
        if f.object {
            if let Some(k) = &f.key {
                if !p.is_empty() {
                    p.push('.');
                }
                p.push_str(k);
            }
        } else {
            p.push_str(&format!("[{}]", f.index));
        }
    }
    p
}

/// A JSON template (valid JSON) as a document: string values holding Liquid become Liquid in a string literal;
/// keys, comments (root keys starting with `_`) and plain strings stay as they are. Range loops are checked per
/// leaf. Returns the document and where each leaf is in it.
pub fn json_to_document(text: &str, limits: &LoadLimits) -> Result<(String, Vec<LeafSpan>), (usize, String)> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let mut leaves = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let token = &text[i..=j.min(b.len() - 1)];
                let decoded: String = serde_json::from_str(token).map_err(|e| (i, format!("not valid JSON: {e}")))?;
                let in_comment = stack.first().and_then(|f| f.key.as_deref()).is_some_and(|k| k.starts_with('_'));
                if expect_key {
                    if let Some(f) = stack.last_mut() {
                        f.key = Some(decoded.clone());
                    }
                    push_verbatim(token, &decoded, &mut out);
                } else if in_comment || !has_liquid(&decoded) {
                    push_verbatim(token, &decoded, &mut out);
                } else {
                    let path = path_of(&stack);
                    bounds::check_loops(&decoded, limits).map_err(|m| (i, format!("leaf {path}: {m}")))?;
                    let start = out.len();
                    leaf_source(&decoded, &mut out);
                    leaves.push(LeafSpan { start, end: out.len(), path });
                }
                i = j + 1;
                continue;
            }
            b'{' => {
                stack.push(Frame { object: true, key: None, index: 0 });
                expect_key = true;
            }
            b'[' => {
                stack.push(Frame { object: false, key: None, index: 0 });
                expect_key = false;
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => {
                if let Some(f) = stack.last_mut() {
                    f.index += 1;
                    expect_key = f.object;
                }
            }
            b':' => expect_key = false,
            _ => {}
        }
        // Copy runs of structure and scalars in one go, up to the next string.
        let next = text[i + 1..].find(['"', '{', '}', '[', ']', ',', ':']).map_or(b.len(), |n| i + 1 + n);
        out.push_str(&text[i..next]);
        i = next;
    }
    Ok((out, leaves))
}

fn push_verbatim(token: &str, decoded: &str, out: &mut String) {
    if has_liquid(decoded) || has_liquid(token) {
        out.push_str("{% raw %}");
        out.push_str(token);
        out.push_str("{% endraw %}");
    } else {
        out.push_str(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_end_in_the_escaping_filter_and_captures_do_not() {
        let r = rewrite(r#"{"a": "{{ x }}", "b": {{- y | plus: 1 -}}}{% capture c %}{{ z }}{% endcapture %}"#, false)
            .unwrap();
        assert!(r.contains(r#""{% __var 7 x %}""#), "a global read in place: {r}");
        assert!(r.contains("{%- __at 22 %}{{- y | plus: 1  | __out: 22 -}}"), "{r}");
        assert!(r.contains("{% capture c %}{{ z }}{% endcapture %}"), "{r}");
    }

    #[test]
    fn clevertap_spellings_are_rewritten() {
        let r = rewrite("{{ @Profile.city }} {{ Event.NPS Score | default: 0 }} {{ 'a@b' }}", false).unwrap();
        assert!(r.contains("{% __var 0 Profile.city %}"), "{r}");
        assert!(r.contains(r#"Event["NPS Score"] | default: 0"#), "{r}");
        assert!(r.contains("'a@b'"), "{r}");
    }

    #[test]
    fn spaced_names_are_read_in_conditions_and_assignments_too() {
        let r = rewrite(
            "{% if Event.NPS Score >= 9 and Profile.Plan Type == 'gold' %}p{% elsif Event.NPS Score %}n{% endif %}\
             {%- assign s = Event.NPS Score | plus: 1 -%}{% case Profile.Plan Type %}{% when 'a', 'b' %}{% endcase %}\
             {% if x == 'a b' %}{% endif %}{% unless Event.Salt and Pepper %}{% endunless %}",
            false,
        )
        .unwrap();
        assert!(r.contains(r#"{% if Event["NPS Score"] >= 9 and Profile["Plan Type"] == 'gold' %}"#), "{r}");
        assert!(r.contains(r#"{% elsif Event["NPS Score"] %}"#), "{r}");
        assert!(r.contains(r#"{%- assign s = Event["NPS Score"] | plus: 1 -%}"#), "{r}");
        assert!(r.contains(r#"{% case Profile["Plan Type"] %}{% when 'a', 'b' %}"#), "{r}");
        assert!(r.contains("{% if x == 'a b' %}"), "quoted text is left alone: {r}");
        assert!(r.contains("{% unless Event.Salt and Pepper %}"), "an operator word splits the name: {r}");
    }

    #[test]
    fn names_the_template_binds_and_partials_keep_outputs_in_liquid() {
        let r = rewrite("{% assign x = 1 %}{% for i in l %}{{ i }}{{ x }}{{ y }}{% endfor %}", false).unwrap();
        assert!(r.contains("{{ i  | __out:") && r.contains("{{ x  | __out:") && r.contains("{% __var"), "{r}");
        let r = rewrite("{% include 'p' %}{{ y }}", false).unwrap();
        assert!(!r.contains("__var"), "{r}");
    }

    #[test]
    fn raw_blocks_are_left_alone() {
        let r = rewrite("{% raw %}{{ x }}{% endraw %}", false).unwrap();
        assert_eq!(r, "{% raw %}{{ x }}{% endraw %}");
    }

    #[test]
    fn a_json_template_becomes_a_document_with_its_leaves_named() {
        let (doc, leaves) = json_to_document(
            r#"{"_c": "{{ not liquid }}", "event": "Buy {{ x | default: \"a\\\"b\" }}", "n": 1, "p": {"q": "{{ y }}"}}"#,
            &LoadLimits::default(),
        )
        .unwrap();
        assert!(doc.contains(r#"{% raw %}"{{ not liquid }}"{% endraw %}"#), "{doc}");
        assert!(doc.contains(r#""Buy {{ x | default: "a\"b" }}""#), "{doc}");
        assert!(doc.contains(r#""q": "{{ y }}""#), "{doc}");
        let paths: Vec<_> = leaves.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["event", "p.q"]);
    }
}
