//! HTTP to the collector: the client, the bearer token, `POST /v1/events` and `GET /v1/usage`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use custos_api::collector::{EVENTS_PATH, IngestResponse, USAGE_PATH, UsageResponse};
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::ShipperError;
use crate::metrics::BatchResult;

/// Installs rustls' ring provider as the process default unless one is installed already.
///
/// reqwest is built with `rustls-no-provider`; its client builder takes the process-default
/// provider (and would panic without one) even when only plain http is used. Another crate may
/// have installed a provider first: that one is then used.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in between: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// An HTTP client for the collector: bounded time-outs, no redirects, no proxies from the
/// environment. `https://` URLs verify the server against the platform's trust store.
pub(crate) fn build_client(timeout: Duration) -> Result<reqwest::Client, ShipperError> {
    ensure_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        // Shorter than the whole request's, so that a collector that cannot be reached ends as
        // a connect error (the batch kept whole), not as an answer that never came (which
        // splits batches after repeats: a slow collector).
        .connect_timeout(timeout / 2)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("custos-shipper/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ShipperError::Client(e.without_url()))
}

/// The collector URL for `path`, below the base URL (which may itself have a path prefix).
pub(crate) fn endpoint(base: &str, path: &str) -> Result<Url, ShipperError> {
    let invalid =
        |reason: &str| ShipperError::InvalidUrl { url: base.to_string(), reason: reason.to_string() };
    let url = Url::parse(base).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a base URL takes no query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("credentials go in the token file, not in the URL"));
    }
    let joined = format!("{}{}", url.as_str().trim_end_matches('/'), path);
    Url::parse(&joined).map_err(|e| invalid(&e.to_string()))
}

struct CachedToken {
    modified: Option<SystemTime>,
    len: u64,
    header: HeaderValue,
}

/// The bearer token, read from a file and re-read when the file changes (projected service
/// account tokens are rotated by the kubelet) or after the collector answered 401.
pub(crate) struct TokenSource {
    path: Option<PathBuf>,
    cache: Mutex<Option<CachedToken>>,
}

impl TokenSource {
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        TokenSource { path, cache: Mutex::new(None) }
    }

    /// The `Authorization` header value, or `None` when no token file is configured.
    pub(crate) async fn header(&self) -> Result<Option<HeaderValue>, ShipperError> {
        let Some(path) = &self.path else { return Ok(None) };
        let file_error = |source| ShipperError::TokenFile { path: path.clone(), source };
        let meta = tokio::fs::metadata(path).await.map_err(file_error)?;
        let (modified, len) = (meta.modified().ok(), meta.len());
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(cached) = cache.as_ref()
                && modified.is_some()
                && cached.modified == modified
                && cached.len == len
            {
                return Ok(Some(cached.header.clone()));
            }
        }
        let raw = tokio::fs::read_to_string(path).await.map_err(file_error)?;
        let header = bearer(path, raw.trim())?;
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(CachedToken { modified, len, header: header.clone() });
        Ok(Some(header))
    }

    /// Forgets the cached token: the next request reads the file again.
    pub(crate) fn invalidate(&self) {
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

fn bearer(path: &Path, token: &str) -> Result<HeaderValue, ShipperError> {
    let invalid = |reason| ShipperError::InvalidToken { path: path.to_path_buf(), reason };
    if token.is_empty() {
        return Err(invalid("is empty"));
    }
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| invalid("holds characters not allowed in an HTTP header"))?;
    header.set_sensitive(true);
    Ok(header)
}

/// The outcome of one batch delivery attempt.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// 200 with a valid answer: committed.
    Delivered { response: IngestResponse, elapsed: Duration },
    /// Not delivered; keep the batch and try again later.
    Retry { result: BatchResult, detail: String },
    /// No answer within the request time-out on a connection that was made: the collector is
    /// slow with this batch (kept, as for [`Outcome::Retry`]; split after repeats).
    SlowAnswer { detail: String },
    /// Refused for now for a reason other batches may not share (an event dated ahead of the
    /// collector's clock; a namespace token for another namespace): kept, moved behind the
    /// backlog so that what may pass is not held up behind it.
    NotYet { detail: String },
    /// 413: the batch is too large for the collector; smaller ones may pass.
    TooLarge,
    /// 400 `bad_event`: one of the batch's events is refused; the others may pass without it.
    /// `at`: its index in the batch, when the collector said (`line` or `index`).
    BadEvent { at: Option<usize> },
    /// The collector refused the batch (another 4xx): retrying cannot help.
    Rejected { status: u16 },
}

