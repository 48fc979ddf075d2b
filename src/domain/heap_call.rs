//! The calls the relay makes to Heap, built only from validated parts. A `HeapCall` that exists is one Heap will
//! accept as far as its documentation says; building one from JSON names the field at fault otherwise.

use super::identity::json_type;
use super::{
    AppId, AppIdPolicy, EventName, FieldError, IdempotencyKey, Identity, KeyScheme, Properties, PropertyLimits, Seed,
    Timestamp, UserId,
};
use serde_json::{Map, Value, json};

/// Which Heap endpoint a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Track,
    UserProperties,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Track => "track",
            CallKind::UserProperties => "user_properties",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "track" => Some(CallKind::Track),
            "user_properties" => Some(CallKind::UserProperties),
            _ => None,
        }
    }

    /// Path of the endpoint under Heap's base URL.
    pub fn path(self) -> &'static str {
        match self {
            CallKind::Track => "/api/track",
            CallKind::UserProperties => "/api/add_user_properties",
        }
    }

    /// Name of the array in Heap's bulk body.
    pub fn bulk_field(self) -> &'static str {
        match self {
            CallKind::Track => "events",
            CallKind::UserProperties => "users",
        }
    }
}

/// Whom a track event is about: exactly one of Heap's `identity` or `user_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Identity(Identity),
    UserId(UserId),
}

