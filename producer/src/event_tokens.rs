//! Event tokens: obtained by token exchange, checked strictly, reused while
//! they last.
//!
//! The authorization server's answer is not trusted as such. The issued
//! token is verified like any other token; its lifetime comes from its
//! verified `exp` (never from `expires_in`); its scope and audience must be
//! exactly those requested and its subject the user's. Any shortfall or
//! excess fails the request, so nothing is published with a token that
//! could do more, or less, than the event needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use event_identity::ops::latency_buckets;
use prometheus_client::metrics::histogram::Histogram;
use sha2::{Digest, Sha256};

use event_identity::exchange::{ExchangeError, TokenExchanger};
use event_identity::{Secret, VerifiedClaims, Verifier, VerifyError};

use crate::routes::EventRoute;

/// Most event tokens kept in the cache.
const CACHE_CAPACITY: usize = 10_000;
/// Tries of an exchange whose server is unavailable, 200 ms then 400 ms
/// apart, before the request fails with 503.
const EXCHANGE_ATTEMPTS: u32 = 3;
/// How long a failed exchange answers the requests that waited for it.
const FAILURE_SHARING: Duration = Duration::from_secs(1);

/// Why no usable event token could be had.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EventTokenError {
    /// The exchange itself failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The exchange answered with a token this producer must not publish.
    #[error("token exchange returned an unusable event token: {0}")]
    Unusable(String),
    /// The issuer's keys could not be fetched to check the token.
    #[error("issuer keys unavailable: {0}")]
    KeysUnavailable(String),
}

struct Cached {
    token: Secret,
    expires_at: i64,
}

/// Obtains and caches event tokens.
pub struct EventTokens {
    exchanger: TokenExchanger,
    verifier: Verifier,
    min_lifetime: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failures: Mutex<HashMap<String, (Instant, EventTokenError)>>,
    exchanges: AtomicU64,
    exchange_failures: AtomicU64,
    cache_hits: AtomicU64,
    exchange_seconds: Histogram,
}

impl EventTokens {
    /// Event tokens from `exchanger`, checked with `verifier`'s issuer and
    /// keys, and refused below `min_lifetime` of remaining validity.
    pub fn new(exchanger: TokenExchanger, verifier: Verifier, min_lifetime: Duration) -> Self {
        Self {
            exchanger,
            verifier,
            min_lifetime,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            exchanges: AtomicU64::new(0),
            exchange_failures: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            exchange_seconds: Histogram::new(latency_buckets()),
        }
    }

