pub mod domain;
pub mod ingest;
pub mod sources;
pub mod store;
pub mod templates;
