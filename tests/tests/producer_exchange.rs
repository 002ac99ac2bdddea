//! The producer's strictness about token exchange (C07, C08), its failure
//! statuses, and its shutdown (C12), on the real broker with the
//! development issuer standing in for the authorization server so that it
//! can misbehave on purpose.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, ExchangePolicy, KeyMaterial};
use event_identity_tests::*;
use serde_json::{Value, json};

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn dev_issuer() -> DevIssuer {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    issuer
}

fn user_token(issuer: &DevIssuer, subject: &str) -> String {
    issuer.sign(
        "k1",
        &json!({
            "iss": issuer.issuer(), "sub": subject, "aud": "event-producer",
            "scope": "openid orders:write", "tenant": "acme", "iat": now(), "exp": now() + 300,
        }),
    )
}

fn config_for(
    issuer: &DevIssuer,
    topic: &str,
    extra: &[&str],
) -> event_identity_producer::ProducerConfig {
    let mut args = vec![format!("--issuer={}", issuer.issuer())];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    producer_config_with(topic, &args)
}

fn overrides(claims: Value) -> serde_json::Map<String, Value> {
    claims.as_object().unwrap().clone()
}

async fn publish(url: &str, token: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(&json!({"type": EVENT_TYPE, "key": "order-1", "data": {"tenant": "acme"}}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.json().await.unwrap_or(Value::Null), headers)
}

// C07, first response: a token that expired before it was issued, and a
// negative expires_in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c07_an_already_expired_event_token_fails_the_request() {
    require_services().await;
    let issuer = dev_issuer().await;
    issuer.set_exchange_policy(ExchangePolicy {
        expires_in: Some(-103),
        override_claims: overrides(json!({"iat": now(), "exp": now() - 103})),
        ..ExchangePolicy::default()
    });
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &[])).await;

    let (status, body, _) = publish(&producer.events_url(), &user_token(&issuer, "user-1")).await;
    assert_eq!(status, 502);
    assert_eq!(body["code"], "token_exchange_failed");
    assert!(body["detail"].as_str().unwrap().contains("token exchange"), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("expired"), "{body}");

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

// C07, second response: an absurd expires_in must not make a one-hour token
// live for decades in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c07_the_lifetime_comes_from_the_verified_exp_not_expires_in() {
    require_services().await;
    let issuer = dev_issuer().await;
    issuer.set_exchange_policy(ExchangePolicy {
        lifespan_s: 3600,
        expires_in: Some(1_750_325_886),
        ..ExchangePolicy::default()
    });
    let topic = fresh_topic(1).await;
    // Reuse a cached token only while it has 3,595 s left: true for the
    // first 5 seconds of a one-hour token, never false for a decades one.
    let producer =
        start_producer(config_for(&issuer, &topic, &["--min-event-token-lifetime-s=3595"])).await;
    let token = user_token(&issuer, "user-1");

    assert_eq!(publish(&producer.events_url(), &token).await.0, 202);
    assert_eq!(publish(&producer.events_url(), &token).await.0, 202);
    assert_eq!(issuer.token_calls(), 1, "the second event reuses the cached token");

    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(publish(&producer.events_url(), &token).await.0, 202);
    assert_eq!(issuer.token_calls(), 2, "the cached token is spent after its real hour");

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 3);
}

// C08: the server answers with other scopes or audiences than requested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c08_scope_or_audience_drift_fails_the_request_and_publishes_nothing() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &[])).await;

    let drifts = [
        json!({"scope": "openid"}),
        json!({"scope": "openid orders:write events:order.created"}),
        json!({"scope": "events:order.created orders:write"}),
        json!({"aud": [CONSUMER_AUDIENCE, "billing-consumer"]}),
        json!({"aud": "billing-consumer"}),
        json!({"sub": "someone-else"}),
    ];
    for (i, drift) in drifts.iter().enumerate() {
        issuer.set_exchange_policy(ExchangePolicy {
            override_claims: overrides(drift.clone()),
            ..ExchangePolicy::default()
        });
        // A new user token each time, so no cached event token is reused.
        let (status, body, _) =
            publish(&producer.events_url(), &user_token(&issuer, &format!("user-{i}"))).await;
        assert_eq!(status, 502, "{drift}: {body}");
        assert_eq!(body["code"], "token_exchange_failed", "{drift}");
    }

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_authorization_server_gives_503_after_bounded_retries() {
    require_services().await;
    let issuer = dev_issuer().await;
    issuer.set_exchange_policy(ExchangePolicy {
        fail_status: Some(503),
        ..ExchangePolicy::default()
    });
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &[])).await;

    let (status, body, headers) =
        publish(&producer.events_url(), &user_token(&issuer, "user-1")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(issuer.token_calls(), 3);

    // A token endpoint that refuses connections is unavailable too.
    let unreachable = start_producer(config_for(
        &issuer,
        &topic,
        &[
            &format!("--jwks-url={}", issuer.jwks_url()),
            "--token-endpoint=http://127.0.0.1:1/token",
        ],
    ))
    .await;
    let (status, _, headers) =
        publish(&unreachable.events_url(), &user_token(&issuer, "user-2")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");

    unreachable.stop().await;
    producer.stop().await;
    assert_eq!(record_count(&topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_one_user_share_one_exchange() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &[])).await;
    let token = user_token(&issuer, "user-1");

    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (url, token) = (producer.events_url(), token.clone());
            tokio::spawn(async move { publish(&url, &token).await.0 })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 202);
    }
    assert_eq!(issuer.token_calls(), 1);

    producer.stop().await;
    assert_eq!(record_count(&topic).await, 20);
}

