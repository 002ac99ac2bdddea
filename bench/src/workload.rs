//! The records the benchmark reads and writes: users' tokens signed by the
//! development issuer, JSON values of a fixed size, topics filled with
//! contract records, and the fresh topics and databases each run uses.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use event_identity::dev_issuer::DevIssuer;
use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::{CONSUMER_AUDIENCE, EVENT_SCOPE, EVENT_TYPE, PRODUCER_CLIENT_ID, TENANT};

/// How long the benchmark's tokens live: longer than any run.
const TOKEN_LIFETIME_S: i64 = 43_200;
/// Records written per round trip of the filler.
const FILL_CHUNK: usize = 20_000;

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The subject of user number `n`.
pub fn subject(n: u64) -> String {
    format!("user-{n:05}")
}

/// Event tokens of `users` users, as the producer would have obtained and
/// reused them: one event scope, the consumers' audience, the user's
/// tenant, twelve hours of life, signed with the issuer's key `kid`.
pub fn event_tokens(issuer: &DevIssuer, kid: &str, users: u64) -> Vec<String> {
    let now = now();
    (0..users)
        .map(|n| {
            let claims = json!({
                "iss": issuer.issuer(), "sub": subject(n), "aud": CONSUMER_AUDIENCE,
                "scope": EVENT_SCOPE, "azp": PRODUCER_CLIENT_ID, "tenant": TENANT,
                "jti": uuid::Uuid::new_v4().to_string(), "iat": now,
                "exp": now + TOKEN_LIFETIME_S,
            });
            issuer.sign(kid, &claims)
        })
        .collect()
}

/// User access tokens of `users` users for the producer: its client ID in
/// `aud`, the scope that may publish orders, the user's tenant.
pub fn user_tokens(issuer: &DevIssuer, kid: &str, users: u64) -> Vec<String> {
    let now = now();
    (0..users)
        .map(|n| {
            let claims = json!({
                "iss": issuer.issuer(), "sub": subject(n), "aud": PRODUCER_CLIENT_ID,
                "scope": "openid orders:write", "tenant": TENANT,
                "preferred_username": subject(n), "iat": now, "exp": now + TOKEN_LIFETIME_S,
            });
            issuer.sign(kid, &claims)
        })
        .collect()
}

/// Writes `tokens` one a line.
pub fn write_tokens(path: &Path, tokens: &[String]) -> anyhow::Result<()> {
    std::fs::write(path, tokens.join("\n")).with_context(|| format!("writing {}", path.display()))
}

/// Reads tokens written by [`write_tokens`].
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tokens: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    anyhow::ensure!(!tokens.is_empty(), "{} holds no tokens", path.display());
    Ok(tokens)
}

/// The event data of order `n` of user `user`: an order of the user's
/// tenant, padded with a note to `bytes` bytes of JSON.
pub fn event_data(n: u64, user: u64, bytes: u64) -> Value {
    let mut data = json!({
        "tenant": TENANT,
        "order_id": format!("order-{n:010}"),
        "customer": subject(user),
        "currency": "EUR",
        "total_cents": (n * 7_919) % 100_000,
        "items": [
            {"sku": format!("sku-{:06}", n % 977), "quantity": 1 + n % 5},
            {"sku": format!("sku-{:06}", n % 613), "quantity": 1 + n % 3},
        ],
        "note": "",
    });
    let len = data.to_string().len() as u64;
    if len < bytes {
        data["note"] = Value::String("x".repeat((bytes - len) as usize));
    }
    data
}

/// Kafka admin client for `bootstrap`.
fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("cannot create a Kafka admin client")
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let new = [NewTopic::new(topic, partitions, TopicReplication::Fixed(1))];
    let results = admin(bootstrap)?
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
        .await
        .with_context(|| format!("creating topic {topic} at {bootstrap}"))?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }
    Ok(())
}

