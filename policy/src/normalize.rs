//! Request path normalisation.
//!
//! The sidecar matches policy globs against the *normalised* path of a request, never
//! against the raw request-target. [`normalize`] turns an HTTP request-target in
//! origin-form (`/a/b?x=1`) into a [`NormalizedPath`] or rejects it with a
//! [`PathRejection`] when the target is ambiguous, i.e. when a backend might reasonably
//! interpret it differently from the proxy (encoded slashes, double encoding, `;` path
//! parameters, backslashes, ...). Rejecting is the only safe answer to ambiguity: a deny
//! rule on `/customers/export` must not be bypassable with `/customers/%65xport;x`.
//!
//! # Rules
//!
//! Checked on the whole target first:
//!
//! 1. it must start with `/` (asterisk-form `*`, absolute-form `http://host/...` and the
//!    empty string are rejected) — [`PathRejection::NotOriginForm`];
//! 2. a `#` anywhere (fragments are never sent by clients) — [`PathRejection::Fragment`];
//! 3. the query is split off at the first `?` and kept verbatim (it is not used for
//!    matching);
//! 4. the path part (before `?`) may be at most [`MAX_PATH_LEN`] bytes —
//!    [`PathRejection::TooLong`].
//!
//! Then each `/`-separated segment, left to right (the first problem found wins):
//!
//! - empty segments (`//`) are dropped;
//! - every `%XX` is decoded; a `%` not followed by two hex digits is
//!   [`PathRejection::InvalidPercentEncoding`];
//! - a decoded `/` is [`PathRejection::EncodedSlash`]; `\` raw or decoded is
//!   [`PathRejection::Backslash`]; ASCII control characters (0x00–0x1F, 0x7F) raw or decoded
//!   are [`PathRejection::ControlCharacter`]; `;` raw or decoded is
//!   [`PathRejection::PathParameter`]; a decoded `?` or `#` is
//!   [`PathRejection::EncodedDelimiter`];
//! - a decoded `%` followed by two (possibly themselves encoded) hex digits, as in `%252e`
//!   or `%2541`, is [`PathRejection::DoubleEncoding`];
//! - the decoded bytes of the segment must be valid UTF-8 (this also rejects overlong
//!   encodings such as `%C0%AE`) — [`PathRejection::InvalidUtf8`];
//! - a segment that decodes to `.` is dropped, one that decodes to `..` removes the
//!   previous segment, or is [`PathRejection::AboveRoot`] when there is none;
//! - more than [`MAX_SEGMENTS`] segments after resolution is [`PathRejection::TooLong`].
//!
//! The result always starts with `/` and has no trailing `/` (except the root `/`).
//! Segments keep their decoded text (`/caf%C3%A9` becomes `/café`), with one exception:
//! a decoded `%` (from `%25`) is written back as `%25`, so that [`NormalizedPath::as_str`]
//! is itself a request-target that normalises to the same path (normalisation is
//! idempotent). Case is preserved; no Unicode normalisation is applied.

use std::fmt;

use thiserror::Error;

/// Maximum length in bytes of the path part (before `?`) of a request-target.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Maximum number of segments of a normalised path.
pub const MAX_SEGMENTS: usize = 256;

