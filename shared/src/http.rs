//! The HTTP client used toward the authorization server.

use std::time::Duration;

/// Builds the one HTTP client a service uses for discovery, JWKS and token
/// requests: bounded connect and request times, and no redirects, so a
/// compromised or misconfigured endpoint cannot bounce key or token
/// requests elsewhere.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("the TLS backend initialises")
}

/// Reads a response body of at most `max` bytes; a larger body is an error
/// before it is all in memory.
pub async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("read failed: {e}"))? {
        if body.len() + chunk.len() > max {
            return Err(format!("response larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads at most the first `max` bytes of a response body, for messages
/// about an answer that is not used otherwise; the rest is never read.
pub async fn read_prefix(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        let Ok(Some(chunk)) = response.chunk().await else { break };
        let room = max - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    body
}

/// Checks that `url` may be used to fetch keys or tokens: HTTPS, or plain
/// HTTP to a loopback address (development only). `allow_plain_http` lifts
/// the loopback restriction for private networks such as a compose stack;
/// anyone on that network can then read tokens and forge keys.
pub fn check_url(url: &str, allow_plain_http: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_plain_http || parsed.host_str().is_some_and(is_loopback_host) => Ok(parsed),
        "http" => Err(format!("{url:?} uses plain HTTP to a non-loopback host; use https")),
        other => Err(format!("{url:?} has unsupported scheme {other:?}")),
    }
}

/// True for `localhost` and loopback IP literals.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_and_loopback_http_are_allowed() {
        assert!(check_url("https://idp.example.test/realms/x", false).is_ok());
        assert!(check_url("http://127.0.0.1:18080/realms/x", false).is_ok());
        assert!(check_url("http://localhost:8080/", false).is_ok());
        assert!(check_url("http://[::1]:8080/", false).is_ok());
    }

    #[test]
    fn plain_http_elsewhere_is_refused() {
        let err = check_url("http://idp.example.test/", false).unwrap_err();
        assert!(err.contains("plain HTTP"), "{err}");
        assert!(check_url("http://keycloak:8080/", true).is_ok());
        assert!(check_url("ftp://127.0.0.1/", true).is_err());
        assert!(check_url("not a url", false).is_err());
    }
}
