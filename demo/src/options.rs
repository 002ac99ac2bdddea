//! The demo's command line.
//!
//! With no flags, everything runs inside the process: librdkafka's mock
//! cluster as the broker and the development issuer as the authorization
//! server. `--kafka-bootstrap` and `--issuer` swap either one for a real
//! service; the flags after them only matter with a real issuer.
//!
//! The flags have no `EI_*` environment variables on purpose: the services'
//! own variables (`EI_KAFKA_BOOTSTRAP`, `EI_ISSUER`...) must not silently
//! turn the self-contained demo into one that needs a running broker.

use std::str::FromStr;

use clap::Parser;
use event_identity::Secret;

/// The event type the scenario publishes.
pub const EVENT_TYPE: &str = "com.example.order.created";
/// The user scope that allows publishing it.
pub const USER_SCOPE: &str = "orders:write";
/// The one scope its event token carries.
pub const EVENT_SCOPE: &str = "events:order.created";
/// The consumers' audience.
pub const CONSUMER_AUDIENCE: &str = "order-consumer";

/// Settings of `event-identity-demo`.
#[derive(Parser, Clone)]
#[command(
    name = "event-identity-demo",
    version,
    about = "Runs the event-identity pipeline in one process and prints what happened",
    long_about = "Runs the event-identity pipeline in one process: the producer's HTTP \
                  service, the consumer runtime with a SQLite inbox, a Kafka broker and an \
                  authorization server. By default the broker is librdkafka's in-process mock \
                  cluster and the authorization server is the project's development issuer, a \
                  stand-in with test keys that is never to be deployed; --kafka-bootstrap and \
                  --issuer use real ones instead (for example scripts/kafka.sh and \
                  scripts/keycloak.sh, with the realm in realm/event-identity-realm.json)."
)]
pub struct DemoOptions {
    /// Use this Kafka cluster (host:port,...) instead of the embedded mock
    /// cluster. The demo creates two fresh topics on it, named
    /// demo-orders-RANDOM and its .dead-letter topic, and leaves them.
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka_bootstrap: Option<String>,

    /// Use this authorization server (its exact issuer identifier, e.g.
    /// http://127.0.0.1:18080/realms/event-identity) instead of the
    /// development issuer. It must offer RFC 8693 token exchange to the
    /// producer client and the password grant to --user-client-id.
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,

    /// With --issuer: the producer's confidential client.
    #[arg(long, default_value = "event-producer")]
    pub client_id: String,

    /// With --issuer: the producer client's secret [default: the test
    /// realm's secret of event-producer].
    #[arg(long, default_value = "producer-secret", hide_default_value = true)]
    pub client_secret: Secret,

    /// With --issuer: the public client users sign in with (password
    /// grant).
    #[arg(long, default_value = "event-api")]
    pub user_client_id: String,

    /// With --issuer: scopes the users ask for when they sign in.
    #[arg(long, default_value = "openid orders:write")]
    pub user_scope: String,

    /// With --issuer: the user who may publish orders, as USER:PASSWORD
    /// [default: alice, with her password in the test realm].
    #[arg(long, default_value = "alice:alice-password", hide_default_value = true)]
    pub writer: Login,

    /// With --issuer: the user who may not, as USER:PASSWORD [default:
    /// bob, with his password in the test realm].
    #[arg(long, default_value = "bob:bob-password", hide_default_value = true)]
    pub reader: Login,

    /// The tenant the orders name in their data; the consumer requires it
    /// to equal the event token's `tenant` claim. With the development
    /// issuer it is also the users' tenant; with a real one, a tenant other
    /// than the users' shows the consumer dead-lettering as `forbidden`.
    #[arg(long, default_value = "acme")]
    pub tenant: String,

    /// Allow plain-HTTP issuer URLs to hosts other than loopback.
    #[arg(long, default_value_t = false)]
    pub allow_plain_http: bool,

    /// How long to wait for the consumer to settle every record, in
    /// milliseconds.
    #[arg(
        long,
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..=600_000)
    )]
    pub settle_timeout_ms: u64,
}

impl DemoOptions {
    /// The self-contained defaults: mock cluster and development issuer.
    pub fn embedded() -> Self {
        Self::parse_from(["event-identity-demo"])
    }
}

/// A user's sign-in, `USER:PASSWORD`; the password never prints.
#[derive(Clone)]
pub struct Login {
    /// The username.
    pub username: String,
    /// The password.
    pub password: Secret,
}

impl FromStr for Login {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.split_once(':') {
            Some((username, password)) if !username.is_empty() && !password.is_empty() => {
                Ok(Self { username: username.to_owned(), password: Secret::new(password) })
            }
            _ => Err("expected USER:PASSWORD".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_split_at_the_first_colon() {
        let login: Login = "carol:pass:word".parse().unwrap();
        assert_eq!(login.username, "carol");
        assert_eq!(login.password.expose(), "pass:word");
        assert!("carol".parse::<Login>().is_err());
        assert!(":x".parse::<Login>().is_err());
    }

    #[test]
    fn the_defaults_are_self_contained() {
        let options = DemoOptions::embedded();
        assert!(options.kafka_bootstrap.is_none() && options.issuer.is_none());
        assert_eq!(options.writer.username, "alice");
    }
}
