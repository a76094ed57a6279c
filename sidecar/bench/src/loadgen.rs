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
    /// How late the generator itself sent requests (µs past their scheduled time), p99: the
    /// measurement error of this generator.
    pub(crate) send_lateness_p99_us: f64,
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
    // The schedule is kept by a plain thread, not by the runtime's timer: Tokio's timer wheel
    // has 1 ms slots, which would add up to 1 ms of scheduling error to every latency (the
    // earlier version of this generator measured the direct app at p50 ≈ 1 ms for that reason).
    let start = Instant::now() + Duration::from_millis(10);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let pacer = std::thread::Builder::new().name("loadgen-pacer".into()).spawn(move || {
        let mut lateness = Vec::with_capacity(total);
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            pace_until(at);
            let _ = senders[i % connections].send(at);
            lateness.push(at.elapsed());
        }
        lateness
    })?;
    let mut samples = Vec::with_capacity(total);
    let mut errors = 0;
    while let Some(r) = done_rx.recv().await {
        match r {
            Some(d) => samples.push(d),
            None => errors += 1,
        }
    }
    let mut lateness = pacer.join().unwrap_or_default();
    Ok(Latencies {
        p50_ms: percentile(&mut samples, 0.50) * 1000.0,
        p99_ms: percentile(&mut samples, 0.99) * 1000.0,
        ok: samples.len(),
        errors,
        send_lateness_p99_us: percentile(&mut lateness, 0.99) * 1e6,
    })
}

/// The `p` quantile of `samples`, in seconds (NaN when there are none).
fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 * p).ceil() as usize).saturating_sub(1).min(samples.len() - 1);
    samples[i].as_secs_f64()
}

/// Sleeps until shortly before `at` (a thread sleep overshoots by the kernel's timer slack,
/// about 50 µs), then spins the rest of the way, so that requests leave within a few
/// microseconds of their scheduled time without spinning through the whole interval.
fn pace_until(at: Instant) {
    const SPIN: Duration = Duration::from_micros(80);
    let now = Instant::now();
    if let Some(wait) = at.checked_duration_since(now).and_then(|d| d.checked_sub(SPIN)) {
        std::thread::sleep(wait);
    }
    while Instant::now() < at {
        std::hint::spin_loop();
    }
}
