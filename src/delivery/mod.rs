//! Delivery: workers drain the store into Heap's bulk endpoints.
//!
//! A round claims ready events under a lease (on SQLite the store asks the rate budgets while it chooses, so nothing
//! held back is claimed; on PostgreSQL spent app_ids are skipped and the shared budgets are taken after the claim),
//! groups them into bulk calls, sends them, and records every call with each event's next state, all decided by
//! `policy`. Tests drive one round with [`Worker::try_deliver_once`]; `run` repeats rounds until shutdown.

pub mod batcher;
pub mod heap_client;
pub mod policy;
pub mod rate_limit;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{
    Admission, AttemptLog, AttemptRecord, Claimed, Held, Millis, Paused, Resolution, Scope, Store, StoreError,
};
use batcher::{Batch, batches};
use heap_client::HeapClient;
use policy::{Decision, backoff, classify};
use rand::Rng;
use rate_limit::RateLimiter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Events per Heap call (Heap allows 1000).
    pub max_batch: usize,
    /// How long a worker waits after being woken, so that events arriving together share a call.
    pub linger: Duration,
    /// How often an idle worker looks for due retries.
    pub poll_interval: Duration,
    /// How long a claim lasts; a crashed worker's events are taken over after this.
    pub lease: Duration,
    /// Retry failures for this long after an event was queued, then dead-letter it.
    pub max_retry_age: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            linger: Duration::from_millis(50),
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(60),
            max_retry_age: Duration::from_secs(72 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
        }
    }
}

/// What the workers share.
pub struct Delivery {
    pub store: Store,
    pub client: HeapClient,
    pub config: DeliveryConfig,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
    /// The relay's clock: budgets, leases and retry times are read from it.
    pub clock: Clock,
    /// Signalled (through [`Delivery::wake`]) by ingest after a commit, by replays and by PostgreSQL's LISTEN, so
    /// that an idle worker starts at once instead of at its next poll.
    wake: Notify,
    /// What is paused until when: app_ids Heap asked us (429) to leave alone, and an operator's pauses of an
    /// app_id or an environment (until `Millis::MAX`).
    paused: Mutex<HashMap<Scope, Millis>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(
        store: Store,
        client: HeapClient,
        config: DeliveryConfig,
        limiter: RateLimiter,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        Self {
            store,
            client,
            config,
            limiter: Arc::new(limiter),
            metrics,
            clock,
            wake: Notify::new(),
            paused: Mutex::new(HashMap::new()),
        }
    }

    /// Wakes an idle worker: every one waiting now, or, if none waits, the next one to wait.
    pub fn wake(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Which claimed events the rate budgets let go now (`None`), and how long the others wait, for a store that
    /// does not ask the budgets while claiming (PostgreSQL, where the budgets live in the database, shared by every
    /// instance).
    async fn admit(&self, claimed: &[Claimed], now: Millis) -> Result<Vec<Option<Duration>>, StoreError> {
        let (app, identity) = self.limiter.rates();
        if let (Store::Postgres(pg), true) = (&self.store, app > 0 || identity > 0) {
            let wants: Vec<(&str, &str)> = claimed.iter().map(|c| (c.app_id.as_str(), c.identity.as_str())).collect();
            return pg.take_budget(&wants, app, identity, now).await;
        }
        let wait = |h: Held| match h {
            Held::App { until } | Held::Identity { until } => Duration::from_millis((until - now).max(0) as u64),
        };
        Ok(claimed.iter().map(|c| self.limiter.try_take(&c.app_id, &c.identity, now).err().map(wait)).collect())
    }

    /// What a claim skips now.
    fn paused_now(&self, now: Millis) -> Paused {
        let mut out = Paused::default();
        for (scope, _) in self.pauses(now) {
            match scope {
                Scope::AppId(a) => out.app_ids.push(a),
                Scope::Environment(e) => out.environments.push(e),
            }
        }
        out
    }

    /// Holds the deliveries of an app_id or an environment until `until` (an operator's pause from the console:
    /// `Millis::MAX`), the way a 429 holds an app_id; this instance only.
    pub fn hold(&self, scope: Scope, until: Millis) {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(scope).or_insert(until);
        *e = (*e).max(until);
    }

    /// Lifts a pause (an operator's, or a 429's of an app_id); whether there was one.
    pub fn resume(&self, scope: &Scope) -> bool {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).remove(scope).is_some()
    }

