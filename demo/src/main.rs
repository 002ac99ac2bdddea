//! `event-identity-demo`: runs the scenario and prints its summary.
//!
//! The summary goes to standard output; logs go to standard error, at
//! `warn` unless `RUST_LOG` says otherwise, with the expected rejections
//! and librdkafka's chatter left out so they do not bury the summary.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use event_identity_demo::DemoOptions;
use tracing_subscriber::EnvFilter;

/// Logs shown unless `RUST_LOG` is set: warnings, except the consumer's
/// one line per rejected record (the scenario rejects two on purpose and
/// the summary lists them) and librdkafka's own log.
const DEFAULT_LOGS: &str = "warn,event_identity_consumer::worker=error,librdkafka=error";

#[tokio::main]
async fn main() -> ExitCode {
    let options = DemoOptions::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOGS));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    match event_identity_demo::run(&options).await {
        Ok(summary) => {
            print!("{summary}");
            if summary.surprises().is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(error) => {
            eprintln!("event-identity-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}
