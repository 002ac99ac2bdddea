//! Producer requests that must get a final answer rather than an
//! invitation to retry, and Idempotency-Keys that must not merge events.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::DevIssuer;
use event_identity_consumer::ConsumerBuilder;
use event_identity_tests::*;
use serde_json::{Value, json};

fn user_token(issuer: &DevIssuer) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    issuer.sign(
        "k1",
        &json!({
            "iss": issuer.issuer(), "sub": "user-1", "aud": "event-producer",
            "scope": "openid orders:write", "tenant": "acme", "iat": now, "exp": now + 300,
        }),
    )
}

/// A body within `--max-body-bytes` that the topic cannot take (its
/// `max.message.bytes` is lower) can never be published: 413, no
/// `Retry-After`, nothing on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_the_topic_takes_is_413_not_503() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic_with(1, &[("max.message.bytes", "20000")]).await;
    let producer =
        start_producer(producer_config_with(&topic, &[&format!("--issuer={}", issuer.issuer())]))
            .await;

    let post = |blob: String| {
        reqwest::Client::new()
            .post(producer.events_url())
            .bearer_auth(user_token(&issuer))
            .timeout(Duration::from_secs(30))
            .json(&json!({"type": EVENT_TYPE, "key": "o-1", "data": {"tenant": "acme", "blob": blob}}))
            .send()
    };
    let response = post("x".repeat(60_000)).await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap();
    assert_eq!((status, retry_after), (413, None), "{body}");
    // The same client with a small body is fine.
    assert_eq!(post("x".repeat(100)).await.unwrap().status().as_u16(), 202);
    producer.stop().await;
    assert_eq!(record_count(&topic).await, 1);
}

/// A client that uses its entity ID as the Idempotency-Key of two event
/// types (created, then cancelled) gets two message IDs, and both events
/// take effect; a retry of either keeps its ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_for_two_event_types_gives_two_events() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    const CANCELLED: &str = "com.example.order.cancelled";
    let args = [
        format!("--issuer={}", issuer.issuer()),
        format!(
            "--route=type={CANCELLED},requires=orders:write,scope=events:order.cancelled,audience={CONSUMER_AUDIENCE}"
        ),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let producer = start_producer(producer_config_with(&topic, &args)).await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        config
            .routes
            .push(format!("type={CANCELLED},scope=events:order.cancelled").parse().unwrap());
        ConsumerBuilder::new(config)
    })
    .await;

    let token = user_token(&issuer);
    let mut ids = Vec::new();
    for event_type in [EVENT_TYPE, CANCELLED, EVENT_TYPE] {
        let response = reqwest::Client::new()
            .post(producer.events_url())
            .bearer_auth(&token)
            .header("Idempotency-Key", "order-1")
            .json(&json!({"type": event_type, "key": "order-1", "data": {"tenant": "acme"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let body: Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    consumer.wait_for("three settled", Duration::from_secs(30), |s| s.settled() == 3).await;
    let stats = &consumer.stats;
    let counts = (
        stats.processed.load(std::sync::atomic::Ordering::Relaxed),
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
    );
    let rows = consumer.event_count().await;
    consumer.stop().await;
    producer.stop().await;
    assert_ne!(ids[0], ids[1], "two event types got one message ID");
    assert_eq!(ids[0], ids[2], "a retry keeps its message ID");
    assert_eq!((counts, rows), ((2, 1), 2));
}
