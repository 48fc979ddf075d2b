//! Command line: `heap-relay [--config PATH] [serve | render | check | test | deliveries | replay]`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "heap-relay",
    version,
    about = "Relay CleverTap, Userpilot and Segment-spec webhooks into Heap, durably."
)]
pub struct Cli {
    /// Config file. Default: ./config.toml if present, else the built-in defaults. A named file must be readable.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the default).
    Serve,
    /// Print the Heap calls a body would produce, without sending anything.
    Render {
        /// clevertap, userpilot or segment.
        source: String,
        /// A JSON file holding a webhook body.
        file: PathBuf,
        /// Template name (templates/<source>/<name>.json); default: the source's configured template.
        #[arg(long)]
        template: Option<String>,
    },
    /// Load the configuration and every template, render each against its examples and an empty profile, and
    /// report each problem. Exit status 1 on any.
    Check,
    /// Run every template's examples (templates/<source>/<name>.tests/*.json); print a diff per failure.
    Test {
        /// Rewrite failing examples with what the templates give now (review the diff before committing).
        #[arg(long)]
        bless: bool,
    },
    /// List events in the delivery log, newest first.
    Deliveries {
        /// pending, retrying, delivered, dead, rejected or replaced.
        #[arg(long)]
        status: Option<String>,
        /// clevertap, userpilot, segment or heap.
        #[arg(long)]
        source: Option<String>,
        /// The environment a credential chose (dev, prod, ...).
        #[arg(long)]
        environment: Option<String>,
        /// Received at or after this time (ISO-8601).
        #[arg(long)]
        since: Option<String>,
        /// Received before this time (ISO-8601).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send stored events again: one id, every event of a status, or a time range.
    Replay {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// <source>/<name>: the events that template rendered with another version than today's file, or held
        /// while it did not load (use with --rerender after a template fix).
        #[arg(long)]
        stale_template: Option<String>,
        /// Render the stored raw bodies again with today's templates (repairs events a broken template produced).
        #[arg(long)]
        rerender: bool,
    },
}
