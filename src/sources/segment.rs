//! Segment-spec messages (Customer.io Data Pipelines, Astronomer Clickstream, RudderStack, Jitsu): one message,
//! `{"batch": [...]}` (batch-level `context` is merged under each message's own), or a bare array.
//!
//! The context is the message as sent, plus what the peers' Heap mappings derive:
//! - `userId`: also read from Astronomer's `userID` spelling;
//! - `identity`: `userId`, else `anonymousId` (unless anonymous messages are refused by configuration);
//! - `heap_event`: the event name for track; `Page viewed` / `Screen viewed` for page and screen;
//! - `heap_properties`: `properties`, plus `name` and `category` of a page or screen;
//! - `heap_traits`: `traits` (else `context.traits`) plus `anonymous_id`, for identify; absent when that is empty,
//!   so an identify with nothing to set sends nothing (`ignored`) instead of being rejected.

use super::{Item, Shape, SourceOptions, as_list, get_ci};
use crate::domain::FieldError;
use crate::templates::context::{Ctx, CtxObject};
use serde_json::{Map, Value};

pub fn for_each(
    body: &Value,
    options: &SourceOptions,
    f: &mut dyn FnMut(Result<Item, FieldError>),
) -> Result<Shape, FieldError> {
    let (messages, batch_context) = match body {
        Value::Object(o) if get_ci(o, "batch").is_some() => {
            let Some(list) = as_list(body, "batch") else {
                return Err(FieldError::invalid("batch", "batch must be an array of messages"));
            };
            (list, get_ci(o, "context").and_then(Value::as_object))
        }
        Value::Object(_) => (vec![body], None),
        Value::Array(a) => (a.iter().collect(), None),
        _ => {
            return Err(FieldError::invalid(
                "body",
                "a Segment-spec body must be a message, {\"batch\": [...]} or an array",
            ));
        }
    };
    let prefix = match body {
        Value::Object(o) if get_ci(o, "batch").is_some() => "batch",
        Value::Array(_) => "",
        _ => {
            f(message_item(body, None, options));
            return Ok(Shape::Items);
        }
    };
    // The batch context becomes template values once; each message gets a copy as it is built (one at a time).
    let batch = batch_context.map(|bc| (bc, CtxObject::from_json(bc)));
    for (i, m) in messages.into_iter().enumerate() {
        let b = batch.as_ref().map(|(v, c)| (*v, c));
        f(message_item(m, b, options).map_err(|e| e.under(&format!("{prefix}[{i}]"))));
    }
    Ok(Shape::Items)
}

fn message_item(
    msg: &Value,
    batch_context: Option<(&Map<String, Value>, &CtxObject)>,
    options: &SourceOptions,
) -> Result<Item, FieldError> {
    let Value::Object(m) = msg else {
        return Err(FieldError::invalid("", "each message must be a JSON object"));
    };
    let kind = match get_ci(m, "type") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.trim().to_ascii_lowercase(),
        _ => {
            return Err(FieldError::missing(
                "type",
                "a Segment-spec message needs `type` (track, page, screen, identify, ...)",
            ));
        }
    };
    let merged = m;
    let user_id = ["userId", "userID", "user_id"].iter().find_map(|k| non_empty(merged.get(*k)));
    let anonymous_id = non_empty(get_ci(merged, "anonymousId"));
    let identity = user_id.clone().or_else(|| anonymous_id.clone().filter(|_| options.allow_anonymous));

    let mut ctx = CtxObject::from_json(merged);
    if let Some((_, bc)) = batch_context {
        // The message's own context keys win over the batch's.
        let mut context = bc.clone();
        if let Some(Value::Object(own)) = merged.get("context") {
            for (k, v) in own {
                context.insert(k.clone(), Ctx::from_json(v));
            }
        }
        ctx.insert("context", Ctx::Object(context));
    }
    ctx.insert("type", Ctx::str(kind.clone()));
    if let Some(u) = &user_id {
        ctx.insert("userId", Ctx::str(u.clone()));
    }
    if let Some(i) = identity {
        ctx.insert("identity", Ctx::str(i));
    }
    let name = get_ci(merged, "name").cloned();
    let heap_event = match kind.as_str() {
        "track" => get_ci(merged, "event").cloned(),
        "page" => Some(Value::String("Page viewed".into())),
        "screen" => Some(Value::String("Screen viewed".into())),
        _ => None,
    };
    if let Some(e) = heap_event {
        ctx.insert("heap_event", Ctx::from_json(&e));
    }
    let mut props = get_ci(merged, "properties").and_then(Value::as_object).cloned().unwrap_or_default();
    if kind == "page" || kind == "screen" {
        if let Some(n) = name {
            props.entry("name").or_insert(n);
        }
        if let Some(c) = get_ci(merged, "category") {
            props.entry("category").or_insert(c.clone());
        }
    }
    ctx.insert("heap_properties", Ctx::Object(CtxObject::from_json(&props)));
    let mut traits = get_ci(merged, "traits")
        .or_else(|| context_traits(merged.get("context").and_then(Value::as_object)))
        .or_else(|| context_traits(batch_context.map(|(v, _)| v)))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(a) = anonymous_id {
        traits.entry("anonymous_id").or_insert(Value::String(a));
    }
    if !traits.is_empty() {
        ctx.insert("heap_traits", Ctx::Object(CtxObject::from_json(&traits)));
    }
    Ok(Item { ctx, seed: msg.to_string() })
}

fn context_traits(c: Option<&Map<String, Value>>) -> Option<&Value> {
    c.and_then(|c| get_ci(c, "traits"))
}

/// A user id counts when it is a non-empty string or a number.
fn non_empty(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::sources::{Parsed, Source, parse as parse_any};

    fn parse(body: &Value, options: &SourceOptions) -> Result<Parsed, FieldError> {
        parse_any(Source::Segment, body, options)
    }

    fn items(body: Value) -> usize {
        match parse(&body, &SourceOptions::default()).unwrap() {
            Parsed::Items(v) => v.len(),
            Parsed::Ping => 0,
        }
    }

    #[test]
    fn one_message_a_batch_and_a_bare_array_are_all_accepted() {
        let m = json!({"type": "track", "event": "E", "userId": "u"});
        assert_eq!(items(m.clone()), 1);
        assert_eq!(items(json!({"batch": [m.clone(), m.clone()]})), 2);
        assert_eq!(items(json!([m.clone(), m.clone(), m])), 3);
    }

    #[test]
    fn a_message_without_type_is_an_item_error_naming_its_index() {
        let Parsed::Items(v) = parse(&json!({"batch": [{"event": "E"}]}), &SourceOptions::default()).unwrap() else {
            panic!("expected items")
        };
        assert_eq!(v[0].as_ref().unwrap_err().field, "batch[0].type");
    }
}
