//! The partitions this consumer holds, how far each is settled, and the
//! rebalance hook that cuts a revoked partition off from the commit path.
//!
//! Each assigned partition has a worker task and a [`Progress`]: the next
//! offset to read (one past the last message of the last settled batch,
//! so always the contiguous watermark of finished work) and how many
//! messages wait in the worker's queue. The consume loop stores each
//! watermark for commit; when a partition is revoked, its watermark is
//! committed at once and its slot removed, so whatever the old worker
//! finishes later is never committed by this consumer. The new owner reads
//! from the committed watermark and the inbox absorbs any repeat.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::OwnedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// How far one partition's worker got.
#[derive(Debug)]
pub(crate) struct Progress {
    /// One past the last settled offset; -1 until a message settles.
    next_offset: AtomicI64,
    /// Messages handed to the worker and not settled yet.
    queued: AtomicUsize,
    /// Whether the consume loop paused the partition for a full queue.
    paused: AtomicBool,
    /// When the worker last settled a batch, or its queue last became
    /// non-empty, whichever is later ([`millis`]).
    moved_at: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            next_offset: AtomicI64::new(-1),
            queued: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            moved_at: AtomicU64::new(millis()),
        }
    }
}

/// How long a worker holding messages may go without settling any before
/// its partition counts as stalled: waiting out a failure, or stuck in a
/// handler. Reading then stops waiting for it.
pub(crate) const STALL_GRACE: Duration = Duration::from_millis(500);

/// Milliseconds since the first call: a monotonic clock in a `u64`.
fn millis() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u64
}

impl Progress {
    /// Records that every message before `next_offset` is settled.
    pub fn settled(&self, next_offset: i64, messages: usize) {
        self.next_offset.fetch_max(next_offset, Ordering::AcqRel);
        self.queued.fetch_sub(messages, Ordering::AcqRel);
        self.moved_at.store(millis(), Ordering::Release);
    }

    /// Whether the worker holds messages and has settled none for
    /// [`STALL_GRACE`].
    fn stalled(&self, now: u64) -> bool {
        let since = now.saturating_sub(self.moved_at.load(Ordering::Acquire));
        self.queued() > 0 && since >= STALL_GRACE.as_millis() as u64
    }

    /// Records that `messages` left the queue without settling.
    pub fn abandoned(&self, messages: usize) {
        self.queued.fetch_sub(messages, Ordering::AcqRel);
    }

    fn next_offset(&self) -> i64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Messages handed to the worker and not settled yet.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether the partition is paused and waits for its queue to drain.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
}

/// One assigned partition.
pub(crate) struct Slot {
    pub topic: String,
    pub partition: i32,
    pub progress: Arc<Progress>,
    pub sender: mpsc::UnboundedSender<OwnedMessage>,
    /// Cancelled when the partition is revoked or the consumer stops.
    pub halt: CancellationToken,
    /// The last offset handed to librdkafka's offset store.
    stored: i64,
}

impl Slot {
    pub fn new(
        topic: &str,
        partition: i32,
        sender: mpsc::UnboundedSender<OwnedMessage>,
        halt: CancellationToken,
    ) -> (Self, Arc<Progress>) {
        let progress = Arc::new(Progress::default());
        let slot = Self {
            topic: topic.to_owned(),
            partition,
            progress: progress.clone(),
            sender,
            halt,
            stored: -1,
        };
        (slot, progress)
    }

    /// Counts one more message handed to the worker; true if the queue
    /// just reached `high` and the partition should be paused.
    pub fn enqueued(&mut self, high: usize) -> bool {
        let queued = self.progress.queued.fetch_add(1, Ordering::AcqRel) + 1;
        if queued == 1 {
            self.progress.moved_at.store(millis(), Ordering::Release);
        }
        queued >= high && !self.progress.paused.swap(true, Ordering::AcqRel)
    }
}

/// The partitions held now.
#[derive(Default)]
pub(crate) struct Assignments {
    slots: Mutex<Vec<Slot>>,
}

impl Assignments {
    pub fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watermarks that moved since the last call, and partitions whose
    /// queue fell to `low` after a pause.
    pub fn poll(&self, low: usize) -> (TopicPartitionList, TopicPartitionList) {
        let mut moved = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for slot in self.lock().iter_mut() {
            let next = slot.progress.next_offset();
            if next > slot.stored {
                let added =
                    moved.add_partition_offset(&slot.topic, slot.partition, Offset::Offset(next));
                if added.is_ok() {
                    slot.stored = next;
                }
            }
            if slot.progress.paused() && slot.progress.queued() <= low {
                slot.progress.paused.store(false, Ordering::Release);
                resume.add_partition(&slot.topic, slot.partition);
            }
        }
        (moved, resume)
    }

    /// Whether the workers of the partitions that are neither paused nor
    /// stalled have, on average, at least `gate` messages waiting: reading
    /// more would only fill queues.
    pub fn backlogged(&self, gate: usize) -> bool {
        backlogged(&self.lock(), gate)
    }

    /// Removes the slots of `revoked`, halting their workers, and returns
    /// their watermarks.
    fn revoke(&self, revoked: &TopicPartitionList) -> TopicPartitionList {
        let mut watermarks = TopicPartitionList::new();
        self.lock().retain(|slot| {
            let gone = revoked.find_partition(&slot.topic, slot.partition).is_some();
            if gone {
                slot.halt.cancel();
                let next = slot.progress.next_offset();
                if next >= 0 {
                    let _ = watermarks.add_partition_offset(
                        &slot.topic,
                        slot.partition,
                        Offset::Offset(next),
                    );
                }
            }
            !gone
        });
        watermarks
    }
}

/// See [`Assignments::backlogged`]; for a caller holding the lock.
pub(crate) fn backlogged(slots: &[Slot], gate: usize) -> bool {
    let now = millis();
    let (mut moving, mut queued) = (0, 0);
    for slot in slots.iter().filter(|slot| !slot.progress.paused() && !slot.progress.stalled(now)) {
        moving += 1;
        queued += slot.progress.queued();
    }
    moving > 0 && queued >= gate.saturating_mul(moving)
}

/// The consumer's librdkafka context: commits a revoked partition's
/// watermark before the partition goes, and feeds statistics to the
/// consumer's health.
pub(crate) struct GroupContext {
    pub assignments: Arc<Assignments>,
    pub health: Arc<Health>,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        self.health.observe(&statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let watermarks = self.assignments.revoke(partitions);
                if watermarks.count() > 0 {
                    if let Err(error) = consumer.store_offsets(&watermarks) {
                        tracing::debug!(%error, "storing revoked offsets failed");
                    }
                    if let Err(error) = consumer.commit(&watermarks, CommitMode::Sync) {
                        tracing::warn!(%error, "committing revoked partitions failed");
                    }
                }
                // A pause outlives the assignment in librdkafka: lift it, or
                // the partition stays stopped when it comes back.
                if let Err(error) = consumer.resume(partitions) {
                    tracing::debug!(%error, "resuming revoked partitions failed");
                }
                tracing::info!(partitions = partitions.count(), "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            // Nothing is queued for a partition just assigned: never paused.
            if let Err(error) = consumer.resume(partitions) {
                tracing::debug!(%error, "resuming assigned partitions failed");
            }
            tracing::info!(partitions = partitions.count(), "partitions assigned");
        }
    }
}
