//! Source adapters: turn one webhook body into items, each with the template context it renders against.
//!
//! An adapter knows its vendor's body shapes (both CleverTap casings, Segment's batch forms, ...) and nothing about
//! Heap; the template decides what each item becomes.

pub mod clevertap;
pub mod heap;
pub mod segment;
pub mod userpilot;

use crate::domain::{FieldError, Seed};
use crate::templates::context::CtxObject;
use serde_json::Value;

/// The routes under `/hooks/{source}`. Heap-compatible ingest (`/api/track`) is not templated and lives in `heap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    CleverTap,
    Userpilot,
    Segment,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::CleverTap, Source::Userpilot, Source::Segment];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::CleverTap => "clevertap",
            Source::Userpilot => "userpilot",
            Source::Segment => "segment",
        }
    }
}

/// Options an adapter reads from configuration.
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    /// Segment: use `anonymousId` as the identity when `userId` is missing.
    pub allow_anonymous: bool,
    /// CleverTap: give each profile's template `body`, the profile as sent (read in place, so it costs little;
    /// ingest still leaves it out for templates that never read `body`, `Template::reads`).
    pub raw_body: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self { allow_anonymous: true, raw_body: true }
    }
}

/// One thing in a body that may become Heap calls: a CleverTap profile, a Segment message, a Userpilot event.
#[derive(Debug)]
pub struct Item<'a> {
    /// What the template sees, borrowing the body.
    pub ctx: CtxObject<'a>,
    /// The item's own content, hashed into the idempotency key when the sender gives no message id.
    pub seed: Seed<'a>,
    /// The sender asked for this item to be kept out of Heap (a Segment message's `integrations`): reported as
    /// ignored, never rendered.
    pub excluded: bool,
}

/// What an adapter made of a body.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A vendor's connection test (CleverTap's `"is_test": true`): answer 200, send nothing.
    Ping,
    /// The items, in order; an item that is unusable on its own is an `Err` naming its field.
    Items(Vec<Result<Item<'a>, FieldError>>),
}

pub fn parse<'a>(source: Source, body: &'a Value, options: &SourceOptions) -> Result<Parsed<'a>, FieldError> {
    let mut items = Vec::new();
    match for_each(source, body, options, &mut |item| items.push(item))? {
        Shape::Ping => Ok(Parsed::Ping),
        Shape::Items => Ok(Parsed::Items(items)),
    }
}

/// What a body turned out to be, for `for_each`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Ping,
    Items,
}

/// Builds the items one at a time and hands each to `f` before building the next, so at most one item's context
/// exists at once. Items read the body in place: batch-level fields (a Segment batch's `context`, CleverTap's
/// `targetId` and `key_values`) are shared by every item, never copied into each. Call `count` first to refuse a body with too
/// many items before any is built.
pub fn for_each<'a>(
    source: Source,
    body: &'a Value,
    options: &SourceOptions,
    f: &mut dyn FnMut(Result<Item<'a>, FieldError>),
) -> Result<Shape, FieldError> {
    match source {
        Source::CleverTap => clevertap::for_each(body, options, f),
        Source::Userpilot => userpilot::for_each(body, f),
        Source::Segment => segment::for_each(body, options, f),
    }
}

/// How many items `for_each` would build, counted without building any (1 for a single-item body; 0 for a body
/// whose shape is wrong, which `for_each` then refuses).
pub fn count(source: Source, body: &Value) -> usize {
    let list = |key: &str| match body {
        Value::Array(a) => a.len(),
        Value::Object(o) => match get_ci(o, key) {
            Some(Value::Array(a)) => a.len(),
            _ => 1,
        },
        _ => 0,
    };
    match source {
        Source::CleverTap => list("profiles"),
        Source::Userpilot => match body {
            Value::Array(a) => a.len(),
            _ => 1,
        },
        Source::Segment => list("batch"),
    }
}

/// Looks a key up exactly, then ignoring ASCII case (vendors change key casing between versions).
pub(crate) fn get_ci<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
}

/// One body or a list of bodies: a JSON array, or an object holding the array under `key`.
pub(crate) fn as_list<'a>(body: &'a Value, key: &str) -> Option<Vec<&'a Value>> {
    match body {
        Value::Array(a) => Some(a.iter().collect()),
        Value::Object(o) => match get_ci(o, key) {
            Some(Value::Array(a)) => Some(a.iter().collect()),
            _ => None,
        },
        _ => None,
    }
}
