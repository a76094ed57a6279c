//! The `Authorization` header and the compact JWS structure: everything done before a key is
//! chosen.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use crate::JwtError;

/// The largest accepted token, in bytes. Larger tokens are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The signature algorithms this crate accepts. Anything else (`none`, `HS*`, `PS384`, ...)
/// is refused whatever the key set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Es256,
    Es384,
    EdDsa,
}

/// The key families of the accepted algorithms (JWK `kty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kty {
    Rsa,
    Ec,
    Okp,
}

impl Alg {
    /// Every accepted RSA algorithm: what an RSA JWK without `alg` may be used with.
    pub(crate) const RSA: [Alg; 4] = [Alg::Rs256, Alg::Rs384, Alg::Rs512, Alg::Ps256];

    /// The algorithm named `name` (JOSE spelling), if it is accepted.
    pub(crate) fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    /// The key family the algorithm needs.
    pub(crate) fn kty(self) -> Kty {
        match self {
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 => Kty::Rsa,
            Alg::Es256 | Alg::Es384 => Kty::Ec,
            Alg::EdDsa => Kty::Okp,
        }
    }

    /// The same algorithm for `jsonwebtoken`'s crypto backend.
    pub(crate) fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            Alg::Rs256 => jsonwebtoken::Algorithm::RS256,
            Alg::Rs384 => jsonwebtoken::Algorithm::RS384,
            Alg::Rs512 => jsonwebtoken::Algorithm::RS512,
            Alg::Ps256 => jsonwebtoken::Algorithm::PS256,
            Alg::Es256 => jsonwebtoken::Algorithm::ES256,
            Alg::Es384 => jsonwebtoken::Algorithm::ES384,
            Alg::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        }
    }

    /// A bit for [`crate::jwks::AlgSet`].
    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Extracts the token from an `Authorization` header value: `Bearer <token>`, scheme
/// case-insensitive, surrounding whitespace ignored.
///
/// The token must be at most [`MAX_TOKEN_LEN`] bytes (checked before anything else) and made of
/// base64url characters and dots only.
///
/// # Errors
/// [`JwtError::EmptyToken`] for an empty value or `Bearer` alone, [`JwtError::InvalidScheme`]
/// for another scheme (e.g. `Basic`), [`JwtError::TokenTooLarge`], and
/// [`JwtError::Malformed`] for characters that cannot appear in a JWT.
pub fn bearer_token(value: &[u8]) -> Result<&str, JwtError> {
    const SCHEME: &[u8] = b"bearer";
    // Room for the scheme and some whitespace; the token itself is checked again below.
    if value.len() > MAX_TOKEN_LEN + 64 {
        return Err(JwtError::TokenTooLarge { max: MAX_TOKEN_LEN });
    }
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(JwtError::EmptyToken);
    }
    let Some(space) = value.iter().position(|b| *b == b' ' || *b == b'\t') else {
        return Err(if value.eq_ignore_ascii_case(SCHEME) {
            JwtError::EmptyToken
        } else {
            JwtError::InvalidScheme
        });
    };
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Err(JwtError::InvalidScheme);
    }
    let token = rest.trim_ascii_start();
    if token.is_empty() {
        return Err(JwtError::EmptyToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TokenTooLarge { max: MAX_TOKEN_LEN });
    }
    if !token.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(JwtError::Malformed("token has characters outside base64url and '.'"));
    }
    std::str::from_utf8(token).map_err(|_| JwtError::Malformed("token is not ASCII"))
}

/// A structurally valid compact JWS whose header names an accepted algorithm. Nothing in it
/// is trusted yet.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    /// The accepted algorithm the header names.
    pub(crate) alg: Alg,
    /// The header's key id.
    pub(crate) kid: Option<String>,
    /// `base64url(header) '.' base64url(payload)`: what the signature covers.
    pub(crate) signing_input: &'a str,
    /// The decoded payload (claims JSON, not parsed yet).
    pub(crate) payload: Vec<u8>,
    /// The base64url signature, as in the token.
    pub(crate) signature: &'a str,
}

/// The header fields this crate reads. Unknown fields (`cty`, `jku`, `x5u`, `jwk`, ...) are
/// ignored: keys come only from the configured JWKS. Duplicate fields are refused by the
/// derive.
#[derive(Deserialize)]
struct RawHeader {
    #[serde(default)]
    alg: Option<serde_json::Value>,
    #[serde(default)]
    kid: Option<serde_json::Value>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
    #[serde(default)]
    typ: Option<serde_json::Value>,
}

/// Token types (`typ`, RFC 7515 §4.1.9, compared without regard to case and without an
/// `application/` prefix) of signed events that are never access tokens.
const EVENT_TYPES: [&str; 2] = ["logout+jwt", "secevent+jwt"];

