//! The values a template reads, with lenient lookups.
//!
//! Stock liquid-rust fails a render when a variable or key is missing, even before `default` can act
//! (`{{ Profile.Email | default: 'x' }}` errors when `Email` is absent). [`Ctx`] answers every missing key with a
//! nil that also behaves as an empty object, so `default` works at any depth (`Profile.address.city`) and
//! `{% if Profile.Email %}` is false. Keys are looked up exactly first and then case-insensitively, because
//! vendors change key casing between versions (CleverTap's `Email`/`email`).
//!
//! The values are read where they are in the parsed body: a source builds a few objects of its own (CleverTap's
//! `Profile` gathers three parts of a profile) whose leaves are borrowed JSON ([`Ctx::Json`]), so a variable
//! costs a pointer, not a copy, and a batch-level field (a Segment batch's `context`) is shared by every message
//! instead of copied into each ([`Ctx::Merged`]). CleverTap's `$D_` dates are read as ISO-8601 where they are.
//!
//! Values copied into a plain liquid value (a `for` loop variable, `assign`) are strict again; the renderer treats
//! an unknown-variable error there as "renders to nothing" (see `render.rs`).

use liquid_core::model::{ArrayView, DisplayCow, KString, KStringCow, Scalar, ScalarCow, State};
use liquid_core::{ObjectView, Value as LiquidValue, ValueView};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

/// How a borrowed JSON string reads: as sent, or with CleverTap's `$D_<epoch>` dates as ISO-8601.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dates {
    AsSent,
    CleverTap,
}

#[derive(Debug, Clone)]
pub enum Ctx<'a> {
    Nil,
    Scalar(Scalar),
    /// A part of the body, read in place.
    Json(&'a Value, Dates),
    /// An object of the message's own keys over a shared one's (a Segment batch `context` under a message's own).
    Merged(Merged<'a>),
    /// An object's own entries over a JSON map's, hidden where the object has the name in any casing (CleverTap's
    /// `Profile` over its `systemProfileData`).
    Over(Box<Over<'a>>),
    Array(Vec<Ctx<'a>>),
    Object(CtxObject<'a>),
}

/// An object's entries, sorted by key (as a JSON map iterates): one allocation per object instead of a B-tree's
/// nodes, and binary search for the exact-case lookup. Keys are borrowed from the body where they can be.
#[derive(Debug, Clone, Default)]
pub struct CtxObject<'a> {
    entries: Vec<(Cow<'a, str>, Ctx<'a>)>,
}

static NIL: Ctx<'static> = Ctx::Nil;
static EMPTY: CtxObject<'static> = CtxObject { entries: Vec::new() };

impl<'a> Ctx<'a> {
    /// A part of the body, read in place (`dates`: how its strings read).
    pub fn json(v: &'a Value, dates: Dates) -> Ctx<'a> {
        match v {
            Value::Null => Ctx::Nil,
            _ => Ctx::Json(v, dates),
        }
    }

    pub fn str(s: impl Into<String>) -> Ctx<'a> {
        Ctx::Scalar(Scalar::new(s.into()))
    }

    fn to_liquid(&self) -> LiquidValue {
        match self {
            Ctx::Nil => LiquidValue::Nil,
            Ctx::Scalar(s) => LiquidValue::Scalar(s.clone()),
            Ctx::Json(v, d) => json_to_liquid(v, *d),
            Ctx::Merged(m) => m.to_value(),
            Ctx::Over(o) => o.to_value(),
            Ctx::Array(a) => LiquidValue::Array(a.iter().map(Ctx::to_liquid).collect()),
            Ctx::Object(o) => o.to_value(),
        }
    }

    /// The value as the view liquid and the relay's outputs read.
    pub fn view(&self) -> &dyn ValueView {
        match self {
            Ctx::Json(v, Dates::AsSent) => JsonView::<AsSent>::of(v),
            Ctx::Json(v, Dates::CleverTap) => JsonView::<CleverTapDates>::of(v),
            Ctx::Merged(m) => m,
            Ctx::Over(o) => o.as_ref(),
            other => other,
        }
    }

    /// The same value built of owned objects (for `fill_missing_key`, which edits them).
    fn owned(&self) -> Ctx<'a> {
        match self {
            Ctx::Json(Value::Object(m), d) => Ctx::Object(CtxObject {
                entries: m.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), Ctx::json(v, *d).owned())).collect(),
            }),
            Ctx::Json(Value::Array(a), d) => Ctx::Array(a.iter().map(|v| Ctx::json(v, *d).owned()).collect()),
            Ctx::Merged(m) => {
                let mut o = CtxObject::from_json(m.base, m.dates);
                for (k, v) in m.own {
                    o.insert(k.as_str(), Ctx::json(v, m.dates));
                }
                Ctx::Object(o).owned()
            }
            Ctx::Over(o) => {
                let mut top = o.top.clone();
                top.entries.extend(o.visible_under().map(|(k, v)| (Cow::Borrowed(k.as_str()), Ctx::json(v, o.dates))));
                top.entries.sort_by(|a, b| a.0.cmp(&b.0));
                Ctx::Object(top).owned()
            }
            Ctx::Object(o) => {
                Ctx::Object(CtxObject { entries: o.entries.iter().map(|(k, v)| (k.clone(), v.owned())).collect() })
            }
            Ctx::Array(a) => Ctx::Array(a.iter().map(Ctx::owned).collect()),
            other => other.clone(),
        }
    }
}

