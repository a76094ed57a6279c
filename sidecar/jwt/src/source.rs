//! Where the keys come from: a watched file or a fetched URL.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::JwtError;
use crate::jwks::{self, KeySet, MAX_JWKS_BYTES};

/// The current keys: `None` until a JWKS was loaded once.
pub(crate) type Keys = RwLock<Option<Arc<KeySet>>>;

/// Stores a newly loaded key set.
pub(crate) fn store(keys: &Keys, set: KeySet) -> usize {
    let len = set.len();
    let set = Some(Arc::new(set));
    match keys.write() {
        Ok(mut guard) => *guard = set,
        Err(poisoned) => *poisoned.into_inner() = set,
    }
    len
}

/// The current keys.
pub(crate) fn current(keys: &Keys) -> Option<Arc<KeySet>> {
    match keys.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often the JWKS file's metadata is looked at, at most.
pub(crate) const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of the JWKS file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    dev_ino: (u64, u64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            dev_ino: (meta.dev(), meta.ino()),
        }
    }
}

/// A JWKS file (a mounted Secret), re-read when its metadata changes.
///
/// kubelet updates Secret volumes by swapping a symlink, so the path's metadata (which follows
/// the symlink) changes inode, size or mtime; plain in-place edits change mtime and size.
pub(crate) struct FileWatch {
    path: PathBuf,
    base: Instant,
    /// Milliseconds after `base` before which the file is not looked at again.
    next_check_ms: AtomicU64,
    /// The version of the file last read (good or bad).
    seen: Mutex<Option<Fingerprint>>,
}

impl FileWatch {
    /// Reads the file now; an unreadable or invalid file is an error.
    pub(crate) fn open(path: PathBuf, keys: &Keys) -> Result<FileWatch, JwtError> {
        let watch = FileWatch {
            path,
            base: Instant::now(),
            next_check_ms: AtomicU64::new(millis(FILE_CHECK_INTERVAL)),
            seen: Mutex::new(None),
        };
        watch.reload(&mut lock(&watch.seen), keys, true)?;
        Ok(watch)
    }

    /// The watched path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Looks at the file if the last look was at least [`FILE_CHECK_INTERVAL`] ago and reloads
    /// it if it changed. Cheap when nothing is due (one atomic load); one `stat` per interval
    /// otherwise. A bad new file keeps the current keys and logs a warning.
    pub(crate) fn maybe_reload(&self, keys: &Keys) {
        let now = millis(self.base.elapsed());
        if now < self.next_check_ms.load(Ordering::Relaxed) {
            return;
        }
        // Someone else is looking right now: use the current keys.
        let Ok(mut seen) = self.seen.try_lock() else { return };
        if now < self.next_check_ms.load(Ordering::Relaxed) {
            return;
        }
        self.next_check_ms.store(now + millis(FILE_CHECK_INTERVAL), Ordering::Relaxed);
        if let Err(error) = self.reload(&mut seen, keys, false) {
            tracing::warn!(path = %self.path.display(), %error, "JWKS file rejected; keeping the previous keys");
        }
    }

    /// Re-reads the file now, whatever its metadata says.
    pub(crate) fn force_reload(&self, keys: &Keys) -> Result<usize, JwtError> {
        let result = self.reload(&mut lock(&self.seen), keys, true);
        self.next_check_ms
            .store(millis(self.base.elapsed()) + millis(FILE_CHECK_INTERVAL), Ordering::Relaxed);
        result
    }

