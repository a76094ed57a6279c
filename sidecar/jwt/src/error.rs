//! The error type of the crate.

use std::path::PathBuf;

/// Why a token was refused, or why the verifier could not be built.
///
/// Messages are short and never contain token contents or claim values, so they can go into
/// logs, audit events and 401 bodies as they are. [`JwtError::code`] gives a stable
/// snake_case label for metrics and audit reasons.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The `Authorization` value is empty, or is `Bearer` without a token.
    #[error("bearer token is missing")]
    EmptyToken,
    /// The `Authorization` value does not use the `Bearer` scheme.
    #[error("authorization header does not use the Bearer scheme")]
    InvalidScheme,
    /// The token is larger than [`crate::MAX_TOKEN_LEN`]; refused before parsing.
    #[error("bearer token is larger than {max} bytes")]
    TokenTooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// The token is not a JWS in compact serialisation; the text says which part is wrong.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not one of RS256, RS384, RS512, PS256, ES256, ES384, EdDSA
    /// (`none` and every HMAC algorithm are refused).
    #[error("token algorithm is not allowed (allowed: RS256, RS384, RS512, PS256, ES256, ES384, EdDSA)")]
    UnsupportedAlgorithm,
    /// The header lists critical extensions (`crit`), none of which are supported.
    #[error("token header has critical extensions (crit), which are not supported")]
    UnsupportedCritical,
    /// The header's `typ` says the token is an event, not an access token: an OpenID
    /// back-channel logout token (`logout+jwt`) or a security event token (`secevent+jwt`),
    /// which an issuer signs with the same keys and may address to the same audience.
    #[error("token type (typ) is not an access token")]
    WrongTokenType,
    /// The token has no `kid` and the key set does not hold exactly one key of its type.
    #[error("token has no key id (kid) and the key set has no single key of its type")]
    MissingKid,
    /// No key in the key set has the token's `kid`.
    #[error("token key id (kid) is not in the key set")]
    UnknownKid,
    /// The token's `alg` does not match the algorithm of the key it names.
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    /// The signature does not verify with the selected key.
    #[error("token signature is invalid")]
    InvalidSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// The token has no `exp` claim.
    #[error("token has no expiry (exp) claim")]
    MissingExpiry,
    /// A registered claim has the wrong JSON type (e.g. `exp` that is not a number).
    #[error("token claim `{0}` has the wrong type")]
    InvalidClaim(&'static str),
    /// `iss` is missing or is not the configured issuer.
    #[error("token issuer (iss) is not accepted")]
    InvalidIssuer,
    /// `aud` is missing or names none of the configured audiences.
    #[error("token audience (aud) is not accepted")]
    InvalidAudience,
    /// The id claim is missing, empty or not a string.
    #[error("token has no non-empty string `{claim}` claim for the user id")]
    MissingIdClaim {
        /// The configured id claim name (not its value).
        claim: String,
    },
    /// The id claim or a mapped attribute claim cannot be used: the id is longer than
    /// [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) or holds control characters, an attribute is longer
    /// than [`MAX_ATTRIBUTE_BYTES`](crate::MAX_ATTRIBUTE_BYTES) or holds NUL (such a user would
    /// make their own audit events ones the collector refuses), or an attribute claim holds
    /// several values or an object: an array of more than one element, an array whose element
    /// is null, an array or an object, or an object (leaving the attribute absent would let
    /// the token slip past a `Deny` rule on it).
    #[error("token claim `{claim}` is too long, holds control characters, several values or an object")]
    UnusableClaim {
        /// The claim name (not its value).
        claim: String,
    },
    /// The JWKS has never been loaded (the URL was never fetched successfully).
    #[error("the JWKS is not available yet")]
    JwksUnavailable,
    /// A JWKS document was rejected.
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
    /// The JWKS file could not be read.
    #[error("cannot read JWKS file {path}: {reason}")]
    JwksFile {
        /// The file.
        path: PathBuf,
        /// Why (an I/O error kind, never contents).
        reason: String,
    },
    /// Fetching the JWKS URL failed.
    #[error("cannot fetch JWKS: {0}")]
    JwksFetch(String),
    /// The verifier settings are unusable.
    #[error("invalid JWT verifier settings: {0}")]
    InvalidSettings(String),
}

impl JwtError {
    /// A stable snake_case label: the metric label and the audit reason.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::EmptyToken => "empty_token",
            JwtError::InvalidScheme => "invalid_scheme",
            JwtError::TokenTooLarge { .. } => "token_too_large",
            JwtError::Malformed(_) => "malformed_token",
            JwtError::UnsupportedAlgorithm => "unsupported_alg",
            JwtError::UnsupportedCritical => "unsupported_crit",
            JwtError::WrongTokenType => "wrong_token_type",
            JwtError::MissingKid => "missing_kid",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::AlgorithmMismatch => "alg_mismatch",
            JwtError::InvalidSignature => "invalid_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::MissingExpiry => "missing_exp",
            JwtError::InvalidClaim(_) | JwtError::UnusableClaim { .. } => "invalid_claim",
            JwtError::InvalidIssuer => "invalid_issuer",
            JwtError::InvalidAudience => "invalid_audience",
            JwtError::MissingIdClaim { .. } => "missing_id_claim",
            JwtError::JwksUnavailable => "jwks_unavailable",
            JwtError::InvalidJwks(_) => "invalid_jwks",
            JwtError::JwksFile { .. } => "jwks_file",
            JwtError::JwksFetch(_) => "jwks_fetch_failed",
            JwtError::InvalidSettings(_) => "invalid_settings",
        }
    }

    /// `true` when the token (the client) is at fault: the sidecar answers 401. `false` for
    /// the sidecar's own trouble (no JWKS yet, bad JWKS or settings): it answers 503.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            JwtError::JwksUnavailable
                | JwtError::InvalidJwks(_)
                | JwtError::JwksFile { .. }
                | JwtError::JwksFetch(_)
                | JwtError::InvalidSettings(_)
        )
    }
}
