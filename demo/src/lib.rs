//! The whole event-identity pipeline in one process, for a first look:
//! `cargo run --release -p event-identity-demo`.
//!
//! It starts the real producer service ([`event_identity_producer::Service`]
//! on a free loopback port) and the real consumer runtime
//! ([`event_identity_consumer::ConsumerBuilder`], with a SQLite inbox in a
//! temporary directory), both configured through their own command-line
//! structs, and plays the [`scenario`] against them. Two stand-ins make it
//! self-contained, and the output says so:
//!
//! - the broker is librdkafka's in-process mock cluster ([`mock_broker`]),
//!   not Kafka;
//! - the authorization server is the project's development issuer
//!   ([`event_identity::dev_issuer`]), which signs with test keys shipped in
//!   the repository and is never to be deployed.
//!
//! `--kafka-bootstrap` and `--issuer` ([`options`]) replace either with a
//! real one, such as the project's Kafka and Keycloak scripts.
//!
//! [`run`] returns a [`Summary`]; the binary prints it.

pub mod identity;
pub mod kafka;
pub mod mock_broker;
pub mod options;
pub mod scenario;
pub mod summary;

pub use options::DemoOptions;
pub use scenario::run;
pub use summary::Summary;
