//! `heap-relay deliveries [--status S] [--source S] [--environment E] [--since T] [--until T]`: the delivery log
//! from the store.

use super::CommandError;
use crate::filters::FilterParams;
use crate::settings::Settings;
use crate::startup::open_store;
use anyhow::Context;

/// Prints up to `limit` events of the log that pass `params`, as a table or (`json`) as JSON.
pub async fn run(settings: &Settings, params: FilterParams, limit: i64, json: bool) -> Result<i32, CommandError> {
    // The same filters, read the same way, as /admin/deliveries and the console's Deliveries page.
    let filter = params.parse(limit, i64::MAX).map_err(|e| CommandError::Usage(e.to_string()))?;
    let store = open_store(settings).await?;
    let events = store.page(filter).await.context("listing")?.events;
    if json {
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
