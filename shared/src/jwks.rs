//! The issuer's signing keys, fetched from its JWKS endpoint and cached.
//!
//! Keys are looked up by `kid`. A `kid` that is not cached triggers a
//! refresh, at most one per cooldown; misses that arrive while a refresh is
//! running wait for that refresh instead of starting their own. A failed
//! refresh keeps the last good key set, so an issuer outage does not
//! revoke keys that were already trusted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The algorithm family a key belongs to; a token's `alg` must belong to
/// the family of the key named by its `kid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    /// RSA keys: RS256/384/512 and PS256/384/512.
    Rsa,
    /// EC keys on P-256: ES256.
    EcP256,
    /// EC keys on P-384: ES384.
    EcP384,
    /// Ed25519 keys: EdDSA.
    Ed25519,
}

impl KeyFamily {
    /// Whether `alg` can be verified with a key of this family.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Self::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Self::EcP256 => alg == ES256,
            Self::EcP384 => alg == ES384,
            Self::Ed25519 => alg == EdDSA,
        }
    }
}

/// One usable public key from the issuer's key set.
pub struct PublicKey {
    /// The decoding key for signature checks.
    pub key: DecodingKey,
    /// Which algorithms this key may verify.
    pub family: KeyFamily,
}

/// Why a key could not be produced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The key set was fetched and does not contain this `kid`.
    #[error("no key with this kid in the issuer's key set")]
    Unknown,
    /// The key set could not be fetched, and no cached key matches.
    #[error("issuer keys unavailable: {0}")]
    Unavailable(String),
}

/// Timing of the key cache.
#[derive(Debug, Clone, Copy)]
pub struct JwksTiming {
    /// How long a fetched key set is used before it is fetched again.
    /// Default 1 hour.
    pub refresh_interval: Duration,
    /// Least time between two fetches triggered by unknown `kid`s or
    /// failures. Default 30 s.
    pub miss_cooldown: Duration,
}

impl Default for JwksTiming {
    fn default() -> Self {
        Self { refresh_interval: Duration::from_secs(3600), miss_cooldown: Duration::from_secs(30) }
    }
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<PublicKey>>,
    fetched_at: Option<Instant>,
    /// A digest of the published keys, to tell a changed set from a
    /// re-fetched identical one.
    digest: [u8; 32],
    /// Bumped whenever the published keys change.
    generation: u64,
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    fetches: u64,
}

/// A cached view of one issuer's JWKS.
pub struct JwksCache {
    url: reqwest::Url,
    http: reqwest::Client,
    timing: JwksTiming,
    keys: RwLock<Arc<KeySet>>,
    refresh: Mutex<RefreshState>,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
}

impl JwksCache {
    /// A cache for the key set at `url`; nothing is fetched until the first
    /// lookup or [`JwksCache::refresh_now`].
    pub fn new(url: reqwest::Url, http: reqwest::Client, timing: JwksTiming) -> Self {
        Self {
            url,
            http,
            timing,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: Mutex::new(RefreshState::default()),
            refreshes: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
        }
    }

    /// The key named `kid`, fetching the key set if it is unknown or stale.
    pub async fn key(&self, kid: &str) -> Result<Arc<PublicKey>, KeyError> {
        let snapshot = self.snapshot();
        if let Some(key) = snapshot.keys.get(kid)
            && !self.is_stale(&snapshot)
        {
            return Ok(key.clone());
        }

        let mut state = self.refresh.lock().await;

        // Another task may have refreshed while this one waited for the lock.
        let current = self.snapshot();
        let refreshed_meanwhile = current.fetched_at != snapshot.fetched_at;
        if let Some(key) = current.keys.get(kid)
            && (refreshed_meanwhile || !self.is_stale(&current))
        {
            return Ok(key.clone());
        }
        let cooling = state.last_attempt.is_some_and(|at| at.elapsed() < self.timing.miss_cooldown);
        if refreshed_meanwhile || cooling {
            return Self::lookup(&current, kid, &state);
        }

        self.fetch_into(&mut state).await;
        Self::lookup(&self.snapshot(), kid, &state)
    }

