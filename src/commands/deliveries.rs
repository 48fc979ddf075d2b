//! `heap-relay deliveries [--status S] [--source S] [--environment E] [--since T] [--until T]`: the delivery log
//! from the store.

use super::CommandError;
use crate::replay::time_range;
use crate::settings::Settings;
use crate::startup::open_store;
use crate::store::{Query, Status};
use anyhow::Context;

pub struct Filters {
    pub status: Option<String>,
    pub source: Option<String>,
    pub environment: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: i64,
    pub json: bool,
}

pub async fn run(settings: &Settings, f: Filters) -> Result<i32, CommandError> {
    let status = f
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                CommandError::Usage(format!(
                    "unknown status {s:?}; one of pending, retrying, delivered, dead, rejected, replaced"
                ))
            })
        })
        .transpose()?;
    let range = time_range(f.since.as_deref(), f.until.as_deref()).map_err(CommandError::Usage)?;
    let store = open_store(settings).await?;
    // The same read as /admin/deliveries and the console's Deliveries page.
    let query = Query {
        status,
        source: f.source,
        environment: f.environment,
        since: range.map(|r| r.0),
        until: range.map(|r| r.1),
        limit: f.limit,
    };
    let events =
        store.page(crate::store::queries::EventFilter { query, ..Default::default() }).await.context("listing")?.events;
    if f.json {
        println!("{}", serde_json::to_string_pretty(&events).context("printing")?);
        return Ok(0);
    }
    println!(
        "{:<36}  {:<9}  {:<9}  {:<8}  {:<24}  {:>3}  {:<24}  error",
        "id", "status", "source", "env", "received_at", "try", "identity"
    );
    for e in &events {
        println!(
            "{:<36}  {:<9}  {:<9}  {:<8}  {:<24}  {:>3}  {:<24}  {}",
            e.id,
            e.status,
            e.source,
            if e.environment.is_empty() { "-" } else { e.environment.as_str() },
            e.received_at,
            e.attempts,
            e.identity.chars().take(24).collect::<String>(),
            e.last_error.as_deref().unwrap_or("")
        );
    }
    eprintln!("{} event(s)", events.len());
    Ok(0)
}
