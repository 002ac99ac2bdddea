//! The inbox: exactly one effect per message ID.
//!
//! Processing opens one database transaction, inserts each message's
//! marker into `inbox` if it is absent (an atomic insert on the primary
//! key, the pair of the verified subject and the message ID, so a record
//! under someone else's identity can never suppress a user's event), runs
//! the handler for the new ones inside the same transaction, and commits.
//! A marker already present means the effect is already durable: the
//! message is acknowledged without the handler. A handler that fails rolls
//! the transaction back, markers included, so a retry can succeed.
//! Markers older than the configured retention are purged.
//!
//! SQLite (one file, zero setup) is the embedded default; PostgreSQL serves
//! several replicas of one group. Both go through `sqlx`'s `Any` driver so
//! handlers are written once.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use event_identity::VerifiedClaims;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Executor as _, Row as _};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};
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
    /// The event data, parsed (what claims rules read).
    pub data: Value,
    /// The event data as the record carried it, JSON text: what is stored
    /// and forwarded, so no number or string is rewritten on the way.
    pub data_text: String,
    /// The verified claims of the event token: who asked for this work
    /// (shared with the verifier's cache).
    pub claims: Arc<VerifiedClaims>,
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
    /// An error about this row will be raised again on every retry:
    /// permanent. Anything else (connection lost, pool timeout, deadlock,
    /// disk full) may pass: transient.
    fn from(error: sqlx::Error) -> Self {
        match error.as_database_error().is_some_and(refuses_the_row) {
            true => Self::Permanent(format!("database: {error}")),
            false => Self::Transient(format!("database: {error}")),
        }
    }
}

/// Whether the database refused these values rather than failed: a
/// violated constraint; in PostgreSQL a data exception (class 22: a NUL
/// in text, a value out of range) or a program limit (class 54: a key
/// too large for its index); in SQLite a value too big, of the wrong type
/// or out of range (codes 18, 20, 25).
fn refuses_the_row(error: &dyn sqlx::error::DatabaseError) -> bool {
    use sqlx::error::ErrorKind::*;
    if matches!(
        error.kind(),
        UniqueViolation | ForeignKeyViolation | NotNullViolation | CheckViolation
    ) {
        return true;
    }
    match error.code().as_deref() {
        Some(code) if code.len() == 5 => code.starts_with("22") || code.starts_with("54"),
        Some(code) => matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(18 | 20 | 25)),
        None => false,
    }
}

/// The future a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// The effect of an event, run inside the inbox transaction: write through
/// `tx` and the effect commits atomically with the message's marker.
pub trait Handler: Send + Sync {
    /// Applies `event`'s effect.
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a>;

    /// Applies the effects of several events in one go, in order; the
    /// default calls [`Handler::handle`] for each. Override it when a
    /// batch can be written faster than its events one by one.
    fn handle_batch<'a>(
        &'a self,
        events: &'a [&'a Event],
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            for event in events {
                self.handle(event, tx).await?;
            }
            Ok(())
        })
    }

    /// Checks, in a transaction that is rolled back, that the tables the
    /// handler writes take its writes, so that one that refuses them stops
    /// the start instead of failing every event. The default checks
    /// nothing.
    fn check<'a>(&'a self, tx: &'a mut AnyConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        let _ = tx;
        Box::pin(async { Ok(()) })
    }

    /// Whether several events may share one transaction (the default).
    /// A handler with effects outside the database should say no: when one
    /// event of a shared transaction is refused, the others are rolled back
    /// and run again one at a time.
    fn batched(&self) -> bool {
        true
    }
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

/// How long SQLite waits for another connection's lock (milliseconds).
const BUSY_MS: u32 = 5_000;

/// How long the start-up check waits for another writer's lock in SQLite
/// before it plans its inserts instead of trying them (milliseconds).
const PROBE_BUSY_MS: u32 = 250;

/// The columns a marker insert names, and literal values to plan it with.
const MARKER_COLUMNS: &str = "subject, message_id, event_type, processed_at";
const MARKER_PLAN_VALUES: &str = "'', '', '', ''";

/// The columns an `events` insert names, and literal values to plan it with.
const EVENT_COLUMNS: &str = "message_id, event_type, source, subject, issuer, token_id, claims, \
                             data, kafka_topic, kafka_partition, kafka_offset, received_at";
const EVENT_PLAN_VALUES: &str = "'', '', '', '', '', NULL, '', '', '', 0, 0, ''";

fn is_sqlite(conn: &AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("sqlite")
}

