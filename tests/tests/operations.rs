//! What operators see: exact metric values after scenarios with known
//! numbers, and bad settings stopping each binary with one clear line.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_tests::process::binary;
use event_identity_tests::*;
use serde_json::json;

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    response.text().await.unwrap()
}

/// The value of the sample `name` (with its labels, as written) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_metrics_count_exactly_what_happened() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    issuer.add_unpublished_key("forger", KeyMaterial::Rsa2);
    let topic = fresh_topic(1).await;
    let consumer = start_consumer_trusting(&topic, issuer.issuer()).await;

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = |exp: i64| {
        json!({"iss": issuer.issuer(), "sub": "user-1", "aud": CONSUMER_AUDIENCE,
               "scope": EVENT_SCOPE, "tenant": "acme", "iat": now - 7200, "exp": exp})
    };
    let valid = issuer.sign("k1", &claims(now + 3600));
    let data = json!({"tenant": "acme"}).to_string();

    // 10 events, 2 of them sent twice, and 3 rejected for known reasons.
    for n in 0..10 {
        let id = format!("9f1c0000-0000-7000-8000-{n:012}");
        write_record(&topic, &id, Some(&valid), data.as_bytes()).await;
        if n < 2 {
            write_record(&topic, &id, Some(&valid), data.as_bytes()).await;
        }
    }
    // Signed with a key the issuer never published, under its real kid.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".into());
    let forged = issuer.sign_with_header("forger", header, &claims(now + 3600));
    let expired = issuer.sign("k1", &claims(now - 3600));
    write_record(&topic, "9f1c0000-0000-7000-8000-100000000001", Some(&forged), data.as_bytes())
        .await;
    write_record(&topic, "9f1c0000-0000-7000-8000-100000000002", Some(&expired), data.as_bytes())
        .await;
    write_record(&topic, "9f1c0000-0000-7000-8000-100000000003", None, data.as_bytes()).await;
    consumer.wait_for("15 settled", Duration::from_secs(60), |s| s.settled() == 15).await;

    let text = scrape(&format!("http://{}/metrics", consumer.ops)).await;
    for (name, value) in [
        ("event_consumer_messages_consumed_total", 15.0),
        ("event_consumer_messages_processed_total", 10.0),
        ("event_consumer_duplicates_total", 2.0),
        ("event_consumer_dead_lettered_total", 3.0),
        ("event_consumer_retries_total", 0.0),
        ("event_consumer_rejected_total{reason=\"invalid_signature\"}", 1.0),
        ("event_consumer_rejected_total{reason=\"expired\"}", 1.0),
        ("event_consumer_rejected_total{reason=\"missing_token\"}", 1.0),
        ("event_consumer_verification_seconds_count", 14.0),
        ("event_consumer_handler_seconds_count", 10.0),
        ("event_consumer_jwks_refreshes_total{result=\"ok\"}", 1.0),
        ("event_consumer_jwks_keys", 1.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name} in:\n{text}");
    }
    // Lag per partition, and nothing per user or message.
    assert!(text.contains(&format!("event_consumer_lag{{topic=\"{topic}\",partition=\"0\"}}")));
    assert!(!text.contains("user-1") && !text.contains("9f1c0000"), "high-cardinality labels");

    let ready = reqwest::get(format!("http://{}/readyz", consumer.ops)).await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_metrics_count_requests_exchanges_and_cache_hits() {
    require_services().await;
    let topic = fresh_topic(1).await;
    let producer = start_producer(producer_config(&topic, &[])).await;
    let (alice, bob) = (alice_token().await, bob_token().await);
    let client = reqwest::Client::new();
    let body = json!({"type": EVENT_TYPE, "key": "o-1", "data": {"tenant": "acme"}});
    let post = |token: Option<&str>| {
        let request = client.post(producer.events_url()).json(&body);
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
        .send()
    };
    for _ in 0..3 {
        assert_eq!(post(Some(&alice)).await.unwrap().status(), 202);
    }
    assert_eq!(post(Some(&bob)).await.unwrap().status(), 403);
    assert_eq!(post(None).await.unwrap().status(), 401);

    let base = format!("http://{}", producer.addr);
    let text = scrape(&format!("{base}/metrics")).await;
    for (name, value) in [
        ("event_producer_requests_total{status=\"202\"}", 3.0),
        ("event_producer_requests_total{status=\"403\"}", 1.0),
        ("event_producer_requests_total{status=\"401\"}", 1.0),
        ("event_producer_events_published_total", 3.0),
        ("event_producer_token_exchanges_total{result=\"ok\"}", 1.0),
        ("event_producer_token_exchanges_total{result=\"error\"}", 0.0),
        ("event_producer_event_token_cache_hits_total", 2.0),
        ("event_producer_token_exchange_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name} in:\n{text}");
    }
    assert!(!text.contains("alice") && !text.contains(&alice[..20]));
    assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    producer.stop().await;
}

