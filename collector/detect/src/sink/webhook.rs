//! POSTing one alert to the webhook, with retries and capped exponential back-off.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use custos_store::Alert;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use super::SinkError;
use crate::metrics::{AlertMetrics, AttemptResult, DeliveryResult};

/// Installs rustls' ring provider as the process default unless one is installed already.
///
/// reqwest is built with `rustls-no-provider`; its client builder takes the process-default
/// provider (and would panic without one) even when only plain http is used.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in between: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Checks a webhook URL. Errors never repeat the URL: webhook URLs often carry a secret in
/// their path (Slack, Teams).
pub(crate) fn parse_url(url: &str) -> Result<Url, SinkError> {
    let invalid = |reason: &str| SinkError::InvalidWebhook(reason.to_owned());
    let parsed = Url::parse(url.trim()).map_err(|e| invalid(&format!("not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if parsed.host_str().is_none() {
        return Err(invalid("no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("credentials go in the token file, not in the URL"));
    }
    Ok(parsed)
}

/// The webhook: client, URL, token, retry policy.
pub(crate) struct Webhook {
    client: reqwest::Client,
    url: Url,
    token_file: Option<PathBuf>,
    max_attempts: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    rng_seed: u64,
}

enum Attempt {
    Ok,
    Retry(AttemptResult, Option<Duration>),
    Rejected(u16),
}

impl Webhook {
    pub(crate) fn new(
        url: Url,
        token_file: Option<PathBuf>,
        timeout: Duration,
        max_attempts: u32,
        backoff_initial: Duration,
        backoff_max: Duration,
    ) -> Result<Self, SinkError> {
        ensure_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("custos-collector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Client(e.without_url()))?;
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0xa1e7);
        Ok(Webhook {
            client,
            url,
            token_file,
            max_attempts: max_attempts.max(1),
            backoff_initial,
            backoff_max: backoff_max.max(backoff_initial),
            rng_seed: h.finish(),
        })
    }

    /// Delivers `alert`: up to `max_attempts` POSTs, waiting between failed ones.
    pub(crate) async fn deliver(&self, alert: &Alert, metrics: &AlertMetrics) -> DeliveryResult {
        let body = match serde_json::to_vec(alert) {
            Ok(body) => body,
            Err(_) => {
                tracing::error!(alert = %alert.id, "alert cannot be encoded as JSON: not delivered");
                return DeliveryResult::Rejected;
            }
        };
        let mut rng = self.rng_seed ^ fnv(alert.id.as_bytes());
        for attempt in 1..=self.max_attempts {
            let (result, retry_after) = match self.post(alert, &body).await {
                Attempt::Ok => {
                    metrics.attempt(AttemptResult::Ok);
                    tracing::debug!(alert = %alert.id, attempt, "alert delivered to the webhook");
                    return DeliveryResult::Delivered;
                }
                Attempt::Rejected(status) => {
                    metrics.attempt(AttemptResult::Rejected);
                    tracing::warn!(alert = %alert.id, status, "the webhook refused the alert; not retried");
                    return DeliveryResult::Rejected;
                }
                Attempt::Retry(result, retry_after) => (result, retry_after),
            };
            metrics.attempt(result);
            if attempt == self.max_attempts {
                tracing::warn!(
                    alert = %alert.id,
                    attempts = attempt,
                    last = result.as_str(),
                    "alert not delivered to the webhook: giving up"
                );
                return DeliveryResult::Failed;
            }
            let wait = retry_after
                .map(|d| d.min(self.backoff_max))
                .unwrap_or_else(|| self.backoff(attempt, &mut rng));
            tracing::debug!(alert = %alert.id, attempt, result = result.as_str(), ?wait, "webhook attempt failed");
            tokio::time::sleep(wait).await;
        }
        DeliveryResult::Failed
    }

    /// Capped exponential back-off with "equal jitter": half the step, plus up to half at random.
    fn backoff(&self, attempt: u32, rng: &mut u64) -> Duration {
        let step = self
            .backoff_initial
            .saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        *rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        step.mul_f64(0.5 + 0.5 * unit)
    }

    async fn post(&self, alert: &Alert, body: &[u8]) -> Attempt {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", alert.id.as_str())
            .header("X-Custos-Alert-Id", alert.id.as_str());
        if let Some(path) = &self.token_file {
            match read_token(path).await {
                Ok(header) => request = request.header(AUTHORIZATION, header),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), reason, "webhook token file unusable");
                    return Attempt::Retry(AttemptResult::TokenError, None);
                }
            }
        }
        let response = match request.body(body.to_vec()).send().await {
            Ok(r) => r,
            Err(e) => {
                let result =
                    if e.is_timeout() { AttemptResult::Timeout } else { AttemptResult::TransportError };
                tracing::debug!(error = %error_chain(&e.without_url()), "webhook request failed");
                return Attempt::Retry(result, None);
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The body is not needed; dropping the response frees the connection.
        drop(response);
        match status {
            s if s.is_success() => Attempt::Ok,
            StatusCode::UNAUTHORIZED => Attempt::Retry(AttemptResult::Unauthorized, None),
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
                Attempt::Retry(AttemptResult::Throttled, retry_after)
            }
            s if s.is_server_error() => Attempt::Retry(AttemptResult::ServerError, retry_after),
            s => Attempt::Rejected(s.as_u16()),
        }
    }
}

/// The `Authorization` header from the token file, read at every attempt (tokens rotate).
async fn read_token(path: &Path) -> Result<HeaderValue, &'static str> {
    let raw = tokio::fs::read_to_string(path).await.map_err(|_| "cannot be read")?;
    let token = raw.trim();
    if token.is_empty() {
        return Err("is empty");
    }
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "holds characters not allowed in an HTTP header")?;
    header.set_sensitive(true);
    Ok(header)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let w = Webhook::new(
            Url::parse("http://127.0.0.1:9/").unwrap(),
            None,
            Duration::from_secs(1),
            10,
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .unwrap();
        let mut rng = 42;
        for (attempt, step) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000), (40, 1000)] {
            let d = w.backoff(attempt, &mut rng);
            assert!(d >= Duration::from_millis(step / 2), "attempt {attempt}: {d:?}");
            assert!(d <= Duration::from_millis(step), "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn urls_are_checked_without_echoing_them() {
        let e = parse_url("ftp://hooks.example.com/T000/SECRET").unwrap_err().to_string();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(parse_url("https://user:pw@hooks.example.com/").is_err());
        assert!(parse_url("https://hooks.example.com/services/x").is_ok());
        assert!(parse_url("not a url").is_err());
    }
}
