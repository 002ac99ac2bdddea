//! The embedded broker: librdkafka's in-process mock cluster.
//!
//! A client configured with `test.mock.num.brokers` starts a mock cluster
//! inside the process and owns it; other clients reach it through its
//! loopback listeners like any broker. It speaks enough of the Kafka
//! protocol for this project (idempotent produce with headers, consumer
//! groups with offset commits), but it is a test double: no persistence, no
//! admin API (topics are made here with [`MockBroker::create_topic`]), one
//! process only. It serves the demo; it is never a deployment target.
//!
//! [`MockBroker`] holds only the owning client, which is `Send`. The mock
//! cluster handle borrowed from it is not, so it is taken afresh inside
//! each method and never kept across an `.await`.

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::bindings::{
    rd_kafka_handle_mock_cluster, rd_kafka_mock_group_initial_rebalance_delay_ms,
};
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaType;

/// A one-broker mock Kafka cluster living in this process; it stops when
/// dropped, so drop it after every client that uses it.
pub struct MockBroker {
    owner: Client<Host>,
}

/// The owning client's context. The owner is no real client: its own
/// connection to the cluster it hosts fails when the cluster stops, which
/// librdkafka reports as errors ("all brokers down"). Those go to debug.
struct Host;

impl ClientContext for Host {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, message, "mock cluster owner");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "mock cluster owner");
    }
}

impl MockBroker {
    /// Starts the cluster, with consumer groups that form at once rather
    /// than after librdkafka's default 3-second initial rebalance delay.
    pub fn start() -> anyhow::Result<Self> {
        let config = ClientConfig::new().set("test.mock.num.brokers", "1").to_owned();
        let native = config.create_native_config().context("mock cluster: client settings")?;
        let owner = Client::new(&config, native, RDKafkaType::RD_KAFKA_PRODUCER, Host)
            .context("mock cluster: cannot create the owning client")?;
        let broker = Self { owner };
        broker.cluster()?;
        broker.join_groups_at_once()?;
        Ok(broker)
    }

    /// The cluster's `bootstrap.servers` (loopback listeners).
    pub fn bootstrap_servers(&self) -> anyhow::Result<String> {
        Ok(self.cluster()?.bootstrap_servers())
    }

    /// Creates `topic` with `partitions` partitions (replication factor 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.cluster()?
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("mock cluster: cannot create topic {topic}"))
    }

    fn cluster(&self) -> anyhow::Result<MockCluster<'_, Host>> {
        self.owner.mock_cluster().context("the client did not start a mock cluster")
    }

    /// Sets the initial rebalance delay of new consumer groups to 0.
    /// rdkafka's wrapper has no method for it, hence the direct call.
    #[allow(unsafe_code)]
    fn join_groups_at_once(&self) -> anyhow::Result<()> {
        // SAFETY: `native_ptr` is the live `rd_kafka_t` owned by
        // `self.owner`, which outlives both calls (it is borrowed for this
        // whole function). `rd_kafka_handle_mock_cluster` only reads the
        // handle; it returns the cluster that handle owns, or null, which
        // is checked before use. The cluster is freed only when the owning
        // handle is destroyed, so it is alive during the second call, which
        // sets one integer under the cluster's own lock.
        let applied = unsafe {
            let cluster = rd_kafka_handle_mock_cluster(self.owner.native_ptr());
            if cluster.is_null() {
                false
            } else {
                rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
                true
            }
        };
        anyhow::ensure!(applied, "the client did not start a mock cluster");
        Ok(())
    }
}
