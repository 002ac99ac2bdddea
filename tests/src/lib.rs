//! Helpers for the integration tests: the real services' addresses,
//! Keycloak user tokens, fresh topics, and in-process producer and consumer
//! services wired to them.
//!
//! The tests need a Kafka broker and Keycloak with the project's realm, as
//! started by `scripts/kafka.sh start` and `scripts/keycloak.sh start` (the
//! README's test command does both). When a service is missing the tests
//! fail with a message saying which; they never skip.

pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use event_identity_consumer::{ConsumerBuilder, ConsumerConfig, EventConsumer, Stats};
use event_identity_producer::{ProducerConfig, Publisher, Service, ShutdownReport};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Kafka bootstrap address of the test broker.
/// `EI_TEST_KAFKA`, else `127.0.0.1:$EI_KAFKA_PORT` (the scripts' port
/// setting), else `127.0.0.1:19092`.
pub fn kafka_bootstrap() -> String {
    std::env::var("EI_TEST_KAFKA").unwrap_or_else(|_| {
        format!("127.0.0.1:{}", std::env::var("EI_KAFKA_PORT").unwrap_or_else(|_| "19092".into()))
    })
}

/// Base URL of the test Keycloak.
/// `EI_TEST_KEYCLOAK`, else `http://127.0.0.1:$EI_KEYCLOAK_PORT`, else
/// `http://127.0.0.1:18080`.
pub fn keycloak_url() -> String {
    std::env::var("EI_TEST_KEYCLOAK").unwrap_or_else(|_| {
        let port = std::env::var("EI_KEYCLOAK_PORT").unwrap_or_else(|_| "18080".into());
        format!("http://127.0.0.1:{port}")
    })
}

/// The realm's issuer identifier.
pub fn issuer() -> String {
    format!("{}/realms/event-identity", keycloak_url())
}

/// The event type the realm and routes are set up for.
pub const EVENT_TYPE: &str = "com.example.order.created";
/// Its event scope.
pub const EVENT_SCOPE: &str = "events:order.created";
/// The consumers' audience.
pub const CONSUMER_AUDIENCE: &str = "order-consumer";
/// The producer client's configured access-token lifespan, in seconds.
pub const PRODUCER_TOKEN_LIFESPAN_S: i64 = 43_200;

/// Installs a test log subscriber once (respects `RUST_LOG`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,event_identity=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Panics with a clear message unless Kafka and Keycloak answer.
pub async fn require_services() {
    init_logs();
    let discovery = format!("{}/.well-known/openid-configuration", issuer());
    let keycloak = reqwest::get(&discovery).await.map(|r| r.status().is_success());
    let admin = admin();
    let metadata = tokio::task::spawn_blocking(move || {
        admin.inner().fetch_metadata(None, Duration::from_secs(10)).map(|m| m.brokers().len())
    })
    .await
    .unwrap();

    let mut missing = Vec::new();
    if !matches!(keycloak, Ok(true)) {
        missing.push(format!(
            "Keycloak is not serving the event-identity realm at {discovery} ({keycloak:?}); \
             start it with `scripts/keycloak.sh start`"
        ));
    }
    if !matches!(metadata, Ok(n) if n > 0) {
        missing.push(format!(
            "Kafka is not reachable at {} ({metadata:?}); start it with `scripts/kafka.sh start`",
            kafka_bootstrap()
        ));
    }
    assert!(
        missing.is_empty(),
        "{}\n(the tests use EI_KAFKA_PORT and EI_KEYCLOAK_PORT as the scripts do, or \
         EI_TEST_KAFKA and EI_TEST_KEYCLOAK; `scripts/test.sh` starts both services)",
        missing.join("\n")
    );
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().expect("admin client")
}

/// A new, uniquely named topic with `partitions` partitions, and its
/// dead-letter topic.
pub async fn fresh_topic(partitions: i32) -> String {
    fresh_topic_with(partitions, &[]).await
}

/// [`fresh_topic`] with topic `settings` (such as `max.message.bytes`) on
/// the topic itself.
pub async fn fresh_topic_with(partitions: i32, settings: &[(&str, &str)]) -> String {
    let name = format!("test-{}", uuid::Uuid::new_v4().simple());
    create_topic(&name, partitions, settings).await;
    create_topic(&dead_letter_topic(&name), 1, &[]).await;
    name
}