/// Deletes `topics`; topics that do not exist are ignored.
pub async fn delete_topics(bootstrap: &str, topics: &[String]) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let deleted = match admin(bootstrap) {
        Ok(admin) => admin.delete_topics(&names, &AdminOptions::new()).await,
        Err(error) => {
            tracing::warn!(%error, "cannot delete the benchmark topics");
            return;
        }
    };
    if let Err(error) = deleted {
        tracing::warn!(%error, "deleting the benchmark topics failed");
    }
}

/// Fills `topic` with `count` event records spread round-robin over
/// `partitions`, record `n` of user `n % tokens.len()` carrying that
/// user's token, with the contract headers a direct writer sets (as
/// `write_events` of the integration tests does). Returns how long it took.
pub async fn fill(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    count: u64,
    tokens: &[String],
    payload_bytes: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let writer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create()
        .context("cannot create the filling producer")?;
    let authorizations: Vec<String> = tokens.iter().map(|t| format!("Bearer {t}")).collect();
    let users = tokens.len() as u64;

    let mut next = 0;
    while next < count {
        let end = (next + FILL_CHUNK as u64).min(count);
        let records: Vec<(i32, String, String, usize)> = (next..end)
            .map(|n| {
                let user = n % users;
                let value = event_data(n, user, payload_bytes).to_string();
                let id = uuid::Uuid::now_v7().to_string();
                ((n % partitions as u64) as i32, id, value, user as usize)
            })
            .collect();
        let sends = records.iter().map(|(partition, id, value, user)| {
            let headers = OwnedHeaders::new()
                .insert(Header { key: "ce_specversion", value: Some("1.0") })
                .insert(Header { key: "ce_id", value: Some(id.as_str()) })
                .insert(Header { key: "ce_type", value: Some(EVENT_TYPE) })
                .insert(Header { key: "ce_source", value: Some("/bench-writer") })
                .insert(Header { key: "content-type", value: Some("application/json") })
                .insert(Header {
                    key: "authorization",
                    value: Some(authorizations[*user].as_str()),
                });
            let record = FutureRecord::to(topic)
                .partition(*partition)
                .key(id.as_str())
                .payload(value.as_str())
                .headers(headers);
            writer.send_result(record).map_err(|(error, _)| error)
        });
        let queued: Vec<_> = sends.collect::<Result<_, _>>().context("queueing a record")?;
        for delivery in join_all(queued).await {
            delivery
                .context("the filling producer went away")?
                .map_err(|(error, _)| error)
                .context("writing a record")?;
        }
        next = end;
    }
    Ok(started.elapsed())
}

/// Creates a new, empty database on the PostgreSQL server at `server`
/// (a URL without a database); returns its URL.
pub async fn create_database(server: &str) -> anyhow::Result<String> {
    let admin_url = format!("{server}/postgres");
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.with_context(|| {
        format!(
            "PostgreSQL is not reachable at {admin_url}; start it with scripts/postgres.sh start"
        )
    })?;
    let name = format!("inbox_bench_{}", uuid::Uuid::new_v4().simple());
    // The name is ours (a UUID), not input: safe to put in the statement.
    let create = sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"));
    sqlx::query(create).execute(&mut admin).await.context("CREATE DATABASE")?;
    admin.close().await?;
    Ok(format!("{server}/{name}"))
}

/// Drops the database at `url`, made by [`create_database`] on `server`.
pub async fn drop_database(server: &str, url: &str) {
    let Some(name) = url.rsplit('/').next().filter(|n| n.starts_with("inbox_bench_")) else {
        return;
    };
    let dropped = async {
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres")).await?;
        let drop = sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        sqlx::query(drop).execute(&mut admin).await?;
        admin.close().await
    };
    if let Err(error) = dropped.await {
        tracing::warn!(%error, database = name, "dropping the benchmark database failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_data_has_the_requested_size_and_the_users_tenant() {
        for n in [0, 7, 123_456_789] {
            let data = event_data(n, n % 1_000, 300);
            assert_eq!(data.to_string().len(), 300);
            assert_eq!(data["tenant"], TENANT);
        }
    }
}
