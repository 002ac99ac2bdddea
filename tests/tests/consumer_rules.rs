//! The consumer's checks on the real broker, with event tokens from the
//! development issuer so that tests can mint any claims: who may cause an
//! effect, and what is dead-lettered with which reason.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_tests::*;
use serde_json::{Value, json};

fn event_claims(issuer: &DevIssuer, subject: &str) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    json!({
        "iss": issuer.issuer(), "sub": subject, "aud": CONSUMER_AUDIENCE,
        "scope": EVENT_SCOPE, "tenant": "acme", "iat": now, "exp": now + 3600,
    })
}

fn order(tenant: &str) -> Vec<u8> {
    json!({"order_id": "o-1", "tenant": tenant}).to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_under_another_identity_cannot_suppress_a_users_event() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;
    let id = "9f1c0000-0000-7000-8000-000000000001";

    // Someone holding another user's valid token writes first, under the
    // ID the user's event will carry.
    let squatter = issuer.sign("k1", &event_claims(&issuer, "user-2"));
    write_record(&topic, id, Some(&squatter), &order("acme")).await;
    let user = issuer.sign("k1", &event_claims(&issuer, "user-1"));
    write_record(&topic, id, Some(&user), &order("acme")).await;
    // The user's own retry is a duplicate.
    write_record(&topic, id, Some(&user), &order("acme")).await;

    consumer
        .wait_for("three settled records", Duration::from_secs(60), |s| {
            s.processed.load(Ordering::Relaxed) + s.duplicates.load(Ordering::Relaxed) == 3
        })
        .await;
    let subjects: Vec<String> = consumer.events_for(id).await.into_iter().map(|r| r.0).collect();
    assert_eq!(subjects, ["user-1", "user-2"]);
    assert_eq!(consumer.stats.duplicates.load(Ordering::Relaxed), 1);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_are_dead_lettered_with_their_reason() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;
    let valid = issuer.sign("k1", &event_claims(&issuer, "user-1"));
    let with = |changes: Value| {
        let mut claims = event_claims(&issuer, "user-1");
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        issuer.sign("k1", &claims)
    };

    let cases: Vec<(&str, Option<String>, Vec<u8>)> = vec![
        // C08: the event token still carries the user's API scope.
        (
            "00000000-0000-7000-8000-0000000000a1",
            Some(with(json!({"scope": "events:order.created orders:write"}))),
            order("acme"),
        ),
        (
            "00000000-0000-7000-8000-0000000000a2",
            Some(with(json!({"scp": ["orders:write"]}))),
            order("acme"),
        ),
        (
            "00000000-0000-7000-8000-0000000000a3",
            Some(with(json!({"scope": "openid"}))),
            order("acme"),
        ),
        // The claims rule: the token's tenant must be the data's tenant.
        ("00000000-0000-7000-8000-0000000000a4", Some(valid.clone()), order("globex")),
        // Data whose meaning depends on the parser.
        (
            "00000000-0000-7000-8000-0000000000a5",
            Some(valid.clone()),
            br#"{"tenant":"globex","tenant":"acme"}"#.to_vec(),
        ),
        // C11: bytes that are not JSON.
        ("00000000-0000-7000-8000-0000000000a6", Some(valid.clone()), vec![0xFF, 0xFE, 0x00]),
        (
            "00000000-0000-7000-8000-0000000000a7",
            Some(with(json!({"aud": "invoice-consumer"}))),
            order("acme"),
        ),
        ("00000000-0000-7000-8000-0000000000a8", Some(with(json!({"exp": 1}))), order("acme")),
        ("00000000-0000-7000-8000-0000000000a9", Some(valid.clone()), order("acme")),
    ];
    for (id, token, value) in &cases {
        write_record(&topic, id, token.as_deref(), value).await;
    }

    consumer
        .wait_for("eight dead letters and one event", Duration::from_secs(60), |s| {
            s.dead_lettered.load(Ordering::Relaxed) == 8 && s.processed.load(Ordering::Relaxed) == 1
        })
        .await;
    let reasons = dead_letter_reasons(&topic).await;
    let expected: Vec<(String, String)> = [
        ("a1", "excess_scope"),
        ("a2", "excess_scope"),
        ("a3", "insufficient_scope"),
        ("a4", "forbidden"),
        ("a5", "malformed_payload"),
        ("a6", "malformed_payload"),
        ("a7", "invalid_audience"),
        ("a8", "expired"),
    ]
    .iter()
    .map(|(suffix, reason)| {
        (format!("00000000-0000-7000-8000-0000000000{suffix}"), reason.to_string())
    })
    .collect();
    assert_eq!(reasons, expected);
    assert_eq!(consumer.events_for("00000000-0000-7000-8000-0000000000a9").await.len(), 1);
    assert_eq!(consumer.event_count().await, 1);
    assert_eq!(consumer.stats.rejected().values().sum::<u64>(), 8);
    consumer.stop().await;
}

