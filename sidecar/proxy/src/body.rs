//! Body types of the proxy: the response body (which emits the request's audit event once it
//! has been sent or dropped), and buffering and decoding of responses that must be
//! transformed. The request body is [`crate::request_body`]'s.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::audit::PendingEvent;
use crate::budget::Reservation;
use crate::request_body::RequestBody;
use crate::upstream::UpstreamBody;

/// The app's response body (its connection goes back to the idle list when it ends).
pub(crate) type AppBody = UpstreamBody<RequestBody>;

/// The body of every response the proxy sends.
pub(crate) struct ProxyBody {
    inner: Inner,
    /// The audit event of the request, emitted when the body ends or is dropped.
    pending: Option<PendingEvent>,
}

enum Inner {
    /// A body held in memory (generated).
    Full(Option<Bytes>),
    /// A body read into memory under a buffer budget (the app's bytes, or what the plans made
    /// of them), which keeps its share of the budget until it is sent or dropped.
    Held(Box<Held>),
    /// The app's body, streamed through.
    Stream(AppBody),
    /// Bytes already read from the app, then the rest of its body; `held` is their share of
    /// the buffer budget they were read under, given back as they are handed out (`buffered`:
    /// the bytes still in `prefix`).
    Chain { prefix: VecDeque<Bytes>, rest: Option<AppBody>, held: Reservation, buffered: u64 },
    /// The app's body, streamed through while a copy is kept for when it ends.
    Tee(Box<Tee>),
}

/// What a tee kept of the app's body when the body ended.
pub(crate) enum Teed {
    /// The whole body as the app sent it, and the reservation that holds it.
    Whole(Bytes, Reservation),
    /// The copy was given up on the way: why (a reason code).
    Dropped(&'static str),
    /// The body did not reach its end (the client went away, the app failed mid-body).
    Incomplete,
}

/// Called once when a teed body ends (or is dropped), with what the tee kept and the
/// request's audit event, which it must complete and emit.
pub(crate) type TeeEnd = Box<dyn FnOnce(Teed, PendingEvent) + Send>;

/// Why a tee gave up its copy: it would not fit the dry-run buffers even alone.
pub(crate) const DRY_RUN_BUFFER_TOO_SMALL: &str = "dry_run_buffer_too_small";
/// Why a tee gave up its copy: the dry-run buffers had no room left.
pub(crate) const DRY_RUN_BUFFER_EXHAUSTED: &str = "dry_run_buffer_exhausted";
/// Why a tee gave up its copy: the body was still arriving at the request's deadline.
pub(crate) const UPSTREAM_TIMEOUT: &str = "upstream_timeout";

/// The largest piece of a [`Inner::Held`] body handed to hyper at once, as a copy: hyper (and
/// a client that stops reading) then holds at most its own write buffer of copies, never the
/// whole buffer, which lives (and stays counted) until the body is sent or dropped.
const HELD_CHUNK: usize = 64 * 1024;

/// [`Inner::Held`]'s state.
pub(crate) struct Held {
    /// What is left to send from `sent` on; empty once all was handed out.
    bytes: Bytes,
    sent: usize,
    /// The share of the budget `bytes` are counted in: their length.
    reservation: Reservation,
}

impl Held {
    /// The next piece to hand out: the whole body when it is small (no copy), else a copy of
    /// the next [`HELD_CHUNK`] bytes. The buffer and its reservation go with the last piece.
    fn next(&mut self) -> Option<Bytes> {
        let left = self.bytes.len() - self.sent;
        if left == 0 {
            return None;
        }
        let piece = if self.sent == 0 && left <= HELD_CHUNK {
            std::mem::take(&mut self.bytes)
        } else {
            let n = left.min(HELD_CHUNK);
            let piece = Bytes::copy_from_slice(&self.bytes[self.sent..self.sent + n]);
            self.sent += n;
            piece
        };
        if self.sent >= self.bytes.len() {
            self.bytes = Bytes::new();
            self.sent = 0;
            self.reservation.shrink_to(0);
        }
        Some(piece)
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.sent) as u64
    }
}

