//! No token, secret or Authorization value reaches a log line: a whole
//! scenario runs with every log at TRACE captured, and the capture is
//! searched for the tokens and secrets that scenario used.
//!
//! Its own test binary, because it installs the process-wide subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_identity_tests::*;
use serde_json::json;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_secret_appears_in_any_log_line() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    require_services().await;

    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let consumer = start_consumer(&topic).await;
    let (alice, bob) = (alice_token().await, bob_token().await);
    let client = reqwest::Client::new();
    let body = json!({"type": EVENT_TYPE, "key": "o-1", "data": {"tenant": "acme"}});
    for (token, key) in [(&alice, "k-1"), (&alice, "k-1"), (&bob, "k-2")] {
        client
            .post(producer.events_url())
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    // A forged record with a token shaped like alice's, and one with the
    // event token but another tenant: both rejected, both logged.
    let records = read_all(&topic).await;
    let authorization = header(&records[0], "authorization").unwrap();
    let event_token = authorization.strip_prefix("Bearer ").unwrap().to_owned();
    write_record(&topic, "00000000-0000-7000-8000-000000000001", Some(&alice), b"{}").await;
    let other_tenant = json!({"tenant": "globex"}).to_string();
    write_record(
        &topic,
        "00000000-0000-7000-8000-000000000002",
        Some(&event_token),
        other_tenant.as_bytes(),
    )
    .await;
    consumer
        .wait_for("every record settled", Duration::from_secs(60), |s| {
            use std::sync::atomic::Ordering::Relaxed;
            s.processed.load(Relaxed) + s.duplicates.load(Relaxed) + s.dead_lettered.load(Relaxed)
                == 4
        })
        .await;
    consumer.stop().await;
    producer.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("event published"), "the capture holds the debug lines");
    assert!(logs.contains("message rejected"), "the capture holds the rejections");
    let signature = |token: &str| token.rsplit('.').next().unwrap().to_owned();
    let secrets = [
        ("alice's token", alice.clone()),
        ("alice's token signature", signature(&alice)),
        ("bob's token signature", signature(&bob)),
        ("the event token signature", signature(&event_token)),
        ("the client secret", "producer-secret".to_owned()),
        ("a Bearer value", "Bearer ey".to_owned()),
        ("a JWT header", "eyJhbGciOi".to_owned()),
    ];
    for (what, secret) in secrets {
        assert!(!logs.contains(&secret), "{what} appears in the logs");
    }
}
