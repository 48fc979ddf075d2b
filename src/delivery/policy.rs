//! What to do after an attempt, as data from pure functions: no I/O, no clock, easy to test.
//!
//! Heap publishes no status codes for its ingestion endpoints; this policy follows heap-api.md §5: 2xx delivered;
//! 400/413/422 split a batch to isolate the bad event, and dead-letter a single one; 408, 423, 429 and 5xx (but
//! 501) retry with backoff, honouring Retry-After; other 4xx dead-letter; timeouts and connection errors retry.
//! A 3xx is never followed (see `heap_client`) and never counts as delivered: it is retried with its own reason
//! ("Heap answered 3xx: redirect to ... (not followed)"), so the delivery log shows a misconfigured base URL and the
//! event is dead after `delivery.max_retry_hours` if nothing changes.

use std::time::Duration;

/// What an attempt came back with.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpOutcome {
    Status { code: u16, retry_after: Option<Duration>, body: String },
    Timeout,
    Connect(String),
    Other(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Delivered,
    /// Try again later; `after` is the server's Retry-After when it sent one.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Heap refused the batch as a whole: send the halves to find the bad event.
    Split {
        reason: String,
    },
    /// Will never succeed: keep with Heap's answer.
    DeadLetter {
        reason: String,
    },
    /// The app_id is being rate-limited: pause it for `after` (or the backoff) and retry.
    Throttled {
        after: Option<Duration>,
        reason: String,
    },
}

pub fn classify(outcome: &HttpOutcome, batch_len: usize) -> Decision {
    match outcome {
        HttpOutcome::Status { code, retry_after, body } => {
            let reason = format!("Heap answered {code}: {}", summarize(body));
            match *code {
                200..=299 => Decision::Delivered,
                300..=399 => Decision::Retry { after: None, reason },
                400 | 413 | 422 if batch_len > 1 => Decision::Split { reason },
                429 => Decision::Throttled { after: *retry_after, reason },
                408 | 423 => Decision::Retry { after: *retry_after, reason },
                501 => Decision::DeadLetter { reason },
                500..=599 => Decision::Retry { after: *retry_after, reason },
                _ => Decision::DeadLetter { reason },
            }
        }
        HttpOutcome::Timeout => Decision::Retry { after: None, reason: "timed out waiting for Heap".into() },
        HttpOutcome::Connect(e) => Decision::Retry { after: None, reason: format!("could not connect to Heap: {e}") },
        HttpOutcome::Other(e) => Decision::Retry { after: None, reason: format!("request to Heap failed: {e}") },
    }
}

/// Exponential backoff with jitter: attempt `n` (1-based) waits a random time between half and all of
/// `base * 2^(n-1)`, never more than `max`. `unit` is a random number in [0, 1).
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1).min(30)).unwrap_or(u32::MAX));
    let ceiling = exp.min(max);
    ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// Parses Retry-After: delta-seconds or an HTTP date. `now_unix` is the current time in Unix seconds.
pub fn parse_retry_after(value: &str, now_unix: i64) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Saturates: a value past u64 is "very long", which the client caps at delivery.backoff_max_secs.
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?.timestamp();
    Some(Duration::from_secs(when.saturating_sub(now_unix).max(0) as u64))
}

fn summarize(body: &str) -> String {
    let b = body.trim();
    if b.is_empty() {
        return "(empty body)".into();
    }
    let cut: String = b.chars().take(500).collect();
    if cut.len() < b.len() { format!("{cut}…") } else { cut }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> HttpOutcome {
        HttpOutcome::Status { code, retry_after: None, body: "bad".into() }
    }

    #[test]
    fn success_retry_split_and_dead_letter_follow_the_table() {
        assert_eq!(classify(&status(200), 10), Decision::Delivered);
        assert!(matches!(classify(&status(400), 10), Decision::Split { .. }));
        assert!(matches!(classify(&status(400), 1), Decision::DeadLetter { reason } if reason.contains("400: bad")));
        assert!(matches!(classify(&status(413), 2), Decision::Split { .. }));
        assert!(matches!(classify(&status(404), 5), Decision::DeadLetter { .. }));
        assert!(matches!(classify(&status(401), 5), Decision::DeadLetter { .. }));
        for code in [408, 423, 500, 502, 503, 504] {
            assert!(matches!(classify(&status(code), 5), Decision::Retry { .. }), "{code}");
        }
        assert!(matches!(classify(&status(501), 5), Decision::DeadLetter { .. }));
        assert!(matches!(classify(&status(429), 5), Decision::Throttled { .. }));
        assert!(matches!(classify(&HttpOutcome::Timeout, 1), Decision::Retry { .. }));
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(600));
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(1, base, max, 0.999_999).as_millis(), 999);
        assert_eq!(backoff(4, base, max, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(40, base, max, 0.0), Duration::from_secs(300));
        assert!(backoff(40, base, max, 1.0) <= max);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("7", 0), Some(Duration::from_secs(7)));
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT").unwrap().timestamp();
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn a_retry_after_past_u64_saturates_instead_of_failing() {
        assert_eq!(parse_retry_after("99999999999999999999999", 0), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(parse_retry_after("18446744073709551615", 0), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn a_redirect_is_retried_with_its_own_reason_never_delivered() {
        for code in [301, 302, 307, 308] {
            let o =
                HttpOutcome::Status { code, retry_after: None, body: "redirect to https://x (not followed)".into() };
            match classify(&o, 3) {
                Decision::Retry { reason, .. } => assert!(reason.contains("not followed"), "{reason}"),
                d => panic!("{code}: {d:?}"),
            }
        }
    }
}