/// Why a request-target was rejected by [`normalize`].
///
/// Messages and [`code`](PathRejection::code)s name the kind of problem only; they never
/// contain the path, which may hold personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum PathRejection {
    /// The target does not start with `/` (empty, asterisk-form or absolute-form).
    #[error("request target is not in origin-form (must start with '/')")]
    NotOriginForm,
    /// The target contains `#`.
    #[error("request target contains a fragment ('#')")]
    Fragment,
    /// The path is longer than [`MAX_PATH_LEN`] bytes or has more than [`MAX_SEGMENTS`]
    /// segments.
    #[error("path is too long or has too many segments")]
    TooLong,
    /// A `%` is not followed by two hexadecimal digits.
    #[error("invalid percent-encoding in path")]
    InvalidPercentEncoding,
    /// A percent-encoded `/` (`%2F`).
    #[error("percent-encoded '/' in path")]
    EncodedSlash,
    /// A backslash, raw or percent-encoded (`%5C`).
    #[error("backslash in path")]
    Backslash,
    /// An ASCII control character (NUL, tab, CR, LF, DEL, ...), raw or percent-encoded.
    #[error("control character in path")]
    ControlCharacter,
    /// Double percent-encoding: a decoded `%` followed by two hex digits (`%252e`).
    #[error("double percent-encoding in path")]
    DoubleEncoding,
    /// A `;` path parameter, raw or percent-encoded (`%3B`).
    #[error("path parameter (';') in path")]
    PathParameter,
    /// A percent-encoded `?` (`%3F`) or `#` (`%23`), which a backend that decodes before
    /// parsing would read as the start of the query or fragment.
    #[error("percent-encoded '?' or '#' in path")]
    EncodedDelimiter,
    /// The decoded bytes are not valid UTF-8 (including overlong encodings).
    #[error("path does not decode to valid UTF-8")]
    InvalidUtf8,
    /// A `..` segment climbs above the root.
    #[error("'..' segment climbs above the root")]
    AboveRoot,
}

impl PathRejection {
    /// Every variant, e.g. to pre-register metric label values.
    pub const ALL: [PathRejection; 12] = [
        PathRejection::NotOriginForm,
        PathRejection::Fragment,
        PathRejection::TooLong,
        PathRejection::InvalidPercentEncoding,
        PathRejection::EncodedSlash,
        PathRejection::Backslash,
        PathRejection::ControlCharacter,
        PathRejection::DoubleEncoding,
        PathRejection::PathParameter,
        PathRejection::EncodedDelimiter,
        PathRejection::InvalidUtf8,
        PathRejection::AboveRoot,
    ];

    /// A stable snake_case code for metric labels and audit reasons, e.g. `"encoded_slash"`.
    pub fn code(&self) -> &'static str {
        match self {
            PathRejection::NotOriginForm => "not_origin_form",
            PathRejection::Fragment => "fragment",
            PathRejection::TooLong => "too_long",
            PathRejection::InvalidPercentEncoding => "invalid_percent_encoding",
            PathRejection::EncodedSlash => "encoded_slash",
            PathRejection::Backslash => "backslash",
            PathRejection::ControlCharacter => "control_character",
            PathRejection::DoubleEncoding => "double_encoding",
            PathRejection::PathParameter => "path_parameter",
            PathRejection::EncodedDelimiter => "encoded_delimiter",
            PathRejection::InvalidUtf8 => "invalid_utf8",
            PathRejection::AboveRoot => "above_root",
        }
    }
}

/// Number of segment boundaries stored inline before spilling to the heap.
const INLINE_SEGMENTS: usize = 16;

/// End offsets (exclusive, into the path) of each segment. Paths of up to
/// [`INLINE_SEGMENTS`] segments need no allocation besides the path itself.
#[derive(Clone)]
enum SegmentEnds {
    Inline { len: u8, ends: [u16; INLINE_SEGMENTS] },
    Heap(Vec<u16>),
}

impl SegmentEnds {
    fn new() -> Self {
        SegmentEnds::Inline { len: 0, ends: [0; INLINE_SEGMENTS] }
    }