    /// What is paused now, and until when: app_ids first, then environments.
    pub fn pauses(&self, now: Millis) -> Vec<(Scope, Millis)> {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, until| *until > now);
        let mut out: Vec<(Scope, Millis)> = p.iter().map(|(a, u)| (a.clone(), *u)).collect();
        out.sort();
        out
    }

    fn pause(&self, app_id: &str, until: Millis) {
        self.hold(Scope::AppId(app_id.to_owned()), until);
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundOutcome {
    pub claimed: usize,
    /// The round spent an app budget (this instance's, SQLite): how long until it holds a batch again. The worker
    /// waits that long, so that a backlog held by the budget goes in one call a second or so, not in a call of a
    /// few events every round.
    pub budget_wait: Option<Duration>,
    pub delivered: usize,
    pub retrying: usize,
    pub dead: usize,
    /// Held back by a rate budget or a 429 pause, not attempted.
    pub held: usize,
    pub requests: usize,
}

pub struct Worker {
    shared: Arc<Delivery>,
    owner: String,
}

impl Worker {
    pub fn new(shared: Arc<Delivery>, owner: String) -> Self {
        Self { shared, owner }
    }

    /// Repeats rounds until `shutdown` turns true (or its sender is gone); then gives back its leases.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let cfg = self.shared.config.clone();
        while !*shutdown.borrow() {
            let (claimed, budget_wait) = match self.try_deliver_once().await {
                Ok(r) => (r.claimed, r.budget_wait),
                Err(e) => {
                    tracing::error!(error = %e, worker = %self.owner, "delivery round failed");
                    (0, None)
                }
            };
            if claimed >= cfg.max_batch {
                continue; // a backlog: go on at once
            }
            if let Some(wait) = budget_wait {
                // The app budget is what holds the backlog: wait until it holds a batch (new events do not help).
                let stop = tokio::select! {
                    _ = tokio::time::sleep(wait.max(cfg.linger)) => false,
                    changed = shutdown.changed() => changed.is_err(),
                };
                if stop {
                    break;
                }
                continue;
            }
            if claimed == 0 {
                // Idle: wait for ingest to wake us, or for due retries at the next poll.
                let stop = tokio::select! {
                    _ = self.shared.wake.notified() => false,
                    _ = tokio::time::sleep(cfg.poll_interval) => false,
                    changed = shutdown.changed() => changed.is_err(),
                };
                if stop {
                    break;
                }
            }
            // Let events that arrive together share one call.
            let stop = tokio::select! {
                _ = tokio::time::sleep(cfg.linger) => false,
                changed = shutdown.changed() => changed.is_err(),
            };
            if stop {
                break;
            }
        }
        match self.shared.store.release_owner(&self.owner).await {
            Ok(n) if n > 0 => {
                tracing::info!(worker = %self.owner, released = n, "released leases at shutdown")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(worker = %self.owner, error = %e, "could not release leases; they expire on their own")
            }
        }
    }

    /// One round: claim, hold back what the budgets do not allow, send the rest in bulk calls, record everything.
    pub async fn try_deliver_once(&self) -> Result<RoundOutcome, StoreError> {
        let d = &self.shared;
        let now = d.clock.now_ms();
        let limit = (d.config.max_batch * 4) as i64;
        // Budgets before claims where the store can ask them (SQLite): nothing is claimed that may not go now.
        let in_claim = d.store.admits_in_claim();
        let (app_rate, identity_rate) = d.limiter.rates();
        let admission: Option<Arc<dyn Admission>> =
            (in_claim && (app_rate > 0 || identity_rate > 0)).then(|| d.limiter.clone() as Arc<dyn Admission>);
        let lease_ms = d.config.lease.as_millis() as i64;
        let mut paused = d.paused_now(now);
        // What each app_id's shared budget held before this claim (PostgreSQL): where the claim took all of it, the
        // budget is what holds the rest back.
        let mut pg_caps: Option<SharedCaps> = None;
        if let Store::Postgres(pg) = &d.store {
            // The shared budgets live in the database: an app_id's claim takes at most what its budget holds now,
            // and one whose budget is spent is not claimed at all.
            if app_rate > 0 {
                // An app_id with no bucket yet has a full one.
                paused.app_cap_others = Some(i64::from(app_rate));
            }
            for (app_id, allowance) in pg.app_allowances(app_rate, now).await? {
                if allowance < 1 {
                    paused.app_ids.push(app_id);
                } else {
                    paused.app_caps.push((app_id, allowance));
                }
            }
            if app_rate > 0 {
                pg_caps = Some(SharedCaps { caps: paused.app_caps.clone(), others: paused.app_cap_others });
            }
        }
        let claimed = d.store.claim(&self.owner, now, lease_ms, limit, paused, admission).await?;
        let mut out = RoundOutcome { claimed: claimed.len(), ..Default::default() };
        if claimed.is_empty() {
            return Ok(out);
        }
        if app_rate > 0 && (claimed.len() as i64) < limit {
            // The claim ran short: if an app budget is what cut it, wait until that budget holds a batch.
            let want = batch_worth(d.config.max_batch, app_rate);
            out.budget_wait = match &pg_caps {
                Some(caps) => shared_budget_wait(&claimed, caps, want, app_rate),
                None if in_claim => {
                    let apps: std::collections::HashSet<&str> = claimed.iter().map(|c| c.app_id.as_str()).collect();
                    apps.into_iter().filter_map(|a| d.limiter.app_refill_wait(a, want, now)).min()
                }
                None => None,
            };
        }
        let mut records = Vec::with_capacity(claimed.len());
        let mut go = Vec::with_capacity(claimed.len());
        let verdicts = if in_claim { Ok(vec![None; claimed.len()]) } else { d.admit(&claimed, now).await };
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(e) => {
                // Without a budget answer nothing may go; give the leases back instead of letting them expire.
                let back = claimed.iter().map(|c| release(c, now + d.config.poll_interval.as_millis() as i64));
                d.store.record(back.collect()).await?;
                return Err(e);
            }
        };
        for (c, verdict) in claimed.into_iter().zip(verdicts) {
            match verdict {
                None => go.push(c),
                Some(wait) => records.push(release(&c, now + wait.as_millis() as i64)),
            }
        }
        let leases: Vec<(i64, i64)> = go.iter().map(|c| (c.id, c.lease_token)).collect();
        let sending = async {
            let mut recs = Vec::with_capacity(go.len());
            let mut requests = 0;
            for batch in batches(go, d.config.max_batch) {
                let (r, n) = self.deliver(batch).await;
                requests += n;
                recs.extend(r);
            }
            (recs, requests)
        };
        let (recs, requests) = self.keeping_leases(leases, sending).await;
        out.requests += requests;
        records.extend(recs);
        for r in &records {
            match r.resolution {
                Resolution::Delivered => out.delivered += 1,
                Resolution::Retry { .. } => out.retrying += 1,
                Resolution::Dead => out.dead += 1,
                Resolution::Release { .. } => out.held += 1,
            }
        }
        d.store.record(records).await?;
        Ok(out)
    }

    /// Runs `work` (the sends of one round) while renewing this worker's leases on `leases` every third of the lease,
    /// where the store renews leases: a round of slow or split calls can outlast one lease, and a lease that
    /// expired mid-send would let another instance send the same events again.
    async fn keeping_leases<F: std::future::Future>(&self, leases: Vec<(i64, i64)>, work: F) -> F::Output {
        let d = &self.shared;
        if leases.is_empty() || !d.store.renews_leases() {
            return work.await;
        }
        let every = (d.config.lease / 3).max(Duration::from_millis(100));
        let lease_ms = d.config.lease.as_millis() as i64;
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {
                    match d.store.renew(&self.owner, leases.clone(), d.clock.now_ms() + lease_ms).await {
                        Ok(n) if n < leases.len() => tracing::warn!(
                            worker = %self.owner, lost = leases.len() - n,
                            "some leases were taken over while sending; their results will not be recorded"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(worker = %self.owner, error = %e, "could not renew leases"),
                    }
                }
            }
        }
    }

    /// Sends one batch, splitting it when Heap refuses it as a whole, and returns each event's record.
    async fn deliver(&self, batch: Batch) -> (Vec<AttemptRecord>, usize) {
        let d = &self.shared;
        let Batch { app_id, kind, events } = batch;
        let mut logs: HashMap<i64, Vec<AttemptLog>> = HashMap::new();
        let mut records = Vec::with_capacity(events.len());
        let mut work = vec![events];
        let mut requests = 0;
        while let Some(events) = work.pop() {
            let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
            let span = tracing::info_span!(
                "delivery",
                app_id = %app_id,
                endpoint = kind.path(),
                batch_size = events.len(),
                first_event_id = %events[0].event_id,
                source = %events[0].source,
                status = tracing::field::Empty,
                latency_ms = tracing::field::Empty,
            );
            let (outcome, latency) = d.client.send(kind, &app_id, &payloads).instrument(span.clone()).await;
            requests += 1;
            let call = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
            let at = d.clock.now_ms();
            let http_status = match &outcome {
                policy::HttpOutcome::Status { code, .. } => Some(*code),
                _ => None,
            };
            span.record("status", http_status.unwrap_or(0));
            span.record("latency_ms", latency.as_millis() as u64);
            let decision = classify(&outcome, events.len());
            let error = match &decision {
                Decision::Delivered => None,
                Decision::Retry { reason, .. }
                | Decision::Split { reason }
                | Decision::DeadLetter { reason }
                | Decision::Throttled { reason, .. } => Some(reason.clone()),
            };
            d.metrics.batch_size.observe(events.len() as f64);
            d.metrics.delivery_latency.observe(latency.as_secs_f64());
            d.metrics.attempt(decision_name(&decision), events.len());
            span.in_scope(|| {
                for e in &events {
                    tracing::debug!(event_id = %e.event_id, status = http_status, "delivery attempt");
                }
                match &error {
                    None => tracing::info!(events = events.len(), "delivered to Heap"),
                    Some(why) => tracing::warn!(events = events.len(), error = %why, "delivery attempt failed"),
                }
            });
            for e in &events {
                logs.entry(e.id).or_default().push(AttemptLog {
                    call,
                    at,
                    http_status,
                    latency_ms: latency.as_millis() as i64,
                    batch_size: events.len() as i64,
                    error: error.clone(),
                });
            }
            let mut finish = |e: &Claimed, resolution: Resolution, error: Option<String>| {
                records.push(AttemptRecord {
                    id: e.id,
                    lease_token: e.lease_token,
                    attempts: logs.remove(&e.id).unwrap_or_default(),
                    resolution,
                    error,
                });
            };
            match decision {
                Decision::Delivered => events.iter().for_each(|e| finish(e, Resolution::Delivered, None)),
                Decision::DeadLetter { reason } => {
                    events.iter().for_each(|e| finish(e, Resolution::Dead, Some(reason.clone())))
                }
                Decision::Split { .. } => {
                    let mut first = events;
                    let second = first.split_off(first.len() / 2);
                    work.push(second);
                    work.push(first);
                }
                Decision::Retry { after, reason } => {
                    for e in &events {
                        let (res, err) = self.retry_or_give_up(e, at, after, &reason);
                        finish(e, res, Some(err));
                    }
                }
                Decision::Throttled { after, reason } => {
                    // +1: the clock counts whole milliseconds (`at` is rounded down), and the pause must never be
                    // shorter than what Heap asked for.
                    let until = at + after.unwrap_or(d.config.backoff_base * 30).as_millis() as i64 + 1;
                    d.pause(&app_id, until);
                    tracing::warn!(app_id = %app_id, pause_ms = until - at, "Heap rate-limited this app_id; pausing it");
                    events.iter().for_each(|e| finish(e, Resolution::Retry { at: until }, Some(reason.clone())));
                    // Whatever is left of a split waits out the pause too, unattempted.
                    for rest in work.drain(..) {
                        for e in rest {
                            let attempts = logs.remove(&e.id).unwrap_or_default();
                            records.push(AttemptRecord {
                                id: e.id,
                                lease_token: e.lease_token,
                                resolution: if attempts.is_empty() {
                                    Resolution::Release { at: until }
                                } else {
                                    Resolution::Retry { at: until }
                                },
                                attempts,
                                error: Some(reason.clone()),
                            });
                        }
                    }
                }
            }
        }
        (records, requests)
    }

    fn retry_or_give_up(&self, e: &Claimed, at: Millis, after: Option<Duration>, reason: &str) -> (Resolution, String) {
        let cfg = &self.shared.config;
        let age = Duration::from_millis((at - e.enqueued_at).max(0) as u64);
        if age >= cfg.max_retry_age {
            return (
                Resolution::Dead,
                format!("gave up after {}h of retries; last error: {reason}", cfg.max_retry_age.as_secs() / 3600),
            );
        }
        let attempt = (e.attempts + 1).clamp(1, 64) as u32;
        let wait = after
            .unwrap_or_else(|| backoff(attempt, cfg.backoff_base, cfg.backoff_max, rand::thread_rng().r#gen::<f64>()));
        (Resolution::Retry { at: at + wait.as_millis() as i64 }, reason.to_owned())
    }
}

/// Numbers Heap calls, so that a store can keep one record per call.
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

fn release(c: &Claimed, at: Millis) -> AttemptRecord {
    AttemptRecord {
        id: c.id,
        lease_token: c.lease_token,
        attempts: Vec::new(),
        resolution: Resolution::Release { at },
        error: None,
    }
}

fn decision_name(d: &Decision) -> &'static str {
    match d {
        Decision::Delivered => "delivered",
        Decision::Retry { .. } => "retry",
        Decision::Split { .. } => "split",
        Decision::DeadLetter { .. } => "dead",
        Decision::Throttled { .. } => "throttled",
    }
}