    /// How many exchanges have been made (each retry counts).
    pub fn exchange_count(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// How many exchange requests failed (each retry counts).
    pub fn exchange_failure_count(&self) -> u64 {
        self.exchange_failures.load(Ordering::Relaxed)
    }

    /// How many requests were served an event token from the cache.
    pub fn cache_hit_count(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    /// Seconds per exchange request.
    pub fn exchange_seconds(&self) -> &Histogram {
        &self.exchange_seconds
    }

    /// An event token for `user` to publish on `route`: from the cache when
    /// one with enough lifetime is there, else by exchange. Concurrent
    /// requests for the same key wait for one exchange.
    pub async fn get(
        &self,
        user_token: &Secret,
        user: &VerifiedClaims,
        route: &EventRoute,
    ) -> Result<Secret, EventTokenError> {
        // A digest of the whole user token, not a short fingerprint (a
        // collision would hand one user's event token to another), with
        // length-prefixed fields so no scope or audience can alias another.
        let mut hasher = Sha256::new();
        for part in [user_token.expose(), route.scope.as_str(), route.audience.as_str()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let key = hex(&hasher.finalize());
        if let Some(token) = self.cached(&key, SystemTime::now()) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(token);
        }

        let lock = self.in_flight_lock(&key);
        let guard = lock.lock().await;
        let result = match (self.cached(&key, SystemTime::now()), self.recent_failure(&key)) {
            (Some(token), _) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                Ok(token)
            }
            // The exchange this request waited for just failed: share its
            // answer rather than repeat its retries.
            (None, Some(error)) => Err(error),
            (None, None) => {
                let result = self.exchange(key.clone(), user_token, user, route).await;
                if let Err(error) = &result {
                    self.remember_failure(&key, error.clone());
                }
                result
            }
        };
        drop(guard);
        self.release_in_flight_lock(&key, lock);
        result
    }

    async fn exchange(
        &self,
        key: String,
        user_token: &Secret,
        user: &VerifiedClaims,
        route: &EventRoute,
    ) -> Result<Secret, EventTokenError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 1;
        let token = loop {
            self.exchanges.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let answer = self.exchanger.exchange(user_token, &route.scope, &route.audience).await;
            self.exchange_seconds.observe(started.elapsed().as_secs_f64());
            if answer.is_err() {
                self.exchange_failures.fetch_add(1, Ordering::Relaxed);
            }
            match answer {
                Ok(token) => break token,
                Err(ExchangeError::Unavailable(why)) if attempt < EXCHANGE_ATTEMPTS => {
                    tracing::warn!(attempt, reason = %why, "token exchange unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error.into()),
            }
        };

        let now = SystemTime::now();
        let claims = self.check(&token, user, route, now).await?;
        tracing::debug!(
            jti = claims.token_id.as_deref().unwrap_or("-"),
            kid = %claims.key_id,
            lifetime_s = claims.remaining_secs(now),
            scope = %route.scope,
            "event token issued"
        );
        self.store(key, &token, claims.expires_at, now);
        Ok(token)
    }

    fn recent_failure(&self, key: &str) -> Option<EventTokenError> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (at, error) = failures.get(key)?;
        (at.elapsed() < FAILURE_SHARING).then(|| error.clone())
    }

    fn remember_failure(&self, key: &str, error: EventTokenError) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|_, (at, _)| at.elapsed() < FAILURE_SHARING);
        failures.insert(key.to_owned(), (Instant::now(), error));
    }

    fn in_flight_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(key.to_owned()).or_default().clone()
    }

    fn release_in_flight_lock(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // Two holders left (the map and this caller): nobody else waits.
        if Arc::strong_count(&lock) <= 2 {
            locks.remove(key);
        }
    }

    async fn check(
        &self,
        token: &Secret,
        user: &VerifiedClaims,
        route: &EventRoute,
        now: SystemTime,
    ) -> Result<Arc<VerifiedClaims>, EventTokenError> {
        let verifier = self
            .verifier
            .for_audience(&route.audience)
            .map_err(|e| EventTokenError::Unusable(e.to_string()))?;
        let claims = verifier.verify_at(token.expose(), now).await.map_err(|e| match e {
            VerifyError::Unavailable(why) => EventTokenError::KeysUnavailable(why),
            VerifyError::Rejected { reason, detail } => {
                EventTokenError::Unusable(format!("it fails verification ({reason}: {detail})"))
            }
        })?;

        if claims.audience != [route.audience.as_str()] {
            return Err(EventTokenError::Unusable(format!(
                "aud is {:?}, requested exactly {:?}",
                claims.audience, route.audience
            )));
        }
        claims.check_exact_scope(&route.scope).map_err(|e| {
            EventTokenError::Unusable(format!(
                "scope is {:?}, requested exactly {:?} ({e})",
                claims.scopes.join(" "),
                route.scope
            ))
        })?;
        if claims.subject != user.subject {
            return Err(EventTokenError::Unusable("its subject is not the user's".into()));
        }
        let remaining = claims.remaining_secs(now);
        if remaining < self.min_lifetime.as_secs() as i64 {
            return Err(EventTokenError::Unusable(format!(
                "it is valid for {remaining} s, less than the required {} s",
                self.min_lifetime.as_secs()
            )));
        }
        Ok(claims)
    }

    fn cached(&self, key: &str, now: SystemTime) -> Option<Secret> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(key)?;
        let remaining = entry.expires_at - unix(now);
        (remaining >= self.min_lifetime.as_secs() as i64).then(|| entry.token.clone())
    }

    fn store(&self, key: String, token: &Secret, expires_at: i64, now: SystemTime) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            let floor = unix(now) + self.min_lifetime.as_secs() as i64;
            cache.retain(|_, c| c.expires_at >= floor);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, Cached { token: token.clone(), expires_at });
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
