//! The console's HTML, written with maud (checked at compile time, escaped by default): the page frame, its
//! embedded stylesheet, the per-minute chart as SVG, and small pieces the pages share. No script: every page works
//! with JavaScript off; pages that change on their own refresh with `<meta http-equiv="refresh">`.

use super::session::{Role, Session};
use crate::store::queries::MinuteCount;
use crate::store::{Millis, iso};
use maud::{DOCTYPE, Markup, PreEscaped, html};

const CSS: &str = include_str!("console.css");

/// Where a page sits in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Deliveries,
    Failures,
    Templates,
    Control,
    None,
}

/// The frame every page shares. `refresh`: seconds after which the page reloads itself.
pub fn page(title: &str, nav: Nav, session: Option<&Session>, refresh: Option<u32>, body: Markup) -> Markup {
    let item = |n: Nav, href: &str, label: &str| {
        html! { a href=(href) aria-current=[(n == nav).then_some("page")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = refresh { meta http-equiv="refresh" content=(s); }
                title { (title) " · heap-relay" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    strong.brand { "heap-relay" }
                    @if let Some(s) = session {
                        nav {
                            (item(Nav::Overview, "/console", "Overview"))
                            (item(Nav::Deliveries, "/console/deliveries", "Deliveries"))
                            (item(Nav::Failures, "/console/failures", "Failures"))
                            (item(Nav::Templates, "/console/templates", "Templates"))
                            (item(Nav::Control, "/console/control", "Control"))
                        }
                        form.signout method="post" action="/console/sign-out" {
                            (csrf(s))
                            span.role { (s.role.as_str()) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The hidden CSRF field every form of a session carries.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// Whether the session may act (buttons are shown to admins only; the server checks again).
pub fn may_act(s: &Session) -> bool {
    s.role == Role::Admin
}

pub fn time(ms: Millis) -> String {
    iso(ms)
}

/// A duration in words: `3 min`, `2 h 5 min`, `4 s`.
pub fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A status as a coloured tag.
pub fn status(s: &str) -> Markup {
    html! { span class={"status " (s)} { (s) } }
}

/// Shortens a long text (a Heap answer) for a table cell.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// Pretty JSON in a scrolling block.
pub fn json_block(v: &serde_json::Value) -> Markup {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    html! { pre.json { (text) } }
}

/// Events in (blue) and delivered (green) per minute over the hour, as an SVG that scales to its box.
pub fn chart(minutes: &[MinuteCount]) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 150.0;
    let max = minutes.iter().map(|m| m.received.max(m.delivered)).max().unwrap_or(0).max(1) as f64;
    let step = W / (minutes.len().max(2) - 1) as f64;
    let line = |f: &dyn Fn(&MinuteCount) -> i64| {
        minutes
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{:.1},{:.1}", i as f64 * step, H - (f(m) as f64 / max) * (H - 10.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let total_in: i64 = minutes.iter().map(|m| m.received).sum();
    let total_out: i64 = minutes.iter().map(|m| m.delivered).sum();
    html! {
        figure.chart {
            svg viewBox="0 0 600 150" preserveAspectRatio="none" role="img"
                aria-label={"Events per minute over the last hour: " (total_in) " in, " (total_out) " delivered"} {
                line x1="0" y1="149" x2="600" y2="149" class="axis" {}
                polyline class="in" points=(line(&|m| m.received)) {}
                polyline class="out" points=(line(&|m| m.delivered)) {}
            }
            figcaption {
                span.key-in { "■" } " in: " (total_in) "   "
                span.key-out { "■" } " delivered: " (total_out)
                "   (per minute, last 60 minutes; peak " (max as i64) "/min)"
            }
        }
    }
}

/// Percent-encodes a value for a URL's path segment or query.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
