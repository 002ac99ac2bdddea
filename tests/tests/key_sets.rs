//! Key-set answers that parse but hold no usable signing key: never a
//! reason to call valid tokens forged.

use std::sync::Arc;
use std::time::Duration;

use event_identity::dev_issuer::{DevIssuer, KeyMaterial};
use event_identity_consumer::ConsumerBuilder;
use event_identity_tests::*;

const ORDER: &[u8] = br#"{"tenant":"acme"}"#;
const WAIT: Duration = Duration::from_secs(60);

/// The key endpoint answers `{"keys":[]}` for a while (a botched rotation,
/// a stub behind a proxy). That is a failed refresh: the last good set
/// stays, and a valid event is processed (after retries), never
/// dead-lettered as `unknown_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_key_set_does_not_revoke_the_trusted_keys() {
    require_services().await;
    let issuer = dev_issuer().await;
    let topic = fresh_topic(1).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let consumer = start_consumer_with(&topic, issuer.issuer(), dir, |mut config| {
        // Refresh on the next lookup after a second, with no cooldown.
        config.jwks_refresh_s = 1;
        config.jwks_cooldown_ms = 0;
        ConsumerBuilder::new(config)
    })
    .await;

    write_record(&topic, &test_id(1), Some(&dev_event_token(&issuer, "user-1")), ORDER).await;
    consumer.wait_for("first processed", WAIT, |s| s.settled() == 1).await;

    issuer.set_published("k1", false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_record(&topic, &test_id(2), Some(&dev_event_token(&issuer, "user-1")), ORDER).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    issuer.set_published("k1", true);
    consumer.wait_for("second settled", WAIT, |s| s.settled() == 2).await;
    let processed = consumer.stats.processed.load(std::sync::atomic::Ordering::Relaxed);
    consumer.stop().await;
    assert_eq!(dead_letter_reasons(&topic).await, []);
    assert_eq!(processed, 2);
}

/// A consumer whose key set holds no usable key (the wrong realm, an
/// encryption-only set) does not start: it would dead-letter every valid
/// event as `unknown_key`. The error names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_key_set_has_no_usable_key_does_not_start() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_unpublished_key("k1", KeyMaterial::Rsa1);
    let topic = fresh_topic(1).await;
    let config = consumer_config(&topic, "sqlite::memory:", issuer.issuer(), &[]);
    let error = ConsumerBuilder::new(config).build().await.err().expect("the start fails");
    let error = format!("{error:#}");
    assert!(error.starts_with("--issuer: cannot load the issuer's keys"), "{error}");
    assert!(error.contains("no usable signing key"), "{error}");

    let jwks = format!("--jwks-url={}/jwks", issuer.issuer());
    let config = consumer_config(&topic, "sqlite::memory:", issuer.issuer(), &[&jwks]);
    let error = ConsumerBuilder::new(config).build().await.err().expect("the start fails");
    assert!(format!("{error:#}").starts_with("--jwks-url: "), "{error:#}");
}

/// The producer likewise: with no usable key every user would get 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_whose_key_set_has_no_usable_key_does_not_start() {
    require_services().await;
    let issuer = DevIssuer::start().await.unwrap();
    issuer.add_unpublished_key("k1", KeyMaterial::Rsa1);
    let topic = fresh_topic(1).await;
    let config = producer_config_with(&topic, &[&format!("--issuer={}", issuer.issuer())]);
    let error = event_identity_producer::Service::bind(config).await.err().expect("start fails");
    let error = format!("{error:#}");
    assert!(error.starts_with("--issuer: cannot load the issuer's keys"), "{error}");
    assert!(error.contains("no usable signing key"), "{error}");
}
