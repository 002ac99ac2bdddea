//! What a run of the scenario did, and how it is printed.
//!
//! [`Summary`] holds the observed facts (HTTP statuses, the consumer's
//! counters, the rows of its `events` table, the dead-letter topic's
//! headers) next to what the scenario expected of each step, so that
//! [`Summary::surprises`] can say whether the pipeline behaved.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::time::Duration;

use uuid::Uuid;

use crate::kafka::DeadLetter;

/// Where everything ran.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The broker, described.
    pub broker: String,
    /// Whether the broker is the embedded mock cluster (a stand-in).
    pub broker_is_embedded: bool,
    /// The authorization server's issuer identifier.
    pub issuer: String,
    /// Whether the issuer is the development issuer (a stand-in).
    pub issuer_is_stand_in: bool,
    /// The producer's `POST /v1/events` URL.
    pub events_url: String,
    /// The events topic.
    pub topic: String,
    /// The dead-letter topic.
    pub dead_letter_topic: String,
    /// The consumer group.
    pub group: String,
}

/// One `POST /v1/events` and its answer.
#[derive(Debug, Clone)]
pub struct Request {
    /// The user who sent it.
    pub user: String,
    /// The order it is about (its partition key).
    pub order: String,
    /// Its `Idempotency-Key`.
    pub idempotency_key: String,
    /// Whether it repeats an earlier request (a client retry).
    pub retry: bool,
    /// The status the scenario expects.
    pub expected_status: u16,
    /// The status the producer answered.
    pub status: u16,
    /// The message ID of a 202.
    pub message_id: Option<Uuid>,
    /// The problem document's `code` of a refusal.
    pub code: Option<String>,
}

/// A record written straight to the topic, bypassing the producer.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Who wrote it and what is wrong with it.
    pub description: String,
    /// Its message ID.
    pub message_id: Uuid,
    /// Its offset in the topic.
    pub offset: i64,
    /// The dead-letter reason the scenario expects.
    pub expected_reason: String,
}

/// A row of the consumer's `events` table: an effect that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedEvent {
    /// Its message ID.
    pub message_id: Uuid,
    /// Its offset in the topic.
    pub offset: i64,
    /// `order_id` of its data.
    pub order: String,
    /// `sub` of its verified event token.
    pub subject: String,
    /// The user with that subject, when the demo signed them in.
    pub user: Option<String>,
    /// The token's `tenant` claim.
    pub tenant: Option<String>,
    /// The token's `jti` (safe to show; the token itself never is).
    pub token_id: Option<String>,
}

/// The consumer's own counters at the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerCounts {
    /// Records read.
    pub consumed: u64,
    /// Effects that ran and committed.
    pub processed: u64,
    /// Records acknowledged as already processed.
    pub duplicates: u64,
    /// Records written to the dead-letter topic.
    pub dead_lettered: u64,
}

/// Everything one run of the scenario did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Where it ran.
    pub setup: Setup,
    /// The requests to the producer, in order.
    pub requests: Vec<Request>,
    /// The records written straight to the topic, in order.
    pub injected: Vec<Injected>,
    /// Steps left out, and why.
    pub skipped: Vec<String>,
    /// The consumer's counters.
    pub consumer: ConsumerCounts,
    /// The effects that ran, by offset.
    pub processed: Vec<ProcessedEvent>,
    /// The dead-letter topic, in order.
    pub dead_letters: Vec<DeadLetter>,
    /// Wall time of the run, services' start and stop included.
    pub elapsed: Duration,
}

impl Summary {
    /// Requests answered `202 Accepted`.
    pub fn accepted(&self) -> usize {
        self.requests.iter().filter(|r| r.status == 202).count()
    }

    /// Requests the producer refused.
    pub fn refused(&self) -> Vec<&Request> {
        self.requests.iter().filter(|r| r.status != 202).collect()
    }

    /// Distinct message IDs among the accepted requests.
    pub fn accepted_ids(&self) -> BTreeSet<Uuid> {
        self.requests.iter().filter_map(|r| r.message_id).collect()
    }

    /// Records the topic received: accepted requests and injected records.
    pub fn records(&self) -> usize {
        self.accepted() + self.injected.len()
    }

    /// The `dlq_reason` of each dead-lettered record, sorted.
    pub fn dead_letter_reasons(&self) -> Vec<&str> {
        let mut reasons: Vec<&str> = self.dead_letters.iter().map(|d| d.reason.as_str()).collect();
        reasons.sort_unstable();
        reasons
    }

