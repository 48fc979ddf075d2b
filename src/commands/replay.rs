//! `heap-relay replay (--id ID | --status S | --since T [--until T] | --stale-template SOURCE/NAME) [--rerender]`.

use super::CommandError;
use crate::replay::{replay, selector};
use crate::settings::Settings;
use crate::startup::{build_pipeline, load_templates, open_store};
use anyhow::Context;

pub struct Selection {
    pub id: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub stale_template: Option<String>,
}

pub async fn run(settings: &Settings, s: Selection, rerender: bool) -> Result<i32, CommandError> {
    let pipeline = build_pipeline(settings, load_templates(settings)?);
    let sel = match &s.stale_template {
        Some(spec) => crate::replay::stale_template(&pipeline, spec),
        None => selector(s.id.as_deref(), s.status.as_deref(), s.since.as_deref(), s.until.as_deref()),
    }
    .map_err(CommandError::Usage)?;
    let store = open_store(settings).await?;
    let mut progress = |done: usize, total: usize| {
        if done.is_multiple_of(100) || done == total {
            eprintln!("re-rendered {done}/{total} bodies");
        }
    };
    let report = replay(&store, &pipeline, sel, rerender, &mut progress).await.context("replay")?;
    println!("{}", serde_json::to_string_pretty(&report).context("printing the report")?);
    Ok(0)
}
