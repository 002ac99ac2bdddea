//! The consumer runtime for identity-bearing events.
//!
//! For every record it verifies the event token (signature against the
//! issuer's keys, issuer, audience, lifetime), checks that the token holds
//! exactly the event type's scope, runs the claims policies, and applies the
//! handler's effect once per message ID through the [`inbox`]. Permanent
//! failures go to the [`dead_letter`] topic with their reason; transient
//! ones are retried in place. Each partition has its own worker, so
//! partitions run in parallel and each in order. The committed offset of a
//! partition is the contiguous watermark of settled messages, so a crash
//! re-reads, and the inbox absorbs the repeat; a revoked partition's late
//! results are never committed.
//!
//! Build one with [`ConsumerBuilder`], or run the `event-consumer` binary.

pub mod config;
pub mod dead_letter;
pub mod forward;
mod health;
pub mod inbox;
mod partitions;
pub mod routes;
mod runtime;
mod stats;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use event_identity::discovery::{check_settings, resolve};
use event_identity::http::check_url;
use event_identity::jwks::JwksTiming;
use event_identity::ops::{JwksMetrics, latency_buckets};
use event_identity::service::{check_kafka, serve_ops};
use event_identity::{Verifier, VerifierConfig};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer as _;
use tokio_util::sync::CancellationToken;

pub use config::ConsumerConfig;
pub use forward::ForwardEvents;
pub use inbox::{Event, Handler, HandlerError, HandlerFuture, Inbox, RecordEvents};
pub use routes::{ClaimsPolicy, Route, Routes};
pub use stats::Stats;

use crate::dead_letter::DeadLetters;
use crate::health::Health;
use crate::partitions::{Assignments, GroupContext};
use crate::runtime::{GroupConsumer, Runtime};
use crate::stats::StatsMetrics;
use crate::worker::Shared;

/// Assembles a consumer from its configuration, with optional code hooks.
pub struct ConsumerBuilder {
    config: ConsumerConfig,
    handler: Option<Arc<dyn Handler>>,
    policies: Vec<(String, Arc<dyn ClaimsPolicy>)>,
}

impl ConsumerBuilder {
    /// A builder with the handler the configuration names: [`ForwardEvents`]
    /// when `--forward-url` is set, else [`RecordEvents`].
    pub fn new(config: ConsumerConfig) -> Self {
        Self { config, handler: None, policies: Vec::new() }
    }

    /// Replaces the handler.
    pub fn handler(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handler = Some(handler);
        self
    }

    /// Adds a code policy for `event_type` (which must have a route).
    pub fn policy(mut self, event_type: &str, policy: Arc<dyn ClaimsPolicy>) -> Self {
        self.policies.push((event_type.to_owned(), policy));
        self
    }

