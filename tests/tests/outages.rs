//! The producer while the real services are down: Kafka stopped and
//! Keycloak stopped, each for real. Nothing is published for a request
//! that was refused, and the refusal is a 503 with Retry-After.
//!
//! Its own test binary: it stops and restarts Keycloak, which no other test
//! may see. Kafka is a second broker of its own, on the test broker's port
//! plus 100.

use std::time::Duration;

use event_identity_tests::*;
use serde_json::json;

/// The two tests run one after the other: one of them stops Keycloak.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn publish(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(&json!({"type": EVENT_TYPE, "key": "o-1", "data": {"tenant": "acme"}}))
        .send()
        .await
        .unwrap()
}

fn outage_broker_env() -> Vec<(&'static str, String)> {
    let base: u16 = kafka_bootstrap().rsplit(':').next().unwrap().parse().unwrap();
    let run_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/services-outage").to_owned();
    vec![
        ("EI_KAFKA_PORT", (base + 100).to_string()),
        ("EI_KAFKA_CONTROLLER_PORT", (base + 101).to_string()),
        ("EI_RUN_DIR", run_dir),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_stopped_requests_get_503_and_nothing_appears_later() {
    let _serial = ONE_AT_A_TIME.lock().await;
    require_services().await;
    let env = outage_broker_env();
    let bootstrap = format!("127.0.0.1:{}", env[0].1);
    tokio::task::spawn_blocking({
        let env = env.clone();
        move || run_script("kafka.sh", &["start"], &env)
    })
    .await
    .unwrap();

    let topic = "outage-events";
    let producer = start_producer(producer_config(
        topic,
        &[&format!("--kafka-bootstrap={bootstrap}"), "--delivery-timeout-ms=3000"],
    ))
    .await;
    let token = alice_token().await;
    assert_eq!(publish(&producer.events_url(), &token).await.status(), 202);

    tokio::task::spawn_blocking({
        let env = env.clone();
        move || run_script("kafka.sh", &["stop"], &env)
    })
    .await
    .unwrap();
    let refused = publish(&producer.events_url(), &token).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    producer.stop().await;

    // The broker comes back on its data: only the acknowledged event is there.
    tokio::task::spawn_blocking({
        let env = env.clone();
        move || run_script("kafka.sh", &["resume"], &env)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = record_count_at(&bootstrap, topic).await;
    tokio::task::spawn_blocking(move || run_script("kafka.sh", &["stop"], &env)).await.unwrap();
    assert_eq!(count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keycloak_stopped_requests_get_503_and_nothing_is_published() {
    let _serial = ONE_AT_A_TIME.lock().await;
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &["--http-timeout-ms=1000"])).await;
    let token = alice_token().await;

    tokio::task::spawn_blocking(|| run_script("keycloak.sh", &["stop"], &[])).await.unwrap();
    let outcome = tokio::spawn({
        let url = producer.events_url();
        async move {
            let refused = publish(&url, &token).await;
            (refused.status().as_u16(), refused.headers().get("retry-after").cloned())
        }
    })
    .await;
    // Bring Keycloak back whatever happened, for the tests that follow.
    tokio::task::spawn_blocking(|| run_script("keycloak.sh", &["start"], &[])).await.unwrap();

    let (status, retry_after) = outcome.unwrap();
    assert_eq!(status, 503);
    assert_eq!(retry_after.unwrap(), "5");
    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}
