//! Values JSON allows but Heap and PostgreSQL cannot hold: a NUL character (`\u0000`) inside a string, and a lone
//! UTF-16 surrogate (`\ud800` without its pair). Refusing the whole body for one such value made senders drop good
//! events, so they are repaired before parsing: a NUL is removed, a lone surrogate becomes U+FFFD, and the answer's
//! `sanitized` list says which field changed and how. Signatures are checked on the body as sent, before this.
//!
//! One pass over the bytes that tracks the path (`batch[3].properties.note`) only when the body holds a `\u`
//! escape that needs it; every other body is returned untouched without a copy.

use serde::Serialize;

/// One repaired value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sanitized {
    pub field: String,
    /// `nul_removed` or `lone_surrogate_replaced`.
    pub change: &'static str,
}

/// Most repaired fields listed in an answer (each is still repaired).
pub const MAX_LISTED: usize = 20;

/// Nesting past this is left alone (no repair): `limits.max_json_depth` is at most 127, so the JSON parser refuses
/// such a body anyway (`json_too_deep`), and the path stack here stays bounded whatever the body holds.
const MAX_DEPTH: usize = 128;

enum Frame {
    Object { key: Option<String>, expecting_key: bool },
    Array { index: usize },
}

/// What repairing one body changed, as `serve` answers it and `render` prints it: `sanitized` (at most
/// `MAX_LISTED` values) and `sanitized_count` (all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    #[serde(rename = "sanitized")]
    pub listed: Vec<Sanitized>,
    #[serde(rename = "sanitized_count")]
    pub total: usize,
}

impl Report {
    /// Adds `sanitized` and `sanitized_count` to an answer or a printed document (a JSON object).
    pub fn add_to(&self, doc: &mut serde_json::Value) {
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("sanitized".into(), serde_json::json!(self.listed));
            obj.insert("sanitized_count".into(), serde_json::json!(self.total));
        }
    }
}

/// The body with its NULs removed and lone surrogates replaced, and what changed (None: nothing, and the body is
/// returned as it came). What every route and `heap-relay render` use.
pub fn repair(body: Vec<u8>) -> (Vec<u8>, Option<Report>) {
    match sanitize(&body) {
        Some((repaired, listed, total)) => (repaired, Some(Report { listed, total })),
        None => (body, None),
    }
}

/// The repaired body and what changed, or None when there is nothing to repair. `total` counts every change,
/// the list holds at most `MAX_LISTED`.
pub fn sanitize(body: &[u8]) -> Option<(Vec<u8>, Vec<Sanitized>, usize)> {
    if !needs_repair(body) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut listed = Vec::new();
    let mut total = 0usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'"' => {
                let is_key = matches!(stack.last(), Some(Frame::Object { expecting_key: true, .. }));
                let start = out.len();
                let mut changes: Vec<&'static str> = Vec::new();
                out.push(b'"');
                i += 1;
                while i < body.len() {
                    let c = body[i];
                    if c == b'"' {
                        out.push(c);
                        i += 1;
                        break;
                    }
                    if c != b'\\' || i + 1 >= body.len() {
                        out.push(c);
                        i += 1;
                        continue;
                    }
                    if body[i + 1] != b'u' {
                        out.extend_from_slice(&body[i..i + 2]);
                        i += 2;
                        continue;
                    }
                    match hex4(body, i + 2) {
                        Some(0) => {
                            changes.push("nul_removed");
                            i += 6;
                        }
                        Some(hi @ 0xD800..=0xDBFF) => {
                            let lo = (body.get(i + 6) == Some(&b'\\') && body.get(i + 7) == Some(&b'u'))
                                .then(|| hex4(body, i + 8))
                                .flatten();
                            if matches!(lo, Some(0xDC00..=0xDFFF)) {
                                out.extend_from_slice(&body[i..i + 12]);
                                i += 12;
                            } else {
                                let _ = hi;
                                changes.push("lone_surrogate_replaced");
                                out.extend_from_slice(b"\\ufffd");
                                i += 6;
                            }
                        }
                        Some(0xDC00..=0xDFFF) => {
                            changes.push("lone_surrogate_replaced");
                            out.extend_from_slice(b"\\ufffd");
                            i += 6;
                        }
                        _ => {
                            out.extend_from_slice(&body[i..i + 2]);
                            i += 2;
                        }
                    }
                }
                // Built only where it is used: an object's key, or a string that changed.
                let text = if is_key || !changes.is_empty() {
                    String::from_utf8_lossy(&out[start + 1..out.len().saturating_sub(1)]).into_owned()
                } else {
                    String::new()
                };
                if !changes.is_empty() {
                    total += changes.len();
                    if listed.len() >= MAX_LISTED {
                        // Counted, not listed: no path is built for it.
                        if let (true, Some(Frame::Object { key, .. })) = (is_key, stack.last_mut()) {
                            *key = Some(text);
                        }
                        continue;
                    }
                    let field = if is_key { join(&path(&stack), &text) } else { path(&stack) };
                    for change in changes {
                        if listed.len() < MAX_LISTED
                            && !listed.iter().any(|s: &Sanitized| s.field == field && s.change == change)
                        {
                            listed.push(Sanitized { field: field.clone(), change });
                        }
                    }
                }
                if let (true, Some(Frame::Object { key, .. })) = (is_key, stack.last_mut()) {
                    *key = Some(text);
                }
                continue;
            }
            b'{' | b'[' if stack.len() >= MAX_DEPTH => return None,
            b'{' => stack.push(Frame::Object { key: None, expecting_key: true }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { expecting_key, .. }) => *expecting_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            b':' => {
                if let Some(Frame::Object { expecting_key, .. }) = stack.last_mut() {
                    *expecting_key = false;
                }
            }
            _ => {}
        }
        out.push(b);
        i += 1;
    }
    Some((out, listed, total))
}

