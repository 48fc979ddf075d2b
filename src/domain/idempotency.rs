//! The `idempotency_key` Heap dedupes on. Stable across the relay's own retries and re-renders of one stored body,
//! so a redelivery after a crash never counts twice in Heap; a derived key includes when the body was received, so
//! a genuine repeat (the same campaign body a day later) is a new event. A sender's retries of one body are caught
//! before this, at the door (the store's dedupe window).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::cell::RefCell;

/// Prefix of keys derived from content by [`KeyScheme::Text`], and of over-long message ids hashed to fit.
const DERIVED: &str = "hr1-";
/// Prefix of keys derived by [`KeyScheme::Canonical`].
const DERIVED_CANONICAL: &str = "hr2-";
const HASHED_MESSAGE_ID: &str = "hm1-";

/// Longer source message ids are hashed to keep the key small.
const MAX_KEY_CHARS: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The sender's own message id (Segment `messageId`, a Heap body's `idempotency_key`), when it has one.
    pub fn from_message_id(id: &str) -> Option<Self> {
        let id = id.trim();
        if id.is_empty() {
            return None;
        }
        if id.chars().count() > MAX_KEY_CHARS {
            let mut hashed = Self::derive(&["message-id", id]);
            hashed.0.replace_range(..DERIVED.len(), HASHED_MESSAGE_ID);
            return Some(hashed);
        }
        Some(Self(id.to_owned()))
    }

    /// A content hash of the parts that make an event what it is (source, template, identity, event, the
    /// sender's timestamp, the item's body). Parts are length-prefixed, so no two part lists collide by joining.
    pub fn derive(parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        let digest = h.finalize();
        Self(format!("{DERIVED}{}", hex::encode(&digest[..16])))
    }

    /// The key of an item the sender gave no id: `head` (source and template), the item's own content (`seed`) and
    /// `tail` (identity, event, the sender's time, the receipt time), under the scheme its body was stored with.
    pub fn derive_for(scheme: KeyScheme, head: &[&str], seed: &Seed<'_>, tail: &[&str]) -> Self {
        match scheme {
            KeyScheme::Text => {
                let text = seed.text();
                let mut parts: Vec<&str> = Vec::with_capacity(head.len() + 1 + tail.len());
                parts.extend_from_slice(head);
                parts.push(&text);
                parts.extend_from_slice(tail);
                Self::derive(&parts)
            }
            KeyScheme::Canonical => CANONICAL.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                for p in head {
                    put_str(&mut buf, p);
                }
                seed.encode(&mut buf);
                for p in tail {
                    put_str(&mut buf, p);
                }
                let digest = xxhash_rust::xxh3::xxh3_128(&buf);
                // A seed that grew the buffer past this once does not keep the memory for good.
                if buf.capacity() > MAX_KEPT_BUFFER {
                    *buf = Vec::new();
                }
                Self(format!("{DERIVED_CANONICAL}{digest:032x}"))
            }),
        }
    }

    /// Whether the relay made this key up from content (the sender gave none). A sender's own key is its way of
    /// naming a retry; a derived one is not. (A sender key that happens to start with `hr1-` or `hr2-` is taken as
    /// derived.)
    pub fn is_derived(&self) -> bool {
        self.0.starts_with(DERIVED) || self.0.starts_with(DERIVED_CANONICAL)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a derived key hashes an item's content. A body keeps the scheme it was first stored with: a re-render of a
/// body stored before [`KeyScheme::Canonical`] existed derives the keys it derived then, so Heap dedupes a
/// redelivery instead of counting it twice (the store keeps the scheme per body; bodies from before have none and
/// read as [`KeyScheme::Text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyScheme {
    /// `hr1-`: the item's JSON text (sorted keys) as one length-prefixed part. Serialising every item to text cost
    /// about a fifth of render+validate.
    Text,
    /// `hr2-`: the item's content in a binary canonical form (type tags, lengths, raw bytes, no escaping), hashed
    /// with XXH3-128. Not a cryptographic hash, and it need not be one: every key also hashes the identity, event,
    /// times and route, so two items could only share a key by colliding within one identity's own events at one
    /// receipt — a sender able to craft that can already send that identity's events as it likes. SHA-256 of the
    /// profile cost about an eighth of render+validate.
    #[default]
    Canonical,
}

impl KeyScheme {
    /// What a store keeps for a body: 1 or 2.
    pub fn as_i64(self) -> i64 {
        match self {
            KeyScheme::Text => 1,
            KeyScheme::Canonical => 2,
        }
    }

    /// A stored scheme; an unknown number (a newer relay's) is refused rather than misread.
    pub fn from_i64(n: i64) -> Option<Self> {
        match n {
            1 => Some(KeyScheme::Text),
            2 => Some(KeyScheme::Canonical),
            _ => None,
        }
    }
}

/// An item's own content, borrowed from the body, for its derived key.
#[derive(Debug, Clone, Copy)]
pub enum Seed<'a> {
    Value(&'a Value),
    Object(&'a Map<String, Value>),
    /// An object of two named values, names in sorted order: what `json!({..})` of them serialises to (CleverTap:
    /// the profile and the campaign's `targetId`, without copying the profile into an object).
    Fields([(&'static str, &'a Value); 2]),
}

impl Seed<'_> {
    /// The content as the JSON text [`KeyScheme::Text`] hashed (object keys sorted).
    pub fn text(&self) -> String {
        match self {
            Seed::Value(v) => v.to_string(),
            Seed::Object(m) => serde_json::to_string(m).unwrap_or_default(),
            Seed::Fields(fields) => {
                let mut out = String::from("{");
                for (i, (name, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(*name).to_string());
                    out.push(':');
                    out.push_str(&v.to_string());
                }
                out.push('}');
                out
            }
        }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            Seed::Value(v) => put_value(buf, v),
            Seed::Object(m) => put_object(buf, m.len(), m.iter().map(|(k, v)| (k.as_str(), v))),
            Seed::Fields(fields) => put_object(buf, fields.len(), fields.iter().map(|(k, v)| (*k, *v))),
        }
    }
}

