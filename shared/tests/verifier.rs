//! The verifier against the development issuer: cases C01 to C06 of the
//! field failures, and a table of hostile and odd tokens, each asserting
//! the exact rejection reason.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity::jwks::JwksTiming;
use event_identity::verify::ConfigError;
use event_identity::{Rejection, Verifier, VerifierConfig, VerifyError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "shipping-consumer";
/// The test clock: 2027-01-15T08:00:00Z.
const NOW: i64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW as u64)
}

fn claims() -> Value {
    json!({
        "iss": ISSUER, "sub": "user-1", "aud": AUDIENCE, "scope": "events:order.created",
        "iat": NOW, "exp": NOW + 86_400, "jti": "token-1",
    })
}

fn with(mut base: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() && name.starts_with('-') {
            base.as_object_mut().unwrap().remove(&name[1..]);
        } else {
            base[name] = value.clone();
        }
    }
    base
}

fn config(issuer: &DevIssuer) -> VerifierConfig {
    let mut config = VerifierConfig::new(ISSUER, issuer.jwks_url(), AUDIENCE);
    config.jwks_timing = JwksTiming {
        refresh_interval: Duration::from_secs(3600),
        miss_cooldown: Duration::from_secs(30),
    };
    config
}

fn verifier(config: VerifierConfig) -> Verifier {
    Verifier::new(config, event_identity::http::client(Duration::from_secs(5))).unwrap()
}

async fn issuer_with_k1() -> DevIssuer {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k1", KeyMaterial::Rsa1);
    issuer
}

