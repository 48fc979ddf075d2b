//! Heap's own bodies, for the Heap-compatible routes (`/api/track`, `/api/add_user_properties`): single and bulk.
//! An existing integration switches its base URL to the relay and gains validation, durability and retries.

use super::get_ci;
use crate::domain::FieldError;
use crate::domain::heap_call::CallKind;
use serde_json::{Map, Value};

/// The item bodies of a Heap call, each with `app_id` filled in from the bulk body's top level.
pub fn items(kind: CallKind, body: &Value) -> Result<Vec<Result<Map<String, Value>, FieldError>>, FieldError> {
    let Value::Object(root) = body else {
        return Err(FieldError::invalid("body", "a Heap API body must be a JSON object"));
    };
    let bulk_key = kind.bulk_field();
    let Some(list) = root.get(bulk_key) else {
        return Ok(vec![Ok(root.clone())]);
    };
    let Value::Array(list) = list else {
        return Err(FieldError::invalid(bulk_key, format!("{bulk_key} must be an array")));
    };
    if let Some(extra) = root.keys().find(|k| *k != bulk_key && *k != "app_id") {
        return Err(FieldError::new(
            extra.clone(),
            "unknown_field",
            format!("unknown field {extra:?} in a bulk body; expected app_id and {bulk_key}"),
        ));
    }
    let app_id = get_ci(root, "app_id").cloned();
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(o) => {
                let mut o = o.clone();
                if let Some(a) = &app_id {
                    if o.contains_key("app_id") {
                        return Err(FieldError::invalid(
                            format!("{bulk_key}[{i}].app_id"),
                            "app_id belongs at the top of a bulk body, once",
                        ));
                    }
                    o.insert("app_id".into(), a.clone());
                }
                Ok(o)
            }
            _ => Err(FieldError::invalid(format!("{bulk_key}[{i}]"), "each item must be a JSON object")),
        })
        .collect())
}
