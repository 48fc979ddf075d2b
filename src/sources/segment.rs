//! Segment-spec messages (Customer.io Data Pipelines, Astronomer Clickstream, RudderStack, Jitsu): one message,
//! `{"batch": [...]}` (batch-level `context` is merged under each message's own), or a bare array.
//!
//! The context is the message as sent, plus what the peers' Heap mappings derive:
//! - `userId`: also read from Astronomer's `userID` spelling;
//! - `identity`: `userId`, else `anonymousId` (unless anonymous messages are refused by configuration);
//! - `heap_event`: the event name for track; `Page viewed` / `Screen viewed` for page and screen;
//! - `heap_properties`: `properties`, plus `name` and `category` of a page or screen;
//! - `heap_traits`: `traits` (else `context.traits`) plus `anonymous_id`, for identify; absent when that is empty,
//!   so an identify with nothing to set sends nothing (`ignored`) instead of being rejected;
//!
//! Bodies arriving on Segment's tracking API (`/v1/*`, straight from a library) are first prepared by
//! [`prepare_tracking_call`]: the type from the path, `writeKey` removed (a secret, not stored), and each
//! `timestamp` corrected for the sender's clock skew as Segment's API does.
//!
//! `integrations: {"Heap": false}`, or `{"All": false}` without `"Heap": true`, keeps a message out of Heap: the
//! item is excluded (reported as ignored), as Segment keeps it from a disabled destination.

use super::{Item, Shape, SourceOptions, as_list, get_ci};
use crate::domain::{FieldError, Seed};
use crate::templates::context::{Ctx, CtxObject, Dates, Merged};
use serde_json::{Map, Value};

pub fn for_each<'a>(
    body: &'a Value,
    options: &SourceOptions,
    f: &mut dyn FnMut(Result<Item<'a>, FieldError>),
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
    // Every message reads the batch context where it is, under its own (`Merged`): nothing is copied per message.
    for (i, m) in messages.into_iter().enumerate() {
        f(message_item(m, batch_context, options).map_err(|e| e.under(&format!("{prefix}[{i}]"))));
    }
    Ok(Shape::Items)
}

fn message_item<'a>(
    msg: &'a Value,
    batch_context: Option<&'a Map<String, Value>>,
    options: &SourceOptions,
) -> Result<Item<'a>, FieldError> {
    const AS_SENT: Dates = Dates::AsSent;
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

    let mut ctx = CtxObject::from_json(merged, AS_SENT);
    if let Some(bc) = batch_context {
        // The message's own context keys win over the batch's.
        let own = match merged.get("context") {
            Some(Value::Object(own)) => own,
            _ => empty_map(),
        };
        ctx.insert("context", Ctx::Merged(Merged::new(own, bc, AS_SENT)));
    }
    ctx.insert("type", Ctx::str(kind.clone()));
    if let Some(u) = &user_id {
        ctx.insert("userId", Ctx::str(u.clone()));
    }
    if let Some(i) = identity {
        ctx.insert("identity", Ctx::str(i));
    }
    let heap_event = match kind.as_str() {
        "track" => get_ci(merged, "event").map(|e| Ctx::json(e, AS_SENT)),
        "page" => Some(Ctx::str("Page viewed")),
        "screen" => Some(Ctx::str("Screen viewed")),
        _ => None,
    };
    if let Some(e) = heap_event {
        ctx.insert("heap_event", e);
    }
    let mut props = match get_ci(merged, "properties") {
        Some(Value::Object(p)) => CtxObject::from_json(p, AS_SENT),
        _ => CtxObject::new(),
    };
    if kind == "page" || kind == "screen" {
        if let Some(n) = get_ci(merged, "name") {
            props.insert_if_absent("name", Ctx::json(n, AS_SENT));
        }
        if let Some(c) = get_ci(merged, "category") {
            props.insert_if_absent("category", Ctx::json(c, AS_SENT));
        }
    }
    ctx.insert("heap_properties", Ctx::Object(props));
    let mut traits = match get_ci(merged, "traits")
        .or_else(|| context_traits(merged.get("context").and_then(Value::as_object)))
        .or_else(|| context_traits(batch_context))
    {
        Some(Value::Object(t)) => CtxObject::from_json(t, AS_SENT),
        _ => CtxObject::new(),
    };
    if let Some(a) = anonymous_id {
        traits.insert_if_absent("anonymous_id", Ctx::str(a));
    }
    if !traits.is_empty() {
        ctx.insert("heap_traits", Ctx::Object(traits));
    }
    Ok(Item { ctx, seed: Seed::Value(msg), excluded: !sends_to_heap(merged) })
}

/// An empty object, for a message without a `context` of its own.
fn empty_map() -> &'static Map<String, Value> {
    static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
    &EMPTY
}

/// Segment's `integrations` object: `"Heap": false` turns Heap off; `"All": false` turns every destination off
/// unless `"Heap": true` turns it back on.
fn sends_to_heap(m: &Map<String, Value>) -> bool {
    let Some(Value::Object(i)) = get_ci(m, "integrations") else {
        return true;
    };
    match i.get("Heap") {
        Some(Value::Bool(b)) => *b,
        // A destination settings object counts as enabled, as in Segment.
        Some(Value::Object(_)) => true,
        _ => !matches!(i.get("All"), Some(Value::Bool(false))),
    }
}

