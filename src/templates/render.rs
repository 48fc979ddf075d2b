//! Bounds on one render, the render error type, and the relay's `json` filter.
//!
//! How a template renders is in `document` (one Liquid document per template) and `output` (contextual JSON
//! escaping of every output). Leaf rules, for both kinds of template:
//! - a string value that is exactly one `{{ expression }}` keeps the JSON type of its value;
//! - anything else in a string renders to a string;
//! - a value that renders to nothing (nil, or an empty or blank string) is left out, with its key;
//! - a key starting with `...` merges the object its value renders to into the enclosing object.

use liquid_core::model::{ScalarCow, Value as LiquidValue};
use liquid_core::{Display_filter, Filter, FilterReflection, ParseFilter, Runtime, ValueView};
use serde_json::Value;
use std::io::Write;

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
#[error("{path}: {message}")]
pub struct LeafError {
    pub path: String,
    pub message: String,
}

/// The parser of a source without partials: liquid's standard library with the relay's dialect (see `dialect`).
pub fn parser() -> Result<liquid::Parser, liquid::Error> {
    super::dialect::parser(&[])
}

/// Bytes `v` takes as JSON text, counted without building the text (leaf and event size limits).
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
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
