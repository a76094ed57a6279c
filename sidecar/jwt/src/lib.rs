//! Custos sidecar: end-user identity from JWT bearer tokens verified against a JWKS (file or
//! URL).
//!
//! A [`Verifier`] checks the `Authorization: Bearer <JWT>` value of a request and maps the
//! token's claims to a [`custos_policy::User`], as the policy's
//! [`custos_api::policy::UserIdentity`] says.
//!
//! # What is verified
//! - Structure: a compact JWS of three base64url segments, at most [`MAX_TOKEN_LEN`] bytes
//!   (larger tokens are refused before parsing).
//! - Algorithm: only RS256, RS384, RS512, PS256, ES256, ES384 and EdDSA. `none` and every HMAC
//!   algorithm are refused outright, so an HS256 token "signed" with the RSA public key (the
//!   classic confusion attack) never reaches a verifier. The algorithm is taken from the key:
//!   the JWK's `alg` if it has one, else its type (`RSA` → the four RSA algorithms, `EC` →
//!   ES256 for P-256 and ES384 for P-384, `OKP`/Ed25519 → EdDSA), and the header's `alg` must
//!   match it.
//! - Key: by `kid`. A token without `kid` is tried only when the key set holds exactly one key
//!   of the algorithm's type. Keys named by the token itself (`jku`, `x5u`, `jwk`) are ignored;
//!   tokens with `crit` are refused.
//! - Claims: `exp` (required), `nbf` (when present) with the leeway; `iss` equal to the
//!   issuer; `aud` (string or array) naming at least one of the audiences (so with no
//!   audiences configured, no token is accepted); `iat` is ignored.
//!
//! # Claims → user
//! The id is the `id_claim` (default `sub`) and must be a non-empty string. Each attribute
//! maps from one top-level claim: a string as it is, a number or boolean as its JSON text
//! (`42`, `true`), an array of exactly one of those as that one (`["clerk"]` → `clerk`, as
//! Keycloak and Azure AD send roles); a missing or null claim or an empty array leaves the
//! attribute absent. An array of several elements (or of a null, an array or an object) and
//! an object refuse the token ([`JwtError::UnusableClaim`]): an attribute holds one value, and
//! leaving it absent would make a `Deny` rule on it fail open.
//!
//! # Keys
//! - [`JwksSource::File`] (the operator mounts the Secret): read at construction; afterwards
//!   its metadata (inode, size, mtime) is looked at by [`Verifier::verify`] at most once per
//!   second, and the file is re-read when it changed. A bad new file keeps the previous keys
//!   and logs a warning (never the contents). The look (`stat`) and the read are plain
//!   blocking file calls on the calling task: microseconds on the Secret's tmpfs, once per
//!   second at most.
//! - [`JwksSource::Url`]: fetched with the time-out, at most one fetch at a time. The first
//!   fetch happens on [`Verifier::start`] or on the first verification; afterwards every
//!   `refresh` (by the task [`Verifier::start`] spawns, or else by a background fetch a
//!   verification triggers once the keys are stale). An unknown `kid` triggers a fetch at
//!   most once per 10 s, so unknown kids cannot cause a fetch storm. Until the first successful
//!   fetch, verification fails with [`JwtError::JwksUnavailable`] (503, not 401: see
//!   [`JwtError::is_client_error`]).
//!   Bodies are limited to 1 MiB (after decompression); redirects only to https, at most 3.
//!   TLS: reqwest's rustls with the ring provider, installed as the process default if none is
//!   (reqwest is built with `rustls-no-provider`); certificates are checked against the
//!   system trust store by `rustls-platform-verifier`, so the sidecar image must carry CA
//!   certificates (or set `SSL_CERT_FILE`).
//! - [`JwksSource::Static`]: a JWKS document given inline.
//!
//! Keys that cannot be used for these algorithms (HMAC `oct` keys, encryption keys, RSA keys
//! below 2048 bits, other curves), and usable keys beyond the first [`MAX_JWKS_KEYS`], are
//! skipped, with one warning per document (how many, and the first few by index, `kid` and
//! reason); a document with no usable key is rejected. URLs are logged without their user
//! info, query and fragment (they may carry credentials).
#![forbid(unsafe_code)]

mod claims;
mod error;
mod jwks;
mod source;
mod token;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custos_api::policy::UserIdentity;
use custos_policy::User;

pub use error::JwtError;
pub use token::{MAX_TOKEN_LEN, bearer_token};

use source::{FileWatch, Keys, Remote};

