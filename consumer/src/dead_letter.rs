//! The dead-letter topic: where permanently rejected messages go, with
//! why and where they came from, so that no bad message blocks its
//! partition and none is lost.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use event_identity::Rejection;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Headers added to a dead-lettered record. The original key, value and
/// headers are kept, except headers whose names start with `dlq_`: those
/// are this topic's own, so a record arriving with them (a forgery, or a
/// dead letter replayed into a consumed topic) loses them.
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
    /// What of the original was left out, when something had to be:
    /// `headers` (names that are not UTF-8 cannot be copied), `value` or
    /// `value,key,headers` (the copy was too large for the dead-letter
    /// topic; the original stays at its source offset).
    pub const OMITTED: &str = "dlq_omitted";
    /// The prefix reserved for these headers.
    pub const PREFIX: &str = "dlq_";
}

/// Longest detail written to a header.
const MAX_DETAIL: usize = 512;

/// Largest dead-letter record this client sends; the topic's own limit
/// (`max.message.bytes`) may be lower, and then the broker refuses it.
const MAX_RECORD_BYTES: &str = "16777216";

/// How much of the original a dead-letter record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// Key, value and headers.
    Whole,
    /// Key and headers: the value did not fit.
    WithoutValue,
    /// Only the dead-letter headers: not even that fitted.
    Bare,
}

impl Carried {
    /// The next smaller copy, if there is one.
    fn smaller(self) -> Option<Self> {
        match self {
            Self::Whole => Some(Self::WithoutValue),
            Self::WithoutValue => Some(Self::Bare),
            Self::Bare => None,
        }
    }
}

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
            .set("message.max.bytes", MAX_RECORD_BYTES)
            // The topic's size limit applies to a whole batch: one record
            // per batch, so that a copy too large is refused alone.
            .set("batch.num.messages", "1")
            .create()?;
        Ok(Self { producer, topic: topic.to_owned(), group: group.to_owned() })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Asks the broker for the topic until it is there or `timeout` has
    /// passed (a broker that creates topics on first use creates it on the
    /// first request): better to fail at start than at the first rejected
    /// record, whose partition would wait behind it.
    pub async fn check_topic(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let producer = self.producer.clone();
            let topic = self.topic.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let metadata = producer.client().fetch_metadata(Some(&topic), timeout);
                let metadata = metadata.map_err(|e| format!("no metadata for {topic:?}: {e}"))?;
                Ok::<_, String>(metadata.topics().first().and_then(|t| t.error()))
            });
            let code = match answer.await.map_err(|e| e.to_string())?? {
                None => return Ok(()),
                Some(error) => RDKafkaErrorCode::from(error),
            };
            let pending = matches!(
                code,
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::LeaderNotAvailable
            );
            if !pending || tokio::time::Instant::now() >= deadline {
                return Err(format!("topic {:?} cannot be written: {code}", self.topic));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Writes `message` with its reason; returns once the broker has
    /// acknowledged it. A copy too large for the topic is sent again
    /// without the value, then with the dead-letter headers alone.
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
        let (original, unreadable) = original_headers(message);
        let mut carried = Carried::Whole;
        loop {
            let omitted = match carried {
                Carried::Whole if unreadable => Some("headers"),
                Carried::Whole => None,
                Carried::WithoutValue if unreadable => Some("value,headers"),
                Carried::WithoutValue => Some("value"),
                Carried::Bare => Some("value,key,headers"),
            };
            let mut headers = OwnedHeaders::new_with_capacity(original.len() + 8);
            if carried != Carried::Bare {
                for (name, value) in &original {
                    headers = headers.insert(Header { key: name, value: *value });
                }
            }
            let headers = self.dead_letter_headers(headers, message, reason, &detail, omitted);
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let (Some(key), false) = (message.key(), carried == Carried::Bare) {
                record = record.key(key);
            }
            if let (Some(value), Carried::Whole) = (message.payload(), carried) {
                record = record.payload(value);
            }
            let Err((error, _)) = self.producer.send(record, Duration::from_secs(30)).await else {
                return Ok(());
            };
            let too_large = matches!(
                error,
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
            );
            match (too_large, carried.smaller()) {
                (true, Some(smaller)) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        dead_letter_topic = %self.topic,
                        "dead-letter copy too large; sending less of the original"
                    );
                    carried = smaller;
                }
                _ => return Err(error),
            }
        }
    }

    fn dead_letter_headers(
        &self,
        headers: OwnedHeaders,
        message: &OwnedMessage,
        reason: Rejection,
        detail: &str,
        omitted: Option<&str>,
    ) -> OwnedHeaders {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let headers = headers
            .insert(Header { key: header::REASON, value: Some(reason.code()) })
            .insert(Header { key: header::DETAIL, value: Some(detail) })
            .insert(Header { key: header::TOPIC, value: Some(message.topic()) })
            .insert(Header { key: header::PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: header::OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: header::GROUP, value: Some(self.group.as_str()) })
            .insert(Header { key: header::TIME, value: Some(time.as_str()) });
        match omitted {
            Some(omitted) => headers.insert(Header { key: header::OMITTED, value: Some(omitted) }),
            None => headers,
        }
    }
}

/// Header names and values, in record order.
pub(crate) type HeaderPairs<'a> = Vec<(&'a str, Option<&'a [u8]>)>;

/// The record's headers as (name, value) pairs, and whether some could not
/// be read: rdkafka's accessor panics on a name that is not UTF-8, so each
/// is read under `catch_unwind` and such headers are left out.
pub(crate) fn read_headers(message: &OwnedMessage) -> (HeaderPairs<'_>, bool) {
    let Some(headers) = message.headers() else { return (Vec::new(), false) };
    let mut pairs = Vec::with_capacity(headers.count());
    let mut unreadable = false;
    for index in 0..headers.count() {
        match std::panic::catch_unwind(AssertUnwindSafe(|| headers.try_get(index))) {
            Ok(Some(h)) => pairs.push((h.key, h.value)),
            Ok(None) => {}
            Err(_) => unreadable = true,
        }
    }
    (pairs, unreadable)
}

/// The original headers to copy: the readable ones except the reserved
/// `dlq_*` names, and whether some could not be read.
fn original_headers(message: &OwnedMessage) -> (HeaderPairs<'_>, bool) {
    let (mut pairs, unreadable) = read_headers(message);
    pairs.retain(|(name, _)| !is_reserved(name));
    (pairs, unreadable)
}

fn is_reserved(name: &str) -> bool {
    name.get(..header::PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(header::PREFIX))
}
