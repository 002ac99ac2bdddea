//! The inbox on PostgreSQL: replicas sharing it, and tables made by an
//! early version.

use std::collections::HashMap;
use std::sync::Arc;

use event_identity::VerifiedClaims;
use event_identity_consumer::inbox::InboxOutcome;
use event_identity_consumer::{Event, Inbox, RecordEvents};
use event_identity_tests::fresh_postgres_database;
use serde_json::json;
use sqlx::Executor as _;
use uuid::Uuid;

const REPLICAS: u64 = 4;
const ROUNDS: usize = 30;
/// Message IDs each round's batches draw from; consecutive rounds share
/// half of them.
const IDS: u128 = 400;

fn event(subject: &str, n: u128) -> Event {
    Event {
        id: Uuid::from_u128(n),
        event_type: "com.example.order.created".to_owned(),
        source: "/tests".to_owned(),
        time: None,
        data: json!({"n": n as u64}),
        data_text: json!({"n": n as u64}).to_string(),
        claims: Arc::new(VerifiedClaims {
            subject: subject.to_owned(),
            issuer: "https://issuer.test".to_owned(),
            audience: vec!["order-consumer".to_owned()],
            scopes: vec!["events:order.created".to_owned()],
            expires_at: 0,
            issued_at: None,
            token_id: None,
            key_id: "k1".to_owned(),
            claims: serde_json::Map::new(),
        }),
        topic: "orders".to_owned(),
        partition: 0,
        offset: n as i64,
    }
}

/// One replica's rounds: a batch of random IDs (a tenth under a second
/// subject), shuffled; the keys it processed, or the first error.
async fn replica(inbox: Inbox, seed: u64) -> Result<Vec<(String, Uuid)>, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut processed = Vec::new();
    for round in 0..ROUNDS {
        let base = (round as u128 / 2) * IDS;
        let mut batch: Vec<Event> = (0..rng.usize(1..=IDS as usize))
            .map(|_| event(if rng.u8(0..10) == 0 { "u2" } else { "u1" }, base + rng.u128(0..IDS)))
            .collect();
        rng.shuffle(&mut batch);
        let refs: Vec<&Event> = batch.iter().collect();
        let outcomes = inbox
            .process_batch(&refs, &RecordEvents)
            .await
            .map_err(|e| format!("replica {seed}, round {round}: {e}"))?;
        for (event, outcome) in batch.iter().zip(outcomes) {
            if outcome == InboxOutcome::Processed {
                processed.push((event.claims.subject.clone(), event.id));
            }
        }
    }
    Ok(processed)
}

/// Batches that overlap, each in its own order, go through at once. Every
/// key must be processed once, with no transaction failing on the way (a
/// deadlock between two replicas' marker inserts shows as a transient
/// error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_inserting_overlapping_batches_into_one_postgres_inbox_neither_deadlock_nor_repeat()
 {
    let url = fresh_postgres_database().await;
    let mut replicas = Vec::new();
    for seed in 0..REPLICAS {
        let inbox = Inbox::connect(&url).await.expect("the inbox opens");
        replicas.push(tokio::spawn(replica(inbox, seed)));
    }
    let mut processed: HashMap<(String, Uuid), usize> = HashMap::new();
    for replica in replicas {
        for key in replica.await.unwrap().unwrap_or_else(|e| panic!("{e}")) {
            *processed.entry(key).or_default() += 1;
        }
    }

    let repeated: Vec<_> = processed.iter().filter(|(_, times)| **times > 1).collect();
    assert_eq!(repeated, Vec::<(&(String, Uuid), &usize)>::new());
    let inbox = Inbox::connect(&url).await.unwrap();
    for table in ["inbox", "events"] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(inbox.pool())
                .await
                .unwrap();
        assert_eq!(rows as usize, processed.len(), "rows in {table}");
    }
}

