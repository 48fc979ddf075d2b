//! One shared HTTP client for Heap. Builds bulk bodies from stored payloads and reports what happened; it makes no
//! retry decisions (that is `policy`).
//!
//! What a misbehaving answer cannot do: redirects are never followed (a 307 would re-post the batch, personal data,
//! to another host; a 301 would turn into a GET whose 200 looks like a delivery), so a 3xx comes back as it is and
//! `policy` retries it with its own reason; `Retry-After` is capped at `delivery.backoff_max_secs` (a huge value
//! would park an event forever); and at most `MAX_ANSWER_BYTES` of an answer's body are read (the rest is dropped
//! with the connection).

use super::policy::{HttpOutcome, parse_retry_after};
use crate::domain::CallKind;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct HeapClient {
    client: reqwest::Client,
    base_url: String,
    /// The longest Retry-After honoured; longer ones are cut to it.
    retry_after_cap: Duration,
}

/// The most of an answer's body read from Heap: enough for any error message it sends.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl HeapClient {
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("heap-relay/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(16)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            retry_after_cap: Duration::from_secs(600),
        })
    }

    /// Caps Retry-After (`delivery.backoff_max_secs`).
    pub fn with_retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = cap;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one bulk call: `{"app_id": .., "events"|"users": [payloads]}`. Payloads are the JSON text stored at
    /// ingest (already validated), joined without re-parsing.
    pub async fn send(&self, kind: CallKind, app_id: &str, payloads: &[&str]) -> (HttpOutcome, Duration) {
        let body = bulk_body(kind, app_id, payloads);
        let started = Instant::now();
        let result = self
            .client
            .post(format!("{}{}", self.base_url, kind.path()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let outcome = match result {
            Ok(resp) => {
                let code = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, chrono::Utc::now().timestamp()))
                    .map(|d| d.min(self.retry_after_cap));
                let mut body = match resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()) {
                    Some(loc) if (300..400).contains(&code) => {
                        format!("redirect to {} (not followed) ", loc.chars().take(200).collect::<String>())
                    }
                    _ => String::new(),
                };
                body.push_str(&read_prefix(resp, MAX_ANSWER_BYTES).await);
                HttpOutcome::Status { code, retry_after, body }
            }
            Err(e) if e.is_timeout() => HttpOutcome::Timeout,
            Err(e) if e.is_connect() => HttpOutcome::Connect(error_chain(&e)),
            Err(e) => HttpOutcome::Other(error_chain(&e)),
        };
        (outcome, started.elapsed())
    }
}

/// At most `max` bytes of an answer's body, as text; the rest is never read.
async fn read_prefix(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < max {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(max - buf.len());
                buf.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn bulk_body(kind: CallKind, app_id: &str, payloads: &[&str]) -> String {
    let mut body = String::with_capacity(payloads.iter().map(|p| p.len() + 1).sum::<usize>() + 64);
    body.push_str("{\"app_id\":");
    body.push_str(&serde_json::Value::String(app_id.to_owned()).to_string());
    body.push_str(",\"");
    body.push_str(kind.bulk_field());
    body.push_str("\":[");
    for (i, p) in payloads.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(p);
    }
    body.push_str("]}");
    body
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_body_is_valid_json_with_app_id_once() {
        let b = bulk_body(CallKind::Track, "12", &[r#"{"identity":"a"}"#, r#"{"identity":"b"}"#]);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v, serde_json::json!({"app_id": "12", "events": [{"identity": "a"}, {"identity": "b"}]}));
    }
}
