//! From a request body to durable rows: run the ingest pipeline, write the raw body, the accepted events and the
//! rejections in one transaction, wake the delivery workers, and say what happened. No HTTP types here.

use crate::clock::Clock;
use crate::delivery::Delivery;
use crate::domain::{KeyScheme, Timestamp};
use crate::ingest::{IngestError, Outcome, Pipeline, Rejection, Route};
use crate::metrics::Metrics;
use crate::sources::Source;
use crate::store::{Appended, HeldItems, Ingested, NewEvent, NewRejection, Store, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// What the relay answers for a body it took.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Items found in the body (profiles, messages, events).
    pub items: usize,
    /// Heap calls stored for delivery.
    pub accepted: usize,
    /// Their ids in the delivery log (`/admin/deliveries/{id}`), in order.
    pub event_ids: Vec<String>,
    pub rejected: Vec<Rejection>,
    /// Indexes of items the template sends nothing for.
    pub ignored: Vec<usize>,
    pub template: String,
    /// The sender already sent this (the same body, or the same message ids) within the dedupe window: nothing was
    /// stored again, and `event_ids` are those of the first delivery.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Events left out as retries of ones already stored (their ids in `event_ids` are the first ones).
    #[serde(skip_serializing_if = "is_zero")]
    pub duplicates: usize,
    /// The route's template does not load: the body is stored and its items held with this error until the
    /// template is fixed and the body re-rendered (`heap-relay replay --status held --rerender`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug)]
pub enum Intake {
    /// A vendor connection test; nothing stored.
    Ping,
    /// Stored; `nothing_accepted` when every item was rejected.
    Stored { summary: Summary, nothing_accepted: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Shared by the HTTP handlers: pipeline, store, delivery wake-up, metrics.
#[derive(Debug, Clone)]
pub struct Intaker {
    pub pipeline: Arc<Pipeline>,
    pub store: Store,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

impl Intaker {
    pub async fn accept(&self, route: Route, body: Vec<u8>) -> Result<Intake, IntakeError> {
        self.accept_in("", route, body).await
    }

    /// As [`Intaker::accept`], for the environment (`dev`, `prod`, …) the request's credential or path chose; it is
    /// stored with each event. `""` is the default environment.
    pub async fn accept_in(&self, environment: &str, route: Route, body: Vec<u8>) -> Result<Intake, IntakeError> {
        let started = std::time::Instant::now();
        let result = self.accept_inner(environment, route, body).await;
        self.metrics.ingest_latency.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn accept_inner(&self, environment: &str, route: Route, body: Vec<u8>) -> Result<Intake, IntakeError> {
        let received_at = self.clock.now_ms();
        let ts = chrono::DateTime::from_timestamp_millis(received_at)
            .map(Timestamp::from_datetime)
            .unwrap_or_else(Timestamp::now);
        let pipeline = self.pipeline.clone();
        // Large bodies render for a while; keep that off the HTTP threads.
        let (outcome, body) = if body.len() > 64 * 1024 {
            let r = route.clone();
            let env = environment.to_owned();
            tokio::task::spawn_blocking(move || (pipeline.ingest_in(&env, &r, &body, &ts, KeyScheme::default()), body))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
        } else {
            (pipeline.ingest_in(environment, &route, &body, &ts, KeyScheme::default()), body)
        };
        let outcome = outcome?;
        if outcome.ping {
            return Ok(Intake::Ping);
        }
        let source = route.source_name();
        self.metrics.item(source, "accepted", outcome.accepted.len());
        self.metrics.item(source, "rejected", outcome.rejected.len());
        self.metrics.item(source, "ignored", outcome.ignored.len());
        for (outcome_name, n) in [
            ("accepted", outcome.accepted.len()),
            ("rejected", outcome.rejected.len()),
            ("ignored", outcome.ignored.len()),
        ] {
            self.metrics.environment_item(source, environment, outcome_name, n);
        }
        let request_key = retry_key(&route, &body);
        let (mut ingested, mut summary) = to_rows(source, outcome, body, received_at, None);
        ingested.request_key = request_key;
        ingested.environment = environment.to_owned();
        let nothing_accepted = summary.accepted == 0 && !summary.rejected.is_empty();
        if let Some(why) = &summary.held {
            tracing::error!(source, template = %summary.template, error = %why, items = summary.items,
                "the route's template does not load: body stored, items held until the template is fixed");
            self.metrics.item(source, "held", summary.items);
        }
        if !ingested.events.is_empty() || !ingested.rejections.is_empty() || ingested.held.is_some() {
            let appended = self.store.append(ingested).await?;
            answer_with(&mut summary, appended);
            self.metrics.item(source, "duplicate", summary.duplicates);
            self.metrics.environment_item(source, environment, "duplicate", summary.duplicates);
            if summary.duplicates < summary.accepted {
                self.delivery.wake();
            }
        }
        // Inside the request's span: ties each event id to this request; delivery spans log it at every attempt.
        for id in &summary.event_ids {
            tracing::debug!(event_id = %id, source, environment, "event accepted");
        }
        tracing::info!(
            source,
            environment,
            items = summary.items,
            accepted = summary.accepted,
            rejected = summary.rejected.len(),
            duplicates = summary.duplicates,
            "body stored"
        );
        Ok(Intake::Stored { summary, nothing_accepted })
    }
}

/// How a sender's retry is told from a new request, per source (README, "Retries and repeats"): CleverTap and
/// Userpilot re-send the same body when they retry (CleverTap only after a timeout or an error), so the same body on
/// the same route within the dedupe window is a retry. Segment-spec messages and Heap bodies carry their own ids
/// (`messageId`, `idempotency_key`), checked per item instead; a Heap body without keys counts every time, as
/// Heap's own API does.
fn retry_key(route: &Route, body: &[u8]) -> Option<String> {
    let Route::Hook { source: source @ (Source::CleverTap | Source::Userpilot), template } = route else {
        return None;
    };
    let mut h = Sha256::new();
    for part in [source.as_str().as_bytes(), template.as_deref().unwrap_or("").as_bytes(), body] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    Some(format!("body:{}", hex::encode(&h.finalize()[..16])))
}

/// Puts the store's answer into the summary: the final event ids, and what was a retry.
fn answer_with(summary: &mut Summary, appended: Appended) {
    summary.event_ids = appended.event_ids;
    summary.duplicate = appended.duplicate;
    summary.duplicates = appended.duplicates;
}

/// The rows to write for an outcome, and the summary to answer with.
pub fn to_rows(
    source: &str,
    outcome: Outcome,
    body: Vec<u8>,
    received_at: i64,
    replay_of_raw: Option<i64>,
) -> (Ingested, Summary) {
    let events: Vec<NewEvent> = outcome
        .accepted
        .iter()
        .map(|a| NewEvent {
            // Assigned by the store (SQLite derives it from the log entry, PostgreSQL makes a uuid).
            event_id: String::new(),
            item_index: a.index as i64,
            kind: a.call.kind(),
            app_id: a.call.app_id().as_str().to_owned(),
            identity: a.call.identity().to_owned(),
            idempotency_key: a.call.idempotency_key().map(|k| k.as_str().to_owned()),
            payload: a.call.bulk_item_text(),
            dedupe_key: a
                .call
                .idempotency_key()
                .filter(|k| !k.is_derived())
                .map(|k| format!("msg:{source}:{}:{}", a.call.app_id().as_str(), k.as_str()))
                // Heap's add_user_properties carries no idempotency key: a Segment identify's retry is known by
                // its messageId (its own key space, so an item's track and user properties never collide).
                .or_else(|| match a.call.kind() {
                    crate::domain::CallKind::UserProperties => a
                        .message_id
                        .as_ref()
                        .map(|m| format!("msg:{source}:{}:user_properties:{m}", a.call.app_id().as_str())),
                    _ => None,
                }),
        })
        .collect();
    let rejections = outcome
        .rejected
        .iter()
        .map(|r| NewRejection {
            event_id: String::new(),
            item_index: r.index as i64,
            field: r.field.clone(),
            message: r.message.clone(),
        })
        .collect();
    let summary = Summary {
        items: outcome.items,
        accepted: events.len(),
        // The store's answer fills them in (`answer_with`).
        event_ids: Vec::new(),
        rejected: outcome.rejected,
        ignored: outcome.ignored,
        template: outcome.template.clone(),
        duplicate: false,
        duplicates: 0,
        held: outcome.held.clone(),
    };
    let held = outcome.held.map(|reason| HeldItems { items: outcome.items, reason });
    let ingested = Ingested {
        source: source.to_owned(),
        environment: String::new(),
        template: outcome.template,
        body,
        received_at,
        events,
        rejections,
        replay_of_raw,
        request_key: None,
        template_version: outcome.template_version,
        held,
    };
    (ingested, summary)
}
