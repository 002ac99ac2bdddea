//! Publishing one identity-bearing event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use event_identity::contract::{self, MessageIds, header};
use event_identity::discovery::resolve;
use event_identity::exchange::{ExchangeConfig, ExchangeError, TokenExchanger};
use event_identity::{Rejection, Secret, VerifiedClaims, Verifier, VerifierConfig, VerifyError};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::config::ProducerConfig;
use crate::event_tokens::{EventTokenError, EventTokens};
use crate::routes::Routes;

/// One event to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// The CloudEvents type; must have a route.
    pub event_type: String,
    /// The partition key: the entity the event is about.
    pub key: String,
    /// The event data, JSON text published as it is (make one from a value
    /// with `serde_json::value::to_raw_value`).
    pub data: Box<RawValue>,
    /// The client's `Idempotency-Key`, if any: a retry with the same key
    /// publishes the same message ID.
    pub idempotency_key: Option<String>,
}

/// Where an acknowledged event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message ID (`ce_id`).
    pub id: Uuid,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
}

/// Why an event was not published. In every case nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The user token is missing or was rejected.
    #[error("user token rejected: {0}")]
    Unauthenticated(VerifyError),
    /// The user may not publish this event type.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request itself is unusable (unknown type, empty key...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The authorization server, its keys, or Kafka could not be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request body is over the configured limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// The request body did not arrive in time.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// The token exchange refused or returned an unusable event token.
    #[error("{0}")]
    TokenExchange(String),
}

/// Publishes events on behalf of verified users.
pub struct Publisher {
    user_verifier: Verifier,
    routes: Routes,
    tokens: EventTokens,
    producer: FutureProducer,
    topic: String,
    source: String,
    delivery_timeout: Duration,
    message_ids: MessageIds,
    in_progress: Arc<AtomicUsize>,
    published: AtomicU64,
}