/// Runs `binary` with `env` only; its exit code and standard error.
fn start_with(name: &str, env: &[(&str, String)]) -> (i32, String) {
    let mut command = Command::new(binary(name));
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    let output = command.envs(env.iter().map(|(k, v)| (*k, v))).output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The error line: the one line of `stderr` that starts with `binary:`.
fn error_line(name: &str, stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&format!("{name}:"))).collect();
    assert_eq!(lines.len(), 1, "one error line expected in:\n{stderr}");
    assert_eq!(stderr.lines().last(), Some(lines[0]), "the error comes last:\n{stderr}");
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_stop_each_binary_with_one_line_naming_the_setting() {
    require_services().await;
    let keycloak = issuer();
    let consumer = |extra: &[(&'static str, String)], drop: &str| {
        let mut env = vec![
            ("EI_KAFKA_BOOTSTRAP", kafka_bootstrap()),
            ("EI_ISSUER", keycloak.clone()),
            ("EI_AUDIENCE", CONSUMER_AUDIENCE.to_owned()),
            ("EI_ROUTES", format!("type={EVENT_TYPE},scope={EVENT_SCOPE}")),
            ("EI_OPS_LISTEN", "127.0.0.1:0".to_owned()),
            ("EI_DATABASE_URL", "sqlite::memory:".to_owned()),
        ];
        env.retain(|(k, _)| *k != drop);
        env.extend(extra.iter().cloned());
        env
    };
    let producer = |extra: &[(&'static str, String)], drop: &str| {
        let mut env = vec![
            ("EI_KAFKA_BOOTSTRAP", kafka_bootstrap()),
            ("EI_ISSUER", keycloak.clone()),
            ("EI_CLIENT_ID", "event-producer".to_owned()),
            ("EI_CLIENT_SECRET", "producer-secret".to_owned()),
            (
                "EI_ROUTES",
                format!(
                    "type={EVENT_TYPE},requires=orders:write,scope={EVENT_SCOPE},audience={CONSUMER_AUDIENCE}"
                ),
            ),
            ("EI_PRODUCER_LISTEN", "127.0.0.1:0".to_owned()),
        ];
        env.retain(|(k, _)| *k != drop);
        env.extend(extra.iter().cloned());
        env
    };
    // A dead-letter topic the broker refuses to create: its name collides
    // with an existing topic's ('.' and '_' are the same to Kafka).
    let topic = fresh_topic(1).await;
    let colliding = [
        ("EI_TOPICS", topic.clone()),
        ("EI_DEAD_LETTER_TOPIC", dead_letter_topic(&topic).replace('.', "_")),
    ];
    let database_password =
        ("EI_DATABASE_URL", "postgres://events:p@ssHUNTER2@127.0.0.1:1/x?password=hunter2".into());
    let unreachable = ("EI_KAFKA_BOOTSTRAP", "127.0.0.1:1".to_owned());
    let bad_issuer = ("EI_ISSUER", "not-a-url".to_owned());
    let plain_issuer = ("EI_ISSUER", "http://idp.example/realms/x".to_owned());
    let no_audience =
        ("EI_ROUTES", format!("type={EVENT_TYPE},requires=orders:write,scope={EVENT_SCOPE}"));

    // (binary, environment, exit code, what the line must say)
    let cases = [
        ("event-consumer", consumer(std::slice::from_ref(&bad_issuer), ""), 1, "--issuer"),
        ("event-consumer", consumer(&[], "EI_AUDIENCE"), 2, "--audience"),
        (
            "event-consumer",
            consumer(std::slice::from_ref(&unreachable), ""),
            1,
            "--kafka-bootstrap",
        ),
        ("event-consumer", consumer(&[("EI_LEEWAY_S", "9999".into())], ""), 2, "--leeway-s"),
        (
            "event-consumer",
            consumer(&[("EI_REQUIRE_CLAIMS", "jti,".into())], ""),
            2,
            "--require-claim",
        ),
        ("event-consumer", consumer(&[("EI_GROUP", "".into())], ""), 2, "--group"),
        (
            "event-consumer",
            consumer(&[("EI_DEAD_LETTER_TOPIC", "events".into())], ""),
            1,
            "--dead-letter-topic",
        ),
        (
            "event-consumer",
            consumer(&[("EI_DEAD_LETTER_TOPIC", "not a topic!".into())], ""),
            2,
            "--dead-letter-topic",
        ),
        ("event-consumer", consumer(&colliding, ""), 1, "--dead-letter-topic"),
        ("event-consumer", consumer(&[database_password], ""), 1, "--database-url"),
        (
            "event-producer",
            producer(&[("EI_MAX_BODY_BYTES", "4000000".into())], ""),
            2,
            "--max-body-bytes",
        ),
        ("event-producer", producer(&[("EI_SOURCE", "/orders api".into())], ""), 2, "--source"),
        (
            "event-consumer",
            consumer(&[("EI_INBOX_RETENTION_S", "1000000000000".into())], ""),
            2,
            "--inbox-retention-s",
        ),
        (
            "event-consumer",
            consumer(&[("EI_ROUTES", format!("type={EVENT_TYPE},scope={EVENT_SCOPE} openid"))], ""),
            2,
            "--route",
        ),
        (
            "event-consumer",
            consumer(
                &[(
                    "EI_ROUTES",
                    format!("type={EVENT_TYPE},scope={EVENT_SCOPE},claim_in=tenant:a|"),
                )],
                "",
            ),
            2,
            "--route",
        ),
        ("event-producer", producer(&[bad_issuer], ""), 1, "--issuer"),
        ("event-producer", producer(&[no_audience], ""), 2, "audience"),
        (
            "event-producer",
            producer(std::slice::from_ref(&unreachable), ""),
            1,
            "--kafka-bootstrap",
        ),
        // Settings wrong in themselves are named before Kafka is tried.
        (
            "event-producer",
            producer(&[unreachable.clone(), plain_issuer.clone()], ""),
            1,
            "--issuer",
        ),
        (
            "event-producer",
            producer(
                &[unreachable.clone(), ("EI_TOKEN_ENDPOINT", "http://idp.example/t".into())],
                "",
            ),
            1,
            "--token-endpoint",
        ),
        ("event-consumer", consumer(&[unreachable.clone(), plain_issuer], ""), 1, "--issuer"),
        (
            "event-consumer",
            consumer(&[unreachable.clone(), ("EI_DEAD_LETTER_TOPIC", "events".into())], ""),
            1,
            "--dead-letter-topic",
        ),
        (
            "event-consumer",
            consumer(&[unreachable, ("EI_FORWARD_URL", "http://app.example/events".into())], ""),
            1,
            "--forward-url",
        ),
    ];
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(name, env, code, names)| {
            std::thread::spawn(move || (name, start_with(name, &env), code, names))
        })
        .collect();
    for run in runs {
        let (name, (exit, stderr), code, names) =
            tokio::task::block_in_place(|| run.join()).unwrap();
        let line = error_line(name, &stderr);
        assert_eq!(exit, code, "{name}: {line}");
        assert!(line.contains(names), "{name}: {line:?} should name {names}");
        for secret in ["HUNTER2", "hunter2", "producer-secret"] {
            assert!(!stderr.contains(secret), "{name} printed a secret: {stderr}");
        }
    }
}

/// A dead-letter topic that does not exist yet, on a broker that creates
/// topics on first use, is created by the start-up check, and the service
/// runs until it is told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_is_created_at_start() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    let topic = fresh_topic(1).await;
    let missing = format!("{topic}.created-at-start");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("inbox.db").display());
    let config = consumer_config(
        &topic,
        &url,
        issuer.issuer(),
        &[&format!("--dead-letter-topic={missing}")],
    );
    let stop = tokio::time::sleep(Duration::from_secs(3));
    let ran =
        tokio::time::timeout(Duration::from_secs(60), event_identity_consumer::run(config, stop));
    ran.await.expect("stops after its shutdown signal").expect("starts and stops cleanly");
    // The topic exists now: it has an end offset of 0.
    assert_eq!(event_identity_tests::process::end_offsets(&missing, 1).await, [0]);
}
