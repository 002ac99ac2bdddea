//! What the producer and the consumer of identity-bearing events share.
//!
//! - [`contract`]: the Kafka record layout (CloudEvents 1.0, binary mode)
//!   and how message IDs are made.
//! - [`verify`]: one verifier for user tokens and event tokens, with the
//!   issuer's keys cached by [`jwks`]; every rejection carries a
//!   [`Rejection`] reason code.
//! - [`exchange`]: the RFC 8693 token exchange client the producer uses to
//!   turn a user token into an event token.
//! - [`ops`]: `/metrics`, `/healthz` and `/readyz` for both binaries.
//! - [`secret`]: a redacting wrapper for secrets and tokens, and the short
//!   fingerprint that is logged in their place.

pub mod contract;
#[cfg(feature = "dev-issuer")]
pub mod dev_issuer;
pub mod discovery;
pub mod exchange;
pub mod http;
pub mod json;
pub mod jwks;
pub mod ops;
pub mod reason;
pub mod route_spec;
pub mod secret;
pub mod service;
pub mod verify;

pub use reason::Rejection;
pub use secret::Secret;
pub use verify::{VerifiedClaims, Verifier, VerifierConfig, VerifyError};