impl<'a> CtxObject<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A JSON object's entries, borrowed; a JSON map iterates in key order, so the entries come out sorted.
    pub fn from_json(o: &'a Map<String, Value>, dates: Dates) -> Self {
        Self { entries: o.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), Ctx::json(v, dates))).collect() }
    }

    pub fn insert(&mut self, key: impl Into<Cow<'a, str>>, value: Ctx<'a>) {
        let key = key.into();
        match self.entries.binary_search_by(|(k, _)| k.as_ref().cmp(key.as_ref())) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (key, value)),
        }
    }

    /// Inserts only when this exact key is not there yet.
    pub fn insert_if_absent(&mut self, key: impl Into<Cow<'a, str>>, value: Ctx<'a>) {
        let key = key.into();
        if let Err(i) = self.entries.binary_search_by(|(k, _)| k.as_ref().cmp(key.as_ref())) {
            self.entries.insert(i, (key, value));
        }
    }

    /// Inserts only when no key of that name (in any casing) is there yet.
    pub fn insert_missing(&mut self, key: impl Into<Cow<'a, str>>, value: Ctx<'a>) {
        let key = key.into();
        if self.lookup(&key).is_none() {
            self.insert(key, value);
        }
    }

    pub fn lookup(&self, key: &str) -> Option<&Ctx<'a>> {
        match self.entries.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
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

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Ctx<'a>)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

// ---- borrowed JSON as liquid values ------------------------------------------------------------------------------

/// How a borrowed JSON string reads (see [`Dates`]), as a type so that the views below can be cast from `&Value`.
pub trait DateRule: 'static {
    const DATES: Dates;
}

#[derive(Debug)]
pub enum AsSent {}
#[derive(Debug)]
pub enum CleverTapDates {}

impl DateRule for AsSent {
    const DATES: Dates = Dates::AsSent;
}
impl DateRule for CleverTapDates {
    const DATES: Dates = Dates::CleverTap;
}

/// A JSON value viewed as a liquid value, in place.
#[repr(transparent)]
pub struct JsonView<D>(Value, PhantomData<D>);
/// A JSON object viewed as a liquid object, with lenient lookups.
#[repr(transparent)]
pub struct JsonMap<D>(Map<String, Value>, PhantomData<D>);
/// A JSON array viewed as a liquid array.
#[repr(transparent)]
pub struct JsonArray<D>(Vec<Value>, PhantomData<D>);

impl<D: DateRule> JsonView<D> {
    pub fn of(v: &Value) -> &Self {
        // SAFETY: `JsonView<D>` is `repr(transparent)` over `Value` (its other field is a zero-sized marker), so
        // the two references have the same layout and the view borrows the value for as long as the reference.
        unsafe { &*(v as *const Value as *const Self) }
    }
}

impl<D: DateRule> JsonMap<D> {
    fn of(m: &Map<String, Value>) -> &Self {
        // SAFETY: as `JsonView::of`: `repr(transparent)` over `Map<String, Value>`.
        unsafe { &*(m as *const Map<String, Value> as *const Self) }
    }