/// What the shared app budgets held when a claim was made: per app_id, and for an app_id with no bucket yet.
struct SharedCaps {
    caps: Vec<(String, i64)>,
    others: Option<i64>,
}

/// The batch a worker waits for once an app budget has cut its claim short: a second's worth of the budget, or a
/// full call's, whichever is less.
fn batch_worth(max_batch: usize, app_per_min: u32) -> f64 {
    (max_batch as f64).min(f64::from(app_per_min) / 60.0).max(1.0)
}

/// How long a worker on PostgreSQL waits after a claim that the shared app budgets bound: until `want` events'
/// worth have come back to a bucket whose claim took all it held, so a backlog held by the budget goes in about one
/// call a second instead of a few events every round. `None` when no app_id's budget bound the claim (its queue ran
/// dry first). Other instances take from the same buckets, so this is the earliest the budget can hold a batch; the
/// next round reads the buckets again.
fn shared_budget_wait(claimed: &[Claimed], held: &SharedCaps, want: f64, app_per_min: u32) -> Option<Duration> {
    if app_per_min == 0 {
        return None;
    }
    let mut per_app: HashMap<&str, i64> = HashMap::new();
    for c in claimed {
        *per_app.entry(c.app_id.as_str()).or_insert(0) += 1;
    }
    let bound = per_app.iter().any(|(app, n)| {
        let cap = held.caps.iter().find(|(a, _)| a == app).map(|(_, cap)| *cap).or(held.others);
        cap.is_some_and(|cap| *n >= cap)
    });
    bound.then(|| Duration::from_secs_f64(want * 60.0 / f64::from(app_per_min)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(app_ids: &[&str]) -> Vec<Claimed> {
        app_ids
            .iter()
            .enumerate()
            .map(|(i, app)| Claimed {
                id: i as i64,
                event_id: format!("e{i}"),
                source: "heap".into(),
                kind: crate::domain::CallKind::Track,
                app_id: (*app).into(),
                identity: "u".into(),
                payload: "{}".into(),
                attempts: 0,
                enqueued_at: 0,
                lease_token: 1,
            })
            .collect()
    }

    #[test]
    fn a_claim_that_took_all_an_app_budget_held_waits_for_a_batch_and_one_that_ran_dry_does_not() {
        let held = SharedCaps { caps: vec![("1".to_owned(), 3)], others: Some(600) };
        // 600 a minute: a second's worth (10 events) refills in one second.
        let second = batch_worth(1_000, 600);
        let bound = shared_budget_wait(&claimed(&["1", "1", "1"]), &held, second, 600);
        assert_eq!(bound, Some(Duration::from_secs(1)));
        assert_eq!(shared_budget_wait(&claimed(&["1", "1"]), &held, second, 600), None, "the queue ran dry");
        // An app_id with no bucket yet had a full one; a claim of all of it is bound too.
        assert_eq!(shared_budget_wait(&claimed(&["2"; 600]), &held, second, 600), bound);
        assert_eq!(shared_budget_wait(&claimed(&["1"; 3]), &held, batch_worth(1_000, 0), 0), None, "no app budget");
        // A full call's worth when that is less than a second's: 60,000 a minute, batches of 100, 0.1 s.
        let fast = shared_budget_wait(&claimed(&["1"; 3]), &held, batch_worth(100, 60_000), 60_000);
        assert_eq!(fast, Some(Duration::from_millis(100)));
    }
}
