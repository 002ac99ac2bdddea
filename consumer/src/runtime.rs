//! The consume loop: reads records, hands each to its partition's worker,
//! stores settled watermarks for commit, pauses partitions whose queue is
//! full, and on stop drains the workers before a deadline and commits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::partitions::{Assignments, GroupContext, STALL_GRACE, Slot, backlogged};
use crate::stats::Stats;
use crate::worker::{self, Shared};

/// How often settled watermarks are stored and paused partitions checked.
const STORE_INTERVAL: Duration = Duration::from_millis(100);

/// Whether the consume loop reads. Reading stops while the workers are
/// backlogged: librdkafka then holds what it fetched and stops fetching,
/// which costs nothing, whereas pausing a partition drops what was
/// fetched for it, to be fetched again on resume.
#[derive(Default)]
struct Gate {
    /// When reading stopped; `None` while reading.
    closed_since: Option<Instant>,
    /// Set when the workers did not catch up within `STALL_GRACE`: reading
    /// goes on regardless until the backlog clears.
    suspended: bool,
}

/// The Kafka consumer this runtime drives.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// The consume loop and what it shares with the workers.
pub(crate) struct Runtime {
    pub shared: Arc<Shared>,
    pub assignments: Arc<Assignments>,
    pub health: Arc<Health>,
    /// A partition is paused when this many messages wait for its worker,
    /// and resumed when they are down to `shared.resume_at`.
    pub max_queued: usize,
    /// How long in-flight messages may take to finish after a stop.
    pub shutdown_timeout: Duration,
}

impl Runtime {
    /// Consumes until `stop` is cancelled, then lets in-flight batches
    /// finish within the shutdown deadline and commits the watermarks.
    pub async fn run(&self, consumer: &GroupConsumer, stop: &CancellationToken) {
        let mut workers = JoinSet::new();
        let mut tick = tokio::time::interval(STORE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gate = Gate::default();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.store_watermarks(consumer);
                    self.recheck(&mut gate);
                }
                _ = self.shared.drained.notified() => {
                    self.store_watermarks(consumer);
                    self.recheck(&mut gate);
                }
                Some(joined) = workers.join_next(), if !workers.is_empty() => {
                    if let Err(error) = joined {
                        // Its partition stops moving (and /readyz says so)
                        // until a restart or rebalance re-reads it.
                        tracing::error!(%error, "a partition worker failed");
                    }
                }
                message = consumer.recv(), if gate.closed_since.is_none() => match message {
                    Ok(message) => {
                        let backlogged = self.dispatch(consumer, &message, &mut workers, stop);
                        if backlogged && !gate.suspended {
                            gate.closed_since = Some(Instant::now());
                            self.shared.backlogged.store(true, Ordering::Release);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Kafka consume error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }

        // Workers finish the batch they are on; past the deadline they are
        // abandoned, and their messages are read again after a restart.
        let drain = async { while workers.join_next().await.is_some() {} };
        if tokio::time::timeout(self.shutdown_timeout, drain).await.is_err() {
            tracing::warn!(
                timeout_ms = self.shutdown_timeout.as_millis() as u64,
                "shutdown deadline passed; abandoning in-flight messages"
            );
            workers.shutdown().await;
        }
        self.store_watermarks(consumer);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("final offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(%error, "final commit failed"),
        }
    }

    /// Opens a closed gate once the workers caught up (a stalled partition
    /// no longer counts), or once they have not for `STALL_GRACE`, so that
    /// the consumer never stops polling for long (rebalances, librdkafka's
    /// poll interval): then reading goes on until that backlog clears, and
    /// a partition whose queue fills up is paused on its own.
    fn recheck(&self, gate: &mut Gate) {
        let backlogged = self.assignments.backlogged(self.gate_at());
        match gate.closed_since {
            Some(_) if !backlogged => *gate = Gate::default(),
            Some(since) if since.elapsed() >= STALL_GRACE => {
                *gate = Gate { closed_since: None, suspended: true };
            }
            Some(_) => return,
            None => gate.suspended &= backlogged,
        }
        self.shared.backlogged.store(false, Ordering::Release);
    }

    /// The mean queue of moving partitions at which reading stops.
    fn gate_at(&self) -> usize {
        (self.max_queued / 2).max(1)
    }

    /// Hands `message` to its partition's worker, starting one if needed;
    /// true if the workers are now backlogged (see [`Runtime::gate_at`]).
    fn dispatch(
        &self,
        consumer: &GroupConsumer,
        message: &BorrowedMessage<'_>,
        workers: &mut JoinSet<()>,
        stop: &CancellationToken,
    ) -> bool {
        Stats::add(&self.shared.stats.consumed, 1);
        let (topic, partition) = (message.topic(), message.partition());
        let mut slots = self.assignments.lock();
        let index = match slots.iter().position(|s| s.partition == partition && s.topic == topic) {
            Some(index) => index,
            None => {
                let (sender, queue) = mpsc::unbounded_channel();
                let halt = stop.child_token();
                let (slot, progress) = Slot::new(topic, partition, sender, halt.clone());
                workers.spawn(worker::run(self.shared.clone(), queue, progress, halt));
                slots.push(slot);
                slots.len() - 1
            }
        };

        let slot = &mut slots[index];
        if slot.sender.send(message.detach()).is_err() {
            // The worker stopped: the partition is being revoked or the
            // consumer stopping; the record is read again by its next owner.
            return false;
        }
        if slot.enqueued(self.max_queued) {
            let mut paused = TopicPartitionList::new();
            paused.add_partition(topic, partition);
            if let Err(error) = consumer.pause(&paused) {
                tracing::warn!(%error, topic, partition, "pausing a full partition failed");
            }
        }
        backlogged(&slots, self.gate_at())
    }

    /// Stores watermarks that moved (librdkafka commits them in the
    /// background and on revocation) and resumes drained partitions.
    fn store_watermarks(&self, consumer: &GroupConsumer) {
        let (moved, resume) = self.assignments.poll(self.shared.resume_at);
        if moved.count() > 0 {
            self.health.progressed(&moved);
            if let Err(error) = consumer.store_offsets(&moved) {
                tracing::debug!(%error, "storing offsets failed");
            }
            for element in moved.elements() {
                if let Offset::Offset(offset) = element.offset() {
                    tracing::trace!(
                        topic = element.topic(),
                        partition = element.partition(),
                        offset,
                        "watermark stored"
                    );
                }
            }
        }
        if resume.count() > 0
            && let Err(error) = consumer.resume(&resume)
        {
            tracing::warn!(%error, "resuming partitions failed");
        }
    }
}
