//! Whether the consumer can do its work now, and its lag, from librdkafka's
//! statistics (emitted every second) and the consume loop's progress.
//!
//! Ready means: the issuer's keys are loaded, a broker is connected, the
//! group has assigned this consumer partitions, and no partition with lag
//! has gone without progress for the stall timeout. A partition stuck on a
//! transient failure (keys or database unreachable) therefore turns the
//! consumer unready once the stall timeout passes while messages wait,
//! even if its other partitions move.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_identity::Verifier;
use event_identity::ops::Readiness;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use rdkafka::TopicPartitionList;
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
    /// Since when each partition with lag has not moved.
    still_since: HashMap<(String, i32), Instant>,
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
            still_since: HashMap::new(),
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
                    // librdkafka reports -1 until an offset is committed:
                    // then all that is in the partition is still to do.
                    let lag = match (p.consumer_lag, p.committed_offset, p.hi_offset) {
                        (lag, _, _) if lag >= 0 => lag,
                        (_, committed, high) if committed < 0 && high >= 0 => {
                            high - p.lo_offset.max(0)
                        }
                        _ => 0,
                    };
                    PartitionLag { topic: topic.clone(), partition: p.partition, lag }
                })
            })
            .collect();
        lag.sort();

        let mut state = self.state();
        let now = Instant::now();
        state.statistics_at = Some(now);
        state.brokers_up = brokers_up;
        state.assigned = statistics.cgrp.as_ref().map_or(0, |g| g.assignment_size);
        // The clock of a partition starts when it is first seen with lag.
        let lagging: Vec<(String, i32)> =
            lag.iter().filter(|p| p.lag > 0).map(|p| (p.topic.clone(), p.partition)).collect();
        state.still_since.retain(|key, _| lagging.contains(key));
        for key in lagging {
            state.still_since.entry(key).or_insert(now);
        }
        state.lag = lag;
    }

    /// Records that the watermarks of `moved` moved.
    pub fn progressed(&self, moved: &TopicPartitionList) {
        let now = Instant::now();
        let mut state = self.state();
        for element in moved.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let Some(since) = state.still_since.get_mut(&key) {
                *since = now;
            }
        }
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
        for p in state.lag.iter().filter(|p| p.lag > 0) {
            let key = (p.topic.clone(), p.partition);
            let idle = state.still_since.get(&key).map_or(Duration::ZERO, Instant::elapsed);
            if idle > self.stall_timeout {
                return Err(format!(
                    "partition {} of {}: {} messages behind and no progress for {} s",
                    p.partition,
                    p.topic,
                    p.lag,
                    idle.as_secs()
                ));
            }
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
