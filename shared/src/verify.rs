//! Verification of user tokens and event tokens.
//!
//! One [`Verifier`] serves one issuer and one audience. It accepts exactly
//! the tokens that are signed by a published key of the issuer with an
//! allowed asymmetric algorithm, and whose `iss`, `aud`, `exp`, `nbf` and
//! `iat` hold; every other token is refused with a [`Rejection`] reason.
//! Claims are parsed here rather than by `jsonwebtoken`'s validation so that
//! NumericDates may be floats and a claim of the wrong JSON type is reported
//! as malformed rather than missing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::jwks::{JwksCache, JwksTiming, KeyError};
use crate::reason::Rejection;

/// The latest NumericDate accepted: 9999-12-31T23:59:59Z. Larger values
/// (such as `1e300`) are malformed, not "valid forever".
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The exact `iss` value trusted, e.g.
    /// `https://idp.example.test/realms/events`.
    pub issuer: String,
    /// Where the issuer publishes its keys.
    pub jwks_url: reqwest::Url,
    /// The audience this service answers to; a token must name it in
    /// `aud`. Required: an empty audience is a configuration error.
    pub audience: String,
    /// Accepted signature algorithms. Default RS256, PS256, ES256, EdDSA.
    /// HMAC algorithms are refused at construction.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`. Default 30 s.
    pub leeway: Duration,
    /// Tokens longer than this are rejected before any parsing.
    /// Default 16 KiB.
    pub max_token_bytes: usize,
    /// Key cache timing.
    pub jwks_timing: JwksTiming,
    /// Claims a token must carry besides `iss`, `aud`, `exp` and `sub`
    /// (which are always required), e.g. `jti` or `tenant`. A missing one
    /// is `missing_claim`. Default: none.
    pub required_claims: Vec<String>,
    /// How many successful verifications are remembered, keyed by a hash
    /// of the whole token, so a token seen again costs a lookup instead of
    /// a signature check. Entries end with the token's `exp` and whenever
    /// the issuer's key set changes. Default 10,000; 0 disables the cache.
    pub cache_capacity: usize,
}

impl VerifierConfig {
    /// A configuration with the defaults above.
    pub fn new(
        issuer: impl Into<String>,
        jwks_url: reqwest::Url,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            jwks_url,
            audience: audience.into(),
            algorithms: default_algorithms(),
            leeway: Duration::from_secs(30),
            max_token_bytes: 16 * 1024,
            jwks_timing: JwksTiming::default(),
            cache_capacity: 10_000,
            required_claims: Vec::new(),
        }
    }
}

/// The algorithms accepted unless configured otherwise.
pub fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::EdDSA]
}

/// A verifier setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No audience was configured.
    #[error("an expected audience is required")]
    MissingAudience,
    /// No issuer was configured.
    #[error("an issuer is required")]
    MissingIssuer,
    /// The allow-list is empty or holds a symmetric algorithm.
    #[error("algorithm {0} is not allowed: only asymmetric algorithms can be trusted")]
    SymmetricAlgorithm(String),
    /// The allow-list is empty.
    #[error("at least one algorithm must be allowed")]
    NoAlgorithms,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The token is not acceptable, now or ever.
    #[error("{reason}: {detail}")]
    Rejected {
        /// The reason code.
        reason: Rejection,
        /// A short human-readable detail; never contains the token.
        detail: String,
    },
    /// The issuer's keys could not be fetched and no cached key fits:
    /// retry later. Never a reason to dead-letter a message as forged.
    #[error("issuer keys unavailable: {0}")]
    Unavailable(String),
}

impl VerifyError {
    fn reject(reason: Rejection, detail: impl Into<String>) -> Self {
        Self::Rejected { reason, detail: detail.into() }
    }

    /// The rejection reason, if this is a permanent rejection.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            Self::Rejected { reason, .. } => Some(*reason),
            Self::Unavailable(_) => None,
        }
    }
}

/// The claims of a token that passed verification.
#[derive(Clone, PartialEq)]
pub struct VerifiedClaims {
    /// `sub`: who the token speaks for.
    pub subject: String,
    /// `iss`.
    pub issuer: String,
    /// `aud`, as a list even when the token holds a single string.
    pub audience: Vec<String>,
    /// `scope` split on spaces (or `scp` when it is a list).
    pub scopes: Vec<String>,
    /// `exp`, in whole seconds since the epoch (fractions dropped).
    pub expires_at: i64,
    /// `iat`, in whole seconds since the epoch.
    pub issued_at: Option<i64>,
    /// `jti`, safe to log.
    pub token_id: Option<String>,
    /// The `kid` of the key that signed the token.
    pub key_id: String,
    /// All claims as they appeared in the token.
    pub claims: Map<String, Value>,
}

