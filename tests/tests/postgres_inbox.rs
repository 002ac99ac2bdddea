//! The shared inbox on PostgreSQL: two consumers of one group, one stopped
//! mid-stream, and every event still has exactly one effect.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_consumer::{ConsumerBuilder, EventConsumer};
use event_identity_tests::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const EVENTS: u32 = 200;

async fn start(
    topic: &str,
    issuer: &str,
    database_url: &str,
) -> (EventConsumer, CancellationToken) {
    let config = consumer_config(topic, database_url, issuer, &[]);
    (ConsumerBuilder::new(config).build().await.expect("consumer starts"), CancellationToken::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_on_postgres_one_stopped_mid_stream_process_every_event_once() {
    require_services().await;
    let database_url = fresh_postgres_database().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let token = issuer.sign(
        "k1",
        &json!({
            "iss": issuer.issuer(), "sub": "user-1", "aud": CONSUMER_AUDIENCE,
            "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600,
        }),
    );
    let topic = fresh_topic(4).await;
    for n in 0..EVENTS {
        let id = format!("9f1c0000-0000-7000-8000-{n:012}");
        write_record_at(&topic, (n % 4) as i32, &id, Some(&token), br#"{"tenant":"acme"}"#).await;
    }

    let (a, stop_a) = start(&topic, issuer.issuer(), &database_url).await;
    let (b, stop_b) = start(&topic, issuer.issuer(), &database_url).await;
    let (stats_a, stats_b) = (a.stats(), b.stats());
    let task_a = tokio::spawn(a.run(stop_a.clone()));
    let task_b = tokio::spawn(b.run(stop_b.clone()));

    // Stop A once it has done some of the work; B takes over its partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats_a.processed.load(Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "A never processed 10 events: {stats_a:?} {stats_b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_a.cancel();
    task_a.await.unwrap();

    let settled = || {
        stats_a.processed.load(Ordering::Relaxed)
            + stats_a.duplicates.load(Ordering::Relaxed)
            + stats_b.processed.load(Ordering::Relaxed)
            + stats_b.duplicates.load(Ordering::Relaxed)
    };
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (rows,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM events").fetch_one(&pool).await.unwrap();
        if rows == i64::from(EVENTS) {
            break;
        }
        assert!(Instant::now() < deadline, "{rows} events after 90 s: {stats_a:?} {stats_b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_b.cancel();
    task_b.await.unwrap();

    let (distinct,): (i64,) = sqlx::query_as("SELECT COUNT(DISTINCT message_id) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (markers,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM inbox").fetch_one(&pool).await.unwrap();
    assert_eq!((distinct, markers), (i64::from(EVENTS), i64::from(EVENTS)));
    let processed =
        stats_a.processed.load(Ordering::Relaxed) + stats_b.processed.load(Ordering::Relaxed);
    assert_eq!(processed, u64::from(EVENTS), "one effect per event; re-reads are duplicates");
    assert!(settled() >= u64::from(EVENTS));
    assert!(stats_b.processed.load(Ordering::Relaxed) > 0, "B did part of the work");
}