/// How much of the app's body a tee keeps, and for how long.
pub(crate) struct TeeLimits {
    /// Most bytes kept: past it, the copy is given up as `response_too_large`.
    pub bytes: u64,
    /// The size of the buffers the copy is held in: past it (and within `bytes`), the copy is
    /// given up as [`DRY_RUN_BUFFER_TOO_SMALL`].
    pub room: u64,
    /// A copy held past this is given up as [`UPSTREAM_TIMEOUT`] (also while the body
    /// stalls).
    pub until: tokio::time::Instant,
    /// Give up as `response_not_json` at once when the body's first byte (past whitespace)
    /// cannot start JSON (an identity-encoded body).
    pub sniff_json: bool,
}

/// [`Inner::Tee`]'s state.
pub(crate) struct Tee {
    body: AppBody,
    /// The copy, one buffer (its capacity is what `reservation` holds).
    copy: BytesMut,
    /// The body's length, when it said.
    exact: Option<u64>,
    limits: TeeLimits,
    reservation: Reservation,
    /// Fires at `limits.until` while a copy is held.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the first byte past whitespace was seen (`TeeLimits::sniff_json`).
    started: bool,
    dropped: Option<&'static str>,
    end: Option<TeeEnd>,
}

impl Tee {
    /// Keeps a copy of `data`, unless the copy was given up.
    fn keep(&mut self, data: &[u8]) {
        if self.dropped.is_some() || data.is_empty() {
            return;
        }
        if self.limits.sniff_json
            && !self.started
            && let Some(&first) = data.iter().find(|b| !b.is_ascii_whitespace())
        {
            self.started = true;
            if !matches!(first, b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') {
                return self.give_up("response_not_json");
            }
        }
        if tokio::time::Instant::now() > self.limits.until {
            return self.give_up(UPSTREAM_TIMEOUT);
        }
        let needed = (self.copy.len() + data.len()) as u64;
        if needed > self.limits.bytes {
            return self.give_up("response_too_large");
        }
        if needed > self.limits.room {
            return self.give_up(DRY_RUN_BUFFER_TOO_SMALL);
        }
        if needed > self.copy.capacity() as u64 {
            // The body's length when it said so, else double: the reservation holds the
            // capacity, allocated exactly.
            let ceiling = self.limits.bytes.min(self.limits.room);
            let doubled = (self.copy.capacity() as u64).saturating_mul(2).max(4096);
            let capacity = self.exact.filter(|&n| n >= needed).unwrap_or(doubled).min(ceiling).max(needed);
            if !self.reservation.grow(capacity - self.copy.capacity() as u64) {
                return self.give_up(DRY_RUN_BUFFER_EXHAUSTED);
            }
            let mut grown = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(usize::MAX));
            grown.extend_from_slice(&self.copy);
            self.copy = grown;
            if self.deadline.is_none() {
                self.deadline = Some(Box::pin(tokio::time::sleep_until(self.limits.until)));
            }
        }
        self.copy.extend_from_slice(data);
    }

    /// The next frame of the app's body, kept. Out of line, as [`Self::finish`]: the common
    /// bodies' polling stays as small as it was without tees (hyper's dispatcher inlines it).
    #[inline(never)]
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.keep(data);
                }
            }
            // A body that stalls gives its copy up at the deadline, not at its next bytes.
            Poll::Pending if self.dropped.is_none() => {
                if let Some(deadline) = &mut self.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    self.give_up(UPSTREAM_TIMEOUT);
                }
            }
            _ => {}
        }
        polled
    }

    /// Hands what the tee kept and the request's event `pending` to the end callback (once),
    /// which emits the event; emits it itself when the callback already ran.
    #[cold]
    #[inline(never)]
    fn finish(&mut self, pending: PendingEvent) {
        match self.end.take() {
            Some(end) => {
                let teed = self.teed(!pending.is_incomplete());
                end(teed, pending);
            }
            None => pending.emit(),
        }
    }

    fn give_up(&mut self, code: &'static str) {
        self.dropped = Some(code);
        self.copy = BytesMut::new();
        self.reservation.shrink_to(0);
        self.deadline = None;
    }

    /// What the tee kept: `complete` when the body reached its end.
    fn teed(&mut self, complete: bool) -> Teed {
        if !complete {
            return Teed::Incomplete;
        }
        if let Some(code) = self.dropped {
            return Teed::Dropped(code);
        }
        let whole = std::mem::take(&mut self.copy).freeze();
        Teed::Whole(whole, self.reservation.take())
    }
}