    /// Fetches the key set now, regardless of cooldown. Used at start so a
    /// service can report whether the issuer's keys are loaded.
    pub async fn refresh_now(&self) -> Result<usize, KeyError> {
        let mut state = self.refresh.lock().await;
        self.fetch_into(&mut state).await;
        match &state.last_error {
            Some(error) => Err(KeyError::Unavailable(error.clone())),
            None => Ok(self.snapshot().keys.len()),
        }
    }

    /// How many fetches this cache has made (successful or not).
    pub async fn fetch_count(&self) -> u64 {
        self.refresh.lock().await.fetches
    }

    /// A number that changes whenever the published keys change; results
    /// derived from the old keys (such as cached verifications) are stale
    /// once it moves.
    pub fn generation(&self) -> u64 {
        self.snapshot().generation
    }

    /// Whether a key set has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.snapshot().fetched_at.is_some()
    }

    /// How many keys the current set holds.
    pub fn key_count(&self) -> usize {
        self.snapshot().keys.len()
    }

    /// Fetches of the key set that succeeded and that failed, since start.
    pub fn refresh_counts(&self) -> (u64, u64) {
        (self.refreshes.load(Ordering::Relaxed), self.refresh_failures.load(Ordering::Relaxed))
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_stale(&self, set: &KeySet) -> bool {
        set.fetched_at.is_none_or(|at| at.elapsed() >= self.timing.refresh_interval)
    }

    fn lookup(set: &KeySet, kid: &str, state: &RefreshState) -> Result<Arc<PublicKey>, KeyError> {
        if let Some(key) = set.keys.get(kid) {
            return Ok(key.clone());
        }
        match &state.last_error {
            Some(error) => Err(KeyError::Unavailable(error.clone())),
            None if set.fetched_at.is_none() => {
                Err(KeyError::Unavailable("the key set has not been fetched".into()))
            }
            None => Err(KeyError::Unknown),
        }
    }

    async fn fetch_into(&self, state: &mut RefreshState) {
        state.last_attempt = Some(Instant::now());
        state.fetches += 1;
        match self.fetch().await {
            Ok((keys, digest)) => {
                tracing::info!(url = %self.url, keys = keys.len(), "fetched issuer keys");
                let previous = self.snapshot();
                let generation = previous.generation + u64::from(previous.digest != digest);
                let set = KeySet { keys, fetched_at: Some(Instant::now()), digest, generation };
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                state.last_error = None;
                self.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.refresh_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %self.url, %error, "fetching issuer keys failed; keeping the last good set");
                state.last_error = Some(error);
            }
        }
    }

    async fn fetch(&self) -> Result<(HashMap<String, Arc<PublicKey>>, [u8; 32]), String> {
        let response = self
            .http
            .get(self.url.clone())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status()));
        }

        let body = crate::http::read_capped(response, MAX_JWKS_BYTES).await?;
        let keys = parse_key_set(&body)?;
        Ok((keys, Sha256::digest(&body).into()))
    }
}

#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

/// Parses a JWKS document into usable signing keys by `kid`.
///
/// Keys meant for encryption, keys without a `kid`, symmetric keys and keys
/// of unsupported types are skipped: one odd key must not make the whole
/// set unusable. A set left with no usable key is an error: an issuer
/// always has a key it signs with, so such an answer (a stub, the wrong
/// realm, a botched rotation) must not replace a good set and make every
/// token look forged.
pub fn parse_key_set(body: &[u8]) -> Result<HashMap<String, Arc<PublicKey>>, String> {
    let raw: RawKeySet =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for value in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                KeyFamily::EcP256
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                KeyFamily::EcP384
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyFamily::Ed25519
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.insert(kid, Arc::new(PublicKey { key, family }));
    }
    if keys.is_empty() {
        return Err("the key set holds no usable signing key".into());
    }
    Ok(keys)
}
