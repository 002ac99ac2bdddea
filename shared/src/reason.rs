//! Why a token or a message was refused.

use std::fmt;

/// A permanent rejection: retrying the same input can never succeed.
///
/// Each variant has a stable code ([`Rejection::code`]) used in logs,
/// dead-letter headers and HTTP problem bodies. Transient failures, such as
/// an unreachable issuer, are not rejections; see
/// [`VerifyError::Unavailable`](crate::VerifyError::Unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No token was presented.
    MissingToken,
    /// The token is not a well-formed JWS compact serialization, or is too
    /// large, or its header is unusable (for example, no `kid`).
    MalformedToken,
    /// The token's `kid` is not in the issuer's published key set.
    UnknownKey,
    /// The `alg` is not allowed, or does not fit the key's family.
    AlgorithmNotAllowed,
    /// The signature does not verify with the issuer's key.
    InvalidSignature,
    /// `iss` is missing or is not the trusted issuer.
    InvalidIssuer,
    /// `aud` is missing or does not name the expected audience.
    InvalidAudience,
    /// `exp` is in the past, beyond the leeway.
    Expired,
    /// `nbf` or `iat` is in the future, beyond the leeway.
    NotYetValid,
    /// A claim has the wrong JSON type or an impossible value.
    MalformedClaim,
    /// A required claim (`exp`, `sub`) is absent.
    MissingClaim,
    /// The header carries `crit`, which this verifier does not support.
    UnsupportedCriticalHeader,
    /// The token lacks the scope the event type requires.
    InsufficientScope,
    /// The token carries scopes beyond the one the event type requires.
    ExcessScope,
    /// The claims policy refused the event.
    Forbidden,
    /// The record's headers or payload do not follow the message contract.
    MalformedPayload,
    /// The handler reported that the event can never succeed.
    HandlerRejected,
}

impl Rejection {
    /// The stable, snake_case code of this rejection.
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedToken => "malformed_token",
            Self::UnknownKey => "unknown_key",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::InvalidSignature => "invalid_signature",
            Self::InvalidIssuer => "invalid_issuer",
            Self::InvalidAudience => "invalid_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MalformedClaim => "malformed_claim",
            Self::MissingClaim => "missing_claim",
            Self::UnsupportedCriticalHeader => "unsupported_critical_header",
            Self::InsufficientScope => "insufficient_scope",
            Self::ExcessScope => "excess_scope",
            Self::Forbidden => "forbidden",
            Self::MalformedPayload => "malformed_payload",
            Self::HandlerRejected => "handler_rejected",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}