impl ProxyBody {
    /// A body held in memory.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody { inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())), pending: None }
    }

    /// A body read into memory under `reservation` (a share of a buffer budget), which it
    /// keeps, shrunk to the body's length, until the body is sent or dropped: bytes a client
    /// is slow to take stay counted while they wait.
    pub(crate) fn held(bytes: Bytes, mut reservation: Reservation) -> Self {
        reservation.shrink_to(if bytes.is_empty() { 0 } else { bytes.len() as u64 });
        let held = Held { bytes, sent: 0, reservation };
        ProxyBody { inner: Inner::Held(Box::new(held)), pending: None }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        ProxyBody { inner: Inner::Full(None), pending: None }
    }

    /// The app's body, untouched.
    pub(crate) fn stream(body: AppBody) -> Self {
        ProxyBody { inner: Inner::Stream(body), pending: None }
    }

    /// Buffered chunks of the app's body followed by the rest of it; `held` (their share of
    /// a buffer budget) is kept, shrunk to what is left of them, until they are handed out.
    pub(crate) fn chain(prefix: VecDeque<Bytes>, rest: Option<AppBody>, mut held: Reservation) -> Self {
        let buffered: u64 = prefix.iter().map(|b| b.len() as u64).sum();
        held.shrink_to(buffered);
        ProxyBody { inner: Inner::Chain { prefix, rest, held, buffered }, pending: None }
    }

    /// The app's body, untouched, while a copy is held on `reservation` within `limits`;
    /// `end` gets the copy (or why it was given up) when the body ends. A body that says it
    /// is longer than the limit is not copied at all.
    pub(crate) fn tee(body: AppBody, limits: TeeLimits, reservation: Reservation, end: TeeEnd) -> Self {
        let hint = body.size_hint();
        let mut tee = Tee {
            body,
            copy: BytesMut::new(),
            exact: hint.exact(),
            limits,
            reservation,
            deadline: None,
            started: false,
            dropped: None,
            end: Some(end),
        };
        if hint.lower() > tee.limits.bytes {
            tee.give_up("response_too_large");
        } else if hint.lower() > tee.limits.room {
            tee.give_up(DRY_RUN_BUFFER_TOO_SMALL);
        }
        ProxyBody { inner: Inner::Tee(Box::new(tee)), pending: None }
    }

    /// Attaches the audit event, emitted (with the bytes sent) when the body ends.
    pub(crate) fn with_event(mut self, pending: PendingEvent) -> Self {
        self.pending = Some(pending);
        self
    }

    fn finish(&mut self) {
        let Some(p) = self.pending.take() else { return };
        match &mut self.inner {
            Inner::Tee(tee) => tee.finish(p),
            _ => p.emit(),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Held(held) => Poll::Ready(held.next().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(body) => Pin::new(body).poll_frame(cx),
            Inner::Tee(tee) => tee.poll_frame(cx),
            Inner::Chain { prefix, rest, held, buffered } => match prefix.pop_front() {
                Some(b) => {
                    *buffered = buffered.saturating_sub(b.len() as u64);
                    held.shrink_to(*buffered);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => match rest {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                },
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(p)) = (frame.data_ref(), this.pending.as_mut()) {
                    p.add_bytes(data.len() as u64);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.as_mut() {
                    p.mark_incomplete();
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Held(held) => held.left() == 0,
            Inner::Stream(body) => body.is_end_stream(),
            Inner::Tee(tee) => tee.body.is_end_stream(),
            Inner::Chain { prefix, rest, .. } => {
                prefix.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Held(held) => SizeHint::with_exact(held.left()),
            Inner::Stream(body) => body.size_hint(),
            Inner::Tee(tee) => tee.body.size_hint(),
            Inner::Chain { prefix: _, rest, held: _, buffered } => {
                buffered_then(*buffered, rest.as_ref().map(Body::size_hint))
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if !self.is_end_stream()
            && let Some(p) = self.pending.as_mut()
        {
            p.mark_incomplete();
        }
        self.finish();
    }
}

/// The size of `buffered` bytes followed by a body of size `rest` (none: nothing follows).
#[inline]
pub(crate) fn buffered_then(buffered: u64, rest: Option<SizeHint>) -> SizeHint {
    let Some(rest) = rest else {
        return SizeHint::with_exact(buffered);
    };
    let mut hint = SizeHint::new();
    hint.set_lower(rest.lower().saturating_add(buffered));
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper.saturating_add(buffered));
    }
    hint
}

/// How reading a response body into memory ended ([`collect_limited`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Collected {
    /// The whole body is in the chunks.
    Complete,
    /// More than the limit: the chunks hold what was read, the body the rest (for
    /// pass-through).
    TooLarge,
    /// The memory budget had no room (counted as exhausted): the chunks and the rest, as for
    /// [`Collected::TooLarge`].
    NoRoom,
}

/// What [`collect_limited`] has read: the caller's, so that a read stopped from outside (a
/// time-out dropping the future) leaves them with the rest of the body.
#[derive(Default)]
pub(crate) struct Chunks {
    pub chunks: VecDeque<Bytes>,
    pub total: u64,
}

impl Chunks {
    /// The chunks, followed by what is left of `body`, as a body to pass on; `held` (the
    /// share of the budget the chunks were read under) goes with them until handed out.
    pub(crate) fn then(self, body: AppBody, held: Reservation) -> ProxyBody {
        let rest = if body.is_end_stream() { None } else { Some(body) };
        ProxyBody::chain(self.chunks, rest, held)
    }
}

/// Reads `body` into `read` up to `limit` bytes, taking them from `reservation` as they
/// arrive.
pub(crate) async fn collect_limited(
    body: &mut AppBody,
    read: &mut Chunks,
    limit: u64,
    reservation: &mut Reservation,
) -> Result<Collected, hyper::Error> {
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Ok(data) = frame.into_data() else {
            // Trailers of a body that is rewritten are dropped.
            continue;
        };
        let len = data.len() as u64;
        read.total = read.total.saturating_add(len);
        read.chunks.push_back(data);
        if read.total > limit {
            return Ok(Collected::TooLarge);
        }
        if !reservation.grow(len) {
            return Ok(Collected::NoRoom);
        }
    }
    Ok(Collected::Complete)
}

/// The chunks as one buffer of `total` bytes (no copy for a single chunk).
#[inline]
pub(crate) fn concat(mut chunks: VecDeque<Bytes>, total: u64) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
    for c in chunks {
        buf.extend_from_slice(&c);
    }
    buf.freeze()
}

/// A `Content-Encoding` the sidecar can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// No encoding.
    Identity,
    /// gzip (RFC 1952), also `x-gzip`.
    Gzip,
    /// deflate: zlib (RFC 1950), or raw deflate as some servers send.
    Deflate,
}

