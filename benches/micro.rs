//! Criterion micro benchmarks of the ingest pipeline's steps: JSON parse, source adapter, template render per
//! event for each default template, flattening, validation, and render+validate of the default CleverTap template.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use heap_relay::domain::heap_call::BuildContext;
use heap_relay::domain::{AppIdPolicy, Properties, PropertyLimits, Timestamp, TrackEvent, UserProperties};
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

fn items(source: Source, body: &Value) -> Vec<sources::Item> {
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
    let seed = ["clevertap", "default", its[0].seed.as_str()];
    let cx = BuildContext {
        policy: &policy,
        default_app_id: Some("1234567890"),
        limits: &plimits,
        received_at: &received_at,
        key_seed: &seed,
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
}

criterion_group!(micro, benches);
criterion_main!(micro);
