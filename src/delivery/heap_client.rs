//! One shared HTTP client for Heap. Builds bulk bodies from stored payloads and reports what happened; it makes no
//! retry decisions (that is `policy`).

use super::policy::{HttpOutcome, parse_retry_after};
use crate::domain::CallKind;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct HeapClient {
    client: reqwest::Client,
    base_url: String,
}

impl HeapClient {
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("heap-relay/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(16)
            .build()?;
        Ok(Self { client, base_url: base_url.trim_end_matches('/').to_owned() })
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
                    .and_then(|v| parse_retry_after(v, chrono::Utc::now().timestamp()));
                let body = resp.text().await.unwrap_or_default();
                HttpOutcome::Status { code, retry_after, body }
            }
            Err(e) if e.is_timeout() => HttpOutcome::Timeout,
            Err(e) if e.is_connect() => HttpOutcome::Connect(error_chain(&e)),
            Err(e) => HttpOutcome::Other(error_chain(&e)),
        };
        (outcome, started.elapsed())
    }
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
