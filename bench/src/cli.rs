//! The benchmark's command line: `run` for people and scripts, and the
//! hidden subcommands the orchestrator re-executes itself with, one child
//! process per measured variant.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// The benchmark command.
#[derive(Parser, Debug)]
#[command(
    name = "event-identity-bench",
    version,
    about = "Measures what verification, authorization and the inbox cost against plain Kafka \
             clients"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fills a topic per size, measures every consumer variant and the
    /// producer, prints the table and writes the results. A flag given
    /// twice takes its last value.
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Times each step of the secure consumer alone (parsing, verifying,
    /// authorizing, the inbox with each database), without Kafka.
    #[command(args_override_self = true)]
    Steps(StepsArgs),
    /// One consumer variant, in a child process (used by `run`).
    #[command(hide = true)]
    Consume(ConsumeArgs),
    /// One producer variant, in a child process (used by `run`).
    #[command(hide = true)]
    Publish(PublishArgs),
}

/// Settings of a whole benchmark run.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kafka bootstrap servers; default `127.0.0.1:$EI_KAFKA_PORT`, else
    /// `127.0.0.1:19092` (the broker of `scripts/kafka.sh`).
    #[arg(long)]
    pub kafka_bootstrap: Option<String>,

    /// PostgreSQL server URL without a database; default
    /// `postgres://events@127.0.0.1:$EI_POSTGRES_PORT`, else port 15432
    /// (the server of `scripts/postgres.sh`). A fresh database is created
    /// per run and dropped after it.
    #[arg(long)]
    pub postgres: Option<String>,

    /// Topic sizes to measure the consumers at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50000,200000,800000")]
    pub sizes: Vec<u64>,

    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=64))]
    pub partitions: i32,

    /// Distinct users; each user's events carry that user's event token.
    #[arg(
        long,
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    pub users: u64,

    /// Size of each record's JSON value, in bytes.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(200..=100_000)
    )]
    pub payload_bytes: u64,

    /// Consumer variants to measure, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,secure-noop,secure-sqlite,secure-postgres"
    )]
    pub variants: Vec<Variant>,

    /// `--batch-size` of the secure consumer (its default when absent).
    #[arg(long)]
    pub batch_size: Option<u64>,

    /// `--max-queued-per-partition` of the secure consumer (its default
    /// when absent).
    #[arg(long)]
    pub max_queued_per_partition: Option<u64>,

    /// Any other flag for the secure consumer, e.g.
    /// `--consumer-arg=--session-timeout-ms=6000`; repeat as needed.
    #[arg(long = "consumer-arg", allow_hyphen_values = true)]
    pub consumer_args: Vec<String>,

    /// Publishes measured per producer variant (after one warm-up publish
    /// per user); 0 skips the producer benchmark.
    #[arg(long, default_value_t = 20_000)]
    pub publishes: u64,

    /// Rounds per producer variant, the two taking turns; each figure
    /// reported is the median of its rounds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub producer_rounds: u64,

    /// Publishes in flight at once, the same for both producer variants.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,

    /// How long one variant may take before the run fails, in seconds.
    #[arg(long, default_value_t = 1_800)]
    pub timeout_s: u64,

    /// Where the machine-readable results go (JSON).
    #[arg(long, default_value = "target/bench/results.json")]
    pub results: PathBuf,

    /// The command line to record with the results; default: this
    /// process's own (`scripts/bench.sh` passes its own).
    #[arg(long, env = "EI_BENCH_COMMAND", hide = true)]
    pub command_line: Option<String>,

    /// The code measured (e.g. a commit), recorded with the results
    /// (`scripts/bench.sh` passes the checkout's).
    #[arg(long, env = "EI_BENCH_REVISION", hide = true)]
    pub revision: Option<String>,

    /// A Markdown file whose results section (between
    /// `<!-- bench:results:start -->` and `<!-- bench:results:end -->`) is
    /// replaced with this run's table.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

/// A consumer variant.
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// (a) A plain rdkafka `StreamConsumer` that only counts messages.
    Plain,
    /// (b) The secure consumer with a handler that does nothing; its inbox
    /// markers go to a SQLite file.
    SecureNoop,
    /// (c) The secure consumer with the default handler (`RecordEvents`)
    /// and a SQLite inbox file.
    SecureSqlite,
    /// (d) The same with a PostgreSQL inbox.
    SecurePostgres,
}

impl Variant {
    /// The name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::SecureNoop => "secure-noop",
            Self::SecureSqlite => "secure-sqlite",
            Self::SecurePostgres => "secure-postgres",
        }
    }

    /// The label the issue gives it, `(a)` to `(d)`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Plain => "(a)",
            Self::SecureNoop => "(b)",
            Self::SecureSqlite => "(c)",
            Self::SecurePostgres => "(d)",
        }
    }
}

/// Settings of one consumer child.
#[derive(Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// Which consumer.
    #[arg(long, value_enum)]
    pub variant: Variant,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub kafka_bootstrap: String,
    /// The filled topic.
    #[arg(long)]
    pub topic: String,
    /// A consumer group nobody used before.
    #[arg(long)]
    pub group: String,
    /// Records in the topic: the run ends when all are settled.
    #[arg(long)]
    pub expected: u64,
    /// The development issuer's issuer URL (secure variants).
    #[arg(long)]
    pub issuer: Option<String>,
    /// The inbox database URL (secure variants).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Extra flags for the secure consumer's configuration.
    #[arg(long = "consumer-arg", allow_hyphen_values = true)]
    pub consumer_args: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1_800)]
    pub timeout_s: u64,
}

/// A producer variant.
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A bare rdkafka `FutureProducer`, produce-and-ack.
    Bare,
    /// `event_identity_producer::Publisher`: user token verified, event
    /// token from the warm cache, then produce-and-ack.
    Secure,
}

impl Mode {
    /// The name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Secure => "secure",
        }
    }
}

/// Settings of one producer child.
#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// Which producer.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub kafka_bootstrap: String,
    /// A fresh topic to publish to.
    #[arg(long)]
    pub topic: String,
    /// The development issuer's issuer URL.
    #[arg(long)]
    pub issuer: String,
    /// File of user tokens, one a line (secure mode signs in with them).
    #[arg(long)]
    pub user_tokens: PathBuf,
    /// File of event tokens, one a line (bare mode puts them in its
    /// records' `authorization` header, so both send the same bytes).
    #[arg(long)]
    pub event_tokens: PathBuf,
    /// Measured publishes.
    #[arg(long)]
    pub count: u64,
    /// Publishes in flight at once.
    #[arg(long)]
    pub concurrency: u64,
    /// Size of each record's JSON value, in bytes.
    #[arg(long)]
    pub payload_bytes: u64,
}

/// Settings of the step-by-step timings.
#[derive(Args, Debug, Clone)]
pub struct StepsArgs {
    /// Messages timed per step.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Distinct users (and tokens).
    #[arg(
        long,
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    pub users: u64,
    /// Size of each record's JSON value, in bytes.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(200..=100_000)
    )]
    pub payload_bytes: u64,
    /// Rounds; each step reports its fastest.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub rounds: u64,
    /// Messages per inbox transaction, as the consumer's `--batch-size`.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// PostgreSQL server URL without a database; default as for `run`.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Skip the PostgreSQL inbox.
    #[arg(long)]
    pub no_postgres: bool,
    /// Where the figures go (JSON).
    #[arg(long, default_value = "target/bench/steps.json")]
    pub results: PathBuf,
}
