//! The producer service's configuration: flags, or `EI_*` environment
//! variables, validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use event_identity::Secret;

use crate::routes::EventRoute;

/// Settings of the `event-producer` service.
#[derive(Parser, Clone)]
#[command(
    args_override_self = true,
    name = "event-producer",
    version,
    about = "Publishes identity-bearing events to Kafka"
)]
pub struct ProducerConfig {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EI_PRODUCER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "EI_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,

    /// Topic the events are published to.
    #[arg(long, env = "EI_TOPIC", default_value = "events")]
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

    /// The producer's client secret (HTTP Basic client authentication).
    #[arg(long, env = "EI_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Secret,

    /// Key of the HMAC that turns a user's `Idempotency-Key` into a message
    /// ID; default: the client secret. Every replica must use the same one,
    /// and changing it gives retries of earlier requests new IDs.
    #[arg(long, env = "EI_MESSAGE_ID_SECRET", hide_env_values = true)]
    pub message_id_secret: Option<Secret>,

    /// Audience user tokens must name; default: the client ID.
    #[arg(long, env = "EI_USER_AUDIENCE")]
    pub user_audience: Option<String>,

    /// A publishable event type:
    /// `type=T,requires=USER_SCOPE,scope=EVENT_SCOPE,audience=CONSUMERS`.
    /// Repeat the flag, or separate routes with `;` in the variable.
    #[arg(long = "route", env = "EI_ROUTES", value_delimiter = ';', required = true)]
    pub routes: Vec<EventRoute>,

    /// Least remaining lifetime an event token must have to be published
    /// or reused from the cache, in seconds.
    #[arg(long, env = "EI_MIN_EVENT_TOKEN_LIFETIME_S", default_value_t = 3600)]
    pub min_event_token_lifetime_s: u64,

    /// Clock skew tolerated when checking token times, in seconds.
    #[arg(long, env = "EI_LEEWAY_S", default_value_t = 30)]
    pub leeway_s: u64,

    /// The `ce_source` of published events.
    #[arg(long, env = "EI_SOURCE", default_value = "/event-producer")]
    pub source: String,

    /// How long Kafka may take to acknowledge a record before the request
    /// fails with 503, in milliseconds.
    #[arg(long, env = "EI_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,

    /// How long Kafka batches records before sending, in milliseconds.
    #[arg(long, env = "EI_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,

    /// Time allowed at shutdown to deliver queued records, in milliseconds.
    #[arg(long, env = "EI_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,

    /// Timeout of each request to the authorization server, in milliseconds.
    #[arg(long, env = "EI_HTTP_TIMEOUT_MS", default_value_t = 5_000)]
    pub http_timeout_ms: u64,

    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "EI_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Log format: `text` or `json`.
    #[arg(long, env = "EI_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ProducerConfig {
    /// The audience user tokens must name.
    pub fn user_audience(&self) -> &str {
        self.user_audience.as_deref().unwrap_or(&self.client_id)
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
    fn a_bad_route_names_the_setting() {
        let error = parse(&["--route=type=a,requires=r"]).err().unwrap().to_string();
        assert!(error.contains("--route"), "{error}");
        assert!(error.contains("scope= is missing"), "{error}");
    }

    #[test]
    fn the_secret_does_not_show_in_debug_output() {
        let config = parse(&["--route=type=a,requires=r,scope=s,audience=x"]).unwrap();
        assert_eq!(format!("{:?}", config.client_secret), "[redacted]");
    }
}
