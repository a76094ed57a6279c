//! The TLS accept loop of the webhooks: rustls in front of hyper's HTTP/1.1 + HTTP/2 server
//! (chosen by ALPN), one task per connection, graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use custos_serve::{RequestStarted, first_request_within};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Time a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send its request headers (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish once `shutdown` resolves.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` over TLS with `tls` (build it with
/// [`crate::tls::server_config`]: TLS 1.2+, ALPN `h2` and `http/1.1`) until `shutdown`
/// resolves; then stops accepting, lets in-flight requests finish (at most 10 s) and returns.
///
/// Failed handshakes, failed accepts and broken connections are logged and do not stop the
/// server. The error is only for a listener that cannot report its address (not a listening
/// socket).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(64);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tracing::info!(%addr, "admission webhooks listening (TLS)");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let started = RequestStarted::new();
            let marker = started.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                marker.mark();
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            // hyper-util's protocol detection has no timer of its own.
            match first_request_within(watcher.watch(conn), started, HEADER_READ_TIMEOUT).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "webhook connection ended with an error"),
                Err(error) => tracing::debug!(%peer, %error, "webhook connection closed"),
            }
        });
        // Reap finished connection tasks.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    tracing::info!(in_flight_connections = connections.len(), "admission webhooks stopping: draining");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timeout: closing the remaining connections");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    tracing::info!("admission webhooks stopped");
    Ok(())
}
