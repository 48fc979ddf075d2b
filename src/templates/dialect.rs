//! The Liquid the relay speaks: liquid-rust's standard library, made to forgive missing data the way Shopify's
//! Liquid does (CleverTap follows Shopify), plus CleverTap's dialect.
//!
//! - nil in arithmetic is 0 (`{{ Profile.points | plus: 200 }}`, `{{ 5000 | minus: Profile.credit_points }}`),
//!   and a string that is not a number is 0, as in Shopify; `join`, `first`, `last`, `map`, `size`, `sort`,
//!   `uniq`, `reverse`, `compact`, `concat` and `where` treat nil as an empty array;
//! - `nil == false` is false and `contains` on nil is false (see `if_block`);
//! - `capitalize` lowers the rest of the word; `default` may be used bare; `url_escape` and
//!   `url_param_escape` are there;
//! - `date` reads CleverTap's `$D_<seconds>` dates, ISO-8601, `YYYY-MM-DD[ HH:MM:SS]`, epoch seconds and
//!   milliseconds and `"now"`/`"today"`, and without a format prints CleverTap's `%Y-%m-%d %H:%M:%S`;
//! - `{% abort %}` stops the render: the item is reported as ignored, not refused;
//! - `cycle` and `tablerow` are left out: they print values without passing through the JSON escaping.

use super::if_block::{IfBlock, UnlessBlock};
use super::output::OutFilterParser;
use super::render::JsonFilterParser;
use super::tags::{AbortTag, AtTag, VarTag};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use liquid_core::parser::FilterArguments;
use liquid_core::{Display_filter, Expression, Filter, FilterParameters, FilterReflection, FromFilterParameters};
use liquid_core::{ParseFilter, Runtime};
use liquid_core::{Value as LiquidValue, ValueView};
use liquid_lib::stdlib;
use std::fmt;

/// CleverTap's default date format, used by `date` without an argument.
pub const CLEVERTAP_DATE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// A parser with the relay's Liquid and the given partials (`_partials/<name>.liquid` of one source).
pub fn parser(partials: &[(String, String)]) -> Result<liquid::Parser, liquid::Error> {
    let mut source = liquid::partials::InMemorySource::new();
    for (name, text) in partials {
        source.add(name.as_str(), text.as_str());
    }
    let empty_array = || LiquidValue::Array(Vec::new());
    let zero = || LiquidValue::scalar(0i64);
    let mut builder = liquid::ParserBuilder::new();
    for op in ARITHMETIC {
        builder = builder.filter(op);
    }
    builder
        .tag(stdlib::AssignTag)
        .tag(stdlib::BreakTag)
        .tag(stdlib::ContinueTag)
        .tag(stdlib::IncludeTag)
        .tag(stdlib::IncrementTag)
        .tag(stdlib::DecrementTag)
        .tag(stdlib::RenderTag)
        .tag(AbortTag)
        .tag(AtTag)
        .tag(VarTag)
        .block(stdlib::RawBlock)
        .block(IfBlock)
        .block(UnlessBlock)
        .block(stdlib::IfChangedBlock)
        .block(stdlib::ForBlock)
        .block(stdlib::CommentBlock)
        .block(stdlib::CaptureBlock)
        .block(stdlib::CaseBlock)
        .filter(NilAs::new(stdlib::Abs, zero))
        .filter(stdlib::Append)
        .filter(NilAs::new(stdlib::Ceil, zero))
        .filter(NilAs::new(stdlib::Compact, empty_array))
        .filter(NilAs::new(stdlib::Concat, empty_array))
        .filter(stdlib::Downcase)
        .filter(stdlib::Escape)
        .filter(stdlib::EscapeOnce)
        .filter(NilAs::new(stdlib::First, empty_array))
        .filter(NilAs::new(stdlib::Floor, zero))
        .filter(NilAs::new(stdlib::Join, empty_array))
        .filter(NilAs::new(stdlib::Last, empty_array))
        .filter(stdlib::Lstrip)
        .filter(NilAs::new(stdlib::Map, empty_array))
        .filter(stdlib::NewlineToBr)
        .filter(stdlib::Prepend)
        .filter(stdlib::Remove)
        .filter(stdlib::RemoveFirst)
        .filter(stdlib::Replace)
        .filter(stdlib::ReplaceFirst)
        .filter(NilAs::new(stdlib::Reverse, empty_array))
        .filter(NilAs::new(stdlib::Round, zero))
        .filter(stdlib::Rstrip)
        .filter(NilAs::new(stdlib::Size, empty_array))
        .filter(stdlib::Slice)
        .filter(NilAs::new(stdlib::Sort, empty_array))
        .filter(NilAs::new(stdlib::SortNatural, empty_array))
        .filter(stdlib::Split)
        .filter(stdlib::Strip)
        .filter(stdlib::StripHtml)
        .filter(stdlib::StripNewlines)
        .filter(stdlib::Truncate)
        .filter(stdlib::TruncateWords)
        .filter(NilAs::new(stdlib::Uniq, empty_array))
        .filter(stdlib::Upcase)
        .filter(stdlib::UrlDecode)
        .filter(stdlib::UrlEncode)
        .filter(NilAs::new(stdlib::Where, empty_array))
        .filter(DefaultParser)
        .filter(CapitalizeParser)
        .filter(UrlEscapeParser)
        .filter(UrlParamEscapeParser)
        .filter(DateParser)
        .filter(JsonFilterParser)
        .filter(OutFilterParser)
        .partials(liquid::partials::EagerCompiler::new(source))
        .build()
}