    fn as_slice(&self) -> &[u16] {
        match self {
            SegmentEnds::Inline { len, ends } => &ends[..usize::from(*len)],
            SegmentEnds::Heap(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn last(&self) -> Option<u16> {
        self.as_slice().last().copied()
    }

    fn push(&mut self, end: u16) {
        match self {
            SegmentEnds::Inline { len, ends } => {
                if let Some(slot) = ends.get_mut(usize::from(*len)) {
                    *slot = end;
                    *len += 1;
                } else {
                    let mut v = Vec::with_capacity(INLINE_SEGMENTS * 2);
                    v.extend_from_slice(ends);
                    v.push(end);
                    *self = SegmentEnds::Heap(v);
                }
            }
            SegmentEnds::Heap(v) => v.push(end),
        }
    }

    fn pop(&mut self) -> Option<u16> {
        match self {
            SegmentEnds::Inline { len, ends } => {
                let new_len = len.checked_sub(1)?;
                *len = new_len;
                ends.get(usize::from(new_len)).copied()
            }
            SegmentEnds::Heap(v) => v.pop(),
        }
    }
}

/// A request path after [`normalize`]: decoded, dot segments resolved, no empty segments,
/// no trailing slash. See the [module documentation](self) for the exact rules.
///
/// Path and query share one allocation; segment boundaries are stored so that
/// [`segment`](NormalizedPath::segment) and [`segment_count`](NormalizedPath::segment_count)
/// are O(1).
#[derive(Clone)]
pub struct NormalizedPath {
    /// The normalised path, followed by `?` and the raw query when there is one.
    buf: String,
    /// Length of the path part of `buf`.
    path_len: usize,
    ends: SegmentEnds,
    /// Whether the path is ASCII (a function of the path).
    ascii: bool,
}

impl NormalizedPath {
    /// Whether the path (not the query) is ASCII: case folding then needs no more than ASCII's.
    #[inline]
    pub fn is_ascii(&self) -> bool {
        self.ascii
    }

    /// The normalised path, e.g. `"/customers/42"`: always starts with `/`, no trailing
    /// slash except for the root `"/"`, no query.
    pub fn as_str(&self) -> &str {
        self.buf.get(..self.path_len).unwrap_or("/")
    }

    /// The decoded segments, e.g. `"customers"`, `"42"`; none for the root.
    pub fn segments(&self) -> Segments<'_> {
        Segments { path: self, front: 0, back: self.segment_count() }
    }

    /// The number of segments (0 for the root).
    pub fn segment_count(&self) -> usize {
        self.ends.len()
    }

    /// The segment at `index` (0-based), if there is one.
    pub fn segment(&self, index: usize) -> Option<&str> {
        let ends = self.ends.as_slice();
        let end = usize::from(*ends.get(index)?);
        let start = match index.checked_sub(1) {
            Some(prev) => usize::from(*ends.get(prev)?) + 1,
            None => 1,
        };
        self.buf.get(start..end)
    }

    /// The raw query string (without `?`), untouched by normalisation; `None` when the
    /// target had no `?`. Not used for matching.
    pub fn query(&self) -> Option<&str> {
        self.buf.get(self.path_len + 1..)
    }

    /// Whether this is the root path `/`.
    pub fn is_root(&self) -> bool {
        self.ends.len() == 0
    }
}

impl PartialEq for NormalizedPath {
    fn eq(&self, other: &Self) -> bool {
        // The segment boundaries are a function of the path.
        self.path_len == other.path_len && self.buf == other.buf
    }
}

impl Eq for NormalizedPath {}

impl fmt::Debug for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NormalizedPath").field("path", &self.as_str()).field("query", &self.query()).finish()
    }
}

/// Iterator over the segments of a [`NormalizedPath`], from
/// [`NormalizedPath::segments`].
#[derive(Clone, Debug)]
pub struct Segments<'a> {
    path: &'a NormalizedPath,
    front: usize,
    back: usize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.front >= self.back {
            return None;
        }
        let s = self.path.segment(self.front);
        self.front += 1;
        s
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back.saturating_sub(self.front);
        (n, Some(n))
    }
}

impl DoubleEndedIterator for Segments<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.path.segment(self.back)
    }
}

impl ExactSizeIterator for Segments<'_> {}

