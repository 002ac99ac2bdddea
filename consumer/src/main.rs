//! `event-consumer`: the consumer runtime with the default handler.

use event_identity::service::{init_tracing, one_line, parse_config, shutdown_signal};
use event_identity_consumer::{ConsumerConfig, run};

/// mimalloc rather than the system allocator: the consumer allocates and
/// frees many small objects per record on several threads, where glibc's
/// allocator cost about a fifth of its CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
