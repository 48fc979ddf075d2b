//! One integration test binary (saves linking on small machines). Each module is one area; names state promises.

mod admin;
mod clevertap;
mod clevertap_liquid;
mod cli;
mod crash;
mod delivery;
mod errors;
mod heap_compat;
mod helpers;
mod hostile;
mod postgres;
mod proptests;
mod segment;
mod store_contract;
mod templates;
mod userpilot;