/// Default allowed clock skew for `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default claim holding the user id.
pub const DEFAULT_ID_CLAIM: &str = "sub";
/// Longest user id accepted (bytes): the audit event's principal is `user:<id>`, which the
/// collector indexes and bounds at 1 KiB.
pub const MAX_ID_BYTES: usize = 256;
/// Longest attribute value accepted (bytes).
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;
/// Most usable keys kept from one JWKS document: keys beyond are skipped (and counted in the
/// document's one warning). Identity providers publish a handful (current, next, previous);
/// the bound keeps a hostile or broken document from filling memory and the key search.
pub const MAX_JWKS_KEYS: usize = 100;
/// Default interval between JWKS URL fetches.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Default time-out of one JWKS URL fetch (connect, headers and body).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a token must satisfy and how its claims map to a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierSettings {
    /// The accepted `iss`, compared exactly.
    pub issuer: String,
    /// The accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Allowed clock skew for `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim holding the user id (a non-empty string).
    pub id_claim: String,
    /// attribute name → claim name.
    pub attributes: BTreeMap<String, String>,
}

impl VerifierSettings {
    /// The settings a policy's `identity.users` gives: leeway 30 s and id claim `sub` unless
    /// set (an empty `idClaim` also means `sub`).
    pub fn from_identity(identity: &UserIdentity) -> Self {
        VerifierSettings {
            issuer: identity.jwt.issuer.clone(),
            audiences: identity.jwt.audiences.clone(),
            leeway: identity.jwt.leeway_seconds.map_or(DEFAULT_LEEWAY, |s| Duration::from_secs(s.into())),
            id_claim: identity
                .id_claim
                .clone()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| DEFAULT_ID_CLAIM.to_owned()),
            attributes: identity.attributes.clone(),
        }
    }
}

/// Where the JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file (the mounted Secret), re-read when it changes.
    File(PathBuf),
    /// A JWKS URL (https, or http on loopback), fetched and cached.
    Url {
        /// The URL.
        url: String,
        /// Interval between fetches.
        refresh: Duration,
        /// Time-out of one fetch.
        timeout: Duration,
    },
    /// A JWKS document, as JSON text.
    Static(String),
}

impl JwksSource {
    /// A URL source with [`DEFAULT_REFRESH`] and [`DEFAULT_FETCH_TIMEOUT`].
    pub fn url(url: impl Into<String>) -> Self {
        JwksSource::Url { url: url.into(), refresh: DEFAULT_REFRESH, timeout: DEFAULT_FETCH_TIMEOUT }
    }
}

enum Source {
    Static,
    File(FileWatch),
    Url(Remote),
}

struct Inner {
    settings: VerifierSettings,
    keys: Keys,
    source: Source,
    started: AtomicBool,
}

/// Verifies bearer tokens and maps them to users. Cheap to clone (one `Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Verifier");
        d.field("issuer", &self.inner.settings.issuer);
        match &self.inner.source {
            Source::Static => d.field("jwks", &"static"),
            Source::File(w) => d.field("jwks_file", &w.path()),
            Source::Url(r) => d.field("jwks_uri", &r.shown_url()),
        };
        d.field("keys", &self.key_count()).finish()
    }
}

impl Verifier {
    /// A verifier for these settings and keys. A file or static JWKS is read and checked now;
    /// a URL is only checked (it is fetched by [`Verifier::start`] or the first verification).
    ///
    /// # Errors
    /// [`JwtError::InvalidSettings`] (empty issuer or id claim, bad URL, zero refresh or
    /// time-out), [`JwtError::JwksFile`] (unreadable file), [`JwtError::InvalidJwks`].
    pub fn new(settings: VerifierSettings, source: JwksSource) -> Result<Verifier, JwtError> {
        if settings.issuer.is_empty() {
            return Err(JwtError::InvalidSettings("issuer is empty".into()));
        }
        if settings.id_claim.is_empty() {
            return Err(JwtError::InvalidSettings("id claim is empty".into()));
        }
        if settings.audiences.is_empty() {
            tracing::warn!(issuer = %settings.issuer, "no JWT audiences configured: every token will be refused");
        }
        let keys = Keys::default();
        let source = match source {
            JwksSource::Static(json) => {
                source::store(&keys, jwks::parse(json.as_bytes())?);
                Source::Static
            }
            JwksSource::File(path) => Source::File(FileWatch::open(path, &keys)?),
            JwksSource::Url { url, refresh, timeout } => Source::Url(Remote::new(&url, refresh, timeout)?),
        };
        Ok(Verifier { inner: Arc::new(Inner { settings, keys, source, started: AtomicBool::new(false) }) })
    }

    /// The settings.
    pub fn settings(&self) -> &VerifierSettings {
        &self.inner.settings
    }

