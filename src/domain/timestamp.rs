//! Event time, normalised to ISO-8601 UTC with milliseconds (`2024-11-18T19:10:00.123Z`), the form Heap documents.
//! Accepts RFC 3339 strings (any offset), `YYYY-MM-DD HH:MM:SS`, date-only strings, and Unix epochs in seconds or
//! milliseconds, as numbers or digit strings.

use super::FieldError;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Timestamp(String);

/// Epoch values at or above this are milliseconds (1e11 s is the year 5138).
const MILLIS_THRESHOLD: f64 = 1e11;

impl Timestamp {
    pub fn parse(raw: &Value) -> Result<Self, FieldError> {
        let dt = match raw {
            Value::Number(n) => n.as_f64().and_then(from_epoch),
            Value::String(s) => parse_str(s.trim()),
            _ => None,
        };
        dt.map(Self::from_datetime).ok_or_else(|| {
            FieldError::invalid(
                "timestamp",
                format!("timestamp {raw} is not an ISO-8601 date-time or a Unix epoch in seconds or milliseconds"),
            )
        })
    }

    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        Self(dt.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn from_epoch(v: f64) -> Option<DateTime<Utc>> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let millis = if v >= MILLIS_THRESHOLD { v } else { v * 1000.0 };
    Utc.timestamp_millis_opt(millis as i64).single()
}

fn parse_str(s: &str) -> Option<DateTime<Utc>> {
    if s.is_empty() {
        return None;
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return s.parse::<f64>().ok().and_then(from_epoch);
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(naive.and_utc());
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f %z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepted_forms_normalise_to_utc_millis() {
        let cases = [
            (json!("2024-11-18T19:10:00.123Z"), "2024-11-18T19:10:00.123Z"),
            (json!("2024-11-18T21:10:00+02:00"), "2024-11-18T19:10:00.000Z"),
            (json!("2024-11-18 19:10:00"), "2024-11-18T19:10:00.000Z"),
            (json!("2024-11-18"), "2024-11-18T00:00:00.000Z"),
            (json!(1731957000), "2024-11-18T19:10:00.000Z"),
            (json!(1731957000123u64), "2024-11-18T19:10:00.123Z"),
            (json!("1731957000"), "2024-11-18T19:10:00.000Z"),
        ];
        for (input, want) in cases {
            assert_eq!(Timestamp::parse(&input).unwrap().as_str(), want, "{input}");
        }
    }

    #[test]
    fn nonsense_is_rejected_naming_timestamp() {
        for bad in [json!("yesterday"), json!(""), json!(true), json!(-5), json!({"t": 1})] {
            assert_eq!(Timestamp::parse(&bad).unwrap_err().field, "timestamp", "{bad}");
        }
    }
}
