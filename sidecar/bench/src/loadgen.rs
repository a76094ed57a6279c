//! An open-loop load generator: requests are scheduled at a fixed rate and each latency is
//! measured from its scheduled send time, so a slow server cannot hide queueing
//! (no coordinated omission).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// Latency percentiles of one run.
pub(crate) struct Latencies {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) ok: usize,
    pub(crate) errors: usize,
}

/// One blocking GET, returning the body as text.
pub(crate) fn get_once(addr: SocketAddr, path: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    })
}

/// Sends `rate` requests per second for `duration` over `connections` keep-alive connections.
pub(crate) async fn fixed_rate(
    addr: SocketAddr,
    path: &str,
    rate: u32,
    duration: Duration,
    connections: usize,
) -> Result<Latencies> {
    let total = (u64::from(rate) * duration.as_secs()) as usize;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<Duration>>();
    let mut senders = Vec::new();
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        let done = done_tx.clone();
        let path = path.to_string();
        let host = addr.to_string();
        tokio::spawn(async move {
            while let Some(scheduled) = rx.recv().await {
                let result = async {
                    let req = Request::get(path.as_str())
                        .header("host", host.as_str())
                        .body(Empty::<Bytes>::new())?;
                    let resp = sender.send_request(req).await?;
                    let ok = resp.status().is_success();
                    resp.into_body().collect().await?;
                    anyhow::Ok(ok)
                }
                .await;
                let _ = done.send(matches!(result, Ok(true)).then(|| scheduled.elapsed()));
            }
        });
        senders.push(tx);
    }
    drop(done_tx);
    let start = Instant::now() + Duration::from_millis(10);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(at.into()).await;
        let _ = senders[i % connections].send(at);
    }
    drop(senders);
    let mut samples = Vec::with_capacity(total);
    let mut errors = 0;
    while let Some(r) = done_rx.recv().await {
        match r {
            Some(d) => samples.push(d),
            None => errors += 1,
        }
    }
    samples.sort();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).saturating_sub(1).min(samples.len() - 1);
        samples[i].as_secs_f64() * 1000.0
    };
    Ok(Latencies { p50_ms: pct(0.50), p99_ms: pct(0.99), ok: samples.len(), errors })
}
