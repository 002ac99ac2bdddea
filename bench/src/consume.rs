//! One consumer variant, run in a child process: consumes a filled topic
//! from the beginning in a fresh group until every record is settled, and
//! reports messages per second from the first message read to the last
//! settled, and the process's peak memory.
//!
//! Completion is watched the same way for every variant: a task samples
//! the variant's counters every millisecond; the clock starts when the
//! first record has been read and stops when the settled count reaches the
//! topic's size. The secure consumer's counters are its [`Stats`]
//! (`consumed`, and `settled()`: processed, duplicates and dead-lettered).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_identity_consumer::{
    ConsumerBuilder, ConsumerConfig, Event, Handler, HandlerFuture, Stats,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use tokio_util::sync::CancellationToken;

use crate::child::{Sched, cpu_time, peak_rss_kib, rss_kib};
use crate::cli::{ConsumeArgs, Variant};
use crate::{CONSUMER_AUDIENCE, EVENT_SCOPE, EVENT_TYPE};

/// How often completion is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);

/// What one consumer variant measured.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConsumeResult {
    /// The variant.
    pub variant: Variant,
    /// Records in the topic, all settled.
    pub messages: u64,
    /// From the first record read to the last settled, in seconds.
    pub seconds: f64,
    /// `messages / seconds`.
    pub messages_per_s: f64,
    /// CPU time the child used over those `seconds` (all its threads),
    /// per message, in microseconds: the cost of a message regardless of
    /// what else the machine was doing.
    pub cpu_us_per_message: f64,
    /// Context switches of the child's threads over those `seconds`, per
    /// message: hand-offs between threads show here.
    pub context_switches_per_message: f64,
    /// How long the child's threads were runnable but waited for a CPU
    /// over those `seconds`, in seconds: other work on the machine shows
    /// here.
    pub run_queue_wait_s: f64,
    /// From the child's start to its first record (connecting, loading
    /// the issuer's keys, opening the inbox, joining the group), in
    /// seconds; not part of `seconds`.
    pub startup_seconds: f64,
    /// Peak resident memory of the child process, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Resident memory when a quarter, half, three quarters and all of
    /// the records were settled, in KiB: flat once buffers are full, or
    /// growing with every message.
    pub rss_kib_by_quarter: Vec<u64>,
    /// What the secure consumer did (absent for the plain one).
    pub secure: Option<SecureCounts>,
}

/// The secure consumer's own counters at the end of a run.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SecureCounts {
    /// Effects run and committed.
    pub processed: u64,
    /// Messages found already processed.
    pub duplicates: u64,
    /// Messages dead-lettered (0 in a valid run).
    pub dead_lettered: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Mean time of one token verification (cache hits included), in
    /// microseconds, from the consumer's `verification_seconds` metric.
    pub verification_mean_us: Option<f64>,
    /// Mean time of one handler call inside the inbox transaction, in
    /// microseconds, from its `handler_seconds` metric.
    pub handler_mean_us: Option<f64>,
}

/// Runs the variant `args` names and returns what it measured.
pub async fn run(args: ConsumeArgs) -> anyhow::Result<ConsumeResult> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout_s);
    let (timing, secure) = match args.variant {
        Variant::Plain => (plain(&args, timeout).await?, None),
        _ => {
            let (timing, counts) = secure(&args, timeout).await?;
            (timing, Some(counts))
        }
    };
    let seconds = timing.busy.as_secs_f64();
    Ok(ConsumeResult {
        variant: args.variant,
        messages: args.expected,
        seconds,
        messages_per_s: args.expected as f64 / seconds.max(1e-9),
        cpu_us_per_message: timing.cpu.as_secs_f64() * 1e6 / args.expected.max(1) as f64,
        context_switches_per_message: timing.sched.context_switches as f64
            / args.expected.max(1) as f64,
        run_queue_wait_s: timing.sched.run_queue_wait.as_secs_f64(),
        startup_seconds: timing.first.duration_since(started).as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
        rss_kib_by_quarter: timing.rss_by_quarter,
        secure,
    })
}

/// When the first record was read, how long until all were settled, and
/// the CPU time and scheduling meanwhile.
struct Timing {
    first: Instant,
    busy: Duration,
    cpu: Duration,
    sched: Sched,
    rss_by_quarter: Vec<u64>,
}

/// Samples `progress` (records read, records settled) until `expected`
/// are settled.
async fn watch(
    expected: u64,
    timeout: Duration,
    progress: impl Fn() -> (u64, u64),
) -> anyhow::Result<Timing> {
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut first = None;
    let mut rss_by_quarter = Vec::with_capacity(4);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (read, settled) = progress();
        if first.is_none() && read > 0 {
            first = Some((now, cpu_time(), Sched::now()));
        }
        while rss_by_quarter.len() < 4
            && settled >= expected * (rss_by_quarter.len() as u64 + 1) / 4
        {
            rss_by_quarter.push(rss_kib().unwrap_or(0));
        }
        if settled >= expected {
            let (first, cpu, sched) = first.unwrap_or((now, cpu_time(), Sched::now()));
            return Ok(Timing {
                first,
                busy: now - first,
                cpu: cpu_time().saturating_sub(cpu),
                sched: Sched::now().since(sched),
                rss_by_quarter,
            });
        }
        anyhow::ensure!(
            now < deadline,
            "only {settled} of {expected} records settled after {} s",
            timeout.as_secs()
        );
    }
}

