//! The consumer service's configuration: flags, or `EI_*` environment
//! variables, validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use clap::builder::NonEmptyStringValueParser;
use event_identity::contract::topic_name;

use crate::routes::RouteSpec;

/// Settings of the `event-consumer` service.
#[derive(Parser, Clone, Debug)]
#[command(
    args_override_self = true,
    name = "event-consumer",
    version,
    about = "Verifies, authorizes and processes identity-bearing events once"
)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "EI_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,

    /// Consumer group ID; replicas with the same group share the partitions.
    #[arg(long, env = "EI_GROUP", default_value = "event-consumer", value_parser = NonEmptyStringValueParser::new())]
    pub group: String,

    /// Topics to consume, comma-separated.
    #[arg(long = "topic", env = "EI_TOPICS", value_delimiter = ',', default_value = "events", value_parser = topic_name)]
    pub topics: Vec<String>,

    /// Topic that rejected messages are written to, with their reason;
    /// never one of the consumed topics.
    #[arg(long, env = "EI_DEAD_LETTER_TOPIC", default_value = "events.dead-letter", value_parser = topic_name)]
    pub dead_letter_topic: String,

    /// The authorization server's issuer identifier (exact `iss`).
    #[arg(long, env = "EI_ISSUER")]
    pub issuer: String,

    /// JWKS URL; default: from the issuer's discovery document.
    #[arg(long, env = "EI_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Allow plain-HTTP issuer URLs to hosts other than loopback (a private
    /// network such as a compose stack). Anyone on that network could
    /// substitute keys.
    #[arg(long, env = "EI_ALLOW_PLAIN_HTTP", default_value_t = false)]
    pub allow_plain_http: bool,

    /// The audience event tokens must name. Required: a consumer without an
    /// audience would accept tokens meant for any other service.
    #[arg(long, env = "EI_AUDIENCE")]
    pub audience: String,

    /// Claims every event token must carry besides iss, aud, exp and sub,
    /// comma-separated (e.g. `jti,tenant`).
    #[arg(long = "require-claim", env = "EI_REQUIRE_CLAIMS", value_delimiter = ',', value_parser = NonEmptyStringValueParser::new())]
    pub require_claims: Vec<String>,

    /// A consumable event type and its rules:
    /// `type=T,scope=EVENT_SCOPE[,claim_equals_field=CLAIM:FIELD][,claim_in=CLAIM:V1|V2]`.
    /// Repeat the flag, or separate routes with `;` in the variable.
    #[arg(long = "route", env = "EI_ROUTES", value_delimiter = ';', required = true)]
    pub routes: Vec<RouteSpec>,

    /// The inbox database: `sqlite://PATH?mode=rwc` (embedded default) or
    /// `postgres://...` for several replicas sharing a group.
    #[arg(
        long,
        env = "EI_DATABASE_URL",
        default_value = "sqlite://event-identity-inbox.db?mode=rwc"
    )]
    pub database_url: String,

    /// Clock skew tolerated when checking token times, in seconds.
    #[arg(long, env = "EI_LEEWAY_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub leeway_s: u64,

    /// Least time between two fetches of the issuer's keys caused by an
    /// unknown `kid` or a failed fetch, in milliseconds. Within it, a token
    /// under an unknown `kid` is rejected as `unknown_key`, so publish new
    /// signing keys at least this long before signing with them.
    #[arg(long, env = "EI_JWKS_COOLDOWN_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=3600000))]
    pub jwks_cooldown_ms: u64,

    /// How long the issuer's keys are used before they are fetched again,
    /// in seconds.
    #[arg(long, env = "EI_JWKS_REFRESH_S", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=604800))]
    pub jwks_refresh_s: u64,

    /// Timeout of each request to the authorization server, in milliseconds.
    #[arg(long, env = "EI_HTTP_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=120000))]
    pub http_timeout_ms: u64,

    /// Longest wait between retries of a transient failure, in milliseconds.
    #[arg(long, env = "EI_MAX_RETRY_BACKOFF_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=3600000))]
    pub max_retry_backoff_ms: u64,

    /// Kafka consumer session timeout, in milliseconds.
    #[arg(long, env = "EI_SESSION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1000..=3600000))]
    pub session_timeout_ms: u64,

    /// Where a new group starts reading: `earliest` or `latest`.
    #[arg(long, env = "EI_AUTO_OFFSET_RESET", default_value = "earliest", value_parser = ["earliest", "latest"])]
    pub auto_offset_reset: String,

    /// Most messages of one partition settled in one inbox transaction.
    #[arg(long, env = "EI_BATCH_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,

    /// Messages read ahead and waiting for one partition's worker before
    /// that partition is paused (resumed when half have settled); reading
    /// waits while moving partitions hold half of this on average, and
    /// librdkafka fetches again for a partition holding fewer than this.
    #[arg(long, env = "EI_MAX_QUEUED_PER_PARTITION", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_queued_per_partition: u64,

    /// How long in-flight messages may take to finish after SIGINT or
    /// SIGTERM before they are abandoned (and read again after a restart),
    /// in milliseconds.
    #[arg(long, env = "EI_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub shutdown_timeout_ms: u64,

    /// How long inbox markers are kept, in seconds; 0 keeps them forever.
    /// A message re-delivered or replayed after its marker is purged runs
    /// its effect again: keep markers longer than any message can wait in
    /// the topic or be replayed.
    /// At most ten years.
    #[arg(long, env = "EI_INBOX_RETENTION_S", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(0..=315_360_000))]
    pub inbox_retention_s: u64,

    /// How often expired inbox markers are purged, in seconds.
    #[arg(long, env = "EI_INBOX_PURGE_INTERVAL_S", default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub inbox_purge_interval_s: u64,

    /// Forward each verified event and its identity as JSON to this URL
    /// instead of recording it in the `events` table (for services not
    /// written in Rust). The endpoint must treat a repeated
    /// `Idempotency-Key` as done.
    #[arg(long, env = "EI_FORWARD_URL")]
    pub forward_url: Option<String>,

    /// Timeout of each forwarding request, in milliseconds.
    #[arg(long, env = "EI_FORWARD_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub forward_timeout_ms: u64,

    /// Address of the operations endpoint: `/metrics` (Prometheus),
    /// `/healthz` and `/readyz`. Port 0 picks a free port.
    #[arg(long, env = "EI_OPS_LISTEN", default_value = "127.0.0.1:8082")]
    pub ops_listen: SocketAddr,

    /// How long the consumer may make no progress while its partitions have
    /// lag before `/readyz` reports it not ready, in seconds.
    #[arg(long, env = "EI_STALL_TIMEOUT_S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stall_timeout_s: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "EI_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ConsumerConfig {
    /// Longest retry backoff.
    pub fn max_retry_backoff(&self) -> Duration {
        Duration::from_millis(self.max_retry_backoff_ms)
    }

    /// How long in-flight messages may take after a stop.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// How long inbox markers are kept; `None` keeps them forever.
    pub fn inbox_retention(&self) -> Option<Duration> {
        (self.inbox_retention_s > 0).then(|| Duration::from_secs(self.inbox_retention_s))
    }
}
