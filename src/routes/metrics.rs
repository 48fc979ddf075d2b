//! `GET /metrics` in Prometheus (OpenMetrics) text format.

use super::AppState;
use actix_web::{HttpResponse, web};

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let m = &state.intake.metrics;
    match state.intake.store.stats().await {
        Ok(s) => {
            m.queue_depth.set(s.ready_or_waiting);
            m.dead_events.set(s.dead);
            m.store_bytes.set(s.db_bytes);
            if let (Some(c), Some(b)) = (s.commits, s.bodies_committed) {
                m.store_commits.set(c as i64);
                m.store_bodies_committed.set(b as i64);
            }
            if let Some(d) = s.delivery_commits {
                m.store_delivery_commits.set(d as i64);
            }
            if let Some(lag) = s.index_lag_entries {
                m.store_index_lag_entries.set(lag);
            }
            let age = s.oldest_pending_ms.map_or(0.0, |t| (crate::store::now_ms() - t).max(0) as f64 / 1000.0);
            m.oldest_pending_seconds.set(age);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not read queue figures"),
    }
    HttpResponse::Ok().content_type("application/openmetrics-text; version=1.0.0; charset=utf-8").body(m.encode())
}
