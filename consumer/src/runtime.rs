//! The consume loop: read, check, process once, dead-letter or retry, and
//! mark the offset done only when the message is settled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_identity::contract::{parse_data, parse_headers};
use event_identity::{Rejection, Verifier, VerifyError};
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetters;
use crate::inbox::{Event, Handler, HandlerError, Inbox, InboxOutcome};
use crate::routes::Routes;

/// Counts of what the consumer did, since it started.
#[derive(Debug, Default)]
pub struct Stats {
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

    fn reject(&self, reason: Rejection) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason.code())
            .or_default() += 1;
    }
}

/// How one message was settled, or why it was not.
enum Settle {
    Done(InboxOutcome),
    Reject(Rejection, String),
    Retry(String),
}

/// Everything the loop needs besides the Kafka consumer.
pub(crate) struct Pipeline {
    pub verifier: Verifier,
    pub routes: Routes,
    pub inbox: Inbox,
    pub handler: Arc<dyn Handler>,
    pub dead_letters: DeadLetters,
    pub max_backoff: Duration,
    pub stats: Arc<Stats>,
}

impl Pipeline {
    /// Reads and settles messages until `stop` is cancelled, then commits
    /// the offsets of settled messages.
    pub async fn run(&self, consumer: &StreamConsumer, stop: &CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                message = consumer.recv() => message,
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "Kafka consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if !self.settle_with_retries(&message, stop).await {
                break;
            }
            // Only now is the message done: its effect is durable, or it is
            // safely in the dead-letter topic.
            if let Err(error) = consumer.store_offset_from_message(&message) {
                tracing::warn!(%error, "storing the offset failed");
            }
        }

        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("final offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(%error, "final commit failed"),
        }
    }

    /// Settles `message`, retrying transient failures with capped backoff.
    /// Returns false if `stop` came first (the message stays unsettled and
    /// will be read again).
    async fn settle_with_retries(
        &self,
        message: &BorrowedMessage<'_>,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let why = match self.settle(message).await {
                Settle::Done(InboxOutcome::Processed) => {
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Settle::Done(InboxOutcome::Duplicate) => {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        partition = message.partition(),
                        offset = message.offset(),
                        "duplicate acknowledged"
                    );
                    return true;
                }
                Settle::Reject(reason, detail) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        reason = reason.code(),
                        %detail,
                        "message rejected"
                    );
                    self.stats.reject(reason);
                    match self.dead_letters.send(message, reason, &detail).await {
                        Ok(()) => {
                            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            return true;
                        }
                        Err(error) => format!("dead-letter write failed: {error}"),
                    }
                }
                Settle::Retry(why) => why,
            };

            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                backoff_ms = backoff.as_millis() as u64,
                reason = %why,
                "transient failure; retrying"
            );
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    async fn settle(&self, message: &BorrowedMessage<'_>) -> Settle {
        let data = match parse_data(message.payload()) {
            Ok(data) => data,
            Err(e) => return Settle::Reject(e.reason, e.detail),
        };
        let pairs: Vec<(&str, Option<&[u8]>)> = message
            .headers()
            .map(|headers| headers.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default();
        let headers = match parse_headers(pairs) {
            Ok(headers) => headers,
            Err(e) => return Settle::Reject(e.reason, e.detail),
        };
        let Some(route) = self.routes.get(&headers.event_type) else {
            return Settle::Reject(
                Rejection::MalformedPayload,
                format!("no route for event type {:?}", headers.event_type),
            );
        };

        let claims = match self.verifier.verify(headers.token.expose()).await {
            Ok(claims) => claims,
            Err(VerifyError::Rejected { reason, detail }) => return Settle::Reject(reason, detail),
            Err(VerifyError::Unavailable(why)) => return Settle::Retry(why),
        };
        if let Err(VerifyError::Rejected { reason, detail }) =
            claims.check_exact_scope(&route.scope)
        {
            return Settle::Reject(reason, detail);
        }
        if let Err(detail) = route.authorize(&claims, &data) {
            return Settle::Reject(Rejection::Forbidden, detail);
        }

        let event = Event {
            id: headers.id,
            event_type: headers.event_type,
            source: headers.source,
            time: headers.time,
            data,
            claims,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        match self.inbox.process(&event, self.handler.as_ref()).await {
            Ok(outcome) => {
                tracing::debug!(
                    event_id = %event.id,
                    partition = event.partition,
                    offset = event.offset,
                    jti = event.claims.token_id.as_deref().unwrap_or("-"),
                    ?outcome,
                    "message settled"
                );
                Settle::Done(outcome)
            }
            Err(HandlerError::Permanent(detail)) => {
                Settle::Reject(Rejection::HandlerRejected, detail)
            }
            Err(HandlerError::Transient(why)) => Settle::Retry(why),
        }
    }
}
