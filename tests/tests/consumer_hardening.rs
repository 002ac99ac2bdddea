//! Failures an attack run found, each kept as a test: a header name that is
//! not UTF-8, a replay after the inbox marker was purged, a partition stuck
//! before its first commit, a paused partition handed back after a
//! rebalance, and a stuck partition beside busy ones. None may stop a
//! partition or hide from /readyz.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_consumer::RecordEvents;
use event_identity_consumer::{ConsumerBuilder, Event, Handler, HandlerError, HandlerFuture};
use event_identity_tests::process::{EventRecord, committed_offsets, write_events};
use event_identity_tests::*;
use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use serde_json::json;
use sqlx::AnyConnection;

const ORDER: &[u8] = br#"{"tenant":"acme"}"#;
const WAIT: Duration = Duration::from_secs(60);

async fn issuer_and_token() -> (DevIssuer, String) {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let token = token(&issuer, "k1");
    (issuer, token)
}

fn token(issuer: &DevIssuer, kid: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    issuer.sign(
        kid,
        &json!({"iss": issuer.issuer(), "sub": "user-1", "aud": CONSUMER_AUDIENCE,
                "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600}),
    )
}

fn id(n: u32) -> String {
    format!("9f1c0000-0000-7000-8000-{n:012}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_the_partition_moves_on() {
    require_services().await;
    let (issuer, token) = issuer_and_token().await;
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;

    write_record(&topic, &id(1), Some(&token), ORDER).await;
    // A valid record but for one extra header whose name is not UTF-8,
    // written below the client library, which would refuse it.
    let authorization = format!("Bearer {token}");
    let headers: Vec<(String, String)> = [
        ("ce_specversion".as_bytes(), "1.0".as_bytes()),
        (b"ce_id", id(2).as_bytes()),
        (b"ce_type", EVENT_TYPE.as_bytes()),
        (b"ce_source", b"/raw"),
        (b"content-type", b"application/json"),
        (b"authorization", authorization.as_bytes()),
        (b"x-trace-\xff", b"1"),
    ]
    .iter()
    .map(|(k, v)| (hex(k), hex(v)))
    .collect();
    let spec = json!({"key": hex(b"k"), "value": hex(ORDER), "headers": headers});
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/raw_produce.py");
    let status = std::process::Command::new("python3")
        .args([script, &kafka_bootstrap(), &topic, "0", &spec.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "raw produce failed");
    write_record(&topic, &id(3), Some(&token), ORDER).await;

    consumer.wait_for("three settled", WAIT, |s| s.settled() == 3).await;
    assert_eq!(consumer.stats.processed.load(Ordering::Relaxed), 2);
    assert_eq!(consumer.stats.rejected().get("malformed_payload"), Some(&1));
    // The dead-letter copy keeps the readable headers, leaves the odd one
    // out (it cannot be copied through the client library) and says so.
    let letters = read_all(&dead_letter_topic(&topic)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "dlq_omitted").as_deref(), Some("headers"));
    assert_eq!(header(&letters[0], "ce_id"), Some(id(2)));
    assert_eq!(header(&letters[0], "dlq_reason").as_deref(), Some("malformed_payload"));
    assert_eq!(letters[0].headers().map(|h| h.count()), Some(6 + 8));
    let deadline = Instant::now() + WAIT;
    while committed_offsets(&topic, 1).await != [3] {
        assert!(Instant::now() < deadline, "the partition did not move past the record");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_its_marker_was_purged_settles_and_the_partition_moves_on() {
    require_services().await;
    let (issuer, token) = issuer_and_token().await;
    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        config.inbox_retention_s = 1;
        config.inbox_purge_interval_s = 1;
        ConsumerBuilder::new(config)
    })
    .await;
    write_record(&topic, &id(1), Some(&token), ORDER).await;
    consumer.wait_for("one processed", WAIT, |s| s.settled() == 1).await;

    // The marker is purged; the same message comes again, then a new one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_record(&topic, &id(1), Some(&token), ORDER).await;
    write_record(&topic, &id(2), Some(&token), ORDER).await;
    consumer.wait_for("three settled", WAIT, |s| s.settled() == 3).await;
    assert_eq!(consumer.stats.dead_lettered.load(Ordering::Relaxed), 0);
    // The default handler keeps the first row: one row per message ID.
    assert_eq!(consumer.event_count().await, 2);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_partition_stuck_before_its_first_commit() {
    require_services().await;
    let (issuer, _) = issuer_and_token().await;
    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        config.jwks_cooldown_ms = 300;
        config.stall_timeout_s = 2;
        ConsumerBuilder::new(config)
    })
    .await;

    // Records under a key the consumer cannot fetch: retried, never settled.
    // (Past the key-fetch cooldown of the start, else they are unknown_key.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    issuer.add_key("k2", KeyMaterial::Rsa2);
    issuer.set_jwks_available(false);
    let stuck = token(&issuer, "k2");
    for n in 0..5 {
        write_record(&topic, &id(100 + n), Some(&stuck), ORDER).await;
    }
    let url = format!("http://{}/readyz", consumer.ops);
    let deadline = Instant::now() + WAIT;
    let reason = loop {
        let response = reqwest::get(&url).await.unwrap();
        if response.status() == 503 {
            break response.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "still ready while stuck: {:?}", consumer.stats);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(reason.contains("partition 0") && reason.contains("5 messages behind"), "{reason}");

    // The keys come back: the records settle and the consumer is ready again.
    issuer.set_jwks_available(true);
    consumer.wait_for("five settled", WAIT, |s| s.settled() == 5).await;
    assert_eq!(consumer.stats.dead_lettered.load(Ordering::Relaxed), 0);
    let deadline = Instant::now() + WAIT;
    while reqwest::get(&url).await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    consumer.stop().await;
}

/// Fails transiently until opened: for every event, or only for those of
/// one partition. Counts the batches it settles, per partition.
struct Gate {
    open: Arc<AtomicBool>,
    partition: Option<i32>,
    batches: Mutex<HashMap<i32, usize>>,
}

impl Gate {
    fn closed(open: &Arc<AtomicBool>) -> Arc<Self> {
        Self::closed_for(open, None)
    }

    fn closed_for(open: &Arc<AtomicBool>, partition: Option<i32>) -> Arc<Self> {
        Arc::new(Gate { open: open.clone(), partition, batches: Mutex::default() })
    }

    fn batches(&self, partition: i32) -> usize {
        self.batches.lock().unwrap().get(&partition).copied().unwrap_or(0)
    }
}

impl Gate {
    fn check(&self, events: &[&Event]) -> Result<(), HandlerError> {
        let held = events.iter().any(|e| self.partition.is_none_or(|p| p == e.partition));
        if held && !self.open.load(Ordering::SeqCst) {
            return Err(HandlerError::Transient("the gate is closed".into()));
        }
        Ok(())
    }
}

impl Handler for Gate {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move {
            self.check(&[event])?;
            RecordEvents.handle(event, tx).await
        })
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [&'a Event],
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            self.check(events)?;
            RecordEvents.handle_batch(events, tx).await?;
            let partition = events.first().map_or(-1, |e| e.partition);
            *self.batches.lock().unwrap().entry(partition).or_default() += 1;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_for_back_pressure_resumes_after_a_rebalance() {
    require_services().await;
    let (issuer, token) = issuer_and_token().await;
    let topic = fresh_topic(2).await;
    for partition in 0..2 {
        for _ in 0..20 {
            let id = uuid::Uuid::new_v4().to_string();
            write_record_at(&topic, partition, &id, Some(&token), ORDER).await;
        }
    }

    // A's queues fill (3 messages each) behind a handler that cannot work
    // yet, so it pauses both partitions; B joins and leaves again.
    let open = Arc::new(AtomicBool::new(false));
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gate = open.clone();
    let a = start_consumer_with(&topic, issuer.issuer(), dir.clone(), move |mut config| {
        config.max_queued_per_partition = 3;
        ConsumerBuilder::new(config).handler(Gate::closed(&gate))
    })
    .await;
    a.wait_for("both queues full", WAIT, |s| s.consumed.load(Ordering::Relaxed) >= 6).await;
    let b = start_consumer_with(&topic, issuer.issuer(), dir.clone(), |mut config| {
        config.max_queued_per_partition = 3;
        ConsumerBuilder::new(config).handler(Gate::closed(&Arc::new(AtomicBool::new(false))))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    b.stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    open.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while committed_offsets(&topic, 2).await != [20, 20] {
        assert!(Instant::now() < deadline, "A did not finish: {:?}", a.stats);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_does_not_hold_back_reading_for_the_others() {
    require_services().await;
    let (issuer, token) = issuer_and_token().await;
    let topic = fresh_topic(3).await;
    let write = |partition: i32| {
        let (topic, token) = (topic.clone(), token.clone());
        async move {
            for _ in 0..40 {
                let id = uuid::Uuid::new_v4().to_string();
                write_record_at(&topic, partition, &id, Some(&token), ORDER).await;
            }
        }
    };
    write(0).await;

    // Partition 0's queue fills behind its failing handler; then the
    // others get work, and reading must go on for them.
    let open = Arc::new(AtomicBool::new(false));
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let stuck = Gate::closed_for(&open, Some(0));
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, move |mut config| {
        config.max_queued_per_partition = 8;
        config.batch_size = 4;
        ConsumerBuilder::new(config).handler(stuck)
    })
    .await;
    consumer
        .wait_for("partition 0's queue full", WAIT, |s| s.consumed.load(Ordering::Relaxed) >= 8)
        .await;
    write(1).await;
    write(2).await;
    let deadline = Instant::now() + WAIT;
    while committed_offsets(&topic, 3).await[1..] != [40, 40] {
        assert!(Instant::now() < deadline, "held back: {:?}", consumer.stats);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(consumer.event_count().await, 80);
    assert_eq!(committed_offsets(&topic, 1).await, [-1001], "nothing of partition 0 settled");

    open.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while committed_offsets(&topic, 3).await != [40, 40, 40] {
        assert!(Instant::now() < deadline, "partition 0 did not finish: {:?}", consumer.stats);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(consumer.event_count().await, 120);
    assert_eq!(consumer.stats.dead_lettered.load(Ordering::Relaxed), 0);
    consumer.stop().await;
}

/// Settles 4,000 records of partition 1, with `stuck` records of partition
/// 0 waiting behind a failing handler; the number of batches partition 1
/// took.
async fn batches_beside_a_stuck_partition(stuck: usize) -> usize {
    let (issuer, token) = issuer_and_token().await;
    let records = |partition: i32, count: usize| -> Vec<EventRecord> {
        (0..count)
            .map(|_| EventRecord {
                partition,
                id: uuid::Uuid::new_v4().to_string(),
                token: token.clone(),
                value: String::from_utf8(ORDER.to_vec()).unwrap(),
            })
            .collect()
    };
    let topic = fresh_topic(2).await;
    write_events(&topic, &records(0, stuck), 500, Duration::ZERO).await;
    let open = Arc::new(AtomicBool::new(false));
    let handler = Gate::closed_for(&open, Some(0));
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gate = handler.clone();
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, move |mut config| {
        config.max_queued_per_partition = 400;
        ConsumerBuilder::new(config).handler(gate)
    })
    .await;
    consumer
        .wait_for("partition 0 read", WAIT, |s| s.consumed.load(Ordering::Relaxed) >= stuck as u64)
        .await;
    write_events(&topic, &records(1, 4000), 1000, Duration::ZERO).await;
    let deadline = Instant::now() + WAIT;
    while committed_offsets(&topic, 2).await[1] != 4000 {
        assert!(Instant::now() < deadline, "partition 1 did not finish: {:?}", consumer.stats);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open.store(true, Ordering::SeqCst);
    consumer.stop().await;
    handler.batches(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_just_short_of_being_paused_does_not_shrink_the_others_batches() {
    require_services().await;
    // 4,000 records in batches of up to 256: at least 16 batches; alone
    // they come in a few dozen at most.
    let alone = batches_beside_a_stuck_partition(0).await;
    let beside = batches_beside_a_stuck_partition(399).await;
    assert!(alone <= 100, "{alone} batches alone");
    assert!(
        beside <= 2 * alone.max(20),
        "{beside} batches beside a stuck partition, {alone} alone"
    );
}