/// A `\u0000` or a `\uD800`-`\uDFFF` escape anywhere (a cheap look before the full pass).
fn needs_repair(body: &[u8]) -> bool {
    body.windows(6).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && (w[2..] == *b"0000" || (w[2] | 0x20 == b'd' && matches!(w[3] | 0x20, b'8' | b'9' | b'a'..=b'f')))
    })
}

fn hex4(body: &[u8], at: usize) -> Option<u32> {
    let digits = body.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() { key.to_owned() } else { format!("{base}.{key}") }
}

fn path(stack: &[Frame]) -> String {
    let mut p = String::new();
    for f in stack {
        match f {
            Frame::Object { key: Some(k), .. } => p = join(&p, k),
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => p.push_str(&format!("[{index}]")),
        }
    }
    if p.is_empty() { "body".into() } else { p }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &str) -> (String, Vec<(String, &'static str)>) {
        let (out, list, _) = sanitize(body.as_bytes()).expect("something to repair");
        (String::from_utf8(out).unwrap(), list.into_iter().map(|s| (s.field, s.change)).collect())
    }

    #[test]
    fn a_nul_is_removed_and_its_field_named() {
        let (out, list) = run(r#"{"batch":[{"a":1},{"properties":{"note":"a\u0000b","x":"\\u0000"}}]}"#);
        assert_eq!(out, r#"{"batch":[{"a":1},{"properties":{"note":"ab","x":"\\u0000"}}]}"#);
        assert_eq!(list, vec![("batch[1].properties.note".to_owned(), "nul_removed")]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["batch"][1]["properties"]["note"], "ab");
    }

    #[test]
    fn nesting_past_any_allowed_depth_is_left_to_the_parser_and_changes_past_the_list_are_counted() {
        let deep = format!("{}\"a\\u0000b\"{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(sanitize(deep.as_bytes()).is_none(), "the parser refuses it as json_too_deep");
        let many: Vec<String> = (0..50).map(|i| format!("\"k{i}\":\"a\\u0000\"")).collect();
        let body = format!("{{{}}}", many.join(","));
        let (out, listed, total) = sanitize(body.as_bytes()).expect("repaired");
        assert_eq!((listed.len(), total), (MAX_LISTED, 50));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["k49"], "a", "keys after the listed ones are still tracked");
    }

    #[test]
    fn lone_surrogates_become_the_replacement_character_and_pairs_stay() {
        let (out, list) = run(r#"{"a":"x\ud800y","b":"\ud83d\ude00","c":["\uDC00"]}"#);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["a"], "x\u{fffd}y");
        assert_eq!(v["b"], "\u{1f600}");
        assert_eq!(v["c"][0], "\u{fffd}");
        assert_eq!(
            list,
            vec![("a".to_owned(), "lone_surrogate_replaced"), ("c[0]".to_owned(), "lone_surrogate_replaced")]
        );
    }

    #[test]
    fn a_body_without_such_escapes_is_not_copied() {
        assert!(sanitize(br#"{"a":"plain","b":"\u00e9"}"#).is_none());
    }
}