    fn lookup(&self, key: &str) -> Option<&Value> {
        lookup_json(&self.0, key)
    }
}

impl<D: DateRule> JsonArray<D> {
    fn of(a: &Vec<Value>) -> &Self {
        // SAFETY: as `JsonView::of`: `repr(transparent)` over `Vec<Value>`.
        unsafe { &*(a as *const Vec<Value> as *const Self) }
    }
}

fn lookup_json<'m>(m: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.len() == key.len() && k.as_bytes().eq_ignore_ascii_case(key.as_bytes()))
            .map(|(_, v)| v)
    })
}

/// A JSON string as the template reads it.
fn read_str(s: &str, dates: Dates) -> ScalarCow<'_> {
    if dates == Dates::CleverTap
        && let Some(date) = crate::sources::clevertap::ct_date(s)
    {
        return ScalarCow::new(date);
    }
    ScalarCow::new(s)
}

/// A JSON scalar as liquid's: integers that fit in i64 stay integers, other numbers are floats.
fn json_scalar(v: &Value, dates: Dates) -> Option<ScalarCow<'_>> {
    Some(match v {
        Value::Bool(b) => ScalarCow::new(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ScalarCow::new(i),
            None => ScalarCow::new(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => read_str(s, dates),
        _ => return None,
    })
}

fn json_to_liquid(v: &Value, dates: Dates) -> LiquidValue {
    match v {
        Value::Null => LiquidValue::Nil,
        Value::Array(a) => LiquidValue::Array(a.iter().map(|x| json_to_liquid(x, dates)).collect()),
        Value::Object(m) => {
            LiquidValue::Object(m.iter().map(|(k, x)| (KString::from_ref(k), json_to_liquid(x, dates))).collect())
        }
        scalar => json_scalar(scalar, dates).map_or(LiquidValue::Nil, |s| LiquidValue::Scalar(s.into_owned())),
    }
}

impl<D: DateRule> fmt::Debug for JsonView<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl<D: DateRule> fmt::Debug for JsonMap<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl<D: DateRule> fmt::Debug for JsonArray<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Liquid prints an array by gluing its items, an object by gluing keys and values; kept for compatibility.
struct GluedJson<'v>(&'v Value, Dates);

impl fmt::Display for GluedJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::Null => Ok(()),
            Value::Array(a) => a.iter().try_for_each(|x| write!(f, "{}", GluedJson(x, self.1))),
            Value::Object(m) => m.iter().try_for_each(|(k, x)| write!(f, "{k}{}", GluedJson(x, self.1))),
            scalar => match json_scalar(scalar, self.1) {
                Some(s) => write!(f, "{}", s.render()),
                None => Ok(()),
            },
        }
    }
}

impl<D: DateRule> ValueView for JsonView<D> {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(GluedJson(&self.0, D::DATES)))
    }
    fn source(&self) -> DisplayCow<'_> {
        match &self.0 {
            Value::Null => DisplayCow::Owned(Box::new("nil")),
            Value::String(s) => DisplayCow::Owned(Box::new(format!("\"{}\"", read_str(s, D::DATES).to_kstr()))),
            other => DisplayCow::Owned(Box::new(GluedJson(other, D::DATES))),
        }
    }
    fn type_name(&self) -> &'static str {
        match &self.0 {
            Value::Null => "nil",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
            scalar => json_scalar(scalar, D::DATES).map_or("nil", |s| s.type_name()),
        }
    }
    fn query_state(&self, state: State) -> bool {
        match &self.0 {
            Value::Null => !matches!(state, State::Truthy),
            Value::Array(a) => match state {
                State::Truthy => true,
                State::DefaultValue | State::Empty | State::Blank => a.is_empty(),
            },
            Value::Object(m) => match state {
                State::Truthy => true,
                State::DefaultValue | State::Empty | State::Blank => m.is_empty(),
            },
            scalar => json_scalar(scalar, D::DATES).is_some_and(|s| s.query_state(state)),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        match &self.0 {
            Value::Null => KStringCow::from_static(""),
            Value::String(s) if D::DATES == Dates::AsSent => KStringCow::from_ref(s),
            Value::Array(_) | Value::Object(_) => KStringCow::from_string(GluedJson(&self.0, D::DATES).to_string()),
            scalar => json_scalar(scalar, D::DATES)
                .map_or_else(|| KStringCow::from_static(""), |s| KStringCow::from(s.to_kstr().into_owned())),
        }
    }
    fn to_value(&self) -> LiquidValue {
        json_to_liquid(&self.0, D::DATES)
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        json_scalar(&self.0, D::DATES)
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        match &self.0 {
            Value::Array(a) => Some(JsonArray::<D>::of(a)),
            _ => None,
        }
    }
    /// A missing value answers lookups as an empty object, so deeper paths stay nil instead of failing.
    fn as_object(&self) -> Option<&dyn ObjectView> {
        match &self.0 {
            Value::Object(m) => Some(JsonMap::<D>::of(m)),
            Value::Null => Some(&EMPTY),
            _ => None,
        }
    }
    fn is_nil(&self) -> bool {
        self.0.is_null()
    }
}

