//! Criterion micro benchmarks of the ingest pipeline's steps: JSON parse, source adapter, template render per
//! event for each default template, flattening, validation, and render+validate of the default CleverTap template.

use criterion::{Criterion, Throughput, black_box, criterion_group};
use heap_relay::domain::heap_call::{BuildContext, KeySeed};
use heap_relay::domain::{AppIdPolicy, KeyScheme, Properties, PropertyLimits, Timestamp, TrackEvent, UserProperties};
use heap_relay::ingest::{Route, parse_json};
use heap_relay::settings::Settings;
use heap_relay::sources::{self, Parsed, Source, SourceOptions};
use heap_relay::startup::{build_pipeline, load_templates};
use heap_relay::templates::render::RenderLimits;
use serde_json::Value;
use std::path::Path;

// The load harness's body builders, shared rather than copied.
#[path = "load/bodies.rs"]
#[allow(dead_code)]
mod bodies;
use bodies::{clevertap_with, fixture};

fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.templates.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    s.heap.app_id = "1234567890".into();
    s
}

fn items(source: Source, body: &Value) -> Vec<sources::Item<'_>> {
    match sources::parse(source, body, &SourceOptions::default()).expect("sample parses") {
        Parsed::Items(items) => items.into_iter().map(|i| i.expect("sample item is usable")).collect(),
        Parsed::Ping => panic!("sample is not a ping"),
    }
}

fn benches(c: &mut Criterion) {
    let settings = settings();
    let templates = load_templates(&settings).expect("templates load");
    let limits = RenderLimits::default();
    let clevertap_100 = clevertap_with(100);
    let clevertap_100_bytes = serde_json::to_vec(&clevertap_100).expect("serialises");

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(clevertap_100_bytes.len() as u64));
    g.bench_function("json_clevertap_100_profiles", |b| b.iter(|| parse_json(black_box(&clevertap_100_bytes))));
    g.throughput(Throughput::Elements(100));
    g.bench_function("adapter_clevertap_100_profiles", |b| {
        b.iter(|| sources::parse(Source::CleverTap, black_box(&clevertap_100), &SourceOptions::default()))
    });
    g.finish();

    let cases = [
        ("clevertap", Source::CleverTap, fixture("clevertap-profile-batch.json")),
        ("userpilot", Source::Userpilot, fixture("userpilot-experience-started.json")),
        ("segment", Source::Segment, fixture("segment-batch.json")),
    ];
    let mut g = c.benchmark_group("render_per_event");
    for (name, source, body) in &cases {
        let tpl = templates.get(name, "default").expect("default template");
        let its = items(*source, body);
        g.throughput(Throughput::Elements(its.len() as u64));
        g.bench_function(format!("{name}_default"), |b| {
            b.iter(|| {
                for it in &its {
                    black_box(tpl.render(&it.ctx, &limits).expect("renders"));
                }
            })
        });
    }
    g.finish();

    // Flattening and validation of what the default CleverTap template renders for the sample's first profile.
    let tpl = templates.get("clevertap", "default").expect("default template");
    let its = items(Source::CleverTap, &cases[0].2);
    let drafts = tpl.render(&its[0].ctx, &limits).expect("renders");
    let draft = &drafts[0];
    let props = draft.body.get("properties").cloned().unwrap_or(Value::Null);
    let plimits = PropertyLimits::default();
    let policy = AppIdPolicy::new(Vec::new());
    let received_at = Timestamp::now();
    let cx = BuildContext {
        policy: &policy,
        default_app_id: Some("1234567890"),
        limits: &plimits,
        received_at: &received_at,
        key: KeySeed { scheme: KeyScheme::default(), parts: &["clevertap", "default"], seed: its[0].seed },
    };
    let mut g = c.benchmark_group("validate_per_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("flatten_clevertap_properties", |b| b.iter(|| Properties::flatten(black_box(&props), &plimits)));
    g.bench_function("track_event_build_clevertap", |b| b.iter(|| TrackEvent::build(black_box(&draft.body), &cx)));
    let seg = items(Source::Segment, &cases[2].2);
    let seg_tpl = templates.get("segment", "default").expect("segment template");
    let identify = seg_tpl.render(&seg[0].ctx, &limits).expect("renders");
    g.bench_function("user_properties_build_segment_identify", |b| {
        b.iter(|| UserProperties::build(black_box(&identify[0].body), &cx))
    });
    g.finish();

    // The figure the target is about: everything between the parsed body and validated Heap calls, per event.
    let pipeline = build_pipeline(&settings, templates.clone());
    let route = Route::Hook { source: Source::CleverTap, template: None };
    let mut g = c.benchmark_group("render_and_validate");
    g.throughput(Throughput::Elements(100));
    g.bench_function("clevertap_default_100_profiles", |b| {
        b.iter(|| {
            let out = pipeline.ingest_value(&route, black_box(&clevertap_100), &received_at).expect("ingests");
            assert_eq!(out.accepted.len(), 100);
        })
    });
    g.bench_function("clevertap_default_100_profiles_with_json_parse", |b| {
        b.iter(|| pipeline.ingest(&route, black_box(&clevertap_100_bytes), &received_at).expect("ingests"))
    });
    g.finish();

    // The two kinds of template side by side, and serde_json parsing the same body, per event.
    let mut g = c.benchmark_group("template_kinds");
    g.throughput(Throughput::Elements(100));
    for (label, route) in kind_routes() {
        g.bench_function(label, |b| {
            b.iter(|| {
                let out = pipeline.ingest_value(&route, black_box(&clevertap_100), &received_at).expect("ingests");
                assert_eq!(out.accepted.len(), 100);
            })
        });
    }
    g.bench_function("serde_json_parse_same_body", |b| {
        b.iter(|| serde_json::from_slice::<Value>(black_box(&clevertap_100_bytes)).expect("parses"))
    });
    g.finish();
}

