//! Operator reads and records shared by the console, `/admin/*` and the CLI: a filtered delivery log in keyset
//! pages, the last hour per minute and per source × environment × app_id, failures grouped by reason, and the
//! audit log of operator actions. The types live here; each backend answers them (`sqlite::console`,
//! `postgres::console`) without scanning the whole log or events table.

use super::{EventView, Millis, Query, Status};
use serde::Serialize;

/// The delivery log's filters, beyond [`Query`]'s, and where a page starts.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub query: Query,
    /// The template name the body was rendered with.
    pub template: Option<String>,
    pub app_id: Option<String>,
    pub identity: Option<String>,
    /// A sender's message id or the event's idempotency key.
    pub key: Option<String>,
    /// The opaque cursor of the previous page ([`Page::next`]): only events older than it.
    pub before: Option<String>,
}

impl EventFilter {
    /// Whether an event (as listed) passes the filters a backend could not apply in its query.
    pub fn keeps(&self, v: &EventView) -> bool {
        self.template.as_ref().is_none_or(|t| *t == v.template)
            && self.app_id.as_ref().is_none_or(|a| *a == v.app_id)
            && self.identity.as_ref().is_none_or(|i| *i == v.identity)
            && self.key.as_ref().is_none_or(|k| v.idempotency_key.as_deref() == Some(k.as_str()))
    }
}

/// One page of the delivery log, newest first.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Page {
    pub events: Vec<EventView>,
    /// Pass as [`EventFilter::before`] for the next (older) page; `None` on the last page.
    pub next: Option<String>,
    /// The backend stopped looking after its bound of log entries: older matches may exist past `next`.
    pub truncated: bool,
}

/// Events in and delivered in one minute.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct MinuteCount {
    /// The minute's start.
    pub minute: Millis,
    /// Events received (accepted or refused).
    pub received: i64,
    /// Events Heap accepted.
    pub delivered: i64,
}

/// The last hour's events of one source × environment × app_id, by status now.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    pub source: String,
    pub environment: String,
    pub app_id: String,
    pub received: i64,
    pub delivered: i64,
    pub waiting: i64,
    pub dead: i64,
    pub refused: i64,
}

/// The last hour at a glance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Flow {
    pub since: Millis,
    /// One per minute, oldest first, every minute of the hour present.
    pub minutes: Vec<MinuteCount>,
    pub rows: Vec<FlowRow>,
    /// Items refused at ingest in the hour.
    pub refused: i64,
    /// The newest Heap call: (at, HTTP status or none, error).
    pub last_call: Option<(Millis, Option<u16>, Option<String>)>,
    /// The backend looked at its bound of entries only (a very busy hour): the figures are a lower bound.
    pub truncated: bool,
}

/// Dead or refused events that share a reason.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FailureGroup {
    /// `dead` (Heap refused, or retries ran out) or `rejected` (refused at ingest).
    pub status: &'static str,
    pub reason: String,
    pub count: i64,
    /// The newest event of the group.
    pub newest: String,
    pub newest_at: Millis,
}

/// An operator's action, as the audit log keeps it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: Millis,
    /// Who: `admin`, `read-only` (never acts), or `api`.
    pub actor: String,
    /// `replay`, `rerender`, `pause`, `resume`.
    pub action: String,
    /// The selection, in words (`dead: HTTP 400 …`, `event 12-0`, `app_id 1234`).
    pub selection: String,
    /// Events (or bodies, for a re-render) the action touched.
    pub count: i64,
}

/// The error a purged event keeps (its failure group's reason).
pub const PURGED: &str = "purged by an operator";

/// How many of the newest dead or refused events the PostgreSQL failures page groups (its bound; SQLite's is
/// `REFUSED_SCAN` entries with refusals, dead letters all counted).
pub const FAILURE_SCAN: usize = 20_000;

/// How far back the failure and flow views look at refused items in the SQLite log (entries with refusals).
pub const REFUSED_SCAN: usize = 20_000;

