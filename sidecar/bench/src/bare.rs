//! The floor of the sidecar's proxy stack: a reverse proxy with nothing but what the sidecar
//! is built on (hyper's HTTP/1 and h2c server, the sidecar's own keep-alive connections to
//! the app, `custos_sidecar::upstream`, one single-threaded Tokio runtime per CPU with its
//! own `SO_REUSEPORT` listener, as `custos sidecar` runs) and none of its work: no identity, decision, transform, quotas,
//! metrics or audit. Run by the harness as a child process (`sidecar-bench --bare-proxy
//! LISTEN --upstream-addr UPSTREAM`), so that its CPU time is its own. It tells how much of
//! the sidecar's cost against nginx is the stack's and how much is the sidecar's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result};
use custos_sidecar::upstream::{Replay, Upstream, UpstreamCounters, UpstreamSettings};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpSocket;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Serves on `listen` until killed, forwarding every request to `upstream`.
pub(crate) fn run(listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    // Tokio binds within a runtime; each thread registers its socket with its own.
    let binder = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let _entered = binder.enter();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(listen).with_context(|| format!("cannot bind {listen}"))?;
        let listener = socket.listen(1024)?.into_std()?;
        handles.push(std::thread::spawn(move || serve(listener, upstream)));
    }
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("a proxy thread panicked"))??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, upstream: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let connections =
            Arc::new(Upstream::<Forwarded>::new(UpstreamSettings::default(), UpstreamCounters::default()));
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let connections = connections.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    forward(connections.clone(), upstream, req)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(
    connections: Arc<Upstream<Forwarded>>,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    // Origin-form, as the sidecar sends it (wrk's requests carry `Host`).
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    match Uri::try_from(target) {
        Ok(uri) => parts.uri = uri,
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    }
    match connections.send(upstream, Request::from_parts(parts, Forwarded(Some(body)))).await {
        Ok(response) => Ok(response.map(BodyExt::boxed_unsync)),
        Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
    }
}

/// The client's request body as forwarded (streamed: only a request without one is sent
/// again when the app closes the connection under it).
struct Forwarded(Option<Incoming>);

impl Replay for Forwarded {
    fn replay(&self) -> Option<Self> {
        self.0.as_ref().is_none_or(hyper::body::Body::is_end_stream).then_some(Forwarded(None))
    }
}

impl hyper::body::Body for Forwarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = code;
    response
}
