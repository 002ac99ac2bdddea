//! The orchestrator: starts the development issuer, makes the users'
//! tokens, then per topic size fills a fresh topic and runs each consumer
//! variant in its own child process, runs the two producer variants the
//! same way, and reports.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::child;
use crate::cli::{Mode, RunArgs, Variant};
use crate::consume::ConsumeResult;
use crate::publish::PublishResult;
use crate::report::{Machine, Report, Settings, SizeResult};
use crate::workload;

/// The signing key's ID at the development issuer.
const KID: &str = "bench-k1";

/// The Kafka broker of `scripts/kafka.sh`, honouring `EI_KAFKA_PORT`.
pub fn default_kafka() -> String {
    let port = std::env::var("EI_KAFKA_PORT").unwrap_or_else(|_| "19092".into());
    format!("127.0.0.1:{port}")
}

/// The PostgreSQL server of `scripts/postgres.sh`, honouring
/// `EI_POSTGRES_PORT`.
pub fn default_postgres() -> String {
    let port = std::env::var("EI_POSTGRES_PORT").unwrap_or_else(|_| "15432".into());
    format!("postgres://events@127.0.0.1:{port}")
}

/// Runs the whole benchmark as `args` say, prints the table and writes the
/// results; `command` is the command line to record.
pub async fn run(args: RunArgs, command: String) -> anyhow::Result<Report> {
    let started = Instant::now();
    let date = OffsetDateTime::now_utc()
        .format(format_description!("[year]-[month]-[day] [hour]:[minute] UTC"))
        .unwrap_or_default();
    let bootstrap = args.kafka_bootstrap.clone().unwrap_or_else(default_kafka);
    let postgres = args.postgres.clone().unwrap_or_else(default_postgres);
    let machine = Machine::describe();
    eprintln!(
        "bench: {} × {}, load average {:.2}; Kafka {bootstrap}",
        machine.nproc, machine.cpu_model, machine.load_average_at_start
    );

    // The issuer lives in this process for the whole run; children reach
    // its discovery document, keys and token endpoint over loopback.
    let issuer = DevIssuer::start().await.context("starting the development issuer")?;
    issuer.add_key(KID, KeyMaterial::Rsa1);
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let event_tokens = workload::event_tokens(&issuer, KID, args.users);
    let event_tokens_file = dir.path().join("event-tokens.txt");
    workload::write_tokens(&event_tokens_file, &event_tokens)?;
    let user_tokens_file = dir.path().join("user-tokens.txt");
    workload::write_tokens(&user_tokens_file, &workload::user_tokens(&issuer, KID, args.users))?;

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut consumers = Vec::new();
    for &size in &args.sizes {
        let topic = format!("bench-{run_id}-{size}");
        let measured = measure_size(
            &args,
            &bootstrap,
            &postgres,
            issuer.issuer(),
            &topic,
            size,
            &event_tokens,
        )
        .await;
        workload::delete_topics(&bootstrap, &[topic.clone(), format!("{topic}.dead-letter")]).await;
        consumers.push(measured?);
    }

    // The producer variants take turns, so that a slow spell of the
    // machine does not land on one of them only; each reports its median.
    let mut producer_rounds = Vec::new();
    if args.publishes > 0 {
        for round in 1..=args.producer_rounds {
            for mode in [Mode::Bare, Mode::Secure] {
                let topic = format!("bench-{run_id}-publish-{}-{round}", mode.name());
                let files = (user_tokens_file.as_path(), event_tokens_file.as_path());
                let measured =
                    measure_publish(&args, &bootstrap, issuer.issuer(), &topic, mode, files).await;
                workload::delete_topics(&bootstrap, std::slice::from_ref(&topic)).await;
                producer_rounds.push(measured?);
            }
        }
    }
    let producer = [Mode::Bare, Mode::Secure]
        .into_iter()
        .filter_map(|mode| {
            let rounds: Vec<&PublishResult> =
                producer_rounds.iter().filter(|r| r.mode == mode).collect();
            PublishResult::median(&rounds)
        })
        .collect();

    let mut report = Report {
        date,
        duration_s: started.elapsed().as_secs_f64(),
        machine,
        settings: Settings {
            command,
            revision: args.revision.clone(),
            kafka_bootstrap: bootstrap,
            sizes: args.sizes.clone(),
            partitions: args.partitions,
            users: args.users,
            payload_bytes: args.payload_bytes,
            consumer_args: consumer_args(&args),
            publishes: args.publishes,
            concurrency: args.concurrency,
            producer_rounds: args.producer_rounds,
        },
        consumers,
        producer,
        producer_rounds,
        targets: Vec::new(),
    };
    report.check_targets();
    Ok(report)
}

