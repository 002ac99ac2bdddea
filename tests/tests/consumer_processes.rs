//! The `event-consumer` binary as operators run it, killed, stopped and
//! restarted against the real broker: every event's effect exactly once,
//! committed offsets at the end of the topic, and a clean exit on SIGTERM.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_tests::process::*;
use event_identity_tests::*;
use serde_json::json;
use sqlx::AnyPool;

/// Event tokens of `users` users, as a producer would reuse them.
fn user_tokens(issuer: &DevIssuer, users: usize) -> Vec<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    (0..users)
        .map(|n| {
            let claims = json!({
                "iss": issuer.issuer(), "sub": format!("user-{n}"), "aud": CONSUMER_AUDIENCE,
                "scope": EVENT_SCOPE, "jti": format!("jti-{n}"), "iat": now, "exp": now + 3600,
            });
            issuer.sign("k1", &claims)
        })
        .collect()
}

/// `count` events spread over `partitions`, each user's with their token.
fn events(count: usize, partitions: i32, tokens: &[String]) -> Vec<EventRecord> {
    (0..count)
        .map(|n| EventRecord {
            partition: n as i32 % partitions,
            id: uuid::Uuid::new_v4().to_string(),
            token: tokens[n % tokens.len()].clone(),
            value: json!({"tenant": "acme", "order": n, "note": "x".repeat(200)}).to_string(),
        })
        .collect()
}

async fn issuer_with_key() -> DevIssuer {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    issuer
}

/// Counts of the effect table: rows, distinct message IDs, inbox markers
/// (zeros until the consumer has created the tables).
async fn effects(database_url: &str) -> (i64, i64, i64) {
    sqlx::any::install_default_drivers();
    let Ok(pool) = AnyPool::connect(database_url).await else { return (0, 0, 0) };
    let counts =
        sqlx::query_as::<_, (i64, i64)>("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM events")
            .fetch_one(&pool)
            .await;
    let markers = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM inbox").fetch_one(&pool).await;
    pool.close().await;
    match (counts, markers) {
        (Ok((rows, distinct)), Ok(markers)) => (rows, distinct, markers),
        _ => (0, 0, 0),
    }
}

/// Effect rows per partition.
async fn rows_per_partition(database_url: &str, partitions: i32) -> Vec<i64> {
    let pool = AnyPool::connect(database_url).await.unwrap();
    let mut rows = Vec::new();
    for partition in 0..partitions {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE kafka_partition = $1")
                .bind(partition)
                .fetch_one(&pool)
                .await
                .unwrap();
        rows.push(count);
    }
    pool.close().await;
    rows
}

