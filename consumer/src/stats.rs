//! Counters of what a consumer did since it started.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use event_identity::Rejection;

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
