//! `heap-relay replay (--id ID | --status S | --since T [--until T]) [--rerender]`.

use crate::replay::{replay, selector};
use crate::settings::Settings;
use crate::startup::{build_pipeline, load_templates, open_store};

pub async fn run(
    settings: &Settings,
    id: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    rerender: bool,
) -> i32 {
    let sel = match selector(id.as_deref(), status.as_deref(), since.as_deref(), until.as_deref()) {
        Ok(s) => s,
        Err(m) => {
            eprintln!("error: {m}");
            return 2;
        }
    };
    let templates = match load_templates(settings) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let store = match open_store(settings).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let pipeline = build_pipeline(settings, templates);
    let mut progress = |done: usize, total: usize| {
        if done % 100 == 0 || done == total {
            eprintln!("re-rendered {done}/{total} bodies");
        }
    };
    match replay(&store, &pipeline, sel, rerender, &mut progress).await {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