    /// How each step's outcome differs from what the scenario expects;
    /// empty when the pipeline behaved.
    pub fn surprises(&self) -> Vec<String> {
        let mut found = Vec::new();
        for request in &self.requests {
            if request.status != request.expected_status {
                found.push(format!(
                    "{} publishing {}: HTTP {} (expected {})",
                    request.user, request.order, request.status, request.expected_status
                ));
            }
        }
        for retry in self.requests.iter().filter(|r| r.retry && r.message_id.is_some()) {
            let first = self.requests.iter().find(|r| {
                !r.retry && r.idempotency_key == retry.idempotency_key && r.user == retry.user
            });
            if first.and_then(|r| r.message_id) != retry.message_id {
                found.push(format!("the retry of {} got a new message ID", retry.order));
            }
        }

        let accepted = self.accepted_ids();
        let processed: BTreeSet<Uuid> = self.processed.iter().map(|e| e.message_id).collect();
        if processed != accepted || self.processed.len() != accepted.len() {
            found.push(format!(
                "{} effects for {} accepted message IDs",
                self.processed.len(),
                accepted.len()
            ));
        }
        let repeats = (self.accepted() - accepted.len()) as u64;
        if self.consumer.duplicates != repeats {
            found.push(format!(
                "{} duplicates suppressed, expected {repeats}",
                self.consumer.duplicates
            ));
        }
        for record in &self.injected {
            let id = record.message_id.to_string();
            let letter = self.dead_letters.iter().find(|d| d.message_id.as_deref() == Some(&id));
            match letter {
                Some(letter) if letter.reason == record.expected_reason => {}
                Some(letter) => found.push(format!(
                    "record at offset {} dead-lettered as {}, expected {}",
                    record.offset, letter.reason, record.expected_reason
                )),
                None => found.push(format!(
                    "record at offset {} was not dead-lettered (expected {})",
                    record.offset, record.expected_reason
                )),
            }
        }
        if self.dead_letters.len() != self.injected.len() {
            found.push(format!(
                "{} records dead-lettered, expected {}",
                self.dead_letters.len(),
                self.injected.len()
            ));
        }
        found
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let setup = &self.setup;
        writeln!(f, "event-identity demo: the whole pipeline in one process")?;
        writeln!(f)?;
        if setup.broker_is_embedded {
            writeln!(f, "  broker    STAND-IN: {}", setup.broker)?;
            writeln!(
                f,
                "            (a test double in this process; --kafka-bootstrap for Kafka)"
            )?;
        } else {
            writeln!(f, "  broker    {}", setup.broker)?;
        }
        if setup.issuer_is_stand_in {
            writeln!(f, "  issuer    STAND-IN: the development issuer at {}", setup.issuer)?;
            writeln!(
                f,
                "            (test keys shipped in the repository, never deploy it; --issuer \
                 for a real one)"
            )?;
        } else {
            writeln!(f, "  issuer    {}", setup.issuer)?;
        }
        writeln!(f, "  producer  {} (event_identity_producer::Service)", setup.events_url)?;
        writeln!(
            f,
            "  consumer  group {}, SQLite inbox in a temporary directory \
             (event_identity_consumer)",
            setup.group
        )?;
        writeln!(f, "  topics    {} and {}", setup.topic, setup.dead_letter_topic)?;

        writeln!(f)?;
        writeln!(f, "1. Users publish through the producer (POST /v1/events)")?;
        let mut table = Table::new(["user", "order", "Idempotency-Key", "HTTP", "message ID"]);
        for request in &self.requests {
            let key = match request.retry {
                true => format!("{} (retry)", request.idempotency_key),
                false => request.idempotency_key.clone(),
            };
            let status = match &request.code {
                Some(code) => format!("{} {code}", request.status),
                None => request.status.to_string(),
            };
            let id = request.message_id.map(|id| id.to_string()).unwrap_or_else(|| "-".into());
            table.row([request.user.clone(), request.order.clone(), key, status, id]);
        }
        write!(f, "{table}")?;

        writeln!(f)?;
        writeln!(f, "2. Records written straight to {}, bypassing the producer", setup.topic)?;
        let mut table = Table::new(["offset", "message ID", "what"]);
        for record in &self.injected {
            let (offset, id) = (record.offset.to_string(), record.message_id.to_string());
            table.row([offset, id, record.description.clone()]);
        }
        write!(f, "{table}")?;
        for skipped in &self.skipped {
            writeln!(f, "  skipped: {skipped}")?;
        }

        writeln!(f)?;
        writeln!(f, "3. Processed once, with the identity each event token carried")?;
        let mut table = Table::new(["offset", "message ID", "order", "sub", "user", "tenant"]);
        for event in &self.processed {
            table.row([
                event.offset.to_string(),
                event.message_id.to_string(),
                event.order.clone(),
                event.subject.clone(),
                event.user.clone().unwrap_or_else(|| "?".into()),
                event.tenant.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        write!(f, "{table}")?;

        writeln!(f)?;
        writeln!(f, "4. Dead-lettered to {} (dlq_* headers)", setup.dead_letter_topic)?;
        let mut table = Table::new(["source offset", "message ID", "dlq_reason", "dlq_detail"]);
        for letter in &self.dead_letters {
            table.row([
                letter.source_offset.map(|o| o.to_string()).unwrap_or_else(|| "?".into()),
                letter.message_id.clone().unwrap_or_else(|| "-".into()),
                letter.reason.clone(),
                shorten(&letter.detail, 60),
            ]);
        }
        write!(f, "{table}")?;

        writeln!(f)?;
        writeln!(f, "Summary")?;
        let refused = self.refused();
        let refused_detail: Vec<String> = refused
            .iter()
            .map(|r| format!("{} {} ({})", r.status, r.user, r.code.as_deref().unwrap_or("-")))
            .collect();
        let identities: BTreeSet<String> = self
            .processed
            .iter()
            .map(|e| {
                let user = e.user.as_deref().unwrap_or("?");
                let tenant = e.tenant.as_deref().unwrap_or("-");
                format!("{user} (sub {}, tenant {tenant})", e.subject)
            })
            .collect();
        let counts = self.consumer;
        let mut table = Table::plain();
        let distinct = format!("{} distinct message IDs", self.accepted_ids().len());
        table.row(["accepted by the producer (202)".into(), self.accepted().to_string(), distinct]);
        table.row([
            "refused by the producer".into(),
            refused.len().to_string(),
            refused_detail.join(", "),
        ]);
        table.row(["records on the topic".into(), self.records().to_string(), String::new()]);
        table.row([
            "processed once".into(),
            counts.processed.to_string(),
            identities.into_iter().collect::<Vec<_>>().join(", "),
        ]);
        table.row(["duplicates suppressed".into(), counts.duplicates.to_string(), String::new()]);
        table.row([
            "dead-lettered".into(),
            counts.dead_lettered.to_string(),
            self.dead_letters.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>().join(", "),
        ]);
        write!(f, "{table}")?;

        writeln!(f)?;
        let surprises = self.surprises();
        let seconds = self.elapsed.as_secs_f64();
        if surprises.is_empty() {
            writeln!(f, "Every step ended as expected ({seconds:.1} s).")?;
        } else {
            writeln!(f, "UNEXPECTED ({seconds:.1} s):")?;
            for surprise in surprises {
                writeln!(f, "  - {surprise}")?;
            }
        }
        Ok(())
    }
}

/// Text cut to `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A left-aligned text table, indented by two spaces.
struct Table<const N: usize> {
    header: Option<[String; N]>,
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(header: [&str; N]) -> Self {
        Self { header: Some(header.map(str::to_owned)), rows: Vec::new() }
    }

    fn plain() -> Self {
        Self { header: None, rows: Vec::new() }
    }

    fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells);
    }
}

impl<const N: usize> fmt::Display for Table<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = || self.header.iter().chain(&self.rows);
        let mut widths = [0; N];
        for row in all() {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        if self.rows.is_empty() {
            return writeln!(f, "  (none)");
        }
        for row in all() {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(widths) {
                let _ = write!(line, "  {cell:<width$}");
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(["a", "bb"]);
        table.row(["ccc".into(), "d".into()]);
        assert_eq!(table.to_string(), "  a    bb\n  ccc  d\n");
        assert_eq!(Table::new(["x"]).to_string(), "  (none)\n");
    }

    #[test]
    fn shorten_cuts_on_characters() {
        assert_eq!(shorten("héllo", 2), "hé…");
        assert_eq!(shorten("ok", 5), "ok");
    }
}
