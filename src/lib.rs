//! heap-relay: takes webhooks from CleverTap, Userpilot and Segment-spec pipelines, turns them into Heap calls
//! through user-editable Liquid templates, stores them durably and delivers them to Heap with retries.
//!
//! The path of an event, one module per step:
//! - `routes`: HTTP in (`/hooks/{source}`, `/api/track`, Segment's `/v1/*`, admin, health, metrics); thin
//!   handlers, every ingest route through one `routes::accept::accept_request`. Before a body is used,
//!   `routes::gate` checks the browser's Origin, the source's authentication (`auth`) and request budget
//!   (`request_rate`); `routes::body` reads it bounded (decoded bytes, per request and across requests).
//! - `intake`: body → pipeline → one durable write → summary.
//! - `ingest`: the pure pipeline: `sources` (vendor body shapes) → `templates` (one Liquid document per
//!   template, every output escaped for its JSON context) → `domain` (types that only hold values Heap accepts). `json` parses bodies strictly (depth, duplicate keys,
//!   NULs, surrogates, number ranges), each refusal with its own error.
//! - `store`: the queue and delivery log: SQLite by default (an append-only ingest log, and delivery's books in a
//!   second file), PostgreSQL for several instances (a row per body on the ingest commit, a row per
//!   event written off it, claims by partition lease).
//! - `delivery`: workers that batch, send, classify (`policy`) and rate-limit.
//! - `replay`: re-send or re-render stored events.
//! - `console`: the operator console at /console (server-rendered pages over the same store and replay functions).
//! - `settings`, `telemetry`, `metrics`, `error`, `startup`, `cli`, `commands`: plumbing. `exposure` decides at
//!   start what may face the network (public-bind refusal, connection cap); `client_addr` says who a client is
//!   (X-Forwarded-For only from trusted proxies); `sanitize` repairs NULs and lone surrogates in string values.

/// mimalloc for every binary built on this crate (the relay, its benchmarks and tests): ingest allocates many
/// small, short-lived values per event (parsed JSON, rendered calls), where glibc's malloc spent about a fifth of
/// render+validate (`cargo bench --bench micro`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's options as `heap-relay` runs: freed memory goes back to the system at once (`purge_delay` 0, unless
/// `MIMALLOC_PURGE_DELAY` sets it), from arenas committed as they are used (`MI_DEFAULT_ARENA_EAGER_COMMIT=0` at
/// build time, `.cargo/config.toml`: arenas are made before `main` runs). Call it first in `main`, before other
/// threads start (mimalloc's option setter is not thread-safe). Figures: README, "Benchmarks".
pub fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's option words; called before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay`: their places in mimalloc.h's `mi_option_e` (the sys
/// crate names neither; `allocator_options_are_the_ones_meant` checks them).
#[cfg(test)]
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(test)]
mod allocator_tests {
    #[test]
    fn allocator_options_are_the_ones_meant() {
        // SAFETY: reads option words.
        let (arena, purge) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(super::PURGE_DELAY),
            )
        };
        // Arenas committed as used (the build flag; mimalloc's default is 2, "where the OS overcommits"), and
        // mimalloc v3's purge delay of 1000 ms before `tune_allocator`.
        assert_eq!((arena, purge), (0, 1000));
    }
}

pub mod auth;
pub mod cli;
pub mod client_addr;
pub mod clock;
pub mod commands;
pub mod console;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod exposure;
pub mod filters;
pub mod ingest;
pub mod intake;
pub mod json;
pub mod metrics;
pub mod replay;
pub mod request_rate;
pub mod routes;
pub mod sanitize;
pub mod settings;
pub mod sources;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod templates;