// ---- nil as an empty value -------------------------------------------------------------------------------------

/// Wraps a standard filter so that a nil input is read as `empty()` (0 or an empty array) instead of an error.
#[derive(Clone)]
struct NilAs<P> {
    inner: P,
    empty: fn() -> LiquidValue,
}

impl<P> NilAs<P> {
    fn new(inner: P, empty: fn() -> LiquidValue) -> Self {
        Self { inner, empty }
    }
}

impl<P: ParseFilter + Clone + 'static> ParseFilter for NilAs<P> {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        Ok(Box::new(NilAsFilter { inner: self.inner.parse(arguments)?, empty: self.empty }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self.inner.reflection()
    }
}

#[derive(Debug)]
struct NilAsFilter {
    inner: Box<dyn Filter>,
    empty: fn() -> LiquidValue,
}

impl fmt::Display for NilAsFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Filter for NilAsFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        if input.is_nil() { self.inner.evaluate(&(self.empty)(), runtime) } else { self.inner.evaluate(input, runtime) }
    }
}

// ---- arithmetic ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

/// Shopify's number coercion: nil, booleans and text that is not a number are 0.
fn num(v: &dyn ValueView) -> Num {
    let Some(s) = v.as_scalar() else { return Num::Int(0) };
    if s.type_name() == "boolean" {
        return Num::Int(0);
    }
    if let Some(i) = s.to_integer() {
        return Num::Int(i);
    }
    match s.to_float() {
        Some(f) => Num::Float(f),
        None => {
            let t = s.to_kstr();
            let t = t.as_str().trim();
            t.parse::<i64>().map(Num::Int).or_else(|_| t.parse::<f64>().map(Num::Float)).unwrap_or(Num::Int(0))
        }
    }
}

fn num_value(n: Num) -> LiquidValue {
    match n {
        Num::Int(i) => LiquidValue::scalar(i),
        Num::Float(f) => LiquidValue::scalar(f),
    }
}

fn as_f64(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

type IntOp = fn(i64, i64) -> Option<i64>;
type FloatOp = fn(f64, f64) -> f64;

fn arith(a: Num, b: Num, int: IntOp, float: FloatOp, name: &str) -> liquid_core::Result<LiquidValue> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => int(x, y)
            .map(LiquidValue::scalar)
            .ok_or_else(|| liquid_core::Error::with_msg(format!("{name}: {x} and {y} give no integer result"))),
        _ => Ok(num_value(Num::Float(float(as_f64(a), as_f64(b))))),
    }
}

