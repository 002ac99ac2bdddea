//! OAuth 2.0 Token Exchange (RFC 8693) client.
//!
//! The producer presents the user's access token as `subject_token` and
//! asks for a token with one event scope and the consumers' audience. This
//! module only performs the request; what comes back must then be verified
//! like any other token, and its scope, audience and lifetime checked by the
//! caller: the response's `expires_in`, `scope` and the like are never
//! trusted.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::secret::Secret;

/// The grant type of RFC 8693.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Largest token response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The token type of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The assertion type of RFC 7523 client authentication.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the producer proves its identity to the token endpoint.
#[derive(Clone)]
pub enum ClientAuth {
    /// `client_secret_basic`: the client secret in HTTP Basic
    /// authentication.
    Secret(Secret),
    /// `private_key_jwt` (RFC 7523): a short-lived JWT signed with the
    /// client's private key, whose public key the server holds.
    PrivateKeyJwt {
        /// The signing key.
        key: Arc<jsonwebtoken::EncodingKey>,
        /// Its `kid`, as registered at the server.
        kid: String,
        /// Its algorithm (RS256, PS256, ES256, EdDSA).
        algorithm: jsonwebtoken::Algorithm,
    },
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("client_secret_basic([redacted])"),
            Self::PrivateKeyJwt { kid, algorithm, .. } => {
                write!(f, "private_key_jwt(kid={kid}, alg={algorithm:?})")
            }
        }
    }
}

/// Where and as whom to exchange tokens.
#[derive(Clone)]
pub struct ExchangeConfig {
    /// The authorization server's token endpoint.
    pub token_endpoint: reqwest::Url,
    /// The producer's client ID.
    pub client_id: String,
    /// How the producer authenticates.
    pub auth: ClientAuth,
}

impl fmt::Debug for ExchangeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeConfig")
            .field("token_endpoint", &self.token_endpoint.as_str())
            .field("client_id", &self.client_id)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Why no event token came back.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExchangeError {
    /// The server could not be reached, timed out or failed (5xx): retry
    /// later.
    #[error("token exchange unavailable: {0}")]
    Unavailable(String),
    /// The server refused the user's token as the subject token (expired
    /// by its clock, revoked, or its session gone): the user must get a new
    /// token.
    #[error("token exchange refused the user's token: {0}")]
    SubjectTokenRefused(String),
    /// The server answered with an OAuth error (4xx).
    #[error("token exchange refused with HTTP {status}: {error}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code (and description, when given).
        error: String,
    },
    /// The client assertion could not be signed (a key that does not fit
    /// its algorithm).
    #[error("cannot sign the client assertion: {0}")]
    ClientAssertion(String),
    /// The server answered 200 with something that is not a token response.
    #[error("token exchange answered an unusable response: {0}")]
    InvalidResponse(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
    error_description: Option<String>,
}

/// An RFC 8693 client with one HTTP client and one set of credentials.
#[derive(Clone)]
pub struct TokenExchanger {
    config: ExchangeConfig,
    http: reqwest::Client,
}

impl TokenExchanger {
    /// A client for `config`, using `http` (see [`crate::http::client`]).
    pub fn new(config: ExchangeConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    /// This client's settings.
    pub fn config(&self) -> &ExchangeConfig {
        &self.config
    }

    /// Exchanges `subject_token` for an access token limited to `scope`
    /// and addressed to `audience`. The returned token is unverified.
    pub async fn exchange(
        &self,
        subject_token: &Secret,
        scope: &str,
        audience: &str,
    ) -> Result<Secret, ExchangeError> {
        let mut form = vec![
            ("grant_type", GRANT_TYPE.to_owned()),
            ("subject_token", subject_token.expose().to_owned()),
            ("subject_token_type", ACCESS_TOKEN_TYPE.to_owned()),
            ("requested_token_type", ACCESS_TOKEN_TYPE.to_owned()),
            ("scope", scope.to_owned()),
            ("audience", audience.to_owned()),
        ];
        let mut request = self.http.post(self.config.token_endpoint.clone());
        match &self.config.auth {
            ClientAuth::Secret(secret) => {
                request = request.basic_auth(&self.config.client_id, Some(secret.expose()));
            }
            ClientAuth::PrivateKeyJwt { key, kid, algorithm } => {
                let assertion = self.client_assertion(key, kid, *algorithm)?;
                form.push(("client_id", self.config.client_id.clone()));
                form.push(("client_assertion_type", JWT_BEARER_ASSERTION.to_owned()));
                form.push(("client_assertion", assertion));
            }
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| ExchangeError::Unavailable(without_url(e)))?;

        let status = response.status();
        let body = crate::http::read_capped(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(ExchangeError::Unavailable)?;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(ExchangeError::Unavailable(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let parsed = serde_json::from_slice::<ErrorResponse>(&body).ok();
            let code = parsed.as_ref().and_then(|e| e.error.clone()).unwrap_or_default();
            let description = parsed.and_then(|e| e.error_description).unwrap_or_default();
            let error = match (code.is_empty(), description.is_empty()) {
                (true, _) => "no OAuth error in the response".to_owned(),
                (false, true) => code.clone(),
                (false, false) => format!("{code} ({description})"),
            };
            // The server judged the subject token itself: expired, revoked,
            // or its session ended. The user must sign in again.
            let subject_token_refused = matches!(code.as_str(), "invalid_grant" | "invalid_token")
                || (code == "invalid_request"
                    && description.to_ascii_lowercase().contains("token"));
            if subject_token_refused {
                return Err(ExchangeError::SubjectTokenRefused(error));
            }
            return Err(ExchangeError::Refused { status: status.as_u16(), error });
        }

        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| ExchangeError::InvalidResponse(format!("not a token response: {e}")))?;
        if let Some(kind) = parsed.token_type.as_deref()
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(ExchangeError::InvalidResponse(format!(
                "token_type {kind:?} is not Bearer"
            )));
        }
        parsed
            .access_token
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or_else(|| ExchangeError::InvalidResponse("no access_token".into()))
    }
}

impl TokenExchanger {
    /// A client assertion (RFC 7523 section 3) for one request: issued by
    /// and about this client, addressed to the token endpoint, valid for
    /// one minute, with a fresh `jti` so it cannot be replayed.
    fn client_assertion(
        &self,
        key: &jsonwebtoken::EncodingKey,
        kid: &str,
        algorithm: jsonwebtoken::Algorithm,
    ) -> Result<String, ExchangeError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = serde_json::json!({
            "iss": self.config.client_id,
            "sub": self.config.client_id,
            "aud": self.config.token_endpoint.as_str(),
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "exp": now + 60,
        });
        let mut header = jsonwebtoken::Header::new(algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| ExchangeError::ClientAssertion(e.to_string()))
    }
}

/// reqwest errors print the URL; token endpoints carry no secrets in the
/// URL, but keep messages short and uniform.
fn without_url(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {}", error.without_url())
}
