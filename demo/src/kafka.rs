//! The broker of one run, and the two things the demo does with Kafka
//! itself: write a record straight to the topic (as an intruder or a
//! replay would), and read the dead-letter topic back.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_identity::contract::{self, header};
use event_identity_consumer::dead_letter::header as dlq;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::mock_broker::MockBroker;

/// Where the records go.
pub enum Broker {
    /// librdkafka's mock cluster, in this process.
    Embedded(MockBroker),
    /// A real Kafka cluster.
    External {
        /// Its bootstrap servers.
        bootstrap: String,
    },
}

impl Broker {
    /// Starts the mock cluster, or uses `bootstrap`.
    pub fn start(bootstrap: Option<&str>) -> anyhow::Result<Self> {
        match bootstrap {
            Some(bootstrap) => Ok(Self::External { bootstrap: bootstrap.to_owned() }),
            None => Ok(Self::Embedded(MockBroker::start()?)),
        }
    }

    /// The bootstrap servers clients use.
    pub fn bootstrap(&self) -> anyhow::Result<String> {
        match self {
            Self::Embedded(mock) => mock.bootstrap_servers(),
            Self::External { bootstrap } => Ok(bootstrap.clone()),
        }
    }

    /// Creates `topics` with one partition each: with the mock cluster's
    /// own call (its broker has no CreateTopics), else with the admin API.
    pub async fn create_topics(&self, topics: &[&str]) -> anyhow::Result<()> {
        let bootstrap = match self {
            Self::Embedded(mock) => {
                return topics.iter().try_for_each(|topic| mock.create_topic(topic, 1));
            }
            Self::External { bootstrap } => bootstrap,
        };
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .context("--kafka-bootstrap: cannot create an admin client")?;
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))).collect();
        // Without a request timeout an unreachable broker waits forever.
        let options = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(10)))
            .operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new, &options)
            .await
            .with_context(|| format!("--kafka-bootstrap {bootstrap}: cannot create topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}

/// A record written without the producer service: contract headers as a
/// producer would set them, with whatever token its writer has.
pub struct RawRecord<'a> {
    /// The message ID.
    pub id: uuid::Uuid,
    /// The partition key.
    pub key: &'a str,
    /// `ce_source`.
    pub source: &'a str,
    /// The bearer token.
    pub token: &'a str,
    /// The event data.
    pub data: &'a serde_json::Value,
}

/// Writes `record` to `topic`; returns its offset once acknowledged.
pub async fn write_raw(
    bootstrap: &str,
    topic: &str,
    event_type: &str,
    record: &RawRecord<'_>,
) -> anyhow::Result<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .context("cannot create a Kafka producer for the raw records")?;
    let id = record.id.to_string();
    let authorization = format!("Bearer {}", record.token);
    let time = time_now();
    let headers = OwnedHeaders::new()
        .insert(Header { key: header::SPEC_VERSION, value: Some(contract::SPEC_VERSION) })
        .insert(Header { key: header::ID, value: Some(id.as_str()) })
        .insert(Header { key: header::TYPE, value: Some(event_type) })
        .insert(Header { key: header::SOURCE, value: Some(record.source) })
        .insert(Header { key: header::TIME, value: Some(time.as_str()) })
        .insert(Header { key: header::CONTENT_TYPE, value: Some(contract::CONTENT_TYPE) })
        .insert(Header { key: header::AUTHORIZATION, value: Some(authorization.as_str()) });
    let payload = record.data.to_string();
    let sent = FutureRecord::to(topic).key(record.key).payload(&payload).headers(headers);
    let (_, offset) = producer
        .send(sent, Duration::from_secs(10))
        .await
        .map(|delivery| (delivery.partition, delivery.offset))
        .map_err(|(e, _)| e)
        .with_context(|| format!("cannot write a record to {topic}"))?;
    Ok(offset)
}

/// A record read back from the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `dlq_reason`: the rejection's code.
    pub reason: String,
    /// `dlq_detail`.
    pub detail: String,
    /// `dlq_source_offset`: where the rejected record was.
    pub source_offset: Option<i64>,
    /// `ce_id` of the rejected record, when it had one.
    pub message_id: Option<String>,
}

/// Reads the first `count` records of partition 0 of `topic`, waiting at
/// most `timeout` for them.
pub async fn read_dead_letters(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = Vec::with_capacity(count);
    if count == 0 {
        return Ok(letters);
    }
    // Assigned, not subscribed: a reader needs no group.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "event-identity-demo-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("cannot create a Kafka consumer for the dead-letter topic")?;
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Beginning)
        .with_context(|| format!("cannot read {topic}"))?;
    consumer.assign(&partitions).with_context(|| format!("cannot read {topic}"))?;

    let deadline = Instant::now() + timeout;
    while letters.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, consumer.recv()).await {
            Err(_) => anyhow::bail!(
                "read {} of {count} dead-lettered records from {topic} within {} s",
                letters.len(),
                timeout.as_secs()
            ),
            Ok(received) => received.with_context(|| format!("cannot read {topic}"))?,
        };
        let text = |name: &str| -> Option<String> {
            let headers = message.headers()?;
            let found = headers.iter().find(|h| h.key == name)?;
            found.value.map(|v| String::from_utf8_lossy(v).into_owned())
        };
        letters.push(DeadLetter {
            reason: text(dlq::REASON).unwrap_or_default(),
            detail: text(dlq::DETAIL).unwrap_or_default(),
            source_offset: text(dlq::OFFSET).and_then(|o| o.parse().ok()),
            message_id: text(header::ID),
        });
    }
    Ok(letters)
}

fn time_now() -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}