    /// The number of usable keys, or `None` while the JWKS was never loaded.
    pub fn key_count(&self) -> Option<usize> {
        source::current(&self.inner.keys).map(|k| k.len())
    }

    /// For a URL source: spawns (once) the task that fetches the JWKS now and then every
    /// `refresh` (every 10 s at most after a failure). The task ends when the last clone of
    /// the verifier is dropped. Returns `None` for other sources, when already started, or
    /// outside a tokio runtime.
    pub fn start(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !matches!(self.inner.source, Source::Url(_)) {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return None;
        }
        let weak = Arc::downgrade(&self.inner);
        Some(runtime.spawn(async move {
            loop {
                let delay = {
                    let Some(inner) = weak.upgrade() else { return };
                    let Source::Url(remote) = &inner.source else { return };
                    let result = remote.fetch_now(&inner.keys).await;
                    if let Err(error) = &result {
                        tracing::warn!(url = %remote.shown_url(), %error, "JWKS refresh failed; keeping the previous keys");
                    }
                    remote.next_delay(result.is_ok())
                };
                tokio::time::sleep(delay).await;
            }
        }))
    }

    /// Reloads the JWKS now: re-reads the file or fetches the URL, bypassing the intervals.
    /// Returns the number of usable keys. On error the previous keys stay.
    ///
    /// # Errors
    /// Why the new JWKS could not be loaded.
    pub async fn refresh(&self) -> Result<usize, JwtError> {
        match &self.inner.source {
            Source::Static => Ok(self.key_count().unwrap_or(0)),
            Source::File(watch) => watch.force_reload(&self.inner.keys),
            Source::Url(remote) => remote.fetch_now(&self.inner.keys).await,
        }
    }

    /// Verifies an `Authorization` header value (`Bearer <JWT>`) at the current time.
    ///
    /// # Errors
    /// Why the token is refused ([`JwtError::is_client_error`]: 401), or
    /// [`JwtError::JwksUnavailable`] (503).
    pub async fn verify(&self, authorization_header_value: &[u8]) -> Result<User, JwtError> {
        self.verify_at(authorization_header_value, SystemTime::now()).await
    }

    /// [`Verifier::verify`] with an explicit clock for `exp` and `nbf`.
    ///
    /// # Errors
    /// As [`Verifier::verify`].
    pub async fn verify_at(
        &self,
        authorization_header_value: &[u8],
        now: SystemTime,
    ) -> Result<User, JwtError> {
        let token = bearer_token(authorization_header_value)?;
        let parsed = token::parse(token)?;
        let issued_here = || claims::issued_by(&parsed.payload, &self.inner.settings);
        let keys = self.keys_for(parsed.kid.as_deref(), parsed.alg, issued_here).await?;
        let key = keys.select(parsed.kid.as_deref(), parsed.alg)?;
        match jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.signing_input.as_bytes(),
            &key.key,
            parsed.alg.to_jsonwebtoken(),
        ) {
            Ok(true) => {}
            Ok(false) => return Err(JwtError::InvalidSignature),
            Err(error) => {
                tracing::debug!(%error, "JWT signature check failed");
                return Err(JwtError::InvalidSignature);
            }
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        claims::validate(&parsed.payload, &self.inner.settings, now)
    }

    /// Whether an `Authorization` header value (`Bearer <JWT>`) holds a token whose `iss`
    /// claim names this verifier's issuer. Nothing is verified (no signature, no time): this
    /// only tells which of several verifiers' refusals to report (the one of the issuer the
    /// token names), never whether to accept it. `false` when the value or the token cannot
    /// be parsed.
    pub fn names_issuer(&self, authorization_header_value: &[u8]) -> bool {
        bearer_token(authorization_header_value)
            .and_then(token::parse)
            .is_ok_and(|parsed| claims::issued_by(&parsed.payload, &self.inner.settings))
    }