/// The `EXPLAIN` of an insert of one row of `values` into `table`: both
/// databases match the conflict target and the columns when they plan it,
/// and planning takes no write lock.
fn plan(table: &str, columns: &str, values: &str) -> String {
    format!(
        "EXPLAIN INSERT INTO {table} ({columns}) VALUES ({values}) \
         ON CONFLICT (message_id, subject) DO NOTHING"
    )
}

/// The rows a start-up check writes (and rolls back): two subjects with one
/// message ID, and one subject with two, so that a unique key narrower than
/// (message ID, subject) refuses one of them. Real message IDs are UUIDs
/// of version 7 or 8, never the nil or the max UUID.
fn probe_events() -> [Event; 3] {
    let event = |subject: &str, id: Uuid| Event {
        id,
        event_type: "event-identity.start-up-check".to_owned(),
        source: "event-identity".to_owned(),
        time: None,
        data: Value::Object(Default::default()),
        data_text: "{}".to_owned(),
        claims: Arc::new(VerifiedClaims {
            subject: subject.to_owned(),
            issuer: String::new(),
            audience: Vec::new(),
            scopes: Vec::new(),
            expires_at: 0,
            issued_at: None,
            token_id: None,
            key_id: String::new(),
            claims: Default::default(),
        }),
        topic: String::new(),
        partition: 0,
        offset: 0,
    };
    let (first, second) = ("event-identity start-up check 1", "event-identity start-up check 2");
    [event(first, Uuid::nil()), event(second, Uuid::nil()), event(first, Uuid::max())]
}

/// What a start-up check of `table` concludes from `tried`, the result of
/// an insert of the probe rows. An error every insert would meet stops the
/// start with a line naming the table. When another writer holds a SQLite
/// database, the check plans the insert instead (`plan`), which finds a
/// missing key or column without the lock, and says so in the log.
async fn verdict(
    conn: &mut AnyConnection,
    table: &str,
    tried: Result<(), sqlx::Error>,
    plan: &str,
) -> Result<(), sqlx::Error> {
    let error = match tried {
        Ok(()) => return Ok(()),
        Err(error) if error.as_database_error().is_some_and(is_busy) => {
            tracing::warn!(
                table,
                "another writer holds the database: the start-up check of the table plans \
                 its inserts instead of trying them"
            );
            match conn.execute(AssertSqlSafe(plan.to_owned())).await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            }
        }
        Err(error) => error,
    };
    let message = match (&error, error.as_database_error()) {
        (sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_), _) => format!(
            "the {table} table's columns do not read back as text ({error}): subject and \
             message_id must be TEXT or VARCHAR; see \"Inbox tables\" in the README"
        ),
        (_, Some(database)) if no_matching_key(database) => format!(
            "the {table} table cannot take this version's inserts ({}): it needs a primary \
             key on (message_id, subject), which tables made by the first versions lack; see \
             \"Inbox tables\" in the README",
            database.message()
        ),
        (_, Some(database)) if database.kind() == sqlx::error::ErrorKind::UniqueViolation => {
            format!(
                "the {table} table cannot take this version's inserts ({}): a unique key \
                 narrower than (message_id, subject), such as the first versions' key on \
                 message_id, would let one user's record suppress another's event; see \
                 \"Inbox tables\" in the README",
                database.message()
            )
        }
        (_, Some(database)) => format!(
            "the {table} table cannot take this version's inserts ({}); see \"Inbox tables\" \
             in the README",
            database.message()
        ),
        (_, None) => return Err(error),
    };
    Err(sqlx::Error::InvalidArgument(message))
}

/// Whether `error` says that no unique key matches an insert's conflict
/// target: PostgreSQL's `invalid_column_reference` (42P10), SQLite's
/// "ON CONFLICT clause does not match ..." (a plain `SQLITE_ERROR`).
fn no_matching_key(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().as_deref() == Some("42P10")
        || error.message().starts_with("ON CONFLICT clause does not match")
}