impl Who {
    pub fn as_str(&self) -> &str {
        match self {
            Who::Identity(i) => i.as_str(),
            Who::UserId(u) => u.as_str(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrackEvent {
    pub app_id: AppId,
    pub who: Who,
    pub event: EventName,
    pub timestamp: Timestamp,
    pub idempotency_key: IdempotencyKey,
    pub session_id: Option<String>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserProperties {
    pub app_id: AppId,
    pub identity: Identity,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HeapCall {
    Track(TrackEvent),
    UserProperties(UserProperties),
}

/// What building a call needs besides the JSON: configuration, and the parts of a content-hash key.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    pub policy: &'a AppIdPolicy,
    /// The configured app_id, used when the body or template gives none.
    pub default_app_id: Option<&'a str>,
    pub limits: &'a PropertyLimits,
    /// When the relay received the body: the event time when the sender gives none, so that a late (retried)
    /// delivery still lands at the right time in Heap.
    pub received_at: &'a Timestamp,
    /// Source, template and the item's own body, hashed into the idempotency key when the sender has no message id.
    pub key: KeySeed<'a>,
}

/// What a derived idempotency key hashes besides the call's own fields.
#[derive(Debug, Clone, Copy)]
pub struct KeySeed<'a> {
    /// The scheme of the stored body (a re-render derives the keys its first render did).
    pub scheme: KeyScheme,
    /// Source and template (or `heap` and the call kind).
    pub parts: &'a [&'a str],
    /// The item's own content.
    pub seed: Seed<'a>,
}

const TRACK_FIELDS: &[&str] =
    &["app_id", "identity", "user_id", "event", "timestamp", "idempotency_key", "session_id", "properties"];
const USER_FIELDS: &[&str] = &["app_id", "identity", "properties"];

impl TrackEvent {
    pub fn build(obj: &Map<String, Value>, cx: &BuildContext<'_>) -> Result<Self, FieldError> {
        check_fields(obj, TRACK_FIELDS)?;
        let app_id = admit_app_id(obj, cx)?;
        let who = match (present(obj, "identity"), present(obj, "user_id")) {
            (Some(_), Some(_)) => {
                return Err(FieldError::invalid("identity", "send identity or user_id, not both (Heap refuses both)"));
            }
            (Some(i), None) => Who::Identity(Identity::parse(i)?),
            (None, Some(u)) => Who::UserId(UserId::parse(u)?),
            (None, None) => {
                return Err(FieldError::missing("identity", "identity is missing or empty"));
            }
        };
        let event = match present(obj, "event") {
            Some(Value::String(s)) => EventName::parse(s)?,
            Some(Value::Number(n)) => EventName::parse(&n.to_string())?,
            Some(other) => {
                return Err(FieldError::invalid("event", format!("event must be a string, got {}", json_type(other))));
            }
            None => {
                return Err(FieldError::missing("event", "event name is missing or empty"));
            }
        };
        let sender_time = present(obj, "timestamp").map(Timestamp::parse).transpose()?;
        let session_id = match present(obj, "session_id") {
            None => None,
            Some(Value::String(s)) => Some(s.trim().to_owned()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(FieldError::invalid(
                    "session_id",
                    format!("session_id must be a string, got {}", json_type(other)),
                ));
            }
        };
        let idempotency_key = match present(obj, "idempotency_key") {
            Some(Value::String(s)) => IdempotencyKey::from_message_id(s),
            Some(Value::Number(n)) => IdempotencyKey::from_message_id(&n.to_string()),
            Some(other) => {
                return Err(FieldError::invalid(
                    "idempotency_key",
                    format!("idempotency_key must be a string, got {}", json_type(other)),
                ));
            }
            None => None,
        }
        .unwrap_or_else(|| {
            // When the body was received, too: the same content received again later is a new event to Heap (a
            // sender's retry never gets this far; the store's dedupe window answers it at the door).
            let tail = [
                who.as_str(),
                event.as_str(),
                sender_time.as_ref().map_or("", |t| t.as_str()),
                cx.received_at.as_str(),
            ];
            IdempotencyKey::derive_for(cx.key.scheme, cx.key.parts, &cx.key.seed, &tail)
        });
        let properties = Properties::flatten(obj.get("properties").unwrap_or(&Value::Null), cx.limits)
            .map_err(|e| nest(e, "properties"))?;
        Ok(Self {
            app_id,
            who,
            event,
            timestamp: sender_time.unwrap_or_else(|| cx.received_at.clone()),
            idempotency_key,
            session_id,
            properties,
        })
    }

    /// One element of the bulk body's `events` array.
    pub fn bulk_item(&self) -> Value {
        let mut m = Map::new();
        match &self.who {
            Who::Identity(i) => m.insert("identity".into(), json!(i)),
            Who::UserId(u) => m.insert("user_id".into(), json!(u)),
        };
        m.insert("event".into(), json!(self.event));
        m.insert("timestamp".into(), json!(self.timestamp));
        m.insert("idempotency_key".into(), json!(self.idempotency_key));
        if let Some(s) = &self.session_id {
            m.insert("session_id".into(), json!(s));
        }
        if !self.properties.is_empty() {
            m.insert("properties".into(), json!(self.properties));
        }
        Value::Object(m)
    }
}

impl UserProperties {
    pub fn build(obj: &Map<String, Value>, cx: &BuildContext<'_>) -> Result<Self, FieldError> {
        check_fields(obj, USER_FIELDS)?;
        let app_id = admit_app_id(obj, cx)?;
        let identity = match present(obj, "identity") {
            Some(v) => Identity::parse(v)?,
            None => {
                return Err(FieldError::missing("identity", "identity is missing or empty"));
            }
        };
        let properties = Properties::flatten(obj.get("properties").unwrap_or(&Value::Null), cx.limits)
            .map_err(|e| nest(e, "properties"))?
            .for_user();
        if properties.is_empty() {
            return Err(FieldError::missing("properties", "add_user_properties needs at least one property"));
        }
        Ok(Self { app_id, identity, properties })
    }

    /// One element of the bulk body's `users` array.
    pub fn bulk_item(&self) -> Value {
        json!({ "identity": self.identity, "properties": self.properties })
    }
}

impl HeapCall {
    pub fn kind(&self) -> CallKind {
        match self {
            HeapCall::Track(_) => CallKind::Track,
            HeapCall::UserProperties(_) => CallKind::UserProperties,
        }
    }

    pub fn app_id(&self) -> &AppId {
        match self {
            HeapCall::Track(t) => &t.app_id,
            HeapCall::UserProperties(u) => &u.app_id,
        }
    }

    pub fn identity(&self) -> &str {
        match self {
            HeapCall::Track(t) => t.who.as_str(),
            HeapCall::UserProperties(u) => u.identity.as_str(),
        }
    }

    /// The identity string when the call names one (not Heap's numeric user_id).
    pub fn named_identity(&self) -> Option<&str> {
        match self {
            HeapCall::Track(t) => match &t.who {
                Who::Identity(i) => Some(i.as_str()),
                Who::UserId(_) => None,
            },
            HeapCall::UserProperties(u) => Some(u.identity.as_str()),
        }
    }

    /// Heap has no idempotency key for user properties (last write wins), so only track events carry one.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        match self {
            HeapCall::Track(t) => Some(&t.idempotency_key),
            HeapCall::UserProperties(_) => None,
        }
    }

    pub fn bulk_item(&self) -> Value {
        match self {
            HeapCall::Track(t) => t.bulk_item(),
            HeapCall::UserProperties(u) => u.bulk_item(),
        }
    }

    /// `bulk_item` as JSON text, written straight from the call's parts: the store keeps this text, once per
    /// event on the ingest path, where building the `Value` and printing it cost twice as much (profiled). The
    /// keys come in the order `bulk_item`'s map prints them, so both give the same text.
    pub fn bulk_item_text(&self) -> String {
        let text = match self {
            HeapCall::Track(t) => {
                let (identity, user_id) = match &t.who {
                    Who::Identity(i) => (Some(i), None),
                    Who::UserId(u) => (None, Some(u)),
                };
                serde_json::to_string(&TrackItem {
                    event: &t.event,
                    idempotency_key: &t.idempotency_key,
                    identity,
                    properties: (!t.properties.is_empty()).then_some(&t.properties),
                    session_id: t.session_id.as_deref(),
                    timestamp: &t.timestamp,
                    user_id,
                })
            }
            HeapCall::UserProperties(u) => {
                serde_json::to_string(&UserItem { identity: &u.identity, properties: &u.properties })
            }
        };
        // Plain structs of strings and a map with string keys: serialising them to a String cannot fail.
        text.unwrap_or_else(|_| self.bulk_item().to_string())
    }

    /// The single-call body (Heap's non-bulk form), as `heap-relay render` prints it.
    pub fn single_body(&self) -> Value {
        let mut item = self.bulk_item();
        if let Value::Object(m) = &mut item {
            m.insert("app_id".into(), json!(self.app_id()));
        }
        item
    }
}

/// `TrackEvent::bulk_item`'s keys, in the order a `serde_json::Map` prints them (sorted).
#[derive(serde::Serialize)]
struct TrackItem<'a> {
    event: &'a EventName,
    idempotency_key: &'a IdempotencyKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a Properties>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    timestamp: &'a Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a UserId>,
}