#[derive(Debug, FilterParameters)]
struct OperandArgs {
    #[parameter(description = "The other operand; nil is 0.")]
    operand: Expression,
}

/// One of Shopify's arithmetic filters, with nil and non-numbers as 0.
#[derive(Clone, Copy)]
struct Arith {
    name: &'static str,
    description: &'static str,
    int: IntOp,
    float: FloatOp,
}

impl FilterReflection for Arith {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        self.description
    }
    fn positional_parameters(&self) -> &'static [liquid_core::parser::ParameterReflection] {
        <OperandArgs as liquid_core::parser::FilterParametersReflection>::positional_parameters()
    }
    fn keyword_parameters(&self) -> &'static [liquid_core::parser::ParameterReflection] {
        <OperandArgs as liquid_core::parser::FilterParametersReflection>::keyword_parameters()
    }
}

impl ParseFilter for Arith {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        use liquid_core::parser::FilterParameters as _;
        Ok(Box::new(ArithFilter { args: OperandArgs::from_args(arguments)?, op: *self }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

struct ArithFilter {
    args: OperandArgs,
    op: Arith,
}

impl fmt::Debug for ArithFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}", self.op.name, self.args)
    }
}

impl fmt::Display for ArithFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} : {}", self.op.name, self.args)
    }
}

impl Filter for ArithFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        use liquid_core::parser::FilterParameters as _;
        let args = self.args.evaluate(runtime)?;
        arith(num(input), num(args.operand.as_view()), self.op.int, self.op.float, self.op.name)
    }
}

const ARITHMETIC: [Arith; 7] = [
    Arith { name: "plus", description: "Adds; nil is 0.", int: |a, b| a.checked_add(b), float: |a, b| a + b },
    Arith { name: "minus", description: "Subtracts; nil is 0.", int: |a, b| a.checked_sub(b), float: |a, b| a - b },
    Arith { name: "times", description: "Multiplies; nil is 0.", int: |a, b| a.checked_mul(b), float: |a, b| a * b },
    Arith {
        name: "divided_by",
        description: "Divides (integers round down); nil is 0; dividing by 0 is an error.",
        int: |a, b| if b == 0 { None } else { Some(a.div_euclid(b)) },
        float: |a, b| a / b,
    },
    Arith {
        name: "modulo",
        description: "Remainder; nil is 0; modulo 0 is an error.",
        int: |a, b| if b == 0 { None } else { Some(a.rem_euclid(b)) },
        float: |a, b| a % b,
    },
    Arith { name: "at_least", description: "The larger of the two.", int: |a, b| Some(a.max(b)), float: f64::max },
    Arith { name: "at_most", description: "The smaller of the two.", int: |a, b| Some(a.min(b)), float: f64::min },
];

// ---- default, capitalize, url escapes ----------------------------------------------------------------------------

#[derive(Debug, FilterParameters)]
struct DefaultArgs {
    #[parameter(description = "The value used when the input is nil, false or empty; nothing when left out.")]
    default: Option<Expression>,
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "default",
    description = "The input, or the argument when the input is nil, false or empty (bare: nothing).",
    parameters(DefaultArgs),
    parsed(DefaultFilter)
)]
struct DefaultParser;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "default"]
struct DefaultFilter {
    #[parameters]
    args: DefaultArgs,
}

impl Filter for DefaultFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        let args = self.args.evaluate(runtime)?;
        if input.query_state(liquid_core::model::State::DefaultValue) {
            Ok(args.default.map_or(LiquidValue::Nil, |d| d.to_value()))
        } else {
            Ok(input.to_value())
        }
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "capitalize",
    description = "First character upper case, the rest lower case.",
    parsed(CapitalizeFilter)
)]
struct CapitalizeParser;

#[derive(Debug, Default, Display_filter)]
#[name = "capitalize"]
struct CapitalizeFilter;

impl Filter for CapitalizeFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        let s = input.to_kstr();
        let mut chars = s.as_str().chars();
        let out = match chars.next() {
            Some(first) => first.to_uppercase().chain(chars.as_str().to_lowercase().chars()).collect(),
            None => String::new(),
        };
        Ok(LiquidValue::scalar(out))
    }
}

