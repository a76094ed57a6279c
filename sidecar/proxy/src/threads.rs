//! Proxy threads: each runs a single-threaded Tokio runtime with its own listening socket
//! (`SO_REUSEPORT`: the kernel spreads new connections over the sockets) and its own upstream
//! connections, so a request, its upstream exchange and its response are handled on one
//! thread without cross-thread wake-ups (the thread-per-core model of nginx and Envoy).
//! Shared state (config, quotas, metrics, the audit shipper) is the same for all threads.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::proxy::Shared;
use crate::server;

/// Backlog of each listening socket.
const BACKLOG: u32 = 1024;

/// Binds `addr` `count` times with `SO_REUSEPORT` (the first socket picks the port when
/// `addr`'s is 0). Must be called within a Tokio runtime; the sockets are handed over
/// unregistered so that each thread registers its own with its own runtime.
pub(crate) fn bind(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, Error> {
    let mut listeners = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let listener = bind_one(bound).map_err(|e| Error::Bind { addr: bound, source: e })?;
        bound = listener.local_addr().map_err(|e| Error::Bind { addr: bound, source: e })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// Where the proxy runs: on the caller's runtime, or on dedicated threads.
pub(crate) enum ProxyTask {
    /// One task on the caller's runtime.
    Local(JoinHandle<()>),
    /// Dedicated threads.
    Threads(Vec<std::thread::JoinHandle<()>>),
}

impl ProxyTask {
    /// Waits until every listener has stopped and drained.
    pub(crate) async fn wait(self) {
        match self {
            ProxyTask::Local(task) => {
                let _ = task.await;
            }
            ProxyTask::Threads(threads) => {
                let _ = tokio::task::spawn_blocking(move || {
                    for t in threads {
                        let _ = t.join();
                    }
                })
                .await;
            }
        }
    }
}

/// Starts one proxy thread per listener. `shared` is cloned per thread with its own upstream
/// connections (made inside the thread's runtime so that they are driven there) and counter
/// handles.
pub(crate) fn spawn(
    listeners: Vec<std::net::TcpListener>,
    shared: &Shared,
    shutdown: &watch::Receiver<bool>,
    drain_timeout: Duration,
) -> Result<ProxyTask, Error> {
    let count = listeners.len();
    let mut threads = Vec::with_capacity(count);
    for (i, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Task(format!("cannot build a proxy runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name(format!("custos-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "proxy thread cannot register its listener");
                            return;
                        }
                    };
                    let shared = Arc::new(shared.for_thread(count));
                    server::serve_proxy(listener, shared, shutdown, drain_timeout).await;
                });
            })
            .map_err(|e| Error::Task(format!("cannot start a proxy thread: {e}")))?;
        threads.push(thread);
    }
    Ok(ProxyTask::Threads(threads))
}
