//! `event-producer`: the HTTP service over the producer library.

use event_identity::service::{init_tracing, one_line, parse_config, shutdown_signal};
use event_identity_producer::{ProducerConfig, run};

/// mimalloc, as in `event-consumer`, so that both services run (and are
/// benchmarked) on the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config: ProducerConfig = parse_config("event-producer");
    init_tracing(config.log_format == "json");
    match run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("event-producer: {}", one_line(&format!("{error:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
