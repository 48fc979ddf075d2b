//! heap-relay's entry point: parse the command line, load settings, start logging, run the subcommand.

use clap::Parser;
use heap_relay::cli::{Cli, Command};
use heap_relay::commands::{self, CommandError};
use heap_relay::filters::FilterParams;
use heap_relay::settings::{ConfigPath, Settings};
use heap_relay::startup::Application;
use std::path::PathBuf;

fn main() {
    heap_relay::tune_allocator();
    run();
}

#[tokio::main]
async fn run() {
    let cli = Cli::parse();
    let path = match cli.config {
        Some(p) => ConfigPath::Explicit(p),
        None => ConfigPath::Default(PathBuf::from("config.toml")),
    };
    let settings = match Settings::load(&path, std::env::vars().collect()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            heap_relay::telemetry::init(&settings.log.level, &settings.log.format);
            serve(settings).await
        }
        Command::Render { source, file, template } => commands::render::run(&settings, &source, &file, template),
        Command::Check => commands::check::run(&settings),
        Command::Test { bless } => commands::test::run(&settings, bless),
        Command::Deliveries { status, source, environment, since, until, limit, json } => {
            let filters = FilterParams { status, source, environment, since, until, ..FilterParams::default() };
            commands::deliveries::run(&settings, filters, limit, json).await
        }
        Command::Replay { id, status, since, until, stale_template, rerender } => {
            let selection = commands::replay::Selection { id, status, since, until, stale_template };
            commands::replay::run(&settings, selection, rerender).await
        }
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        e.exit_code()
    });
    std::process::exit(code);
}

async fn serve(settings: Settings) -> Result<i32, CommandError> {
    let app = Application::build(settings).await?;
    app.run_until_stopped().await?;
    Ok(0)
}
