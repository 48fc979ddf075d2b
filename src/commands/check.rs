//! `heap-relay check`: loads the configuration and every template and reports each problem; exit 1 on any.

use crate::settings::Settings;
use crate::templates::TemplateSet;

pub fn run(settings: &Settings) -> Result<i32, super::CommandError> {
    let mut problems = Vec::new();
    let (set, errors) = TemplateSet::load_dir_with(&settings.templates.dir, &crate::startup::load_limits(settings));
    problems.extend(errors.iter().map(|e| e.to_string()));
    for (name, s) in settings.hook_sources() {
        if s.enabled
            && set.get(name, &s.template).is_none()
            && !errors.iter().any(|e| e.file.contains(&format!("{name}/{}.json", s.template)))
        {
            problems.push(format!(
                "source {name}: template {}/{name}/{}.json is missing",
                settings.templates.dir.display(),
                s.template
            ));
        }
    }
    if settings.configured_app_ids().is_empty() {
        println!("note: no Heap app_id is configured (heap.app_id); templates and bodies must give one");
    }
    if problems.is_empty() {
        println!("ok: configuration and {} templates load", set.names().len());
        Ok(0)
    } else {
        for p in &problems {
            println!("error: {p}");
        }
        println!("{} problem(s)", problems.len());
        Ok(1)
    }
}
