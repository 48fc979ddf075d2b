//! One integration test binary (saves linking on small machines). Each module is one area; names state promises.

mod admin;
mod browser;
mod budgets;
mod clevertap;
mod clevertap_liquid;
mod cli;
mod console;
mod console_browser;
mod console_store;
mod crash;
mod dedupe;
mod delivery;
mod errors;
mod hardening;
mod heap_compat;
mod helpers;
mod hostile;
mod pg_tls;
mod postgres;
mod proptests;
mod sdk;
mod segment;
mod store_bounds;
mod store_contract;
mod templates;
mod userpilot;
