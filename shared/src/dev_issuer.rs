//! A development issuer: a stand-in authorization server for fast tests
//! and the one-command demo. Never deploy it.
//!
//! It binds to loopback only, serves a discovery document and a JWKS, and
//! signs tokens with fixed keys that ship in this repository (so they
//! protect nothing). Tests use it to publish, rotate and withdraw keys,
//! to make the JWKS endpoint fail, and to count JWKS fetches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::Form;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The fixed key pairs the development issuer can sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMaterial {
    /// RSA 2048, first key.
    Rsa1,
    /// RSA 2048, second key.
    Rsa2,
    /// RSA 2048, third key (the "attacker's" key in tests).
    Rsa3,
    /// EC P-256.
    EcP256,
    /// Ed25519.
    Ed25519,
}

impl KeyMaterial {
    fn encoding_key(self) -> EncodingKey {
        let (pem, kind): (&[u8], _) = match self {
            Self::Rsa1 => (include_bytes!("dev_issuer/keys/rsa-1.pem"), 'r'),
            Self::Rsa2 => (include_bytes!("dev_issuer/keys/rsa-2.pem"), 'r'),
            Self::Rsa3 => (include_bytes!("dev_issuer/keys/rsa-3.pem"), 'r'),
            Self::EcP256 => (include_bytes!("dev_issuer/keys/ec-p256.pem"), 'e'),
            Self::Ed25519 => (include_bytes!("dev_issuer/keys/ed25519.pem"), 'd'),
        };
        let key = match kind {
            'r' => EncodingKey::from_rsa_pem(pem),
            'e' => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_ed_pem(pem),
        };
        key.expect("the shipped development keys parse")
    }

    /// The algorithm this key signs with by default.
    pub fn default_algorithm(self) -> Algorithm {
        match self {
            Self::Rsa1 | Self::Rsa2 | Self::Rsa3 => Algorithm::RS256,
            Self::EcP256 => Algorithm::ES256,
            Self::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The public half as a JWK (no `kid`, no `alg`).
    pub fn public_jwk(self) -> Value {
        let jwk = Jwk::from_encoding_key(&self.encoding_key(), self.default_algorithm())
            .expect("public JWK of a development key");
        let mut value = serde_json::to_value(jwk).expect("JWK serializes");
        let object = value.as_object_mut().expect("a JWK is an object");
        object.remove("alg");
        object.retain(|_, v| !v.is_null());
        value
    }
}

struct Key {
    kid: String,
    material: KeyMaterial,
    published: bool,
    publish_alg: bool,
}

/// How the development issuer's token endpoint answers token exchanges.
///
/// By default it behaves like a well-configured server: it authenticates
/// the client, verifies the subject token with its own keys, and issues a
/// token for the subject with exactly the requested scope and audience.
/// The other fields let tests make it misbehave.
#[derive(Debug, Clone)]
pub struct ExchangePolicy {
    /// The client allowed to exchange.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: String,
    /// Lifetime of issued tokens, in seconds (`exp - iat`).
    pub lifespan_s: i64,
    /// `expires_in` of the response; default: `lifespan_s`.
    pub expires_in: Option<i64>,
    /// Claims that replace the issued token's claims (e.g. a drifted
    /// `scope`).
    pub override_claims: serde_json::Map<String, Value>,
    /// Answer every request with this HTTP status instead.
    pub fail_status: Option<u16>,
}

impl Default for ExchangePolicy {
    fn default() -> Self {
        Self {
            client_id: "event-producer".into(),
            client_secret: "producer-secret".into(),
            lifespan_s: 43_200,
            expires_in: None,
            override_claims: serde_json::Map::new(),
            fail_status: None,
        }
    }
}

struct Inner {
    issuer: String,
    keys: Mutex<Vec<Key>>,
    jwks_fetches: AtomicU64,
    jwks_available: AtomicBool,
    exchange: Mutex<ExchangePolicy>,
    token_calls: AtomicU64,
}

/// A running development issuer.
#[derive(Clone)]
pub struct DevIssuer {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl DevIssuer {
    /// Starts an issuer on a free loopback port, with no keys.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            issuer: format!("http://{addr}"),
            keys: Mutex::new(Vec::new()),
            jwks_fetches: AtomicU64::new(0),
            jwks_available: AtomicBool::new(true),
            exchange: Mutex::new(ExchangePolicy::default()),
            token_calls: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner })
    }

