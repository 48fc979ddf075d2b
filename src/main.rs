//! heap-relay's entry point: parse the command line, load settings, start logging, run the subcommand.

use clap::Parser;
use heap_relay::cli::{Cli, Command};
use heap_relay::commands;
use heap_relay::settings::{ConfigPath, Settings};
use heap_relay::startup::Application;
use std::path::PathBuf;

#[tokio::main]
async fn main() {
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
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            heap_relay::telemetry::init(&settings.log.level, &settings.log.format);
            match Application::build(settings).await {
                Ok(app) => match app.run_until_stopped().await {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "heap-relay failed");
                        1
                    }
                },
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Command::Render { source, file, template } => commands::render::run(&settings, &source, &file, template),
        Command::Check => commands::check::run(&settings),
        Command::Deliveries { status, source, since, until, limit, json } => {
            commands::deliveries::run(
                &settings,
                commands::deliveries::Filters { status, source, since, until, limit, json },
            )
            .await
        }
        Command::Replay { id, status, since, until, rerender } => {
            commands::replay::run(&settings, id, status, since, until, rerender).await
        }
    };
    std::process::exit(code);
}
