//! Who signs what in the scenario: the authorization server, the users
//! signing in, and an intruder with a key of their own.
//!
//! The authorization server is either the development issuer (a stand-in
//! for Keycloak that binds to loopback and signs with test keys shipped in
//! this repository: it protects nothing and is never to be deployed) or a
//! real one reached by `--issuer`. With the development issuer, a user
//! "signs in" by having the issuer mint an access token shaped like the
//! project's Keycloak realm issues them (same subjects, `tenant` claim,
//! `orders:write` for alice only). With a real issuer, users sign in by the
//! password grant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use event_identity::Secret;
use event_identity::dev_issuer::{DevIssuer, ExchangePolicy, KeyMaterial};
use serde_json::{Map, Value, json};

use crate::options::{CONSUMER_AUDIENCE, DemoOptions, EVENT_SCOPE, Login, USER_SCOPE};

/// The development issuer's signing key.
const DEV_KID: &str = "dev-rsa-1";
/// The intruder's key: a real RSA key, but never published by any issuer.
const INTRUDER_KID: &str = "intruder";
/// The development issuer's producer client (the realm's, too).
const DEV_CLIENT_ID: &str = "event-producer";
/// Its secret, a test value like everything about the development issuer.
const DEV_CLIENT_SECRET: &str = "producer-secret";

/// A signed-in user: their access token and the claims the demo shows.
pub struct User {
    /// The username shown in the output.
    pub username: String,
    /// The access token; never printed.
    pub token: Secret,
    /// `sub` of the token.
    pub subject: String,
    /// The `tenant` claim, if any.
    pub tenant: Option<String>,
    /// The `kid` that signed the token: the issuer's current key.
    pub key_id: String,
}

/// The authorization server of one run.
pub enum Issuer {
    /// The in-process development issuer.
    Dev(DevIssuer),
    /// A real one, e.g. Keycloak with the project's realm.
    Real {
        /// Its issuer identifier.
        issuer: String,
        /// Its token endpoint, from discovery.
        token_endpoint: reqwest::Url,
    },
}

impl Issuer {
    /// Starts the development issuer, or discovers the real one.
    pub async fn start(options: &DemoOptions, http: &reqwest::Client) -> anyhow::Result<Self> {
        let Some(issuer) = &options.issuer else {
            let dev = DevIssuer::start().await.context("cannot start the development issuer")?;
            dev.add_key(DEV_KID, KeyMaterial::Rsa1);
            dev.set_exchange_policy(ExchangePolicy {
                client_id: DEV_CLIENT_ID.to_owned(),
                client_secret: DEV_CLIENT_SECRET.to_owned(),
                ..ExchangePolicy::default()
            });
            return Ok(Self::Dev(dev));
        };
        let found = event_identity::discovery::discover(http, issuer, options.allow_plain_http)
            .await
            .map_err(|e| anyhow::anyhow!("--issuer: {e}"))?;
        let token_endpoint = found.token_endpoint.with_context(|| {
            format!("--issuer: the discovery document of {issuer} has no token_endpoint")
        })?;
        Ok(Self::Real { issuer: issuer.clone(), token_endpoint })
    }

    /// The issuer identifier, as the services are configured with it.
    pub fn issuer(&self) -> &str {
        match self {
            Self::Dev(dev) => dev.issuer(),
            Self::Real { issuer, .. } => issuer,
        }
    }

    /// Whether this is the development issuer.
    pub fn is_stand_in(&self) -> bool {
        matches!(self, Self::Dev(_))
    }

    /// The producer's client ID and secret at this issuer.
    pub fn producer_client(&self, options: &DemoOptions) -> (String, Secret) {
        match self {
            Self::Dev(_) => (DEV_CLIENT_ID.to_owned(), Secret::new(DEV_CLIENT_SECRET)),
            Self::Real { .. } => (options.client_id.clone(), options.client_secret.clone()),
        }
    }

    /// Signs `login` in. With the development issuer the password is not
    /// checked: the issuer mints the token the realm would give that user.
    pub async fn sign_in(
        &self,
        login: &Login,
        options: &DemoOptions,
        http: &reqwest::Client,
    ) -> anyhow::Result<User> {
        let token = match self {
            Self::Dev(dev) => dev_user_token(dev, &login.username, &options.tenant)?,
            Self::Real { token_endpoint, .. } => {
                password_grant(http, token_endpoint, login, options).await?
            }
        };
        let header = jsonwebtoken::decode_header(token.expose())
            .with_context(|| format!("the access token of {} is not a JWT", login.username))?;
        let claims = unverified_claims(&token).with_context(|| {
            format!("the access token of {} has no JSON claims", login.username)
        })?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(User {
            username: login.username.clone(),
            subject: text("sub")
                .with_context(|| format!("the access token of {} has no sub", login.username))?,
            tenant: text("tenant"),
            key_id: header
                .kid
                .with_context(|| format!("the access token of {} has no kid", login.username))?,
            token,
        })
    }

