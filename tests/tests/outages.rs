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

/// The second broker these tests stop and start: on the test broker's port
/// plus 100 and 101, its data in `$EI_RUN_DIR/outage` (default
/// `target/services/outage`).
fn outage_broker_env() -> Vec<(&'static str, String)> {
    let base: u16 = kafka_bootstrap().rsplit(':').next().unwrap().parse().unwrap();
    let run_root = std::env::var("EI_RUN_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/services").to_owned());
    let run_dir = format!("{run_root}/outage");
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

/// Polls `url` until it answers `status`; the last body.
async fn wait_for_status(url: &str, status: u16, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(response) = reqwest::get(url).await {
            let got = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if got == status {
                return body;
            }
            assert!(std::time::Instant::now() < deadline, "{url}: {got} {body} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_kafka_is_stopped_and_ready_when_it_returns() {
    let _serial = ONE_AT_A_TIME.lock().await;
    require_services().await;
    let env = outage_broker_env();
    let bootstrap = format!("127.0.0.1:{}", env[0].1);
    let script = |command: &'static str| {
        let env = env.clone();
        tokio::task::spawn_blocking(move || run_script("kafka.sh", &[command], &env))
    };
    script("start").await.unwrap();

    // A producer and a consumer on that broker, the topic made by a first event.
    let topic = "readiness-events";
    let producer = start_producer(producer_config(
        topic,
        &[&format!("--kafka-bootstrap={bootstrap}"), "--delivery-timeout-ms=3000"],
    ))
    .await;
    assert_eq!(publish(&producer.events_url(), &alice_token().await).await.status(), 202);
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(topic, &issuer(), dir, |mut config| {
        config.kafka_bootstrap = bootstrap.clone();
        event_identity_consumer::ConsumerBuilder::new(config)
    })
    .await;
    let urls =
        [format!("http://{}/readyz", producer.addr), format!("http://{}/readyz", consumer.ops)];
    for url in &urls {
        wait_for_status(url, 200, Duration::from_secs(60)).await;
    }

    script("stop").await.unwrap();
    let outcome = async {
        let mut reasons = Vec::new();
        for url in &urls {
            reasons.push(wait_for_status(url, 503, Duration::from_secs(30)).await);
        }
        reasons
    }
    .await;
    script("resume").await.unwrap();
    for url in &urls {
        wait_for_status(url, 200, Duration::from_secs(60)).await;
    }
    consumer.stop().await;
    producer.stop().await;
    script("stop").await.unwrap();

    assert!(outcome[0].contains("no Kafka broker answered"), "producer: {}", outcome[0]);
    assert!(outcome[1].contains("no Kafka broker connected"), "consumer: {}", outcome[1]);
}
