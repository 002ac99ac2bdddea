//! The secure consumer's steps one by one, each timed alone through the
//! public APIs on the benchmark's own records: where a message's time
//! goes, without Kafka and without the other steps. For the inbox it also
//! times one multi-row `INSERT` per batch through the same connection
//! pool, the alternative to the inbox's one statement per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_identity::contract::{parse_data, parse_headers};
use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity::{VerifiedClaims, Verifier, VerifierConfig};
use event_identity_consumer::inbox::InboxOutcome;
use event_identity_consumer::routes::RouteSpec;
use event_identity_consumer::{Event, Handler, HandlerFuture, Inbox, RecordEvents, Routes};
use serde::Serialize;
use serde_json::Value;
use sqlx::AnyConnection;

use crate::cli::StepsArgs;
use crate::run::default_postgres;
use crate::workload::{self, event_data};
use crate::{CONSUMER_AUDIENCE, EVENT_SCOPE, EVENT_TYPE};

/// The cost of one step.
#[derive(Serialize, Debug, Clone)]
pub struct Step {
    /// What was timed.
    pub step: String,
    /// Wall time per message, in microseconds.
    pub us_per_message: f64,
    /// Messages timed.
    pub messages: u64,
}

/// A handler that does nothing, as variant (b) uses.
struct NoEffect;

impl Handler for NoEffect {
    fn handle<'a>(&'a self, _event: &'a Event, _tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// Times each step `args.rounds` times and keeps each step's fastest
/// round: on a shared machine the fastest is the one least disturbed.
pub async fn run(args: StepsArgs) -> anyhow::Result<Vec<Step>> {
    let mut best: Vec<Step> = Vec::new();
    for round in 1..=args.rounds {
        eprintln!("steps: round {round} of {}", args.rounds);
        let steps = measure(&args).await?;
        if best.is_empty() {
            best = steps;
            continue;
        }
        for (best, step) in best.iter_mut().zip(steps) {
            if step.us_per_message < best.us_per_message {
                *best = step;
            }
        }
    }
    Ok(best)
}

/// Times each step once; prints each figure as it goes.
async fn measure(args: &StepsArgs) -> anyhow::Result<Vec<Step>> {
    let n = args.messages;
    let mut steps = Vec::new();
    let mut record = |step: &str, elapsed: Duration, messages: u64| {
        let result = Step {
            step: step.to_owned(),
            us_per_message: elapsed.as_secs_f64() * 1e6 / messages.max(1) as f64,
            messages,
        };
        eprintln!("steps: {:>9.2} µs/msg  {step}", result.us_per_message);
        steps.push(result);
    };

    // The records' parts, as the filled topics hold them.
    let issuer = DevIssuer::start().await?;
    issuer.add_key("steps-k1", KeyMaterial::Rsa1);
    let tokens = workload::event_tokens(&issuer, "steps-k1", args.users);
    let values: Vec<String> =
        (0..n).map(|i| event_data(i, i % args.users, args.payload_bytes).to_string()).collect();
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let authorizations: Vec<String> = tokens.iter().map(|t| format!("Bearer {t}")).collect();

    let started = Instant::now();
    let mut data = Vec::with_capacity(n as usize);
    for value in &values {
        data.push(parse_data(Some(value.as_bytes())).map_err(|e| anyhow::anyhow!("{e}"))?.1);
    }
    record("parse the JSON value (contract::parse_data, strict)", started.elapsed(), n);

    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let authorization = &authorizations[i % authorizations.len()];
        let pairs: [(&str, Option<&[u8]>); 6] = [
            ("ce_specversion", Some(b"1.0")),
            ("ce_id", Some(id.as_bytes())),
            ("ce_type", Some(EVENT_TYPE.as_bytes())),
            ("ce_source", Some(b"/bench-writer")),
            ("content-type", Some(b"application/json")),
            ("authorization", Some(authorization.as_bytes())),
        ];
        parse_headers(pairs).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    record("parse the headers (contract::parse_headers)", started.elapsed(), n);

    let verifier = verifier(&issuer, 10_000).await?;
    for token in &tokens {
        verifier.verify(token).await?;
    }
    let started = Instant::now();
    let mut claims = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        claims.push(verifier.verify(&tokens[i % tokens.len()]).await?);
    }
    record("verify the token, cache hit (Verifier::verify)", started.elapsed(), n);

    let uncached = verifier_without_cache(&issuer).await?;
    let misses = n.min(2_000);
    let started = Instant::now();
    for i in 0..misses as usize {
        uncached.verify(&tokens[i % tokens.len()]).await?;
    }
    record("verify the token, no cache (RS256 signature)", started.elapsed(), misses);

