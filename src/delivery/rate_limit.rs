//! Client-side budgets that keep the relay under Heap's documented bulk-track limits: events per minute per app_id
//! (15,000) and per identity within an app_id (1,000). Token buckets that start full and refill continuously.

use crate::store::{Admission, Held, Millis};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The budgets of one instance, in memory (SQLite). Several instances share theirs in PostgreSQL instead
/// ([`take_shared`], the same arithmetic).
#[derive(Debug)]
pub struct RateLimiter {
    app_per_min: u32,
    identity_per_min: u32,
    buckets: Mutex<HashMap<(String, String), SharedBucket>>,
}

/// Identity buckets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    /// A rate of 0 turns that budget off.
    pub fn new(app_per_min: u32, identity_per_min: u32) -> Self {
        Self { app_per_min, identity_per_min, buckets: Mutex::new(HashMap::new()) }
    }

    /// The budgets, events per minute: (per app_id, per identity); 0 is off.
    pub fn rates(&self) -> (u32, u32) {
        (self.app_per_min, self.identity_per_min)
    }

    /// Takes one event's worth from the app's and the identity's budgets at `now` (the relay's clock), or says
    /// which is spent and until when (nothing is taken then).
    pub fn try_take(&self, app_id: &str, identity: &str, now: Millis) -> Result<(), Held> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > MAX_BUCKETS {
            let (app, ident) = (self.app_per_min as f64, self.identity_per_min as f64);
            b.retain(|(_, who), bucket| bucket.tokens < if who.is_empty() { app } else { ident });
        }
        let app_wait = shared_wait(&mut b, (app_id, ""), self.app_per_min, now);
        if app_wait > Duration::ZERO {
            return Err(Held::App { until: now + app_wait.as_millis() as i64 });
        }
        let id_wait = shared_wait(&mut b, (app_id, identity), self.identity_per_min, now);
        if id_wait > Duration::ZERO {
            return Err(Held::Identity { until: now + id_wait.as_millis() as i64 });
        }
        for (key, rate) in [((app_id, ""), self.app_per_min), ((app_id, identity), self.identity_per_min)] {
            if rate > 0
                && let Some(bucket) = b.get_mut(&(key.0.to_owned(), key.1.to_owned()))
            {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }

    /// When the app_id's budget is spent at `now` (less than one event's worth), how long until it holds `want`
    /// events' worth (at most a full bucket); None while it still lets one go, or with the app budget off.
    pub fn app_refill_wait(&self, app_id: &str, want: f64, now: Millis) -> Option<Duration> {
        if self.app_per_min == 0 {
            return None;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if shared_wait(&mut b, (app_id, ""), self.app_per_min, now).is_zero() {
            return None;
        }
        let cap = self.app_per_min as f64;
        let tokens = b.get(&(app_id.to_owned(), String::new())).map_or(cap, |bucket| bucket.tokens);
        Some(Duration::from_secs_f64((want.min(cap) - tokens).max(0.0) * 60.0 / cap))
    }
}

impl Admission for RateLimiter {
    fn admit(&self, app_id: &str, identity: &str, now: Millis) -> Result<(), Held> {
        self.try_take(app_id, identity, now)
    }
}

/// A budget as a shared store keeps it: tokens left, and when they were counted (Unix ms). Several relay instances
/// take from the same buckets, so wall-clock time stands in for `Instant`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedBucket {
    pub tokens: f64,
    pub at: i64,
}

/// Decides, in order, which of `wants` (app_id, identity) may go at `now_ms`: `None` to go (its tokens are taken),
/// or how long until its app's and identity's budgets both have one. Buckets missing from `buckets` start full;
/// `buckets` ends holding the states to write back. The same arithmetic as [`RateLimiter::try_take`].
pub fn take_shared(
    buckets: &mut HashMap<(String, String), SharedBucket>,
    wants: &[(&str, &str)],
    app_per_min: u32,
    identity_per_min: u32,
    now_ms: i64,
) -> Vec<Option<Duration>> {
    let mut out = Vec::with_capacity(wants.len());
    for &(app, who) in wants {
        let longest = shared_wait(buckets, (app, ""), app_per_min, now_ms).max(shared_wait(
            buckets,
            (app, who),
            identity_per_min,
            now_ms,
        ));
        if longest > Duration::ZERO {
            out.push(Some(longest));
            continue;
        }
        for (key, rate) in [((app, ""), app_per_min), ((app, who), identity_per_min)] {
            if rate > 0
                && let Some(b) = buckets.get_mut(&(key.0.to_owned(), key.1.to_owned()))
            {
                b.tokens -= 1.0;
            }
        }
        out.push(None);
    }
    out
}

