//! One partition's worker: takes the messages queued for its partition in
//! order, in batches, and settles each batch before reporting its
//! watermark.
//!
//! Settling a message means its effect is durable (or it was a duplicate),
//! or it is acknowledged in the dead-letter topic. Token and payload checks
//! run first; a transient failure of a check (the issuer's keys cannot be
//! fetched) first settles the messages before it, then is retried in place
//! with capped backoff, so nothing after it overtakes it. The accepted
//! messages of a batch go through the inbox in one transaction when the
//! handler allows it; if the handler refuses one of them, the batch is
//! rolled back and its messages are settled one at a time, so only the
//! refused one is dead-lettered.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_identity::contract::{bearer_token, parse_data, parse_headers};
use event_identity::secret::fingerprint;
use event_identity::{Rejection, Verifier, VerifyError};
use futures_util::FutureExt as _;
use futures_util::future::join_all;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::Message as _;
use rdkafka::message::OwnedMessage;
use sqlx::AnyConnection;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetters, HeaderPairs, read_headers};
use crate::inbox::{Event, Handler, HandlerError, HandlerFuture, Inbox, InboxOutcome};
use crate::partitions::Progress;
use crate::routes::Routes;
use crate::stats::Stats;

/// Everything a worker needs, shared by all partitions.
pub(crate) struct Shared {
    pub verifier: Verifier,
    pub routes: Routes,
    pub inbox: Inbox,
    pub handler: Arc<dyn Handler>,
    pub dead_letters: DeadLetters,
    pub max_backoff: Duration,
    pub batch_size: usize,
    /// A paused partition is resumed when its queue is down to this.
    pub resume_at: usize,
    /// Woken when a paused partition's queue is down to `resume_at`, so
    /// the consume loop resumes it at once, and after every settled batch
    /// while the consume loop waits for the workers (`backlogged`).
    pub drained: Notify,
    /// Set while the consume loop has stopped reading because the workers'
    /// queues are half full on average.
    pub backlogged: AtomicBool,
    pub stats: Arc<Stats>,
    /// Seconds per token verification (cache hits included).
    pub verification_seconds: Histogram,
    /// Seconds per handler call, inside the inbox transaction.
    pub handler_seconds: Histogram,
}

/// What the checks decided about one message.
enum Verdict {
    Accept(Box<Event>),
    Reject(Rejection, String),
}

/// A check's result: a verdict, or a transient failure to retry.
enum Check {
    Ready(Verdict),
    Retry(String),
}

/// Settles the messages of one partition until its queue closes or `halt`
/// is cancelled (revocation or shutdown). A batch in progress finishes
/// unless it is waiting out a transient failure.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<OwnedMessage>,
    progress: Arc<Progress>,
    halt: CancellationToken,
) {
    let mut batch = Vec::with_capacity(shared.batch_size);
    loop {
        let received = tokio::select! {
            biased;
            _ = halt.cancelled() => return,
            received = queue.recv_many(&mut batch, shared.batch_size) => received,
        };
        if received == 0 {
            return;
        }

        match shared.settle_batch(&batch, &halt).await {
            Some(next_offset) => {
                progress.settled(next_offset, received);
                let resumable = progress.paused() && progress.queued() <= shared.resume_at;
                if resumable || shared.backlogged.load(Ordering::Acquire) {
                    shared.drained.notify_one();
                }
            }
            None => {
                progress.abandoned(received);
                return;
            }
        }
        batch.clear();
    }
}

impl Shared {
    /// Settles `batch` in order and returns the next offset to read, or
    /// `None` if `halt` came while waiting out a failure.
    async fn settle_batch(&self, batch: &[OwnedMessage], halt: &CancellationToken) -> Option<i64> {
        let mut ready = Vec::with_capacity(batch.len());
        for message in batch {
            let verdict = match self.check(message).await {
                Check::Ready(verdict) => verdict,
                Check::Retry(why) => {
                    // Settle what came before, then wait here until this
                    // message can be checked.
                    self.flush(std::mem::take(&mut ready), halt).await?;
                    self.check_until_ready(message, why, halt).await?
                }
            };
            ready.push((message, verdict));
        }
        self.flush(ready, halt).await?;
        Some(batch.last()?.offset() + 1)
    }

