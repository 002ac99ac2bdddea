//! The scenario: the services started as in production, then a few
//! minutes of an order service's life played in a few seconds.
//!
//! 1. alice, who may publish orders, publishes order-1 (202).
//! 2. Her client did not see the answer and retries with the same
//!    `Idempotency-Key`: the producer publishes it again under the same
//!    message ID (202), and the consumer suppresses the duplicate.
//! 3. alice publishes order-2 (202).
//! 4. bob, who lacks `orders:write`, tries to publish order-3 (403).
//! 5. An intruder with write access to the topic writes a record in
//!    alice's name, with an event token signed by a key the issuer never
//!    published: dead-lettered as `invalid_signature`.
//! 6. A record whose event token expired an hour ago arrives (a replay
//!    from an old backup): dead-lettered as `expired`. This needs the
//!    issuer's signing key, so it runs with the development issuer only.
//!
//! The consumer requires exactly the event scope and that the token's
//! `tenant` claim equals the order's `tenant` field.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use event_identity::Secret;
use event_identity_consumer::{ConsumerBuilder, ConsumerConfig, Inbox, Stats};
use event_identity_producer::{ProducerConfig, Service};
use serde_json::{Value, json};
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::identity::{Intruder, Issuer, User};
use crate::kafka::{self, Broker, RawRecord};
use crate::options::{CONSUMER_AUDIENCE, DemoOptions, EVENT_SCOPE, EVENT_TYPE, USER_SCOPE};
use crate::summary::{ConsumerCounts, Injected, ProcessedEvent, Request, Setup, Summary};

/// The consumer group of the demo's consumer.
const GROUP: &str = "event-identity-demo";
/// Time for a released Kafka client to close: rdkafka joins its poll
/// thread, which wakes every 100 ms, then destroys the client.
const KAFKA_CLIENT_CLOSE: Duration = Duration::from_millis(250);

