//! Strict JSON for request bodies: what serde_json accepts, minus what a hostile sender could use to confuse or
//! exhaust the relay, each refused with its own error naming the problem.
//!
//! Two passes. `scan` walks the bytes once, iteratively (so 10,000 nested brackets cost nothing and never reach
//! serde_json's recursion limit), and refuses invalid UTF-8, NUL characters (raw or `\u0000`), lone UTF-16
//! surrogates in `\u` escapes, nesting deeper than the limit and numbers beyond u64/i64/f64. Then serde_json
//! builds the value through a visitor that refuses duplicate keys (serde_json would silently keep the last one),
//! naming the key with its path. Whatever serde_json still refuses is a syntax error with line and column.

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::cell::RefCell;
use std::fmt;

/// serde_json's own recursion limit; a deeper setting could never be reached.
pub const SERDE_DEPTH_LIMIT: usize = 127;

/// Bounds a body must meet before it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Most nested arrays and objects (`[[1]]` is 2).
    pub max_depth: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self { max_depth: 64 }
    }
}

/// Why a body is not acceptable JSON. Every variant is the client's fault (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("the body is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("{what} at line {line}, column {column}: NUL characters are not accepted")]
    Nul { what: &'static str, line: usize, column: usize },
    #[error("lone surrogate {escape} at line {line}, column {column}: a \\u escape must encode valid Unicode")]
    LoneSurrogate { escape: String, line: usize, column: usize },
    #[error("nesting deeper than {limit} levels at line {line}, column {column} (limits.max_json_depth)")]
    TooDeep { limit: usize, line: usize, column: usize },
    #[error("number {number} at line {line}, column {column} is out of range (beyond {range})")]
    NumberOutOfRange { number: String, range: &'static str, line: usize, column: usize },
    #[error("duplicate key {key:?} at {path}: each key may appear once in an object")]
    DuplicateKey { key: String, path: String },
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Syntax { line: usize, column: usize, message: String },
}

impl JsonError {
    /// The field to name in the error body: the duplicate key's path, or the body.
    pub fn field(&self) -> String {
        match self {
            JsonError::DuplicateKey { path, .. } => path.clone(),
            _ => "body".into(),
        }
    }
}

/// Parses a request body under `limits`.
pub fn parse(body: &[u8], limits: &JsonLimits) -> Result<Value, JsonError> {
    // A leading UTF-8 byte-order mark (some Windows tools write one) is not part of the document.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|e| JsonError::InvalidUtf8 { offset: e.valid_up_to() })?;
    scan(text.as_bytes(), limits)?;
    let state = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_str(text);
    let result = StrictValue { path: &state }.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            let message = e.to_string();
            if let Some(key) = message.strip_prefix(DUPLICATE_MARK).and_then(|m| m.split(" at line ").next()) {
                let mut path = state.into_inner();
                path.reverse();
                return Err(JsonError::DuplicateKey { key: key.to_owned(), path: render_path(&path, key) });
            }
            Err(JsonError::Syntax {
                line: e.line(),
                column: e.column(),
                message: message.split(" at line ").next().unwrap_or_default().to_owned(),
            })
        }
    }
}

const DUPLICATE_MARK: &str = "\u{1}duplicate:";

fn line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