/// Shopify's `url_escape`: percent-encodes what may not appear in a URL, keeping URL syntax (`/?&=:#`).
fn url_escape(s: &str, also_ampersand: bool) -> String {
    const KEEP: &[u8] = b"-._~!$'()*+,;=:@/?#[]";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || (KEEP.contains(&b) && !(also_ampersand && b == b'&')) {
            out.push(b as char);
        } else if b == b'&' && !also_ampersand {
            out.push('&');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(name = "url_escape", description = "Percent-encodes URL-unsafe characters.", parsed(UrlEscapeFilter))]
struct UrlEscapeParser;

#[derive(Debug, Default, Display_filter)]
#[name = "url_escape"]
struct UrlEscapeFilter;

impl Filter for UrlEscapeFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        Ok(LiquidValue::scalar(url_escape(input.to_kstr().as_str(), false)))
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "url_param_escape",
    description = "Percent-encodes URL-unsafe characters and `&`.",
    parsed(UrlParamEscapeFilter)
)]
struct UrlParamEscapeParser;

#[derive(Debug, Default, Display_filter)]
#[name = "url_param_escape"]
struct UrlParamEscapeFilter;

impl Filter for UrlParamEscapeFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        Ok(LiquidValue::scalar(url_escape(input.to_kstr().as_str(), true)))
    }
}

// ---- date ------------------------------------------------------------------------------------------------------

#[derive(Debug, FilterParameters)]
struct DateArgs {
    #[parameter(description = "strftime format; CleverTap's `%Y-%m-%d %H:%M:%S` when left out.", arg_type = "str")]
    format: Option<Expression>,
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "date",
    description = "Formats a date: $D_ dates, ISO-8601, epoch seconds or milliseconds, now, today.",
    parameters(DateArgs),
    parsed(DateFilter)
)]
struct DateParser;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "date"]
struct DateFilter {
    #[parameters]
    args: DateArgs,
}

/// Reads a date the way CleverTap and its senders write them. `None` when it is not one.
pub fn read_date(v: &dyn ValueView) -> Option<DateTime<Utc>> {
    let s = v.as_scalar()?;
    let epoch = |n: f64| {
        // Past 10^11 a number is milliseconds (10^11 seconds is the year 5138).
        let secs = if n.abs() >= 1e11 { n / 1000.0 } else { n };
        let whole = secs.floor();
        Utc.timestamp_opt(whole as i64, ((secs - whole) * 1e9) as u32).single()
    };
    match s.type_name() {
        "whole number" | "fractional number" => return epoch(s.to_float()?),
        "boolean" => return None,
        _ => {}
    }
    let text = s.to_kstr();
    let t = text.as_str().trim();
    match t {
        "now" | "today" => return Some(Utc::now()),
        _ => {}
    }
    if let Some(rest) = t.strip_prefix("$D_") {
        return epoch(rest.parse().ok()?);
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-') && !t[1..].contains('-') {
        return epoch(t.parse().ok()?);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, f) {
            return Some(d.and_utc());
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S%.f %z", "%d %b %Y %H:%M:%S %z", "%a, %d %b %Y %H:%M:%S %z"] {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Some(d.with_timezone(&Utc));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|d| d.and_utc());
    }
    None
}

impl Filter for DateFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<LiquidValue> {
        let args = self.args.evaluate(runtime)?;
        let Some(date) = read_date(input) else {
            // Not a date: unchanged, as in Shopify.
            return Ok(input.to_value());
        };
        let format = args.format.as_ref().map_or(CLEVERTAP_DATE_FORMAT, |f| f.as_str());
        if format.is_empty() {
            return Ok(input.to_value());
        }
        let mut out = String::new();
        use std::fmt::Write as _;
        write!(out, "{}", date.format(format))
            .map_err(|_| liquid_core::Error::with_msg(format!("date: invalid format {format:?}")))?;
        Ok(LiquidValue::scalar(out))
    }
}
