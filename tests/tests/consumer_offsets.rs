//! Offsets and idempotency on the real broker (C09, C10, C11), with event
//! tokens from the development issuer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_consumer::{
    ConsumerBuilder, Event, Handler, HandlerError, HandlerFuture, RecordEvents, Stats,
};
use event_identity_tests::*;
use serde_json::json;
use sqlx::AnyConnection;

const WAIT: Duration = Duration::from_secs(60);

async fn issuer() -> DevIssuer {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    issuer
}

fn token(issuer: &DevIssuer, kid: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    issuer.sign(
        kid,
        &json!({
            "iss": issuer.issuer(), "sub": "user-1", "aud": CONSUMER_AUDIENCE,
            "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600,
        }),
    )
}

fn id(n: u32) -> String {
    format!("9f1c0000-0000-7000-8000-{n:012}")
}

const ORDER: &[u8] = br#"{"tenant":"acme"}"#;

fn settled(s: &Stats) -> u64 {
    s.processed.load(Ordering::Relaxed)
        + s.duplicates.load(Ordering::Relaxed)
        + s.dead_lettered.load(Ordering::Relaxed)
}

// C09: after a restart the first record read is the one after the last
// committed, and the committed offset is the next to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c09_a_restart_continues_after_the_last_committed_offset() {
    require_services().await;
    let issuer = issuer().await;
    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let valid = token(&issuer, "k1");
    for n in 0..5 {
        write_record(&topic, &id(n), Some(&valid), ORDER).await;
    }

    let first =
        start_consumer_with(&topic, issuer.issuer(), dir.clone(), ConsumerBuilder::new).await;
    first.wait_for("five processed", WAIT, |s| s.processed.load(Ordering::Relaxed) == 5).await;
    first.stop().await;
    assert_eq!(committed_offset(&group_of(&topic), &topic, 0).await, 5);

    write_record(&topic, &id(5), Some(&valid), ORDER).await;
    let second =
        start_consumer_with(&topic, issuer.issuer(), dir.clone(), ConsumerBuilder::new).await;
    second.wait_for("one processed", WAIT, |s| s.processed.load(Ordering::Relaxed) == 1).await;
    assert_eq!(second.stats.duplicates.load(Ordering::Relaxed), 0, "nothing was read twice");
    assert_eq!(second.processed_offsets().await, [0, 1, 2, 3, 4, 5]);
    second.stop().await;
    assert_eq!(committed_offset(&group_of(&topic), &topic, 0).await, 6);
}

/// Fails the first `failures` calls transiently, then records the event.
struct Flaky {
    failures: AtomicU32,
}

impl Handler for Flaky {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(HandlerError::Transient("the downstream service is down".into()));
            }
            RecordEvents.handle(event, tx).await
        })
    }
}

// C10: the same message ID reaching two workers at once has one effect; a
// failed handler leaves no marker, so the retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_one_effect_per_message_id_across_workers_and_failures() {
    require_services().await;
    let issuer = issuer().await;
    let topic = fresh_topic(2).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let flaky = Arc::new(Flaky { failures: AtomicU32::new(2) });
    let a = start_consumer_with(&topic, issuer.issuer(), dir.clone(), |config| {
        ConsumerBuilder::new(config).handler(flaky.clone())
    })
    .await;
    let b = start_consumer_with(&topic, issuer.issuer(), dir.clone(), ConsumerBuilder::new).await;

    // The same message ID in both partitions, i.e. to both workers, within
    // milliseconds.
    let valid = token(&issuer, "k1");
    let message_id = id(42);
    tokio::join!(
        write_record_at(&topic, 0, &message_id, Some(&valid), ORDER),
        write_record_at(&topic, 1, &message_id, Some(&valid), ORDER),
    );

    let deadline = std::time::Instant::now() + WAIT;
    while settled(&a.stats) + settled(&b.stats) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "records not settled: {:?} {:?}",
            a.stats,
            b.stats
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let processed =
        a.stats.processed.load(Ordering::Relaxed) + b.stats.processed.load(Ordering::Relaxed);
    let duplicates =
        a.stats.duplicates.load(Ordering::Relaxed) + b.stats.duplicates.load(Ordering::Relaxed);
    assert_eq!((processed, duplicates), (1, 1));
    assert_eq!(a.events_for(&id(42)).await.len(), 1);
    a.stop().await;
    b.stop().await;
}

