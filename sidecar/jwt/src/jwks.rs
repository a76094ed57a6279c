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

/// How many skipped keys the warning of a document describes one by one.
const SKIPPED_SHOWN: usize = 5;
/// Longest `kid` the warning shows, in characters (a longer one is cut).
const SHOWN_KID_CHARS: usize = 64;

/// The keys [`parse`] skipped in one document, for its one warning.
#[derive(Debug, Default)]
struct Skipped {
    /// Entries skipped as unusable.
    unusable: usize,
    /// Entries after the [`crate::MAX_JWKS_KEYS`]-th usable key, not looked at.
    beyond_limit: usize,
    /// The first [`SKIPPED_SHOWN`] skipped entries: index, `kid` (cut), reason.
    first: Vec<(usize, Option<String>, &'static str)>,
}

impl Skipped {
    fn add(&mut self, index: usize, kid: Option<&str>, reason: &'static str) {
        if self.first.len() < SKIPPED_SHOWN {
            self.first.push((index, kid.map(|k| k.chars().take(SHOWN_KID_CHARS).collect()), reason));
        }
    }

    /// Logs one warning for the whole document, if anything was skipped.
    fn log(&self, total: usize, kept: usize) {
        if self.unusable + self.beyond_limit > 0 {
            tracing::warn!(
                keys_in_document = total,
                usable_kept = kept,
                skipped = self.unusable + self.beyond_limit,
                unusable = self.unusable,
                beyond_limit = self.beyond_limit,
                first_skipped = ?self.first,
                "JWKS keys skipped (first ones as (index, kid, reason))"
            );
        }
    }
}

/// Parses a JWKS document and keeps its usable signature keys, at most
/// [`crate::MAX_JWKS_KEYS`] of them.
///
/// A key is skipped when it is not for signatures (`use` other than `sig`, `key_ops` without
/// `verify`), is a symmetric (`oct`) key, names an algorithm outside the accepted list or
/// inconsistent with its type or curve, has an RSA modulus outside 2048..=4096 bits, or has
/// malformed components; entries after the [`crate::MAX_JWKS_KEYS`]-th usable key are skipped
/// without being looked at. Whatever the number of skipped keys, one warning per document says
/// how many and gives the first [`SKIPPED_SHOWN`] (index, `kid` cut to [`SHOWN_KID_CHARS`]
/// characters, reason; never key material): a hostile document of half a million entries makes
/// one log line, not half a million. A document with no usable key at all is an error.
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
    let mut keys = Vec::with_capacity(total.min(crate::MAX_JWKS_KEYS));
    let mut skipped = Skipped::default();
    for (index, raw) in doc.keys.into_iter().enumerate() {
        if keys.len() >= crate::MAX_JWKS_KEYS {
            skipped.beyond_limit += 1;
            let kid = raw.get("kid").and_then(serde_json::Value::as_str);
            skipped.add(index, kid, "beyond the limit of usable keys (MAX_JWKS_KEYS)");
            continue;
        }
        let raw: RawJwk = match serde_json::from_value(raw) {
            Ok(raw) => raw,
            Err(_) => {
                skipped.unusable += 1;
                skipped.add(index, None, "not a JWK object with a string kty");
                continue;
            }
        };
        let kid = raw.kid.clone();
        match key_from(raw) {
            Ok(key) => keys.push(key),
            Err(reason) => {
                skipped.unusable += 1;
                skipped.add(index, kid.as_deref(), reason);
            }
        }
    }
    skipped.log(total, keys.len());
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

    /// Counts the `warn` events of the thread it is the default of, and keeps their fields.
    #[derive(Clone, Default)]
    struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl tracing::Subscriber for Warnings {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!("{}={value:?} ", field.name()));
                }
            }
            if *event.metadata().level() == tracing::Level::WARN {
                let mut fields = Fields(String::new());
                event.record(&mut fields);
                self.0.lock().unwrap().push(fields.0);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    fn parse_logged(doc: &str) -> (Result<KeySet, JwtError>, Vec<String>) {
        let warnings = Warnings::default();
        let result = tracing::subscriber::with_default(warnings.clone(), || parse(doc.as_bytes()));
        let logged = warnings.0.lock().unwrap().clone();
        (result, logged)
    }

    /// A hostile document (many bad entries, many keys) makes one warning and at most
    /// `MAX_JWKS_KEYS` keys.
    #[test]
    fn many_keys_make_one_warning_and_at_most_max_jwks_keys() {
        let mut entries: Vec<String> = (0..300).map(|i| format!("{}", i % 3)).collect();
        entries.extend((0..150).map(|i| ed(&format!("k{i}"))));
        let doc = format!(r#"{{"keys":[{}]}}"#, entries.join(","));
        let (set, logged) = parse_logged(&doc);
        let set = set.unwrap();
        assert_eq!(set.len(), crate::MAX_JWKS_KEYS);
        assert!(set.select(Some("k99"), Alg::EdDsa).is_ok());
        assert_eq!(set.select(Some("k100"), Alg::EdDsa).unwrap_err(), JwtError::UnknownKid);
        assert_eq!(logged.len(), 1, "{logged:?}");
        let summary = &logged[0];
        for field in
            ["keys_in_document=450", "usable_kept=100", "skipped=350", "unusable=300", "beyond_limit=50"]
        {
            assert!(summary.contains(field), "{field} in {summary}");
        }
        assert!(summary.contains("(4, None, \"not a JWK object with a string kty\")"), "{summary}");
        assert!(!summary.contains("(5, "), "only the first five skipped keys: {summary}");

        // Keys past the limit are named (by index and kid) when they are among the first five.
        let doc = format!(
            r#"{{"keys":[{}]}}"#,
            (0..=crate::MAX_JWKS_KEYS).map(|i| ed(&format!("k{i}"))).collect::<Vec<_>>().join(",")
        );
        let (set, logged) = parse_logged(&doc);
        assert_eq!(set.unwrap().len(), crate::MAX_JWKS_KEYS);
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(logged[0].contains("(100, Some(\"k100\"), \"beyond the limit"), "{}", logged[0]);

        // A document with nothing usable: one warning too, then the error.
        let doc = format!(r#"{{"keys":[{}]}}"#, vec![r#"{"kty":"oct","k":"AA"}"#; 1000].join(","));
        let (set, logged) = parse_logged(&doc);
        assert_eq!(set.unwrap_err().code(), "invalid_jwks");
        assert_eq!(logged.len(), 1, "{logged:?}");

        // Nothing skipped, nothing logged.
        let (set, logged) = parse_logged(&format!(r#"{{"keys":[{}]}}"#, ed("a")));
        assert_eq!(set.unwrap().len(), 1);
        assert!(logged.is_empty(), "{logged:?}");
    }

    /// A long `kid` is cut in the warning.
    #[test]
    fn long_kids_are_cut_in_the_warning() {
        let kid = "x".repeat(10_000);
        let doc = format!(r#"{{"keys":[{{"kty":"oct","k":"AA","kid":"{kid}"}},{}]}}"#, ed("a"));
        let (set, logged) = parse_logged(&doc);
        assert_eq!(set.unwrap().len(), 1);
        assert_eq!(logged.len(), 1);
        let shown = format!("Some(\"{}\")", "x".repeat(SHOWN_KID_CHARS));
        assert!(logged[0].contains(&shown), "warning of {} bytes", logged[0].len());
        assert!(logged[0].len() < 1000, "warning of {} bytes", logged[0].len());
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
