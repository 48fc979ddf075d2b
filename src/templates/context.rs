//! The values a template reads, with lenient lookups.
//!
//! Stock liquid-rust fails a render when a variable or key is missing, even before `default` can act
//! (`{{ Profile.Email | default: 'x' }}` errors when `Email` is absent). [`Ctx`] answers every missing key with a
//! nil that also behaves as an empty object, so `default` works at any depth (`Profile.address.city`) and
//! `{% if Profile.Email %}` is false. Keys are looked up exactly first and then case-insensitively, because
//! vendors change key casing between versions (CleverTap's `Email`/`email`).
//!
//! Values copied into a plain liquid value (a `for` loop variable, `assign`) are strict again; the renderer treats
//! an unknown-variable error there as "renders to nothing" (see `render.rs`).

use liquid_core::model::{DisplayCow, KString, KStringCow, Scalar, State};
use liquid_core::{ObjectView, Value as LiquidValue, ValueView};
use serde_json::Value;
use std::fmt;

#[derive(Debug, Clone)]
pub enum Ctx {
    Nil,
    Scalar(Scalar),
    Array(Vec<Ctx>),
    Object(CtxObject),
}

/// An object's entries, sorted by key (as a JSON map iterates): one allocation per object instead of a B-tree's
/// nodes, and binary search for the exact-case lookup. Keys are `KString`s, held inline when short.
#[derive(Debug, Clone, Default)]
pub struct CtxObject {
    entries: Vec<(KString, Ctx)>,
}

static NIL: Ctx = Ctx::Nil;
static EMPTY: CtxObject = CtxObject { entries: Vec::new() };

impl Ctx {
    /// Converts JSON into template values. `map_str` rewrites string leaves (CleverTap's `$D_` dates).
    pub fn from_json_with(v: &Value, map_str: &dyn Fn(&str) -> Option<String>) -> Ctx {
        match v {
            Value::Null => Ctx::Nil,
            Value::Bool(b) => Ctx::Scalar(Scalar::new(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Ctx::Scalar(Scalar::new(i)),
                None => Ctx::Scalar(Scalar::new(n.as_f64().unwrap_or(f64::NAN))),
            },
            Value::String(s) => Ctx::Scalar(match map_str(s) {
                Some(mapped) => Scalar::new(mapped),
                None => Scalar::new(KString::from_ref(s)),
            }),
            Value::Array(a) => Ctx::Array(a.iter().map(|x| Ctx::from_json_with(x, map_str)).collect()),
            Value::Object(o) => Ctx::Object(CtxObject::from_json_with(o, map_str)),
        }
    }

    pub fn from_json(v: &Value) -> Ctx {
        Ctx::from_json_with(v, &|_| None)
    }

    pub fn str(s: impl Into<String>) -> Ctx {
        Ctx::Scalar(Scalar::new(s.into()))
    }

    fn to_liquid(&self) -> LiquidValue {
        match self {
            Ctx::Nil => LiquidValue::Nil,
            Ctx::Scalar(s) => LiquidValue::Scalar(s.clone()),
            Ctx::Array(a) => LiquidValue::Array(a.iter().map(Ctx::to_liquid).collect()),
            Ctx::Object(o) => o.to_value(),
        }
    }
}

impl CtxObject {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_json_with(o: &serde_json::Map<String, Value>, map_str: &dyn Fn(&str) -> Option<String>) -> Self {
        // A JSON map iterates in key order, so the entries come out sorted.
        Self { entries: o.iter().map(|(k, v)| (KString::from_ref(k), Ctx::from_json_with(v, map_str))).collect() }
    }

    pub fn from_json(o: &serde_json::Map<String, Value>) -> Self {
        Self::from_json_with(o, &|_| None)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: Ctx) {
        let key: String = key.into();
        match self.entries.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (KString::from_string(key), value)),
        }
    }

    /// Inserts only when no key of that name (in any casing) is there yet.
    pub fn insert_missing(&mut self, key: &str, value: Ctx) {
        if self.lookup(key).is_none() {
            self.insert(key, value);
        }
    }

    pub fn lookup(&self, key: &str) -> Option<&Ctx> {
        match self.entries.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            Ok(i) => Some(&self.entries[i].1),
            Err(_) => self
                .entries
                .iter()
                .find(|(k, _)| k.len() == key.len() && k.as_bytes().eq_ignore_ascii_case(key.as_bytes()))
                .map(|(_, v)| v),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Ctx)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

struct Glued<'a>(&'a CtxObject);

impl fmt::Display for Glued<'_> {
    /// Liquid prints an object by gluing keys and values together; kept for compatibility.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0.entries {
            write!(f, "{k}{}", v.render())?;
        }
        Ok(())
    }
}

