//! Where `custos audit` reads from: the collector's HTTP API or the store itself, behind one
//! set of calls answering the same types.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use custos_store::{Alert, AnyStore, EventQuery, Page, SubjectAccess, TopBy, TopEntry, VerifyReport};
use reqwest::header::ACCEPT;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::SourceArgs;

/// The audit trail, through the collector or the store.
pub(crate) enum Source {
    /// `--collector URL`.
    Collector(Collector),
    /// `--store URL`.
    Store(AnyStore),
}

/// A client of the collector's query API.
pub(crate) struct Collector {
    client: reqwest::Client,
    base: Url,
    token: String,
    timeout: Duration,
}

impl Source {
    /// Checks the flags and connects: exactly one of `--collector` and `--store`.
    pub(crate) async fn open(args: &SourceArgs) -> anyhow::Result<Source> {
        match (&args.collector, &args.store) {
            (Some(url), None) => {
                let Some(token_file) = &args.token_file else {
                    bail!(
                        "--collector needs the bearer token: --token-file FILE (or \
                         CUSTOS_COLLECTOR_TOKEN_FILE)"
                    );
                };
                Ok(Source::Collector(Collector::new(url, token_file, args.timeout)?))
            }
            (None, Some(url)) => Ok(Source::Store(open_store(url).await?)),
            (Some(_), Some(_)) => bail!("give either --collector URL or --store URL, not both"),
            (None, None) => bail!(
                "say where the audit trail is: --collector URL (with --token-file FILE) or --store URL \
                 (sqlite:PATH or postgres://...)"
            ),
        }
    }

    /// One page of events.
    pub(crate) async fn query(&self, q: &EventQuery) -> anyhow::Result<Page> {
        match self {
            Source::Collector(c) => {
                let mut params = vec![];
                push(&mut params, "namespace", q.namespace.clone());
                push(&mut params, "policy", q.policy.clone());
                push(&mut params, "principal", q.principal.clone());
                push(&mut params, "decision", q.decision.map(|d| d.as_str().to_owned()));
                push(&mut params, "dryRunPolicy", q.dry_run_policy.clone());
                push(&mut params, "dryRunDecision", q.dry_run_decision.map(|d| d.as_str().to_owned()));
                push(&mut params, "since", q.since.map(rfc3339));
                push(&mut params, "until", q.until.map(rfc3339));
                push(&mut params, "limit", (q.limit > 0).then(|| q.limit.to_string()));
                push(&mut params, "cursor", q.cursor.clone());
                c.get("/v1/events", &params).await
            }
            Source::Store(s) => s.query(q).await.map_err(store_error),
        }
    }

