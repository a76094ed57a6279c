//! The benchmark's upstream app: answers every request with the same ~2 KB JSON page of
//! synthetic customers (a POST once it has read the body), over HTTP/1.1 keep-alive, on its
//! own single-threaded runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The response body: `{"items": [...]}` of synthetic customers, about 2 KB.
pub(crate) fn body() -> &'static Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        let items: Vec<serde_json::Value> = (0..18)
            .map(|i| {
                serde_json::json!({
                    "id": format!("C{:05}", 1000 + i),
                    "name": format!("Customer Name {i}"),
                    "phone": format!("+86 138 {:04} {:04}", 1000 + i, 2000 + i),
                    "branch": format!("HB-{:02}", i % 3),
                    "city": "Wuhan",
                    "parcels": i * 3,
                })
            })
            .collect();
        Bytes::from(serde_json::to_vec(&serde_json::json!({"items": items, "page": 1})).unwrap_or_default())
    })
}

/// Connections the app has accepted so far.
pub(crate) fn accepted() -> u64 {
    ACCEPTED.load(Ordering::Relaxed)
}

static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// The most connections the app has had open at once since the last call, which starts the
/// next count from those open now; and those open now.
pub(crate) fn take_peak_open() -> (u64, u64) {
    let open = OPEN.load(Ordering::Relaxed);
    (PEAK.swap(open, Ordering::Relaxed), open)
}

static OPEN: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Starts the app on an ephemeral port in a background thread.
pub(crate) fn start() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                ACCEPTED.fetch_add(1, Ordering::Relaxed);
                let open = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
                PEAK.fetch_max(open, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<hyper::body::Incoming>| async {
                        if req.method() == hyper::Method::POST {
                            // Read the body before answering, as API frameworks do.
                            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(body().clone()))
                                .unwrap_or_default(),
                        )
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                    OPEN.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
    });
    Ok(addr)
}