    fn reload(&self, seen: &mut Option<Fingerprint>, keys: &Keys, force: bool) -> Result<usize, JwtError> {
        let file_error =
            |e: std::io::Error| JwtError::JwksFile { path: self.path.clone(), reason: e.to_string() };
        let meta = std::fs::metadata(&self.path).map_err(file_error)?;
        let fingerprint = Fingerprint::of(&meta);
        if !force && *seen == Some(fingerprint) {
            return Ok(current(keys).map_or(0, |k| k.len()));
        }
        // Remember this version even if it is bad, so that it is not re-parsed (and re-logged)
        // every second; the next change is picked up.
        *seen = Some(fingerprint);
        let mut bytes = Vec::new();
        std::fs::File::open(&self.path)
            .and_then(|f| f.take(MAX_JWKS_BYTES as u64 + 1).read_to_end(&mut bytes))
            .map_err(file_error)?;
        let set = jwks::parse(&bytes)?;
        let len = store(keys, set);
        tracing::info!(path = %self.path.display(), keys = len, "JWKS file loaded");
        Ok(len)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How often an unknown `kid` (or a never-loaded JWKS) may trigger a fetch, at most.
pub(crate) const ON_DEMAND_FETCH_INTERVAL: Duration = Duration::from_secs(10);

/// After a failed periodic fetch, the next one comes after this (or `refresh`, if shorter).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct RemoteState {
    /// When the last on-demand fetch started: the rate limit.
    last_on_demand: Option<Instant>,
    last_success: Option<Instant>,
    /// Fetches started so far (any kind).
    attempts: u64,
    /// A background refresh of stale keys is queued or running (at most one at a time).
    background: bool,
}

/// Whether a rate-limited fetch may start at `now`.
pub(crate) fn may_fetch(last_attempt: Option<Instant>, now: Instant, min_interval: Duration) -> bool {
    last_attempt.is_none_or(|last| now.saturating_duration_since(last) >= min_interval)
}

/// A URL as logs and `Debug` show it: scheme, host, port and path only. The user info
/// (`https://user:pass@idp/...`), the query (`?api_key=...`) and the fragment may carry
/// credentials and are left out.
pub(crate) fn redacted(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if let Some(host) = url.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// A JWKS URL, fetched with a time-out and cached.
pub(crate) struct Remote {
    url: reqwest::Url,
    /// [`redacted`] `url`: what logs show.
    shown: String,
    pub(crate) refresh: Duration,
    timeout: Duration,
    /// Built on first use; a failed build is retried on the next fetch.
    client: OnceLock<reqwest::Client>,
    /// Held during a fetch: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    state: Mutex<RemoteState>,
}

impl Remote {
    pub(crate) fn new(url: &str, refresh: Duration, timeout: Duration) -> Result<Remote, JwtError> {
        let parsed =
            reqwest::Url::parse(url).map_err(|_| JwtError::InvalidSettings("jwksUri is not a URL".into()))?;
        if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && is_loopback(&parsed))) {
            return Err(JwtError::InvalidSettings(
                "jwksUri must be an https:// URL (plain http only for localhost)".into(),
            ));
        }
        if timeout.is_zero() || refresh.is_zero() {
            return Err(JwtError::InvalidSettings("JWKS refresh and timeout must be positive".into()));
        }
        Ok(Remote {
            shown: redacted(&parsed),
            url: parsed,
            refresh,
            timeout,
            client: OnceLock::new(),
            fetching: tokio::sync::Mutex::new(()),
            state: Mutex::new(RemoteState::default()),
        })
    }

    /// The URL as logs show it: without user info, query and fragment ([`redacted`]).
    pub(crate) fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Whether the keys are older than `refresh` (or were never fetched).
    fn old(&self, state: &RemoteState, now: Instant) -> bool {
        state.last_success.is_none_or(|t| now.saturating_duration_since(t) >= self.refresh)
    }

    /// When the keys are old, a rate-limited fetch may start now and no background refresh
    /// is queued or running: claims the one background refresh and returns true (the caller
    /// then runs [`Remote::refresh_stale`]). However many requests see stale keys, one task.
    pub(crate) fn claim_background_refresh(&self) -> bool {
        let mut state = lock(&self.state);
        let now = Instant::now();
        let due = self.old(&state, now) && may_fetch(state.last_on_demand, now, ON_DEMAND_FETCH_INTERVAL);
        if !due || state.background {
            return false;
        }
        state.background = true;
        true
    }