/// Creates topic `name` with `partitions` and topic `settings`.
pub async fn create_topic(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in settings {
        topic = topic.set(key, value);
    }
    let results =
        admin().create_topics([&topic], &AdminOptions::new()).await.expect("create topics");
    for result in results {
        result.expect("topic created");
    }
}

/// The dead-letter topic the test consumers use for `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dead-letter")
}

/// Reads every record currently in `topic`, from the beginning.
pub async fn read_all(topic: &str) -> Vec<OwnedMessage> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("reader");
        let metadata =
            consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let mut expected = 0;
        for p in 0..partitions {
            let (low, high) =
                consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).expect("watermarks");
            expected += high - low;
        }
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (records.len() as i64) < expected && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                records.push(message.detach());
            }
        }
        assert_eq!(records.len() as i64, expected, "could not read all of {topic}");
        records
    })
    .await
    .unwrap()
}

/// How many records `topic` holds.
pub async fn record_count(topic: &str) -> i64 {
    record_count_at(&kafka_bootstrap(), topic).await
}

/// How many records `topic` holds on the broker at `bootstrap`.
pub async fn record_count_at(bootstrap: &str, topic: &str) -> i64 {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "watermarks")
            .create()
            .expect("client");
        let metadata =
            consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
        (0..metadata.topics()[0].partitions().len() as i32)
            .map(|p| {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
                high - low
            })
            .sum()
    })
    .await
    .unwrap()
}

