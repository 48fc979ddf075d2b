//! Logging setup: structured tracing to stdout, text or JSON. `RUST_LOG` overrides the configured level.

use tracing_subscriber::EnvFilter;

pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    // A second init (tests) keeps the first subscriber.
    let _ = if format == "json" { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// For tests: logs only when TEST_LOG is set, so a failing test can be rerun with its log.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init("heap_relay=debug,info", "text");
    }
}