/// What the forwarding endpoint saw: each request's Idempotency-Key and body.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// An endpoint that answers by the event's `order_id`: `busy` gets one 503
/// then 200, `bad` always 422, anything else 200.
async fn forwarding_endpoint() -> (String, Seen) {
    use axum::http::{HeaderMap, StatusCode};
    let seen = Seen::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, axum::Json(body): axum::Json<Value>| {
            let seen = record.clone();
            async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                let order = body["data"]["order_id"].as_str().unwrap_or_default().to_owned();
                let mut seen = seen.lock().unwrap();
                let earlier = seen.iter().filter(|(k, _)| *k == key).count();
                seen.push((key, body));
                match (order.as_str(), earlier) {
                    ("busy", 0) => (StatusCode::SERVICE_UNAVAILABLE, "try later"),
                    ("bad", _) => (StatusCode::UNPROCESSABLE_ENTITY, "no such product"),
                    _ => (StatusCode::OK, "ok"),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarding_handler_posts_verified_identity_retries_5xx_and_dead_letters_4xx() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let (url, seen) = forwarding_endpoint().await;
    let topic = fresh_topic(1).await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        config.forward_url = Some(url);
        event_identity_consumer::ConsumerBuilder::new(config)
    })
    .await;

    let token = issuer.sign("k1", &event_claims(&issuer, "user-1"));
    let ids = ["9f1c0000-0000-7000-8000-00000000000a", "9f1c0000-0000-7000-8000-00000000000b"];
    let bad = "9f1c0000-0000-7000-8000-00000000000c";
    for (id, order) in [(ids[0], "ok"), (ids[1], "busy"), (bad, "bad"), (ids[0], "ok")] {
        let data = json!({"order_id": order, "tenant": "acme"}).to_string();
        write_record(&topic, id, Some(&token), data.as_bytes()).await;
    }
    consumer.wait_for("four settled records", Duration::from_secs(60), |s| s.settled() == 4).await;

    let stats = &consumer.stats;
    let counts = [&stats.processed, &stats.duplicates, &stats.dead_lettered, &stats.retries];
    let counts: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(counts, [2, 1, 1, 1], "processed, duplicates, dead-lettered, retries");
    assert_eq!(dead_letter_reasons(&topic).await, [(bad.to_owned(), "handler_rejected".into())]);

    // ok once, busy twice (503, then 200), bad once; the repeat of the first
    // is a duplicate and is not forwarded.
    let seen = seen.lock().unwrap().clone();
    let orders: Vec<&str> =
        seen.iter().map(|(_, b)| b["data"]["order_id"].as_str().unwrap()).collect();
    assert_eq!(orders, ["ok", "busy", "busy", "bad"]);
    let (key, body) = &seen[0];
    let expected_key =
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("user-1\0{}", ids[0]).as_bytes());
    assert_eq!(key, &expected_key.to_string());
    assert_eq!(body["id"], ids[0]);
    assert_eq!(body["identity"]["subject"], "user-1");
    assert_eq!(body["identity"]["issuer"], issuer.issuer());
    assert_eq!(body["identity"]["claims"]["tenant"], "acme");
    assert_eq!(body["kafka"]["offset"], 0);
    assert!(body.to_string().find(&token).is_none(), "the event token is never forwarded");
    consumer.stop().await;
}