impl VerifiedClaims {
    /// Whether `scope` is one of the token's scopes.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// A claim by name.
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub fn remaining_secs(&self, now: SystemTime) -> i64 {
        self.expires_at - unix_secs(now) as i64
    }

    /// Checks that the token carries `required` and no other scope: an
    /// event token is reduced to the one scope its event needs.
    pub fn check_exact_scope(&self, required: &str) -> Result<(), VerifyError> {
        if !self.has_scope(required) {
            return Err(VerifyError::reject(
                Rejection::InsufficientScope,
                format!("token lacks scope {required:?}"),
            ));
        }
        let extra: Vec<&str> =
            self.scopes.iter().map(String::as_str).filter(|s| *s != required).collect();
        if !extra.is_empty() {
            return Err(VerifyError::reject(
                Rejection::ExcessScope,
                format!("token carries scopes beyond {required:?}: {}", extra.join(" ")),
            ));
        }
        Ok(())
    }
}

// Tokens are secrets; claims are not, but the raw map can be large.
impl fmt::Debug for VerifiedClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedClaims")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("expires_at", &self.expires_at)
            .field("token_id", &self.token_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Verifies tokens of one issuer for one audience.
#[derive(Clone)]
pub struct Verifier {
    config: Arc<VerifierConfig>,
    keys: Arc<JwksCache>,
    cache: Arc<VerifiedCache>,
}

/// Successful verifications by token hash.
struct VerifiedCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], Cached>>,
}

struct Cached {
    claims: Arc<VerifiedClaims>,
    /// `exp` plus leeway: the entry is dead from then on.
    valid_until: f64,
    /// The key-set generation it was verified under.
    generation: u64,
}

impl VerifiedCache {
    fn new(capacity: usize) -> Self {
        Self { capacity, entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, hash: &[u8; 32], now: f64, generation: u64) -> Option<Arc<VerifiedClaims>> {
        if self.capacity == 0 {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(hash)?;
        (entry.generation == generation && now < entry.valid_until).then(|| entry.claims.clone())
    }

    fn put(&self, hash: [u8; 32], entry: Cached, now: f64) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, e| now < e.valid_until && e.generation == entry.generation);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(hash, entry);
    }
}

impl Verifier {
    /// A verifier using `http` for key fetches.
    pub fn new(config: VerifierConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        if config.audience.trim().is_empty() {
            return Err(ConfigError::MissingAudience);
        }
        if config.issuer.trim().is_empty() {
            return Err(ConfigError::MissingIssuer);
        }
        if config.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        if let Some(alg) = config
            .algorithms
            .iter()
            .find(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            return Err(ConfigError::SymmetricAlgorithm(format!("{alg:?}")));
        }
        let keys = JwksCache::new(config.jwks_url.clone(), http, config.jwks_timing);
        let cache = VerifiedCache::new(config.cache_capacity);
        Ok(Self { config: Arc::new(config), keys: Arc::new(keys), cache: Arc::new(cache) })
    }

    /// A verifier for another audience of the same issuer that shares this
    /// one's key cache, so the issuer's keys are fetched once per service.
    pub fn for_audience(&self, audience: &str) -> Result<Self, ConfigError> {
        if audience.trim().is_empty() {
            return Err(ConfigError::MissingAudience);
        }
        let config = VerifierConfig { audience: audience.to_owned(), ..(*self.config).clone() };
        let cache = VerifiedCache::new(config.cache_capacity);
        Ok(Self { config: Arc::new(config), keys: self.keys.clone(), cache: Arc::new(cache) })
    }

    /// This verifier's settings.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The issuer's key cache (to preload it, or to count fetches).
    pub fn keys(&self) -> &JwksCache {
        &self.keys
    }

