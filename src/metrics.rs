//! Every counted outcome, named once. Rendered in Prometheus text format at `/metrics`; queue figures are read from
//! the store at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    pub source: String,
    /// accepted | rejected | ignored
    pub outcome: String,
}

/// Items of a named environment (`[environments.<name>]`); the default environment is counted only in
/// `ingest_items`, so adding environments changes no existing series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvironmentLabels {
    pub source: String,
    pub environment: String,
    /// accepted | rejected | ignored | duplicate
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// delivered | retry | throttled | split | dead
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub ingest_items: Family<IngestLabels, Counter>,
    pub ingest_requests: Family<RequestLabels, Counter>,
    pub environment_items: Family<EnvironmentLabels, Counter>,
    pub ingest_latency: Histogram,
    pub delivery_attempts: Family<AttemptLabels, Counter>,
    pub delivery_events: Family<AttemptLabels, Counter>,
    pub batch_size: Histogram,
    pub delivery_latency: Histogram,
    pub queue_depth: Gauge,
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    pub dead_events: Gauge,
    pub store_bytes: Gauge,
    pub store_commits: Gauge,
    pub store_bodies_committed: Gauge,
    pub store_delivery_commits: Gauge,
    pub store_index_lag_entries: Gauge,
    pub template_reloads: Family<AttemptLabels, Counter>,
    /// Requests refused for failed authentication, by source (every one, though the log is rate-limited).
    pub auth_failures: Family<SourceLabels, Counter>,
    /// String values that lost a NUL or had a lone surrogate replaced, by source.
    pub sanitized_values: Family<SourceLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("heap_relay");
        let m = Self {
            ingest_items: Family::default(),
            ingest_requests: Family::default(),
            environment_items: Family::default(),
            ingest_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            delivery_attempts: Family::default(),
            delivery_events: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            delivery_latency: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            queue_depth: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
            dead_events: Gauge::default(),
            store_bytes: Gauge::default(),
            store_commits: Gauge::default(),
            store_bodies_committed: Gauge::default(),
            store_delivery_commits: Gauge::default(),
            store_index_lag_entries: Gauge::default(),
            template_reloads: Family::default(),
            auth_failures: Family::default(),
            sanitized_values: Family::default(),
            registry: Registry::default(),
        };
        registry.register("ingest_items", "Items received, by source and outcome", m.ingest_items.clone());
        registry.register("ingest_requests", "Ingest requests, by source and HTTP status", m.ingest_requests.clone());
        registry.register(
            "environment_items",
            "Items received in a named environment, by source, environment and outcome",
            m.environment_items.clone(),
        );
        registry.register("ingest_latency_seconds", "Time from request to durable answer", m.ingest_latency.clone());
        registry.register("delivery_attempts", "HTTP calls to Heap, by result", m.delivery_attempts.clone());
        registry.register("delivery_events", "Events carried by calls to Heap, by result", m.delivery_events.clone());
        registry.register("delivery_batch_size", "Events per call to Heap", m.batch_size.clone());
        registry.register("delivery_latency_seconds", "Latency of calls to Heap", m.delivery_latency.clone());
        registry.register("queue_depth", "Events pending or retrying", m.queue_depth.clone());
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest event not yet delivered",
            m.oldest_pending_seconds.clone(),
        );
        registry.register("dead_events", "Events in dead letters", m.dead_events.clone());
        registry.register("store_bytes", "Size of the store", m.store_bytes.clone());
        registry.register(
            "store_commits",
            "Ingest log transactions committed since start (SQLite; delivery never writes through them)",
            m.store_commits.clone(),
        );
        registry.register(
            "store_bodies_committed",
            "Request bodies those transactions carried; divided by store_commits, the group-commit size",
            m.store_bodies_committed.clone(),
        );
        registry.register(
            "store_delivery_commits",
            "Transactions of delivery's books (SQLite: their own file): about one per Heap call",
            m.store_delivery_commits.clone(),
        );
        registry.register(
            "store_index_lag_entries",
            "Log entries the operator views' index (SQLite) has not reached yet; the views read those from the log",
            m.store_index_lag_entries.clone(),
        );
        registry.register(
            "template_reloads",
            "Template reloads after an edit, by result (ok, failed)",
            m.template_reloads.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for failed authentication, by source",
            m.auth_failures.clone(),
        );
        registry.register(
            "sanitized_values",
            "String values that lost a NUL character or had a lone surrogate replaced, by source",
            m.sanitized_values.clone(),
        );
        Self { registry, ..m }
    }

    pub fn item(&self, source: &str, outcome: &str, n: usize) {
        if n > 0 {
            self.ingest_items
                .get_or_create(&IngestLabels { source: source.into(), outcome: outcome.into() })
                .inc_by(n as u64);
        }
    }

    /// Counts `n` items of a named environment (nothing for the default environment `""`).
    pub fn environment_item(&self, source: &str, environment: &str, outcome: &str, n: usize) {
        if n > 0 && !environment.is_empty() {
            let l =
                EnvironmentLabels { source: source.into(), environment: environment.into(), outcome: outcome.into() };
            self.environment_items.get_or_create(&l).inc_by(n as u64);
        }
    }

    pub fn request(&self, source: &str, status: u16) {
        self.ingest_requests.get_or_create(&RequestLabels { source: source.into(), status }).inc();
    }

    pub fn attempt(&self, result: &str, events: usize) {
        let l = AttemptLabels { result: result.into() };
        self.delivery_attempts.get_or_create(&l).inc();
        self.delivery_events.get_or_create(&l).inc_by(events as u64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