/// The minute a time falls in.
pub fn minute_of(t: Millis) -> Millis {
    t - t.rem_euclid(60_000)
}

/// Sixty empty minutes ending with the one `now` falls in.
pub fn empty_hour(now: Millis) -> Vec<MinuteCount> {
    let last = minute_of(now);
    (0..60).rev().map(|i| MinuteCount { minute: last - i * 60_000, ..Default::default() }).collect()
}

/// Adds to the minute `t` falls in, when it is within the hour.
pub fn bump(minutes: &mut [MinuteCount], t: Millis, received: i64, delivered: i64) {
    let Some(first) = minutes.first().map(|m| m.minute) else { return };
    let i = (minute_of(t) - first) / 60_000;
    if let Some(m) = usize::try_from(i).ok().and_then(|i| minutes.get_mut(i)) {
        m.received += received;
        m.delivered += delivered;
    }
}

/// Adds one event to its source × environment × app_id row.
pub fn tally(rows: &mut Vec<FlowRow>, source: &str, environment: &str, app_id: &str, status: Status) {
    let i = match rows.iter().position(|r| r.source == source && r.environment == environment && r.app_id == app_id) {
        Some(i) => i,
        None => {
            rows.push(FlowRow {
                source: source.to_owned(),
                environment: environment.to_owned(),
                app_id: app_id.to_owned(),
                ..Default::default()
            });
            rows.len() - 1
        }
    };
    let r = &mut rows[i];
    r.received += 1;
    match status {
        Status::Delivered => r.delivered += 1,
        Status::Pending | Status::Retrying => r.waiting += 1,
        Status::Dead => r.dead += 1,
        Status::Rejected => r.refused += 1,
        // Held items wait too: for their template to load and a re-render.
        Status::Held => r.waiting += 1,
        Status::Replaced => {}
    }
}

/// Groups (status, reason, event id, at) into failure groups, newest example first within each, most events first.
pub fn group_failures(items: impl IntoIterator<Item = (&'static str, String, String, Millis)>) -> Vec<FailureGroup> {
    // Keyed, not searched: senders decide how many distinct reasons there are.
    let mut by_reason: std::collections::HashMap<(&'static str, String), FailureGroup> = Default::default();
    for (status, reason, id, at) in items {
        match by_reason.entry((status, reason)) {
            std::collections::hash_map::Entry::Occupied(mut g) => {
                let g = g.get_mut();
                g.count += 1;
                if at > g.newest_at {
                    g.newest = id;
                    g.newest_at = at;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let reason = v.key().1.clone();
                v.insert(FailureGroup { status, reason, count: 1, newest: id, newest_at: at });
            }
        }
    }
    let mut groups: Vec<FailureGroup> = by_reason.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.newest_at.cmp(&a.newest_at)));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_has_sixty_minutes_ending_now() {
        let h = empty_hour(3_600_000 + 61_000);
        assert_eq!(h.len(), 60);
        assert_eq!(h[59].minute, 3_660_000);
        assert_eq!(h[0].minute, 3_660_000 - 59 * 60_000);
    }

    #[test]
    fn bumps_outside_the_hour_are_ignored() {
        let mut h = empty_hour(3_600_000);
        bump(&mut h, 3_600_000 + 5, 1, 2);
        bump(&mut h, 0, 1, 1);
        bump(&mut h, 9_999_999_999, 1, 1);
        assert_eq!((h[59].received, h[59].delivered), (1, 2));
        assert_eq!(h.iter().map(|m| m.received).sum::<i64>(), 1);
    }

    #[test]
    fn failures_group_by_status_and_reason_with_the_newest_example() {
        let g = group_failures([
            ("dead", "HTTP 400".to_owned(), "1-0".to_owned(), 10),
            ("dead", "HTTP 400".to_owned(), "2-0".to_owned(), 20),
            ("rejected", "HTTP 400".to_owned(), "3-0".to_owned(), 5),
        ]);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].count, g[0].newest.as_str()), (2, "2-0"));
    }
}
