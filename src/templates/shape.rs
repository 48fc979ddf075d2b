//! From a rendered template to Heap calls: root comments (`_` keys) out, empty values out, `...` keys merged,
//! sections (`track`, `add_user_properties`) chosen by their `when`.

use super::Draft;
use crate::domain::CallKind;
use serde_json::{Map, Value};

/// From a rendered document to Heap calls: comments out, empty values out, `...` keys merged, sections chosen.
pub(super) fn shape(value: Value) -> Result<Vec<Draft>, String> {
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
    // In key order, a later key wins. The first object met is kept whole rather than copied key by key (a
    // template's `"...event_properties": "{{ Event }}"` is usually most of the properties).
    let mut out: Option<Map<String, Value>> = None;
    for (k, v) in m {
        if k.starts_with("...") {
            match (clean(v)?, &mut out) {
                (Value::Object(inner), None) => out = Some(inner),
                (Value::Object(inner), Some(o)) => o.extend(inner),
                (other, _) => return Err(format!("a `...` key must render to an object, got {other}")),
            }
        } else {
            out.get_or_insert_with(Map::new).insert(k, clean(v)?);
        }
    }
    Ok(out.unwrap_or_default())
}