    /// Checks the configuration, loads the issuer's keys, opens the inbox
    /// and subscribes. Errors name the setting at fault.
    pub async fn build(self) -> anyhow::Result<EventConsumer> {
        let config = self.config;
        check_topics(&config)?;
        let handler: Arc<dyn Handler> = match (self.handler, &config.forward_url) {
            (Some(handler), _) => handler,
            (None, Some(url)) => {
                let timeout = Duration::from_millis(config.forward_timeout_ms);
                let forward = ForwardEvents::new(url, timeout, config.allow_plain_http)
                    .map_err(|e| anyhow::anyhow!("--forward-url: {e}"))?;
                Arc::new(forward)
            }
            (None, None) => Arc::new(RecordEvents),
        };
        let mut routes =
            Routes::from_specs(&config.routes).map_err(|e| anyhow::anyhow!("--route: {e}"))?;
        for (event_type, policy) in self.policies {
            routes.add_policy(&event_type, policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
        }

        let http = event_identity::http::client(Duration::from_millis(config.http_timeout_ms));
        let endpoints = resolve(
            &http,
            &config.issuer,
            config.jwks_url.as_deref(),
            None,
            false,
            config.allow_plain_http,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let mut verifier_config =
            VerifierConfig::new(&config.issuer, endpoints.jwks_uri, &config.audience);
        verifier_config.leeway = Duration::from_secs(config.leeway_s);
        verifier_config.required_claims = config.require_claims.clone();
        verifier_config.jwks_timing = JwksTiming {
            refresh_interval: Duration::from_secs(config.jwks_refresh_s),
            miss_cooldown: Duration::from_millis(config.jwks_cooldown_ms),
        };
        let verifier =
            Verifier::new(verifier_config, http).map_err(|e| anyhow::anyhow!("--audience: {e}"))?;
        let keys = verifier.keys().refresh_now().await.map_err(|e| {
            let setting = if config.jwks_url.is_some() { "--jwks-url" } else { "--issuer" };
            anyhow::anyhow!("{setting}: cannot load the issuer's keys: {e}")
        })?;
        tracing::info!(issuer = %config.issuer, keys, "issuer keys loaded");

        let inbox_error = || {
            format!("--database-url: cannot open the inbox at {}", redact_url(&config.database_url))
        };
        let inbox = Inbox::connect(&config.database_url).await.with_context(inbox_error)?;
        inbox.check_handler(handler.as_ref()).await.with_context(inbox_error)?;
        let dead_letters =
            DeadLetters::new(&config.kafka_bootstrap, &config.dead_letter_topic, &config.group)
                .context("--kafka-bootstrap: cannot create the dead-letter producer")?;

        let assignments = Arc::new(Assignments::default());
        let stall_timeout = Duration::from_secs(config.stall_timeout_s);
        let health = Arc::new(Health::new(verifier.clone(), stall_timeout));
        let context = GroupContext { assignments: assignments.clone(), health: health.clone() };
        let consumer: GroupConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_bootstrap)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", &config.auto_offset_reset)
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (config.session_timeout_ms / 3).min(3000).to_string())
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "1000")
            // librdkafka fetches ahead up to 100,000 records per partition
            // or 64 MiB by default, counting only record values in the
            // bytes (the event token in the headers is most of a record);
            // the workers' queues already hold up to as many records again.
            .set("queued.min.messages", config.max_queued_per_partition.to_string())
            .set("queued.max.messages.kbytes", FETCH_QUEUE_KBYTES.to_string())
            // With a limit reached, librdkafka waits this long before it
            // looks again (1 s by default, an idle gap for the workers).
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
            .create_with_context(context)
            .context("--kafka-bootstrap: cannot create the Kafka consumer")?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).context("--topic: cannot subscribe")?;

        let ops = tokio::net::TcpListener::bind(config.ops_listen)
            .await
            .with_context(|| format!("--ops-listen: cannot listen on {}", config.ops_listen))?;
        let stats = Arc::new(Stats::default());
        let mut registry = Registry::with_prefix("event_consumer");
        let verification_seconds = Histogram::new(latency_buckets());
        let handler_seconds = Histogram::new(latency_buckets());
        registry.register(
            "verification_seconds",
            "Time to verify one event token, cache hits included.",
            verification_seconds.clone(),
        );
        registry.register(
            "handler_seconds",
            "Time of one handler call inside the inbox transaction.",
            handler_seconds.clone(),
        );
        registry.register_collector(Box::new(StatsMetrics(stats.clone())));
        registry.register_collector(Box::new(health.clone()));
        registry.register_collector(Box::new(JwksMetrics(verifier.clone())));

        let shared = Shared {
            verifier,
            routes,
            inbox,
            handler,
            dead_letters,
            max_backoff: config.max_retry_backoff(),
            batch_size: config.batch_size as usize,
            resume_at: config.max_queued_per_partition as usize / 2,
            drained: tokio::sync::Notify::new(),
            backlogged: Default::default(),
            stats,
            verification_seconds,
            handler_seconds,
        };
        let runtime = Runtime {
            shared: Arc::new(shared),
            assignments,
            health: health.clone(),
            max_queued: config.max_queued_per_partition as usize,
            shutdown_timeout: config.shutdown_timeout(),
        };
        let purge = config
            .inbox_retention()
            .map(|retention| (retention, Duration::from_secs(config.inbox_purge_interval_s)));
        let ops = (ops, event_identity::ops::router(registry, health));
        Ok(EventConsumer { consumer, runtime, purge, ops })
    }
}

/// What librdkafka may hold of fetched record values not yet handed over,
/// in KiB.
const FETCH_QUEUE_KBYTES: u32 = 16 * 1024;

/// How soon librdkafka fetches again for a partition whose read-ahead was
/// full, in milliseconds.
const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// How long open `/metrics` or `/readyz` requests may take once stopping.
const OPS_DRAIN: Duration = Duration::from_secs(2);

/// How long a broker has to answer at start.
const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A built consumer, subscribed and ready to run.
pub struct EventConsumer {
    consumer: GroupConsumer,
    runtime: Runtime,
    /// Inbox retention and purge interval, unless markers are kept forever.
    purge: Option<(Duration, Duration)>,
    /// The operations endpoint's listener and routes.
    ops: (tokio::net::TcpListener, axum::Router),
}

