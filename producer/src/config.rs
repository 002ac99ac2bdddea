//! The producer service's configuration: flags, or `EI_*` environment
//! variables, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use event_identity::Secret;
use event_identity::contract::topic_name;
use event_identity::exchange::ClientAuth;
use jsonwebtoken::{Algorithm, EncodingKey};

use crate::routes::EventRoute;

/// Settings of the `event-producer` service.
#[derive(Parser, Clone)]
#[command(
    args_override_self = true,
    name = "event-producer",
    version,
    about = "Publishes identity-bearing events to Kafka",
    group = clap::ArgGroup::new("client_auth")
        .required(true)
        .args(["client_secret", "client_key_file"])
)]
pub struct ProducerConfig {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EI_PRODUCER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "EI_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,

    /// Topic the events are published to.
    #[arg(long, env = "EI_TOPIC", default_value = "events", value_parser = topic_name)]
    pub topic: String,

    /// The authorization server's issuer identifier (exact `iss`). Its
    /// discovery document supplies the JWKS and token endpoint unless they
    /// are given below.
    #[arg(long, env = "EI_ISSUER")]
    pub issuer: String,

    /// JWKS URL; default: from the issuer's discovery document.
    #[arg(long, env = "EI_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Token endpoint for token exchange; default: from discovery.
    #[arg(long, env = "EI_TOKEN_ENDPOINT")]
    pub token_endpoint: Option<String>,

    /// Allow plain-HTTP issuer URLs to hosts other than loopback (a private
    /// network such as a compose stack). Anyone on that network could read
    /// tokens and substitute keys.
    #[arg(long, env = "EI_ALLOW_PLAIN_HTTP", default_value_t = false)]
    pub allow_plain_http: bool,

    /// The producer's OAuth client ID at the authorization server.
    #[arg(long, env = "EI_CLIENT_ID")]
    pub client_id: String,

    /// The producer's client secret (`client_secret_basic`). Give this or
    /// `--client-key-file`.
    #[arg(long, env = "EI_CLIENT_SECRET", hide_env_values = true, value_parser = non_empty_secret)]
    pub client_secret: Option<Secret>,

    /// PEM private key for `private_key_jwt` client authentication
    /// (RFC 7523); its public key must be registered at the server.
    #[arg(long, env = "EI_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,

    /// `kid` of the client key, as registered at the server.
    #[arg(long, env = "EI_CLIENT_KEY_ID")]
    pub client_key_id: Option<String>,

    /// Algorithm of the client key: RS256, PS256, ES256 or EdDSA.
    #[arg(long, env = "EI_CLIENT_KEY_ALG", default_value = "RS256", value_parser = ["RS256", "PS256", "ES256", "EdDSA"])]
    pub client_key_alg: String,

    /// Key of the HMAC that turns a user's `Idempotency-Key` into a message
    /// ID; default: the client secret, or the client key. Every replica must use the same one,
    /// and changing it gives retries of earlier requests new IDs.
    #[arg(long, env = "EI_MESSAGE_ID_SECRET", hide_env_values = true, value_parser = non_empty_secret)]
    pub message_id_secret: Option<Secret>,

    /// Audience user tokens must name; default: the client ID.
    #[arg(long, env = "EI_USER_AUDIENCE")]
    pub user_audience: Option<String>,

    /// A publishable event type:
    /// `type=T,requires=USER_SCOPE,scope=EVENT_SCOPE,audience=CONSUMERS`, or
    /// `requires_claim=CLAIM:V1|V2` instead of `requires` to allow users by a
    /// claim's value (e.g. a role list).
    /// Repeat the flag, or separate routes with `;` in the variable.
    #[arg(long = "route", env = "EI_ROUTES", value_delimiter = ';', required = true)]
    pub routes: Vec<EventRoute>,

    /// Least remaining lifetime an event token must have to be published
    /// or reused from the cache, in seconds.
    #[arg(long, env = "EI_MIN_EVENT_TOKEN_LIFETIME_S", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub min_event_token_lifetime_s: u64,

    /// Clock skew tolerated when checking token times, in seconds.
    #[arg(long, env = "EI_LEEWAY_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub leeway_s: u64,

    /// The `ce_source` of published events: a URI reference, such as
    /// `/event-producer` or `https://example.com/orders`.
    #[arg(long, env = "EI_SOURCE", default_value = "/event-producer", value_parser = source_uri)]
    pub source: String,

    /// How long Kafka may take to acknowledge a record before the request
    /// fails with 503, in milliseconds.
    #[arg(long, env = "EI_DELIVERY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub delivery_timeout_ms: u64,

    /// How long Kafka batches records before sending, in milliseconds.
    #[arg(long, env = "EI_LINGER_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=900_000))]
    pub linger_ms: u64,

    /// Time allowed at shutdown to deliver queued records, in milliseconds.
    #[arg(long, env = "EI_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub shutdown_timeout_ms: u64,

    /// Timeout of each request to the authorization server, in milliseconds.
    #[arg(long, env = "EI_HTTP_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub http_timeout_ms: u64,