thread_local! {
    /// The canonical form is built here and hashed once (a hash update per field costs more than the copy).
    static CANONICAL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

const MAX_KEPT_BUFFER: usize = 1 << 20;

/// LEB128: one byte for the short strings most fields hold (the hash reads every byte it is given).
fn put_len(buf: &mut Vec<u8>, n: usize) {
    let mut n = n as u64;
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_len(buf, s.len());
    buf.extend_from_slice(s.as_bytes());
}

fn put_object<'v>(buf: &mut Vec<u8>, len: usize, entries: impl Iterator<Item = (&'v str, &'v Value)>) {
    buf.push(b'{');
    put_len(buf, len);
    for (k, v) in entries {
        put_str(buf, k);
        put_value(buf, v);
    }
}

/// Type tag, then content: strings length-prefixed, numbers as their 8 bytes (integers and floats tagged apart, as
/// JSON text tells `1` from `1.0`), arrays and objects with their length, so no two values share an encoding.
fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => buf.push(b'n'),
        Value::Bool(b) => buf.push(if *b { b't' } else { b'f' }),
        Value::Number(n) => {
            let (tag, bits) = match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => (b'u', u),
                (None, Some(i), _) => (b'i', i as u64),
                (None, None, f) => (b'd', f.unwrap_or(f64::NAN).to_bits()),
            };
            buf.push(tag);
            buf.extend_from_slice(&bits.to_le_bytes());
        }
        Value::String(s) => {
            buf.push(b's');
            put_str(buf, s);
        }
        Value::Array(items) => {
            buf.push(b'[');
            put_len(buf, items.len());
            for item in items {
                put_value(buf, item);
            }
        }
        Value::Object(m) => put_object(buf, m.len(), m.iter().map(|(k, v)| (k.as_str(), v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn derived_keys_are_stable_and_part_boundaries_matter() {
        assert_eq!(IdempotencyKey::derive(&["a", "b"]), IdempotencyKey::derive(&["a", "b"]));
        assert_ne!(IdempotencyKey::derive(&["ab", ""]), IdempotencyKey::derive(&["a", "b"]));
    }

    #[test]
    fn the_text_scheme_derives_exactly_the_keys_derived_before_schemes_existed() {
        let profile = json!({"identity": "u_1", "profileData": {"b": 1, "a": [1.5, "x\"y"]}, "Email": "a@b.co"});
        let target = json!(1732101122);
        let fields = [("profile", &profile), ("targetId", &target)];
        let old_seed = json!({"targetId": target, "profile": profile}).to_string();
        let before = IdempotencyKey::derive(&["clevertap", "default", &old_seed, "u_1", "E", "", "2024-01-01"]);
        let now = IdempotencyKey::derive_for(
            KeyScheme::Text,
            &["clevertap", "default"],
            &Seed::Fields(fields),
            &["u_1", "E", "", "2024-01-01"],
        );
        assert_eq!(now, before);
        for v in [json!({"b": 1, "a": "x"}), json!([1, "two", null]), json!("s"), Value::Null] {
            let text = IdempotencyKey::derive(&["h", &v.to_string(), "t"]);
            assert_eq!(IdempotencyKey::derive_for(KeyScheme::Text, &["h"], &Seed::Value(&v), &["t"]), text);
        }
    }

    #[test]
    fn canonical_keys_tell_apart_what_text_tells_apart() {
        let key = |v: &Value| IdempotencyKey::derive_for(KeyScheme::Canonical, &["h"], &Seed::Value(v), &["t"]);
        let distinct = [
            json!(null),
            json!(""),
            json!("null"),
            json!(1),
            json!("1"),
            json!(1.0),
            json!([]),
            json!({}),
            json!([""]),
            json!({"a": "b"}),
            json!({"ab": ""}),
            json!({"a": {"b": null}}),
            json!({"a": [null]}),
            json!(["a", "b"]),
            json!(["ab"]),
            json!(true),
            json!(false),
        ];
        let keys: std::collections::HashSet<_> = distinct.iter().map(key).collect();
        assert_eq!(keys.len(), distinct.len());
        let k = key(&json!({"a": 1}));
        assert!(k.as_str().starts_with("hr2-") && k.is_derived(), "{k:?}");
        assert_eq!(k, key(&json!({"a": 1})), "stable");
        assert_ne!(
            IdempotencyKey::derive_for(KeyScheme::Canonical, &["h", "x"], &Seed::Value(&Value::Null), &[]),
            IdempotencyKey::derive_for(KeyScheme::Canonical, &["hx"], &Seed::Value(&Value::Null), &[]),
            "part boundaries matter"
        );
    }

    #[test]
    fn message_ids_are_kept_and_overlong_ones_hashed() {
        assert_eq!(IdempotencyKey::from_message_id(" m-1 ").unwrap().as_str(), "m-1");
        assert!(IdempotencyKey::from_message_id("").is_none());
        let long = IdempotencyKey::from_message_id(&"x".repeat(300)).unwrap();
        assert!(long.as_str().starts_with("hm1-") && !long.is_derived(), "{long:?}");
        assert!(IdempotencyKey::derive(&["a"]).is_derived());
    }
}
