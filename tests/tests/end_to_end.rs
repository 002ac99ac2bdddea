//! The main job end to end on the real broker and the real Keycloak:
//! a user's command becomes an identity-bearing event that the consumer
//! verifies, authorizes and records exactly once.

use std::time::Duration;

use event_identity_tests::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rdkafka::ClientConfig;
use rdkafka::message::{Header as KafkaHeader, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn order(key: &str) -> Value {
    json!({"type": EVENT_TYPE, "key": key, "data": {"order_id": key, "tenant": "acme", "total": 42}})
}

async fn post(
    url: &str,
    token: Option<&str>,
    idempotency_key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("producer answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_users_event_is_processed_once_with_their_identity() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let consumer = start_consumer(&topic).await;
    let token = alice_token().await;
    let alice = jwt_payload(&token);

    let response = post(&producer.events_url(), Some(&token), None, &order("order-1")).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().expect("a message id").to_owned();

    consumer
        .wait_for("one processed event", WAIT, |s| {
            s.processed.load(std::sync::atomic::Ordering::Relaxed) == 1
        })
        .await;
    let rows = consumer.events_for(&id).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, alice["sub"].as_str().unwrap());
    let stored_claims: Value = serde_json::from_str(&rows[0].1).unwrap();
    assert_eq!(stored_claims["tenant"], "acme");

    // The record carries an event token, not the user's token.
    let records = read_all(&topic).await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(header(record, "ce_id").as_deref(), Some(id.as_str()));
    assert_eq!(header(record, "ce_type").as_deref(), Some(EVENT_TYPE));
    assert_eq!(header(record, "ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(header(record, "content-type").as_deref(), Some("application/json"));
    assert_eq!(record.key(), Some(b"order-1".as_slice()));
    let authorization = header(record, "authorization").expect("authorization header");
    let event_token = authorization.strip_prefix("Bearer ").expect("a Bearer value");
    assert_ne!(event_token, token);
    let claims = jwt_payload(event_token);
    assert_eq!(claims["scope"], EVENT_SCOPE);
    let audience: Vec<&str> = match &claims["aud"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
        other => panic!("aud is {other}"),
    };
    assert_eq!(audience, [CONSUMER_AUDIENCE]);
    assert_eq!(claims["iss"], issuer());
    assert_eq!(claims["sub"], alice["sub"]);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, PRODUCER_TOKEN_LIFESPAN_S);
    let user_lifetime = alice["exp"].as_i64().unwrap() - alice["iat"].as_i64().unwrap();
    assert_ne!(lifetime, user_lifetime);

    consumer.stop().await;
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_has_one_effect() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let consumer = start_consumer(&topic).await;
    let token = alice_token().await;

    let first =
        post(&producer.events_url(), Some(&token), Some("retry-1"), &order("order-2")).await;
    assert_eq!(first.status(), 202);
    let second =
        post(&producer.events_url(), Some(&token), Some("retry-1"), &order("order-2")).await;
    assert_eq!(second.status(), 202);
    let first: Value = first.json().await.unwrap();
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);

    consumer
        .wait_for("both records settled", WAIT, |s| {
            s.processed.load(std::sync::atomic::Ordering::Relaxed)
                + s.duplicates.load(std::sync::atomic::Ordering::Relaxed)
                == 2
        })
        .await;
    assert_eq!(consumer.stats.processed.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(consumer.stats.duplicates.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(consumer.events_for(first["id"].as_str().unwrap()).await.len(), 1);
    assert_eq!(consumer.event_count().await, 1);
    assert_eq!(record_count(&topic).await, 2);
    // One exchange served both requests.
    assert_eq!(producer.publisher.event_tokens().exchange_count(), 1);

    consumer.stop().await;
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_the_permission_gets_403_and_nothing_is_published() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let token = bob_token().await;

    let response = post(&producer.events_url(), Some(&token), None, &order("order-3")).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    assert_eq!(producer.publisher.event_tokens().exchange_count(), 0);

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_expired_user_tokens_get_401_with_a_challenge() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &["--leeway-s=0"])).await;
    let url = producer.events_url();

    let missing = post(&url, None, None, &order("order-4")).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "missing_token");

    let malformed = post(&url, Some("not-a-jwt"), None, &order("order-4")).await;
    assert_eq!(malformed.status(), 401);
    assert_eq!(
        malformed.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\", error_description=\"malformed_token\""
    );

    // event-api-short issues user tokens that live 2 seconds.
    let short = user_token("event-api-short", "alice", "alice-password").await;
    let claims = jwt_payload(&short);
    let wait = claims["exp"].as_i64().unwrap() - now_secs() + 1;
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    let expired = post(&url, Some(&short), None, &order("order-4")).await;
    assert_eq!(expired.status(), 401);
    assert_eq!(
        expired.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\", error_description=\"expired\""
    );

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_events_of_one_user_cost_one_exchange_and_a_new_user_token_a_fresh_one() {
    require_services().await;
    let topic = fresh_topic(3).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let token = alice_token().await;

    let client = reqwest::Client::new();
    for i in 0..50 {
        let response = client
            .post(producer.events_url())
            .bearer_auth(&token)
            .json(&order(&format!("order-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    assert_eq!(producer.publisher.event_tokens().exchange_count(), 1);

    // A refreshed user token is a new subject token: its events get an
    // event token of their own rather than one cached for the old token.
    let refreshed = alice_token().await;
    let response = post(&producer.events_url(), Some(&refreshed), None, &order("order-50")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(producer.publisher.event_tokens().exchange_count(), 2);

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_refreshes_on_401_and_retries_once_succeeds() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &["--leeway-s=0"])).await;

    // The documented client rule: on 401, refresh the token, retry once.
    async fn publish_with_retry(url: &str, token: &mut String) -> reqwest::Response {
        let first = post(url, Some(token), Some("session-order"), &order("order-6")).await;
        if first.status() != 401 {
            return first;
        }
        assert!(first.headers().contains_key("www-authenticate"));
        *token = user_token("event-api-short", "alice", "alice-password").await;
        post(url, Some(token), Some("session-order"), &order("order-6")).await
    }

    let mut token = user_token("event-api-short", "alice", "alice-password").await;
    assert_eq!(publish_with_retry(&producer.events_url(), &mut token).await.status(), 202);

    // The session goes on; the short token expires in the meantime.
    let expires = jwt_payload(&token)["exp"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs((expires - now_secs() + 1).max(0) as u64)).await;
    let stale = token.clone();
    let response = publish_with_retry(&producer.events_url(), &mut token).await;
    assert_eq!(response.status(), 202);
    assert_ne!(token, stale, "the client refreshed its token");

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_authenticating_with_private_key_jwt_publishes() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let key_file = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/producer-client-rsa.pem");
    let config = producer_config(
        &topic,
        &[
            "--client-id=event-producer-jwt",
            &format!("--client-key-file={key_file}"),
            "--client-key-id=producer-client-1",
        ],
    );
    assert!(config.client_secret.is_none());
    let producer = start_producer(config).await;

    let response =
        post(&producer.events_url(), Some(&alice_token().await), None, &order("o-7")).await;
    assert_eq!(response.status(), 202);
    let records = read_all(&topic).await;
    let authorization = header(&records[0], "authorization").unwrap();
    let claims = jwt_payload(authorization.strip_prefix("Bearer ").unwrap());
    assert_eq!(claims["azp"], "event-producer-jwt");
    assert_eq!(claims["scope"], EVENT_SCOPE);

    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_authorization_server_no_longer_accepts_gets_401() {
    require_services().await;
    let topic = fresh_topic(1).await;
    // The default 30 s leeway accepts a token Keycloak already considers
    // expired; Keycloak's refusal of the exchange must still read as 401.
    let producer = start_producer(producer_config(&topic, &[])).await;
    let short = user_token("event-api-short", "alice", "alice-password").await;
    let expires = jwt_payload(&short)["exp"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs((expires - now_secs() + 2).max(0) as u64)).await;

    let response = post(&producer.events_url(), Some(&short), None, &order("o-8")).await;
    assert_eq!(response.status(), 401);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer error=\"invalid_token\""),
    );
    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused_whatever_their_order() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let (alice, bob) = (alice_token().await, bob_token().await);

    for (first, second) in [(&alice, &bob), (&bob, &alice)] {
        let response = reqwest::Client::new()
            .post(producer.events_url())
            .header("Authorization", format!("Bearer {first}"))
            .header("Authorization", format!("Bearer {second}"))
            .json(&order("order-5"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "invalid_request");
    }

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_written_to_the_topic_are_dead_lettered_not_processed() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let consumer = start_consumer(&topic).await;
    let writer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().unwrap();

    // A token shaped exactly like a real event token, signed by a key the
    // issuer never published: once under a random kid, once claiming the
    // realm's own kid.
    let forger = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/forger-rsa.pem")).unwrap();
    let now = now_secs();
    let claims = json!({
        "iss": issuer(), "sub": "attacker", "aud": CONSUMER_AUDIENCE, "scope": EVENT_SCOPE,
        "tenant": "acme", "iat": now, "exp": now + 3600,
    });
    let sign = |kid: &str| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &forger).unwrap()
    };
    let real_kid = jwt_payload_header_kid(&alice_token().await);

    let cases = [
        ("00000000-0000-7000-8000-00000000000a", None),
        ("00000000-0000-7000-8000-00000000000b", Some(sign("forged-kid"))),
        ("00000000-0000-7000-8000-00000000000c", Some(sign(&real_kid))),
    ];
    for (id, token) in &cases {
        let authorization = token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = OwnedHeaders::new()
            .insert(KafkaHeader { key: "ce_specversion", value: Some("1.0") })
            .insert(KafkaHeader { key: "ce_id", value: Some(*id) })
            .insert(KafkaHeader { key: "ce_type", value: Some(EVENT_TYPE) })
            .insert(KafkaHeader { key: "ce_source", value: Some("/attacker") })
            .insert(KafkaHeader { key: "content-type", value: Some("application/json") });
        if let Some(value) = &authorization {
            headers =
                headers.insert(KafkaHeader { key: "authorization", value: Some(value.as_str()) });
        }
        let payload = json!({"order_id": "forged", "tenant": "acme"}).to_string();
        let record = FutureRecord::to(&topic).key("forged").payload(&payload).headers(headers);
        writer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    consumer
        .wait_for("three dead letters", WAIT, |s| {
            s.dead_lettered.load(std::sync::atomic::Ordering::Relaxed) == 3
        })
        .await;
    assert_eq!(consumer.event_count().await, 0);
    assert_eq!(consumer.stats.processed.load(std::sync::atomic::Ordering::Relaxed), 0);

    let dead = read_all(&dead_letter_topic(&topic)).await;
    let reasons: Vec<(String, String, String)> = dead
        .iter()
        .map(|m| {
            (
                header(m, "ce_id").unwrap(),
                header(m, "dlq_reason").unwrap(),
                header(m, "dlq_source_offset").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (cases[0].0.to_owned(), "missing_token".to_owned(), "0".to_owned()),
            (cases[1].0.to_owned(), "unknown_key".to_owned(), "1".to_owned()),
            (cases[2].0.to_owned(), "invalid_signature".to_owned(), "2".to_owned()),
        ]
    );
    assert_eq!(header(&dead[0], "dlq_source_topic").as_deref(), Some(topic.as_str()));

    consumer.stop().await;
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn jwt_payload_header_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.expect("Keycloak tokens carry a kid")
}
