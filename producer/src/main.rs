//! `event-producer`: the HTTP service over the producer library.

use clap::Parser;
use event_identity::service::{init_tracing, shutdown_signal};
use event_identity_producer::{ProducerConfig, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = ProducerConfig::parse();
    init_tracing(config.log_format == "json");
    match run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("event-producer: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
