//! `event-identity-bench`: what security costs, measured against a plain
//! consumer and a bare producer. See `docs/benchmarks.md`.

use clap::Parser as _;
use event_identity_bench::cli::{Cli, Command};
use event_identity_bench::{child, consume, publish, run, steps};

/// The allocator of `event-consumer` and `event-producer`, so that the
/// variants measured here run as the shipped services do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();

    match Cli::parse().command {
        Command::Run(args) => {
            let command = args
                .command_line
                .clone()
                .unwrap_or_else(|| std::env::args().skip(1).collect::<Vec<_>>().join(" "));
            let (results, markdown) = (args.results.clone(), args.markdown.clone());
            let report = run::run(args, command).await?;
            println!("{}", report.section());
            report.write_json(&results)?;
            eprintln!("bench: results written to {}", results.display());
            if let Some(markdown) = markdown {
                report.update_markdown(&markdown)?;
                eprintln!("bench: table written to {}", markdown.display());
            }
        }
        Command::Steps(args) => {
            let results = args.results.clone();
            let steps = steps::run(args).await?;
            if let Some(dir) = results.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&results, serde_json::to_string_pretty(&steps)? + "\n")?;
            println!("| step | µs per message |\n|---|---:|");
            for step in &steps {
                println!("| {} | {:.2} |", step.step, step.us_per_message);
            }
            eprintln!("bench: steps written to {}", results.display());
        }
        Command::Consume(args) => child::emit(&consume::run(args).await?)?,
        Command::Publish(args) => child::emit(&publish::run(args).await?)?,
    }
    Ok(())
}