/// Byte classes for the segment scan: [`PLAIN`] bytes are copied as they are, `/`
/// separates segments, [`SPECIAL`] bytes (`%`, `\`, `;`, ASCII control characters) need
/// decoding or are rejected. (`?` and `#` never reach the segment scan.)
const CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = SPECIAL;
        i += 1;
    }
    t[0x7f] = SPECIAL;
    t[b'%' as usize] = SPECIAL;
    t[b'\\' as usize] = SPECIAL;
    t[b';' as usize] = SPECIAL;
    t[b'/' as usize] = SLASH;
    t
};
const PLAIN: u8 = 0;
const SPECIAL: u8 = 1;
const SLASH: u8 = 2;

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes the escape `%XX` starting at `seg[at]` (which must be `%`).
fn decode_escape(seg: &[u8], at: usize) -> Option<u8> {
    let hi = hex_value(*seg.get(at + 1)?)?;
    let lo = hex_value(*seg.get(at + 2)?)?;
    Some(hi << 4 | lo)
}

/// The decoded byte at `seg[at]` and the position after it; `None` at the end or on an
/// invalid escape.
fn decoded_at(seg: &[u8], at: usize) -> Option<(u8, usize)> {
    match *seg.get(at)? {
        b'%' => Some((decode_escape(seg, at)?, at + 3)),
        b => Some((b, at + 1)),
    }
}

/// Whether the decoded text starting at `seg[at]` begins with two hex digits.
fn two_hex_digits_at(seg: &[u8], at: usize) -> bool {
    let Some((first, next)) = decoded_at(seg, at) else {
        return false;
    };
    let Some((second, _)) = decoded_at(seg, next) else {
        return false;
    };
    first.is_ascii_hexdigit() && second.is_ascii_hexdigit()
}

/// Appends the decoded, checked bytes of one non-empty raw segment to `out`.
fn decode_segment(seg: &[u8], out: &mut Vec<u8>) -> Result<(), PathRejection> {
    let start = out.len();
    let mut non_ascii_decoded = false;
    let mut i = 0;
    while let Some(&b) = seg.get(i) {
        if CLASS[usize::from(b)] != SPECIAL {
            // Copy the run of ordinary bytes in one go.
            let run =
                seg[i..].iter().position(|&c| CLASS[usize::from(c)] == SPECIAL).map_or(seg.len(), |n| i + n);
            out.extend_from_slice(&seg[i..run]);
            i = run;
            continue;
        }
        match b {
            b'%' => {
                let d = decode_escape(seg, i).ok_or(PathRejection::InvalidPercentEncoding)?;
                i += 3;
                match d {
                    b'/' => return Err(PathRejection::EncodedSlash),
                    b'\\' => return Err(PathRejection::Backslash),
                    b';' => return Err(PathRejection::PathParameter),
                    b'?' | b'#' => return Err(PathRejection::EncodedDelimiter),
                    0x00..=0x1f | 0x7f => return Err(PathRejection::ControlCharacter),
                    b'%' => {
                        if two_hex_digits_at(seg, i) {
                            return Err(PathRejection::DoubleEncoding);
                        }
                        // Keep a literal '%' escaped so the output re-normalises to itself.
                        out.extend_from_slice(b"%25");
                    }
                    _ => {
                        non_ascii_decoded |= d >= 0x80;
                        out.push(d);
                    }
                }
            }
            b'\\' => return Err(PathRejection::Backslash),
            b';' => return Err(PathRejection::PathParameter),
            _ => return Err(PathRejection::ControlCharacter),
        }
    }
    if non_ascii_decoded {
        // Only decoded bytes can break UTF-8; validate the whole segment since raw and
        // decoded bytes may be interleaved.
        if std::str::from_utf8(&out[start..]).is_err() {
            return Err(PathRejection::InvalidUtf8);
        }
    }
    Ok(())
}

/// Records the end offset of a new output segment.
fn push_end(ends: &mut SegmentEnds, end: usize) -> Result<(), PathRejection> {
    if ends.len() >= MAX_SEGMENTS {
        return Err(PathRejection::TooLong);
    }
    ends.push(u16::try_from(end).map_err(|_| PathRejection::TooLong)?);
    Ok(())
}

