//! Bearer token authentication of `/v1/*`: the token lives in a file (a Kubernetes Secret),
//! is re-read whenever the file changes, and is compared in constant time. It authorises
//! everything ([`Scope::All`]); a namespace token derived from it
//! ([`custos_api::collector::namespace_token`]) authorises one namespace's ingest and usage
//! ([`Scope::Namespace`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, reason};

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not a usable token (never quoted).
    #[error("the token file {path} {what}")]
    Invalid {
        /// The token file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
}

/// What identifies a version of the token file: when the file is replaced or rewritten, one of
/// these changes (a Kubernetes Secret update swaps a symlink: new inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Version { modified: meta.modified().ok(), len: meta.len(), inode }
    }
}

struct Cached {
    version: Version,
    digest: [u8; 32],
    /// The token itself: the key of the namespace tokens.
    token: std::sync::Arc<str>,
}

/// What a request's token may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The collector token: everything.
    All,
    /// A namespace token: send this namespace's events and read its usage.
    Namespace(String),
}

/// The expected bearer token, kept as its SHA-256 digest.
pub(crate) struct TokenAuth {
    path: PathBuf,
    cache: Mutex<Cached>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth").field("path", &self.path).finish_non_exhaustive()
    }
}

fn read_token(path: &Path) -> Result<(Version, [u8; 32], std::sync::Arc<str>), TokenError> {
    let read_error = |source| TokenError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    let raw = std::fs::read(path).map_err(read_error)?;
    let invalid = |what| TokenError::Invalid { path: path.to_path_buf(), what };
    let text = std::str::from_utf8(&raw).map_err(|_| invalid("is not UTF-8"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid("is empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("holds whitespace or control characters inside the token"));
    }
    Ok((Version::of(&meta), digest(token.as_bytes()), token.into()))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares two digests without an early exit: the time taken does not depend on where they
/// differ. Comparing digests rather than tokens also hides the token's length.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token presented in `Authorization: Bearer <token>`.
fn presented(headers: &HeaderMap) -> Result<&[u8], ApiError> {
    let unauthorized = |r: &'static str, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, r, msg);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(reason::MISSING_TOKEN, "unauthorized"));
    };
    let bytes = value.as_bytes();
    let (scheme, rest) = match bytes.iter().position(|b| *b == b' ') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(unauthorized(reason::INVALID_TOKEN, "unauthorized"));
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(unauthorized(reason::MISSING_TOKEN, "unauthorized"));
    }
    Ok(token)
}

impl TokenAuth {
    /// Reads the token file; fails when it cannot be read or is empty.
    pub(crate) fn load(path: PathBuf) -> Result<Self, TokenError> {
        let (version, digest, token) = read_token(&path)?;
        Ok(TokenAuth { path, cache: Mutex::new(Cached { version, digest, token }) })
    }

    /// Checks the request's bearer token against the file's current token, or against the
    /// namespace token it claims to be.
    ///
    /// When the file can no longer be read (or holds no token), nothing is authenticated
    /// (503 `token_unavailable`): fail closed rather than keep a token that may be revoked.
    pub(crate) async fn check(&self, headers: &HeaderMap) -> Result<Scope, ApiError> {
        let token = presented(headers)?;
        let (expected, key) = self.current().await?;
        if constant_time_eq(&digest(token), &expected) {
            return Ok(Scope::All);
        }
        if let Some((namespace, mac)) =
            std::str::from_utf8(token).ok().and_then(custos_api::collector::parse_namespace_token)
            && constant_time_eq(&mac, &custos_api::collector::namespace_mac(&key, namespace))
        {
            return Ok(Scope::Namespace(namespace.to_owned()));
        }
        Err(ApiError::new(StatusCode::UNAUTHORIZED, reason::INVALID_TOKEN, "unauthorized"))
    }

    /// The digest of the file's token and the token, re-read when the file changed.
    async fn current(&self) -> Result<([u8; 32], std::sync::Arc<str>), ApiError> {
        let unavailable = |error: &TokenError| {
            tracing::error!(%error, "the collector token file cannot be used: refusing every request");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                reason::TOKEN_UNAVAILABLE,
                "the collector cannot read its token file",
            )
        };
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|source| unavailable(&TokenError::Read { path: self.path.clone(), source }))?;
        let version = Version::of(&meta);
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.version == version && version.modified.is_some() {
                return Ok((cache.digest, cache.token.clone()));
            }
        }
        let path = self.path.clone();
        let (version, digest, token) = tokio::task::spawn_blocking(move || read_token(&path))
            .await
            .map_err(|e| ApiError::internal(format!("token task failed: {e}")))?
            .map_err(|e| unavailable(&e))?;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.digest != digest {
            tracing::info!(path = %self.path.display(), "collector token file changed: new token in use");
        }
        *cache = Cached { version, digest, token: token.clone() };
        Ok((digest, token))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = digest(b"secret");
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(presented(&headers(Some("Bearer abc"))).unwrap(), b"abc");
        assert_eq!(presented(&headers(Some("bearer   abc "))).unwrap(), b"abc");
        assert_eq!(presented(&headers(None)).unwrap_err().reason(), reason::MISSING_TOKEN);
        assert_eq!(presented(&headers(Some("Bearer "))).unwrap_err().reason(), reason::MISSING_TOKEN);
        assert_eq!(presented(&headers(Some("Basic abc"))).unwrap_err().reason(), reason::INVALID_TOKEN);
    }

    #[tokio::test]
    async fn rotated_token_file_is_picked_up_and_unreadable_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let auth = TokenAuth::load(path.clone()).unwrap();
        auth.check(&headers(Some("Bearer first"))).await.unwrap();
        assert_eq!(
            auth.check(&headers(Some("Bearer second"))).await.unwrap_err().reason(),
            reason::INVALID_TOKEN
        );
        // Replaced the way a Secret update does it: a new file renamed over the old one.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        auth.check(&headers(Some("Bearer second-token"))).await.unwrap();
        assert!(auth.check(&headers(Some("Bearer first"))).await.is_err());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            auth.check(&headers(Some("Bearer second-token"))).await.unwrap_err().reason(),
            reason::TOKEN_UNAVAILABLE
        );
    }

    #[test]
    fn empty_or_multi_word_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(TokenAuth::load(path.clone()), Err(TokenError::Invalid { .. })));
        std::fs::write(&path, "two words").unwrap();
        assert!(matches!(TokenAuth::load(path.clone()), Err(TokenError::Invalid { .. })));
        assert!(matches!(TokenAuth::load(dir.path().join("missing")), Err(TokenError::Read { .. })));
    }
}