    /// An event token for `user` that expired an hour ago, signed with the
    /// issuer's own key, as if a record had waited past its token's
    /// lifetime. Only the development issuer can make one on demand;
    /// `None` with a real issuer.
    pub fn expired_event_token(&self, user: &User) -> Option<Secret> {
        let Self::Dev(dev) = self else {
            return None;
        };
        let now = unix_now();
        let mut claims = event_claims(self.issuer(), user, "expired");
        claims["iat"] = json!(now - 13 * 3600);
        claims["exp"] = json!(now - 3600);
        Some(Secret::new(dev.sign(DEV_KID, &claims)))
    }
}

/// An intruder who can write to the topic and holds an RSA key the issuer
/// never published. The key is the development issuer's spare test key,
/// served by an instance of its own that no service trusts.
pub struct Intruder {
    kit: DevIssuer,
}

impl Intruder {
    /// Prepares the intruder's key.
    pub async fn new() -> anyhow::Result<Self> {
        let kit = DevIssuer::start().await.context("cannot start the intruder's signer")?;
        kit.add_unpublished_key(INTRUDER_KID, KeyMaterial::Rsa3);
        Ok(Self { kit })
    }

    /// A token that claims to be an event token of `issuer` for `user`,
    /// with the right scope, audience, lifetime and the issuer's real
    /// `kid`, but signed with the intruder's key.
    pub fn forge_event_token(&self, issuer: &str, user: &User) -> Secret {
        let claims = event_claims(issuer, user, "forged");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(user.key_id.clone());
        Secret::new(self.kit.sign_with_header(INTRUDER_KID, header, &claims))
    }
}

/// The claims of an event token for `user`, valid for 12 hours.
fn event_claims(issuer: &str, user: &User, jti_prefix: &str) -> Value {
    let now = unix_now();
    let mut claims = json!({
        "iss": issuer,
        "sub": user.subject,
        "aud": CONSUMER_AUDIENCE,
        "scope": EVENT_SCOPE,
        "azp": DEV_CLIENT_ID,
        "preferred_username": user.username,
        "iat": now,
        "exp": now + 12 * 3600,
        "jti": format!("{jti_prefix}-{}", uuid::Uuid::new_v4()),
    });
    if let Some(tenant) = &user.tenant {
        claims["tenant"] = json!(tenant);
    }
    claims
}

/// The access token the project's realm would issue `username` through the
/// `event-api` client: the realm's fixed subject IDs, its `tenant` claim,
/// and `orders:write` only for the order writer alice.
fn dev_user_token(dev: &DevIssuer, username: &str, tenant: &str) -> anyhow::Result<Secret> {
    let (subject, scope) = match username {
        "alice" => ("11111111-1111-4111-8111-111111111111", format!("openid {USER_SCOPE}")),
        "bob" => ("22222222-2222-4222-8222-222222222222", "openid".to_owned()),
        other => anyhow::bail!(
            "the development issuer knows the users alice and bob only, not {other:?} \
             (--writer and --reader are for a real issuer)"
        ),
    };
    let now = unix_now();
    let claims = json!({
        "iss": dev.issuer(),
        "sub": subject,
        "aud": DEV_CLIENT_ID,
        "azp": "event-api",
        "scope": scope,
        "preferred_username": username,
        "tenant": tenant,
        "iat": now,
        "exp": now + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    Ok(Secret::new(dev.sign(DEV_KID, &claims)))
}

/// Signs `login` in with the OAuth password grant.
async fn password_grant(
    http: &reqwest::Client,
    token_endpoint: &reqwest::Url,
    login: &Login,
    options: &DemoOptions,
) -> anyhow::Result<Secret> {
    let form = [
        ("grant_type", "password"),
        ("client_id", options.user_client_id.as_str()),
        ("username", login.username.as_str()),
        ("password", login.password.expose()),
        ("scope", options.user_scope.as_str()),
    ];
    let response = http
        .post(token_endpoint.clone())
        .form(&form)
        .send()
        .await
        .with_context(|| format!("password grant for {}: request failed", login.username))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        // The OAuth error says why (wrong password, grant not enabled...)
        // and carries no secret.
        let error = body.get("error").and_then(Value::as_str).unwrap_or("no OAuth error");
        let description = body.get("error_description").and_then(Value::as_str).unwrap_or("");
        anyhow::bail!(
            "password grant for {} at {token_endpoint} (client {}): HTTP {status}, \
             {error} {description}",
            login.username,
            options.user_client_id
        );
    }
    body.get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(Secret::new)
        .with_context(|| format!("password grant for {}: no access_token", login.username))
}

/// The claims of a JWT, read without verification. Only for display and
/// for shaping the scenario's own records: nothing here is trusted.
fn unverified_claims(token: &Secret) -> anyhow::Result<Map<String, Value>> {
    let payload = token.expose().split('.').nth(1).context("no payload part")?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).context("payload is not base64url")?;
    serde_json::from_slice(&bytes).context("payload is not a JSON object")
}

fn unix_now() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    since.as_secs() as i64
}