// C11: a poison record is dead-lettered once and the partition moves on; a
// transient failure is retried in place, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_poison_records_are_dead_lettered_and_the_partition_moves_on() {
    require_services().await;
    let issuer = issuer().await;
    issuer.add_unpublished_key("forger", KeyMaterial::Rsa3);
    let topic = fresh_topic(1).await;
    let valid = token(&issuer, "k1");
    let mut forged_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    forged_header.kid = Some("k1".into());
    let badly_signed = issuer.sign_with_header("forger", forged_header, &jwt_payload(&valid));
    write_record(&topic, &id(0), Some(&valid), ORDER).await;
    write_record(&topic, &id(1), Some(&valid), &[0xFF, 0xFE, 0x00]).await;
    write_record(&topic, &id(2), Some(&valid), ORDER).await;
    write_record(&topic, &id(3), Some(&badly_signed), ORDER).await;
    write_record(&topic, &id(4), Some(&valid), ORDER).await;

    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;
    consumer.wait_for("five settled", WAIT, |s| settled(s) == 5).await;
    assert_eq!(consumer.processed_offsets().await, [0, 2, 4]);
    assert_eq!(consumer.stats.retries.load(Ordering::Relaxed), 0, "no retries for poison");
    let rejected = consumer.stats.rejected();
    assert_eq!(rejected.get("malformed_payload"), Some(&1));
    assert_eq!(rejected.get("invalid_signature"), Some(&1));

    let dead = read_all(&dead_letter_topic(&topic)).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(header(&dead[0], "dlq_reason").as_deref(), Some("malformed_payload"));
    assert_eq!(header(&dead[0], "dlq_source_topic").as_deref(), Some(topic.as_str()));
    assert_eq!(header(&dead[0], "dlq_source_partition").as_deref(), Some("0"));
    assert_eq!(header(&dead[0], "dlq_source_offset").as_deref(), Some("1"));
    assert_eq!(header(&dead[0], "dlq_group").as_deref(), Some(group_of(&topic).as_str()));
    assert_eq!(rdkafka::Message::payload(&dead[0]), Some([0xFF, 0xFE, 0x00].as_slice()));
    assert_eq!(header(&dead[1], "dlq_reason").as_deref(), Some("invalid_signature"));
    assert_eq!(header(&dead[1], "dlq_source_offset").as_deref(), Some("3"));
    consumer.stop().await;
    assert_eq!(committed_offset(&group_of(&topic), &topic, 0).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_an_unreachable_jwks_is_retried_not_dead_lettered() {
    require_services().await;
    let issuer = issuer().await;
    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        config.jwks_cooldown_ms = 300;
        ConsumerBuilder::new(config)
    })
    .await;

    // A token under a key the consumer has not seen, once the last key fetch
    // is a cooldown old, while the issuer's key endpoint is down: it cannot
    // be told from a forgery yet.
    tokio::time::sleep(Duration::from_millis(400)).await;
    issuer.add_key("k2", KeyMaterial::Rsa2);
    issuer.set_jwks_available(false);
    write_record(&topic, &id(7), Some(&token(&issuer, "k2")), ORDER).await;
    consumer.wait_for("two retries", WAIT, |s| s.retries.load(Ordering::Relaxed) >= 2).await;
    assert_eq!(consumer.stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(committed_offset(&group_of(&topic), &topic, 0).await, -1001);

    issuer.set_jwks_available(true);
    consumer
        .wait_for("the record processed", WAIT, |s| s.processed.load(Ordering::Relaxed) == 1)
        .await;
    assert_eq!(consumer.stats.dead_lettered.load(Ordering::Relaxed), 0);
    consumer.stop().await;
    assert_eq!(committed_offset(&group_of(&topic), &topic, 0).await, 1);
}