// C12: records accepted just before shutdown are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_shutdown_flushes_queued_records() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &["--linger-ms=500"])).await;
    let token = user_token(&issuer, "user-1");
    // Warm the event-token cache so the five requests go straight to Kafka.
    assert_eq!(publish(&producer.events_url(), &token).await.0, 202);

    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (url, token) = (producer.events_url(), token.clone());
            tokio::spawn(async move { publish(&url, &token).await.0 })
        })
        .collect();
    wait_until_queued(&producer, 5).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer.stopper().cancel();
    let statuses: Vec<u16> = futures_join(requests).await;
    let report = producer.stop().await;

    assert_eq!(statuses, [202; 5]);
    assert_eq!(report.undelivered, 0);
    assert_eq!(record_count(&topic).await, 6);
}

// C12, variant: the broker is unreachable, so nothing can be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_with_the_broker_unreachable_no_client_gets_202() {
    require_services().await;
    let issuer = dev_issuer().await;
    let config = config_for(
        &issuer,
        "unreachable",
        &["--kafka-bootstrap=127.0.0.1:1", "--linger-ms=500", "--shutdown-timeout-ms=1000"],
    );
    let producer = start_producer(config).await;
    let token = user_token(&issuer, "user-1");

    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (url, token) = (producer.events_url(), token.clone());
            tokio::spawn(async move { publish(&url, &token).await })
        })
        .collect();
    wait_until_queued(&producer, 5).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer.stopper().cancel();
    let responses = futures_join(requests).await;
    let report = producer.stop().await;

    for (status, _, headers) in &responses {
        assert_eq!(*status, 503);
        assert_eq!(headers["retry-after"], "5");
    }
    assert_eq!(report.undelivered, 5);
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

async fn wait_until_queued(producer: &TestProducer, records: usize) {
    for _ in 0..200 {
        if producer.publisher.undelivered() == records {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{records} records were never queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_failing_exchange_share_its_answer() {
    require_services().await;
    let issuer = dev_issuer().await;
    issuer.set_exchange_policy(ExchangePolicy {
        fail_status: Some(503),
        ..ExchangePolicy::default()
    });
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(&issuer, &topic, &[])).await;
    let token = user_token(&issuer, "user-1");

    let requests: Vec<_> = (0..6)
        .map(|_| {
            let (url, token) = (producer.events_url(), token.clone());
            tokio::spawn(async move { publish(&url, &token).await.0 })
        })
        .collect();
    assert_eq!(futures_join(requests).await, [503; 6]);
    assert_eq!(issuer.token_calls(), 3, "one exchange with its two retries, shared by all six");

    // An overloaded server (429) is unavailable too, not a refusal.
    issuer.set_exchange_policy(ExchangePolicy {
        fail_status: Some(429),
        ..ExchangePolicy::default()
    });
    let (status, _, headers) =
        publish(&producer.events_url(), &user_token(&issuer, "user-2")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_whose_names_could_alias_get_their_own_event_tokens() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(config_for(
        &issuer,
        &topic,
        &[
            "--route=type=t.a,requires=orders:write,scope=x|y,audience=z",
            "--route=type=t.b,requires=orders:write,scope=x,audience=y|z",
        ],
    ))
    .await;
    let token = user_token(&issuer, "user-1");
    for event_type in ["t.a", "t.b"] {
        let response = reqwest::Client::new()
            .post(producer.events_url())
            .bearer_auth(&token)
            .json(&json!({"type": event_type, "key": "k", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    assert_eq!(issuer.token_calls(), 2);
    producer.stop().await;

    for record in read_all(&topic).await {
        let authorization = header(&record, "authorization").unwrap();
        let claims = jwt_payload(authorization.strip_prefix("Bearer ").unwrap());
        match header(&record, "ce_type").as_deref() {
            Some("t.a") => assert_eq!(
                (claims["scope"].as_str(), claims["aud"].as_str()),
                (Some("x|y"), Some("z"))
            ),
            _ => assert_eq!(
                (claims["scope"].as_str(), claims["aud"].as_str()),
                (Some("x"), Some("y|z"))
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_its_budget_whatever_requests_are_doing() {
    use tokio::io::AsyncWriteExt as _;
    require_services().await;
    let issuer = dev_issuer().await;
    let config = config_for(
        &issuer,
        "unreachable",
        &[
            "--kafka-bootstrap=127.0.0.1:1",
            "--shutdown-timeout-ms=500",
            "--delivery-timeout-ms=60000",
        ],
    );
    let producer = start_producer(config).await;
    let token = user_token(&issuer, "user-1");

    // One request waits for a broker that never answers; one client sends
    // its body a byte per second.
    let (url, waiting_token) = (producer.events_url(), token.clone());
    let waiting = tokio::spawn(async move { publish(&url, &waiting_token).await.0 });
    let mut slow = tokio::net::TcpStream::connect(producer.addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"type\""
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if slow.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    wait_until_queued(&producer, 1).await;

    let started = std::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(10), producer.stop())
        .await
        .expect("shutdown ends within its budget and a grace second");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(report.undelivered, 1);
    assert_ne!(waiting.await.unwrap_or(0), 202);
    trickle.abort();
}