/// Counts a publish while it runs.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Publisher {
    /// Builds a publisher from the service configuration: discovers the
    /// issuer's endpoints (unless given), loads its keys, and creates the
    /// Kafka producer. Errors name the setting at fault.
    pub async fn from_config(config: &ProducerConfig) -> anyhow::Result<Self> {
        let http = event_identity::http::client(Duration::from_millis(config.http_timeout_ms));
        let (auth, message_id_secret) = config.client_auth().map_err(anyhow::Error::msg)?;
        let routes = Routes::new(config.routes.iter().cloned())
            .map_err(|e| anyhow::anyhow!("--route: {e}"))?;

        let endpoints = resolve(
            &http,
            &config.issuer,
            config.jwks_url.as_deref(),
            config.token_endpoint.as_deref(),
            true,
            config.allow_plain_http,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let (jwks_url, token_endpoint) = (
            endpoints.jwks_uri,
            endpoints.token_endpoint.expect("resolve returns a token endpoint when asked"),
        );

        let mut verifier_config =
            VerifierConfig::new(&config.issuer, jwks_url, config.user_audience());
        verifier_config.leeway = Duration::from_secs(config.leeway_s);
        let user_verifier = Verifier::new(verifier_config, http.clone())
            .map_err(|e| anyhow::anyhow!("--user-audience: {e}"))?;
        let keys = user_verifier.keys().refresh_now().await.map_err(|e| {
            let setting = if config.jwks_url.is_some() { "--jwks-url" } else { "--issuer" };
            anyhow::anyhow!("{setting}: cannot load the issuer's keys: {e}")
        })?;
        tracing::info!(issuer = %config.issuer, keys, "issuer keys loaded");

        let exchanger = TokenExchanger::new(
            ExchangeConfig { token_endpoint, client_id: config.client_id.clone(), auth },
            http,
        );
        let tokens = EventTokens::new(
            exchanger,
            user_verifier.clone(),
            Duration::from_secs(config.min_event_token_lifetime_s),
        );

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", config.delivery_timeout_ms.to_string())
            .set("linger.ms", config.linger_ms.to_string())
            .create()
            .context("--kafka-bootstrap: cannot create the Kafka producer")?;

        Ok(Self {
            user_verifier,
            routes,
            tokens,
            producer,
            topic: config.topic.clone(),
            source: config.source.clone(),
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms),
            message_ids: MessageIds::new(message_id_secret),
            in_progress: Arc::new(AtomicUsize::new(0)),
            published: AtomicU64::new(0),
        })
    }

    /// The event-token source, to inspect exchange counts.
    pub fn event_tokens(&self) -> &EventTokens {
        &self.tokens
    }

    /// The verifier of user tokens (and its cache of the issuer's keys).
    pub fn user_verifier(&self) -> &Verifier {
        &self.user_verifier
    }

    /// Events the broker acknowledged since start.
    pub fn published_count(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Whether a broker answers a metadata request within `timeout`.
    pub async fn broker_reachable(&self, timeout: Duration) -> Result<(), String> {
        let producer = self.producer.clone();
        let answer = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|_| ())
        });
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("no Kafka broker answered ({error})")),
            Err(error) => Err(format!("the broker check failed: {error}")),
        }
    }

    /// Verifies a user's access token (the value of a Bearer header).
    pub async fn authenticate(
        &self,
        token: Option<&str>,
    ) -> Result<(Secret, Arc<VerifiedClaims>), PublishError> {
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            PublishError::Unauthenticated(VerifyError::Rejected {
                reason: Rejection::MissingToken,
                detail: "no bearer token".into(),
            })
        })?;
        match self.user_verifier.verify(token).await {
            Ok(claims) => Ok((Secret::new(token), claims)),
            Err(VerifyError::Unavailable(why)) => Err(PublishError::Unavailable(why)),
            Err(rejected) => Err(PublishError::Unauthenticated(rejected)),
        }
    }

    /// Publishes `request` for `user` and returns once the broker has
    /// acknowledged the record (acks=all, idempotent producer).
    pub async fn publish(
        &self,
        user_token: &Secret,
        user: &VerifiedClaims,
        request: PublishRequest,
    ) -> Result<Published, PublishError> {
        let _counted = InProgress::enter(&self.in_progress);
        let route = self.routes.get(&request.event_type).ok_or_else(|| {
            PublishError::InvalidRequest(format!("unknown event type {:?}", request.event_type))
        })?;
        if request.key.is_empty() {
            return Err(PublishError::InvalidRequest("the partition key is empty".into()));
        }
        if let Err(missing) = route.requires.check(user) {
            return Err(PublishError::Forbidden(format!(
                "publishing {} requires {missing}",
                route.event_type
            )));
        }

        let event_token = self.tokens.get(user_token, user, route).await.map_err(|e| match e {
            EventTokenError::Exchange(ExchangeError::Unavailable(why)) => {
                PublishError::Unavailable(format!("token exchange: {why}"))
            }
            EventTokenError::Exchange(ExchangeError::SubjectTokenRefused(why)) => {
                PublishError::Unauthenticated(VerifyError::Rejected {
                    reason: Rejection::Expired,
                    detail: format!("the authorization server refused the token: {why}"),
                })
            }
            EventTokenError::KeysUnavailable(why) => {
                PublishError::Unavailable(format!("token exchange: {why}"))
            }
            other => PublishError::TokenExchange(other.to_string()),
        })?;

        let parts = [
            user.subject.as_bytes(),
            route.event_type.as_bytes(),
            request.key.as_bytes(),
            request.data.get().as_bytes(),
        ];
        let id = self.message_ids.derive(&parts, request.idempotency_key.as_deref());
        let time = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let id_text = id.to_string();
        let authorization = format!("Bearer {}", event_token.expose());
        let headers = OwnedHeaders::new()
            .insert(Header { key: header::SPEC_VERSION, value: Some(contract::SPEC_VERSION) })
            .insert(Header { key: header::ID, value: Some(id_text.as_str()) })
            .insert(Header { key: header::TYPE, value: Some(route.event_type.as_str()) })
            .insert(Header { key: header::SOURCE, value: Some(self.source.as_str()) })
            .insert(Header { key: header::TIME, value: Some(time.as_str()) })
            .insert(Header { key: header::CONTENT_TYPE, value: Some(contract::CONTENT_TYPE) })
            .insert(Header { key: header::AUTHORIZATION, value: Some(authorization.as_str()) });
        let payload = request.data.get().as_bytes();
        let record =
            FutureRecord::to(&self.topic).key(&request.key).payload(payload).headers(headers);

        let delivery =
            self.producer.send(record, self.delivery_timeout).await.map_err(|(e, _)| match e {
                // Too large for this producer or for the topic: a retry
                // cannot help, so it is the client's 413, not a 503.
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    PublishError::PayloadTooLarge
                }
                e => {
                    PublishError::Unavailable(format!("Kafka did not acknowledge the record: {e}"))
                }
            })?;
        self.published.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            event_id = %id,
            topic = %self.topic,
            partition = delivery.partition,
            offset = delivery.offset,
            subject = %user.subject,
            "event published"
        );
        Ok(Published { id, partition: delivery.partition, offset: delivery.offset })
    }

    /// Publishes that have started and not yet ended (exchanging, queued
    /// or awaiting their acknowledgement).
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::SeqCst)
    }

    /// Records handed to Kafka and not yet acknowledged.
    pub fn undelivered(&self) -> usize {
        self.producer.in_flight_count().max(0) as usize
    }

    /// Drops every queued and in-flight record; their senders get an error.
    pub fn purge(&self) {
        self.producer.purge(PurgeConfig::default().queue().inflight());
    }

    /// Delivers queued records, waiting at most `timeout`; returns how many
    /// remain undelivered.
    pub async fn flush(&self, timeout: Duration) -> usize {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = producer.flush(timeout) {
                tracing::warn!(%error, "flush did not complete");
            }
            producer.in_flight_count().max(0) as usize
        })
        .await
        .unwrap_or(0)
    }
}
