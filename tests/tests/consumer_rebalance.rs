//! A rebalance while a slow handler runs: the revoked consumer's late
//! result is never committed, and no committed offset moves backwards.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_consumer::{ConsumerBuilder, Event, Handler, HandlerFuture, RecordEvents};
use event_identity_tests::process::{EventRecord, committed_offsets, end_offsets, write_events};
use event_identity_tests::*;
use serde_json::json;
use sqlx::AnyConnection;
use tokio::sync::Notify;

const PARTITIONS: i32 = 4;
const PER_PARTITION: i64 = 100;

/// Records events, but takes 3 s over offset 10 of every partition, so
/// that each partition still has work in flight or waiting (the SQLite
/// inbox has one connection) when the second consumer joins, whichever
/// partitions it is given.
struct Slow {
    started: Arc<Notify>,
}

impl Handler for Slow {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move {
            if event.offset == 10 {
                self.started.notify_one();
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            RecordEvents.handle(event, tx).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_during_a_slow_handler_never_moves_a_committed_offset_backwards() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let token = issuer.sign(
        "k1",
        &json!({"iss": issuer.issuer(), "sub": "user-1", "aud": CONSUMER_AUDIENCE,
                "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600}),
    );
    let topic = fresh_topic(PARTITIONS).await;
    let records: Vec<EventRecord> = (0..PARTITIONS as i64 * PER_PARTITION)
        .map(|n| EventRecord {
            partition: (n % i64::from(PARTITIONS)) as i32,
            id: uuid::Uuid::new_v4().to_string(),
            token: token.clone(),
            value: json!({"tenant": "acme", "n": n}).to_string(),
        })
        .collect();
    write_events(&topic, &records, records.len(), Duration::ZERO).await;

    // Committed offsets, sampled every 50 ms from before the first
    // consumer starts until the end.
    let sampling = Arc::new(std::sync::Mutex::new(Vec::<Vec<i64>>::new()));
    let sampler = {
        let (topic, sampling) = (topic.clone(), sampling.clone());
        tokio::spawn(async move {
            loop {
                let offsets = committed_offsets(&topic, PARTITIONS).await;
                sampling.lock().unwrap().push(offsets);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let started = Arc::new(Notify::new());
    let slow = Arc::new(Slow { started: started.clone() });
    let a = start_consumer_with(&topic, issuer.issuer(), dir.clone(), |config| {
        ConsumerBuilder::new(config).handler(slow)
    })
    .await;
    tokio::time::timeout(Duration::from_secs(60), started.notified())
        .await
        .expect("the slow handler started");

    // B joins while A's handler is still busy: the group rebalances.
    let b = start_consumer_with(&topic, issuer.issuer(), dir.clone(), ConsumerBuilder::new).await;
    let end = end_offsets(&topic, PARTITIONS).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while committed_offsets(&topic, PARTITIONS).await != end {
        assert!(Instant::now() < deadline, "not all committed: A {:?} B {:?}", a.stats, b.stats);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let A's late result arrive and any stray commit land before looking.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sampler.abort();
    let (stats_a, stats_b) = (a.stats.clone(), b.stats.clone());
    a.stop().await;
    b.stop().await;

    let samples = sampling.lock().unwrap().clone();
    assert!(samples.len() > 20, "{} samples", samples.len());
    for partition in 0..PARTITIONS as usize {
        let history: Vec<i64> = samples.iter().map(|s| s[partition]).collect();
        assert!(
            history.windows(2).all(|w| w[0] <= w[1]),
            "partition {partition}'s committed offset moved backwards: {history:?}"
        );
    }
    assert_eq!(committed_offsets(&topic, PARTITIONS).await, vec![PER_PARTITION; 4]);
    let processed =
        stats_a.processed.load(Ordering::Relaxed) + stats_b.processed.load(Ordering::Relaxed);
    assert_eq!(processed, (PARTITIONS as i64 * PER_PARTITION) as u64, "one effect per event");
    assert!(stats_b.settled() > 0, "B took over partitions: {stats_b:?}");
}