/// Runs the scenario and reports what happened. Errors name the step or
/// setting that failed; a pipeline that misbehaves is not an error but a
/// [`Summary`] with [`Summary::surprises`].
pub async fn run(options: &DemoOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let http = event_identity::http::client(Duration::from_secs(10));

    // The broker and the authorization server. A real broker gets fresh
    // topics, so that earlier runs do not count.
    let broker = Broker::start(options.kafka_bootstrap.as_deref())?;
    let bootstrap = broker.bootstrap()?;
    let (topic, broker_text) = match &broker {
        Broker::Embedded(_) => {
            ("orders".to_owned(), format!("librdkafka's mock cluster at {bootstrap}"))
        }
        Broker::External { .. } => {
            (format!("demo-orders-{}", Uuid::new_v4().simple()), format!("Kafka at {bootstrap}"))
        }
    };
    let dead_letter_topic = format!("{topic}.dead-letter");
    broker.create_topics(&[&topic, &dead_letter_topic]).await?;
    let issuer = Issuer::start(options, &http).await?;

    // The producer service, as its binary runs it, on a free port.
    let (client_id, client_secret) = issuer.producer_client(options);
    let mut args = vec![
        "event-producer".to_owned(),
        "--listen=127.0.0.1:0".to_owned(),
        format!("--kafka-bootstrap={bootstrap}"),
        format!("--topic={topic}"),
        format!("--issuer={}", issuer.issuer()),
        format!("--client-id={client_id}"),
        format!("--client-secret={}", client_secret.expose()),
        format!(
            "--route=type={EVENT_TYPE},requires={USER_SCOPE},scope={EVENT_SCOPE},\
             audience={CONSUMER_AUDIENCE}"
        ),
        "--linger-ms=0".to_owned(),
        "--shutdown-timeout-ms=5000".to_owned(),
    ];
    if options.allow_plain_http {
        args.push("--allow-plain-http".to_owned());
    }
    let config = ProducerConfig::try_parse_from(args).context("producer settings")?;
    let service = Service::bind(config).await.context("cannot start the producer")?;
    let events_url = format!("http://{}/v1/events", service.local_addr());
    let publisher = Arc::downgrade(&service.publisher());
    let stop_producer = CancellationToken::new();
    let _stop_producer_on_error = stop_producer.clone().drop_guard();
    let signal = stop_producer.clone();
    let producer = tokio::spawn(service.serve(async move { signal.cancelled().await }));

    // The consumer runtime, with its SQLite inbox in a temporary directory.
    let inbox_dir = tempfile::tempdir().context("cannot create a directory for the inbox")?;
    let inbox_path = inbox_dir.path().join("inbox.db");
    let mut args = vec![
        "event-consumer".to_owned(),
        format!("--kafka-bootstrap={bootstrap}"),
        format!("--group={GROUP}"),
        format!("--topic={topic}"),
        format!("--dead-letter-topic={dead_letter_topic}"),
        format!("--issuer={}", issuer.issuer()),
        format!("--audience={CONSUMER_AUDIENCE}"),
        format!("--route=type={EVENT_TYPE},scope={EVENT_SCOPE},claim_equals_field=tenant:tenant"),
        format!("--database-url=sqlite://{}?mode=rwc", inbox_path.display()),
        "--max-retry-backoff-ms=1000".to_owned(),
        "--shutdown-timeout-ms=5000".to_owned(),
    ];
    if options.allow_plain_http {
        args.push("--allow-plain-http".to_owned());
    }
    let config = ConsumerConfig::try_parse_from(args).context("consumer settings")?;
    let consumer =
        ConsumerBuilder::new(config).build().await.context("cannot start the consumer")?;
    let stats = consumer.stats();
    let inbox = consumer.inbox().clone();
    let stop_consumer = CancellationToken::new();
    let _stop_consumer_on_error = stop_consumer.clone().drop_guard();
    let consumer_task = tokio::spawn(consumer.run(stop_consumer.clone()));

    let setup = Setup {
        broker: broker_text,
        broker_is_embedded: matches!(broker, Broker::Embedded(_)),
        issuer: issuer.issuer().to_owned(),
        issuer_is_stand_in: issuer.is_stand_in(),
        events_url,
        topic,
        dead_letter_topic,
        group: GROUP.to_owned(),
    };
    let played = play(options, &http, &issuer, &bootstrap, &setup, &stats, &inbox).await;

    // Stop the services whatever happened, the consumer first so that it
    // commits, then the producer; the broker goes last, when it drops.
    stop_consumer.cancel();
    consumer_task.await.context("the consumer task failed")?;
    stop_producer.cancel();
    let report = producer.await.context("the producer task failed")?.context("producer")?;
    anyhow::ensure!(report.undelivered == 0, "the producer left records undelivered");
    // The producer's readiness probe lets go of the publisher a moment
    // after `serve` returns, and closing its Kafka client (joining
    // rdkafka's 100 ms poll loop) takes a moment more. A client that
    // outlives the mock cluster logs connection errors, so wait for both.
    let deadline = Instant::now() + Duration::from_secs(5);
    while publisher.strong_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Broker::Embedded(_) = broker {
        tokio::time::sleep(KAFKA_CLIENT_CLOSE).await;
    }
    drop(inbox_dir);
    drop(broker);

    let mut summary = played?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Plays the steps against the running services and collects the results.
async fn play(
    options: &DemoOptions,
    http: &reqwest::Client,
    issuer: &Issuer,
    bootstrap: &str,
    setup: &Setup,
    stats: &Arc<Stats>,
    inbox: &Inbox,
) -> anyhow::Result<Summary> {
    let writer = issuer.sign_in(&options.writer, options, http).await?;
    let reader = issuer.sign_in(&options.reader, options, http).await?;
    let publish = |user: &User, order: &str, retry: bool, expected_status: u16| {
        let api = ProducerApi { http, url: &setup.events_url, tenant: &options.tenant };
        let (username, token) = (user.username.clone(), user.token.clone());
        let order = order.to_owned();
        async move { api.publish(username, &token, order, retry, expected_status).await }
    };

    // Steps 1 to 4: through the producer.
    let requests = vec![
        publish(&writer, "order-1", false, 202).await?,
        publish(&writer, "order-1", true, 202).await?,
        publish(&writer, "order-2", false, 202).await?,
        publish(&reader, "order-3", false, 403).await?,
    ];

    // Steps 5 and 6: straight to the topic.
    let mut injected = Vec::new();
    let mut skipped = Vec::new();
    let intruder = Intruder::new().await?;
    let forged = intruder.forge_event_token(issuer.issuer(), &writer);
    let data = order_data("order-666", &options.tenant, 9_999_900);
    let record = RawRecord {
        id: Uuid::now_v7(),
        key: "order-666",
        source: "/intruder",
        token: forged.expose(),
        data: &data,
    };
    let offset = kafka::write_raw(bootstrap, &setup.topic, EVENT_TYPE, &record).await?;
    injected.push(Injected {
        description: format!(
            "forged in {}'s name: the issuer's kid, signed with an unpublished key",
            writer.username
        ),
        message_id: record.id,
        offset,
        expected_reason: "invalid_signature".to_owned(),
    });
    match issuer.expired_event_token(&writer) {
        Some(expired) => {
            let data = order_data("order-0", &options.tenant, 1_000);
            let record = RawRecord {
                id: Uuid::now_v7(),
                key: "order-0",
                source: "/event-producer",
                token: expired.expose(),
                data: &data,
            };
            let offset = kafka::write_raw(bootstrap, &setup.topic, EVENT_TYPE, &record).await?;
            injected.push(Injected {
                description: format!(
                    "replayed: {}'s genuine event token, expired an hour ago",
                    writer.username
                ),
                message_id: record.id,
                offset,
                expected_reason: "expired".to_owned(),
            });
        }
        None => skipped.push(
            "the expired-token record: it needs the issuer's signing key, which only the \
             development issuer lends"
                .to_owned(),
        ),
    }

    // Wait until the consumer has settled every record on the topic.
    let accepted = requests.iter().filter(|r| r.status == 202).count();
    let expected = (accepted + injected.len()) as u64;
    let timeout = Duration::from_millis(options.settle_timeout_ms);
    let deadline = Instant::now() + timeout;
    while stats.settled() < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer settled {} of {expected} records within {} s \
             (RUST_LOG=info shows why)",
            stats.settled(),
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let consumer = ConsumerCounts {
        consumed: stats.consumed.load(Ordering::Relaxed),
        processed: stats.processed.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
    };

    // What the effects and the dead-letter topic hold.
    let processed = processed_events(inbox, &[&writer, &reader]).await?;
    let dead_letters = kafka::read_dead_letters(
        bootstrap,
        &setup.dead_letter_topic,
        consumer.dead_lettered as usize,
        timeout,
    )
    .await?;

    Ok(Summary {
        setup: setup.clone(),
        requests,
        injected,
        skipped,
        consumer,
        processed,
        dead_letters,
        elapsed: Duration::ZERO,
    })
}

/// An order's event data.
fn order_data(order: &str, tenant: &str, total_cents: u64) -> Value {
    json!({"order_id": order, "tenant": tenant, "total_cents": total_cents})
}

/// The producer's HTTP API, as a client application calls it.
struct ProducerApi<'a> {
    http: &'a reqwest::Client,
    url: &'a str,
    tenant: &'a str,
}

