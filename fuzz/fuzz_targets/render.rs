//! Template rendering. The first byte picks what is fuzzed:
//! - even: the context (a hostile body) against each shipped template and a few tricky ones;
//! - odd: the template leaf itself (an operator's edit) against a fixed context. The load-time bounds
//!   (`templates::bounds`) must stop any loop that would allocate or spin without limit, and rendering must end
//!   within its deadline.
#![no_main]

use heap_relay::templates::context::CtxObject;
use heap_relay::templates::render::{RenderLimits, parser};
use heap_relay::templates::{Template, TemplateSet};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

const TRICKY: &[&str] = &[
    r#"{"event": "{{ a }}", "identity": "{{ b | default: 'x' }}", "properties": {"...m": "{{ c }}", "j": "{{ d | json }}"}}"#,
    r#"{"track": {"when": "{% if a %}yes{% endif %}", "event": "E", "identity": "{% for x in a limit: 50 %}{{ x }}{% endfor %}"}}"#,
    r#"{"add_user_properties": {"identity": "{{ a.b.c }}", "properties": {"k": "{{ a | size }}{{ b | upcase }}{{ c | split: ',' | first }}"}}}"#,
];

fn templates() -> &'static Vec<std::sync::Arc<Template>> {
    static T: OnceLock<Vec<std::sync::Arc<Template>>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates");
        let (set, errors) = TemplateSet::load_dir(&dir);
        assert!(errors.is_empty(), "{errors:?}");
        let p = parser().expect("parser");
        let mut all: Vec<_> = set.names().iter().filter_map(|(s, n)| set.get(s, n)).collect();
        for (i, text) in TRICKY.iter().enumerate() {
            let t = Template::compile(&p, "fuzz", &format!("t{i}"), "fuzz.json", text).expect("tricky templates load");
            all.push(std::sync::Arc::new(t));
        }
        all
    })
}

fn limits() -> RenderLimits {
    RenderLimits { timeout: Duration::from_millis(200), ..RenderLimits::default() }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(serde_json::Value::Object(obj)) = heap_relay::json::parse(rest, &Default::default()) else { return };
        let ctx = CtxObject::from_json(&obj);
        for t in templates() {
            let _ = t.render(&ctx, &limits());
        }
    } else {
        let Ok(leaf) = std::str::from_utf8(rest) else { return };
        let Ok(text) = serde_json::to_string(leaf) else { return };
        let doc = format!(r#"{{"event": "E", "identity": {text}}}"#);
        let Ok(p) = parser() else { return };
        if let Ok(t) = Template::compile(&p, "fuzz", "leaf", "fuzz.json", &doc) {
            let ctx = CtxObject::from_json(
                serde_json::json!({"a": [1, 2, 3], "b": "text", "c": {"d": 1.5}}).as_object().expect("object"),
            );
            let started = std::time::Instant::now();
            let _ = t.render(&ctx, &limits());
            assert!(started.elapsed() < Duration::from_secs(5), "a render ran {:?}", started.elapsed());
        }
    }
});
