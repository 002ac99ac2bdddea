//! Counters of what a consumer did since it started, and their
//! Prometheus form.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_identity::Rejection;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// Counts of what the consumer did, since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records read from Kafka and handed to a partition's worker.
    pub consumed: AtomicU64,
    /// Messages whose effect ran and committed.
    pub processed: AtomicU64,
    /// Messages acknowledged as already processed.
    pub duplicates: AtomicU64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Retries after transient failures.
    pub retries: AtomicU64,
    rejected: Mutex<HashMap<&'static str, u64>>,
}

impl Stats {
    /// Rejections by reason code.
    pub fn rejected(&self) -> HashMap<&'static str, u64> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Messages settled one way or another: processed, duplicate or
    /// dead-lettered.
    pub fn settled(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
            + self.duplicates.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }

    pub(crate) fn reject(&self, reason: Rejection) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason.code())
            .or_default() += 1;
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Exposes [`Stats`] as Prometheus counters (`messages_consumed_total`,
/// `messages_processed_total`, `duplicates_total`, `dead_lettered_total`,
/// `retries_total`, `rejected_total{reason}`).
#[derive(Debug)]
pub(crate) struct StatsMetrics(pub Arc<Stats>);

impl Collector for StatsMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        for (name, help, counter) in [
            ("messages_consumed", "Records read from Kafka.", &stats.consumed),
            ("messages_processed", "Messages whose effect ran and committed.", &stats.processed),
            ("duplicates", "Messages acknowledged as already processed.", &stats.duplicates),
            ("dead_lettered", "Messages written to the dead-letter topic.", &stats.dead_lettered),
            ("retries", "Retries after transient failures.", &stats.retries),
        ] {
            let value = ConstCounter::new(counter.load(Ordering::Relaxed));
            value.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }

        let help = "Messages rejected, by reason code.";
        let mut family = encoder.encode_descriptor("rejected", help, None, MetricType::Counter)?;
        let mut rejected: Vec<_> = stats.rejected().into_iter().collect();
        rejected.sort();
        for (reason, count) in rejected {
            ConstCounter::new(count).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}