/// A header's value as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The payload of a JWT, decoded without verification (for assertions).
pub fn jwt_payload(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// A user access token from Keycloak by password grant.
pub async fn user_token(client_id: &str, username: &str, password: &str) -> String {
    let url = format!("{}/protocol/openid-connect/token", issuer());
    let response = reqwest::Client::new()
        .post(&url)
        .form(&[
            ("grant_type", "password"),
            ("client_id", client_id),
            ("username", username),
            ("password", password),
            ("scope", "openid orders:write"),
        ])
        .send()
        .await
        .expect("token request");
    let status = response.status();
    let body: Value = response.json().await.expect("token response");
    assert!(status.is_success(), "password grant for {username} failed: {status} {body}");
    body["access_token"].as_str().expect("access_token").to_owned()
}

/// Alice may publish order events.
pub async fn alice_token() -> String {
    user_token("event-api", "alice", "alice-password").await
}

/// Bob may not.
pub async fn bob_token() -> String {
    user_token("event-api", "bob", "bob-password").await
}

/// A running producer service.
pub struct TestProducer {
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// The publisher behind it.
    pub publisher: Arc<Publisher>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<ShutdownReport>>,
}

impl TestProducer {
    /// The URL of the publish endpoint.
    pub fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// Stops it and waits for its flush.
    pub async fn stop(self) -> ShutdownReport {
        self.stop.cancel();
        self.task.await.unwrap().unwrap()
    }

    /// A token that stops the producer when cancelled (as SIGTERM does).
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Producer settings for `topic` against the test services.
pub fn producer_config(topic: &str, extra: &[&str]) -> ProducerConfig {
    let issuer = format!("--issuer={}", issuer());
    let mut args = vec![issuer.as_str()];
    args.extend(extra);
    producer_config_with(topic, &args)
}

/// Producer settings for `topic`; `args` must include `--issuer`.
pub fn producer_config_with(topic: &str, args: &[&str]) -> ProducerConfig {
    let mut all = vec![
        "event-producer".to_owned(),
        "--listen=127.0.0.1:0".into(),
        format!("--kafka-bootstrap={}", kafka_bootstrap()),
        format!("--topic={topic}"),
        "--client-id=event-producer".into(),
        format!(
            "--route=type={EVENT_TYPE},requires=orders:write,scope={EVENT_SCOPE},audience={CONSUMER_AUDIENCE}"
        ),
    ];
    // The client secret, unless the caller authenticates with a key.
    if !args.iter().any(|a| a.starts_with("--client-key-file")) {
        all.push("--client-secret=producer-secret".into());
    }
    all.extend(args.iter().map(|s| s.to_string()));
    <ProducerConfig as clap::Parser>::try_parse_from(all).expect("producer config")
}

/// Starts a producer service with `config`.
pub async fn start_producer(config: ProducerConfig) -> TestProducer {
    let service = Service::bind(config).await.expect("producer starts");
    let addr = service.local_addr();
    let publisher = service.publisher();
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let task = tokio::spawn(service.serve(async move { signal.cancelled().await }));
    TestProducer { addr, publisher, stop, task }
}

/// A running consumer.
pub struct TestConsumer {
    /// Its counters.
    pub stats: Arc<Stats>,
    /// Its inbox database URL.
    pub database_url: String,
    /// Where its `/metrics`, `/healthz` and `/readyz` are served.
    pub ops: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: Arc<tempfile::TempDir>,
}

impl TestConsumer {
    /// Stops it and waits for its final commit.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    /// Rows of the `events` table for `id`: (subject, claims JSON), by
    /// subject.
    pub async fn events_for(&self, id: &str) -> Vec<(String, String)> {
        let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
        let rows = sqlx::query_as(
            "SELECT subject, claims FROM events WHERE message_id = ? ORDER BY subject",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    }

    /// The Kafka offsets of the rows in the `events` table, in order.
    pub async fn processed_offsets(&self) -> Vec<i64> {
        let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT kafka_offset FROM events ORDER BY kafka_offset")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        rows.into_iter().map(|r| r.0).collect()
    }

    /// Rows in the `events` table.
    pub async fn event_count(&self) -> i64 {
        let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM events").fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    }

    /// Waits until `done` holds for the stats, or panics after `timeout`.
    pub async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Stats) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.stats) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", self.stats);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Consumer settings for `topic` against the test broker and `issuer`.
pub fn consumer_config(
    topic: &str,
    database_url: &str,
    issuer: &str,
    extra: &[&str],
) -> ConsumerConfig {
    let mut args = vec![
        "event-consumer".to_owned(),
        format!("--kafka-bootstrap={}", kafka_bootstrap()),
        format!("--group={}", group_of(topic)),
        format!("--topic={topic}"),
        format!("--dead-letter-topic={}", dead_letter_topic(topic)),
        format!("--issuer={issuer}"),
        format!("--audience={CONSUMER_AUDIENCE}"),
        format!("--route=type={EVENT_TYPE},scope={EVENT_SCOPE},claim_equals_field=tenant:tenant"),
        format!("--database-url={database_url}"),
        "--max-retry-backoff-ms=1000".into(),
        "--ops-listen=127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    <ConsumerConfig as clap::Parser>::try_parse_from(args).expect("consumer config")
}

/// Starts a consumer on `topic` with a fresh SQLite inbox, trusting the
/// test Keycloak.
pub async fn start_consumer(topic: &str) -> TestConsumer {
    start_consumer_trusting(topic, &issuer()).await
}

/// Starts a consumer on `topic` with a fresh SQLite inbox, trusting
/// `issuer`.
pub async fn start_consumer_trusting(topic: &str, issuer: &str) -> TestConsumer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    start_consumer_with(topic, issuer, dir, ConsumerBuilder::new).await
}

/// Starts a consumer on `topic` whose inbox is `inbox.db` in `dir` (shared
/// by consumers started with the same `dir`), trusting `issuer`; `build`
/// may add a handler or policies to the builder.
pub async fn start_consumer_with(
    topic: &str,
    issuer: &str,
    dir: Arc<tempfile::TempDir>,
    build: impl FnOnce(ConsumerConfig) -> ConsumerBuilder,
) -> TestConsumer {
    let database_url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
    let config = consumer_config(topic, &database_url, issuer, &[]);
    let consumer: EventConsumer = build(config).build().await.expect("consumer starts");
    let (stats, ops) = (consumer.stats(), consumer.ops_addr());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    TestConsumer { stats, database_url, ops, stop, task, _dir: dir }
}

/// The committed offset of `group` on `topic`'s `partition` (-1001 when
/// none is committed).
pub async fn committed_offset(group: &str, topic: &str, partition: i32) -> i64 {
    use rdkafka::{Offset, TopicPartitionList};
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", &group)
            .create()
            .expect("client");
        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, partition);
        let committed =
            consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed");
        match committed.find_partition(&topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(offset)) => offset,
            _ => -1001,
        }
    })
    .await
    .unwrap()
}

/// The consumer group the test consumers of `topic` join.
pub fn group_of(topic: &str) -> String {
    format!("group-{topic}")
}

/// Writes a record straight to `topic`, as an attacker or a misbehaving
/// producer would: contract headers with `id`, and `authorization` when a
/// token is given.
pub async fn write_record(topic: &str, id: &str, token: Option<&str>, value: &[u8]) {
    write_record_at(topic, 0, id, token, value).await
}