/// The default CleverTap template as a JSON template and as its text twin (templates/clevertap/default_text.liquid).
fn kind_routes() -> [(&'static str, Route); 2] {
    [
        ("json_template_render_validate", Route::Hook { source: Source::CleverTap, template: Some("default".into()) }),
        (
            "text_template_render_validate",
            Route::Hook { source: Source::CleverTap, template: Some("default_text".into()) },
        ),
    ]
}

/// Events per second on one core for `f`, which handles `events` events per call: the best of five 300 ms runs.
fn events_per_sec(events: usize, mut f: impl FnMut()) -> f64 {
    let mut best = 0f64;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            f();
            calls += 1;
        }
        best = best.max(calls as f64 * events as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Prints the figures issue 15 asks for: render+validate events/s per core for each kind of template, beside
/// serde_json parsing the same body.
fn summary() {
    let settings = settings();
    let pipeline = build_pipeline(&settings, load_templates(&settings).expect("templates load"));
    let body = clevertap_with(100);
    let bytes = serde_json::to_vec(&body).expect("serialises");
    let received_at = Timestamp::now();
    let mut rows = Vec::new();
    for (label, route) in kind_routes() {
        rows.push((
            label,
            events_per_sec(100, || {
                black_box(pipeline.ingest_value(&route, &body, &received_at).expect("ingests"));
            }),
        ));
    }
    rows.push((
        "serde_json_parse_same_body",
        events_per_sec(100, || {
            black_box(serde_json::from_slice::<Value>(&bytes).expect("parses"));
        }),
    ));
    println!("\nCleverTap default template, 100-profile body, one core (best of 5 x 300 ms):");
    for (label, eps) in &rows {
        println!("  {label:<32} {:>12.0} events/s", eps);
    }
    println!("  text / JSON template            {:>12.2}x", rows[1].1 / rows[0].1);

    // What one request of the load table's main scenario costs before the store and without HTTP.
    let two = serde_json::to_vec(&clevertap_with(2)).expect("serialises");
    let per_request = events_per_sec(1, || {
        black_box(intake_rows(&pipeline, &two));
    });
    println!("\nCleverTap 2-profile body, parse + render + validate + rows to store, one core (best of 5 x 300 ms):");
    println!("  {:<32} {:>12.0} requests/s ({:.1} us each)", "intake_clevertap_2", per_request, 1e6 / per_request);
}

/// The intake's work on one body up to the store: the pipeline, then the rows the store is given.
fn intake_rows(pipeline: &heap_relay::ingest::Pipeline, body: &[u8]) -> usize {
    let route = Route::Hook { source: Source::CleverTap, template: None };
    let out = pipeline.ingest(&route, body, &Timestamp::now()).expect("ingests");
    let (rows, _) = heap_relay::intake::to_rows("clevertap", out, body.to_vec(), 0, None);
    assert_eq!(rows.events.len(), 2, "one event per profile");
    rows.events.len()
}

criterion_group!(micro, benches);

fn main() {
    // The allocator as the relay runs it.
    heap_relay::tune_allocator();
    // `-- --fixed N`: N calls of the JSON template's render+validate and nothing else, for `perf stat` (instruction
    // counts compare changes on a busy machine, where wall time does not).
    if let Some(n) = std::env::args().skip_while(|a| a != "--fixed").nth(1).and_then(|n| n.parse::<usize>().ok()) {
        let settings = settings();
        let pipeline = build_pipeline(&settings, load_templates(&settings).expect("templates load"));
        let body = clevertap_with(100);
        let route = &kind_routes()[0].1;
        let received_at = Timestamp::now();
        for _ in 0..n {
            black_box(pipeline.ingest_value(route, &body, &received_at).expect("ingests"));
        }
        return;
    }
    // `-- --fixed-intake N`: N calls of `intake_rows` on the 2-profile body, for `perf stat` in the same way.
    if let Some(n) = std::env::args().skip_while(|a| a != "--fixed-intake").nth(1).and_then(|n| n.parse::<usize>().ok())
    {
        let settings = settings();
        let pipeline = build_pipeline(&settings, load_templates(&settings).expect("templates load"));
        let two = serde_json::to_vec(&clevertap_with(2)).expect("serialises");
        for _ in 0..n {
            black_box(intake_rows(&pipeline, &two));
        }
        return;
    }
    // `cargo bench --bench micro -- --summary` prints only the events/s table.
    if !std::env::args().any(|a| a == "--summary") {
        micro();
        Criterion::default().configure_from_args().final_summary();
    }
    summary();
}
