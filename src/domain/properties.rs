//! Heap properties: a flat map of string keys to string, number or boolean values.
//!
//! Heap accepts only scalar values, so nested objects become dotted keys (`shipping.address.city`), arrays become
//! their JSON text (`["shoes","bags"]`), and nulls are left out (Heap drops them). Keys longer than Heap's limit are
//! refused, naming the key; string values longer than the limit are truncated, as Heap does with arrays.

use super::FieldError;
use super::identity::json_type;
use serde::Serialize;
use serde_json::{Map, Value};

/// Heap: keys and values are "a number or string with fewer than 1024 characters".
pub const MAX_KEY_CHARS: usize = 1023;
pub const MAX_VALUE_CHARS: usize = 1023;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyLimits {
    /// Most properties one event or user may carry after flattening.
    pub max_count: usize,
    pub max_key_chars: usize,
    pub max_value_chars: usize,
}

impl Default for PropertyLimits {
    fn default() -> Self {
        Self { max_count: 1000, max_key_chars: MAX_KEY_CHARS, max_value_chars: MAX_VALUE_CHARS }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Properties(Map<String, Value>);

impl Properties {
    /// Flattens `raw` (an object, or null for none) into Heap's shape. `field` names the input in errors.
    pub fn flatten(raw: &Value, limits: &PropertyLimits) -> Result<Self, FieldError> {
        let mut out = Map::new();
        match raw {
            Value::Null => {}
            Value::Object(obj) => {
                for (k, v) in obj {
                    flatten_into(&mut out, k, v, limits)?;
                }
            }
            other => {
                return Err(FieldError::invalid(
                    "properties",
                    format!("properties must be an object, got {}", json_type(other)),
                ));
            }
        }
        if out.len() > limits.max_count {
            return Err(FieldError::new(
                "properties",
                "too_many",
                format!("{} properties after flattening; the limit is {}", out.len(), limits.max_count),
            ));
        }
        Ok(Self(out))
    }

    /// User properties follow two more Heap rules: `id` (any casing) clashes with Heap's internals and is left out,
    /// and `email` in any casing is written lower-case so that it fills Heap's built-in Email property.
    pub fn for_user(mut self) -> Self {
        let keys: Vec<String> = self.0.keys().cloned().collect();
        for k in keys {
            if k.eq_ignore_ascii_case("id") {
                self.0.remove(&k);
            } else if k.eq_ignore_ascii_case("email")
                && k != "email"
                && let Some(v) = self.0.remove(&k)
            {
                self.0.entry("email").or_insert(v);
            }
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }
}

fn flatten_into(out: &mut Map<String, Value>, key: &str, v: &Value, limits: &PropertyLimits) -> Result<(), FieldError> {
    match v {
        Value::Null => Ok(()),
        Value::Object(obj) => {
            for (k, child) in obj {
                flatten_into(out, &format!("{key}.{k}"), child, limits)?;
            }
            Ok(())
        }
        scalar => {
            if key.trim().is_empty() {
                return Err(FieldError::invalid("properties", "a property key is empty"));
            }
            // No more bytes than the limit: no more characters either, without counting them.
            let key_chars = if key.len() <= limits.max_key_chars { key.len() } else { key.chars().count() };
            if key_chars > limits.max_key_chars {
                return Err(FieldError::new(
                    format!("properties.{}", super::app_id::truncate_for_message(key)),
                    "too_long",
                    format!("property key is {key_chars} characters; Heap allows at most {}", limits.max_key_chars),
                ));
            }
            let value = match scalar {
                Value::String(s) => Value::String(truncate_chars(s, limits.max_value_chars)),
                Value::Array(_) => Value::String(truncate_chars(&scalar.to_string(), limits.max_value_chars)),
                other => other.clone(),
            };
            out.insert(key.to_owned(), value);
            Ok(())
        }
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    match s.char_indices().nth(max) {
        Some((byte_end, _)) => s[..byte_end].to_owned(),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value) -> Map<String, Value> {
        Properties::flatten(&v, &PropertyLimits::default()).unwrap().0
    }

    #[test]
    fn nested_objects_become_dotted_keys_and_scalars_keep_their_types() {
        let out = flat(json!({"foo": {"bar": {"cheese": "yes"}}, "n": 1.5, "b": true, "s": "x"}));
        assert_eq!(Value::Object(out), json!({"foo.bar.cheese": "yes", "n": 1.5, "b": true, "s": "x"}));
    }

    #[test]
    fn arrays_become_json_text_and_nulls_are_dropped() {
        let out = flat(json!({"tags": ["a", "b"], "gone": null, "objs": [{"a": 1}]}));
        assert_eq!(Value::Object(out), json!({"tags": "[\"a\",\"b\"]", "objs": "[{\"a\":1}]"}));
    }

    #[test]
    fn long_values_are_truncated_on_a_character_boundary_and_long_keys_refused() {
        let out = flat(json!({"v": "é".repeat(2000)}));
        assert_eq!(out["v"].as_str().unwrap().chars().count(), MAX_VALUE_CHARS);
        let err = Properties::flatten(&json!({"k".repeat(1024): 1}), &PropertyLimits::default()).unwrap_err();
        assert_eq!(err.code, "too_long");
        assert!(err.field.starts_with("properties.kkk"));
    }

    #[test]
    fn too_many_properties_are_refused_and_non_objects_named() {
        let limits = PropertyLimits { max_count: 2, ..Default::default() };
        assert_eq!(Properties::flatten(&json!({"a": 1, "b": {"c": 1, "d": 2}}), &limits).unwrap_err().code, "too_many");
        assert_eq!(Properties::flatten(&json!([1]), &limits).unwrap_err().field, "properties");
    }

    #[test]
    fn user_properties_drop_id_and_lowercase_email() {
        let p = Properties::flatten(&json!({"ID": 7, "Email": "a@b.co", "plan": "pro"}), &PropertyLimits::default())
            .unwrap()
            .for_user();
        assert_eq!(Value::Object(p.0), json!({"email": "a@b.co", "plan": "pro"}));
    }
}
