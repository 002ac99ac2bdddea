//! Clients and endpoints that misbehave at the services' edges: requests
//! whose headers never end, a forwarding target answering a huge error
//! page, numbers JSON cannot hold in 64 bits, an Idempotency-Key reused for
//! another request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::IntoResponse as _;
use event_identity_consumer::ConsumerBuilder;
use event_identity_tests::*;
use futures_util::StreamExt as _;
use rdkafka::Message as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const ORDER: &[u8] = br#"{"tenant":"acme"}"#;
const WAIT: Duration = Duration::from_secs(60);

/// Sends the start of a request whose headers never end, trickling a byte
/// every 3 s as slowloris does; how long until the server closes it.
async fn held_open(addr: &str, request_start: &[u8]) -> Duration {
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(request_start).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(45) {
        match tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf)).await {
            Ok(_) => break,
            Err(_) if slow.write_all(b"X").await.is_err() => break,
            Err(_) => {}
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_closes_a_connection_whose_headers_never_end() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let held =
        held_open(&producer.addr.to_string(), b"POST /v1/events HTTP/1.1\r\nHost: a\r\n").await;
    producer.stop().await;
    assert!(held < Duration::from_secs(15), "held open for {held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_ops_request_neither_holds_a_connection_nor_the_shutdown() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;
    let ops = consumer.ops.to_string();
    let held = held_open(&ops, b"GET /metrics HTTP/1.1\r\nHost: scraper\r\n").await;
    assert!(held < Duration::from_secs(15), "held open for {held:?}");

    // One left half-sent while the consumer stops.
    let mut slow = TcpStream::connect(&ops).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: scraper\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(30), consumer.stop()).await;
    assert!(stopped.is_ok() && started.elapsed() < Duration::from_secs(8), "{stopped:?}");
}

/// VmHWM of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A forwarding target that answers 400 with a 384 MiB page: the event is
/// dead-lettered with the start of the page, and the page is not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_page_from_the_forwarding_target_is_not_read() {
    require_services().await;
    let issuer = dev_issuer().await;
    const CHUNK: usize = 64 * 1024;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                let chunks = futures_util::stream::iter(0..6 * 1024).map(move |_| {
                    counter.fetch_add(CHUNK as u64, Ordering::Relaxed);
                    Ok::<_, std::io::Error>(vec![b'e'; CHUNK])
                });
                (StatusCode::BAD_REQUEST, Body::from_stream(chunks)).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, move |mut config| {
        config.forward_url = Some(url);
        ConsumerBuilder::new(config)
    })
    .await;
    let before = peak_rss_kib();
    write_record(&topic, &test_id(1), Some(&dev_event_token(&issuer, "user-1")), ORDER).await;
    consumer.wait_for("dead-lettered", WAIT, |s| s.settled() == 1).await;
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    consumer.stop().await;
    let letters = read_all(&dead_letter_topic(&topic)).await;
    let detail = header(&letters[0], "dlq_detail").unwrap();
    assert_eq!(header(&letters[0], "dlq_reason").as_deref(), Some("handler_rejected"));
    assert!(detail.starts_with("the endpoint answered 400 Bad Request: eeee"), "{detail}");
    assert!(grown_mib < 32, "peak memory grew by {grown_mib} MiB");
    assert!(sent.load(Ordering::Relaxed) < 64 << 20, "most of the page was pulled");
}

/// Numbers beyond 64 bits (and spellings such as `1.50`) reach the topic,
/// the `events` table and the forwarding target as they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_data_travels_byte_for_byte() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let data = r#"{"tenant": "acme", "order_no": 123456789012345678901234567890, "price": 1.50}"#;
    let body = format!(r#"{{"type":"{EVENT_TYPE}","key":"o-1","data":{data}}}"#);
    let answer = reqwest::Client::new()
        .post(producer.events_url())
        .bearer_auth(alice_token().await)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    producer.stop().await;
    let records = read_all(&topic).await;
    assert_eq!(records[0].payload(), Some(data.as_bytes()));

    let consumer = start_consumer(&topic).await;
    consumer.wait_for("processed", WAIT, |s| s.settled() == 1).await;
    let pool = sqlx::SqlitePool::connect(&consumer.database_url).await.unwrap();
    let (stored,): (String,) =
        sqlx::query_as("SELECT data FROM events").fetch_one(&pool).await.unwrap();
    pool.close().await;
    consumer.stop().await;
    assert_eq!(stored, data);
}

/// One Idempotency-Key for two different orders: two message IDs, both
/// published; the same request again keeps its ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_gets_another_id() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let alice = alice_token().await;
    let mut ids = Vec::new();
    for order in ["order-1", "order-2", "order-1"] {
        let body = json!({"type": EVENT_TYPE, "key": order,
                          "data": {"tenant": "acme", "order_id": order}});
        let answer = reqwest::Client::new()
            .post(producer.events_url())
            .bearer_auth(&alice)
            .header("Idempotency-Key", "cart-7")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202);
        let body: serde_json::Value = answer.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    producer.stop().await;
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
}