/// Decodes one non-empty raw segment onto `out` and resolves it if it is a dot segment.
fn push_segment(seg: &[u8], out: &mut Vec<u8>, ends: &mut SegmentEnds) -> Result<(), PathRejection> {
    let seg_start = out.len();
    out.push(b'/');
    decode_segment(seg, out)?;
    match out.get(seg_start + 1..) {
        Some(b".") => out.truncate(seg_start),
        Some(b"..") => {
            ends.pop().ok_or(PathRejection::AboveRoot)?;
            out.truncate(ends.last().map_or(0, usize::from));
        }
        _ => push_end(ends, out.len())?,
    }
    Ok(())
}

/// Normalises an HTTP request-target in origin-form (`/a/b?x=1`).
///
/// See the [module documentation](self) for the rules. The error names the kind of
/// problem only, never the path.
///
/// ```
/// use custos_policy::normalize::{normalize, PathRejection};
///
/// let p = normalize("//customers/./42/?full=1").unwrap();
/// assert_eq!(p.as_str(), "/customers/42");
/// assert_eq!(p.segments().collect::<Vec<_>>(), ["customers", "42"]);
/// assert_eq!(p.query(), Some("full=1"));
/// assert_eq!(normalize("/customers%2fexport"), Err(PathRejection::EncodedSlash));
/// ```
pub fn normalize(target: &str) -> Result<NormalizedPath, PathRejection> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathRejection::NotOriginForm);
    }
    if bytes.contains(&b'#') {
        return Err(PathRejection::Fragment);
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    if path.len() > MAX_PATH_LEN {
        return Err(PathRejection::TooLong);
    }

    let raw = path.as_bytes();
    let mut ends = SegmentEnds::new();
    // Fast path: while `decoded` is `None`, the output so far is exactly `raw[..same]`, so
    // nothing is copied until a segment needs decoding or leaves a gap (an empty or `.`
    // segment followed by more). Already-normal paths are copied once, at the end.
    let mut same = 0usize;
    let mut decoded: Option<Vec<u8>> = None;
    let mut start = 1;
    loop {
        let mut end = start;
        let mut special = false;
        while let Some(&b) = raw.get(end) {
            match CLASS[usize::from(b)] {
                PLAIN => {}
                SLASH => break,
                _ => special = true,
            }
            end += 1;
        }
        let seg = raw.get(start..end).unwrap_or_default();
        match (&mut decoded, seg) {
            (_, []) => {}
            (None, b".") if !special => {}
            (None, b"..") if !special => {
                ends.pop().ok_or(PathRejection::AboveRoot)?;
                same = ends.last().map_or(0, usize::from);
            }
            (None, _) if !special && start == same + 1 => {
                push_end(&mut ends, end)?;
                same = end;
            }
            (Some(out), _) => push_segment(seg, out, &mut ends)?,
            (None, _) => {
                // Decoded output is never longer than the raw path.
                let mut out = Vec::with_capacity(target.len());
                out.extend_from_slice(raw.get(..same).unwrap_or_default());
                push_segment(seg, &mut out, &mut ends)?;
                decoded = Some(out);
            }
        }
        if end >= raw.len() {
            break;
        }
        start = end + 1;
    }

    let query_len = query.map_or(0, |q| q.len() + 1);
    let (buf, path_len) = match decoded {
        None => {
            let out = match same {
                0 => "/",
                _ => path.get(..same).ok_or(PathRejection::InvalidUtf8)?,
            };
            let mut buf = String::with_capacity(out.len() + query_len);
            buf.push_str(out);
            if let Some(q) = query {
                buf.push('?');
                buf.push_str(q);
            }
            (buf, out.len())
        }
        Some(mut out) => {
            if out.is_empty() {
                out.push(b'/');
            }
            let path_len = out.len();
            if let Some(q) = query {
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
            let buf = String::from_utf8(out).map_err(|_| PathRejection::InvalidUtf8)?;
            (buf, path_len)
        }
    };
    let ascii = buf.get(..path_len).is_some_and(str::is_ascii);
    Ok(NormalizedPath { buf, path_len, ends, ascii })
}