/// What sends batches.
pub(crate) struct Transport {
    client: reqwest::Client,
    events_url: Url,
    token: TokenSource,
    gzip: bool,
}

impl Transport {
    pub(crate) fn new(
        base: &str,
        token_file: Option<PathBuf>,
        timeout: Duration,
        gzip: bool,
    ) -> Result<Self, ShipperError> {
        Ok(Transport {
            client: build_client(timeout)?,
            events_url: endpoint(base, EVENTS_PATH)?,
            token: TokenSource::new(token_file),
            gzip,
        })
    }

    /// `POST /v1/events` with `payload` (NDJSON).
    pub(crate) async fn post_events(&self, payload: Arc<Vec<u8>>) -> Outcome {
        let sent = Arc::clone(&payload);
        let body = if self.gzip {
            match tokio::task::spawn_blocking(move || gzip(&payload)).await {
                Ok(Ok(body)) => body,
                Ok(Err(error)) => {
                    return Outcome::Retry {
                        result: BatchResult::TransportError,
                        detail: format!("gzip: {error}"),
                    };
                }
                Err(error) => {
                    return Outcome::Retry {
                        result: BatchResult::TransportError,
                        detail: format!("gzip task: {error}"),
                    };
                }
            }
        } else {
            payload.as_ref().clone()
        };
        let mut request =
            self.client.post(self.events_url.clone()).header(CONTENT_TYPE, "application/x-ndjson");
        if self.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        match self.token.header().await {
            Ok(Some(header)) => request = request.header(AUTHORIZATION, header),
            Ok(None) => {}
            Err(error) => {
                return Outcome::Retry { result: BatchResult::TokenError, detail: error.to_string() };
            }
        }
        let started = Instant::now();
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(error) => return transport_failure(error),
        };
        let status = response.status();
        match status {
            StatusCode::OK => {
                let bytes = match capped_body(response).await {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => {
                        return Outcome::Retry {
                            result: BatchResult::MalformedResponse,
                            detail: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
                        };
                    }
                    Err(error) => return transport_failure(error),
                };
                match serde_json::from_slice::<IngestResponse>(&bytes) {
                    Ok(response) => Outcome::Delivered { response, elapsed: started.elapsed() },
                    Err(error) => Outcome::Retry {
                        result: BatchResult::MalformedResponse,
                        detail: describe_json_error(&error),
                    },
                }
            }
            StatusCode::UNAUTHORIZED => {
                self.token.invalidate();
                Outcome::Retry { result: BatchResult::Unauthorized, detail: "HTTP 401".to_string() }
            }
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
                Outcome::Retry { result: BatchResult::Throttled, detail: format!("HTTP {}", status.as_u16()) }
            }
            s if s.is_server_error() => {
                Outcome::Retry { result: BatchResult::ServerError, detail: format!("HTTP {}", s.as_u16()) }
            }
            StatusCode::PAYLOAD_TOO_LARGE => Outcome::TooLarge,
            // Not about the batch: a wrong path, a proxy or authorisation layer in front, a
            // content encoding an older collector lacks. Dropping would lose every event until
            // the setup is fixed; kept instead (the spool is bounded).
            StatusCode::FORBIDDEN => {
                let answer = error_answer(response).await.unwrap_or_default();
                match answer.reason.as_deref() {
                    // An event recorded before this sidecar knew its namespace (started without
                    // `--namespace`, before its config loaded) can pass with no token: dropped
                    // alone.
                    Some("wrong_namespace")
                        if answer
                            .at()
                            .is_some_and(|at| namespace_of_line(&sent, at).as_deref() == Some("")) =>
                    {
                        Outcome::BadEvent { at: answer.at() }
                    }
                    // Any other event of another namespace than a namespace token's: every event
                    // of this sidecar has its one namespace, so the token is for another (a setup
                    // error). Kept until the token is fixed, behind the batches that may pass.
                    Some("wrong_namespace") => Outcome::NotYet {
                        detail: "HTTP 403 wrong_namespace: the collector token is for another namespace"
                            .to_string(),
                    },
                    _ => Outcome::Retry { result: BatchResult::Refused, detail: "HTTP 403".to_string() },
                }
            }
            StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::MISDIRECTED_REQUEST => {
                Outcome::Retry { result: BatchResult::Refused, detail: format!("HTTP {}", status.as_u16()) }
            }
            StatusCode::BAD_REQUEST => {
                let answer = error_answer(response).await.unwrap_or_default();
                match answer.reason.as_deref() {
                    // A collector older than this sidecar (during a rollout): kept until it is
                    // upgraded.
                    Some("unsupported_schema_version") => Outcome::Retry {
                        result: BatchResult::Refused,
                        detail: "HTTP 400 unsupported_schema_version".to_string(),
                    },
                    // An event dated ahead of the collector's clock: this node's clock runs
                    // ahead (or the collector's behind). Kept: it passes once the clocks agree.
                    // Kept behind the batches that may pass, so that events dated after the
                    // clock was set right are not held up by those dated before.
                    Some("bad_event") if answer.clock_ahead => Outcome::NotYet {
                        detail: "HTTP 400 bad_event: an event's time is more than 10 minutes ahead of the \
                                 collector's clock (check this node's clock)"
                            .to_string(),
                    },
                    Some("bad_event") => Outcome::BadEvent { at: answer.at() },
                    _ => Outcome::Rejected { status: 400 },
                }
            }
            s if s.is_client_error() => Outcome::Rejected { status: s.as_u16() },
            s => Outcome::Retry {
                result: BatchResult::UnexpectedStatus,
                detail: format!("HTTP {}", s.as_u16()),
            },
        }
    }
}

