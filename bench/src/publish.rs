//! One producer variant, run in a child process: publishes the same
//! records with the same Kafka settings (`acks=all`, idempotence,
//! `linger.ms=5`) and the same number in flight, either through the secure
//! `Publisher` or through a bare `FutureProducer`, and reports throughput,
//! per-publish latency percentiles and peak memory.
//!
//! Each publish is timed from its start to the broker's acknowledgement.
//! For the secure variant that covers what the producer service does per
//! request: verify the user's token (`Publisher::authenticate`), then
//! `Publisher::publish` (route and permission checks, the event token from
//! the cache, message ID, headers, produce and wait for the ack). A
//! warm-up of one publish per user comes first and is not measured: it
//! fills the event-token cache by token exchange at the development
//! issuer, and opens the bare producer's connections the same way.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_identity_producer::{ProducerConfig, PublishRequest, Publisher};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::child::{cpu_time, peak_rss_kib};
use crate::cli::{Mode, PublishArgs};
use crate::workload::{event_data, read_tokens};
use crate::{
    CONSUMER_AUDIENCE, EVENT_SCOPE, EVENT_TYPE, PRODUCER_CLIENT_ID, PRODUCER_CLIENT_SECRET,
};

/// How long a record may take to be acknowledged, as the producer's
/// default `--delivery-timeout-ms`.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What one producer variant measured.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PublishResult {
    /// The variant.
    pub mode: Mode,
    /// Measured publishes, all acknowledged.
    pub publishes: u64,
    /// Publishes in flight at once.
    pub concurrency: u64,
    /// Wall time of the measured publishes, in seconds.
    pub seconds: f64,
    /// `publishes / seconds`.
    pub publishes_per_s: f64,
    /// CPU time the child used over those `seconds` (all its threads),
    /// per publish, in microseconds.
    pub cpu_us_per_publish: f64,
    /// Median latency of one publish, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// Slowest publish, in milliseconds.
    pub max_ms: f64,
    /// Peak resident memory of the child process, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Token exchanges made, warm-up included (secure only).
    pub exchanges: Option<u64>,
    /// Publishes served an event token from the cache (secure only).
    pub cache_hits: Option<u64>,
}

impl PublishResult {
    /// Each figure's median over `rounds` of one variant (the upper median
    /// of an even count), except peak memory: the highest; `None` when
    /// there are none.
    pub fn median(rounds: &[&PublishResult]) -> Option<PublishResult> {
        let first = *rounds.first()?;
        let median = |f: fn(&PublishResult) -> f64| {
            let mut values: Vec<f64> = rounds.iter().map(|r| f(r)).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let peak = rounds.iter().filter_map(|r| r.peak_rss_kib).max();
        Some(PublishResult {
            seconds: median(|r| r.seconds),
            publishes_per_s: median(|r| r.publishes_per_s),
            cpu_us_per_publish: median(|r| r.cpu_us_per_publish),
            p50_ms: median(|r| r.p50_ms),
            p99_ms: median(|r| r.p99_ms),
            max_ms: median(|r| r.max_ms),
            peak_rss_kib: peak,
            ..first.clone()
        })
    }
}

/// Runs the variant `args` names and returns what it measured.
pub async fn run(args: PublishArgs) -> anyhow::Result<PublishResult> {
    let event_tokens = read_tokens(&args.event_tokens)?;
    let users = event_tokens.len() as u64;
    let (latencies, (elapsed, cpu), exchanges, cache_hits) = match args.mode {
        Mode::Bare => {
            let producer = bare_producer(&args.kafka_bootstrap)?;
            let topic: Arc<str> = args.topic.as_str().into();
            let tokens: Arc<Vec<String>> = Arc::new(event_tokens);
            let publish =
                |n: u64| bare_publish(producer.clone(), topic.clone(), tokens.clone(), n, &args);
            drive(users, args.concurrency, 0, &publish).await?;
            let (latencies, times) = drive(args.count, args.concurrency, users, &publish).await?;
            (latencies, times, None, None)
        }
        Mode::Secure => {
            let publisher = Arc::new(Publisher::from_config(&producer_config(&args)?).await?);
            let tokens: Arc<Vec<String>> = Arc::new(read_tokens(&args.user_tokens)?);
            anyhow::ensure!(tokens.len() as u64 == users, "one user token per event token");
            let publish = |n: u64| secure_publish(publisher.clone(), tokens.clone(), n, &args);
            drive(users, args.concurrency, 0, &publish).await?;
            let (latencies, times) = drive(args.count, args.concurrency, users, &publish).await?;
            let tokens = publisher.event_tokens();
            (latencies, times, Some(tokens.exchange_count()), Some(tokens.cache_hit_count()))
        }
    };

    let seconds = elapsed.as_secs_f64();
    let mut millis: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    millis.sort_by(f64::total_cmp);
    Ok(PublishResult {
        mode: args.mode,
        publishes: args.count,
        concurrency: args.concurrency,
        seconds,
        publishes_per_s: args.count as f64 / seconds.max(1e-9),
        cpu_us_per_publish: cpu.as_secs_f64() * 1e6 / args.count.max(1) as f64,
        p50_ms: percentile(&millis, 0.50),
        p99_ms: percentile(&millis, 0.99),
        max_ms: millis.last().copied().unwrap_or_default(),
        peak_rss_kib: peak_rss_kib(),
        exchanges,
        cache_hits,
    })
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `publish(first)` .. `publish(first + count - 1)`, at most
/// `concurrency` at once, each in its own task (as a service runs each
/// request); their latencies, and the wall time and CPU time of all of
/// them.
async fn drive<F, Fut>(
    count: u64,
    concurrency: u64,
    first: u64,
    publish: &F,
) -> anyhow::Result<(Vec<Duration>, (Duration, Duration))>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency as usize));
    let mut tasks = JoinSet::new();
    let mut latencies = Vec::with_capacity(count as usize);
    let (started, cpu) = (Instant::now(), cpu_time());
    for n in first..first + count {
        let permit = permits.clone().acquire_owned().await?;
        let work = publish(n);
        tasks.spawn(async move {
            let latency = work.await;
            drop(permit);
            latency
        });
        while let Some(done) = tasks.try_join_next() {
            latencies.push(done??);
        }
    }
    while let Some(done) = tasks.join_next().await {
        latencies.push(done??);
    }
    Ok((latencies, (started.elapsed(), cpu_time().saturating_sub(cpu))))
}

