//! A client connection's writes, given up when the client stops reading.
//!
//! A response streamed to a client holds one of the app's connections (and its slot, see
//! [`crate::upstream`]) until the client has read it. A client that stops reading (its receive
//! window full, the socket's send buffer with it) would hold them for ever, and a few hundred
//! such clients every connection to the app. As nginx's `send_timeout`, a write that cannot
//! make progress for `--response-send-timeout` ends the connection: hyper drops its requests,
//! and their response bodies give their app connections back. The timer is made only when a
//! write has to wait, and dropped by the next write that goes through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `io` whose writes fail once one has waited `limit` without progress.
pub(crate) struct SendTimeout<T> {
    io: T,
    limit: Duration,
    /// Armed while a write waits.
    waiting: Option<Pin<Box<Sleep>>>,
    /// Counts the connections ended so.
    timed_out: Counter,
}

impl<T> SendTimeout<T> {
    pub(crate) fn new(io: T, limit: Duration, timed_out: Counter) -> Self {
        SendTimeout { io, limit, waiting: None, timed_out }
    }

    /// What a write that returned `polled` means: progress disarms the timer; waiting arms
    /// it, and past the limit is an error.
    fn judge<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.waiting = None;
        self.timed_out.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {limit:?}: connection closed"),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.judge(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.judge(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.judge(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing: writes fill the pipe, then fail at the limit; a peer that
    /// reads in time keeps the connection however long the whole transfer takes.
    #[tokio::test(start_paused = true)]
    async fn a_write_waiting_past_the_limit_fails_and_progress_resets_the_clock() {
        let counter = Counter::default();
        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = SendTimeout::new(near, Duration::from_secs(60), counter.clone());
        let chunk = vec![b'x'; 512];
        io.write_all(&[b'x'; 1024]).await.unwrap();
        // The pipe full, and 512 bytes read every 50 s: each write waits, never 60 s in a row.
        for _ in 0..6 {
            let (wrote, ()) = tokio::join!(io.write_all(&chunk), async {
                tokio::time::sleep(Duration::from_secs(50)).await;
                let mut got = vec![0; 512];
                far.read_exact(&mut got).await.unwrap();
            });
            wrote.unwrap();
        }
        assert_eq!(counter.get(), 0);
        // Nobody reads: the pipe fills, and a write fails after 60 s.
        let started = tokio::time::Instant::now();
        let mut error = None;
        for _ in 0..8 {
            if let Err(e) = io.write_all(&chunk).await {
                error = Some(e);
                break;
            }
        }
        let error = error.expect("the write went through with nobody reading");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        assert_eq!(counter.get(), 1);
        drop(far);
    }
}
