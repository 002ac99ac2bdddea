//! The inbox: exactly one effect per message ID.
//!
//! Processing a message opens one database transaction, inserts the
//! message ID into `inbox` if it is absent (an atomic insert on the primary
//! key, which is the pair of the verified subject and the message ID, so a
//! record under someone else's identity can never suppress a user's event), runs the handler inside the same transaction, and commits. A
//! message ID already present means the effect is already durable: the
//! transaction is rolled back and the message acknowledged. A handler that
//! fails rolls the transaction back, marker included, so a retry can
//! succeed.
//!
//! SQLite (one file, zero setup) is the embedded default; PostgreSQL serves
//! several replicas of one group. Both go through `sqlx`'s `Any` driver so
//! handlers are written once.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use event_identity::VerifiedClaims;
use serde_json::Value;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor as _};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// A verified, authorized event, as handed to a handler.
#[derive(Debug, Clone)]
pub struct Event {
    /// The message ID (`ce_id`).
    pub id: Uuid,
    /// The event type (`ce_type`).
    pub event_type: String,
    /// The producer (`ce_source`).
    pub source: String,
    /// Publication time as sent (`ce_time`).
    pub time: Option<String>,
    /// The event data.
    pub data: Value,
    /// The verified claims of the event token: who asked for this work.
    pub claims: VerifiedClaims,
    /// Where the record was read.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
}

/// A handler's failure.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandlerError {
    /// The event can never succeed: it is dead-lettered.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Retry later (a dependency is down); the message is retried in place.
    #[error("transient: {0}")]
    Transient(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        Self::Transient(format!("database: {error}"))
    }
}

/// The future a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// The effect of an event, run inside the inbox transaction: write through
/// `tx` and the effect commits atomically with the message's marker.
pub trait Handler: Send + Sync {
    /// Applies `event`'s effect.
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a>;
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// The effect ran and committed.
    Processed,
    /// The message ID was already processed; nothing ran.
    Duplicate,
}

/// The inbox database.
#[derive(Clone)]
pub struct Inbox {
    pool: AnyPool,
}

impl Inbox {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and creates
    /// the tables if they are missing.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let options: AnyConnectOptions = url.parse()?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets readers (tests, operators) look while the
                        // consumer writes; busy_timeout waits out their locks.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let inbox = Self { pool };
        inbox.create_tables().await?;
        Ok(inbox)
    }

    /// The connection pool, for handlers' own queries and for tests.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn create_tables(&self) -> Result<(), sqlx::Error> {
        for statement in [
            "CREATE TABLE IF NOT EXISTS inbox (
                subject TEXT NOT NULL,
                message_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                processed_at TEXT NOT NULL,
                PRIMARY KEY (subject, message_id)
            )",
            "CREATE TABLE IF NOT EXISTS events (
                message_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                source TEXT NOT NULL,
                subject TEXT NOT NULL,
                issuer TEXT NOT NULL,
                token_id TEXT,
                claims TEXT NOT NULL,
                data TEXT NOT NULL,
                kafka_topic TEXT NOT NULL,
                kafka_partition INTEGER NOT NULL,
                kafka_offset BIGINT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (subject, message_id)
            )",
        ] {
            self.pool.execute(statement).await?;
        }
        Ok(())
    }

    /// Runs `handler` for `event` unless its message ID was processed
    /// before; marker and effect commit together or not at all.
    pub async fn process(
        &self,
        event: &Event,
        handler: &dyn Handler,
    ) -> Result<InboxOutcome, HandlerError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO inbox (message_id, event_type, subject, processed_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject, message_id) DO NOTHING",
        )
        .bind(event.id.to_string())
        .bind(&event.event_type)
        .bind(&event.claims.subject)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(InboxOutcome::Duplicate);
        }

        // On error the transaction is dropped, which rolls it back.
        handler.handle(event, &mut tx).await?;
        tx.commit().await?;
        Ok(InboxOutcome::Processed)
    }
}

/// The default handler: records the verified event and the identity it
/// carried in the `events` table.
pub struct RecordEvents;

impl Handler for RecordEvents {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move {
            let claims = Value::Object(event.claims.claims.clone()).to_string();
            sqlx::query(
                "INSERT INTO events (message_id, event_type, source, subject, issuer, token_id, claims,
                    data, kafka_topic, kafka_partition, kafka_offset, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(event.id.to_string())
            .bind(&event.event_type)
            .bind(&event.source)
            .bind(&event.claims.subject)
            .bind(&event.claims.issuer)
            .bind(event.claims.token_id.clone())
            .bind(claims)
            .bind(event.data.to_string())
            .bind(&event.topic)
            .bind(event.partition)
            .bind(event.offset)
            .bind(now_rfc3339())
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}