fn reason(result: Result<impl std::fmt::Debug, VerifyError>) -> Rejection {
    match result {
        Err(VerifyError::Rejected { reason, .. }) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with exactly this header and payload text, signed by `key`.
fn raw_token(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

fn rsa1() -> EncodingKey {
    EncodingKey::from_rsa_pem(include_bytes!("../src/dev_issuer/keys/rsa-1.pem")).unwrap()
}

fn header(alg: Algorithm, kid: &str) -> Header {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    header
}

// C01: the audience must name this consumer.
#[tokio::test]
async fn c01_a_token_for_another_audience_is_rejected() {
    let issuer = issuer_with_k1().await;
    let verifier = verifier(config(&issuer));

    let invoice = issuer.sign("k1", &with(claims(), json!({"aud": "invoice-consumer"})));
    assert_eq!(reason(verifier.verify_at(&invoice, now()).await), Rejection::InvalidAudience);

    let both = issuer.sign("k1", &with(claims(), json!({"aud": ["invoice-consumer", AUDIENCE]})));
    let verified = verifier.verify_at(&both, now()).await.unwrap();
    assert_eq!(verified.audience, ["invoice-consumer", AUDIENCE]);
    assert_eq!(verified.subject, "user-1");
}

#[tokio::test]
async fn c01_a_verifier_without_an_audience_refuses_to_start() {
    let issuer = issuer_with_k1().await;
    let mut config = config(&issuer);
    config.audience = " ".into();
    let result = Verifier::new(config, event_identity::http::client(Duration::from_secs(5)));
    assert_eq!(result.err(), Some(ConfigError::MissingAudience));
}

// C02: NumericDates may be floats; absurd ones are malformed.
#[tokio::test]
async fn c02_float_dates() {
    let issuer = issuer_with_k1().await;
    let verifier = verifier(config(&issuer));

    let valid = issuer.sign("k1", &with(claims(), json!({"exp": NOW as f64 + 3600.25})));
    assert_eq!(verifier.verify_at(&valid, now()).await.unwrap().expires_at, NOW + 3600);

    let expired = issuer.sign("k1", &with(claims(), json!({"exp": NOW as f64 - 3600.5})));
    assert_eq!(reason(verifier.verify_at(&expired, now()).await), Rejection::Expired);

    let absurd = issuer.sign("k1", &with(claims(), json!({"exp": 1e300})));
    assert_eq!(reason(verifier.verify_at(&absurd, now()).await), Rejection::MalformedClaim);
}

// C03: keys published without `alg`.
#[tokio::test]
async fn c03_keys_without_alg_accept_only_their_own_family() {
    let issuer = issuer_with_k1().await;
    issuer.add_unpublished_key("ec", KeyMaterial::EcP256);
    let verifier = verifier(config(&issuer));

    let rs256 = issuer.sign("k1", &claims());
    assert!(verifier.verify_at(&rs256, now()).await.is_ok());

    // HS256 keyed with the bytes of the public key, as an attacker would.
    let public = serde_json::to_vec(&KeyMaterial::Rsa1.public_jwk()).unwrap();
    let hs256 = jsonwebtoken::encode(
        &header(Algorithm::HS256, "k1"),
        &claims(),
        &EncodingKey::from_secret(&public).unwrap(),
    )
    .unwrap();
    assert_eq!(reason(verifier.verify_at(&hs256, now()).await), Rejection::AlgorithmNotAllowed);

    let es256 = issuer.sign_with_header("ec", header(Algorithm::ES256, "k1"), &claims());
    assert_eq!(reason(verifier.verify_at(&es256, now()).await), Rejection::AlgorithmNotAllowed);

    // The worker keeps going: a valid token still verifies afterwards.
    assert!(verifier.verify_at(&rs256, now()).await.is_ok());
}

// C04: the allow-list is intersected with the key's family; HMAC never.
#[tokio::test]
async fn c04_mixed_families_in_the_allow_list() {
    let issuer = issuer_with_k1().await;
    let mut config = config(&issuer);
    config.algorithms =
        vec![Algorithm::RS256, Algorithm::ES384, Algorithm::EdDSA, Algorithm::HS256];
    let refused =
        Verifier::new(config.clone(), event_identity::http::client(Duration::from_secs(5)));
    assert_eq!(refused.err(), Some(ConfigError::SymmetricAlgorithm("HS256".into())));

    config.algorithms.pop();
    let verifier = verifier(config);
    assert!(verifier.verify_at(&issuer.sign("k1", &claims()), now()).await.is_ok());
    let hs256 = jsonwebtoken::encode(
        &header(Algorithm::HS256, "k1"),
        &claims(),
        &EncodingKey::from_secret(b"k1").unwrap(),
    )
    .unwrap();
    assert_eq!(reason(verifier.verify_at(&hs256, now()).await), Rejection::AlgorithmNotAllowed);
}

// C05: a rotated-in key is picked up with exactly one fetch.
#[tokio::test]
async fn c05_rotation_fetches_once_and_needs_no_restart() {
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_key("k-old", KeyMaterial::Rsa1);
    let mut config = config(&issuer);
    config.jwks_timing.miss_cooldown = Duration::from_millis(300);
    let verifier = verifier(config);

    let old = issuer.sign("k-old", &claims());
    assert!(verifier.verify_at(&old, now()).await.is_ok());
    assert_eq!(issuer.jwks_fetches(), 1);

    // t1: the issuer publishes k-new and signs with it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    issuer.add_key("k-new", KeyMaterial::Rsa2);
    let new = issuer.sign("k-new", &with(claims(), json!({"jti": "token-2"})));
    assert!(verifier.verify_at(&new, now()).await.is_ok());
    assert_eq!(issuer.jwks_fetches(), 2);

    let old_again = issuer.sign("k-old", &with(claims(), json!({"jti": "token-3"})));
    assert!(verifier.verify_at(&old_again, now()).await.is_ok());
    assert_eq!(issuer.jwks_fetches(), 2);
}

// C06: a flood of random kids costs one fetch and keeps valid tokens going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c06_random_kid_flood_is_coalesced_and_settled() {
    let issuer = issuer_with_k1().await;
    issuer.add_unpublished_key("attacker", KeyMaterial::Rsa3);
    let verifier = verifier(config(&issuer));
    let valid = issuer.sign("k1", &claims());
    let forged: Vec<String> = (0..50)
        .map(|i| {
            issuer.sign_with_header(
                "attacker",
                header(Algorithm::RS256, &format!("random-{i}")),
                &claims(),
            )
        })
        .collect();

    let mut tasks = Vec::new();
    for i in 0..1000 {
        let verifier = verifier.clone();
        let token = if i % 4 == 0 { valid.clone() } else { forged[i % forged.len()].clone() };
        let is_valid = i % 4 == 0;
        tasks
            .push(tokio::spawn(async move { (is_valid, verifier.verify_at(&token, now()).await) }));
    }
    let (mut accepted, mut unknown) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (true, Ok(_)) => accepted += 1,
            (false, Err(VerifyError::Rejected { reason: Rejection::UnknownKey, .. })) => {
                unknown += 1
            }
            (valid, other) => panic!("valid={valid}: unexpected {other:?}"),
        }
    }
    assert_eq!((accepted, unknown), (250, 750));
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn an_unreachable_jwks_is_transient_and_keeps_the_last_good_keys() {
    let issuer = issuer_with_k1().await;
    let mut config = config(&issuer);
    config.jwks_timing.miss_cooldown = Duration::from_millis(50);
    config.cache_capacity = 0;
    let verifier = verifier(config);
    let valid = issuer.sign("k1", &claims());

    issuer.set_jwks_available(false);
    match verifier.verify_at(&valid, now()).await {
        Err(VerifyError::Unavailable(_)) => {}
        other => panic!("expected a transient failure, got {other:?}"),
    }

    issuer.set_jwks_available(true);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(verifier.verify_at(&valid, now()).await.is_ok());

    // The issuer goes down again: known keys still verify; an unknown kid
    // is a transient failure, not a forgery.
    issuer.set_jwks_available(false);
    tokio::time::sleep(Duration::from_millis(60)).await;
    issuer.add_unpublished_key("k2", KeyMaterial::Rsa2);
    let unknown = issuer.sign("k2", &claims());
    match verifier.verify_at(&unknown, now()).await {
        Err(VerifyError::Unavailable(_)) => {}
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert!(verifier.verify_at(&valid, now()).await.is_ok());
}

#[tokio::test]
async fn a_verified_token_is_cached_until_its_expiry_and_key_changes() {
    let issuer = issuer_with_k1().await;
    let mut config = config(&issuer);
    config.jwks_timing.miss_cooldown = Duration::from_millis(10);
    let verifier = verifier(config);
    let token = issuer.sign("k1", &with(claims(), json!({"exp": NOW + 60})));
    assert!(verifier.verify_at(&token, now()).await.is_ok());
    assert!(verifier.verify_at(&token, now()).await.is_ok());

    // The cache never outlives the token.
    let later = now() + Duration::from_secs(60 + 31);
    assert_eq!(reason(verifier.verify_at(&token, later).await), Rejection::Expired);

    // A withdrawn key invalidates what was verified with it.
    issuer.add_key("k2", KeyMaterial::Rsa2);
    issuer.set_published("k1", false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let trigger = issuer.sign("k2", &claims());
    assert!(verifier.verify_at(&trigger, now()).await.is_ok());
    assert_eq!(reason(verifier.verify_at(&token, now()).await), Rejection::UnknownKey);
}

#[tokio::test]
async fn odd_but_valid_tokens_are_accepted() {
    let issuer = issuer_with_k1().await;
    issuer.add_key("ec", KeyMaterial::EcP256);
    issuer.add_key("ed", KeyMaterial::Ed25519);
    let verifier = verifier(config(&issuer));
    let mut at_jwt = header(Algorithm::RS256, "k1");
    at_jwt.typ = Some("at+jwt".into());
    let mut no_typ = header(Algorithm::RS256, "k1");
    no_typ.typ = None;

    let accepted = [
        ("RS256", issuer.sign("k1", &claims())),
        ("PS256", issuer.sign_with_header("k1", header(Algorithm::PS256, "k1"), &claims())),
        ("ES256", issuer.sign("ec", &claims())),
        ("EdDSA", issuer.sign("ed", &claims())),
        ("typ at+jwt", issuer.sign_with_header("k1", at_jwt, &claims())),
        ("no typ", issuer.sign_with_header("k1", no_typ, &claims())),
        ("expired within leeway", issuer.sign("k1", &with(claims(), json!({"exp": NOW - 10})))),
        ("nbf within leeway", issuer.sign("k1", &with(claims(), json!({"nbf": NOW + 10})))),
        ("no iat", issuer.sign("k1", &with(claims(), json!({"-iat": null})))),
        (
            "scp list",
            issuer.sign(
                "k1",
                &with(claims(), json!({"-scope": null, "scp": ["events:order.created"]})),
            ),
        ),
    ];
    for (name, token) in accepted {
        let verified = verifier.verify_at(&token, now()).await;
        assert!(verified.is_ok(), "{name}: {verified:?}");
        assert_eq!(verified.unwrap().scopes, ["events:order.created"], "{name}");
    }
}

#[tokio::test]
async fn hostile_and_odd_tokens_are_rejected_with_their_reason() {
    use Rejection::*;
    let issuer = issuer_with_k1().await;
    issuer.add_key("ec", KeyMaterial::EcP256);
    issuer.add_unpublished_key("attacker", KeyMaterial::Rsa3);
    issuer.add_unpublished_key("ed-attacker", KeyMaterial::Ed25519);
    let verifier = verifier(config(&issuer));
    let good = issuer.sign("k1", &claims());
    let payload = serde_json::to_string(&claims()).unwrap();
    let sign = |changes: Value| issuer.sign("k1", &with(claims(), changes));
    let rs = |h: &str, p: &str| raw_token(h, p, &rsa1(), Algorithm::RS256);
    let k1_header = r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#;
    let public = serde_json::to_vec(&KeyMaterial::Rsa1.public_jwk()).unwrap();
    let (head, rest) = good.split_once('.').unwrap();
    let (body, signature) = rest.split_once('.').unwrap();
    let other_body =
        b64(serde_json::to_string(&with(claims(), json!({"sub": "admin"}))).unwrap().as_bytes());
    let mut crit = header(Algorithm::RS256, "k1");
    crit.crit = Some(vec!["exp".into()]);
    let mut wrong_typ = header(Algorithm::RS256, "k1");
    wrong_typ.typ = Some("logout+jwt".into());

    let cases: Vec<(&str, String, Rejection)> = vec![
        ("empty", String::new(), MissingToken),
        (
            "alg none, no signature",
            format!("{}.{}.", b64(br#"{"alg":"none","kid":"k1"}"#), b64(payload.as_bytes())),
            MalformedToken,
        ),
        (
            "alg none with a signature",
            format!("{}.{}.c2ln", b64(br#"{"alg":"none","kid":"k1"}"#), b64(payload.as_bytes())),
            AlgorithmNotAllowed,
        ),
        (
            "HS256 keyed with the public key",
            jsonwebtoken::encode(
                &header(Algorithm::HS256, "k1"),
                &claims(),
                &EncodingKey::from_secret(&public).unwrap(),
            )
            .unwrap(),
            AlgorithmNotAllowed,
        ),
        (
            "HS512",
            jsonwebtoken::encode(
                &header(Algorithm::HS512, "k1"),
                &claims(),
                &EncodingKey::from_secret(b"secret").unwrap(),
            )
            .unwrap(),
            AlgorithmNotAllowed,
        ),
        ("alg lower case", rs(r#"{"alg":"rs256","kid":"k1"}"#, &payload), AlgorithmNotAllowed),
        ("alg with a space", rs(r#"{"alg":"RS256 ","kid":"k1"}"#, &payload), AlgorithmNotAllowed),
        (
            "alg RS512 not in the allow-list",
            issuer.sign_with_header("k1", header(Algorithm::RS512, "k1"), &claims()),
            AlgorithmNotAllowed,
        ),
        ("alg missing", rs(r#"{"kid":"k1"}"#, &payload), MalformedToken),
        ("alg a number", rs(r#"{"alg":256,"kid":"k1"}"#, &payload), MalformedToken),
        ("kid missing", rs(r#"{"alg":"RS256"}"#, &payload), MalformedToken),
        ("kid empty", rs(r#"{"alg":"RS256","kid":""}"#, &payload), MalformedToken),
        ("kid a number", rs(r#"{"alg":"RS256","kid":1}"#, &payload), MalformedToken),
        (
            "unknown kid",
            issuer.sign_with_header("attacker", header(Algorithm::RS256, "k9"), &claims()),
            UnknownKey,
        ),
        ("crit header", issuer.sign_with_header("k1", crit, &claims()), UnsupportedCriticalHeader),
        (
            "typ of another token kind",
            issuer.sign_with_header("k1", wrong_typ, &claims()),
            MalformedToken,
        ),
        (
            "duplicated header member",
            rs(r#"{"alg":"RS256","kid":"k1","kid":"k2"}"#, &payload),
            MalformedToken,
        ),
        (
            "ES256 under an RSA kid",
            issuer.sign_with_header("ec", header(Algorithm::ES256, "k1"), &claims()),
            AlgorithmNotAllowed,
        ),
        (
            "RS256 under an EC kid",
            issuer.sign_with_header("k1", header(Algorithm::RS256, "ec"), &claims()),
            AlgorithmNotAllowed,
        ),
        (
            "EdDSA under an RSA kid",
            issuer.sign_with_header("ed-attacker", header(Algorithm::EdDSA, "k1"), &claims()),
            AlgorithmNotAllowed,
        ),
        (
            "signed by another key",
            issuer.sign_with_header("attacker", header(Algorithm::RS256, "k1"), &claims()),
            InvalidSignature,
        ),
        (
            "payload swapped after signing",
            format!("{head}.{other_body}.{signature}"),
            InvalidSignature,
        ),
        ("signature truncated", good[..good.len() - 10].to_owned(), InvalidSignature),
        ("signature empty", format!("{head}.{body}."), MalformedToken),
        ("two parts", format!("{head}.{body}"), MalformedToken),
        ("four parts", format!("{good}.x"), MalformedToken),
        ("standard base64 characters", format!("{head}.{body}+/.{signature}"), MalformedToken),
        ("base64 padding", format!("{head}=.{body}.{signature}"), MalformedToken),
        ("white space", format!("{head}. {body}.{signature}"), MalformedToken),
        ("payload not JSON", rs(k1_header, "not json"), MalformedToken),
        ("payload a JSON array", rs(k1_header, "[1,2]"), MalformedToken),
        ("payload with trailing bytes", rs(k1_header, &format!("{payload}x")), MalformedToken),
        (
            "payload not UTF-8",
            raw_token_bytes(k1_header.as_bytes(), &[0xff, 0xfe, 0x7b], &rsa1()),
            MalformedToken,
        ),
        (
            "duplicated claim",
            rs(k1_header, &payload.replacen('{', &format!("{{\"aud\":\"{AUDIENCE}\","), 1)),
            MalformedToken,
        ),
        (
            "duplicated nested claim",
            rs(
                k1_header,
                &payload.replacen('{', r#"{"realm_access":{"roles":["a"],"roles":["admin"]},"#, 1),
            ),
            MalformedToken,
        ),
        ("oversized", sign(json!({"padding": "x".repeat(20_000)})), MalformedToken),
        (
            "JWS JSON serialization",
            json!({"payload": body, "signatures": []}).to_string(),
            MalformedToken,
        ),
        ("wrong issuer", sign(json!({"iss": "https://evil.example.test"})), InvalidIssuer),
        ("issuer with a trailing slash", sign(json!({"iss": format!("{ISSUER}/")})), InvalidIssuer),
        ("issuer missing", sign(json!({"-iss": null})), InvalidIssuer),
        ("issuer a list", sign(json!({"iss": [ISSUER]})), MalformedClaim),
        ("wrong audience", sign(json!({"aud": "invoice-consumer"})), InvalidAudience),
        ("audience missing", sign(json!({"-aud": null})), InvalidAudience),
        ("audience empty list", sign(json!({"aud": []})), InvalidAudience),
        ("audience list of numbers", sign(json!({"aud": [1, 2]})), MalformedClaim),
        ("audience an object", sign(json!({"aud": {"name": AUDIENCE}})), MalformedClaim),
        ("audience differs in case", sign(json!({"aud": "Shipping-Consumer"})), InvalidAudience),
        ("expired", sign(json!({"exp": NOW - 3600})), Expired),
        ("expired just past the leeway", sign(json!({"exp": NOW - 30})), Expired),
        ("exp a string", sign(json!({"exp": (NOW + 3600).to_string()})), MalformedClaim),
        ("exp null", sign(json!({"exp": null})), MalformedClaim),
        ("exp 1e300", sign(json!({"exp": 1e300})), MalformedClaim),
        ("exp negative", sign(json!({"exp": -1})), MalformedClaim),
        ("exp missing", sign(json!({"-exp": null})), MissingClaim),
        ("nbf in the future", sign(json!({"nbf": NOW + 3600})), NotYetValid),
        ("nbf a string", sign(json!({"nbf": "yesterday"})), MalformedClaim),
        ("iat far in the future", sign(json!({"iat": NOW + 3600})), NotYetValid),
        ("iat a boolean", sign(json!({"iat": true})), MalformedClaim),
        ("sub missing", sign(json!({"-sub": null})), MissingClaim),
        ("sub empty", sign(json!({"sub": ""})), MissingClaim),
        ("sub a number", sign(json!({"sub": 42})), MalformedClaim),
        ("scope a number", sign(json!({"scope": 7})), MalformedClaim),
        ("scope a list", sign(json!({"scope": ["events:order.created"]})), MalformedClaim),
        ("jti a number", sign(json!({"jti": 7})), MalformedClaim),
    ];
    assert!(cases.len() >= 40);
    let mut wrong = Vec::new();
    for (name, token, expected) in &cases {
        match verifier.verify_at(token, now()).await {
            Err(VerifyError::Rejected { reason, .. }) if reason == *expected => {}
            other => wrong.push(format!("{name}: expected {expected}, got {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    // None of that disturbed the verifier.
    assert!(verifier.verify_at(&good, now()).await.is_ok());
}

fn raw_token_bytes(header: &[u8], payload: &[u8], key: &EncodingKey) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, Algorithm::RS256).unwrap();
    format!("{message}.{signature}")
}

#[tokio::test]
async fn the_event_scope_must_be_exactly_the_required_one() {
    let issuer = issuer_with_k1().await;
    let verifier = verifier(config(&issuer));
    let check = |scope: &'static str| {
        let token = issuer.sign("k1", &with(claims(), json!({ "scope": scope })));
        let verifier = verifier.clone();
        async move {
            let claims = verifier.verify_at(&token, now()).await.unwrap();
            claims.check_exact_scope("events:order.created").map_err(|e| e.rejection().unwrap())
        }
    };
    assert_eq!(check("events:order.created").await, Ok(()));
    // C08: an event token that still carries the user's API scope.
    assert_eq!(check("events:order.created orders:write").await, Err(Rejection::ExcessScope));
    assert_eq!(check("openid").await, Err(Rejection::InsufficientScope));
    // A scope hidden in `scp` next to `scope` counts too.
    let both = issuer.sign("k1", &with(claims(), json!({"scp": ["orders:write"]})));
    let claims = verifier.verify_at(&both, now()).await.unwrap();
    assert_eq!(claims.scopes, ["events:order.created", "orders:write"]);
    assert_eq!(
        claims.check_exact_scope("events:order.created").unwrap_err().rejection(),
        Some(Rejection::ExcessScope)
    );
    assert_eq!(check("").await, Err(Rejection::InsufficientScope));
    // `scp` as one space-separated string (Microsoft Entra) is split too.
    let entra =
        with(self::claims(), json!({"-scope": null, "scp": "events:order.created profile"}));
    let split = verifier.verify_at(&issuer.sign("k1", &entra), now()).await.unwrap();
    assert_eq!(split.scopes, ["events:order.created", "profile"]);
    assert_eq!(
        split.check_exact_scope("events:order.created").unwrap_err().rejection(),
        Some(Rejection::ExcessScope)
    );
}

#[tokio::test]
async fn configured_claims_are_required() {
    let issuer = issuer_with_k1().await;
    let mut config = config(&issuer);
    config.required_claims = vec!["jti".into(), "tenant".into()];
    let verifier = verifier(config);
    let without_tenant = issuer.sign("k1", &claims());
    assert_eq!(reason(verifier.verify_at(&without_tenant, now()).await), Rejection::MissingClaim);
    let null_tenant = issuer.sign("k1", &with(claims(), json!({"tenant": null})));
    assert_eq!(reason(verifier.verify_at(&null_tenant, now()).await), Rejection::MissingClaim);
    let with_tenant = issuer.sign("k1", &with(claims(), json!({"tenant": "acme"})));
    assert!(verifier.verify_at(&with_tenant, now()).await.is_ok());
}