impl ValueView for CtxObject {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(Glued(self)))
    }
    fn source(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(Glued(self)))
    }
    fn type_name(&self) -> &'static str {
        "object"
    }
    fn query_state(&self, state: State) -> bool {
        match state {
            State::Truthy => true,
            State::DefaultValue | State::Empty | State::Blank => self.entries.is_empty(),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_string(Glued(self).to_string())
    }
    fn to_value(&self) -> LiquidValue {
        LiquidValue::Object(self.entries.iter().map(|(k, v)| (k.clone(), v.to_liquid())).collect())
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
}

impl ObjectView for CtxObject {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        self.entries.len() as i64
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        Box::new(self.entries.iter().map(|(k, _)| KStringCow::from_ref(k.as_str())))
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(self.entries.iter().map(|(_, v)| v as &dyn ValueView))
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        Box::new(self.entries.iter().map(|(k, v)| (KStringCow::from_ref(k.as_str()), v as &dyn ValueView)))
    }
    fn contains_key(&self, index: &str) -> bool {
        self.lookup(index).is_some()
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        match self.lookup(index) {
            Some(v) => Some(v),
            // Liquid answers `.size` itself (the number of keys) when the object has no such key.
            None if index == "size" => None,
            None => Some(&NIL),
        }
    }
}

impl ValueView for Ctx {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        match self {
            Ctx::Nil => DisplayCow::Owned(Box::new("")),
            Ctx::Scalar(s) => s.render(),
            Ctx::Array(a) => a.render(),
            Ctx::Object(o) => o.render(),
        }
    }
    fn source(&self) -> DisplayCow<'_> {
        match self {
            Ctx::Nil => DisplayCow::Owned(Box::new("nil")),
            Ctx::Scalar(s) => s.source(),
            Ctx::Array(a) => a.source(),
            Ctx::Object(o) => o.source(),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Ctx::Nil => "nil",
            Ctx::Scalar(s) => s.type_name(),
            Ctx::Array(a) => a.type_name(),
            Ctx::Object(o) => o.type_name(),
        }
    }
    fn query_state(&self, state: State) -> bool {
        match self {
            Ctx::Nil => !matches!(state, State::Truthy),
            Ctx::Scalar(s) => s.query_state(state),
            Ctx::Array(a) => a.query_state(state),
            Ctx::Object(o) => o.query_state(state),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        match self {
            Ctx::Nil => KStringCow::from_static(""),
            Ctx::Scalar(s) => s.to_kstr(),
            Ctx::Array(a) => a.to_kstr(),
            Ctx::Object(o) => o.to_kstr(),
        }
    }
    fn to_value(&self) -> LiquidValue {
        self.to_liquid()
    }
    fn as_scalar(&self) -> Option<liquid_core::model::ScalarCow<'_>> {
        match self {
            Ctx::Scalar(s) => Some(s.as_ref()),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&dyn liquid_core::model::ArrayView> {
        match self {
            Ctx::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A missing value answers lookups as an empty object, so deeper paths stay nil instead of failing.
    fn as_object(&self) -> Option<&dyn ObjectView> {
        match self {
            Ctx::Object(o) => Some(o),
            Ctx::Nil => Some(&EMPTY),
            _ => None,
        }
    }
    fn is_nil(&self) -> bool {
        matches!(self, Ctx::Nil)
    }
}

/// The top-level object a template renders against. Liquid asks the root whether it holds a variable before
/// looking it up; answering yes for every name makes a missing top-level variable nil instead of an error.
#[derive(Debug)]
pub struct Globals<'a>(pub &'a CtxObject);

impl ValueView for Globals<'_> {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        self.0.render()
    }
    fn source(&self) -> DisplayCow<'_> {
        self.0.source()
    }
    fn type_name(&self) -> &'static str {
        "object"
    }
    fn query_state(&self, state: State) -> bool {
        self.0.query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        self.0.to_kstr()
    }
    fn to_value(&self) -> LiquidValue {
        self.0.to_value()
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
}

impl ObjectView for Globals<'_> {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        self.0.size()
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        self.0.keys()
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        self.0.values()
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        self.0.iter()
    }
    fn contains_key(&self, _index: &str) -> bool {
        true
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        self.0.get(index)
    }
}

impl CtxObject {
    /// Adds `key: nil` to every object below this one that lacks it. Used after a strict copy of a value (a loop
    /// variable) failed on a missing key: the same render with the key present as nil is what a lenient lookup
    /// would have produced.
    pub fn fill_missing_key(&mut self, key: &str) {
        for (_, v) in self.entries.iter_mut() {
            v.fill_missing_key(key);
        }
    }
}

impl Ctx {
    fn fill_missing_key(&mut self, key: &str) {
        match self {
            Ctx::Object(o) => {
                if o.lookup(key).is_none() {
                    o.insert(key, Ctx::Nil);
                }
                o.fill_missing_key(key);
            }
            Ctx::Array(a) => a.iter_mut().for_each(|v| v.fill_missing_key(key)),
            Ctx::Nil | Ctx::Scalar(_) => {}
        }
    }
}