/// Whether `error` is SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED` (codes 5
/// and 6, with their extended codes): another connection holds a lock.
fn is_busy(error: &dyn sqlx::error::DatabaseError) -> bool {
    match error.code().as_deref() {
        Some(code) if code.len() != 5 => {
            matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6))
        }
        _ => false,
    }
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
                        conn.execute(AssertSqlSafe(format!("PRAGMA busy_timeout = {BUSY_MS}")))
                            .await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        // 4 MiB of page cache (the default is 2 MiB) holds
                        // the tables' upper B-tree pages and their right
                        // edges, where UUID v7 message IDs insert.
                        conn.execute("PRAGMA cache_size = -4096").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let inbox = Self { pool };
        inbox.create_tables(sqlite).await?;
        inbox.check_markers().await?;
        Ok(inbox)
    }

    /// Checks that the `inbox` table takes this version's marker inserts
    /// and reads them back, so that a table that refuses them (made by an
    /// early version, keyed by the message ID alone) stops the start
    /// instead of failing every batch.
    async fn check_markers(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_probe().await?;
        let probes = probe_events();
        let probes: Vec<&Event> = probes.iter().collect();
        let tried = match insert_markers_returning(&mut tx, &probes, &now_text()).await {
            Ok(new) if new.iter().all(|new| *new) => Ok(()),
            Ok(new) => Err(sqlx::Error::InvalidArgument(format!(
                "the inbox table took {} of {} markers of the start-up check, which differ in \
                 subject or message ID; see \"Inbox tables\" in the README",
                new.iter().filter(|new| **new).count(),
                new.len()
            ))),
            Err(error) => Err(error),
        };
        let plan = plan("inbox", MARKER_COLUMNS, MARKER_PLAN_VALUES);
        let verdict = verdict(&mut tx, "inbox", tried, &plan).await;
        self.end_probe(tx, verdict).await
    }

    /// Checks that `handler`'s tables take its writes
    /// ([`Handler::check`]), so that one that refuses them stops the start
    /// instead of failing every event. [`crate::ConsumerBuilder::build`] calls it.
    pub async fn check_handler(&self, handler: &dyn Handler) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_probe().await?;
        let verdict = handler.check(&mut tx).await;
        self.end_probe(tx, verdict).await
    }

    /// The transaction of a start-up check, rolled back by
    /// [`Inbox::end_probe`]. In SQLite, a write in it waits at most
    /// [`PROBE_BUSY_MS`] for another writer's lock rather than [`BUSY_MS`].
    async fn begin_probe(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if is_sqlite(&tx) {
            tx.execute(AssertSqlSafe(format!("PRAGMA busy_timeout = {PROBE_BUSY_MS}"))).await?;
        }
        Ok(tx)
    }

    async fn end_probe(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Any>,
        verdict: Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        let sqlite = is_sqlite(&tx);
        let rolled_back = tx.rollback().await;
        if sqlite {
            self.pool.execute(AssertSqlSafe(format!("PRAGMA busy_timeout = {BUSY_MS}"))).await?;
        }
        verdict.and(rolled_back)
    }

    /// The connection pool, for handlers' own queries and for tests.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn create_tables(&self, sqlite: bool) -> Result<(), sqlx::Error> {
        // In SQLite the markers' table is keyed by its primary key alone
        // (no rowid), so a marker is one B-tree insert rather than two.
        let inbox = format!(
            "CREATE TABLE IF NOT EXISTS inbox (
                subject TEXT NOT NULL,
                message_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                processed_at TEXT NOT NULL,
                PRIMARY KEY (message_id, subject)
            ){}",
            if sqlite { " WITHOUT ROWID" } else { "" }
        );
        let events = "CREATE TABLE IF NOT EXISTS events (
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
                PRIMARY KEY (message_id, subject)
            )";
        // Replicas starting together on one PostgreSQL database would race:
        // CREATE TABLE IF NOT EXISTS is not safe against a concurrent
        // create. A transaction-scoped advisory lock takes turns.
        let mut tx = self.pool.begin().await?;
        if !sqlite {
            tx.execute("DO $$ BEGIN PERFORM pg_advisory_xact_lock(7270110); END $$").await?;
        }
        for statement in [inbox, events.to_owned()] {
            tx.execute(AssertSqlSafe(statement)).await?;
        }
        tx.commit().await
    }

    /// Runs `handler` for `event` unless its message ID was processed
    /// before; marker and effect commit together or not at all.
    pub async fn process(
        &self,
        event: &Event,
        handler: &dyn Handler,
    ) -> Result<InboxOutcome, HandlerError> {
        let mut outcomes = self.process_batch(&[event], handler).await?;
        Ok(outcomes.pop().unwrap_or(InboxOutcome::Duplicate))
    }

    /// Runs `handler` for each of `events` whose message ID was not
    /// processed before, all in one transaction: every marker and effect
    /// commits, or none does. A message ID repeated within `events` runs
    /// once.
    pub async fn process_batch(
        &self,
        events: &[&Event],
        handler: &dyn Handler,
    ) -> Result<Vec<InboxOutcome>, HandlerError> {
        // Only the first record of a (subject, message ID) in the batch can
        // be new; the others are duplicates of it.
        let mut seen = HashSet::new();
        let first: Vec<bool> = events.iter().map(|e| seen.insert(marker_key(e))).collect();
        let candidates: Vec<&Event> =
            events.iter().zip(&first).filter(|(_, first)| **first).map(|(e, _)| *e).collect();

        // Markers go in in key order, the same in every consumer, so that
        // replicas inserting overlapping batches into one PostgreSQL inbox
        // wait for one another instead of deadlocking.
        let mut in_key_order = candidates.clone();
        in_key_order.sort_unstable_by_key(|e| marker_key(e));

        let processed_at = now_text();
        let mut tx = self.pool.begin().await?;
        let new = match insert_markers(&mut tx, &in_key_order, &processed_at).await? {
            true => vec![true; candidates.len()],
            false => {
                // Some were processed before: start again, learning which
                // markers each insert adds.
                tx.rollback().await?;
                tx = self.pool.begin().await?;
                let new = insert_markers_returning(&mut tx, &in_key_order, &processed_at).await?;
                let added: HashSet<_> = in_key_order
                    .iter()
                    .zip(new)
                    .filter(|(_, new)| *new)
                    .map(|(e, _)| marker_key(e))
                    .collect();
                candidates.iter().map(|e| added.contains(&marker_key(e))).collect()
            }
        };

        let fresh: Vec<&Event> =
            candidates.iter().zip(&new).filter(|(_, new)| **new).map(|(e, _)| *e).collect();
        // On error the transaction is dropped, which rolls it back.
        handler.handle_batch(&fresh, &mut tx).await?;
        tx.commit().await?;

        let mut new = new.into_iter();
        let outcomes = first
            .into_iter()
            .map(|first| match first && new.next().unwrap_or(false) {
                true => InboxOutcome::Processed,
                false => InboxOutcome::Duplicate,
            })
            .collect();
        Ok(outcomes)
    }

    /// Deletes markers older than `retention`; returns how many. A message
    /// re-delivered or replayed after its marker is gone runs again, so
    /// keep markers longer than any message can wait or be replayed.
    pub async fn purge(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let now = OffsetDateTime::now_utc();
        let cutoff = now.checked_sub(retention.try_into().unwrap_or(time::Duration::MAX));
        let Some(cutoff) = cutoff else { return Ok(0) };
        let deleted = sqlx::query("DELETE FROM inbox WHERE processed_at < $1")
            .bind(format_time(cutoff))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }
}