/// The most of a collector's answer read (after decompression): its answers are small, and a
/// spoofed or broken one must not take the sidecar's memory.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The body of an answer, or `None` when it is larger than [`MAX_ANSWER_BYTES`].
async fn capped_body(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// What a collector's error answer says: its reason code and, for a refused event, where it
/// was in the batch and whether only the clocks are to blame.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorAnswer {
    reason: Option<String>,
    /// 1-based line of the refused event (NDJSON, as the shipper sends).
    line: Option<u64>,
    /// 0-based index of the refused event.
    index: Option<u64>,
    /// The refused event's time is ahead of the collector's clock.
    #[serde(default)]
    clock_ahead: bool,
}

impl ErrorAnswer {
    /// The refused event's 0-based index in the batch, when the answer says.
    fn at(&self) -> Option<usize> {
        let index = match (self.line, self.index) {
            (Some(line), _) => line.checked_sub(1)?,
            (None, Some(index)) => index,
            (None, None) => return None,
        };
        usize::try_from(index).ok()
    }
}

/// The `namespace` of the event on line `at` (0-based) of an NDJSON `payload`, if it has one.
fn namespace_of_line(payload: &[u8], at: usize) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Namespace {
        namespace: String,
    }
    let line = payload.split(|&b| b == b'\n').nth(at)?;
    serde_json::from_slice::<Namespace>(line).ok().map(|n| n.namespace)
}

/// A collector's error answer, if it is one (within [`MAX_ANSWER_BYTES`]).
async fn error_answer(response: reqwest::Response) -> Option<ErrorAnswer> {
    let body = capped_body(response).await.ok()??;
    serde_json::from_slice::<ErrorAnswer>(&body).ok()
}

fn transport_failure(error: reqwest::Error) -> Outcome {
    if error.is_timeout() && !error.is_connect() {
        return Outcome::SlowAnswer { detail: error_chain(&error.without_url()) };
    }
    let result = if error.is_timeout() { BatchResult::Timeout } else { BatchResult::TransportError };
    Outcome::Retry { result, detail: error_chain(&error.without_url()) }
}

/// An error and its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where and what kind of JSON error, without quoting the input (it could hold data).
fn describe_json_error(error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected JSON shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {} column {}", error.line(), error.column())
}

fn gzip(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(payload.len() / 4), flate2::Compression::fast());
    encoder.write_all(payload)?;
    encoder.finish()
}

/// Client of the collector's usage endpoint (`GET /v1/usage`), with which replicas of a workload
/// share their principals' quota usage.
pub struct UsageClient {
    client: reqwest::Client,
    usage_url: Url,
    token: TokenSource,
    /// When the collector last answered 400 to `instance` (a version before it): not sent
    /// again for [`INSTANCE_RETRY_AFTER`] (a collector upgraded meanwhile takes it again).
    instance_refused: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for UsageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageClient").field("url", &self.usage_url.as_str()).finish_non_exhaustive()
    }
}

