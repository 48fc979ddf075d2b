//! `heap-relay deliveries [--status S] [--source S] [--since T] [--until T]`: the delivery log from the store.

use crate::replay::selector;
use crate::settings::Settings;
use crate::startup::open_store;
use crate::store::{Query, Selector, Status};

pub struct Filters {
    pub status: Option<String>,
    pub source: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: i64,
    pub json: bool,
}

pub async fn run(settings: &Settings, f: Filters) -> i32 {
    let status = match f.status.as_deref().map(|s| Status::parse(s).ok_or(s)).transpose() {
        Ok(s) => s,
        Err(s) => {
            eprintln!("error: unknown status {s:?}; one of pending, retrying, delivered, dead, rejected, replaced");
            return 2;
        }
    };
    let (since, until) = match (&f.since, &f.until) {
        (None, None) => (None, None),
        (s, u) => match selector(None, None, s.as_deref(), u.as_deref()) {
            Ok(Selector::Range { from, to, .. }) => (Some(from), Some(to)),
            Ok(_) => (None, None),
            Err(m) => {
                eprintln!("error: {m}");
                return 2;
            }
        },
    };
    let store = match open_store(settings).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let events = match store.list(Query { status, source: f.source, since, until, limit: f.limit }).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if f.json {
        println!("{}", serde_json::to_string_pretty(&events).unwrap_or_default());
        return 0;
    }
    println!(
        "{:<36}  {:<9}  {:<9}  {:<24}  {:>3}  {:<24}  error",
        "id", "status", "source", "received_at", "try", "identity"
    );
    for e in &events {
        println!(
            "{:<36}  {:<9}  {:<9}  {:<24}  {:>3}  {:<24}  {}",
            e.id,
            e.status,
            e.source,
            e.received_at,
            e.attempts,
            e.identity.chars().take(24).collect::<String>(),
            e.last_error.as_deref().unwrap_or("")
        );
    }
    eprintln!("{} event(s)", events.len());
    0
}