    let spec: RouteSpec =
        format!("type={EVENT_TYPE},scope={EVENT_SCOPE},claim_equals_field=tenant:tenant")
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let routes = Routes::from_specs(&[spec]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    for (claims, data) in claims.iter().zip(&data) {
        let route = routes.get(EVENT_TYPE).context("the route")?;
        claims.check_exact_scope(&route.scope)?;
        route.authorize(claims, data).map_err(anyhow::Error::msg)?;
    }
    record("exact scope and the tenant rule (Route::authorize)", started.elapsed(), n);

    let events: Vec<Event> = claims
        .into_iter()
        .zip(data)
        .enumerate()
        .map(|(i, (claims, data))| event(i as i64, claims, data))
        .collect();

    let dir = tempfile::tempdir()?;
    let postgres = args.postgres.clone().unwrap_or_else(default_postgres);
    let mut inboxes = vec![
        ("in-memory SQLite", "sqlite::memory:".to_owned()),
        ("SQLite file", format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display())),
    ];
    let database = if args.no_postgres {
        None
    } else {
        let url = workload::create_database(&postgres).await?;
        inboxes.push(("PostgreSQL", url.clone()));
        Some(url)
    };

    let measured = async {
        for (name, url) in &inboxes {
            for (effect, handler) in [
                ("no-op handler", Arc::new(NoEffect) as Arc<dyn Handler>),
                ("RecordEvents", Arc::new(RecordEvents)),
            ] {
                // Empty tables each time, so no run finds another's rows.
                let inbox = Inbox::connect(url).await?;
                clear(&inbox).await?;
                let elapsed = batches(&inbox, &events, args.batch, handler.as_ref()).await?;
                let step =
                    format!("inbox: {name}, {effect}, batches of {} (process_batch)", args.batch);
                record(&step, elapsed, n);
            }

            let inbox = Inbox::connect(url).await?;
            clear(&inbox).await?;
            let elapsed = multi_row_markers(&inbox, &events, args.batch).await?;
            let step = format!(
                "inbox: {name}, markers only, one multi-row INSERT per batch of {}",
                args.batch
            );
            record(&step, elapsed, n);
        }
        anyhow::Ok(())
    };
    let result = measured.await;
    if let Some(url) = database {
        workload::drop_database(&postgres, &url).await;
    }
    result?;
    Ok(steps)
}

async fn verifier(issuer: &DevIssuer, cache_capacity: usize) -> anyhow::Result<Verifier> {
    let mut config = VerifierConfig::new(issuer.issuer(), issuer.jwks_url(), CONSUMER_AUDIENCE);
    config.cache_capacity = cache_capacity;
    let verifier = Verifier::new(config, reqwest::Client::new())?;
    verifier.keys().refresh_now().await?;
    Ok(verifier)
}

async fn verifier_without_cache(issuer: &DevIssuer) -> anyhow::Result<Verifier> {
    verifier(issuer, 0).await
}

fn event(offset: i64, claims: Arc<VerifiedClaims>, data: Value) -> Event {
    Event {
        id: uuid::Uuid::now_v7(),
        event_type: EVENT_TYPE.to_owned(),
        source: "/bench-writer".to_owned(),
        time: None,
        data_text: data.to_string(),
        data,
        claims,
        topic: "bench-steps".to_owned(),
        partition: (offset % 6) as i32,
        offset,
    }
}

/// Settles `events` through `inbox` in batches of `batch`, as a worker
/// does (each must be new); the total time.
async fn batches(
    inbox: &Inbox,
    events: &[Event],
    batch: usize,
    handler: &dyn Handler,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for chunk in events.chunks(batch.max(1)) {
        let refs: Vec<&Event> = chunk.iter().collect();
        let outcomes = inbox.process_batch(&refs, handler).await?;
        anyhow::ensure!(
            outcomes.iter().all(|o| *o == InboxOutcome::Processed),
            "the inbox found duplicates: the timing would not be of new messages"
        );
    }
    Ok(started.elapsed())
}

/// Empties the inbox's tables, so the next timing inserts afresh.
async fn clear(inbox: &Inbox) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM inbox").execute(inbox.pool()).await?;
    sqlx::query("DELETE FROM events").execute(inbox.pool()).await?;
    Ok(())
}

/// Inserts the markers of `events`, one transaction and one multi-row
/// `INSERT ... ON CONFLICT DO NOTHING` per batch of `batch`: what the
/// inbox's per-message statements could become.
async fn multi_row_markers(
    inbox: &Inbox,
    events: &[Event],
    batch: usize,
) -> anyhow::Result<Duration> {
    let processed_at = "2026-01-01T00:00:00.000000Z";
    let started = Instant::now();
    for chunk in events.chunks(batch.max(1)) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${}, ${}, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4))
            .collect();
        // Built from placeholders only: no input in the statement's text.
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO inbox (subject, message_id, event_type, processed_at) VALUES {} \
             ON CONFLICT (message_id, subject) DO NOTHING",
            rows.join(", ")
        ));
        let mut query = sqlx::query(sql);
        for event in chunk {
            query = query
                .bind(event.claims.subject.clone())
                .bind(event.id.to_string())
                .bind(event.event_type.clone())
                .bind(processed_at);
        }
        let mut tx = inbox.pool().begin().await?;
        query.execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}