/// The secure consumer's extra flags: the tuning shorthands, then the
/// caller's own.
fn consumer_args(args: &RunArgs) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(n) = args.batch_size {
        flags.push(format!("--batch-size={n}"));
    }
    if let Some(n) = args.max_queued_per_partition {
        flags.push(format!("--max-queued-per-partition={n}"));
    }
    flags.extend(args.consumer_args.iter().cloned());
    flags
}

/// Fills `topic` with `size` records and runs every consumer variant on it.
async fn measure_size(
    args: &RunArgs,
    bootstrap: &str,
    postgres: &str,
    issuer: &str,
    topic: &str,
    size: u64,
    tokens: &[String],
) -> anyhow::Result<SizeResult> {
    workload::create_topic(bootstrap, topic, args.partitions).await?;
    eprintln!("bench: filling {topic} with {size} events ...");
    let fill =
        workload::fill(bootstrap, topic, args.partitions, size, tokens, args.payload_bytes).await?;
    eprintln!("bench: filled in {:.1} s", fill.as_secs_f64());

    let mut variants = Vec::new();
    for &variant in &args.variants {
        let result = measure_consumer(args, bootstrap, postgres, issuer, topic, size, variant)
            .await
            .with_context(|| format!("variant {} at {size} events", variant.name()))?;
        eprintln!(
            "bench: {} {} at {size}: {:.0} msg/s, peak {:.1} MiB",
            variant.label(),
            variant.name(),
            result.messages_per_s,
            result.peak_rss_kib.unwrap_or_default() as f64 / 1024.0
        );
        variants.push(result);
    }
    Ok(SizeResult { size, fill_seconds: fill.as_secs_f64(), variants })
}

/// Runs one consumer variant in a child, with a fresh group and a fresh
/// inbox (removed afterwards).
async fn measure_consumer(
    args: &RunArgs,
    bootstrap: &str,
    postgres: &str,
    issuer: &str,
    topic: &str,
    size: u64,
    variant: Variant,
) -> anyhow::Result<ConsumeResult> {
    let mut argv = vec![
        "consume".to_owned(),
        format!("--variant={}", variant.name()),
        format!("--kafka-bootstrap={bootstrap}"),
        format!("--topic={topic}"),
        format!("--group={topic}-{}", variant.name()),
        format!("--expected={size}"),
        format!("--timeout-s={}", args.timeout_s),
    ];
    if variant != Variant::Plain {
        argv.push(format!("--issuer={issuer}"));
        argv.extend(consumer_args(args).into_iter().map(|a| format!("--consumer-arg={a}")));
    }

    let sqlite_dir = tempfile::tempdir().context("a folder for the SQLite inbox")?;
    let database_url = match variant {
        Variant::Plain => None,
        Variant::SecureNoop | Variant::SecureSqlite => {
            Some(sqlite_url(&sqlite_dir.path().join("inbox.db")))
        }
        Variant::SecurePostgres => Some(workload::create_database(postgres).await?),
    };
    if let Some(url) = &database_url {
        argv.push(format!("--database-url={url}"));
    }

    eprintln!("bench: {} {} at {size} events ...", variant.label(), variant.name());
    let result = child::run::<ConsumeResult>(&argv).await;
    if let (Variant::SecurePostgres, Some(url)) = (variant, &database_url) {
        workload::drop_database(postgres, url).await;
    }
    result
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Runs one producer variant in a child, publishing to a fresh topic.
async fn measure_publish(
    args: &RunArgs,
    bootstrap: &str,
    issuer: &str,
    topic: &str,
    mode: Mode,
    (user_tokens, event_tokens): (&Path, &Path),
) -> anyhow::Result<PublishResult> {
    workload::create_topic(bootstrap, topic, args.partitions).await?;
    let argv = vec![
        "publish".to_owned(),
        format!("--mode={}", mode.name()),
        format!("--kafka-bootstrap={bootstrap}"),
        format!("--topic={topic}"),
        format!("--issuer={issuer}"),
        format!("--user-tokens={}", user_tokens.display()),
        format!("--event-tokens={}", event_tokens.display()),
        format!("--count={}", args.publishes),
        format!("--concurrency={}", args.concurrency),
        format!("--payload-bytes={}", args.payload_bytes),
    ];
    eprintln!("bench: producer {} ({} publishes) ...", mode.name(), args.publishes);
    let result = child::run::<PublishResult>(&argv)
        .await
        .with_context(|| format!("producer {}", mode.name()))?;
    eprintln!(
        "bench: producer {}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        mode.name(),
        result.publishes_per_s,
        result.p50_ms,
        result.p99_ms
    );
    Ok(result)
}
