//! The delivery log's filters as an operator writes them (the `/admin/deliveries` query string, the console's
//! Deliveries form), parsed once into the store's [`EventFilter`]: both read the same function.

use crate::replay::{parse_status, time_range};
use crate::store::Query;
use crate::store::queries::EventFilter;
use serde::Deserialize;

/// The filters as text. An empty value is no filter (a form sends every field).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    pub status: Option<String>,
    pub source: Option<String>,
    pub environment: Option<String>,
    pub template: Option<String>,
    pub app_id: Option<String>,
    pub identity: Option<String>,
    /// A sender's message id or the event's idempotency key.
    pub key: Option<String>,
    /// ISO-8601 or Unix seconds.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The previous page's `next`: the page of older events.
    pub before: Option<String>,
    pub limit: Option<i64>,
}

/// A filter that does not parse, naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FilterError {
    pub field: &'static str,
    pub message: String,
}

/// The trimmed value, or none when empty.
fn given(v: &Option<String>) -> Option<String> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

impl FilterParams {
    /// The store's filter; `limit` when none is given, and never more than `max_limit`.
    pub fn parse(&self, limit: i64, max_limit: i64) -> Result<EventFilter, FilterError> {
        let status = given(&self.status)
            .map(|s| parse_status(&s).map_err(|message| FilterError { field: "status", message }))
            .transpose()?;
        let range = time_range(given(&self.since).as_deref(), given(&self.until).as_deref())
            .map_err(|message| FilterError { field: "since", message })?;
        Ok(EventFilter {
            query: Query {
                status,
                source: given(&self.source),
                environment: given(&self.environment),
                since: range.map(|r| r.0),
                until: range.map(|r| r.1),
                limit: self.limit.unwrap_or(limit).clamp(1, max_limit),
            },
            template: given(&self.template),
            app_id: given(&self.app_id),
            identity: given(&self.identity),
            key: given(&self.key),
            before: given(&self.before),
        })
    }

    /// The query string of these filters (without a limit) with another page cursor, for an "Older" link.
    pub fn with_before(&self, before: &str, enc: impl Fn(&str) -> String) -> String {
        let pairs = [
            ("status", &self.status),
            ("source", &self.source),
            ("environment", &self.environment),
            ("template", &self.template),
            ("app_id", &self.app_id),
            ("identity", &self.identity),
            ("key", &self.key),
            ("since", &self.since),
            ("until", &self.until),
        ];
        let mut q: Vec<String> =
            pairs.iter().filter_map(|(k, v)| given(v).map(|v| format!("{k}={}", enc(&v)))).collect();
        q.push(format!("before={}", enc(before)));
        q.join("&")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Status;

    #[test]
    fn empty_fields_are_no_filter_and_a_bad_status_names_its_field() {
        let p = FilterParams { status: Some(" ".into()), identity: Some(" u-1 ".into()), ..Default::default() };
        let f = p.parse(50, 100).expect("parses");
        assert_eq!((f.query.status, f.identity.as_deref(), f.query.limit), (None, Some("u-1"), 50));
        let bad = FilterParams { status: Some("lost".into()), ..Default::default() }.parse(50, 100);
        assert_eq!(bad.map(|_| ()).map_err(|e| e.field), Err("status"));
        let big = FilterParams { limit: Some(1_000_000), ..Default::default() }.parse(50, 10_000).expect("parses");
        assert_eq!(big.query.limit, 10_000);
    }

    #[test]
    fn a_listing_filter_names_the_field_at_fault_and_an_unknown_status_lists_every_status() {
        let parse = |status: Option<&str>, since: Option<&str>| {
            FilterParams { status: status.map(Into::into), since: since.map(Into::into), ..Default::default() }
                .parse(10, 100)
        };
        let err = parse(Some("lost"), None).unwrap_err();
        assert_eq!(err.field, "status");
        assert_eq!(
            err.message,
            "unknown status \"lost\"; one of pending, retrying, delivered, dead, rejected, replaced, held"
        );
        assert_eq!(parse(None, Some("yesterday")).unwrap_err().field, "since");
        let q = parse(Some("dead"), Some("2024-11-18T19:00:00Z")).unwrap().query;
        assert_eq!(
            (q.status, q.since, q.until, q.limit),
            (Some(Status::Dead), Some(1_731_956_400_000), Some(crate::store::Millis::MAX), 10)
        );
        assert!(crate::replay::selector(None, Some("held"), None, None).is_ok(), "a selection knows every status");
    }
}
