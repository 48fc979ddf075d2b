//! Per-source request budgets: a token bucket per source (`sources.<name>.requests_per_minute`), refilled
//! continuously, holding at most one minute's budget. An empty bucket answers 429 with Retry-After.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RequestRate {
    per_minute: u32,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RequestRate {
    /// `per_minute` = 0 turns the budget off.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, bucket: Mutex::new(Bucket { tokens: f64::from(per_minute), at: Instant::now() }) }
    }

    /// Takes one request from the budget, or says how long until one is available (whole seconds, at least 1).
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let per_sec = f64::from(self.per_minute) / 60.0;
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(f64::from(self.per_minute));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - b.tokens) / per_sec).ceil().max(1.0);
        Err(Duration::from_secs(wait as u64))
    }

    /// Returns one request to the budget (a request refused after it was taken: a failed signature).
    pub fn give_back(&self) {
        if self.per_minute == 0 {
            return;
        }
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.tokens = (b.tokens + 1.0).min(f64::from(self.per_minute));
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_minutes_budget_passes_and_the_next_request_waits() {
        let r = RequestRate::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.take(t0).is_ok());
        }
        assert_eq!(r.take(t0), Err(Duration::from_secs(20)));
        assert!(r.take(t0 + Duration::from_secs(20)).is_ok(), "one token back after 60/3 seconds");
    }

    #[test]
    fn zero_means_no_budget() {
        let r = RequestRate::new(0);
        for _ in 0..10_000 {
            assert!(r.take(Instant::now()).is_ok());
        }
    }
}