#[derive(serde::Serialize)]
struct UserItem<'a> {
    identity: &'a Identity,
    properties: &'a Properties,
}

/// A key counts as present when it holds something other than null or an empty string: a template leaf that
/// rendered to nothing is the same as a leaf that is not there.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(v) => Some(v),
    }
}

fn admit_app_id(obj: &Map<String, Value>, cx: &BuildContext<'_>) -> Result<AppId, FieldError> {
    let raw = match present(obj, "app_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(FieldError::invalid(
                "app_id",
                format!("app_id must be a string of digits, got {}", json_type(other)),
            ));
        }
        None => cx.default_app_id.unwrap_or_default().to_owned(),
    };
    cx.policy.admit(&raw)
}

fn check_fields(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), FieldError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(FieldError::new(
            k.clone(),
            "unknown_field",
            format!("unknown field {k:?}; expected one of {}", allowed.join(", ")),
        )),
    }
}

fn nest(e: FieldError, prefix: &str) -> FieldError {
    if e.field == prefix || e.field.starts_with(&format!("{prefix}.")) { e } else { e.under(prefix) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx<'a>(policy: &'a AppIdPolicy, limits: &'a PropertyLimits, now: &'a Timestamp) -> BuildContext<'a> {
        BuildContext {
            policy,
            default_app_id: Some("11"),
            limits,
            received_at: now,
            key: KeySeed { scheme: KeyScheme::default(), parts: &["test"], seed: Seed::Value(&Value::Null) },
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    proptest::proptest! {
        /// The text the store keeps is exactly what printing `bulk_item` gives, whatever the values hold.
        #[test]
        fn bulk_item_text_is_bulk_item_printed(
            who in "[a-zA-Z0-9][a-zA-Z0-9\"\\\\ é☃\u{1}]{0,11}",
            by_user_id in proptest::bool::ANY,
            event in "[a-zA-Z0-9\" é☃<>]{1,12}",
            session in proptest::option::of("[a-z0-9\"]{1,8}"),
            props in proptest::collection::btree_map("[a-z\"é.]{1,6}", "[a-z\"\\\\ ☃\u{7f}]{0,8}", 0..4),
            number in proptest::option::of(-1.0e12f64..1.0e12),
            user_props in proptest::bool::ANY,
        ) {
            let (p, l, now) = (AppIdPolicy::default(), PropertyLimits::default(), Timestamp::now());
            let c = cx(&p, &l, &now);
            let mut properties: Map<String, Value> = props.into_iter().map(|(k, v)| (k, json!(v))).collect();
            if let Some(n) = number {
                properties.insert("n".into(), json!(n));
            }
            properties.insert("nested".into(), json!({"a": [1, "two"], "b": {"c": true}}));
            let call = if user_props {
                HeapCall::UserProperties(
                    UserProperties::build(&obj(json!({"identity": who, "properties": properties})), &c).unwrap(),
                )
            } else {
                let mut body = json!({"event": event, "properties": properties});
                body[if by_user_id { "user_id" } else { "identity" }] = json!(who);
                if let Some(s) = session {
                    body["session_id"] = json!(s);
                }
                match TrackEvent::build(&obj(body), &c) {
                    Ok(t) => HeapCall::Track(t),
                    // A value the validation refuses (a user_id that is not a number) has no bulk item.
                    Err(_) => return Ok(()),
                }
            };
            proptest::prop_assert_eq!(call.bulk_item_text(), call.bulk_item().to_string());
        }
    }

    #[test]
    fn bulk_item_text_of_an_event_without_properties_leaves_the_key_out_as_bulk_item_does() {
        let (p, l, now) = (AppIdPolicy::default(), PropertyLimits::default(), Timestamp::now());
        let t = TrackEvent::build(&obj(json!({"identity": "u", "event": "E"})), &cx(&p, &l, &now)).unwrap();
        let call = HeapCall::Track(t);
        assert!(!call.bulk_item_text().contains("properties"));
        assert_eq!(call.bulk_item_text(), call.bulk_item().to_string());
    }

    #[test]
    fn track_without_timestamp_gets_received_time_and_a_key_stable_for_that_receipt_only() {
        let (p, l, now) = (AppIdPolicy::default(), PropertyLimits::default(), Timestamp::now());
        let body = obj(json!({"identity": "u1", "event": "E", "properties": {"a": {"b": 1}}}));
        let a = TrackEvent::build(&body, &cx(&p, &l, &now)).unwrap();
        let again = TrackEvent::build(&body, &cx(&p, &l, &now)).unwrap();
        let later = TrackEvent::build(&body, &cx(&p, &l, &Timestamp::parse(&json!(1)).unwrap())).unwrap();
        assert_eq!(a.app_id.as_str(), "11");
        assert_eq!(a.timestamp, now);
        assert_eq!(a.idempotency_key, again.idempotency_key, "a re-render of the same receipt keeps its key");
        assert_ne!(a.idempotency_key, later.idempotency_key, "the same content received again is a new event");
        assert_eq!(a.bulk_item()["properties"], json!({"a.b": 1}));
    }

    #[test]
    fn identity_and_user_id_together_unknown_fields_and_bad_nested_keys_are_named() {
        let (p, l, now) = (AppIdPolicy::default(), PropertyLimits::default(), Timestamp::now());
        let c = cx(&p, &l, &now);
        let both = obj(json!({"identity": "u", "user_id": "1", "event": "E"}));
        assert_eq!(TrackEvent::build(&both, &c).unwrap_err().field, "identity");
        let typo = obj(json!({"identity": "u", "event": "E", "propertes": {}}));
        assert_eq!(TrackEvent::build(&typo, &c).unwrap_err().field, "propertes");
        let no_event = obj(json!({"identity": "u", "event": ""}));
        assert_eq!(TrackEvent::build(&no_event, &c).unwrap_err().field, "event");
        let bad_props = obj(json!({"identity": "u", "event": "E", "properties": "x"}));
        assert_eq!(TrackEvent::build(&bad_props, &c).unwrap_err().field, "properties");
    }

    #[test]
    fn user_properties_need_identity_and_something_to_set() {
        let (p, l, now) = (AppIdPolicy::default(), PropertyLimits::default(), Timestamp::now());
        let c = cx(&p, &l, &now);
        assert_eq!(UserProperties::build(&obj(json!({"properties": {"a": 1}})), &c).unwrap_err().field, "identity");
        assert_eq!(
            UserProperties::build(&obj(json!({"identity": "u", "properties": {}})), &c).unwrap_err().field,
            "properties"
        );
        let ok = UserProperties::build(&obj(json!({"identity": "u", "properties": {"plan": "pro"}})), &c).unwrap();
        assert_eq!(
            HeapCall::UserProperties(ok).single_body(),
            json!({"app_id": "11", "identity": "u", "properties": {"plan": "pro"}})
        );
    }
}