/// Waits until the effect table holds `count` rows and the group's
/// committed offsets reach the end of the topic.
async fn wait_until_done(
    database_url: &str,
    topic: &str,
    partitions: i32,
    count: i64,
    process: &ServiceProcess,
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let end = end_offsets(topic, partitions).await;
    loop {
        let (rows, ..) = effects(database_url).await;
        let committed = committed_offsets(topic, partitions).await;
        if rows == count && committed == end {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after 180 s: {rows} of {count} effects, committed {committed:?} of {end:?}; log:\n{}",
            process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_at_random_moments_applies_every_event_exactly_once() {
    const EVENTS: usize = 10_000;
    const PARTITIONS: i32 = 6;
    require_services().await;
    let issuer = issuer_with_key().await;
    let topic = fresh_topic(PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = sqlite_url(&dir);
    let env = consumer_env(&topic, issuer.issuer(), &database_url);
    let log = dir.path().join("consumer.log");

    // A steady stream of about 45 s, so that kills land while it flows.
    let records = events(EVENTS, PARTITIONS, &user_tokens(&issuer, 50));
    let stream_topic = topic.clone();
    let writer = tokio::spawn(async move {
        write_events(&stream_topic, &records, 250, Duration::from_millis(1100)).await
    });

    // Each kill lands at a random moment once the new process has applied
    // effects (joining the group after a kill takes seconds, more on a busy
    // machine, so a fixed delay would often kill it before it starts).
    let mut working_kills = 0;
    let mut seen = Vec::new();
    for _ in 0..12 {
        let before = effects(&database_url).await.0;
        let process = ServiceProcess::start("event-consumer", &env, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while effects(&database_url).await.0 == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        process.kill();
        let after = effects(&database_url).await.0;
        seen.push(after);
        if after > before && after < EVENTS as i64 {
            working_kills += 1;
        }
    }
    writer.await.unwrap();
    eprintln!("effects when each of the 12 kills landed: {seen:?}");
    assert!(working_kills >= 10, "too few kills landed mid-stream: effects at kills {seen:?}");

    let process = ServiceProcess::start("event-consumer", &env, &log);
    wait_until_done(&database_url, &topic, PARTITIONS, EVENTS as i64, &process).await;
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");

    let n = EVENTS as i64;
    assert_eq!(effects(&database_url).await, (n, n, n), "rows, message IDs, markers");
    assert_eq!(committed_offsets(&topic, PARTITIONS).await, end_offsets(&topic, PARTITIONS).await);
    assert_eq!(end_offsets(&topic, PARTITIONS).await.iter().sum::<i64>(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_processes_on_postgres_one_killed_mid_stream_apply_every_event_once() {
    const EVENTS: usize = 3_000;
    const PARTITIONS: i32 = 6;
    require_services().await;
    let issuer = issuer_with_key().await;
    let topic = fresh_topic(PARTITIONS).await;
    let database_url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let env = consumer_env(&topic, issuer.issuer(), &database_url);

    let records = events(EVENTS, PARTITIONS, &user_tokens(&issuer, 20));
    let stream_topic = topic.clone();
    let writer = tokio::spawn(async move {
        write_events(&stream_topic, &records, 100, Duration::from_millis(250)).await
    });
    let a = ServiceProcess::start("event-consumer", &env, &dir.path().join("a.log"));
    let b = ServiceProcess::start("event-consumer", &env, &dir.path().join("b.log"));

    let deadline = Instant::now() + Duration::from_secs(60);
    while effects(&database_url).await.0 < 300 {
        assert!(
            Instant::now() < deadline,
            "no progress; A:\n{}\nB:\n{}",
            a.log_tail(),
            b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.kill();
    let at_kill = effects(&database_url).await.0;
    writer.await.unwrap();
    assert!(at_kill < EVENTS as i64, "A was killed before the stream ended ({at_kill})");

    wait_until_done(&database_url, &topic, PARTITIONS, EVENTS as i64, &b).await;
    let (status, _) = b.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let n = EVENTS as i64;
    assert_eq!(effects(&database_url).await, (n, n, n), "rows, message IDs, markers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_commits_what_finished_exits_0_and_a_restart_loses_nothing() {
    const EVENTS: usize = 6_000;
    const PARTITIONS: i32 = 3;
    const DEADLINE_MS: u64 = 5_000;
    require_services().await;
    let issuer = issuer_with_key().await;
    let topic = fresh_topic(PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = sqlite_url(&dir);
    let mut env = consumer_env(&topic, issuer.issuer(), &database_url);
    env.push(("EI_SHUTDOWN_TIMEOUT_MS".into(), DEADLINE_MS.to_string()));
    env.push(("EI_BATCH_SIZE".into(), "50".into()));
    let log = dir.path().join("consumer.log");

    // The consumer is running and has settled a first event.
    let records = events(EVENTS, PARTITIONS, &user_tokens(&issuer, 20));
    write_events(&topic, &records[..3], 3, Duration::ZERO).await;
    let process = ServiceProcess::start("event-consumer", &env, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects(&database_url).await.0 < 3 {
        assert!(Instant::now() < deadline, "no progress; log:\n{}", process.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The burst, and SIGTERM while it is being processed.
    write_events(&topic, &records[3..], EVENTS, Duration::ZERO).await;
    while effects(&database_url).await.0 < 500 {
        assert!(Instant::now() < deadline, "no progress; log:\n{}", process.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, took) = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_millis(DEADLINE_MS + 3_000), "exit took {took:?}");

    // What finished is exactly what is committed: offsets start at 0 and
    // every event is valid, so each partition's watermark is its row count.
    let committed = committed_offsets(&topic, PARTITIONS).await;
    assert_eq!(committed, rows_per_partition(&database_url, PARTITIONS).await);
    assert!(committed.iter().sum::<i64>() >= 500, "{committed:?}");

    let process = ServiceProcess::start("event-consumer", &env, &log);
    wait_until_done(&database_url, &topic, PARTITIONS, EVENTS as i64, &process).await;
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let n = EVENTS as i64;
    assert_eq!(effects(&database_url).await, (n, n, n), "rows, message IDs, markers");
}

/// Replicas that start at the same moment on a new PostgreSQL database all
/// open the inbox: creating its tables takes turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_one_postgres_database_all_open_the_inbox() {
    require_services().await;
    for _ in 0..3 {
        let database_url = fresh_postgres_database().await;
        let opened = futures_util::future::join_all(
            (0..6).map(|_| event_identity_consumer::Inbox::connect(&database_url)),
        )
        .await;
        let failures: Vec<String> =
            opened.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
        assert_eq!(failures, Vec::<String>::new());
    }
}