impl Encoding {
    /// The encoding `headers` declare (request or response): their one `Content-Encoding`
    /// field parsed; `None` for one the sidecar cannot decode, and for several fields (codings
    /// layered one on another).
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<Encoding> {
        let mut fields = headers.get_all(http::header::CONTENT_ENCODING).iter();
        let first = fields.next();
        if fields.next().is_some() {
            return None;
        }
        Encoding::parse(first.map(http::HeaderValue::as_bytes))
    }

    /// Parses a `Content-Encoding` value; `None` for codings the sidecar cannot decode
    /// (br, zstd, several layered codings).
    pub(crate) fn parse(value: Option<&[u8]>) -> Option<Encoding> {
        let Some(value) = value else {
            return Some(Encoding::Identity);
        };
        let v = std::str::from_utf8(value).ok()?.trim();
        if v.is_empty() || v.eq_ignore_ascii_case("identity") {
            Some(Encoding::Identity)
        } else if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
            Some(Encoding::Gzip)
        } else if v.eq_ignore_ascii_case("deflate") {
            Some(Encoding::Deflate)
        } else {
            None
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The decoded body is larger than the limit.
    TooLarge,
    /// The body is not valid for its encoding.
    Corrupt,
}

/// Decodes `body` to at most `limit` bytes.
pub(crate) fn decode(body: Bytes, encoding: Encoding, limit: u64) -> Result<Bytes, DecodeError> {
    fn read_all(reader: impl Read, limit: u64) -> Result<Bytes, DecodeError> {
        let mut out = Vec::new();
        reader.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|_| DecodeError::Corrupt)?;
        if out.len() as u64 > limit {
            return Err(DecodeError::TooLarge);
        }
        Ok(Bytes::from(out))
    }
    match encoding {
        Encoding::Identity => Ok(body),
        Encoding::Gzip => read_all(flate2::read::MultiGzDecoder::new(&body[..]), limit),
        Encoding::Deflate => match read_all(flate2::read::ZlibDecoder::new(&body[..]), limit) {
            Err(DecodeError::Corrupt) => read_all(flate2::read::DeflateDecoder::new(&body[..]), limit),
            other => other,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        Bytes::from(e.finish().unwrap())
    }

    #[test]
    fn sizes_of_a_buffered_part_and_what_follows() {
        assert_eq!(buffered_then(5, None).exact(), Some(5));
        assert_eq!(buffered_then(5, Some(SizeHint::with_exact(10))).exact(), Some(15));
        let open = buffered_then(5, Some(SizeHint::new()));
        assert_eq!((open.lower(), open.upper()), (5, None));
        assert_eq!(buffered_then(u64::MAX, Some(SizeHint::with_exact(1))).exact(), Some(u64::MAX));
    }

    #[test]
    fn encodings() {
        assert_eq!(Encoding::parse(None), Some(Encoding::Identity));
        assert_eq!(Encoding::parse(Some(b"GZIP")), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(Some(b"x-gzip")), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(Some(b"deflate")), Some(Encoding::Deflate));
        assert_eq!(Encoding::parse(Some(b"br")), None);
        assert_eq!(Encoding::parse(Some(b"gzip, br")), None);
        let mut headers = http::HeaderMap::new();
        assert_eq!(Encoding::of(&headers), Some(Encoding::Identity));
        headers.append(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
        assert_eq!(Encoding::of(&headers), Some(Encoding::Gzip));
        headers.append(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("identity"));
        assert_eq!(Encoding::of(&headers), None, "two fields: layered codings");
    }

    #[test]
    fn decodes_gzip_and_both_deflates() {
        let data = b"{\"items\":[1,2,3]}".repeat(10);
        assert_eq!(decode(gzip(&data), Encoding::Gzip, 1 << 20).unwrap(), data);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&data).unwrap();
        assert_eq!(decode(Bytes::from(z.finish().unwrap()), Encoding::Deflate, 1 << 20).unwrap(), data);
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        d.write_all(&data).unwrap();
        assert_eq!(decode(Bytes::from(d.finish().unwrap()), Encoding::Deflate, 1 << 20).unwrap(), data);
        assert_eq!(decode(Bytes::from_static(b"not gzip"), Encoding::Gzip, 100), Err(DecodeError::Corrupt));
    }

    #[test]
    fn decoding_is_bounded() {
        let bomb = gzip(&vec![b'a'; 1 << 20]);
        assert!(bomb.len() < 10_000);
        assert_eq!(decode(bomb, Encoding::Gzip, 1000), Err(DecodeError::TooLarge));
    }
}