    /// The key set to verify a token with this `kid`/`alg` against: reloads a changed file,
    /// fetches a never-loaded URL, and refetches (rate-limited) on an unknown `kid`. Before
    /// waiting for a fetch, `issued_here` is asked whether the token (not yet verified)
    /// names this verifier's issuer: a token of another issuer is refused at once, rather
    /// than after a fetch its keys could never be in (a pod whose policies trust several
    /// issuers tries each).
    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: token::Alg,
        issued_here: impl Fn() -> bool,
    ) -> Result<Arc<jwks::KeySet>, JwtError> {
        let inner = &self.inner;
        match &inner.source {
            Source::Static => {}
            Source::File(watch) => watch.maybe_reload(&inner.keys),
            Source::Url(remote) => {
                if source::current(&inner.keys).is_none() {
                    if !issued_here() {
                        return Err(JwtError::InvalidIssuer);
                    }
                    remote.fetch_limited(&inner.keys).await;
                } else if !inner.started.load(Ordering::Relaxed) && remote.claim_background_refresh() {
                    // With the periodic task running, it refreshes; otherwise one task does.
                    self.refresh_in_background();
                }
            }
        }
        let keys = source::current(&inner.keys).ok_or(JwtError::JwksUnavailable)?;
        if let (Source::Url(remote), Err(JwtError::UnknownKid)) = (&inner.source, keys.select(kid, alg)) {
            if !issued_here() {
                return Err(JwtError::InvalidIssuer);
            }
            remote.fetch_limited(&inner.keys).await;
            return source::current(&inner.keys).ok_or(JwtError::JwksUnavailable);
        }
        Ok(keys)
    }

    /// Runs the claimed background refresh without waiting for it (stale keys keep serving).
    fn refresh_in_background(&self) {
        let Source::Url(remote) = &self.inner.source else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nothing will run it: free the claim.
            remote.release_background_refresh();
            return;
        };
        let inner = Arc::clone(&self.inner);
        runtime.spawn(async move {
            if let Source::Url(remote) = &inner.source {
                remote.refresh_stale(&inner.keys).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn static_verifier(issuer: &str) -> Verifier {
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k","x":"{}"}}]}}"#,
            URL_SAFE_NO_PAD.encode([7u8; 32])
        );
        let settings = VerifierSettings {
            issuer: issuer.into(),
            audiences: vec!["api".into()],
            leeway: DEFAULT_LEEWAY,
            id_claim: DEFAULT_ID_CLAIM.into(),
            attributes: BTreeMap::new(),
        };
        Verifier::new(settings, JwksSource::Static(jwks)).unwrap()
    }

    /// `names_issuer` reads the `iss` of a token that is not verified (the signature here is
    /// garbage) and says `false` for anything it cannot parse.
    #[test]
    fn names_issuer_reads_the_unverified_iss() {
        let v = static_verifier("https://a.example");
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let header = b64(r#"{"alg":"EdDSA","kid":"k"}"#);
        let bearer = |payload: &str| format!("Bearer {header}.{}.c2ln", b64(payload)).into_bytes();
        assert!(v.names_issuer(&bearer(r#"{"iss":"https://a.example","exp":1}"#)));
        assert!(v.names_issuer(&bearer(r#"{"iss":"https://a.example"}"#)));
        for payload in [r#"{"iss":"https://b.example"}"#, "{}", r#"{"iss":7}"#, r#"{"iss":null}"#, "[]", "x"]
        {
            assert!(!v.names_issuer(&bearer(payload)), "{payload}");
        }
        let payload = b64(r#"{"iss":"https://a.example"}"#);
        for value in [
            format!("Basic {header}.{payload}.c2ln"),
            format!("Bearer {header}.{payload}"),
            format!("Bearer {}.{payload}.c2ln", b64(r#"{"alg":"HS256"}"#)),
            format!("Bearer {header}.{payload}."),
            "Bearer".to_owned(),
            String::new(),
        ] {
            assert!(!v.names_issuer(value.as_bytes()), "{value}");
        }
        assert!(
            !static_verifier("https://b.example").names_issuer(&bearer(r#"{"iss":"https://a.example"}"#))
        );
    }

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn verifier_is_send_sync_clone() {
        assert_send_sync::<Verifier>();
    }

    /// `Debug` shows a JWKS URL without the credentials it may carry.
    #[test]
    fn debug_hides_url_credentials() {
        let settings = static_verifier("https://a.example").settings().clone();
        let url = "https://svc:pa55@idp.example:8443/realms/r/jwks?api_key=s3cret#frag";
        let v = Verifier::new(settings, JwksSource::url(url)).unwrap();
        let debug = format!("{v:?}");
        assert!(debug.contains(r#"jwks_uri: "https://idp.example:8443/realms/r/jwks""#), "{debug}");
        for secret in ["svc", "pa55", "api_key", "s3cret", "frag"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }

    #[test]
    fn settings_from_identity_defaults() {
        let identity: UserIdentity = match serde_json::from_value(serde_json::json!({
            "jwt": {"issuer": "https://sso", "audiences": ["a"], "jwksUri": "https://sso/jwks"},
            "attributes": {"branch": "branch_id"}
        })) {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        };
        let s = VerifierSettings::from_identity(&identity);
        assert_eq!(s.leeway, DEFAULT_LEEWAY);
        assert_eq!(s.id_claim, "sub");
        assert_eq!(s.audiences, ["a"]);
        assert_eq!(s.attributes.get("branch").map(String::as_str), Some("branch_id"));
    }
}