impl<D: DateRule> ValueView for JsonArray<D> {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(GluedArray(&self.0, D::DATES)))
    }
    fn source(&self) -> DisplayCow<'_> {
        self.render()
    }
    fn type_name(&self) -> &'static str {
        "array"
    }
    fn query_state(&self, state: State) -> bool {
        match state {
            State::Truthy => true,
            State::DefaultValue | State::Empty | State::Blank => self.0.is_empty(),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_string(GluedArray(&self.0, D::DATES).to_string())
    }
    fn to_value(&self) -> LiquidValue {
        LiquidValue::Array(self.0.iter().map(|x| json_to_liquid(x, D::DATES)).collect())
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        Some(self)
    }
}

struct GluedArray<'m>(&'m [Value], Dates);

impl fmt::Display for GluedArray<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|x| write!(f, "{}", GluedJson(x, self.1)))
    }
}

impl<D: DateRule> ArrayView for JsonArray<D> {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        self.0.len() as i64
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(self.0.iter().map(|v| JsonView::<D>::of(v) as &dyn ValueView))
    }
    /// Negative indexes count from the end, as liquid's arrays do.
    fn contains_key(&self, index: i64) -> bool {
        let index = if index >= 0 { index } else { self.size() + index };
        (0..self.size()).contains(&index)
    }
    fn get(&self, index: i64) -> Option<&dyn ValueView> {
        let index = if index >= 0 { index } else { self.size() + index };
        usize::try_from(index).ok().and_then(|i| self.0.get(i)).map(|v| JsonView::<D>::of(v) as &dyn ValueView)
    }
}

// ---- a message's object over a shared one -------------------------------------------------------------------------

/// `own`'s keys over `base`'s, merged as they are read: a batch-level object shared by every message of a batch.
#[derive(Debug, Clone)]
pub struct Merged<'a> {
    own: &'a Map<String, Value>,
    base: &'a Map<String, Value>,
    dates: Dates,
}

impl<'a> Merged<'a> {
    pub fn new(own: &'a Map<String, Value>, base: &'a Map<String, Value>, dates: Dates) -> Self {
        Self { own, base, dates }
    }

    fn lookup(&self, key: &str) -> Option<&'a Value> {
        // Exact keys first in either map, then any casing: the same order a merged map would answer in.
        self.own
            .get(key)
            .or_else(|| self.base.get(key))
            .or_else(|| lookup_json(self.own, key))
            .or_else(|| lookup_json(self.base, key))
    }

    /// Both maps' entries in key order, the message's own where both have a key.
    fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> + 'a {
        let mut own = self.own.iter().peekable();
        let mut base = self.base.iter().peekable();
        std::iter::from_fn(move || match (own.peek(), base.peek()) {
            (Some((a, _)), Some((b, _))) if a == b => {
                base.next();
                own.next()
            }
            (Some((a, _)), Some((b, _))) if a < b => own.next(),
            (Some(_), Some(_)) => base.next(),
            (Some(_), None) => own.next(),
            (None, _) => base.next(),
        })
    }
}

/// `top`'s entries over `under`'s; an entry of `under` is hidden where `top` has its name in any casing, as if
/// each had been inserted only when missing (CleverTap's `Profile`: the profile's own fields and `profileData`
/// over `systemProfileData`). Built without copying `under`.
#[derive(Debug, Clone)]
pub struct Over<'a> {
    top: CtxObject<'a>,
    under: &'a Map<String, Value>,
    dates: Dates,
}