impl ProducerApi<'_> {
    /// Publishes `order` as the user holding `token`, with the order's ID
    /// as the `Idempotency-Key`.
    async fn publish(
        &self,
        user: String,
        token: &Secret,
        order: String,
        retry: bool,
        expected_status: u16,
    ) -> anyhow::Result<Request> {
        let body = json!({
            "type": EVENT_TYPE,
            "key": order,
            "data": order_data(&order, self.tenant, 4_200),
        });
        let response = self
            .http
            .post(self.url)
            .bearer_auth(token.expose())
            .header("Idempotency-Key", &order)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {} for {user}", self.url))?;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        let text = |name: &str| answer.get(name).and_then(Value::as_str).map(str::to_owned);
        let message_id = match status {
            202 => Some(
                text("id")
                    .and_then(|id| Uuid::parse_str(&id).ok())
                    .with_context(|| format!("a 202 for {user} without a message ID"))?,
            ),
            _ => None,
        };
        Ok(Request {
            user,
            idempotency_key: order.clone(),
            order,
            retry,
            expected_status,
            status,
            message_id,
            code: text("code"),
        })
    }
}

/// The rows of the consumer's `events` table, by offset, with the user
/// each subject belongs to.
async fn processed_events(inbox: &Inbox, users: &[&User]) -> anyhow::Result<Vec<ProcessedEvent>> {
    let rows = sqlx::query(
        "SELECT message_id, subject, token_id, claims, data, kafka_offset
         FROM events ORDER BY kafka_offset",
    )
    .fetch_all(inbox.pool())
    .await
    .context("cannot read the consumer's events table")?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let text = |name: &str| row.try_get::<String, _>(name);
        let claims: Value = serde_json::from_str(&text("claims")?).unwrap_or(Value::Null);
        let data: Value = serde_json::from_str(&text("data")?).unwrap_or(Value::Null);
        let subject = text("subject")?;
        events.push(ProcessedEvent {
            message_id: Uuid::parse_str(&text("message_id")?)
                .context("a message ID in the events table is not a UUID")?,
            offset: row.try_get("kafka_offset")?,
            order: data["order_id"].as_str().unwrap_or("?").to_owned(),
            user: users.iter().find(|u| u.subject == subject).map(|u| u.username.clone()),
            subject,
            tenant: claims["tenant"].as_str().map(str::to_owned),
            token_id: row.try_get::<Option<String>, _>("token_id")?,
        });
    }
    Ok(events)
}