    /// Frees the claim of [`Remote::claim_background_refresh`].
    pub(crate) fn release_background_refresh(&self) {
        lock(&self.state).background = false;
    }

    /// The background refresh claimed by [`Remote::claim_background_refresh`]: fetches unless
    /// another fetch has made the keys fresh meanwhile (a periodic or forced one it queued
    /// behind), then frees the claim.
    pub(crate) async fn refresh_stale(&self, keys: &Keys) {
        /// Frees the claim however the refresh ends (also when its task is cancelled).
        struct Release<'a>(&'a Remote);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.release_background_refresh();
            }
        }
        let _release = Release(self);
        let _one = self.fetching.lock().await;
        {
            let mut state = lock(&self.state);
            let now = Instant::now();
            if !self.old(&state, now) || !may_fetch(state.last_on_demand, now, ON_DEMAND_FETCH_INTERVAL) {
                return;
            }
            state.last_on_demand = Some(now);
            state.attempts += 1;
        }
        if let Err(error) = self.fetch_and_store(keys).await {
            tracing::warn!(url = %self.shown, %error, "JWKS fetch failed; keeping the previous keys");
        }
    }

    /// An on-demand fetch (unknown `kid`, never-loaded or stale keys): starts one unless
    /// another on-demand fetch started less than [`ON_DEMAND_FETCH_INTERVAL`] ago (periodic
    /// and forced fetches do not count). Either way, a fetch already running is waited for,
    /// so that its result is used; callers that queued behind a fetch do not fetch again.
    pub(crate) async fn fetch_limited(&self, keys: &Keys) {
        let seen = {
            let state = lock(&self.state);
            may_fetch(state.last_on_demand, Instant::now(), ON_DEMAND_FETCH_INTERVAL)
                .then_some(state.attempts)
        };
        let one = self.fetching.lock().await;
        let Some(seen) = seen else { return };
        {
            let mut state = lock(&self.state);
            let now = Instant::now();
            if state.attempts != seen || !may_fetch(state.last_on_demand, now, ON_DEMAND_FETCH_INTERVAL) {
                return;
            }
            state.last_on_demand = Some(now);
            state.attempts += 1;
        }
        if let Err(error) = self.fetch_and_store(keys).await {
            tracing::warn!(url = %self.shown, %error, "JWKS fetch failed; keeping the previous keys");
        }
        drop(one);
    }

    /// Fetches now, whatever the rate limit says (the periodic refresh and
    /// [`crate::Verifier::refresh`]).
    pub(crate) async fn fetch_now(&self, keys: &Keys) -> Result<usize, JwtError> {
        let _one = self.fetching.lock().await;
        lock(&self.state).attempts += 1;
        self.fetch_and_store(keys).await
    }

    /// The delay before the next periodic fetch, after one that succeeded or not.
    pub(crate) fn next_delay(&self, succeeded: bool) -> Duration {
        if succeeded { self.refresh } else { self.refresh.min(RETRY_AFTER_FAILURE) }
    }

    async fn fetch_and_store(&self, keys: &Keys) -> Result<usize, JwtError> {
        let client = match self.client.get() {
            Some(client) => client.clone(),
            None => {
                let client = build_client(self.timeout).map_err(JwtError::JwksFetch)?;
                self.client.get_or_init(|| client).clone()
            }
        };
        let bytes = tokio::time::timeout(self.timeout, fetch(&client, &self.url))
            .await
            .map_err(|_| JwtError::JwksFetch(format!("timed out after {:?}", self.timeout)))??;
        let set = jwks::parse(&bytes)?;
        let len = store(keys, set);
        lock(&self.state).last_success = Some(Instant::now());
        tracing::info!(url = %self.shown, keys = len, "JWKS fetched");
        Ok(len)
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Builds the HTTP client.
///
/// reqwest is compiled with `rustls-no-provider`: it panics when it builds a client while no
/// rustls crypto provider is installed. The ring provider is installed as the process default
/// first (if another provider is already installed, that one is used). Server certificates
/// are checked by `rustls-platform-verifier`, i.e. against the system's trust store
/// (`/etc/ssl/certs`, or `SSL_CERT_FILE`): the sidecar image must ship CA certificates.
/// Redirects are followed (at most 3) only to https URLs.
fn build_client(timeout: Duration) -> Result<reqwest::Client, String> {
    // Err means "a provider is already installed": fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        // `previous` holds the URL first asked for too: 3 redirects make 4.
        if attempt.previous().len() > 3 {
            attempt.error("too many redirects")
        } else if attempt.url().scheme() != "https" {
            attempt.error("redirect to a non-https URL")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(redirects)
        .user_agent(concat!("custos-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// GETs the URL and returns the body, at most [`MAX_JWKS_BYTES`] (after decompression).
async fn fetch(client: &reqwest::Client, url: &reqwest::Url) -> Result<Vec<u8>, JwtError> {
    let fetch_error = |e: reqwest::Error| JwtError::JwksFetch(e.without_url().to_string());
    let mut response = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(fetch_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(JwtError::JwksFetch(format!("HTTP status {}", status.as_u16())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(JwtError::InvalidJwks(format!("larger than {MAX_JWKS_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rate_limit_window() {
        let t0 = Instant::now();
        assert!(may_fetch(None, t0, ON_DEMAND_FETCH_INTERVAL));
        assert!(!may_fetch(Some(t0), t0, ON_DEMAND_FETCH_INTERVAL));
        assert!(!may_fetch(Some(t0), t0 + Duration::from_millis(9_999), ON_DEMAND_FETCH_INTERVAL));
        assert!(may_fetch(Some(t0), t0 + ON_DEMAND_FETCH_INTERVAL, ON_DEMAND_FETCH_INTERVAL));
    }

    #[test]
    fn redacted_urls_keep_scheme_host_port_and_path_only() {
        let shown = |u: &str| redacted(&reqwest::Url::parse(u).unwrap());
        assert_eq!(shown("https://user:pa55@idp.example/realms/x/jwks"), "https://idp.example/realms/x/jwks");
        assert_eq!(shown("https://user@idp.example:8443/jwks"), "https://idp.example:8443/jwks");
        assert_eq!(shown("https://idp.example/jwks?api_key=s3cret&x=1"), "https://idp.example/jwks");
        assert_eq!(shown("https://idp.example/jwks#s3cret"), "https://idp.example/jwks");
        assert_eq!(
            shown("https://u:p@idp.example:443/a/jwks.json?token=s3cret#frag"),
            "https://idp.example/a/jwks.json"
        );
        assert_eq!(shown("http://[::1]:8080/jwks?k=v"), "http://[::1]:8080/jwks");
        assert_eq!(shown("https://idp.example"), "https://idp.example/");
        let remote = Remote::new(
            "https://user:pa55@idp.example/jwks?api_key=s3cret#f",
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(remote.shown_url(), "https://idp.example/jwks");
    }

    #[test]
    fn url_checks() {
        let ok = |u: &str| Remote::new(u, Duration::from_secs(1), Duration::from_secs(1)).is_ok();
        assert!(ok("https://sso.example/jwks"));
        assert!(ok("http://127.0.0.1:8080/jwks"));
        assert!(ok("http://localhost/jwks"));
        assert!(ok("http://[::1]/jwks"));
        assert!(!ok("http://sso.example/jwks"));
        assert!(!ok("http://10.0.0.1/jwks"));
        assert!(!ok("file:///etc/passwd"));
        assert!(!ok("not a url"));
        assert!(Remote::new("https://a", Duration::ZERO, Duration::from_secs(1)).is_err());
    }
}
