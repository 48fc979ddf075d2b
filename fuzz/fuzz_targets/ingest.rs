//! Any bytes as a request body on every route: the strict parser and the whole ingest pipeline (source adapters,
//! shipped templates, validation) must return a value or an error, never panic, and every accepted call must be
//! Heap JSON with the configured app_id.
#![no_main]

use heap_relay::domain::{CallKind, Timestamp};
use heap_relay::ingest::{Pipeline, Route};
use heap_relay::sources::Source;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const APP_ID: &str = "1234567890";

fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates");
        let mut settings = heap_relay::settings::Settings::defaults();
        settings.heap.app_id = APP_ID.into();
        settings.templates.dir = dir.clone();
        let templates = heap_relay::templates::TemplateStore::load(&dir).expect("the shipped templates load");
        heap_relay::startup::build_pipeline(&settings, Arc::new(templates))
    })
}

fuzz_target!(|data: &[u8]| {
    let p = pipeline();
    let now = Timestamp::now();
    let routes = [
        Route::Hook { source: Source::CleverTap, template: None },
        Route::Hook { source: Source::Userpilot, template: None },
        Route::Hook { source: Source::Segment, template: None },
        Route::Heap(CallKind::Track),
        Route::Heap(CallKind::UserProperties),
    ];
    for route in &routes {
        if let Ok(out) = p.ingest(route, data, &now) {
            for a in &out.accepted {
                let body = a.call.single_body();
                let text = body.to_string();
                let back: serde_json::Value = serde_json::from_str(&text).expect("accepted calls are valid JSON");
                if matches!(route, Route::Hook { .. }) {
                    assert_eq!(back["app_id"], APP_ID, "hooks send only to the configured app_id");
                }
            }
        }
    }
});