/// [`write_record`] to a given partition.
pub async fn write_record_at(
    topic: &str,
    partition: i32,
    id: &str,
    token: Option<&str>,
    value: &[u8],
) {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let headers = contract_headers(id, authorization.as_deref());
    write_raw_at(topic, partition, &headers, value).await
}

/// The contract headers [`write_record`] sends, for tests that alter them:
/// `ce_source` is `/test-writer`, `authorization` is given whole.
pub fn contract_headers<'a>(
    id: &'a str,
    authorization: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        ("ce_specversion", "1.0"),
        ("ce_id", id),
        ("ce_type", EVENT_TYPE),
        ("ce_source", "/test-writer"),
        ("content-type", "application/json"),
    ];
    headers.extend(authorization.map(|value| ("authorization", value)));
    headers
}

/// Writes one record with exactly `headers` (in order) and the key `test`
/// to partition 0 of `topic`. The writer sends records up to the broker's
/// default limit (about 1 MB), as any producer may.
pub async fn write_raw(topic: &str, headers: &[(&str, &str)], value: &[u8]) {
    write_raw_at(topic, 0, headers, value).await
}

async fn write_raw_at(topic: &str, partition: i32, headers: &[(&str, &str)], value: &[u8]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let writer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("message.max.bytes", "1048576")
        .create()
        .unwrap();
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for &(key, value) in headers {
        owned = owned.insert(Header { key, value: Some(value) });
    }
    let record =
        FutureRecord::to(topic).partition(partition).key("test").payload(value).headers(owned);
    writer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("record written");
}

/// The `n`th message ID of a test: a fixed UUID.
pub fn test_id(n: u32) -> String {
    format!("9f1c0000-0000-7000-8000-{n:012}")
}

/// A development issuer publishing key `k1` (RSA).
pub async fn dev_issuer() -> event_identity::dev_issuer::DevIssuer {
    let issuer = event_identity::dev_issuer::DevIssuer::start().await.expect("dev issuer");
    issuer.add_key("k1", event_identity::dev_issuer::KeyMaterial::Rsa1);
    issuer
}

/// An event token for `subject` from a development issuer's key `k1`:
/// the test route's scope and audience, tenant `acme`, an hour of life.
pub fn dev_event_token(issuer: &event_identity::dev_issuer::DevIssuer, subject: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = now.as_secs() as i64;
    issuer.sign(
        "k1",
        &serde_json::json!({"iss": issuer.issuer(), "sub": subject, "aud": CONSUMER_AUDIENCE,
                "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600}),
    )
}

/// The reason codes of the dead-letter topic of `topic`, by `ce_id`.
pub async fn dead_letter_reasons(topic: &str) -> Vec<(String, String)> {
    let mut reasons: Vec<(String, String)> = read_all(&dead_letter_topic(topic))
        .await
        .iter()
        .map(|m| {
            (header(m, "ce_id").unwrap_or_default(), header(m, "dlq_reason").unwrap_or_default())
        })
        .collect();
    reasons.sort();
    reasons
}

/// Runs `scripts/NAME` with `args` and `env`, panicking with its output if
/// it fails.
pub fn run_script(name: &str, args: &[&str], env: &[(&str, String)]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/").to_owned() + name;
    let output = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("the script runs");
    assert!(
        output.status.success(),
        "{name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The test PostgreSQL server's URL without a database: `EI_TEST_POSTGRES`,
/// else the one `scripts/postgres.sh` starts.
pub fn postgres_server() -> String {
    std::env::var("EI_TEST_POSTGRES").unwrap_or_else(|_| {
        let port = std::env::var("EI_POSTGRES_PORT").unwrap_or_else(|_| "15432".into());
        format!("postgres://events@127.0.0.1:{port}")
    })
}

/// A new, empty database on the test PostgreSQL server; its URL. Panics
/// with a clear message when the server is not there.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection as _;
    let admin_url = format!("{}/postgres", postgres_server());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is not reachable at {admin_url} ({e}); start it with `scripts/postgres.sh start`")
    });
    let name = format!("inbox_{}", uuid::Uuid::new_v4().simple());
    // The name is ours (a UUID), not input: safe to put in the statement.
    let create = sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"));
    sqlx::query(create).execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    format!("{}/{name}", postgres_server())
}