/// An inbox marker's key, in the order markers are inserted.
fn marker_key(event: &Event) -> (Uuid, &str) {
    (event.id, event.claims.subject.as_str())
}

/// Inserts the markers of `events` (distinct keys) and says whether all
/// of them were new; it stops at the first statement that finds one
/// present, leaving the transaction to be rolled back. The common case
/// (nothing processed before) thus returns no rows.
async fn insert_markers(
    tx: &mut AnyConnection,
    events: &[&Event],
    processed_at: &str,
) -> Result<bool, sqlx::Error> {
    for chunk in statements(events) {
        let insert = insert_markers_query(tx.backend_name(), chunk, processed_at, "");
        if insert.execute(&mut *tx).await?.rows_affected() != chunk.len() as u64 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Inserts the markers of `events` (distinct keys) that are absent and
/// says, for each event, whether its marker was new.
async fn insert_markers_returning(
    tx: &mut AnyConnection,
    events: &[&Event],
    processed_at: &str,
) -> Result<Vec<bool>, sqlx::Error> {
    // Events by key, to find each inserted row's event without copying keys.
    let index: HashMap<(&str, Uuid), usize> =
        events.iter().enumerate().map(|(i, e)| ((e.claims.subject.as_str(), e.id), i)).collect();
    let mut new = vec![false; events.len()];
    for chunk in statements(events) {
        let returning = " RETURNING subject, message_id";
        let insert = insert_markers_query(tx.backend_name(), chunk, processed_at, returning);
        for row in insert.fetch_all(&mut *tx).await? {
            let subject: &str = row.try_get(0)?;
            let id: &str = row.try_get(1)?;
            let found = Uuid::parse_str(id).ok().and_then(|id| index.get(&(subject, id)));
            if let Some(&i) = found {
                new[i] = true;
            }
        }
    }
    Ok(new)
}

/// One statement inserting the markers of `chunk` that are absent, ending
/// with `tail`.
fn insert_markers_query<'q>(
    backend: &str,
    chunk: &[&'q Event],
    processed_at: &'q str,
    tail: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let sql = format!(
        "INSERT INTO inbox ({MARKER_COLUMNS}) VALUES {}
         ON CONFLICT (message_id, subject) DO NOTHING{tail}",
        placeholders(backend, chunk.len(), 4)
    );
    let mut insert = sqlx::query(AssertSqlSafe(sql));
    for event in chunk {
        insert = insert
            .bind(&event.claims.subject)
            .bind(event.id.to_string())
            .bind(&event.event_type)
            .bind(processed_at);
    }
    insert
}

/// The default handler: records the verified event and the identity it
/// carried in the `events` table.
pub struct RecordEvents;

impl Handler for RecordEvents {
    fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async move { record_events(&[event], tx).await.map_err(HandlerError::from) })
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [&'a Event],
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move { record_events(events, tx).await.map_err(HandlerError::from) })
    }

    fn check<'a>(&'a self, tx: &'a mut AnyConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let probes = probe_events();
            let probes: Vec<&Event> = probes.iter().collect();
            let tried = record_events(&probes, tx).await;
            verdict(tx, "events", tried, &plan("events", EVENT_COLUMNS, EVENT_PLAN_VALUES)).await
        })
    }
}