    /// The issuer identifier (`http://127.0.0.1:PORT`).
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The JWKS URL.
    pub fn jwks_url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}/jwks", self.addr)).expect("a valid URL")
    }

    /// Adds a key under `kid`, published in the JWKS (without `alg`).
    pub fn add_key(&self, kid: &str, material: KeyMaterial) {
        self.keys().push(Key {
            kid: kid.to_owned(),
            material,
            published: true,
            publish_alg: false,
        });
    }

    /// Adds a key that is used for signing but never published.
    pub fn add_unpublished_key(&self, kid: &str, material: KeyMaterial) {
        self.keys().push(Key {
            kid: kid.to_owned(),
            material,
            published: false,
            publish_alg: false,
        });
    }

    /// Publishes (or withdraws) the key `kid`.
    pub fn set_published(&self, kid: &str, published: bool) {
        if let Some(key) = self.keys().iter_mut().find(|k| k.kid == kid) {
            key.published = published;
        }
    }

    /// Lets the JWKS endpoint answer (true) or fail with 503 (false).
    pub fn set_jwks_available(&self, available: bool) {
        self.inner.jwks_available.store(available, Ordering::SeqCst);
    }

    /// The token endpoint URL.
    pub fn token_url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}/token", self.addr)).expect("a valid URL")
    }

    /// Replaces how token exchanges are answered.
    pub fn set_exchange_policy(&self, policy: ExchangePolicy) {
        *self.inner.exchange.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// How many requests reached the token endpoint.
    pub fn token_calls(&self) -> u64 {
        self.inner.token_calls.load(Ordering::SeqCst)
    }

    /// How many times the JWKS was requested.
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Signs `claims` with key `kid` under `header` (whose `kid` is set to
    /// `kid` unless already set).
    pub fn sign_with_header(&self, kid: &str, mut header: Header, claims: &Value) -> String {
        let keys = self.keys();
        let key = keys.iter().find(|k| k.kid == kid).expect("sign with a known kid");
        if header.kid.is_none() {
            header.kid = Some(kid.to_owned());
        }
        jsonwebtoken::encode(&header, claims, &key.material.encoding_key()).expect("signing works")
    }

    /// Signs `claims` with key `kid` and its default algorithm.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        let alg = {
            let keys = self.keys();
            keys.iter()
                .find(|k| k.kid == kid)
                .expect("sign with a known kid")
                .material
                .default_algorithm()
        };
        self.sign_with_header(kid, Header::new(alg), claims)
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Vec<Key>> {
        self.inner.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Json<Value> {
    Json(json!({
        "issuer": inner.issuer,
        "jwks_uri": format!("{}/jwks", inner.issuer),
        "token_endpoint": format!("{}/token", inner.issuer),
    }))
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Response {
    inner.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if !inner.jwks_available.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys = inner.keys.lock().unwrap_or_else(|e| e.into_inner());
    let published: Vec<Value> = keys
        .iter()
        .filter(|k| k.published)
        .map(|k| {
            let mut jwk = k.material.public_jwk();
            let object = jwk.as_object_mut().expect("a JWK is an object");
            object.insert("kid".into(), Value::String(k.kid.clone()));
            object.insert("use".into(), Value::String("sig".into()));
            if k.publish_alg {
                let alg =
                    serde_json::to_value(k.material.default_algorithm()).expect("alg serializes");
                object.insert("alg".into(), alg);
            }
            jwk
        })
        .collect();
    Json(json!({ "keys": published })).into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
}

async fn token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<std::collections::HashMap<String, String>>,
) -> Response {
    inner.token_calls.fetch_add(1, Ordering::SeqCst);
    let policy = inner.exchange.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(status) = policy.fail_status {
        return StatusCode::from_u16(status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
    }

    let expected = format!("{}:{}", policy.client_id, policy.client_secret);
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| STANDARD.decode(v).ok());
    if presented.as_deref() != Some(expected.as_bytes()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "bad client credentials");
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != crate::exchange::GRANT_TYPE {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "token exchange only",
        );
    }
    if field("subject_token_type") != crate::exchange::ACCESS_TOKEN_TYPE {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "subject_token_type");
    }
    let Some(subject) = inner.check_subject_token(field("subject_token")) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Invalid token");
    };

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let mut claims = json!({
        "iss": inner.issuer,
        "sub": subject["sub"],
        "aud": field("audience"),
        "scope": field("scope"),
        "azp": policy.client_id,
        "iat": now,
        "exp": now + policy.lifespan_s,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    for copied in ["tenant", "preferred_username"] {
        if let Some(value) = subject.get(copied) {
            claims[copied] = value.clone();
        }
    }
    for (name, value) in &policy.override_claims {
        claims[name] = value.clone();
    }
    let Some(token) = inner.sign_with_first_key(&claims) else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "no signing key");
    };
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "issued_token_type": crate::exchange::ACCESS_TOKEN_TYPE,
        "expires_in": policy.expires_in.unwrap_or(policy.lifespan_s),
    }))
    .into_response()
}

impl Inner {
    /// The claims of `token` if one of this issuer's published keys signed
    /// it and it has not expired.
    fn check_subject_token(&self, token: &str) -> Option<Value> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = keys.iter().find(|k| k.published && k.kid == kid)?;
        let jwk: Jwk = serde_json::from_value(key.material.public_jwk()).ok()?;
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).ok()?;
        let mut validation = jsonwebtoken::Validation::new(key.material.default_algorithm());
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, &decoding, &validation).ok().map(|data| data.claims)
    }

    fn sign_with_first_key(&self, claims: &Value) -> Option<String> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = keys.iter().find(|k| k.published)?;
        let mut header = Header::new(key.material.default_algorithm());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.material.encoding_key()).ok()
    }
}
