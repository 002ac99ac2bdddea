//! The dead-letter topic: where permanently rejected messages go, with
//! why and where they came from, so that no bad message blocks its
//! partition and none is lost.

use std::time::Duration;

use event_identity::Rejection;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Headers added to a dead-lettered record (the original headers, key and
/// value are kept as they were).
pub mod header {
    /// The rejection's reason code.
    pub const REASON: &str = "dlq_reason";
    /// A short human-readable detail.
    pub const DETAIL: &str = "dlq_detail";
    /// Source topic.
    pub const TOPIC: &str = "dlq_source_topic";
    /// Source partition.
    pub const PARTITION: &str = "dlq_source_partition";
    /// Source offset.
    pub const OFFSET: &str = "dlq_source_offset";
    /// The consumer group that rejected it.
    pub const GROUP: &str = "dlq_group";
    /// When it was rejected (RFC 3339).
    pub const TIME: &str = "dlq_time";
}

/// Longest detail written to a header.
const MAX_DETAIL: usize = 512;

/// Writes rejected records to the dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    group: String,
}

impl DeadLetters {
    /// A writer to `topic` through `bootstrap`, for `group`.
    pub fn new(bootstrap: &str, topic: &str, group: &str) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { producer, topic: topic.to_owned(), group: group.to_owned() })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `message` with its reason; returns once the broker has
    /// acknowledged it.
    pub async fn send(
        &self,
        message: &OwnedMessage,
        reason: Rejection,
        detail: &str,
    ) -> Result<(), KafkaError> {
        let mut detail = detail.to_owned();
        if detail.len() > MAX_DETAIL {
            let cut = (0..=MAX_DETAIL).rev().find(|i| detail.is_char_boundary(*i)).unwrap_or(0);
            detail.truncate(cut);
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();

        // A copy of the original headers, made by librdkafka: header names
        // need not be UTF-8 to survive.
        let headers = message.headers().cloned().unwrap_or_default();
        let headers = headers
            .insert(Header { key: header::REASON, value: Some(reason.code()) })
            .insert(Header { key: header::DETAIL, value: Some(detail.as_str()) })
            .insert(Header { key: header::TOPIC, value: Some(message.topic()) })
            .insert(Header { key: header::PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: header::OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: header::GROUP, value: Some(self.group.as_str()) })
            .insert(Header { key: header::TIME, value: Some(time.as_str()) });

        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}