/// Writes one `events` row per event, many rows per statement.
async fn record_events(events: &[&Event], tx: &mut AnyConnection) -> Result<(), sqlx::Error> {
    let received_at = now_text();
    for chunk in statements(events) {
        let sql = format!(
            "INSERT INTO events ({EVENT_COLUMNS}) VALUES {}
             ON CONFLICT (message_id, subject) DO NOTHING",
            placeholders(tx.backend_name(), chunk.len(), 12)
        );
        let texts: Vec<(String, String, &str)> = chunk
            .iter()
            .map(|e| (e.id.to_string(), json_text(&e.claims.claims), e.data_text.as_str()))
            .collect();
        let mut insert = sqlx::query(AssertSqlSafe(sql));
        for (event, (id, claims, data)) in chunk.iter().zip(&texts) {
            insert = insert
                .bind(id)
                .bind(&event.event_type)
                .bind(&event.source)
                .bind(&event.claims.subject)
                .bind(&event.claims.issuer)
                .bind(event.claims.token_id.as_deref())
                .bind(claims)
                .bind(data)
                .bind(&event.topic)
                .bind(event.partition)
                .bind(event.offset)
                .bind(&received_at);
        }
        insert.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Most rows per multi-row statement, so that a batch of the default size
/// (256) is one statement per table: at most 3,072 parameters, well below
/// what SQLite (32,766) and PostgreSQL (65,535) allow in one statement.
/// Each statement is a round trip to the database (for SQLite, to its
/// worker thread).
const ROWS_PER_STATEMENT: usize = 256;

/// `rows` cut into the multi-row statements that insert them: each as
/// large as possible, with a power of two of rows up to
/// [`ROWS_PER_STATEMENT`]. A statement's text depends on its row count,
/// and every connection keeps each text it ran prepared: with nine row
/// counts, each kind of insert has at most nine texts per connection,
/// where any count from 1 to 256 could fill the cache (a hundred per
/// connection) with statements of thousands of parameters.
fn statements<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        let take = match rest.len() {
            0 => return None,
            n => 1 << n.min(ROWS_PER_STATEMENT).ilog2(),
        };
        let (statement, after) = rest.split_at(take);
        rest = after;
        Some(statement)
    })
}