impl<'a> Over<'a> {
    pub fn new(top: CtxObject<'a>, under: &'a Map<String, Value>, dates: Dates) -> Self {
        Self { top, under, dates }
    }

    fn lookup(&self, key: &str) -> Option<&dyn ValueView> {
        // A key of `under` is hidden only by a key of `top` equal to it in any casing, which `top`'s own lookup
        // (exact, then any casing) finds first.
        match self.top.lookup(key) {
            Some(v) => Some(v.view()),
            None => lookup_json(self.under, key).map(|v| view_of(v, self.dates)),
        }
    }

    /// The entries of `under` no key of `top` hides. One sorted list of `top`'s names in lower case, searched per
    /// key: linear in what a sender sends, where a case-insensitive scan of `top` per key would be quadratic.
    fn visible_under(&self) -> impl Iterator<Item = (&'a String, &'a Value)> + '_ {
        let mut hidden: Vec<String> = self.top.entries.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
        hidden.sort_unstable();
        self.under.iter().filter(move |(k, _)| hidden.binary_search(&k.to_ascii_lowercase()).is_err())
    }

    /// Every visible entry, in key order.
    fn entries(&self) -> Vec<(&str, &dyn ValueView)> {
        let mut all: Vec<(&str, &dyn ValueView)> =
            self.top.entries.iter().map(|(k, v)| (k.as_ref(), v.view())).collect();
        all.extend(self.visible_under().map(|(k, v)| (k.as_str(), view_of(v, self.dates))));
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }
}

fn view_of(v: &Value, dates: Dates) -> &dyn ValueView {
    match dates {
        Dates::AsSent => JsonView::<AsSent>::of(v),
        Dates::CleverTap => JsonView::<CleverTapDates>::of(v),
    }
}

// ---- the objects a template reads -------------------------------------------------------------------------------

/// What the relay's objects have in common ([`CtxObject`], a borrowed JSON map, [`Merged`], [`Over`]): lenient
/// lookups and their entries in key order. `lenient_object!` makes each a liquid object from these.
trait Entries {
    /// The value of `key`: exact first, then in any casing.
    fn find(&self, key: &str) -> Option<&dyn ValueView>;
    fn each(&self) -> Box<dyn Iterator<Item = (&str, &dyn ValueView)> + '_>;
    fn no_entries(&self) -> bool;
}

/// Liquid prints an object by gluing keys and values together; kept for compatibility.
struct Glued<'o>(&'o dyn Entries);

impl fmt::Display for Glued<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.each().try_for_each(|(k, v)| write!(f, "{k}{}", v.render()))
    }
}

/// `ValueView` and `ObjectView` for an [`Entries`] type: a missing key is nil (so `default` works at any depth),
/// except `size`, which liquid answers itself.
macro_rules! lenient_object {
    ([$($generics:tt)*] $t:ty) => {
        impl<$($generics)*> ValueView for $t {
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
                    State::DefaultValue | State::Empty | State::Blank => self.no_entries(),
                }
            }
            fn to_kstr(&self) -> KStringCow<'_> {
                KStringCow::from_string(Glued(self).to_string())
            }
            fn to_value(&self) -> LiquidValue {
                LiquidValue::Object(self.each().map(|(k, v)| (KString::from_ref(k), v.to_value())).collect())
            }
            fn as_object(&self) -> Option<&dyn ObjectView> {
                Some(self)
            }
        }

        impl<$($generics)*> ObjectView for $t {
            fn as_value(&self) -> &dyn ValueView {
                self
            }
            fn size(&self) -> i64 {
                self.each().count() as i64
            }
            fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
                Box::new(self.each().map(|(k, _)| KStringCow::from_ref(k)))
            }
            fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
                Box::new(self.each().map(|(_, v)| v))
            }
            fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
                Box::new(self.each().map(|(k, v)| (KStringCow::from_ref(k), v)))
            }
            fn contains_key(&self, index: &str) -> bool {
                self.find(index).is_some()
            }
            fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
                match self.find(index) {
                    Some(v) => Some(v),
                    None if index == "size" => None,
                    None => Some(&NIL),
                }
            }
        }
    };
}

