//! Groups claimed events into Heap bulk calls: one app_id and one endpoint per call, at most `max` events, in the
//! order they were accepted (so later user-property writes stay later).

use crate::domain::CallKind;
use crate::store::Claimed;

#[derive(Debug)]
pub struct Batch {
    pub app_id: String,
    pub kind: CallKind,
    pub events: Vec<Claimed>,
}

pub fn batches(claimed: Vec<Claimed>, max: usize) -> Vec<Batch> {
    let max = max.max(1);
    let mut out: Vec<Batch> = Vec::new();
    for c in claimed {
        let open = out.iter_mut().rev().find(|b| b.app_id == c.app_id && b.kind == c.kind && b.events.len() < max);
        match open {
            Some(b) => b.events.push(c),
            None => out.push(Batch { app_id: c.app_id.clone(), kind: c.kind, events: vec![c] }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: i64, app: &str, kind: CallKind) -> Claimed {
        Claimed {
            id,
            event_id: id.to_string(),
            source: "test".into(),
            kind,
            app_id: app.into(),
            identity: "u".into(),
            payload: "{}".into(),
            attempts: 0,
            enqueued_at: 0,
            lease_token: 1,
        }
    }

    #[test]
    fn events_group_by_app_and_endpoint_up_to_the_limit_in_order() {
        let claimed = vec![
            c(1, "a", CallKind::Track),
            c(2, "b", CallKind::Track),
            c(3, "a", CallKind::UserProperties),
            c(4, "a", CallKind::Track),
            c(5, "a", CallKind::Track),
        ];
        let b = batches(claimed, 2);
        let shape: Vec<(String, Vec<i64>)> = b
            .iter()
            .map(|b| (format!("{}:{}", b.app_id, b.kind.as_str()), b.events.iter().map(|e| e.id).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a:track".into(), vec![1, 4]),
                ("b:track".into(), vec![2]),
                ("a:user_properties".into(), vec![3]),
                ("a:track".into(), vec![5]),
            ]
        );
    }
}