/// One pass over the bytes: depth, NULs, surrogates and number ranges. Syntax is left to serde_json.
fn scan(bytes: &[u8], limits: &JsonLimits) -> Result<(), JsonError> {
    let at = |i: usize| line_column(bytes, i);
    let max_depth = limits.max_depth.min(SERDE_DEPTH_LIMIT);
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = scan_string(bytes, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    let (line, column) = at(i);
                    return Err(JsonError::TooDeep { limit: max_depth, line, column });
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                check_number(&bytes[start..i]).map_err(|range| {
                    let (line, column) = at(start);
                    let text = String::from_utf8_lossy(&bytes[start..i]);
                    let number = if text.len() > 40 {
                        format!("{}... ({} characters)", &text[..32], text.len())
                    } else {
                        text.into()
                    };
                    JsonError::NumberOutOfRange { number, range, line, column }
                })?;
            }
            0 => {
                let (line, column) = at(i);
                return Err(JsonError::Nul { what: "a NUL byte", line, column });
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Scans a string body starting after its opening quote; returns the index after the closing quote (or the end).
fn scan_string(bytes: &[u8], mut i: usize) -> Result<usize, JsonError> {
    let at = |i: usize| line_column(bytes, i);
    while i < bytes.len() {
        // Ordinary characters are skipped a vector at a time; only these three need a look.
        match memchr::memchr3(b'"', b'\\', 0, &bytes[i..]) {
            Some(skip) => i += skip,
            None => return Ok(bytes.len()),
        }
        match bytes[i] {
            b'"' => return Ok(i + 1),
            0 => {
                let (line, column) = at(i);
                return Err(JsonError::Nul { what: "a NUL byte in a string", line, column });
            }
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let Some(unit) = hex4(bytes, i + 2) else {
                    i += 2; // serde_json reports the bad escape
                    continue;
                };
                if unit == 0 {
                    let (line, column) = at(i);
                    return Err(JsonError::Nul { what: "a \\u0000 escape", line, column });
                }
                let lone = |i: usize| {
                    let (line, column) = at(i);
                    let escape = String::from_utf8_lossy(&bytes[i..(i + 6).min(bytes.len())]).into_owned();
                    JsonError::LoneSurrogate { escape, line, column }
                };
                if (0xDC00..=0xDFFF).contains(&unit) {
                    return Err(lone(i));
                }
                if (0xD800..=0xDBFF).contains(&unit) {
                    let pair = (bytes.get(i + 6) == Some(&b'\\') && bytes.get(i + 7) == Some(&b'u'))
                        .then(|| hex4(bytes, i + 8))
                        .flatten();
                    match pair {
                        Some(low) if (0xDC00..=0xDFFF).contains(&low) => i += 12,
                        _ => return Err(lone(i)),
                    }
                    continue;
                }
                i += 6;
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

fn hex4(bytes: &[u8], from: usize) -> Option<u32> {
    let digits = bytes.get(from..from + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok().filter(|_| digits.iter().all(u8::is_ascii_hexdigit))
}

/// A number token outside strings: an integer must fit u64 (or i64 when negative), any number must fit f64.
/// Malformed tokens pass; serde_json names them.
fn check_number(token: &[u8]) -> Result<(), &'static str> {
    let Ok(text) = std::str::from_utf8(token) else {
        return Ok(());
    };
    let integer = !text.contains(['.', 'e', 'E']);
    let digits = text.trim_start_matches('-');
    if integer && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        let fits = if text.starts_with('-') { text.parse::<i64>().is_ok() } else { text.parse::<u64>().is_ok() };
        return if fits {
            Ok(())
        } else if text.starts_with('-') {
            Err("i64")
        } else {
            Err("u64")
        };
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_infinite() => Err("f64"),
        _ => Ok(()),
    }
}

enum Segment {
    Key(String),
    Index(usize),
}

fn render_path(reversed_outer_first: &[Segment], key: &str) -> String {
    let mut out = String::new();
    for s in reversed_outer_first {
        match s {
            Segment::Key(k) if out.is_empty() => out.push_str(k),
            Segment::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(key);
    out
}

/// Builds a `Value` like serde_json does, refusing duplicate keys. On an error below, each level adds its key or
/// index to `path` (innermost first), so the duplicate is named with where it is; success costs nothing extra.
struct StrictValue<'a> {
    path: &'a RefCell<Vec<Segment>>,
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        loop {
            match seq.next_element_seed(StrictValue { path: self.path }) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(Value::Array(out)),
                Err(e) => {
                    self.path.borrow_mut().push(Segment::Index(out.len()));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // One search of the map per key: the entry both refuses a duplicate and takes the value.
            let slot = match out.entry(key) {
                serde_json::map::Entry::Occupied(o) => {
                    return Err(A::Error::custom(format!("{DUPLICATE_MARK}{}", o.key())));
                }
                serde_json::map::Entry::Vacant(slot) => slot,
            };
            match map.next_value_seed(StrictValue { path: self.path }) {
                Ok(v) => {
                    slot.insert(v);
                }
                Err(e) => {
                    self.path.borrow_mut().push(Segment::Key(slot.key().clone()));
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(text: &str) -> Result<Value, JsonError> {
        parse(text.as_bytes(), &JsonLimits::default())
    }

    #[test]
    fn ordinary_json_parses_as_serde_json_would() {
        let text =
            r#"{"a": [1, -2, 3.5, 1e10, true, null, "x\"y\\", {"b": "\ud83d\ude00 é"}], "c": 18446744073709551615}"#;
        assert_eq!(p(text).unwrap(), serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(p("-9223372036854775808").unwrap(), json!(i64::MIN));
    }

    #[test]
    fn a_duplicate_key_is_refused_naming_the_key_and_its_path() {
        let err = p(r#"{"profiles": [{"identity": "a"}, {"identity": "b", "identity": "c"}]}"#).unwrap_err();
        assert_eq!(err, JsonError::DuplicateKey { key: "identity".into(), path: "profiles[1].identity".into() });
        let err = p(r#"{"a": 1, "a": 1}"#).unwrap_err();
        assert_eq!(err.field(), "a");
    }

    #[test]
    fn nesting_past_the_limit_is_refused_before_parsing_even_at_ten_thousand_levels() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(p(&deep), Err(JsonError::TooDeep { limit: 64, line: 1, column: 65 })));
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(p(&ok).is_ok());
        let limits = JsonLimits { max_depth: 500 };
        assert!(matches!(parse(deep.as_bytes(), &limits), Err(JsonError::TooDeep { limit: 127, .. })));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_nesting() {
        let text = format!("{{\"s\": \"{}\"}}", "[{".repeat(1000));
        assert!(p(&text).is_ok());
    }

    #[test]
    fn nul_characters_raw_or_escaped_are_refused() {
        assert!(matches!(p("{\"a\": \"x\\u0000\"}"), Err(JsonError::Nul { what: "a \\u0000 escape", .. })));
        assert!(matches!(p("{\"a\": \"x\0\"}"), Err(JsonError::Nul { .. })));
        assert!(matches!(p("{\"a\": 1}\0"), Err(JsonError::Nul { .. })));
        assert!(p(r#"{"a": "\\u0000"}"#).is_ok(), "an escaped backslash followed by u0000 is text");
    }

    #[test]
    fn lone_surrogates_are_refused_and_pairs_accepted() {
        assert!(matches!(p(r#"{"a": "\ud800"}"#), Err(JsonError::LoneSurrogate { .. })));
        assert!(matches!(p(r#"{"a": "\udc00x"}"#), Err(JsonError::LoneSurrogate { .. })));
        assert!(matches!(p(r#"{"a": "\ud800\u0041"}"#), Err(JsonError::LoneSurrogate { .. })));
        assert_eq!(p(r#""\ud83d\ude00""#).unwrap(), json!("😀"));
    }

    #[test]
    fn numbers_beyond_u64_i64_and_f64_are_refused() {
        for (text, range) in
            [("18446744073709551616", "u64"), ("-9223372036854775809", "i64"), ("1e400", "f64"), ("-1.5e999", "f64")]
        {
            match p(&format!("{{\"n\": {text}}}")) {
                Err(JsonError::NumberOutOfRange { range: r, .. }) => assert_eq!(r, range, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(p("{\"n\": 1e-400}").is_ok(), "underflow rounds to zero, as in f64");
    }

    #[test]
    fn invalid_utf8_is_named_with_its_offset() {
        assert_eq!(parse(b"{\"a\": \"\xff\"}", &JsonLimits::default()), Err(JsonError::InvalidUtf8 { offset: 7 }));
    }

    #[test]
    fn syntax_errors_keep_line_and_column() {
        let err = p("{\n  \"a\": 1,\n}").unwrap_err();
        assert_eq!(err, JsonError::Syntax { line: 3, column: 1, message: "trailing comma".into() });
        assert!(matches!(p(""), Err(JsonError::Syntax { .. })));
        assert!(matches!(p("{} x"), Err(JsonError::Syntax { .. })));
    }
}