    /// Largest request body accepted, in bytes; larger bodies get 413. At
    /// most 960,000: a record also carries its headers and token, and
    /// Kafka's default record limit is about 1 MB.
    #[arg(long, env = "EI_MAX_BODY_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..=960_000))]
    pub max_body_bytes: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "EI_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// A `ce_source` the consumers accept: not empty, no whitespace or control
/// characters.
fn source_uri(value: &str) -> Result<String, String> {
    if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("{value:?} is not a URI reference (not empty, no spaces)"));
    }
    Ok(value.to_owned())
}

fn non_empty_secret(value: &str) -> Result<Secret, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(Secret::new(value))
}

impl ProducerConfig {
    /// The audience user tokens must name.
    pub fn user_audience(&self) -> &str {
        self.user_audience.as_deref().unwrap_or(&self.client_id)
    }

    /// The client authentication these settings describe, and the secret
    /// that keys message IDs. Errors name the settings at fault.
    pub fn client_auth(&self) -> Result<(ClientAuth, Secret), String> {
        match (&self.client_secret, &self.client_key_file) {
            (Some(_), Some(_)) => {
                Err("--client-secret and --client-key-file: give one, not both".into())
            }
            (None, None) => Err("--client-secret or --client-key-file is required".into()),
            (Some(secret), None) => {
                let ids = self.message_id_secret.clone().unwrap_or_else(|| secret.clone());
                Ok((ClientAuth::Secret(secret.clone()), ids))
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--client-key-file {}: {e}", path.display()))?;
                let algorithm: Algorithm = self
                    .client_key_alg
                    .parse()
                    .map_err(|_| "--client-key-alg: unknown".to_owned())?;
                let key = match algorithm {
                    Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                    _ => EncodingKey::from_rsa_pem(&pem),
                }
                .map_err(|e| {
                    format!(
                        "--client-key-file {}: not a {algorithm:?} private key: {e}",
                        path.display()
                    )
                })?;
                let kid = self
                    .client_key_id
                    .clone()
                    .ok_or("--client-key-id is required with --client-key-file")?;
                let ids = match &self.message_id_secret {
                    Some(secret) => secret.clone(),
                    None => Secret::new(String::from_utf8_lossy(&pem).into_owned()),
                };
                Ok((ClientAuth::PrivateKeyJwt { key: Arc::new(key), kid, algorithm }, ids))
            }
        }
    }

    /// Shutdown flush budget.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<ProducerConfig, clap::Error> {
        let mut args = vec![
            "event-producer",
            "--issuer=https://idp.example.test",
            "--client-id=event-producer",
            "--client-secret=s3cret",
        ];
        args.extend(extra);
        ProducerConfig::try_parse_from(args)
    }

    #[test]
    fn routes_repeat_and_later_flags_override_earlier_ones() {
        let config = parse(&[
            "--route=type=a,requires=r,scope=s,audience=x",
            "--route=type=b,requires=r,scope=s,audience=x",
            "--topic=first",
            "--topic=second",
        ])
        .unwrap();
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.topic, "second");
    }

    #[test]
    fn out_of_range_values_name_the_setting() {
        let route = "--route=type=a,requires=r,scope=s,audience=x";
        for bad in [
            "--min-event-token-lifetime-s=18446744073709551615",
            "--delivery-timeout-ms=0",
            "--leeway-s=301",
            "--topic=bad topic!",
            "--topic=",
            "--client-secret=",
            "--max-body-bytes=0",
        ] {
            let flag = bad.split('=').next().unwrap();
            let error = parse(&[route, bad]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(flag), "{bad}: {error}");
        }
    }

    #[test]
    fn a_bad_route_names_the_setting() {
        let error = parse(&["--route=type=a,requires=r"]).err().unwrap().to_string();
        assert!(error.contains("--route"), "{error}");
        assert!(error.contains("scope= is missing"), "{error}");
    }

    #[test]
    fn client_authentication_is_one_of_two_kinds() {
        let route = "--route=type=a,requires=r,scope=s,audience=x";
        let both = parse(&[route, "--client-key-file=/nonexistent.pem"]).err().unwrap();
        assert!(both.to_string().contains("cannot be used with"), "{both}");
        let base = ["event-producer", "--issuer=https://idp.example.test", "--client-id=c", route];
        let none = ProducerConfig::try_parse_from(base).err().unwrap();
        assert!(none.to_string().contains("--client-secret"), "{none}");
        let mut missing = parse(&[route]).unwrap();
        missing.client_secret = None;
        missing.client_key_file = Some("/nonexistent.pem".into());
        assert!(
            missing.client_auth().unwrap_err().starts_with("--client-key-file /nonexistent.pem")
        );
    }

    #[test]
    fn the_secret_does_not_show_in_debug_output() {
        let config = parse(&["--route=type=a,requires=r,scope=s,audience=x"]).unwrap();
        assert_eq!(format!("{:?}", config.client_secret), "Some([redacted])");
        let (auth, _) = config.client_auth().unwrap();
        assert_eq!(format!("{auth:?}"), "client_secret_basic([redacted])");
    }
}
