//! Connection limits over real TCP on 127.0.0.1: idle h2c connections, the h2 header block
//! bound, the admin port's own header read time-out.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

/// Every request allowed, passed through as it is.
fn allow_all() -> Value {
    json!({
        "workload": {"selector": {"matchLabels": {"app": "customer-api"}}, "appPort": 1},
        "mode": "Enforce",
        "defaultAction": "Allow",
        "rules": [],
    })
}

/// An h2c connection to `addr`: its sender, and its task (ends when the connection does).
async fn h2c(addr: SocketAddr) -> (SendRequest<Full<Bytes>>, JoinHandle<Result<(), hyper::Error>>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    (sender, tokio::spawn(conn))
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()
}

/// `custos_sidecar_limit_rejections_total{limit="<limit>"}` on the admin port (0 if absent).
async fn limit_count(admin: SocketAddr, limit: &str) -> f64 {
    let metrics = support::get(admin, "/metrics").await.text();
    let name = format!("custos_sidecar_limit_rejections_total{{limit=\"{limit}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(name.as_str())).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// An h2c client that sends one request and then stays idle (its connection answering PINGs)
/// no longer holds a connection slot for ever: once no stream has been open for the header
/// read time-out, the connection is shut down (GOAWAY), counted as `header_read_timeout`.
#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_the_header_read_timeout() {
    let mut f = fixture(&[("customer-api", allow_all())], Vec::new(), |s| {
        s.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut sender, conn) = h2c(f.proxy()).await;
    let resp = sender.send_request(get(f.proxy(), "/open/x")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let done = Instant::now();

    // Ended by the server within the time-out plus the watchdog's check period (75 ms here).
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the idle h2c connection is still open")
        .unwrap()
        .unwrap();
    let after = done.elapsed();
    assert!(after >= Duration::from_millis(250), "closed after {after:?}");
    assert!(after < Duration::from_millis(1500), "closed after {after:?}");
    assert!(sender.send_request(get(f.proxy(), "/open/x")).await.is_err());
    // Counted once the server's connection task has ended too.
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = limit_count(f.admin(), "header_read_timeout").await;
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 1.0);
    f.stop().await;
}

/// A stream open keeps its h2c connection, however long it takes (its response body, here
/// 2 s, or the app's answer, here 10 s): the connection still takes new streams well past
/// the time-out.
#[tokio::test]
async fn an_h2c_connection_with_a_stream_open_is_kept() {
    let mut f = fixture(&[("customer-api", allow_all())], Vec::new(), |s| {
        s.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut sender, conn) = h2c(f.proxy()).await;

    // Sending a body (its second half 2 s after its first).
    let resp = sender.send_request(get(f.proxy(), "/stall/x")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let resp = sender.send_request(get(f.proxy(), "/open/x")).await.expect("the connection was shut down");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    body.collect().await.unwrap();

    // Waiting for the app's head (it answers /slow/ after 10 s).
    let slow = tokio::spawn(sender.send_request(get(f.proxy(), "/slow/x")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sender.ready().await.unwrap();
    let resp = sender.send_request(get(f.proxy(), "/open/x")).await.expect("the connection was shut down");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    assert!(!conn.is_finished());
    assert_eq!(limit_count(f.admin(), "header_read_timeout").await, 0.0);
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    f.stop().await;
}

/// An h2c header block is bounded by `--max-header-bytes` (as h2 counts it: names, values and
/// 32 bytes per field), refused by h2 itself (431, no body) before it reaches the proxy.
#[tokio::test]
async fn an_h2c_header_block_over_max_header_bytes_is_refused_by_h2() {
    let mut f = fixture(&[("customer-api", allow_all())], Vec::new(), |_| {}).await;
    let (mut sender, _conn) = h2c(f.proxy()).await;
    let big = "a".repeat(20 * 1024);
    let req = Request::get(format!("http://{}/open/x", f.proxy()))
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "answered by the proxy, not h2: {body:?}");
    assert!(f.upstream.targets().is_empty());
    f.stop().await;
}

/// An admin connection that starts no request is closed after 5 s even with a longer
/// `--header-read-timeout` (30 s here), so that connections held open free the admin port's
/// 64 slots quickly and the kubelet's probes keep finding one.
#[tokio::test]
async fn an_idle_admin_connection_is_closed_after_five_seconds() {
    let mut f = fixture(&[("customer-api", allow_all())], Vec::new(), |s| {
        s.limits.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(f.admin()).await.unwrap();
    let begun = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), stream.read_to_end(&mut out))
        .await
        .expect("the idle admin connection is still open")
        .ok();
    let after = begun.elapsed();
    assert!(after >= Duration::from_secs(4), "closed after {after:?}");
    assert_eq!(support::get(f.admin(), "/healthz").await.status, 200);
    f.stop().await;
}

/// `custos_sidecar_limit_rejections_total{limit="<limit>"}` once it is at least `at_least`
/// (counted when the server's connection task ends), or what it is after 2 s.
async fn limit_count_reaching(admin: SocketAddr, limit: &str, at_least: f64) -> f64 {
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = limit_count(admin, limit).await;
        if counted >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    counted
}

/// Sends `n` requests for `path` on `sender`, 50 at a time, and drops each once it has been
/// sent and not answered within 30 ms: hyper's client then resets its stream (RST_STREAM in a
/// segment of its own, after the HEADERS the proxy has accepted and forwarded to the app).
async fn send_and_cancel(sender: &SendRequest<Full<Bytes>>, addr: SocketAddr, path: &str, n: usize) {
    for _ in 0..n.div_ceil(50) {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let mut sender = sender.clone();
                let req = get(addr, path);
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(30), sender.send_request(req)).await;
                    }
                })
            })
            .collect();
        for task in batch {
            task.await.unwrap();
        }
    }
}

/// An h2c client that resets every stream it opens once the proxy has called the app (which
/// h2's own limit on resets, counting only streams reset before they are accepted, does not
/// see) has its connection closed past 512 resets within a second, counted as
/// `h2_reset_flood`; a client whose 300 requests complete keeps its connection.
#[tokio::test]
async fn an_h2c_client_resetting_streams_in_a_flood_is_closed() {
    let mut f = fixture(&[("customer-api", allow_all())], Vec::new(), |_| {}).await;

    // 300 requests answered: the connection stays.
    let (sender, conn) = h2c(f.proxy()).await;
    for _ in 0..6 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let mut sender = sender.clone();
                let req = get(f.proxy(), "/open/x");
                tokio::spawn(async move {
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                })
            })
            .collect();
        for task in batch {
            task.await.unwrap();
        }
    }
    let mut sender_ok = sender.clone();
    let resp = sender_ok.send_request(get(f.proxy(), "/open/x")).await.expect("the connection was closed");
    assert_eq!(resp.status(), 200);
    assert!(!conn.is_finished());

    // 1,200 requests sent to an app that answers after 10 s, each reset 30 ms later.
    let (mut sender, conn) = h2c(f.proxy()).await;
    send_and_cancel(&sender, f.proxy(), "/slow/x", 1200).await;
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the connection resetting its streams is still open")
        .unwrap()
        .ok();
    assert!(sender.send_request(get(f.proxy(), "/open/x")).await.is_err());
    assert_eq!(limit_count_reaching(f.admin(), "h2_reset_flood", 1.0).await, 1.0);

    // The well-behaved connection is still there.
    let resp = sender_ok.send_request(get(f.proxy(), "/open/x")).await.expect("the connection was closed");
    assert_eq!(resp.status(), 200);
    assert_eq!(limit_count(f.admin(), "h2_reset_flood").await, 1.0);
    f.stop().await;
}