/// The producer service's settings against the development issuer, as
/// the integration tests build them.
fn producer_config(args: &PublishArgs) -> anyhow::Result<ProducerConfig> {
    let argv = [
        "event-producer".to_owned(),
        "--listen=127.0.0.1:0".to_owned(),
        format!("--kafka-bootstrap={}", args.kafka_bootstrap),
        format!("--topic={}", args.topic),
        format!("--issuer={}", args.issuer),
        format!("--client-id={PRODUCER_CLIENT_ID}"),
        format!("--client-secret={PRODUCER_CLIENT_SECRET}"),
        format!(
            "--route=type={EVENT_TYPE},requires=orders:write,scope={EVENT_SCOPE},\
             audience={CONSUMER_AUDIENCE}"
        ),
    ];
    <ProducerConfig as clap::Parser>::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))
}

/// One request to the secure producer: user `n % users` publishes order
/// `n`.
fn secure_publish(
    publisher: Arc<Publisher>,
    tokens: Arc<Vec<String>>,
    n: u64,
    args: &PublishArgs,
) -> impl Future<Output = anyhow::Result<Duration>> + Send + 'static {
    let user = n % tokens.len() as u64;
    let request = PublishRequest {
        event_type: EVENT_TYPE.to_owned(),
        key: format!("order-{n:010}"),
        // Serialized here, as the bare variant serializes its value.
        data: serde_json::value::to_raw_value(&event_data(n, user, args.payload_bytes))
            .expect("a JSON value serializes"),
        idempotency_key: None,
    };
    async move {
        let started = Instant::now();
        let token = tokens[user as usize].as_str();
        let (token, claims) = publisher.authenticate(Some(token)).await?;
        publisher.publish(&token, &claims, request).await?;
        Ok(started.elapsed())
    }
}

/// A `FutureProducer` with the settings `Publisher` uses.
fn bare_producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string())
        .set("linger.ms", "5")
        .create()
        .context("cannot create the bare producer")
}

/// The same record as [`secure_publish`] sends, written by a bare
/// producer: a new message ID and time, the data serialized, the contract
/// headers with user `n % users`'s event token, produce, wait for the ack.
fn bare_publish(
    producer: FutureProducer,
    topic: Arc<str>,
    tokens: Arc<Vec<String>>,
    n: u64,
    args: &PublishArgs,
) -> impl Future<Output = anyhow::Result<Duration>> + Send + 'static {
    let user = n % tokens.len() as u64;
    let key = format!("order-{n:010}");
    let data = event_data(n, user, args.payload_bytes);
    async move {
        let started = Instant::now();
        let id = uuid::Uuid::now_v7().to_string();
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let authorization = format!("Bearer {}", tokens[user as usize]);
        let payload = serde_json::to_vec(&data)?;
        let headers = OwnedHeaders::new()
            .insert(Header { key: "ce_specversion", value: Some("1.0") })
            .insert(Header { key: "ce_id", value: Some(id.as_str()) })
            .insert(Header { key: "ce_type", value: Some(EVENT_TYPE) })
            .insert(Header { key: "ce_source", value: Some("/event-producer") })
            .insert(Header { key: "ce_time", value: Some(time.as_str()) })
            .insert(Header { key: "content-type", value: Some("application/json") })
            .insert(Header { key: "authorization", value: Some(authorization.as_str()) });
        let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
        producer.send(record, DELIVERY_TIMEOUT).await.map_err(|(error, _)| error)?;
        Ok(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values[..1], 0.99), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_median_round_takes_each_figure_separately() {
        let round = |p99_ms: f64, peak: u64| PublishResult {
            mode: Mode::Bare,
            publishes: 10,
            concurrency: 1,
            seconds: p99_ms,
            publishes_per_s: 100.0 / p99_ms,
            cpu_us_per_publish: 1.0,
            p50_ms: 1.0,
            p99_ms,
            max_ms: p99_ms,
            peak_rss_kib: Some(peak),
            exchanges: None,
            cache_hits: None,
        };
        let rounds = [round(9.0, 1), round(3.0, 5), round(5.0, 2)];
        let median = PublishResult::median(&rounds.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!((median.p99_ms, median.publishes_per_s), (5.0, 20.0));
        assert_eq!(median.peak_rss_kib, Some(5));
        assert!(PublishResult::median(&[]).is_none());
    }

    #[test]
    fn the_bench_route_parses_as_a_producer_route() {
        let args = PublishArgs {
            mode: Mode::Secure,
            kafka_bootstrap: "127.0.0.1:1".into(),
            topic: "t".into(),
            issuer: "http://127.0.0.1:1".into(),
            user_tokens: "u".into(),
            event_tokens: "e".into(),
            count: 1,
            concurrency: 1,
            payload_bytes: 300,
        };
        let config = producer_config(&args).unwrap();
        assert_eq!(config.routes.len(), 1);
    }
}