    /// Accesses to the data subject with this keyed record hash.
    pub(crate) async fn subject(
        &self,
        hash: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> anyhow::Result<Vec<SubjectAccess>> {
        match self {
            Source::Collector(c) => {
                #[derive(Deserialize)]
                struct Answer {
                    accesses: Vec<SubjectAccess>,
                }
                let mut params = vec![];
                push(&mut params, "since", since.map(rfc3339));
                push(&mut params, "until", until.map(rfc3339));
                push(&mut params, "limit", (limit > 0).then(|| limit.to_string()));
                let answer: Answer = c.get(&format!("/v1/subjects/{hash}"), &params).await?;
                Ok(answer.accesses)
            }
            Source::Store(s) => s.subject(hash, since, until, limit).await.map_err(store_error),
        }
    }

    /// Top principals.
    pub(crate) async fn top(
        &self,
        by: TopBy,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> anyhow::Result<Vec<TopEntry>> {
        match self {
            Source::Collector(c) => {
                #[derive(Deserialize)]
                struct Answer {
                    entries: Vec<TopEntry>,
                }
                let by_name = match by {
                    TopBy::Records => "records",
                    TopBy::Denials => "denials",
                };
                let mut params = vec![("by", by_name.to_owned())];
                push(&mut params, "since", since.map(rfc3339));
                push(&mut params, "limit", (limit > 0).then(|| limit.to_string()));
                let answer: Answer = c.get("/v1/top", &params).await?;
                Ok(answer.entries)
            }
            Source::Store(s) => s.top(by, since, limit).await.map_err(store_error),
        }
    }

    /// Alerts, newest first.
    pub(crate) async fn alerts(
        &self,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> anyhow::Result<Vec<Alert>> {
        match self {
            Source::Collector(c) => {
                #[derive(Deserialize)]
                struct Answer {
                    alerts: Vec<Alert>,
                }
                let mut params = vec![];
                push(&mut params, "since", since.map(rfc3339));
                push(&mut params, "limit", (limit > 0).then(|| limit.to_string()));
                let answer: Answer = c.get("/v1/alerts", &params).await?;
                Ok(answer.alerts)
            }
            Source::Store(s) => s.alerts(since, limit).await.map_err(store_error),
        }
    }

    /// Verifies the chain.
    pub(crate) async fn verify(
        &self,
        from: Option<u64>,
        expect: Option<(u64, String)>,
    ) -> anyhow::Result<VerifyReport> {
        match self {
            Source::Collector(c) => {
                let mut params = vec![];
                push(&mut params, "from", from.map(|f| f.to_string()));
                push(&mut params, "expect", expect.map(|(seq, hash)| format!("{seq}:{hash}")));
                c.get("/v1/verify", &params).await
            }
            Source::Store(s) => s.verify_expecting(from, expect).await.map_err(store_error),
        }
    }
}

fn push(params: &mut Vec<(&'static str, String)>, name: &'static str, value: Option<String>) {
    if let Some(v) = value {
        params.push((name, v));
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn store_error(e: custos_store::Error) -> anyhow::Error {
    anyhow!("the store failed: {e}")
}

/// Opens the store. A `sqlite:` path must exist: reading a mistyped path must not create an
/// empty store that answers "nothing happened".
async fn open_store(url: &str) -> anyhow::Result<AnyStore> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path != ":memory:" && !Path::new(path).exists() {
            bail!("no SQLite store at {path} (--store sqlite:PATH names an existing file)");
        }
    } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("--store takes sqlite:PATH or postgres://USER@HOST:PORT/DB");
    }
    // The URL may hold a password: it is not repeated in errors.
    custos_store::open(url).await.map_err(|e| anyhow!("cannot open the store: {e}"))
}

/// An error answer of the collector: `{"error": "...", "reason": "..."}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    reason: String,
}

impl Collector {
    fn new(url: &str, token_file: &Path, timeout: Duration) -> anyhow::Result<Collector> {
        let base = base_url(url)?;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read the token file {}", token_file.display()))?;
        let token = token.trim().to_owned();
        if token.is_empty() {
            bail!("the token file {} is empty", token_file.display());
        }
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // reqwest is built with `rustls-no-provider`; an error means another thread
            // installed one in between: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("custos-audit/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Collector { client, base, token, timeout })
    }

    /// `GET path?params`, the answer as `T`; every failure as a sentence.
    async fn get<T: DeserializeOwned>(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<T> {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let response = self
            .client
            .get(url)
            .bearer_auth(&self.token)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return response.json::<T>().await.map_err(|e| {
                anyhow!(
                    "unexpected answer from the collector at {} to {path}: {}",
                    self.base,
                    root_cause(&e.without_url())
                )
            });
        }
        let body: ErrorBody = response.json().await.unwrap_or_default();
        let reason = if body.reason.is_empty() { String::new() } else { format!(" ({})", body.reason) };
        Err(match status {
            StatusCode::UNAUTHORIZED => {
                anyhow!(
                    "the collector refused the token{reason}: check --token-file / CUSTOS_COLLECTOR_TOKEN_FILE"
                )
            }
            StatusCode::BAD_REQUEST => anyhow!("the collector rejected the request: {}{reason}", body.error),
            StatusCode::NOT_FOUND => anyhow!(
                "the collector at {} has no {path} endpoint (HTTP 404): is the URL that of a Custos collector?",
                self.base
            ),
            _ => anyhow!(
                "the collector failed: HTTP {}{}{reason}",
                status.as_u16(),
                if body.error.is_empty() { String::new() } else { format!(": {}", body.error) }
            ),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        if e.is_timeout() {
            anyhow!("the collector at {} did not answer within {:?}", self.base, self.timeout)
        } else {
            anyhow!("cannot reach the collector at {}: {}", self.base, root_cause(e))
        }
    }
}

/// The innermost cause of an error (e.g. "Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The collector base URL: http(s), a host, no query, no credentials.
fn base_url(url: &str) -> anyhow::Result<Url> {
    let parsed = Url::parse(url).map_err(|e| anyhow!("--collector {url}: not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("--collector {url}: the scheme must be http or https");
    }
    if parsed.host_str().is_none() {
        bail!("--collector {url}: no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        bail!("--collector: credentials go in --token-file, not in the URL");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        bail!("--collector {url}: a base URL takes no query or fragment");
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert!(base_url("http://collector:8080").is_ok());
        assert!(base_url("https://c.example/prefix/").is_ok());
        for bad in ["ftp://x", "http://u:p@x", "http://x/?a=1", "collector:8080", "nonsense"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }
}
