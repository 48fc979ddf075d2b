//! `heap-relay render <source> <file> [--template NAME]`: the Heap calls a body would produce, as JSON; no network.

use super::CommandError;
use crate::domain::Timestamp;
use crate::ingest::Route;
use crate::settings::Settings;
use crate::sources::Source;
use crate::startup::{build_pipeline, load_templates};
use anyhow::{Context, anyhow};
use serde_json::json;
use std::path::Path;

/// Exit 0 when every item rendered to valid Heap calls, 1 when any was rejected.
pub fn run(settings: &Settings, source: &str, file: &Path, template: Option<String>) -> Result<i32, CommandError> {
    let src = Source::parse(source).ok_or_else(|| {
        CommandError::Usage(format!("unknown source {source:?}; sources are clevertap, userpilot, segment"))
    })?;
    let pipeline = build_pipeline(settings, load_templates(settings)?);
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Repaired as `serve` repairs it (NULs removed, lone surrogates replaced), so the calls are the ones it sends.
    let (body, repaired) = crate::sanitize::repair(body);
    if let Some(r) = &repaired {
        eprintln!("{}: {} value(s) repaired (listed under \"sanitized\")", file.display(), r.total);
    }
    let out = pipeline
        .ingest(&Route::Hook { source: src, template }, &body, &Timestamp::now())
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    if out.ping {
        println!("{}", json!({"test_ping": true, "calls": []}));
        return Ok(0);
    }
    let calls: Vec<_> = out
        .accepted
        .iter()
        .map(|a| json!({"item": a.index, "endpoint": a.call.kind().path(), "body": a.call.single_body()}))
        .collect();
    let mut doc = json!({"template": out.template, "calls": calls, "rejected": out.rejected, "ignored": out.ignored});
    if let Some(r) = &repaired {
        r.add_to(&mut doc);
    }
    println!("{}", serde_json::to_string_pretty(&doc).context("printing the result")?);
    Ok(if out.rejected.is_empty() { 0 } else { 1 })
}