fn shared_wait(
    buckets: &mut HashMap<(String, String), SharedBucket>,
    key: (&str, &str),
    per_min: u32,
    now_ms: i64,
) -> Duration {
    if per_min == 0 {
        return Duration::ZERO;
    }
    let cap = per_min as f64;
    let b = buckets.entry((key.0.to_owned(), key.1.to_owned())).or_insert(SharedBucket { tokens: cap, at: now_ms });
    let refill = (now_ms - b.at).max(0) as f64 / 1000.0 * cap / 60.0;
    b.tokens = (b.tokens + refill).min(cap);
    b.at = b.at.max(now_ms);
    if b.tokens >= 1.0 { Duration::ZERO } else { Duration::from_secs_f64((1.0 - b.tokens) * 60.0 / cap) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_app_budget_says_how_long_until_it_holds_a_batch() {
        let rl = RateLimiter::new(600, 0);
        let t = 1_000_000;
        assert_eq!(rl.app_refill_wait("1", 10.0, t), None, "a full bucket lets events go");
        for _ in 0..600 {
            assert!(rl.try_take("1", "a", t).is_ok());
        }
        let wait = rl.app_refill_wait("1", 10.0, t).expect("spent");
        assert_eq!(wait.as_millis(), 1_000, "ten events at ten a second");
        assert_eq!(rl.app_refill_wait("1", 10.0, t + 100), None, "one event's worth came back");
        assert_eq!(rl.app_refill_wait("2", 10.0, t), None, "another app_id has its own bucket");
    }

    #[test]
    fn an_identity_over_its_budget_waits_while_others_go_on() {
        let rl = RateLimiter::new(100, 2);
        let t = 1_000_000;
        assert!(rl.try_take("1", "a", t).is_ok());
        assert!(rl.try_take("1", "a", t).is_ok());
        let Err(Held::Identity { until }) = rl.try_take("1", "a", t) else { panic!("the identity budget is spent") };
        assert!(until - t > 29_000 && until - t <= 30_000, "{}", until - t);
        assert!(rl.try_take("1", "b", t).is_ok());
        assert!(rl.try_take("1", "a", t + 30_000).is_ok(), "refills over time");
    }

    #[test]
    fn a_spent_app_budget_holds_every_identity_and_says_so() {
        let rl = RateLimiter::new(2, 0);
        assert!(rl.try_take("1", "a", 0).is_ok());
        assert!(rl.try_take("1", "b", 0).is_ok());
        assert!(matches!(rl.try_take("1", "c", 0), Err(Held::App { until: 30_000 })));
        assert!(rl.try_take("2", "c", 0).is_ok(), "another app_id has its own budget");
    }

    #[test]
    fn zero_turns_a_budget_off() {
        let rl = RateLimiter::new(0, 0);
        let t = 0;
        for _ in 0..10_000 {
            assert!(rl.try_take("1", "a", t).is_ok());
        }
    }

    #[test]
    fn shared_buckets_hold_one_budget_across_takers_and_refill_by_wall_clock() {
        let mut b = HashMap::new();
        let first = take_shared(&mut b, &[("1", "a"), ("1", "b"), ("1", "c")], 2, 0, 1_000);
        assert_eq!(first[..2], [None, None]);
        assert!(first[2].is_some(), "the app budget of 2 is spent: {first:?}");
        // A second taker reading the same buckets (another instance) finds them spent too.
        let second = take_shared(&mut b, &[("1", "d")], 2, 0, 1_000);
        assert!(second[0].is_some());
        let later = take_shared(&mut b, &[("1", "d")], 2, 0, 31_000);
        assert_eq!(later, vec![None], "30 s refill one token at 2/min");
    }
}
