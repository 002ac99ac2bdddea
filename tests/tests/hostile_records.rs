//! Records built to stall a partition or to mislead whoever reads the
//! dead-letter topic, on the real broker (and PostgreSQL where the attack
//! aims at it). Each must settle: processed, or dead-lettered with its
//! reason, and the committed offset moves past it.

use std::time::Duration;

use event_identity_consumer::ConsumerBuilder;
use event_identity_tests::process::committed_offsets;
use event_identity_tests::*;
use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const ORDER: &[u8] = br#"{"tenant":"acme"}"#;
const WAIT: Duration = Duration::from_secs(60);

/// Every value of header `name` in the record, in order.
fn values(message: &rdkafka::message::OwnedMessage, name: &str) -> Vec<String> {
    let Some(headers) = message.headers() else { return Vec::new() };
    headers
        .iter()
        .filter(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
        .collect()
}

/// Waits until the test group's committed offsets of partition 0 reach
/// `expected` (librdkafka commits stored offsets every second).
async fn wait_committed(topic: &str, expected: i64) -> Vec<i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let committed = committed_offsets(topic, 1).await;
        if committed == [expected] || std::time::Instant::now() > deadline {
            return committed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A dead-letter topic that takes smaller records than the consumed one:
/// a copy that does not fit is sent without its value, then without its
/// key and original headers, marked `dlq_omitted`, and the partition moves
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_too_large_to_copy_are_dead_lettered_with_less_of_them() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let small = format!("{topic}.small-dead-letter");
    create_topic(&small, 1, &[("max.message.bytes", "4000")]).await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let dead_letter = small.clone();
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, move |mut config| {
        config.dead_letter_topic = dead_letter;
        ConsumerBuilder::new(config)
    })
    .await;

    // Not JSON and no token: 10,000 bytes of value; then the same with a
    // 5,000-byte header as well; then a valid event.
    let ids = [test_id(1), test_id(2), test_id(3)];
    write_raw(&topic, &contract_headers(&ids[0], None), &[b'x'; 10_000]).await;
    let padding = "p".repeat(5_000);
    let mut headers = contract_headers(&ids[1], None);
    headers.push(("x-padding", &padding));
    write_raw(&topic, &headers, &[b'x'; 10_000]).await;
    let bearer = format!("Bearer {}", dev_event_token(&issuer, "user-1"));
    write_raw(&topic, &contract_headers(&ids[2], Some(&bearer)), ORDER).await;

    consumer.wait_for("three settled", WAIT, |s| s.settled() == 3).await;
    assert_eq!(wait_committed(&topic, 3).await, [3]);
    assert_eq!(consumer.event_count().await, 1);
    consumer.stop().await;

    let letters = read_all(&small).await;
    let seen: Vec<_> = letters
        .iter()
        .map(|l| {
            let first = |name| values(l, name).into_iter().next();
            (first("dlq_source_offset"), first("dlq_omitted"), first("ce_id"), l.payload(), l.key())
        })
        .collect();
    let (value, bare) = (Some("value".to_owned()), Some("value,key,headers".to_owned()));
    let key = Some(b"test".as_slice());
    assert_eq!(
        seen,
        [
            (Some("0".to_owned()), value, Some(ids[0].clone()), None, key),
            (Some("1".to_owned()), bare, None, None, None),
        ]
    );
    for letter in &letters {
        assert_eq!(values(letter, "dlq_reason"), ["malformed_payload"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_headers_on_an_incoming_record_are_replaced_not_repeated() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;

    // No token, pretending it was already judged elsewhere.
    let id = test_id(1);
    let mut headers = contract_headers(&id, None);
    headers.extend([
        ("dlq_reason", "handler_rejected"),
        ("DLQ_source_topic", "payments"),
        ("dlq_source_offset", "12345"),
        ("dlq_group", "someone-else"),
        ("x-trace", "kept"),
    ]);
    write_raw(&topic, &headers, ORDER).await;
    consumer.wait_for("one settled", WAIT, |s| s.settled() == 1).await;
    consumer.stop().await;

    let letters = read_all(&dead_letter_topic(&topic)).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(values(letter, "dlq_reason"), ["missing_token"]);
    assert_eq!(values(letter, "dlq_source_offset"), ["0"]);
    assert_eq!(values(letter, "dlq_source_topic"), [topic.as_str()]);
    assert_eq!(values(letter, "DLQ_source_topic"), Vec::<String>::new());
    assert_eq!(values(letter, "dlq_group"), [group_of(&topic)]);
    assert_eq!(values(letter, "x-trace"), ["kept"]);
    assert_eq!(values(letter, "ce_id"), [id]);
    assert_eq!(values(letter, "dlq_omitted"), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_character_in_a_contract_header_is_dead_lettered() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;

    // A valid token (one read off the topic and replayed) with a NUL in the
    // unsigned ce_source, then an ordinary event.
    let bearer = format!("Bearer {}", dev_event_token(&issuer, "user-1"));
    let (first, second) = (test_id(1), test_id(2));
    let mut headers = contract_headers(&first, Some(&bearer));
    headers[3].1 = "/evil\u{0}source";
    write_raw(&topic, &headers, ORDER).await;
    write_raw(&topic, &contract_headers(&second, Some(&bearer)), ORDER).await;

    consumer.wait_for("two settled", WAIT, |s| s.settled() == 2).await;
    assert_eq!(wait_committed(&topic, 2).await, [2]);
    consumer.stop().await;
    assert_eq!(dead_letter_reasons(&topic).await, [(first, "malformed_payload".to_owned())]);
}

/// Values PostgreSQL refuses whatever the retry (a key over the index's
/// row limit, a NUL in text) dead-letter their record as
/// `handler_rejected` instead of retrying it forever; JSON text with an
/// escaped NUL is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_postgres_refuses_are_dead_lettered_and_the_partition_moves_on() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let database_url = fresh_postgres_database().await;
    let config = consumer_config(&topic, &database_url, issuer.issuer(), &[]);
    let consumer = ConsumerBuilder::new(config).build().await.expect("consumer starts");
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));

    // A subject too long for the primary key's B-tree (random, so that
    // PostgreSQL cannot compress it below the limit), one with a NUL, and
    // two ordinary events, one with a NUL escaped inside its JSON.
    let long: String = (0..6000).map(|_| fastrand::alphanumeric()).collect();
    let tokens = [
        dev_event_token(&issuer, &long),
        dev_event_token(&issuer, "user\u{0}1"),
        dev_event_token(&issuer, "user-1"),
        dev_event_token(&issuer, "user-1"),
    ];
    let nul_data = json!({"tenant": "acme", "note": "a\u{0}b"}).to_string();
    let values = [ORDER, ORDER, ORDER, nul_data.as_bytes()];
    for (n, (token, value)) in tokens.iter().zip(values).enumerate() {
        write_record(&topic, &test_id(n as u32), Some(token), value).await;
    }

    let deadline = std::time::Instant::now() + WAIT;
    while stats.settled() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed = wait_committed(&topic, 4).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(stats.settled(), 4, "{stats:?}");
    assert_eq!(committed, [4]);
    let reasons = dead_letter_reasons(&topic).await;
    let handler_rejected = "handler_rejected".to_owned();
    assert_eq!(reasons, [(test_id(0), handler_rejected.clone()), (test_id(1), handler_rejected)]);

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let stored: Vec<(String,)> =
        sqlx::query_as("SELECT message_id FROM events ORDER BY message_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(stored, [(test_id(2),), (test_id(3),)]);
}
