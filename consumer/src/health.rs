//! Whether the consumer can do its work now, and its lag, from librdkafka's
//! statistics (emitted every second) and the consume loop's progress.
//!
//! Ready means: the issuer's keys are loaded, a broker is connected, the
//! group has assigned this consumer partitions, and, when those partitions
//! have lag, some watermark moved within the stall timeout. A consumer
//! stuck on a transient failure (keys or database unreachable) therefore
//! turns unready once the stall timeout passes while messages wait.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_identity::Verifier;
use event_identity::ops::Readiness;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use rdkafka::statistics::Statistics;

/// Statistics older than this mean the Kafka client is not being served.
const STATISTICS_MAX_AGE: Duration = Duration::from_secs(10);

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PartitionLag {
    topic: String,
    partition: i32,
    lag: i64,
}

#[derive(Debug)]
struct State {
    statistics_at: Option<Instant>,
    brokers_up: usize,
    assigned: i32,
    lag: Vec<PartitionLag>,
    last_progress: Instant,
}

/// The consumer's health, fed by the Kafka client and the consume loop.
pub(crate) struct Health {
    state: Mutex<State>,
    verifier: Verifier,
    stall_timeout: Duration,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Health {
    pub fn new(verifier: Verifier, stall_timeout: Duration) -> Self {
        let state = State {
            statistics_at: None,
            brokers_up: 0,
            assigned: 0,
            lag: Vec::new(),
            last_progress: Instant::now(),
        };
        Self { state: Mutex::new(state), verifier, stall_timeout }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in one round of librdkafka's statistics.
    pub fn observe(&self, statistics: &Statistics) {
        let brokers_up =
            statistics.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").count();
        let mut lag: Vec<PartitionLag> = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions.values().filter(|p| p.partition >= 0 && p.desired).map(|p| {
                    PartitionLag {
                        topic: topic.clone(),
                        partition: p.partition,
                        lag: p.consumer_lag.max(0),
                    }
                })
            })
            .collect();
        lag.sort();

        let mut state = self.state();
        state.statistics_at = Some(Instant::now());
        state.brokers_up = brokers_up;
        state.assigned = statistics.cgrp.as_ref().map_or(0, |g| g.assignment_size);
        state.lag = lag;
    }

    /// Records that a watermark moved.
    pub fn progressed(&self) {
        self.state().last_progress = Instant::now();
    }
}

impl Readiness for Health {
    fn check(&self) -> Result<(), String> {
        if !self.verifier.keys().is_loaded() || self.verifier.keys().key_count() == 0 {
            return Err("the issuer's keys are not loaded".into());
        }
        let state = self.state();
        match state.statistics_at {
            Some(at) if at.elapsed() <= STATISTICS_MAX_AGE => {}
            _ => return Err("no recent statistics from the Kafka client".into()),
        }
        if state.brokers_up == 0 {
            return Err("no Kafka broker connected".into());
        }
        if state.assigned == 0 {
            return Err("no partitions assigned".into());
        }
        let lag: i64 = state.lag.iter().map(|p| p.lag).sum();
        let idle = state.last_progress.elapsed();
        if lag > 0 && idle > self.stall_timeout {
            return Err(format!("{lag} messages behind and no progress for {} s", idle.as_secs()));
        }
        Ok(())
    }
}

impl Collector for Health {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lag = self.state().lag.clone();
        let help = "Messages in the partition after the committed offset.";
        let gauge_type = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor("lag", help, None, gauge_type)?;
        for p in lag {
            let partition = p.partition.to_string();
            let labels = [("topic", p.topic.as_str()), ("partition", partition.as_str())];
            ConstGauge::new(p.lag).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
