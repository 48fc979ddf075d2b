//! Who an event belongs to: Heap's `identity` (a case-sensitive string up to 255 characters) or its numeric
//! `user_id`.

use super::FieldError;
use serde::Serialize;
use serde_json::Value;

/// Heap's documented maximum identity length, in characters.
pub const MAX_IDENTITY_CHARS: usize = 255;

/// Values that SDKs and templates produce when the real id is missing (the default of `identity.placeholders`).
pub const DEFAULT_PLACEHOLDERS: &[&str] = &["undefined", "null", "nil", "none", "[object object]", "nan", "user"];

/// Which well-formed identities are still refused, because Heap merges every user sent with the same identity
/// into one profile and the merge cannot be undone (`[identity]` in config.toml):
/// - placeholders that SDKs and templates produce when the real id is missing (`undefined`, `null`, ...);
/// - `"0"` and `"-1"`, unless allowed (several SDKs send them for "no user"; Segment's two Heap destinations
///   disagree on `"0"`);
/// - a constant a template falls back to (`| default: 'user@example.com'`): what the template's identity renders
///   for a body with no fields, passed as `template_default`.
#[derive(Debug, Clone)]
pub struct IdentityPolicy {
    placeholders: Vec<String>,
    allow_zero_and_minus_one: bool,
    refuse_template_default: bool,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        Self::new(DEFAULT_PLACEHOLDERS.iter().map(|s| s.to_string()).collect(), false, true)
    }
}

impl IdentityPolicy {
    pub fn new(placeholders: Vec<String>, allow_zero_and_minus_one: bool, refuse_template_default: bool) -> Self {
        let placeholders = placeholders.iter().map(|p| p.trim().to_ascii_lowercase()).collect();
        Self { placeholders, allow_zero_and_minus_one, refuse_template_default }
    }

    pub fn refuses_template_default(&self) -> bool {
        self.refuse_template_default
    }

    /// Refuses `identity` when the policy says it names no one in particular.
    pub fn check(&self, identity: &str, template_defaults: &[String]) -> Result<(), FieldError> {
        let s = identity.trim();
        if self.placeholders.iter().any(|p| p == &s.to_ascii_lowercase()) {
            return Err(FieldError::invalid(
                "identity",
                format!(
                    "identity {s:?} is a placeholder, not a user id; Heap would merge every such user into one \
                     (identity.placeholders)"
                ),
            ));
        }
        if !self.allow_zero_and_minus_one && (s == "0" || s == "-1") {
            return Err(FieldError::invalid(
                "identity",
                format!(
                    "identity {s:?} usually means \"no user\"; Heap would merge every such user into one \
                     (set identity.allow_zero_and_minus_one = true if it is a real id)"
                ),
            ));
        }
        if self.refuse_template_default && template_defaults.iter().any(|d| d == s) {
            return Err(FieldError::invalid(
                "identity",
                format!(
                    "identity {s:?} is the template's constant default (what it renders for a body without the \
                     field); Heap would merge every such user into one (identity.refuse_template_default)"
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Identity(String);

impl Identity {
    /// Accepts a string or a number; trims it; refuses empty and over-long values (placeholders and other
    /// identities that name no one are `IdentityPolicy`'s job).
    pub fn parse(raw: &Value) -> Result<Self, FieldError> {
        let s = match raw {
            Value::String(s) => s.trim().to_owned(),
            Value::Number(n) => n.to_string(),
            Value::Null => String::new(),
            other => {
                return Err(FieldError::invalid(
                    "identity",
                    format!("identity must be a string or a number, got {}", json_type(other)),
                ));
            }
        };
        Self::parse_str(&s)
    }

    pub fn parse_str(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::missing("identity", "identity is missing or empty"));
        }
        let n = s.chars().count();
        if n > MAX_IDENTITY_CHARS {
            return Err(FieldError::new(
                "identity",
                "too_long",
                format!("identity is {n} characters; Heap allows at most {MAX_IDENTITY_CHARS}"),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Heap's own numeric user id (0..2^53-1), accepted on `/api/track` as an alternative to `identity`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &Value) -> Result<Self, FieldError> {
        let digits = match raw {
            Value::String(s) => s.trim().to_owned(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(FieldError::invalid(
                    "user_id",
                    format!("user_id must be a numeric string, got {}", json_type(other)),
                ));
            }
        };
        let ok = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u64>().is_ok_and(|v| v < (1u64 << 53));
        if !ok {
            return Err(FieldError::invalid("user_id", "user_id must be Heap's numeric user id, 0 to 2^53-1"));
        }
        Ok(Self(digits))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identities_are_trimmed_and_numbers_become_strings() {
        assert_eq!(Identity::parse(&json!("  u_1 ")).unwrap().as_str(), "u_1");
        assert_eq!(Identity::parse(&json!(10482)).unwrap().as_str(), "10482");
    }

    #[test]
    fn placeholders_zero_minus_one_and_the_template_default_are_refused_by_the_default_policy() {
        let p = IdentityPolicy::default();
        let defaults = vec!["user@example.com".to_owned()];
        for bad in ["undefined", "NULL", "User", "0", "-1", "user@example.com"] {
            assert_eq!(p.check(bad, &defaults).unwrap_err().field, "identity", "{bad}");
        }
        for good in ["u_1", "someone@example.com", "10", "00"] {
            assert!(p.check(good, &defaults).is_ok(), "{good}");
        }
        let lenient = IdentityPolicy::new(vec!["anon".into()], true, false);
        for good in ["0", "-1", "undefined", "user@example.com"] {
            assert!(lenient.check(good, &defaults).is_ok(), "{good}");
        }
        assert!(lenient.check("ANON", &defaults).is_err());
    }

    #[test]
    fn empty_structured_and_overlong_identities_are_rejected() {
        for bad in [json!(""), json!("   "), json!(null), json!({"a": 1}), json!(["x"])] {
            assert_eq!(Identity::parse(&bad).unwrap_err().field, "identity", "{bad}");
        }
        assert_eq!(Identity::parse(&json!("x".repeat(256))).unwrap_err().code, "too_long");
        assert!(Identity::parse(&json!("é".repeat(255))).is_ok(), "limit counts characters, not bytes");
    }

    #[test]
    fn user_id_must_fit_in_53_bits() {
        assert!(UserId::parse(&json!("8325872782136936")).is_ok());
        assert!(UserId::parse(&json!(9007199254740992u64)).is_err());
        assert!(UserId::parse(&json!("23adfd82-aa0f")).is_err());
    }
}