    async fn check_until_ready(
        &self,
        message: &OwnedMessage,
        mut why: String,
        halt: &CancellationToken,
    ) -> Option<Verdict> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            self.wait(&mut backoff, message, &why, halt).await?;
            match self.check(message).await {
                Check::Ready(verdict) => return Some(verdict),
                Check::Retry(again) => why = again,
            }
        }
    }

    /// Counts a retry, logs it, and sleeps for the next backoff step;
    /// `None` if `halt` comes first.
    async fn wait(
        &self,
        backoff: &mut Backoff,
        message: &OwnedMessage,
        why: &str,
        halt: &CancellationToken,
    ) -> Option<()> {
        let delay = backoff.next();
        Stats::add(&self.stats.retries, 1);
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            backoff_ms = delay.as_millis() as u64,
            reason = why,
            "transient failure; retrying"
        );
        tokio::select! {
            _ = halt.cancelled() => None,
            _ = tokio::time::sleep(delay) => Some(()),
        }
    }

    /// Parses, verifies and authorizes one message.
    async fn check(&self, message: &OwnedMessage) -> Check {
        let reject = |reason, detail| Check::Ready(Verdict::Reject(reason, detail));

        let (data_text, data) = match parse_data(message.payload()) {
            Ok(parsed) => parsed,
            Err(e) => return reject(e.reason, e.detail),
        };
        let Some(pairs) = header_pairs(message) else {
            let detail = "a header name is not UTF-8".to_owned();
            return reject(Rejection::MalformedPayload, detail);
        };
        let headers = match parse_headers(pairs) {
            Ok(headers) => headers,
            Err(e) => return reject(e.reason, e.detail),
        };
        let Some(route) = self.routes.get(&headers.event_type) else {
            let detail = format!("no route for event type {:?}", headers.event_type);
            return reject(Rejection::MalformedPayload, detail);
        };

        let started = Instant::now();
        let verified = self.verifier.verify(headers.token.expose()).await;
        self.verification_seconds.observe(started.elapsed().as_secs_f64());
        let claims = match verified {
            Ok(claims) => claims,
            Err(VerifyError::Rejected { reason, detail }) => return reject(reason, detail),
            Err(VerifyError::Unavailable(why)) => return Check::Retry(why),
        };
        if let Err(VerifyError::Rejected { reason, detail }) =
            claims.check_exact_scope(&route.scope)
        {
            return reject(reason, detail);
        }
        if let Err(detail) = route.authorize(&claims, &data) {
            return reject(Rejection::Forbidden, detail);
        }

        Check::Ready(Verdict::Accept(Box::new(Event {
            id: headers.id,
            event_type: headers.event_type,
            source: headers.source,
            time: headers.time,
            data,
            data_text: data_text.to_owned(),
            claims,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        })))
    }

    /// Settles checked messages: rejected ones to the dead-letter topic,
    /// accepted ones through the inbox.
    async fn flush(
        &self,
        ready: Vec<(&OwnedMessage, Verdict)>,
        halt: &CancellationToken,
    ) -> Option<()> {
        let mut rejected = Vec::new();
        let mut accepted = Vec::new();
        for (message, verdict) in ready {
            match verdict {
                Verdict::Accept(event) => accepted.push((message, event)),
                Verdict::Reject(reason, detail) => rejected.push((message, reason, detail)),
            }
        }
        self.dead_letter(&rejected, halt).await?;
        self.apply(&accepted, halt).await
    }

    /// Writes rejected messages to the dead-letter topic, retrying failed
    /// writes, and returns once the broker has acknowledged all of them.
    async fn dead_letter(
        &self,
        rejected: &[(&OwnedMessage, Rejection, String)],
        halt: &CancellationToken,
    ) -> Option<()> {
        for (message, reason, detail) in rejected {
            let (event_id, kid, token) = identifiers(message);
            tracing::warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                event_id,
                kid,
                token_sha256 = token,
                reason = reason.code(),
                detail = detail.as_str(),
                "message rejected"
            );
            self.stats.reject(*reason);
        }

        let mut pending: Vec<_> = rejected.iter().collect();
        let mut backoff = Backoff::new(self.max_backoff);
        while let Some((first, _, _)) = pending.first() {
            let sends = pending.iter().map(|(m, r, d)| self.dead_letters.send(m, *r, d));
            let results = join_all(sends).await;
            let mut failure = None;
            let mut still = Vec::new();
            for (entry, result) in pending.iter().zip(results) {
                match result {
                    Ok(()) => Stats::add(&self.stats.dead_lettered, 1),
                    Err(error) => {
                        failure = Some(error);
                        still.push(*entry);
                    }
                }
            }
            if let Some(error) = failure {
                let why = format!("dead-letter write failed: {error}");
                self.wait(&mut backoff, first, &why, halt).await?;
            }
            pending = still;
        }
        Some(())
    }

    /// Applies accepted events' effects through the inbox: as one
    /// transaction when the handler allows it, else (or when the handler
    /// refuses one) one by one.
    async fn apply(
        &self,
        accepted: &[(&OwnedMessage, Box<Event>)],
        halt: &CancellationToken,
    ) -> Option<()> {
        if accepted.len() > 1 && self.handler.batched() {
            let events: Vec<&Event> = accepted.iter().map(|(_, e)| e.as_ref()).collect();
            let mut backoff = Backoff::new(self.max_backoff);
            loop {
                let handler = Timed(self);
                let result = self.guarded(self.inbox.process_batch(&events, &handler));
                match result.await {
                    Ok(outcomes) => {
                        for (event, outcome) in events.iter().zip(outcomes) {
                            self.count(event, outcome);
                        }
                        return Some(());
                    }
                    // Find the refused one by settling them one at a time.
                    Err(HandlerError::Permanent(_)) => break,
                    Err(HandlerError::Transient(why)) => {
                        self.wait(&mut backoff, accepted[0].0, &why, halt).await?;
                    }
                }
            }
        }

        for (message, event) in accepted {
            self.apply_one(message, event, halt).await?;
        }
        Some(())
    }

    async fn apply_one(
        &self,
        message: &OwnedMessage,
        event: &Event,
        halt: &CancellationToken,
    ) -> Option<()> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            match self.guarded(self.inbox.process(event, &Timed(self))).await {
                Ok(outcome) => {
                    self.count(event, outcome);
                    return Some(());
                }
                Err(HandlerError::Permanent(detail)) => {
                    let rejected = [(message, Rejection::HandlerRejected, detail)];
                    return self.dead_letter(&rejected, halt).await;
                }
                Err(HandlerError::Transient(why)) => {
                    self.wait(&mut backoff, message, &why, halt).await?;
                }
            }
        }
    }

    /// Turns a panic in the handler into a transient failure, so that the
    /// message is retried in place rather than lost with its worker.
    async fn guarded<T>(
        &self,
        work: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, HandlerError> {
        match AssertUnwindSafe(work).catch_unwind().await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::Transient("the handler panicked".to_owned())),
        }
    }

    fn count(&self, event: &Event, outcome: InboxOutcome) {
        let counter = match outcome {
            InboxOutcome::Processed => &self.stats.processed,
            InboxOutcome::Duplicate => &self.stats.duplicates,
        };
        Stats::add(counter, 1);
        tracing::debug!(
            event_id = %event.id,
            partition = event.partition,
            offset = event.offset,
            jti = event.claims.token_id.as_deref().unwrap_or("-"),
            ?outcome,
            "message settled"
        );
    }
}

