//! Heap's `app_id`: the environment ID, digits only. Which app_ids a request may reach is decided by configuration.

use super::FieldError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AppId(String);

impl AppId {
    /// Accepts a non-empty string of ASCII digits (surrounding whitespace is trimmed), up to 32 of them.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::missing(
                "app_id",
                "app_id is missing: set heap.app_id (or sources.<name>.app_id) in config.toml, \
                 or HEAP_RELAY__HEAP__APP_ID",
            ));
        }
        if s.len() > 32 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::invalid(
                "app_id",
                format!(
                    "app_id must be Heap's numeric environment ID (digits only), got {:?}",
                    truncate_for_message(s)
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AppId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which app_ids events may be sent to. Built once from configuration.
#[derive(Debug, Clone, Default)]
pub struct AppIdPolicy {
    /// Empty: any well-formed app_id is allowed (unless `strict`). Otherwise only these.
    allowed: Vec<AppId>,
    /// Only the listed app_ids, even when the list is empty (the Heap-compatible routes, where the body names the
    /// app_id: anyone who can reach the relay could otherwise write into any Heap project through it).
    strict: bool,
}

impl AppIdPolicy {
    pub fn new(allowed: Vec<AppId>) -> Self {
        Self { allowed, strict: false }
    }

    /// Only these app_ids; none at all when the list is empty.
    pub fn only(allowed: Vec<AppId>) -> Self {
        Self { allowed, strict: true }
    }

    /// Parses `raw` and checks it against the allow-list.
    pub fn admit(&self, raw: &str) -> Result<AppId, FieldError> {
        let id = AppId::parse(raw)?;
        if self.strict && !self.allowed.contains(&id) {
            return Err(FieldError::new(
                "app_id",
                "not_allowed",
                format!(
                    "app_id {id} is not configured: the Heap-compatible routes accept only heap.allowed_app_ids, or \
                     when that is empty, heap.app_id and sources.<name>.app_id"
                ),
            ));
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&id) {
            return Err(FieldError::new(
                "app_id",
                "not_allowed",
                format!("app_id {id} is not in heap.allowed_app_ids"),
            ));
        }
        Ok(id)
    }
}

pub(crate) fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX { s.to_owned() } else { format!("{}…", s.chars().take(MAX).collect::<String>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_accepted_and_trimmed() {
        assert_eq!(AppId::parse(" 1234567890 ").unwrap().as_str(), "1234567890");
    }

    #[test]
    fn empty_non_digit_and_overlong_app_ids_are_rejected_naming_the_field() {
        for bad in ["", "  ", "12a4", "1\",\"app_id\":\"1", "-1", "1.5", &"9".repeat(33)] {
            let err = AppId::parse(bad).unwrap_err();
            assert_eq!(err.field, "app_id", "{bad:?}");
        }
    }

    #[test]
    fn allow_list_refuses_other_app_ids() {
        let policy = AppIdPolicy::new(vec![AppId::parse("11").unwrap()]);
        assert!(policy.admit("11").is_ok());
        assert_eq!(policy.admit("12").unwrap_err().code, "not_allowed");
        assert!(AppIdPolicy::default().admit("12").is_ok());
    }
}