impl Entries for CtxObject<'_> {
    fn find(&self, key: &str) -> Option<&dyn ValueView> {
        self.lookup(key).map(Ctx::view)
    }
    fn each(&self) -> Box<dyn Iterator<Item = (&str, &dyn ValueView)> + '_> {
        Box::new(self.entries.iter().map(|(k, v)| (k.as_ref(), v.view())))
    }
    fn no_entries(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<D: DateRule> Entries for JsonMap<D> {
    fn find(&self, key: &str) -> Option<&dyn ValueView> {
        self.lookup(key).map(|v| JsonView::<D>::of(v) as &dyn ValueView)
    }
    fn each(&self) -> Box<dyn Iterator<Item = (&str, &dyn ValueView)> + '_> {
        Box::new(self.0.iter().map(|(k, v)| (k.as_str(), JsonView::<D>::of(v) as &dyn ValueView)))
    }
    fn no_entries(&self) -> bool {
        self.0.is_empty()
    }
}

impl Entries for Merged<'_> {
    fn find(&self, key: &str) -> Option<&dyn ValueView> {
        self.lookup(key).map(|v| view_of(v, self.dates))
    }
    fn each(&self) -> Box<dyn Iterator<Item = (&str, &dyn ValueView)> + '_> {
        Box::new(self.entries().map(|(k, v)| (k.as_str(), view_of(v, self.dates))))
    }
    fn no_entries(&self) -> bool {
        self.own.is_empty() && self.base.is_empty()
    }
}

impl Entries for Over<'_> {
    fn find(&self, key: &str) -> Option<&dyn ValueView> {
        self.lookup(key)
    }
    fn each(&self) -> Box<dyn Iterator<Item = (&str, &dyn ValueView)> + '_> {
        Box::new(self.entries().into_iter())
    }
    fn no_entries(&self) -> bool {
        self.top.is_empty() && self.under.is_empty()
    }
}

