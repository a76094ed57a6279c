//! (i) Large uploads: clients POST 1 MiB bodies (multipart with a text file, and JSON) over
//! keep-alive connections, as fast as they are answered, to a path where another method
//! would be decided otherwise (DELETE is denied), so that the sidecar checks each body for a
//! `_method` field on its way to the app; the same sidecar with `--forward-unchecked-bodies`
//! (bodies forwarded unread) is the baseline, and the app directly the floor.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The size of each upload's body.
pub(crate) const BODY_BYTES: usize = 1 << 20;

/// A body of about [`BODY_BYTES`]: a multipart form with a title and a text file (lines of
/// CSV with a time in each, as exports and imports are), or a JSON document of the same rows.
pub(crate) fn body(multipart: bool) -> (&'static str, Vec<u8>) {
    let mut rows = String::with_capacity(BODY_BYTES);
    let mut i = 0;
    while rows.len() < BODY_BYTES - 512 {
        // A time in each row: `:` is where the multipart reader stops to look for a key.
        rows.push_str(&format!(
            "C{:07},Customer Name {i},+86 138 {:04} {:04},HB-{:02},Wuhan,2026-12-08T{:02}:{:02}:00Z\n",
            i,
            i % 10_000,
            (i * 7) % 10_000,
            i % 3,
            i % 24,
            i % 60
        ));
        i += 1;
    }
    if multipart {
        let body = format!(
            "--BENCHBOUNDARY\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nimport\r\n--BENCHBOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"customers.csv\"\r\nContent-Type: text/csv\r\n\r\n{rows}\r\n--BENCHBOUNDARY--\r\n"
        );
        ("multipart/form-data; boundary=BENCHBOUNDARY", body.into_bytes())
    } else {
        let lines: Vec<&str> = rows.lines().collect();
        (
            "application/json",
            serde_json::to_vec(&serde_json::json!({"title": "import", "rows": lines})).unwrap_or_default(),
        )
    }
}

/// What the clients of one run did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Uploaded {
    /// Uploads answered 2xx.
    pub ok: u64,
    /// Uploads answered otherwise, or cut off.
    pub failed: u64,
    pub seconds: f64,
}

impl Uploaded {
    /// Body bytes per second of the 2xx uploads, in MiB.
    pub(crate) fn mib_per_second(&self) -> f64 {
        self.ok as f64 * BODY_BYTES as f64 / (1024.0 * 1024.0) / self.seconds.max(1e-9)
    }
}

/// `clients` threads POSTing `body` of `content_type` to `http://addr/orders` for `duration`.
pub(crate) fn run(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    content_type: &str,
    body: &[u8],
) -> Result<Uploaded> {
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: customer-api\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<Result<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let head = head.as_bytes();
                s.spawn(move || -> Result<(u64, u64)> {
                    let (mut ok, mut failed) = (0, 0);
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while Instant::now() < deadline {
                        if conn.is_none() {
                            let stream =
                                TcpStream::connect(addr).context("an upload client cannot connect")?;
                            stream.set_nodelay(true)?;
                            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                            conn = Some(BufReader::new(stream));
                        }
                        let Some(c) = conn.as_mut() else { continue };
                        match exchange(c, head, body) {
                            Ok((status, keep)) => {
                                if (200..300).contains(&status) {
                                    ok += 1
                                } else {
                                    failed += 1
                                }
                                if !keep {
                                    conn = None;
                                }
                            }
                            Err(_) => {
                                failed += 1;
                                conn = None;
                            }
                        }
                    }
                    Ok((ok, failed))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("an upload client panicked"))).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut out = Uploaded { seconds, ..Uploaded::default() };
    for r in results {
        let (ok, failed) = r?;
        out.ok += ok;
        out.failed += failed;
    }
    Ok(out)
}

/// One upload and its answer: the status and whether the connection stays open.
fn exchange(conn: &mut BufReader<TcpStream>, head: &[u8], body: &[u8]) -> Result<(u16, bool)> {
    let stream = conn.get_mut();
    stream.write_all(head)?;
    stream.write_all(body)?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
    let (mut length, mut keep) = (0usize, true);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("the connection closed in the answer's head");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().context("a bad Content-Length")?;
        } else if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    let mut answer = vec![0; length];
    conn.read_exact(&mut answer)?;
    Ok((status, keep))
}
