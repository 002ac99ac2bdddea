//! `event-consumer`: the consumer runtime with the default handler.

use clap::Parser;
use event_identity::service::{init_tracing, shutdown_signal};
use event_identity_consumer::{ConsumerConfig, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = ConsumerConfig::parse();
    init_tracing(config.log_format == "json");
    match run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("event-consumer: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
