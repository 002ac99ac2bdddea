//! OpenID Provider discovery: where an issuer keeps its keys and its token
//! endpoint.

use serde::Deserialize;

use crate::http::check_url;

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
    let document: Document = response
        .json()
        .await
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
