use std::time::SystemTime;

/// Whether a failure means "this is not a valid token" or "valid, but not allowed here".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The token cannot be trusted (SQLSTATE 28P01).
    BadToken,
    /// The token is genuine but does not grant this connection (SQLSTATE 28000).
    NotAllowed,
}

/// Why a token was refused. The messages name what is wrong so a person can act on it, and
/// never include the token itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("password is not a JWT access token: {0}")]
    NotJwt(&'static str),
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token algorithm '{0}' is not accepted")]
    Algorithm(String),
    #[error("issuer '{0}' is not trusted")]
    UntrustedIssuer(String),
    #[error("token signing key '{kid}' is not published by issuer '{issuer}'{note}")]
    UnknownKey {
        kid: String,
        issuer: String,
        note: &'static str,
    },
    #[error("signing keys of issuer '{issuer}' are not available yet (its discovery document or JWKS could not be fetched); try again shortly")]
    KeysUnavailable { issuer: String },
    #[error("token signature is invalid")]
    Signature,
    #[error("access token expired at {}", humantime::format_rfc3339_seconds(*.0))]
    Expired(SystemTime),
    #[error("access token is not valid before {}", humantime::format_rfc3339_seconds(*.0))]
    NotYetValid(SystemTime),
    #[error("token has no '{0}' claim")]
    MissingClaim(String),
    #[error("token audience does not include '{0}'")]
    Audience(String),
    #[error("token lacks the required scope '{0}'")]
    Scope(String),
    #[error("user '{user}' does not match the token's {claim} '{value}'")]
    UserMismatch {
        user: String,
        claim: String,
        value: String,
    },
}

/// The note of an unknown key when the issuer's keys could not be fetched again.
pub(crate) const REFETCH_FAILED: &str = " (and its keys could not be refetched)";

impl AuthError {
    /// The failure is the identity provider's (its keys could not be had), not the token's:
    /// it is not held against the client.
    pub fn issuer_at_fault(&self) -> bool {
        match self {
            AuthError::KeysUnavailable { .. } => true,
            AuthError::UnknownKey { note, .. } => *note == REFETCH_FAILED,
            _ => false,
        }
    }

    pub fn kind(&self) -> FailureKind {
        match self {
            AuthError::UntrustedIssuer(_)
            | AuthError::Audience(_)
            | AuthError::Scope(_)
            | AuthError::UserMismatch { .. } => FailureKind::NotAllowed,
            _ => FailureKind::BadToken,
        }
    }

    /// A short stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NotJwt(_) => "not_jwt",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UntrustedIssuer(_) => "untrusted_issuer",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::KeysUnavailable { .. } => "keys_unavailable",
            AuthError::Signature => "signature",
            AuthError::Expired(_) => "expired",
            AuthError::NotYetValid(_) => "not_yet_valid",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Audience(_) => "audience",
            AuthError::Scope(_) => "scope",
            AuthError::UserMismatch { .. } => "user_mismatch",
        }
    }
}
