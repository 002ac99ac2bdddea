//! Signing-key rotation at the real Keycloak: a token signed with a newly
//! activated key verifies without a restart, and a token signed with the
//! old key still verifies while that key is published.
//!
//! This file is its own test binary, so no other test runs while the
//! realm's signing key changes; the new key is removed at the end.

use std::time::Duration;

use event_identity::jwks::JwksTiming;
use event_identity::{Verifier, VerifierConfig};
use event_identity_tests::*;
use serde_json::{Value, json};

async fn admin_token(http: &reqwest::Client) -> String {
    let url = format!("{}/realms/master/protocol/openid-connect/token", keycloak_url());
    let response: Value = http
        .post(url)
        .form(&[
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", "admin"),
            ("password", "admin"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["access_token"].as_str().expect("admin token").to_owned()
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keycloak_key_verifies_without_a_restart() {
    require_services().await;
    let http = reqwest::Client::new();
    let jwks = format!("{}/protocol/openid-connect/certs", issuer());
    let mut config = VerifierConfig::new(issuer(), jwks.parse().unwrap(), "event-producer");
    config.jwks_timing = JwksTiming {
        refresh_interval: Duration::from_secs(3600),
        miss_cooldown: Duration::from_millis(500),
    };
    let verifier =
        Verifier::new(config, event_identity::http::client(Duration::from_secs(5))).unwrap();

    let old_token = alice_token().await;
    let old_kid = kid(&old_token);
    verifier.verify(&old_token).await.expect("the current key verifies");
    assert_eq!(verifier.keys().fetch_count().await, 1);

    // Add a new RSA key with a higher priority: Keycloak signs with it from
    // now on and keeps publishing the old one.
    let admin = admin_token(&http).await;
    let realm: Value = http
        .get(format!("{}/admin/realms/event-identity", keycloak_url()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let component = json!({
        "name": "rotated-in-by-test",
        "providerId": "rsa-generated",
        "providerType": "org.keycloak.keys.KeyProvider",
        "parentId": realm["id"],
        "config": {
            "priority": ["1000"], "enabled": ["true"], "active": ["true"],
            "algorithm": ["RS256"], "keySize": ["2048"],
        },
    });
    let created = http
        .post(format!("{}/admin/realms/event-identity/components", keycloak_url()))
        .bearer_auth(&admin)
        .json(&component)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "creating the key provider");
    let location = created.headers()["location"].to_str().unwrap().to_owned();

    let result = async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let new_token = alice_token().await;
        let new_kid = kid(&new_token);
        assert_ne!(new_kid, old_kid, "Keycloak signs with the new key");

        let verified = verifier.verify(&new_token).await.expect("the new key verifies");
        assert_eq!(verified.key_id, new_kid);
        assert_eq!(verifier.keys().fetch_count().await, 2);

        // The old key is still published, so its tokens still verify.
        let verified = verifier.verify(&old_token).await.expect("the old key still verifies");
        assert_eq!(verified.key_id, old_kid);
        assert_eq!(verifier.keys().fetch_count().await, 2);
    };
    let outcome = tokio::spawn(result).await;

    let deleted = http.delete(&location).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(deleted.status(), 204, "removing the key provider");
    outcome.unwrap();
}