    /// Verifies `token` against the current time.
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedClaims>, VerifyError> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// Verifies `token` as if the time were `now`. The claims are shared
    /// with the cache of verified tokens, so a cache hit copies nothing.
    pub async fn verify_at(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Arc<VerifiedClaims>, VerifyError> {
        check_size(token, self.config.max_token_bytes)?;
        let now = unix_secs(now);
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let generation = self.keys.generation();
        // A cached token has these very bytes, so it passed every check
        // below when it was verified: only its lifetime and key set can
        // have changed since.
        if let Some(claims) = self.cache.get(&hash, now, generation) {
            return Ok(claims);
        }

        let parts = split_token(token)?;
        let header = parse_header(parts.header)?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(VerifyError::reject(
                Rejection::AlgorithmNotAllowed,
                format!("alg {:?} is not in the allow-list", header.alg),
            ));
        }

        let key = self.keys.key(&header.kid).await.map_err(|e| match e {
            KeyError::Unknown => VerifyError::reject(
                Rejection::UnknownKey,
                format!("kid {:?} is not published by the issuer", header.kid),
            ),
            KeyError::Unavailable(why) => VerifyError::Unavailable(why),
        })?;
        if !key.family.fits(header.alg) {
            return Err(VerifyError::reject(
                Rejection::AlgorithmNotAllowed,
                format!(
                    "alg {:?} does not fit the {:?} key {:?}",
                    header.alg, key.family, header.kid
                ),
            ));
        }

        let signed = &token[..parts.header.len() + 1 + parts.payload.len()];
        let valid =
            jsonwebtoken::crypto::verify(parts.signature, signed.as_bytes(), &key.key, header.alg)
                .map_err(|e| VerifyError::reject(Rejection::InvalidSignature, e.to_string()))?;
        if !valid {
            return Err(VerifyError::reject(
                Rejection::InvalidSignature,
                format!("signature does not verify with key {:?}", header.kid),
            ));
        }

        let claims = parse_object(parts.payload, "payload")?;
        let claims = Arc::new(self.check_claims(claims, header.kid, now)?);
        let valid_until = claims.expires_at as f64 + self.config.leeway.as_secs_f64();
        let cached = Cached { claims: claims.clone(), valid_until, generation };
        self.cache.put(hash, cached, now);
        Ok(claims)
    }

    fn check_claims(
        &self,
        claims: Map<String, Value>,
        key_id: String,
        now: f64,
    ) -> Result<VerifiedClaims, VerifyError> {
        let leeway = self.config.leeway.as_secs_f64();

        let issuer = match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.config.issuer => iss.clone(),
            Some(Value::String(iss)) => {
                return Err(VerifyError::reject(
                    Rejection::InvalidIssuer,
                    format!("iss {iss:?} is not trusted"),
                ));
            }
            Some(_) => return Err(malformed("iss", "a string")),
            None => {
                return Err(VerifyError::reject(Rejection::InvalidIssuer, "iss is missing"));
            }
        };

        let audience = string_or_list(&claims, "aud")?;
        if audience.is_empty() {
            return Err(VerifyError::reject(Rejection::InvalidAudience, "aud is missing"));
        }
        if !audience.iter().any(|a| *a == self.config.audience) {
            return Err(VerifyError::reject(
                Rejection::InvalidAudience,
                format!("aud {audience:?} does not name {:?}", self.config.audience),
            ));
        }

        let exp = numeric_date(&claims, "exp")?
            .ok_or_else(|| VerifyError::reject(Rejection::MissingClaim, "exp is missing"))?;
        if now >= exp + leeway {
            let detail = format!("expired at {}", date_text(exp));
            return Err(VerifyError::reject(Rejection::Expired, detail));
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")?
            && now + leeway < nbf
        {
            let detail = format!("not before {}", date_text(nbf));
            return Err(VerifyError::reject(Rejection::NotYetValid, detail));
        }
        let iat = numeric_date(&claims, "iat")?;
        if let Some(iat) = iat
            && now + leeway < iat
        {
            return Err(VerifyError::reject(
                Rejection::NotYetValid,
                format!("issued in the future at {}", date_text(iat)),
            ));
        }

        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) | None => {
                return Err(VerifyError::reject(Rejection::MissingClaim, "sub is missing"));
            }
            Some(_) => return Err(malformed("sub", "a string")),
        };
        if let Some(missing) = self
            .config
            .required_claims
            .iter()
            .find(|name| claims.get(*name).is_none_or(Value::is_null))
        {
            return Err(VerifyError::reject(
                Rejection::MissingClaim,
                format!("{missing} is missing"),
            ));
        }
        let token_id = match claims.get("jti") {
            Some(Value::String(jti)) => Some(jti.clone()),
            Some(_) => return Err(malformed("jti", "a string")),
            None => None,
        };
        let scopes = scopes(&claims)?;

        Ok(VerifiedClaims {
            subject,
            issuer,
            audience,
            scopes,
            expires_at: exp.floor() as i64,
            issued_at: iat.map(|t| t.floor() as i64),
            token_id,
            key_id,
            claims,
        })
    }
}

struct TokenParts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

