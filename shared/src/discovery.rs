//! OpenID Provider discovery: where an issuer keeps its keys and its token
//! endpoint.

use serde::Deserialize;

use crate::http::check_url;

/// Largest discovery document read (Keycloak's is about 7 KiB).
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// The parts of an issuer's discovery document this project uses.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The issuer, checked to equal the one asked for.
    pub issuer: String,
    /// The JWKS location.
    pub jwks_uri: reqwest::Url,
    /// The token endpoint, if the issuer has one.
    pub token_endpoint: Option<reqwest::Url>,
}

#[derive(Deserialize)]
struct Document {
    issuer: String,
    jwks_uri: String,
    token_endpoint: Option<String>,
}

/// Fetches `<issuer>/.well-known/openid-configuration` and checks that it
/// describes `issuer` (OpenID Connect Discovery, section 4.3) and that its
/// endpoints pass [`check_url`].
pub async fn discover(
    http: &reqwest::Client,
    issuer: &str,
    allow_plain_http: bool,
) -> Result<Discovery, String> {
    let base = check_url(issuer, allow_plain_http)?;
    let url = format!("{}/.well-known/openid-configuration", base.as_str().trim_end_matches('/'));
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("discovery at {url} failed: {}", e.without_url()))?;
    if !response.status().is_success() {
        return Err(format!("discovery at {url} answered HTTP {}", response.status()));
    }
    let body = crate::http::read_capped(response, MAX_DOCUMENT_BYTES)
        .await
        .map_err(|e| format!("discovery at {url}: {e}"))?;
    let document: Document = serde_json::from_slice(&body)
        .map_err(|e| format!("discovery at {url} is not a discovery document: {e}"))?;
    if document.issuer != issuer {
        return Err(format!(
            "discovery at {url} names issuer {:?}, not {issuer:?}",
            document.issuer
        ));
    }
    Ok(Discovery {
        issuer: document.issuer,
        jwks_uri: check_url(&document.jwks_uri, allow_plain_http)?,
        token_endpoint: document
            .token_endpoint
            .map(|t| check_url(&t, allow_plain_http))
            .transpose()?,
    })
}

/// The endpoints a service uses, as configured or discovered.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The JWKS location.
    pub jwks_uri: reqwest::Url,
    /// The token endpoint, when one was asked for.
    pub token_endpoint: Option<reqwest::Url>,
}

/// Checks the configured issuer and endpoint URLs without a request, so
/// that a bad one stops the start before any service is reached. Errors
/// name the setting at fault.
pub fn check_settings(
    issuer: &str,
    jwks_url: Option<&str>,
    token_endpoint: Option<&str>,
    allow_plain_http: bool,
) -> Result<(), String> {
    check_url(issuer, allow_plain_http).map_err(|e| format!("--issuer: {e}"))?;
    configured(jwks_url, token_endpoint, allow_plain_http).map(drop)
}

/// The configured JWKS URL and token endpoint, checked.
fn configured(
    jwks_url: Option<&str>,
    token_endpoint: Option<&str>,
    allow_plain_http: bool,
) -> Result<(Option<reqwest::Url>, Option<reqwest::Url>), String> {
    let jwks = jwks_url
        .map(|url| check_url(url, allow_plain_http).map_err(|e| format!("--jwks-url: {e}")))
        .transpose()?;
    let token = token_endpoint
        .map(|url| check_url(url, allow_plain_http).map_err(|e| format!("--token-endpoint: {e}")))
        .transpose()?;
    Ok((jwks, token))
}

/// Resolves the JWKS URL (and the token endpoint when `need_token`): the
/// configured ones when given, otherwise from the issuer's discovery
/// document, which is fetched only if something is missing. Errors name
/// the setting at fault (`--jwks-url`, `--token-endpoint`, `--issuer`).
pub async fn resolve(
    http: &reqwest::Client,
    issuer: &str,
    jwks_url: Option<&str>,
    token_endpoint: Option<&str>,
    need_token: bool,
    allow_plain_http: bool,
) -> Result<Endpoints, String> {
    let (jwks, token) = configured(jwks_url, token_endpoint, allow_plain_http)?;
    if let (Some(jwks_uri), true) = (&jwks, token.is_some() || !need_token) {
        return Ok(Endpoints { jwks_uri: jwks_uri.clone(), token_endpoint: token });
    }

    let found =
        discover(http, issuer, allow_plain_http).await.map_err(|e| format!("--issuer: {e}"))?;
    let token_endpoint = match (token, need_token) {
        (Some(token), _) => Some(token),
        (None, false) => None,
        (None, true) => Some(found.token_endpoint.ok_or(
            "--issuer: the discovery document has no token_endpoint; set --token-endpoint",
        )?),
    };
    Ok(Endpoints { jwks_uri: jwks.unwrap_or(found.jwks_uri), token_endpoint })
}