#[tokio::test]
async fn an_inbox_keyed_by_the_message_id_alone_stops_the_start() {
    let first_version = "CREATE TABLE inbox (message_id TEXT PRIMARY KEY, \
        event_type TEXT NOT NULL, subject TEXT NOT NULL, processed_at TEXT NOT NULL)";
    let error = refusal_over(first_version).await;
    let expected = "the inbox table cannot take this version's inserts (there is no unique or \
                    exclusion constraint matching the ON CONFLICT specification): it needs a \
                    primary key on (message_id, subject)";
    assert!(error.contains(expected), "{error}");
}

/// Starts an inbox over a fresh database whose `inbox` table `schema`
/// made, and returns why the start was refused.
async fn refusal_over(schema: &str) -> String {
    let url = fresh_postgres_database().await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    pool.execute(sqlx::AssertSqlSafe(schema.to_owned())).await.unwrap();
    let refused = Inbox::connect(&url).await.err().expect("the start is refused").to_string();
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM inbox").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 0, "the check's markers were rolled back");
    refused
}

#[tokio::test]
async fn inbox_tables_that_refuse_what_the_plan_of_an_insert_allows_stop_the_start() {
    let columns = "event_type TEXT NOT NULL, processed_at TEXT NOT NULL";
    // PostgreSQL refuses a deferrable arbiter only when the insert runs.
    let deferrable = format!(
        "CREATE TABLE inbox (subject TEXT NOT NULL, message_id TEXT NOT NULL, {columns}, \
         PRIMARY KEY (message_id, subject) DEFERRABLE INITIALLY IMMEDIATE)"
    );
    let error = refusal_over(&deferrable).await;
    let expected = "the inbox table cannot take this version's inserts (ON CONFLICT does not \
                    support deferrable unique constraints/exclusion constraints as arbiters)";
    assert!(error.contains(expected), "{error}");

    // CHAR columns: the markers go in, but do not read back as text.
    let padded = format!(
        "CREATE TABLE inbox (subject CHAR(64) NOT NULL, message_id CHAR(40) NOT NULL, \
         {columns}, PRIMARY KEY (message_id, subject))"
    );
    let error = refusal_over(&padded).await;
    let expected = "the inbox table's columns do not read back as text";
    assert!(error.contains(expected), "{error}");

    // The first version's key kept beside the new one.
    let half_migrated = format!(
        "CREATE TABLE inbox (message_id TEXT PRIMARY KEY, subject TEXT NOT NULL, {columns}); \
         CREATE UNIQUE INDEX inbox_pair ON inbox (message_id, subject)"
    );
    let error = refusal_over(&half_migrated).await;
    let expected = "the inbox table cannot take this version's inserts (duplicate key value \
                    violates unique constraint \"inbox_pkey\"): a unique key narrower than \
                    (message_id, subject)";
    assert!(error.contains(expected), "{error}");
}

#[tokio::test]
async fn a_search_path_pinned_in_the_url_keeps_the_tables_when_a_schema_would_hide_them() {
    let url = fresh_postgres_database().await;
    let pinned = format!("{url}?options=-csearch_path%3Dpublic");
    let inbox = Inbox::connect(&pinned).await.unwrap();
    let a = event("u1", 1);
    assert_eq!(inbox.process(&a, &RecordEvents).await, Ok(InboxOutcome::Processed));
    inbox.pool().close().await;

    // A schema named like the role comes first on the default search_path.
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    pool.execute("DO $$ BEGIN EXECUTE format('CREATE SCHEMA %I', current_user); END $$")
        .await
        .unwrap();
    let inbox = Inbox::connect(&pinned).await.unwrap();
    assert_eq!(inbox.process(&a, &RecordEvents).await, Ok(InboxOutcome::Duplicate));
    let hidden = Inbox::connect(&url).await.unwrap();
    assert_eq!(
        hidden.process(&a, &RecordEvents).await,
        Ok(InboxOutcome::Processed),
        "without the pin the consumer uses new tables in the role's schema"
    );
}
