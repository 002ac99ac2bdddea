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
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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

struct Inner {
    issuer: String,
    keys: Mutex<Vec<Key>>,
    jwks_fetches: AtomicU64,
    jwks_available: AtomicBool,
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
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
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
