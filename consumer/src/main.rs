//! `event-consumer`: the consumer runtime with the default handler.

use event_identity::service::{init_tracing, one_line, parse_config, shutdown_signal};
use event_identity_consumer::{ConsumerConfig, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config: ConsumerConfig = parse_config("event-consumer");
    init_tracing(config.log_format == "json");
    match run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("event-consumer: {}", one_line(&format!("{error:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