impl UsageClient {
    /// A client for the collector at `base` (e.g. `http://custos-collector.custos-system:8080`),
    /// authenticating with the token in `token_file` (re-read when it changes), giving up on a
    /// request after `timeout`.
    pub fn new(base: String, token_file: Option<PathBuf>, timeout: Duration) -> Result<Self, ShipperError> {
        if timeout.is_zero() {
            return Err(ShipperError::Config("the usage request timeout must be positive".to_string()));
        }
        Ok(UsageClient {
            client: build_client(timeout)?,
            usage_url: endpoint(&base, USAGE_PATH)?,
            token: TokenSource::new(token_file),
            instance_refused: std::sync::Mutex::new(None),
        })
    }

    /// The cluster-wide usage of `principal` under `policy` in `namespace` (omitted from the query
    /// when empty); with `instance`, also without that sidecar process's events
    /// ([`UsageResponse::rules_without_instance`]). A collector of a version before that
    /// parameter refuses it (400): the fetch is made again without it, and it is left out for
    /// [`INSTANCE_RETRY_AFTER`].
    pub async fn fetch(
        &self,
        namespace: &str,
        policy: &str,
        principal: &str,
        instance: Option<&str>,
    ) -> Result<UsageResponse, ShipperError> {
        let refused = || self.instance_refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let instance = instance.filter(|_| refused().is_none_or(|at| at.elapsed() >= INSTANCE_RETRY_AFTER));
        match self.fetch_once(namespace, policy, principal, instance).await {
            Err(ShipperError::Status(400)) if instance.is_some() => {
                tracing::info!(
                    "the collector does not know the usage `instance` parameter: not sent for a while"
                );
                *refused() = Some(std::time::Instant::now());
                self.fetch_once(namespace, policy, principal, None).await
            }
            other => other,
        }
    }

    async fn fetch_once(
        &self,
        namespace: &str,
        policy: &str,
        principal: &str,
        instance: Option<&str>,
    ) -> Result<UsageResponse, ShipperError> {
        let mut url = self.usage_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("policy", policy).append_pair("principal", principal);
            if !namespace.is_empty() {
                query.append_pair("namespace", namespace);
            }
            if let Some(instance) = instance {
                query.append_pair("instance", instance);
            }
        }
        let mut request = self.client.get(url).header(reqwest::header::ACCEPT, "application/json");
        if let Some(header) = self.token.header().await? {
            request = request.header(AUTHORIZATION, header);
        }
        let response = request.send().await.map_err(usage_failure)?;
        match response.status() {
            StatusCode::OK => {
                let bytes = capped_body(response).await.map_err(usage_failure)?.ok_or_else(|| {
                    ShipperError::MalformedResponse(format!("answer larger than {MAX_ANSWER_BYTES} bytes"))
                })?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| ShipperError::MalformedResponse(describe_json_error(&e)))
            }
            StatusCode::UNAUTHORIZED => {
                self.token.invalidate();
                Err(ShipperError::Unauthorized)
            }
            status => Err(ShipperError::Status(status.as_u16())),
        }
    }
}

/// How long the usage client leaves out `instance` after a collector refused it.
pub const INSTANCE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

fn usage_failure(error: reqwest::Error) -> ShipperError {
    if error.is_timeout() { ShipperError::Timeout } else { ShipperError::Transport(error.without_url()) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints_keep_a_base_path_and_refuse_bad_urls() {
        assert_eq!(endpoint("http://c:8080", EVENTS_PATH).unwrap().as_str(), "http://c:8080/v1/events");
        assert_eq!(endpoint("http://c:8080/", EVENTS_PATH).unwrap().as_str(), "http://c:8080/v1/events");
        assert_eq!(endpoint("https://c/custos/", USAGE_PATH).unwrap().as_str(), "https://c/custos/v1/usage");
        for bad in ["c:8080", "ftp://c", "http://c?x=1", "http://u:p@c", "not a url"] {
            assert!(endpoint(bad, EVENTS_PATH).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_refuses_empty_and_header_breaking_tokens() {
        let path = Path::new("/t");
        assert!(bearer(path, "").is_err());
        assert!(bearer(path, "a\nb").is_err());
        let header = bearer(path, "abc").unwrap();
        assert!(header.is_sensitive());
        assert_eq!(header.to_str().unwrap(), "Bearer abc");
    }

    #[test]
    fn https_client_builds_with_the_ring_provider() {
        assert!(build_client(Duration::from_secs(1)).is_ok());
    }
}
