//! `heap-relay check`: loads the configuration and every template, renders each template against its examples
//! and against an empty profile, and reports each problem; exit 1 on any.
//!
//! Rendering catches what loading cannot: an unknown partial, a filter that fails on a missing value, a text
//! template whose output is not JSON.

use crate::settings::Settings;
use crate::startup::{build_pipeline, load_limits};
use crate::templates::TemplateStore;
use crate::templates::context::CtxObject;
use std::sync::Arc;

pub fn run(settings: &Settings) -> Result<i32, super::CommandError> {
    let mut problems = Vec::new();
    let (store, errors) = TemplateStore::open_with(&settings.templates.dir, load_limits(settings));
    problems.extend(errors.iter().map(|e| e.to_string()));
    let set = store.snapshot();
    for (name, s) in settings.hook_sources() {
        if s.enabled && set.get(name, &s.template).is_none() && set.broken(name, &s.template).is_none() {
            problems.push(format!(
                "source {name}: template {}/{name}/{}.json is missing",
                settings.templates.dir.display(),
                s.template
            ));
        }
    }
    let pipeline = build_pipeline(settings, Arc::new(store));
    for (source, name) in set.names() {
        let Some(t) = set.get(&source, &name) else { continue };
        if let Err(e) = t.render_item(&CtxObject::new(), &pipeline.render_limits) {
            problems.push(format!("{e} (rendered against an empty profile)"));
        }
        if !t.has_plan() {
            println!(
                "note: {} renders through liquid, several times slower than the direct path: it uses Liquid beyond \
                 reads with `default` and if/unless over ==, !=, and, or (README, \"Templates\")",
                t.file
            );
        }
    }
    let examples = super::test::example_files(&settings.templates.dir);
    for (source, name, file) in &examples {
        if let Some(why) = super::test::run_example(&pipeline, source, name, file).failure {
            problems.push(format!("{}: the example fails (run `heap-relay test`):\n{why}", file.display()));
        }
    }
    if settings.configured_app_ids().is_empty() {
        println!("note: no Heap app_id is configured (heap.app_id); templates and bodies must give one");
    }
    if problems.is_empty() {
        println!("ok: configuration and {} templates load; {} example(s) pass", set.names().len(), examples.len());
        Ok(0)
    } else {
        for p in &problems {
            println!("error: {p}");
        }
        println!("{} problem(s)", problems.len());
        Ok(1)
    }
}