impl EventConsumer {
    /// Counters of what this consumer did.
    pub fn stats(&self) -> Arc<Stats> {
        self.runtime.shared.stats.clone()
    }

    /// The inbox, for tests and tools.
    pub fn inbox(&self) -> &Inbox {
        &self.runtime.shared.inbox
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ops.0.local_addr().expect("a bound listener has an address")
    }

    /// Consumes until `stop` is cancelled, then lets in-flight messages
    /// finish within the shutdown deadline and commits settled offsets.
    pub async fn run(self, stop: CancellationToken) {
        let dead_letter_topic = self.runtime.shared.dead_letters.topic();
        let ops_addr = self.ops_addr();
        tracing::info!(dead_letter_topic, %ops_addr, "consumer running");
        let (listener, router) = self.ops;
        let ops_stop = stop.clone();
        let ops = tokio::spawn(serve_ops(
            listener,
            router,
            async move { ops_stop.cancelled().await },
            OPS_DRAIN,
        ));
        let purging = self.purge.map(|(retention, every)| {
            let inbox = self.runtime.shared.inbox.clone();
            tokio::spawn(purge_inbox(inbox, retention, every, stop.clone()))
        });
        self.runtime.run(&self.consumer, &stop).await;
        if let Some(purging) = purging {
            purging.abort();
        }
        let _ = ops.await;
        tracing::info!("consumer stopped");
    }
}

/// Deletes expired inbox markers every `every` until `stop`.
async fn purge_inbox(inbox: Inbox, retention: Duration, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inbox.purge(retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "expired inbox markers purged"),
            Err(error) => tracing::warn!(%error, "purging inbox markers failed"),
        }
    }
}

/// Runs the consumer service until `shutdown` completes. Unlike
/// [`ConsumerBuilder::build`] alone, it first requires a broker to answer
/// within 10 s.
pub async fn run(
    config: ConsumerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Settings that need no request are checked first, then a broker must
    // answer before the service claims to have started.
    check_topics(&config)?;
    let (jwks_url, forward_url) = (config.jwks_url.as_deref(), config.forward_url.as_deref());
    check_settings(&config.issuer, jwks_url, None, config.allow_plain_http)
        .map_err(anyhow::Error::msg)?;
    if let Some(url) = forward_url {
        check_url(url, config.allow_plain_http)
            .map_err(|e| anyhow::anyhow!("--forward-url: {e}"))?;
    }
    let brokers = check_kafka(&config.kafka_bootstrap, KAFKA_CHECK_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("--kafka-bootstrap: {e}"))?;
    tracing::info!(bootstrap = %config.kafka_bootstrap, brokers, "Kafka reachable");
    let consumer = ConsumerBuilder::new(config).build().await?;
    let dead_letters = &consumer.runtime.shared.dead_letters;
    dead_letters
        .check_topic(KAFKA_CHECK_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("--dead-letter-topic: {e}"))?;
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    consumer.run(stop).await;
    Ok(())
}

/// Refuses a dead-letter topic that is also consumed.
fn check_topics(config: &ConsumerConfig) -> anyhow::Result<()> {
    if config.topics.contains(&config.dead_letter_topic) {
        anyhow::bail!(
            "--dead-letter-topic: {:?} is also consumed (--topic): every rejected record would \
             come back and be rejected again",
            config.dead_letter_topic
        );
    }
    Ok(())
}

/// A database URL without its password or any query parameter that may
/// hold one, for messages; only the scheme if it does not parse.
fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        let scheme = raw.split(':').next().unwrap_or_default();
        return format!("{scheme}:(unparsable URL, not shown)");
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["pass", "secret", "token", "key"].iter().any(|s| name.contains(s))
    };
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(name, value)| {
            let value = if secret(&name) { "***".into() } else { value.into_owned() };
            (name.into_owned(), value)
        })
        .collect();
    if !pairs.is_empty() {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_urls_lose_every_password() {
        for (url, shown) in [
            ("postgres://events:s3cret@db:5432/inbox", "postgres://events:***@db:5432/inbox"),
            ("postgres://events:p@ssHUNTER2@db/x", "postgres://events:***@db/x"),
            (
                "postgres://events@db/x?password=hunter2&sslmode=require",
                "postgres://events@db/x?password=***&sslmode=require",
            ),
            ("postgres://db/x?sslpassword=k3y", "postgres://db/x?sslpassword=***"),
            ("sqlite://inbox.db?mode=rwc", "sqlite://inbox.db?mode=rwc"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("postgres://us er:pw@[bad/x", "postgres:(unparsable URL, not shown)"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
