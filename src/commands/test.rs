//! `heap-relay test`: runs every template's examples and prints a diff per failure. Exit 1 on any failure.
//!
//! An example is `templates/<source>/<name>.tests/<case>.json`:
//! ```json
//! { "_about": "what it shows, and where the payload comes from",
//!   "app_id": "1234567890",
//!   "body": { "profiles": [ ... ] },
//!   "calls": [ { "endpoint": "/api/track", "body": { "app_id": "1234567890", "event": "...", ... } } ],
//!   "rejected": [ { "index": 0, "code": "invalid_identity" } ],
//!   "ignored": [ 1 ] }
//! ```
//! `body` goes through the same pipeline as a request to `/hooks/<source>/<name>`, received at
//! `2024-01-01T00:00:00Z`; `app_id` (optional) stands in for `heap.app_id`. The Heap calls made must equal
//! `calls` in order (a call's `idempotency_key` is compared only when the example gives one); each refusal must
//! match its `rejected` entry in the keys the entry gives; `rejected` and `ignored` default to none.

use super::CommandError;
use crate::domain::Timestamp;
use crate::ingest::{Pipeline, Route};
use crate::settings::Settings;
use crate::sources::Source;
use crate::startup::{build_pipeline, load_limits};
use crate::templates::TemplateStore;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One example's result.
#[derive(Debug)]
pub struct ExampleResult {
    /// `templates/<source>/<name>.tests/<case>.json`.
    pub file: PathBuf,
    /// `None` when it passed; else what went wrong (a diff, or why it could not run).
    pub failure: Option<String>,
}

/// Every example file of the templates under `dir`: `(source, template, file)`, sorted.
pub fn example_files(dir: &Path) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    for source in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for t in std::fs::read_dir(source.path()).into_iter().flatten().flatten() {
            let name = t.file_name().to_string_lossy().into_owned();
            let Some(template) = name.strip_suffix(".tests") else { continue };
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                if f.path().extension().and_then(|e| e.to_str()) == Some("json") {
                    out.push((source.file_name().to_string_lossy().into_owned(), template.to_owned(), f.path()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Runs one example against `pipeline`.
pub fn run_example(pipeline: &Pipeline, source: &str, template: &str, file: &Path) -> ExampleResult {
    let failure = check_example(pipeline, source, template, file, false).err();
    ExampleResult { file: file.to_owned(), failure }
}

/// Runs one example; with `bless`, a failing example's expectations are replaced by what the template gave.
fn check_example(pipeline: &Pipeline, source: &str, template: &str, file: &Path, bless: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let example: Value = serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
    let body = example.get("body").ok_or("an example needs a `body`")?;
    let src = Source::parse(source).ok_or_else(|| format!("unknown source {source:?}"))?;
    let mut pipeline = pipeline.clone();
    if let Some(app_id) = example.get("app_id").and_then(Value::as_str) {
        pipeline.default_app_id = Some(app_id.to_owned());
    }
    let received_at = Timestamp::parse(&json!("2024-01-01T00:00:00Z")).map_err(|e| e.to_string())?;
    let route = Route::Hook { source: src, template: Some(template.to_owned()) };
    let out = pipeline.ingest_value(&route, body, &received_at).map_err(|e| format!("the body is refused: {e}"))?;
    let want_calls = example.get("calls").and_then(Value::as_array).cloned().unwrap_or_default();
    let want_rejected = example.get("rejected").and_then(Value::as_array).cloned().unwrap_or_default();
    let calls: Vec<Value> = out
        .accepted
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut body = a.call.single_body();
            let keep_key = want_calls.get(i).and_then(|c| c["body"].get("idempotency_key")).is_some();
            if let (false, Some(b)) = (keep_key, body.as_object_mut()) {
                b.remove("idempotency_key");
            }
            json!({"endpoint": a.call.kind().path(), "body": body})
        })
        .collect();
    let rejected: Vec<Value> = out
        .rejected
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let full = json!({"index": r.index, "field": r.field, "code": r.code, "message": r.message});
            match want_rejected.get(i).and_then(Value::as_object) {
                Some(want) => {
                    Value::Object(want.keys().filter_map(|k| Some((k.clone(), full.get(k)?.clone()))).collect())
                }
                None => full,
            }
        })
        .collect();
    let got = json!({"calls": calls, "rejected": rejected, "ignored": out.ignored});
    let want = json!({
        "calls": want_calls,
        "rejected": want_rejected,
        "ignored": example.get("ignored").cloned().unwrap_or(json!([])),
    });
    if got == want {
        return Ok(());
    }
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    if bless {
        let mut updated = example.clone();
        for key in ["calls", "rejected", "ignored"] {
            updated[key] = got[key].clone();
        }
        std::fs::write(file, pretty(&updated) + "\n").map_err(|e| format!("cannot write: {e}"))?;
    }
    Err(diff(&pretty(&want), &pretty(&got)))
}

/// A line diff: `-` lines are expected and missing, `+` lines are what the template gave instead.
pub fn diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    // Longest common subsequence table, from the ends.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::from("--- expected\n+++ rendered\n");
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

/// Runs every example under the configured templates directory; prints each result. Exit 1 on any failure or
/// any template that does not load. With `bless`, failing examples are rewritten to what the templates give
/// (review the diff before committing them).
pub fn run(settings: &Settings, bless: bool) -> Result<i32, CommandError> {
    let dir = &settings.templates.dir;
    let (store, errors) = TemplateStore::open_with(dir, load_limits(settings));
    for e in &errors {
        println!("error: {e}");
    }
    let pipeline = build_pipeline(settings, Arc::new(store));
    let mut failed = 0;
    let files = example_files(dir);
    for (source, template, file) in &files {
        match check_example(&pipeline, source, template, file, bless) {
            Ok(()) => println!("ok    {}", file.display()),
            Err(why) => {
                failed += 1;
                let verb = if bless { "BLESSED" } else { "FAIL " };
                println!("{verb} {}\n{}", file.display(), indent(&why));
            }
        }
    }
    println!("{} example(s): {} passed, {failed} failed", files.len(), files.len() - failed);
    Ok(if failed > 0 || !errors.is_empty() { 1 } else { 0 })
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_marks_missing_and_unexpected_lines() {
        let d = diff("a\nb\nc", "a\nx\nc");
        assert!(d.contains("- b\n") && d.contains("+ x\n") && d.contains("  a\n"), "{d}");
    }
}