/// (a) A plain `StreamConsumer` in a fresh group that counts the records
/// it receives, nothing else.
async fn plain(args: &ConsumeArgs, timeout: Duration) -> anyhow::Result<Timing> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.partition.eof", "false")
        .create()
        .context("cannot create the plain consumer")?;
    consumer.subscribe(&[&args.topic]).context("cannot subscribe")?;

    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let counting = {
        let (received, stop) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            let mut bytes = 0usize;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    message = consumer.recv() => match message {
                        Ok(message) => {
                            bytes += message.payload_len();
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => tracing::warn!(%error, "Kafka consume error"),
                    },
                }
            }
            bytes
        })
    };

    let count = || {
        let n = received.load(Ordering::Relaxed);
        (n, n)
    };
    let timing = watch(args.expected, timeout, count).await;
    stop.cancel();
    let bytes = counting.await?;
    tracing::debug!(bytes, "payload bytes received");
    timing
}

/// The no-op effect of variant (b): accepts every event and writes
/// nothing. The inbox still inserts each event's marker, in the same
/// transaction, before calling it.
struct NoEffect;

impl Handler for NoEffect {
    fn handle<'a>(&'a self, _event: &'a Event, _tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// The secure consumer's settings for `args`: the benchmark's route with
/// its claims rule, the development issuer, a free ops port, then the
/// caller's own flags (which override).
fn secure_config(args: &ConsumeArgs) -> anyhow::Result<ConsumerConfig> {
    let issuer = args.issuer.as_deref().context("--issuer is required for a secure variant")?;
    let database_url =
        args.database_url.as_deref().context("--database-url is required for a secure variant")?;
    let mut argv = vec![
        "event-consumer".to_owned(),
        format!("--kafka-bootstrap={}", args.kafka_bootstrap),
        format!("--group={}", args.group),
        format!("--topic={}", args.topic),
        format!("--dead-letter-topic={}.dead-letter", args.topic),
        format!("--issuer={issuer}"),
        format!("--audience={CONSUMER_AUDIENCE}"),
        format!("--route=type={EVENT_TYPE},scope={EVENT_SCOPE},claim_equals_field=tenant:tenant"),
        format!("--database-url={database_url}"),
        "--ops-listen=127.0.0.1:0".to_owned(),
    ];
    argv.extend(args.consumer_args.iter().cloned());
    <ConsumerConfig as clap::Parser>::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))
}

/// (b), (c), (d): the secure consumer, built through the public
/// `ConsumerBuilder`, with the no-op handler for (b) and the default
/// handler (`RecordEvents`) otherwise.
async fn secure(args: &ConsumeArgs, timeout: Duration) -> anyhow::Result<(Timing, SecureCounts)> {
    let mut builder = ConsumerBuilder::new(secure_config(args)?);
    if args.variant == Variant::SecureNoop {
        builder = builder.handler(Arc::new(NoEffect));
    }
    let consumer = builder.build().await?;
    let stats = consumer.stats();
    let ops = consumer.ops_addr();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));

    let progress = || (stats.consumed.load(Ordering::Relaxed), stats.settled());
    let timing = watch(args.expected, timeout, progress).await;
    let metrics = scrape(ops).await;
    stop.cancel();
    running.await?;
    let timing = timing?;

    let mean_us = |name: &str| {
        let metrics = metrics.as_deref()?;
        let sum = metric(metrics, &format!("event_consumer_{name}_sum"))?;
        let count = metric(metrics, &format!("event_consumer_{name}_count"))?;
        (count > 0.0).then(|| sum / count * 1e6)
    };
    let counts = SecureCounts {
        processed: stats.processed.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        verification_mean_us: mean_us("verification_seconds"),
        handler_mean_us: mean_us("handler_seconds"),
    };
    check(&stats, args.expected)?;
    Ok((timing, counts))
}

/// A valid run processes every record once: nothing rejected, nothing
/// seen twice.
fn check(stats: &Stats, expected: u64) -> anyhow::Result<()> {
    let processed = stats.processed.load(Ordering::Relaxed);
    let rejected = stats.rejected();
    anyhow::ensure!(
        processed == expected && rejected.is_empty(),
        "the secure consumer processed {processed} of {expected} records; rejected: {rejected:?}"
    );
    Ok(())
}

/// The consumer's Prometheus text, or `None` if it cannot be had.
async fn scrape(ops: std::net::SocketAddr) -> Option<String> {
    let response = reqwest::get(format!("http://{ops}/metrics")).await.ok()?;
    response.text().await.ok()
}

/// The value of an unlabelled sample `name` in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_unlabelled_samples_only() {
        let text = "# HELP x\nevent_consumer_verification_seconds_sum 0.25\n\
                    event_consumer_verification_seconds_count 1000\n\
                    event_consumer_rejected_total{reason=\"expired\"} 3\n";
        assert_eq!(metric(text, "event_consumer_verification_seconds_sum"), Some(0.25));
        assert_eq!(metric(text, "event_consumer_verification_seconds_count"), Some(1000.0));
        assert_eq!(metric(text, "event_consumer_rejected_total"), None);
    }
}