lenient_object!([] CtxObject<'_>);
lenient_object!([D: DateRule] JsonMap<D>);
lenient_object!([] Merged<'_>);
lenient_object!([] Over<'_>);

impl ValueView for Ctx<'_> {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        match self {
            Ctx::Nil => DisplayCow::Owned(Box::new("")),
            Ctx::Scalar(s) => s.render(),
            Ctx::Array(a) => a.render(),
            Ctx::Object(o) => o.render(),
            Ctx::Json(..) | Ctx::Merged(_) | Ctx::Over(_) => self.view().render(),
        }
    }
    fn source(&self) -> DisplayCow<'_> {
        match self {
            Ctx::Nil => DisplayCow::Owned(Box::new("nil")),
            Ctx::Scalar(s) => s.source(),
            Ctx::Array(a) => a.source(),
            Ctx::Object(o) => o.source(),
            Ctx::Json(..) | Ctx::Merged(_) | Ctx::Over(_) => self.view().source(),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Ctx::Nil => "nil",
            Ctx::Scalar(s) => s.type_name(),
            Ctx::Array(a) => a.type_name(),
            Ctx::Object(o) => o.type_name(),
            Ctx::Json(..) | Ctx::Merged(_) | Ctx::Over(_) => self.view().type_name(),
        }
    }
    fn query_state(&self, state: State) -> bool {
        match self {
            Ctx::Nil => !matches!(state, State::Truthy),
            Ctx::Scalar(s) => s.query_state(state),
            Ctx::Array(a) => a.query_state(state),
            Ctx::Object(o) => o.query_state(state),
            Ctx::Json(..) | Ctx::Merged(_) | Ctx::Over(_) => self.view().query_state(state),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        match self {
            Ctx::Nil => KStringCow::from_static(""),
            Ctx::Scalar(s) => s.to_kstr(),
            Ctx::Array(a) => a.to_kstr(),
            Ctx::Object(o) => o.to_kstr(),
            Ctx::Json(..) | Ctx::Merged(_) | Ctx::Over(_) => self.view().to_kstr(),
        }
    }
    fn to_value(&self) -> LiquidValue {
        self.to_liquid()
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        match self {
            Ctx::Scalar(s) => Some(s.as_ref()),
            Ctx::Json(..) => self.view().as_scalar(),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        match self {
            Ctx::Array(a) => Some(a),
            Ctx::Json(..) => self.view().as_array(),
            _ => None,
        }
    }
    /// A missing value answers lookups as an empty object, so deeper paths stay nil instead of failing.
    fn as_object(&self) -> Option<&dyn ObjectView> {
        match self {
            Ctx::Object(o) => Some(o),
            Ctx::Nil => Some(&EMPTY),
            Ctx::Merged(m) => Some(m),
            Ctx::Over(o) => Some(o.as_ref()),
            Ctx::Json(..) => self.view().as_object(),
            _ => None,
        }
    }
    fn is_nil(&self) -> bool {
        match self {
            Ctx::Nil => true,
            Ctx::Json(v, _) => v.is_null(),
            _ => false,
        }
    }
}

/// The top-level object a template renders against. Liquid asks the root whether it holds a variable before
/// looking it up; answering yes for every name makes a missing top-level variable nil instead of an error.
#[derive(Debug)]
pub struct Globals<'o, 'a>(pub &'o CtxObject<'a>);

impl ValueView for Globals<'_, '_> {
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

impl ObjectView for Globals<'_, '_> {
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

impl CtxObject<'_> {
    /// Adds `key: nil` to every object below this one that lacks it. Used after a strict copy of a value (a loop
    /// variable) failed on a missing key: the same render with the key present as nil is what a lenient lookup
    /// would have produced.
    pub fn fill_missing_key(&mut self, key: &str) {
        for (_, v) in self.entries.iter_mut() {
            v.fill_missing_key(key);
        }
    }
}

impl Ctx<'_> {
    fn fill_missing_key(&mut self, key: &str) {
        match self {
            Ctx::Object(o) => {
                if o.lookup(key).is_none() {
                    o.insert(key.to_owned(), Ctx::Nil);
                }
                o.fill_missing_key(key);
            }
            Ctx::Array(a) => a.iter_mut().for_each(|v| v.fill_missing_key(key)),
            Ctx::Json(Value::Object(_) | Value::Array(_), _) | Ctx::Merged(_) | Ctx::Over(_) => {
                *self = self.owned();
                self.fill_missing_key(key);
            }
            Ctx::Nil | Ctx::Scalar(_) | Ctx::Json(..) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(o: &dyn ObjectView) -> Vec<String> {
        o.keys().map(|k| k.to_string()).collect()
    }

    fn text(v: Option<&dyn ValueView>) -> String {
        v.map(|v| v.to_kstr().to_string()).unwrap_or_default()
    }

    #[test]
    fn a_message_context_over_the_batch_context_wins_key_by_key_and_lists_each_key_once() {
        let own = json!({"b": "own", "c": 3});
        let base = json!({"a": 1, "b": "batch", "D": "d"});
        let m = Merged::new(own.as_object().unwrap(), base.as_object().unwrap(), Dates::AsSent);
        assert_eq!(keys(&m), ["D", "a", "b", "c"]);
        assert_eq!(text(m.get("b")), "own");
        assert_eq!(text(m.get("d")), "d", "any casing");
        assert!(m.get("missing").is_some_and(|v| v.is_nil()), "a missing key is nil, not an error");
        assert!(m.get("size").is_none(), "liquid answers .size itself");
    }

    #[test]
    fn a_profile_over_system_fields_hides_a_system_key_its_own_fields_have_in_any_casing() {
        let sys = json!({"email": "system@x.co", "city": "Dubai", "When": "$D_1731956100"});
        let mut top = CtxObject::new();
        top.insert("Email", Ctx::str("own@x.co"));
        let o = Over::new(top, sys.as_object().unwrap(), Dates::CleverTap);
        assert_eq!(keys(&o), ["Email", "When", "city"], "system `email` is hidden by `Email`");
        assert_eq!(text(o.get("email")), "own@x.co");
        assert_eq!(text(o.get("CITY")), "Dubai");
        assert_eq!(text(o.get("when")), "2024-11-18T18:55:00Z", "CleverTap dates read as ISO-8601");
    }

    #[test]
    fn borrowed_arrays_index_from_the_end_with_negative_indexes_as_liquid_does() {
        let v = json!([1, 2, 3]);
        let a = JsonView::<AsSent>::of(&v).as_array().unwrap();
        assert_eq!(text(a.get(-1)), "3");
        assert_eq!(text(a.get(0)), "1");
        assert!(a.get(3).is_none() && a.get(-4).is_none());
        assert_eq!(a.size(), 3);
    }
}
