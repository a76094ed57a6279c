//! JWKS documents: parsing, the accepted keys, and key selection for a token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;

use crate::JwtError;
use crate::token::{Alg, Kty};

/// The largest JWKS document read from a file or a URL.
pub(crate) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Smallest and largest accepted RSA modulus, in bytes (2048 and 4096 bits).
const RSA_MIN_BYTES: usize = 256;
const RSA_MAX_BYTES: usize = 512;

/// A set of [`Alg`]s, as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AlgSet(u8);

impl AlgSet {
    fn of(algs: &[Alg]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |m, a| m | a.bit()))
    }

    fn contains(self, alg: Alg) -> bool {
        self.0 & alg.bit() != 0
    }
}

/// One usable verification key.
pub(crate) struct Key {
    kid: Option<String>,
    kty: Kty,
    algs: AlgSet,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("kty", &self.kty)
            .field("algs", &self.algs)
            .finish()
    }
}

/// The usable keys of one JWKS document.
pub(crate) struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet").field("keys", &self.keys.len()).finish()
    }
}

impl KeySet {
    /// The number of usable keys.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key for a token with this `kid` and `alg`.
    ///
    /// With a `kid`: the first key with that `kid` that accepts `alg`; keys with the `kid` but
    /// none accepting `alg` → [`JwtError::AlgorithmMismatch`]; no key with the `kid` →
    /// [`JwtError::UnknownKid`]. Without a `kid`: the only key of the algorithm's type, if
    /// there is exactly one (else [`JwtError::MissingKid`]), and it must accept `alg`.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Alg) -> Result<&Key, JwtError> {
        match kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
                if named.peek().is_none() {
                    return Err(JwtError::UnknownKid);
                }
                named.find(|k| k.algs.contains(alg)).ok_or(JwtError::AlgorithmMismatch)
            }
            None => {
                let mut same_type = self.keys.iter().filter(|k| k.kty == alg.kty());
                match (same_type.next(), same_type.next()) {
                    (Some(key), None) if key.algs.contains(alg) => Ok(key),
                    (Some(_), None) => Err(JwtError::AlgorithmMismatch),
                    _ => Err(JwtError::MissingKid),
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// The JWK members this crate reads; private members (`d`, ...) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parses a JWKS document and keeps its usable signature keys.
///
/// A key is skipped (and logged at `warn` with its `kid` and the reason, never its material)
/// when it is not for signatures (`use` other than `sig`, `key_ops` without `verify`), is a
/// symmetric (`oct`) key, names an algorithm outside the accepted list or inconsistent with
/// its type or curve, has an RSA modulus outside 2048..=4096 bits, or has malformed
/// components. A document with no usable key at all is an error.
pub(crate) fn parse(bytes: &[u8]) -> Result<KeySet, JwtError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwtError::InvalidJwks(format!("larger than {MAX_JWKS_BYTES} bytes")));
    }
    let doc: RawJwks = serde_json::from_slice(bytes).map_err(|e| {
        JwtError::InvalidJwks(if e.is_data() {
            "not an object with a `keys` array".to_owned()
        } else {
            format!("not valid JSON (line {} column {})", e.line(), e.column())
        })
    })?;
    let total = doc.keys.len();
    let mut keys = Vec::with_capacity(total);
    for (index, raw) in doc.keys.into_iter().enumerate() {
        let raw: RawJwk = match serde_json::from_value(raw) {
            Ok(raw) => raw,
            Err(_) => {
                tracing::warn!(index, "JWKS key skipped: not a JWK object with a string kty");
                continue;
            }
        };
        let kid = raw.kid.clone();
        match key_from(raw) {
            Ok(key) => keys.push(key),
            Err(reason) => tracing::warn!(index, kid = kid.as_deref(), reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(JwtError::InvalidJwks(format!("no usable signature key ({total} keys in the document)")));
    }
    Ok(KeySet { keys })
}

fn b64(field: Option<&String>, what: &'static str) -> Result<Vec<u8>, &'static str> {
    let field = field.ok_or(what)?;
    URL_SAFE_NO_PAD.decode(field).map_err(|_| what)
}

/// Builds one key, or says why it is skipped.
fn key_from(raw: RawJwk) -> Result<Key, &'static str> {
    if raw.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("use is not sig");
    }
    if raw.key_ops.as_ref().is_some_and(|ops| !ops.iter().any(|op| op == "verify")) {
        return Err("key_ops lacks verify");
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => Some(Alg::parse(name).ok_or("alg is not an accepted signature algorithm")?),
    };
    let (kty, algs, key) = match raw.kty.as_str() {
        "RSA" => {
            let n = b64(raw.n.as_ref(), "missing or malformed n")?;
            let e = b64(raw.e.as_ref(), "missing or malformed e")?;
            let n = n.strip_prefix(&[0]).unwrap_or(&n);
            if !(RSA_MIN_BYTES..=RSA_MAX_BYTES).contains(&n.len()) {
                return Err("RSA modulus is not 2048 to 4096 bits");
            }
            if e.is_empty() || e.len() > 8 {
                return Err("RSA exponent is malformed");
            }
            let algs = match alg {
                None => AlgSet::of(&Alg::RSA),
                Some(a) if a.kty() == Kty::Rsa => AlgSet::of(&[a]),
                Some(_) => return Err("alg does not fit kty RSA"),
            };
            (Kty::Rsa, algs, DecodingKey::from_rsa_raw_components(n, &e))
        }
        "EC" => {
            let (curve_alg, len) = match raw.crv.as_deref() {
                Some("P-256") => (Alg::Es256, 32),
                Some("P-384") => (Alg::Es384, 48),
                _ => return Err("EC curve is not P-256 or P-384"),
            };
            if alg.is_some_and(|a| a != curve_alg) {
                return Err("alg does not fit the EC curve");
            }
            let x = b64(raw.x.as_ref(), "missing or malformed x")?;
            let y = b64(raw.y.as_ref(), "missing or malformed y")?;
            if x.len() != len || y.len() != len {
                return Err("EC coordinates have the wrong length");
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Kty::Ec, AlgSet::of(&[curve_alg]), DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            if raw.crv.as_deref() != Some("Ed25519") {
                return Err("OKP curve is not Ed25519");
            }
            if alg.is_some_and(|a| a != Alg::EdDsa) {
                return Err("alg does not fit kty OKP");
            }
            let x = b64(raw.x.as_ref(), "missing or malformed x")?;
            if x.len() != 32 {
                return Err("Ed25519 key has the wrong length");
            }
            (Kty::Okp, AlgSet::of(&[Alg::EdDsa]), DecodingKey::from_ed_der(&x))
        }
        "oct" => return Err("symmetric (oct) keys are never accepted"),
        _ => return Err("kty is not RSA, EC or OKP"),
    };
    Ok(Key { kid: raw.kid, kty, algs, key })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ed(kid: &str) -> String {
        format!(
            r#"{{"kty":"OKP","crv":"Ed25519","kid":"{kid}","x":"{}"}}"#,
            URL_SAFE_NO_PAD.encode([7u8; 32])
        )
    }

    #[test]
    fn skips_unusable_keys_and_keeps_the_rest() {
        let doc = format!(
            r#"{{"keys":[
                {{"kty":"oct","k":"c2VjcmV0","kid":"h"}},
                {{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"small"}},
                {{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}},
                {{"kty":"OKP","crv":"Ed25519","x":"AAAA"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","use":"enc"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","alg":"HS256"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","alg":"ES256"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","key_ops":["sign"]}},
                42,
                {}
            ]}}"#,
            ed("good"),
            x = URL_SAFE_NO_PAD.encode([7u8; 32]),
        );
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.select(Some("good"), Alg::EdDsa).is_ok());
        assert_eq!(set.select(Some("good"), Alg::Es256).unwrap_err(), JwtError::AlgorithmMismatch);
        assert_eq!(set.select(Some("h"), Alg::EdDsa).unwrap_err(), JwtError::UnknownKid);
        assert!(set.select(None, Alg::EdDsa).is_ok());
        assert_eq!(set.select(None, Alg::Rs256).unwrap_err(), JwtError::MissingKid);
    }

    #[test]
    fn kidless_selection_needs_exactly_one_key_of_the_type() {
        let doc = format!(r#"{{"keys":[{},{}]}}"#, ed("a"), ed("b"));
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(set.select(None, Alg::EdDsa).unwrap_err(), JwtError::MissingKid);
    }

    #[test]
    fn bad_documents() {
        for doc in ["", "{", "[]", r#"{"keys":{}}"#, r#"{"keys":[]}"#, r#"{"keys":[{"kty":"oct","k":"AA"}]}"#]
        {
            assert_eq!(parse(doc.as_bytes()).unwrap_err().code(), "invalid_jwks", "{doc}");
        }
        let huge = vec![b' '; MAX_JWKS_BYTES + 1];
        assert_eq!(parse(&huge).unwrap_err().code(), "invalid_jwks");
    }
}
