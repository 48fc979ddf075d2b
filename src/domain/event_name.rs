//! The Heap event name: non-empty after trimming, at most 1024 characters (Heap's server-side limit).

use super::FieldError;
use serde::Serialize;

pub const MAX_EVENT_CHARS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EventName(String);

impl EventName {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::missing("event", "event name is missing or empty"));
        }
        let n = s.chars().count();
        if n > MAX_EVENT_CHARS {
            return Err(FieldError::new(
                "event",
                "too_long",
                format!("event name is {n} characters; Heap allows at most {MAX_EVENT_CHARS}"),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(EventName::parse(" Order Completed ").unwrap().as_str(), "Order Completed");
        assert_eq!(EventName::parse(" ").unwrap_err().field, "event");
        assert!(EventName::parse(&"e".repeat(1024)).is_ok());
        assert_eq!(EventName::parse(&"e".repeat(1025)).unwrap_err().code, "too_long");
    }
}