/// Splits and decodes a compact JWS (`header.payload.signature`) and checks its header.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated segments"));
    };
    if header_b64.is_empty() || payload_b64.is_empty() {
        return Err(JwtError::Malformed("empty header or payload segment"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed("header is not base64url (unpadded)"))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed("payload is not base64url (unpadded)"))?;
    // The derive would also accept a JSON array.
    if header.trim_ascii_start().first() != Some(&b'{') {
        return Err(JwtError::Malformed("header is not a JSON object"));
    }
    let header: RawHeader = serde_json::from_slice(&header).map_err(|e| {
        JwtError::Malformed(if e.is_data() {
            "header is not a JSON object with unique fields"
        } else {
            "header is not JSON"
        })
    })?;
    let alg = match header.alg {
        Some(serde_json::Value::String(alg)) => alg,
        Some(_) => return Err(JwtError::Malformed("header alg is not a string")),
        None => return Err(JwtError::Malformed("header has no alg")),
    };
    let alg = Alg::parse(&alg).ok_or(JwtError::UnsupportedAlgorithm)?;
    if header.crit.is_some() {
        return Err(JwtError::UnsupportedCritical);
    }
    match header.typ {
        None => {}
        Some(serde_json::Value::String(typ)) => {
            let lower = typ.to_ascii_lowercase();
            let typ = lower.strip_prefix("application/").unwrap_or(&lower);
            if EVENT_TYPES.contains(&typ) {
                return Err(JwtError::WrongTokenType);
            }
        }
        Some(_) => return Err(JwtError::Malformed("header typ is not a string")),
    }
    let kid = match header.kid {
        None => None,
        Some(serde_json::Value::String(kid)) => Some(kid),
        Some(_) => return Err(JwtError::Malformed("header kid is not a string")),
    };
    if signature.is_empty() {
        return Err(JwtError::InvalidSignature);
    }
    if URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(JwtError::Malformed("signature is not base64url (unpadded)"));
    }
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    Ok(Parsed { alg, kid, signing_input, payload, signature })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn bearer_token_accepts_scheme_case_and_whitespace() {
        assert_eq!(bearer_token(b"Bearer a.b.c").unwrap(), "a.b.c");
        assert_eq!(bearer_token(b"  bearer \t a.b.c  ").unwrap(), "a.b.c");
        assert_eq!(bearer_token(b"BEARER a.b.c").unwrap(), "a.b.c");
    }

    #[test]
    fn bearer_token_refusals() {
        assert_eq!(bearer_token(b""), Err(JwtError::EmptyToken));
        assert_eq!(bearer_token(b"Bearer"), Err(JwtError::EmptyToken));
        assert_eq!(bearer_token(b"Bearer   "), Err(JwtError::EmptyToken));
        assert_eq!(bearer_token(b"Basic dXNlcjpwdw=="), Err(JwtError::InvalidScheme));
        assert_eq!(bearer_token(b"Bearerx a.b.c"), Err(JwtError::InvalidScheme));
        assert_eq!(bearer_token(b"token"), Err(JwtError::InvalidScheme));
        assert_eq!(bearer_token(b"Bearer a b").unwrap_err().code(), "malformed_token");
        assert_eq!(bearer_token(b"Bearer a.b.c=").unwrap_err().code(), "malformed_token");
        assert_eq!(bearer_token(b"Bearer \xff.b.c").unwrap_err().code(), "malformed_token");
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(bearer_token(big.as_bytes()), Err(JwtError::TokenTooLarge { max: MAX_TOKEN_LEN }));
    }

    #[test]
    fn parse_header_checks() {
        let p = b64("{}");
        let ok = format!("{}.{p}.c2ln", b64(r#"{"alg":"ES256","kid":"k"}"#));
        let parsed = parse(&ok).unwrap();
        assert_eq!(parsed.alg, Alg::Es256);
        assert_eq!(parsed.kid.as_deref(), Some("k"));
        assert_eq!(parsed.signing_input, &ok[..ok.len() - 5]);

        for (header, code) in [
            (r#"{"alg":"none"}"#, "unsupported_alg"),
            (r#"{"alg":"HS256"}"#, "unsupported_alg"),
            (r#"{"alg":"PS512"}"#, "unsupported_alg"),
            (r#"{"alg":"RS256","crit":["exp"]}"#, "unsupported_crit"),
            (r#"{"alg":"RS256","typ":"logout+jwt"}"#, "wrong_token_type"),
            (r#"{"alg":"RS256","typ":"application/SECEVENT+JWT"}"#, "wrong_token_type"),
            (r#"{"alg":"RS256","typ":7}"#, "malformed_token"),
            (r#"{"alg":"RS256","alg":"HS256"}"#, "malformed_token"),
            (r#"{"alg":7}"#, "malformed_token"),
            (r#"{"kid":"k"}"#, "malformed_token"),
            (r#"{"alg":"RS256","kid":1}"#, "malformed_token"),
            (r#"["RS256"]"#, "malformed_token"),
            ("not json", "malformed_token"),
        ] {
            let token = format!("{}.{p}.c2ln", b64(header));
            assert_eq!(parse(&token).unwrap_err().code(), code, "{header}");
        }
        // Access tokens' types pass.
        for header in [r#"{"alg":"RS256","typ":"JWT"}"#, r#"{"alg":"RS256","typ":"at+jwt"}"#] {
            assert!(parse(&format!("{}.{p}.c2ln", b64(header))).is_ok(), "{header}");
        }
        let unsigned = format!("{}.{p}.", b64(r#"{"alg":"RS256"}"#));
        assert_eq!(parse(&unsigned).unwrap_err(), JwtError::InvalidSignature);
        assert_eq!(parse("a.b").unwrap_err().code(), "malformed_token");
        assert_eq!(parse("a.b.c.d").unwrap_err().code(), "malformed_token");
        assert_eq!(parse(".b.c").unwrap_err().code(), "malformed_token");
    }
}
