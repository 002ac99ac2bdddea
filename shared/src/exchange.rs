//! OAuth 2.0 Token Exchange (RFC 8693) client.
//!
//! The producer presents the user's access token as `subject_token` and
//! asks for a token with one event scope and the consumers' audience. This
//! module only performs the request; what comes back must then be verified
//! like any other token, and its scope, audience and lifetime checked by the
//! caller: the response's `expires_in`, `scope` and the like are never
//! trusted.

use std::fmt;

use serde::Deserialize;

use crate::secret::Secret;

/// The grant type of RFC 8693.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Where and as whom to exchange tokens.
#[derive(Clone)]
pub struct ExchangeConfig {
    /// The authorization server's token endpoint.
    pub token_endpoint: reqwest::Url,
    /// The producer's client ID.
    pub client_id: String,
    /// The producer's client secret, sent with HTTP Basic authentication.
    pub client_secret: Secret,
}

impl fmt::Debug for ExchangeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeConfig")
            .field("token_endpoint", &self.token_endpoint.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
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
    /// The server answered with an OAuth error (4xx).
    #[error("token exchange refused with HTTP {status}: {error}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code (and description, when given).
        error: String,
    },
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
        let form = [
            ("grant_type", GRANT_TYPE),
            ("subject_token", subject_token.expose()),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("scope", scope),
            ("audience", audience),
        ];
        let response = self
            .http
            .post(self.config.token_endpoint.clone())
            .basic_auth(&self.config.client_id, Some(self.config.client_secret.expose()))
            .form(&form)
            .send()
            .await
            .map_err(|e| ExchangeError::Unavailable(without_url(e)))?;

        let status = response.status();
        let body =
            response.bytes().await.map_err(|e| ExchangeError::Unavailable(without_url(e)))?;
        if status.is_server_error() {
            return Err(ExchangeError::Unavailable(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let error = serde_json::from_slice::<ErrorResponse>(&body)
                .ok()
                .and_then(|e| {
                    let code = e.error?;
                    Some(match e.error_description {
                        Some(description) => format!("{code} ({description})"),
                        None => code,
                    })
                })
                .unwrap_or_else(|| "no OAuth error in the response".to_owned());
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
