//! (h) Slow uploads: clients that send a request body one byte a second, as a slow mobile
//! link or a slowloris attack does, while wrk measures ordinary GETs through the same
//! sidecar. A sidecar that forwards bodies as they arrive lets each such client hold one of
//! its connections to the app until the upstream time-out; one that reads small bodies first
//! (`--request-buffer-bytes`, the default) holds none.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// The declared size of each slow client's body: it never arrives in full during a run.
pub(crate) const BODY_BYTES: usize = 1000;

/// The policy of the slow-upload sidecars: GETs of customers (the measured requests) and
/// POSTs of orders (the slow ones) allowed, without masks.
pub(crate) fn policy_yaml() -> String {
    "apiVersion: custos.dev/v1alpha1\nkind: DataAccessPolicy\nmetadata: {name: uploads, namespace: bench}\nspec:\n  workload: {selector: {matchLabels: {app: customer-api}}, appPort: 8080}\n  defaultAction: Deny\n  rules:\n    - name: read-customers\n      action: Allow\n      to: {methods: [GET], paths: [\"/customers/{id}\"]}\n    - name: place-orders\n      action: Allow\n      to: {methods: [POST], paths: [\"/orders\"]}\n".to_owned()
}

/// `n` connections, each sending a POST's head and then one byte of its body a second,
/// until dropped.
pub(crate) struct SlowUploads {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowUploads {
    /// Opens the connections to `addr` and starts trickling.
    pub(crate) fn start(addr: SocketAddr, n: usize) -> Result<SlowUploads> {
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: customer-api\r\nContent-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n"
        );
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = TcpStream::connect(addr).context("a slow client cannot connect")?;
            c.write_all(head.as_bytes())?;
            clients.push(c);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                for c in &mut clients {
                    // A client the sidecar answered (and closed) just stops.
                    let _ = c.write_all(b"x");
                }
                for _ in 0..10 {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Ok(SlowUploads { stop, thread: Some(thread) })
    }
}

impl Drop for SlowUploads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
