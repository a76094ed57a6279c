//! The demo's HTTP client: one caller = one source address (the calling workload), an optional
//! bearer token (the end user), one kept-alive HTTP/1.1 connection to one sidecar.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

/// What the sidecar answered.
#[derive(Debug)]
pub(crate) struct Answer {
    /// HTTP status.
    pub(crate) status: u16,
    /// The `Retry-After` header of a 429, when present.
    pub(crate) retry_after: Option<String>,
    /// The `reason` of a Custos refusal (`out_of_scope`, `quota_exceeded`, ...), or the rule
    /// that denied.
    pub(crate) reason: Option<String>,
    /// The response body.
    pub(crate) body: Bytes,
}

/// A caller: source address, token, connection.
pub(crate) struct Caller {
    source: Ipv4Addr,
    target: SocketAddr,
    token: Option<String>,
    connection: Option<SendRequest<Full<Bytes>>>,
}

impl Caller {
    /// A caller from `source` to the sidecar at `target`, with `token` as bearer.
    pub(crate) fn new(source: Ipv4Addr, target: SocketAddr, token: Option<String>) -> Caller {
        Caller { source, target, token, connection: None }
    }

    /// `GET path`.
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post(&mut self, path: &str, body: &str) -> anyhow::Result<Answer> {
        self.send(Method::POST, path, Bytes::copy_from_slice(body.as_bytes())).await
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::from((self.source, 0)))
            .with_context(|| format!("cannot bind the source address {}", self.source))?;
        let stream = socket
            .connect(self.target)
            .await
            .with_context(|| format!("cannot connect to {}", self.target))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Answer> {
        let reusable = match self.connection.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        let mut sender = match self.connection.take() {
            Some(s) if reusable => s,
            _ => self.connect().await?,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "demo.swiftparcel.example")
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(Full::new(body))?)
            .await
            .with_context(|| format!("request to {} failed", self.target))?;
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        self.connection = Some(sender);
        Ok(Answer { status, retry_after, reason: refusal_reason(status, &body), body })
    }
}

/// The reason of a Custos refusal body (`{"error", "policy", "rule", "reason", "limit"}`):
/// the reason code, with the rule of a Deny rule and the limit of a quota.
fn refusal_reason(status: u16, body: &[u8]) -> Option<String> {
    if status < 400 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    let reason = field("reason")?;
    Some(match (reason, field("rule"), field("limit")) {
        ("deny_rule", Some(rule), _) => format!("deny rule {rule}"),
        ("quota_exceeded", _, Some(limit)) => format!("quota {limit}"),
        (reason, _, _) => reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons() {
        assert_eq!(
            refusal_reason(403, br#"{"error":"forbidden","policy":"p","rule":"r","reason":"out_of_scope"}"#),
            Some("out_of_scope".to_owned())
        );
        assert_eq!(refusal_reason(200, br#"{"reason":"x"}"#), None);
        assert_eq!(refusal_reason(502, b"not json"), None);
        assert_eq!(
            refusal_reason(403, br#"{"reason":"deny_rule","rule":"no-export"}"#),
            Some("deny rule no-export".to_owned())
        );
        assert_eq!(
            refusal_reason(429, br#"{"reason":"quota_exceeded","limit":"recordsPerHour"}"#),
            Some("quota recordsPerHour".to_owned())
        );
    }
}