/// Prepares a body sent to Segment's tracking API (`/v1/{call}`) by a library: a single call takes its `type` from
/// the path (`call`; Segment's documented bodies carry none); `writeKey` is removed (a secret: it is checked, not
/// stored); and when a message (or its batch) carries `sentAt`, its `timestamp` (else `originalTimestamp`) is moved
/// by `receivedAt - sentAt`, as Segment's API does, so a device whose clock is an hour off still records events at
/// the right time. Without `sentAt` a timestamp is kept as sent. Returns whether anything changed.
pub fn prepare_tracking_call(body: &mut Value, call: Option<&str>, received_at_ms: i64) -> bool {
    let Value::Object(root) = body else {
        return false;
    };
    let mut changed = root.remove("writeKey").is_some();
    if let Some(call) = call {
        root.insert("type".into(), Value::String(call.to_owned()));
        changed = true;
    }
    let batch_sent_at = get_ci(root, "sentAt").and_then(parse_time);
    let correct = |m: &mut Map<String, Value>, batch_sent_at: Option<i64>| {
        let sent = get_ci(m, "sentAt").and_then(parse_time).or(batch_sent_at)?;
        let t = corrected_timestamp(m, received_at_ms - sent)?;
        m.insert("timestamp".into(), Value::String(t));
        Some(())
    };
    if let Some(Value::Array(batch)) = root.get_mut("batch") {
        for m in batch.iter_mut().filter_map(Value::as_object_mut) {
            changed |= correct(m, batch_sent_at).is_some();
        }
    } else {
        changed |= correct(root, None).is_some();
    }
    changed
}

/// An RFC 3339 date-time as Unix milliseconds.
fn parse_time(v: &Value) -> Option<i64> {
    let s = v.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s.trim()).ok().map(|d| d.timestamp_millis())
}

/// The message's time moved by `skew_ms` (receivedAt - sentAt), as ISO-8601 UTC with milliseconds; None when it
/// has no RFC 3339 `timestamp` or `originalTimestamp` to move.
fn corrected_timestamp(m: &Map<String, Value>, skew_ms: i64) -> Option<String> {
    let t =
        get_ci(m, "timestamp").and_then(parse_time).or_else(|| get_ci(m, "originalTimestamp").and_then(parse_time))?;
    let dt = chrono::DateTime::from_timestamp_millis(t.checked_add(skew_ms)?)?;
    Some(dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
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

    fn parse<'a>(body: &'a Value, options: &SourceOptions) -> Result<Parsed<'a>, FieldError> {
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

    fn timestamp_of(mut body: Value, received_at_ms: i64) -> Option<String> {
        prepare_tracking_call(&mut body, None, received_at_ms);
        let m = body.get("batch").map(|b| b[0].clone()).unwrap_or(body);
        m.get("timestamp").and_then(Value::as_str).map(str::to_owned)
    }

    #[test]
    fn a_timestamp_is_moved_by_received_at_minus_sent_at() {
        // The device's clock is one hour fast: it says it sent at 13:00:10, the relay received at 12:00:10.
        let received = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:00:10Z").unwrap().timestamp_millis();
        let msg = json!({"type": "track", "event": "E", "userId": "u",
            "timestamp": "2026-01-01T13:00:00.000Z", "sentAt": "2026-01-01T13:00:10.000Z"});
        assert_eq!(timestamp_of(msg, received).as_deref(), Some("2026-01-01T12:00:00.000Z"));
        let batch = json!({"batch": [{"type": "track", "event": "E", "userId": "u",
            "originalTimestamp": "2026-01-01T13:00:00+01:00"}], "sentAt": "2026-01-01T12:00:12Z"});
        assert_eq!(timestamp_of(batch, received).as_deref(), Some("2026-01-01T11:59:58.000Z"), "batch-level sentAt");
        let unsent = json!({"type": "track", "event": "E", "userId": "u", "timestamp": "2026-01-01T13:00:00Z"});
        assert_eq!(timestamp_of(unsent, received).as_deref(), Some("2026-01-01T13:00:00Z"), "no sentAt: as sent");
    }

    #[test]
    fn a_single_call_takes_its_type_from_the_path_and_loses_its_write_key() {
        let mut body = json!({"event": "E", "userId": "u", "writeKey": "wk_secret"});
        assert!(prepare_tracking_call(&mut body, Some("track"), 0));
        assert_eq!(body, json!({"event": "E", "userId": "u", "type": "track"}));
    }

    #[test]
    fn integrations_heap_false_or_all_false_without_heap_true_exclude_a_message() {
        let excluded = |integrations: Value| {
            let m = json!({"type": "track", "event": "E", "userId": "u", "integrations": integrations});
            let Parsed::Items(v) = parse(&m, &SourceOptions::default()).unwrap() else { panic!() };
            v[0].as_ref().unwrap().excluded
        };
        assert!(excluded(json!({"Heap": false})));
        assert!(excluded(json!({"All": false})));
        assert!(!excluded(json!({"All": false, "Heap": true})));
        assert!(!excluded(json!({"All": true, "Mixpanel": false})));
        assert!(!excluded(json!({})));
    }

    #[test]
    fn a_message_without_type_is_an_item_error_naming_its_index() {
        let body = json!({"batch": [{"event": "E"}]});
        let Parsed::Items(v) = parse(&body, &SourceOptions::default()).unwrap() else { panic!("expected items") };
        assert_eq!(v[0].as_ref().unwrap_err().field, "batch[0].type");
    }
}