/// Refuses an empty token, and one too long to be worth hashing.
fn check_size(token: &str, max_bytes: usize) -> Result<(), VerifyError> {
    if token.is_empty() {
        return Err(VerifyError::reject(Rejection::MissingToken, "empty token"));
    }
    if token.len() > max_bytes {
        return Err(VerifyError::reject(
            Rejection::MalformedToken,
            format!("token is {} bytes, more than {max_bytes}", token.len()),
        ));
    }
    Ok(())
}

fn split_token(token: &str) -> Result<TokenParts<'_>, VerifyError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::reject(
            Rejection::MalformedToken,
            "not three dot-separated parts",
        ));
    };
    let base64url = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !(base64url(header) && base64url(payload) && base64url(signature)) {
        return Err(VerifyError::reject(
            Rejection::MalformedToken,
            "a part is empty or not base64url",
        ));
    }
    Ok(TokenParts { header, payload, signature })
}

struct Header {
    alg: Algorithm,
    kid: String,
}

fn parse_header(segment: &str) -> Result<Header, VerifyError> {
    let header = parse_object(segment, "header")?;
    if header.contains_key("crit") {
        return Err(VerifyError::reject(
            Rejection::UnsupportedCriticalHeader,
            "header carries crit",
        ));
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.parse::<Algorithm>().map_err(|_| {
            VerifyError::reject(
                Rejection::AlgorithmNotAllowed,
                format!("alg {alg:?} is not allowed"),
            )
        })?,
        _ => {
            return Err(VerifyError::reject(Rejection::MalformedToken, "header has no alg string"));
        }
    };
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => {
            return Err(VerifyError::reject(Rejection::MalformedToken, "header has no kid"));
        }
    };
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if is_access_token_type(typ) => {}
        Some(_) => {
            return Err(VerifyError::reject(
                Rejection::MalformedToken,
                "typ is not a JWT access token type",
            ));
        }
    }
    Ok(Header { alg, kid })
}

fn is_access_token_type(typ: &str) -> bool {
    let typ = typ.to_ascii_lowercase();
    let typ = typ.strip_prefix("application/").unwrap_or(&typ);
    typ == "jwt" || typ == "at+jwt"
}

/// Decodes a base64url segment holding a JSON object, refusing duplicate
/// member names (which different parsers resolve differently).
fn parse_object(segment: &str, what: &str) -> Result<Map<String, Value>, VerifyError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|e| {
        VerifyError::reject(Rejection::MalformedToken, format!("{what} is not base64url: {e}"))
    })?;
    match crate::json::parse_strict(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(VerifyError::reject(
            Rejection::MalformedToken,
            format!("{what} is not a JSON object"),
        )),
        Err(e) => Err(VerifyError::reject(
            Rejection::MalformedToken,
            format!("{what} is not strict JSON: {e}"),
        )),
    }
}

fn malformed(claim: &str, expected: &str) -> VerifyError {
    VerifyError::reject(Rejection::MalformedClaim, format!("{claim} is not {expected}"))
}

/// A NumericDate as RFC 3339 (UTC, whole seconds), for details a person
/// reads; the number itself when it is no representable date.
fn date_text(secs: f64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(secs.floor() as i64).ok();
    let text = date.and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok());
    text.unwrap_or_else(|| secs.to_string())
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && (0.0..=MAX_NUMERIC_DATE).contains(&t) => Ok(Some(t)),
            _ => Err(malformed(name, "a NumericDate between 1970 and 9999")),
        },
        Some(_) => Err(malformed(name, "a NumericDate number")),
    }
}

fn string_or_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, VerifyError> {
    match claims.get(name) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_owned).ok_or_else(|| malformed(name, "a list of strings"))
            })
            .collect(),
        Some(_) => Err(malformed(name, "a string or a list of strings")),
    }
}

/// The token's scopes: `scope` (a space-separated string) and `scp` (a
/// string or a list), together, so an issuer that writes both cannot hide a
/// scope from the exact-scope check.
fn scopes(claims: &Map<String, Value>) -> Result<Vec<String>, VerifyError> {
    let mut scopes: Vec<String> = match claims.get("scope") {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(_) => return Err(malformed("scope", "a space-separated string")),
        None => Vec::new(),
    };
    // `scp` is a list, or (Microsoft Entra) one space-separated string.
    let listed = string_or_list(claims, "scp")?;
    for scope in listed.iter().flat_map(|s| s.split_whitespace()) {
        if !scopes.iter().any(|held| held == scope) {
            scopes.push(scope.to_owned());
        }
    }
    Ok(scopes)
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