/// The record's headers as (name, value) pairs, or `None` when a name is
/// not UTF-8 (such a record is refused rather than read in part).
fn header_pairs(message: &OwnedMessage) -> Option<HeaderPairs<'_>> {
    let (pairs, unreadable) = read_headers(message);
    (!unreadable).then_some(pairs)
}

/// What a rejection's log line may name about a record: its `ce_id`, the
/// `kid` its token claims, and a short hash of the token (never the token),
/// each `-` when absent. None of them is verified.
fn identifiers(message: &OwnedMessage) -> (String, String, String) {
    let pairs = header_pairs(message).unwrap_or_default();
    let header = |name: &str| {
        let value = pairs.iter().find(|(key, _)| key.eq_ignore_ascii_case(name))?.1?;
        Some(String::from_utf8_lossy(value).into_owned())
    };
    let id = header("ce_id").map(|id| id.chars().take(64).collect());
    let token = header("authorization").and_then(|v| bearer_token(&v).map(str::to_owned));
    let kid = token.as_deref().and_then(|t| jsonwebtoken::decode_header(t).ok()?.kid);
    let kid = kid.map(|kid| kid.chars().take(64).collect());
    let hash = token.as_deref().map(fingerprint);
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    (or_dash(id), or_dash(kid), or_dash(hash))
}

/// The configured handler, timed into `handler_seconds`.
struct Timed<'a>(&'a Shared);

impl Handler for Timed<'_> {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.0.handler.handle(event, tx).await;
            self.0.handler_seconds.observe(started.elapsed().as_secs_f64());
            result
        })
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [&'a Event],
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.0.handler.handle_batch(events, tx).await;
            // One observation per event, of its share of the batch's time.
            let each = started.elapsed().as_secs_f64() / events.len().max(1) as f64;
            for _ in events {
                self.0.handler_seconds.observe(each);
            }
            result
        })
    }
}

/// Doubling delays from 100 ms up to a cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: Duration::from_millis(100).min(max), max }
    }

    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}
