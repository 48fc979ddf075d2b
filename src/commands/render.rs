//! `heap-relay render <source> <file> [--template NAME]`: the Heap calls a body would produce, as JSON; no network.

use crate::domain::Timestamp;
use crate::ingest::Route;
use crate::settings::Settings;
use crate::sources::Source;
use crate::startup::{build_pipeline, load_templates};
use serde_json::json;
use std::path::Path;

pub fn run(settings: &Settings, source: &str, file: &Path, template: Option<String>) -> i32 {
    let Some(src) = Source::parse(source) else {
        eprintln!("error: unknown source {source:?}; sources are clevertap, userpilot, segment");
        return 2;
    };
    let templates = match load_templates(settings) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let body = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return 1;
        }
    };
    let pipeline = build_pipeline(settings, templates);
    match pipeline.ingest(&Route::Hook { source: src, template }, &body, &Timestamp::now()) {
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            1
        }
        Ok(out) if out.ping => {
            println!("{}", json!({"test_ping": true, "calls": []}));
            0
        }
        Ok(out) => {
            let calls: Vec<_> = out
                .accepted
                .iter()
                .map(|a| json!({"item": a.index, "endpoint": a.call.kind().path(), "body": a.call.single_body()}))
                .collect();
            let doc =
                json!({"template": out.template, "calls": calls, "rejected": out.rejected, "ignored": out.ignored});
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            if out.rejected.is_empty() { 0 } else { 1 }
        }
    }
}