/// `(?, ?), (?, ?), ...` (SQLite) or `($1, $2), ($3, $4), ...` (others)
/// for `rows` rows of `columns` values. SQLite gets anonymous parameters:
/// sqlx looks each numbered one up by name, which SQLite does by a linear
/// scan, so numbered ones cost time quadratic in their count.
fn placeholders(backend: &str, rows: usize, columns: usize) -> String {
    let sqlite = backend.eq_ignore_ascii_case("sqlite");
    let mut sql = String::with_capacity(rows * columns * 6);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 1..=columns {
            if c > 1 {
                sql.push_str(", ");
            }
            match sqlite {
                true => sql.push('?'),
                false => {
                    let _ = write!(sql, "${}", r * columns + c);
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// A JSON object as text.
fn json_text(map: &serde_json::Map<String, Value>) -> String {
    serde_json::to_string(map).unwrap_or_else(|_| "{}".to_owned())
}

/// Times are stored as fixed-width UTC text (microseconds), so that text
/// order is time order in both databases.
const TIME_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

fn format_time(time: OffsetDateTime) -> String {
    time.to_offset(UtcOffset::UTC).format(TIME_FORMAT).unwrap_or_default()
}

fn now_text() -> String {
    format_time(OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(subject: &str, n: u128) -> Event {
        Event {
            id: Uuid::from_u128(n),
            event_type: "com.example.order.created".to_owned(),
            source: "urn:test".to_owned(),
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
            topic: "t".to_owned(),
            partition: 0,
            offset: n as i64,
        }
    }

    async fn inbox() -> (Inbox, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
        (Inbox::connect(&url).await.unwrap(), dir)
    }

    async fn count(inbox: &Inbox, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(inbox.pool()).await.unwrap()
    }

    /// Refuses the event with a given message ID.
    struct Refuse(Uuid);

    impl Handler for Refuse {
        fn handle<'a>(&'a self, event: &'a Event, tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
            Box::pin(async move {
                if event.id == self.0 {
                    return Err(HandlerError::Permanent("refused".to_owned()));
                }
                RecordEvents.handle(event, tx).await
            })
        }
    }

    #[tokio::test]
    async fn a_batch_runs_each_message_id_once_per_subject() {
        let (inbox, _dir) = inbox().await;
        let (a, b, again, other) = (event("u1", 1), event("u1", 2), event("u1", 1), event("u2", 1));
        let outcomes = inbox.process_batch(&[&a, &b, &again, &other], &RecordEvents).await.unwrap();
        use InboxOutcome::*;
        assert_eq!(outcomes, [Processed, Processed, Duplicate, Processed]);

        let outcomes = inbox.process_batch(&[&b, &a], &RecordEvents).await.unwrap();
        assert_eq!(outcomes, [Duplicate, Duplicate]);
        assert_eq!((count(&inbox, "inbox").await, count(&inbox, "events").await), (3, 3));
    }

    /// An inbox over a database whose tables `schema` made first.
    async fn inbox_over(schema: &str) -> (Result<Inbox, sqlx::Error>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
        sqlx::any::install_default_drivers();
        let pool = AnyPool::connect(&url).await.unwrap();
        pool.execute(AssertSqlSafe(schema.to_owned())).await.unwrap();
        pool.close().await;
        (Inbox::connect(&url).await, dir)
    }

    #[tokio::test]
    async fn tables_keyed_by_the_message_id_alone_stop_the_start_and_older_key_orders_work() {
        let marker = "subject TEXT NOT NULL, event_type TEXT NOT NULL, processed_at TEXT NOT NULL";
        let first = format!("CREATE TABLE inbox (message_id TEXT PRIMARY KEY, {marker})");
        let (refused, _first_dir) = inbox_over(&first).await;
        let error = refused.err().expect("the start is refused").to_string();
        let expected = "the inbox table cannot take this version's inserts (ON CONFLICT clause \
                        does not match any PRIMARY KEY or UNIQUE constraint): it needs a primary \
                        key on (message_id, subject)";
        assert!(error.contains(expected), "{error}");

        let reordered = format!(
            "CREATE TABLE inbox (message_id TEXT NOT NULL, {marker}, PRIMARY KEY (subject, message_id))"
        );
        let (opened, _reordered_dir) = inbox_over(&reordered).await;
        let inbox = opened.expect("a (subject, message_id) key works");
        let a = event("u1", 1);
        let outcomes = inbox.process_batch(&[&a, &a], &RecordEvents).await.unwrap();
        assert_eq!(outcomes, [InboxOutcome::Processed, InboxOutcome::Duplicate]);
    }

    #[tokio::test]
    async fn a_table_without_a_column_the_inserts_name_stops_the_start_naming_it() {
        let schema = "CREATE TABLE inbox (message_id TEXT NOT NULL, subject TEXT NOT NULL, \
                      processed_at TEXT NOT NULL, PRIMARY KEY (message_id, subject))";
        let (refused, _dir) = inbox_over(schema).await;
        let error = refused.err().expect("the start is refused").to_string();
        let expected = "the inbox table cannot take this version's inserts (table inbox has no \
                        column named event_type); see \"Inbox tables\"";
        assert!(error.contains(expected), "{error}");
    }

    #[tokio::test]
    async fn tables_that_refuse_what_the_plan_of_an_insert_allows_stop_the_start() {
        // A read-only database: every marker insert would fail.
        let (inbox, dir) = inbox().await;
        inbox.pool().close().await;
        let read_only = format!("sqlite://{}?mode=ro", dir.path().join("inbox.db").display());
        let error = Inbox::connect(&read_only).await.err().expect("refused").to_string();
        let expected = "the inbox table cannot take this version's inserts (attempt to write a \
                        readonly database); see \"Inbox tables\"";
        assert!(error.contains(expected), "{error}");

        // A first-version key kept beside the new one: a second subject's
        // marker for the same message ID would be refused.
        let half_migrated = "CREATE TABLE inbox (message_id TEXT PRIMARY KEY, subject TEXT NOT \
            NULL, event_type TEXT NOT NULL, processed_at TEXT NOT NULL); \
            CREATE UNIQUE INDEX inbox_pair ON inbox (message_id, subject)";
        let (refused, _dir) = inbox_over(half_migrated).await;
        let error = refused.err().expect("refused").to_string();
        let expected = "the inbox table cannot take this version's inserts (UNIQUE constraint \
                        failed: inbox.message_id): a unique key narrower than (message_id, \
                        subject)";
        assert!(error.contains(expected), "{error}");
    }

    /// A handler that writes nothing, and so checks nothing at start.
    struct Nothing;

    impl Handler for Nothing {
        fn handle<'a>(&'a self, _: &'a Event, _: &'a mut AnyConnection) -> HandlerFuture<'a> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn the_events_table_is_checked_for_the_handler_that_writes_it() {
        let unrelated = "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT)";
        let (opened, _dir) = inbox_over(unrelated).await;
        let beside = opened.expect("the inbox itself is fine");
        beside.check_handler(&Nothing).await.expect("a handler that does not write events");
        let error = beside.check_handler(&RecordEvents).await.expect_err("refused").to_string();
        let expected = "the events table cannot take this version's inserts (table events has \
                        no column named message_id)";
        assert!(error.contains(expected), "{error}");

        let columns = EVENT_COLUMNS.replace(", ", " TEXT, ");
        let extra_column = format!(
            "CREATE TABLE events ({columns} TEXT, tenant TEXT NOT NULL, \
             PRIMARY KEY (message_id, subject))"
        );
        let (opened, _dir) = inbox_over(&extra_column).await;
        let error = opened.unwrap().check_handler(&RecordEvents).await.unwrap_err().to_string();
        let expected = "the events table cannot take this version's inserts (NOT NULL \
                        constraint failed: events.tenant)";
        assert!(error.contains(expected), "{error}");

        // What the checks wrote is rolled back.
        let (inbox, _dir) = inbox().await;
        inbox.check_handler(&RecordEvents).await.unwrap();
        assert_eq!((count(&inbox, "inbox").await, count(&inbox, "events").await), (0, 0));
    }

    #[tokio::test]
    async fn a_replica_starts_while_another_holds_the_write_lock() {
        let (first, dir) = inbox().await;
        let mut writer = first.pool().acquire().await.unwrap();
        writer.execute("BEGIN IMMEDIATE").await.unwrap();
        writer
            .execute("INSERT INTO inbox VALUES ('u1', 'm1', 't', '2026-12-04T00:00:00Z')")
            .await
            .unwrap();

        let url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
        let second = Inbox::connect(&url).await.expect("the start needs no write lock");
        second.check_handler(&RecordEvents).await.expect("nor does the handler's check");
        writer.execute("COMMIT").await.unwrap();
        assert_eq!(count(&second, "inbox").await, 1);

        // Under the lock, the plan of the insert still finds a missing key.
        let first_version = "CREATE TABLE inbox (message_id TEXT PRIMARY KEY, subject TEXT, \
                             event_type TEXT, processed_at TEXT)";
        let (refused, dir) = inbox_over(first_version).await;
        assert!(refused.is_err());
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
        let mut writer = <AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
        writer.execute("BEGIN IMMEDIATE").await.unwrap();
        let error = Inbox::connect(&url).await.err().expect("refused under the lock").to_string();
        let expected = "the inbox table cannot take this version's inserts (ON CONFLICT clause \
                        does not match any PRIMARY KEY or UNIQUE constraint): it needs";
        assert!(error.contains(expected), "{error}");
    }

    #[test]
    fn statements_have_a_power_of_two_of_rows_up_to_the_most() {
        let sizes = |n: usize| statements(&vec![0u8; n]).map(<[u8]>::len).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(200), [128, 64, 8]);
        assert_eq!(sizes(256), [256]);
        assert_eq!(sizes(2 * ROWS_PER_STATEMENT + 13), [256, 256, 8, 4, 1]);
    }

    #[tokio::test]
    async fn batches_larger_than_one_statement_keep_every_outcome_in_order() {
        let (inbox, _dir) = inbox().await;
        let unique = 2 * ROWS_PER_STATEMENT + 12;
        let events: Vec<Event> = (0..unique + 10).map(|n| event("u1", (n % unique) as _)).collect();
        let refs: Vec<&Event> = events.iter().collect();
        let outcomes = inbox.process_batch(&refs, &RecordEvents).await.unwrap();
        let processed = outcomes.iter().filter(|o| **o == InboxOutcome::Processed).count();
        assert_eq!(processed, unique);
        assert!(outcomes[unique..].iter().all(|o| *o == InboxOutcome::Duplicate));
        assert_eq!(
            (count(&inbox, "inbox").await, count(&inbox, "events").await),
            (unique as i64, unique as i64)
        );

        let again = inbox.process_batch(&refs[..70], &RecordEvents).await.unwrap();
        assert!(again.iter().all(|o| *o == InboxOutcome::Duplicate));

        // A first statement of new markers, then one with old ones among
        // new: the batch starts again and still commits every new one.
        let more: Vec<Event> = (unique..unique + ROWS_PER_STATEMENT + 5)
            .map(|n| event("u1", n as _))
            .chain((0..20).map(|n| event("u1", n as _)))
            .collect();
        let refs: Vec<&Event> = more.iter().collect();
        let outcomes = inbox.process_batch(&refs, &RecordEvents).await.unwrap();
        let fresh = ROWS_PER_STATEMENT + 5;
        assert!(outcomes[..fresh].iter().all(|o| *o == InboxOutcome::Processed));
        assert!(outcomes[fresh..].iter().all(|o| *o == InboxOutcome::Duplicate));
        let total = unique + fresh;
        assert_eq!(
            (count(&inbox, "inbox").await, count(&inbox, "events").await),
            (total as i64, total as i64)
        );
    }

    #[tokio::test]
    async fn a_refused_event_rolls_back_the_whole_batch_markers_included() {
        let (inbox, _dir) = inbox().await;
        let (a, b) = (event("u1", 1), event("u1", 2));
        let error = inbox.process_batch(&[&a, &b], &Refuse(b.id)).await.unwrap_err();
        assert_eq!(error, HandlerError::Permanent("refused".to_owned()));
        assert_eq!((count(&inbox, "inbox").await, count(&inbox, "events").await), (0, 0));

        assert_eq!(inbox.process(&a, &Refuse(b.id)).await.unwrap(), InboxOutcome::Processed);
        assert_eq!((count(&inbox, "inbox").await, count(&inbox, "events").await), (1, 1));
    }

    #[tokio::test]
    async fn purge_deletes_only_markers_older_than_the_retention() {
        let (inbox, _dir) = inbox().await;
        inbox.process(&event("u1", 1), &RecordEvents).await.unwrap();
        let old = format_time(OffsetDateTime::now_utc() - Duration::from_secs(7200));
        sqlx::query("UPDATE inbox SET processed_at = $1")
            .bind(old)
            .execute(inbox.pool())
            .await
            .unwrap();
        inbox.process(&event("u1", 2), &RecordEvents).await.unwrap();

        assert_eq!(inbox.purge(Duration::from_secs(3600)).await.unwrap(), 1);
        assert_eq!(count(&inbox, "inbox").await, 1);
        assert_eq!(inbox.purge(Duration::from_secs(3600)).await.unwrap(), 0);
        // A retention reaching before any representable date purges nothing.
        assert_eq!(inbox.purge(Duration::from_secs(1_000_000_000_000)).await.unwrap(), 0);
        assert_eq!(count(&inbox, "inbox").await, 1);
    }

    #[test]
    fn sqlite_gets_anonymous_parameters_and_others_numbered_ones() {
        assert_eq!(placeholders("SQLite", 2, 3), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(placeholders("PostgreSQL", 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders("PostgreSQL", 1, 1), "($1)");
    }

    #[test]
    fn stored_times_sort_as_text_in_time_order() {
        let t = OffsetDateTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_100);
        let later = t + Duration::from_millis(20);
        assert_eq!(format_time(t), "2023-11-14T22:13:20.100000Z");
        assert!(format_time(t) < format_time(later));
    }
}
