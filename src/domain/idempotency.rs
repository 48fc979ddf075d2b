//! The `idempotency_key` Heap dedupes on. Stable across the relay's own retries and re-renders of one stored body,
//! so a redelivery after a crash never counts twice in Heap; a derived key includes when the body was received, so
//! a genuine repeat (the same campaign body a day later) is a new event. A sender's retries of one body are caught
//! before this, at the door (the store's dedupe window).

use sha2::{Digest, Sha256};

/// Prefix of keys derived from content, and of over-long message ids hashed to fit.
const DERIVED: &str = "hr1-";
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

    /// Whether the relay made this key up from content (the sender gave none). A sender's own key is its way of
    /// naming a retry; a derived one is not. (A sender key that happens to start with `hr1-` is taken as derived.)
    pub fn is_derived(&self) -> bool {
        self.0.starts_with(DERIVED)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_stable_and_part_boundaries_matter() {
        assert_eq!(IdempotencyKey::derive(&["a", "b"]), IdempotencyKey::derive(&["a", "b"]));
        assert_ne!(IdempotencyKey::derive(&["ab", ""]), IdempotencyKey::derive(&["a", "b"]));
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
