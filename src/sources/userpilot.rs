//! Userpilot event webhooks (experiences, checklists, NPS, forms). One event per body, or an array of them.
//!
//! The context is the event as sent, plus `heap_event`: the name Heap's own Userpilot integration uses for the
//! event type (`Userpilot Experience (started)`, ...), or `Userpilot <event>` for a type the relay does not know.

use super::{Item, Shape, get_ci};
use crate::domain::{FieldError, Seed};
use crate::templates::context::{Ctx, CtxObject, Dates};
use serde_json::Value;

const NAMES: &[(&str, &str)] = &[
    ("flow_started", "Userpilot Experience (started)"),
    ("flow_step", "Userpilot Experience (step)"),
    ("flow_completed", "Userpilot Experience (completed)"),
    ("flow_dismissed", "Userpilot Experience (dismissed)"),
    ("checklist_started", "Userpilot Checklist (started)"),
    ("checklist_task_completed", "Userpilot Checklist (task completed)"),
    ("checklist_completed", "Userpilot Checklist (completed)"),
    ("checklist_dismissed", "Userpilot Checklist (dismissed)"),
    ("nps_ask_later", "Userpilot NPS (ask later)"),
    ("nps_score", "Userpilot NPS (score)"),
    ("nps_feedback", "Userpilot NPS (feedback)"),
    ("form_submitted", "Userpilot Form (submitted)"),
];

/// The Heap event name for a Userpilot event type.
pub fn heap_event_name(event: &str) -> String {
    let e = event.trim();
    NAMES
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(e))
        .map_or_else(|| format!("Userpilot {e}"), |(_, name)| (*name).to_owned())
}

pub fn for_each<'a>(body: &'a Value, f: &mut dyn FnMut(Result<Item<'a>, FieldError>)) -> Result<Shape, FieldError> {
    let events: Vec<&Value> = match body {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => vec![body],
        _ => {
            return Err(FieldError::invalid(
                "body",
                "a Userpilot webhook body must be a JSON object (or an array of them)",
            ));
        }
    };
    let many = matches!(body, Value::Array(_));
    for (i, e) in events.into_iter().enumerate() {
        f(event_item(e).map_err(|err| if many { err.under(&format!("[{i}]")) } else { err }));
    }
    Ok(Shape::Items)
}

fn event_item(event: &Value) -> Result<Item<'_>, FieldError> {
    let Value::Object(obj) = event else {
        return Err(FieldError::invalid("", "each Userpilot event must be a JSON object"));
    };
    let name = match get_ci(obj, "event") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => {
            return Err(FieldError::missing("event", "a Userpilot event needs `event` (its type, e.g. flow_started)"));
        }
    };
    let mut ctx = CtxObject::from_json(obj, Dates::AsSent);
    ctx.insert("heap_event", Ctx::str(heap_event_name(&name)));
    Ok(Item { ctx, seed: Seed::Value(event), excluded: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_get_heaps_names_and_others_a_prefix() {
        assert_eq!(heap_event_name("flow_started"), "Userpilot Experience (started)");
        assert_eq!(heap_event_name("checklist_task_completed"), "Userpilot Checklist (task completed)");
        assert_eq!(heap_event_name("nps_ask_later"), "Userpilot NPS (ask later)");
        assert_eq!(heap_event_name("form_submitted"), "Userpilot Form (submitted)");
        assert_eq!(heap_event_name("banner_clicked"), "Userpilot banner_clicked");
    }
}
