//! The one error every domain `parse` returns: which field, a stable code, and a sentence for a human.

use serde::Serialize;
use std::fmt;

/// A value that Heap would refuse (or that would corrupt data in Heap), with the field that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field at fault, e.g. `identity`, `properties.order.total`, `profiles[3].email`.
    pub field: String,
    /// Stable machine-readable code, e.g. `missing`, `too_long`, `invalid`.
    pub code: &'static str,
    /// What is wrong, in a sentence.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self { field: field.into(), code, message: message.into() }
    }

    pub fn missing(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(field, "missing", message)
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(field, "invalid", message)
    }

    /// The same error, with its field nested under `prefix` (`properties` + `a.b` → `properties.a.b`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{}", self.field) };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}
