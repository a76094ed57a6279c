//! The `_method` check of a JSON or multipart POST body too large to read whole, made on the
//! body as it goes on to the app ([`OverrideScan`]): each piece is read before it is
//! forwarded, and the last one is read before the app has the whole body. The frameworks
//! that run a POST as the method its body names (Laravel, Symfony, Rack) read the body to its
//! end before any handler runs, so a body cut off before its end never reaches one: on a
//! `_method` field the sidecar stops the body and the exchange (the app sees a connection
//! closed mid-body) and answers 400 itself.
//!
//! What is read as the whole-body check reads it ([`super::names_a_method`]), with two
//! differences on the safe side: a top-level `"_method"` key of a JSON object names a method
//! when any of its values is not `null` (PHP keeps the last one), and the JSON of a body that
//! later turns out not to be valid JSON is read as far as it goes. A multipart part named
//! `_method` is found exactly as in a whole body, wherever the pieces are cut. A body that
//! starts with a UTF-16 or UTF-32 byte order mark is not read ([`Scanned::Unreadable`]).

use super::{PARAMETER, UTF8_BOM, is_method_name};

/// What the scan of a body found so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scanned {
    /// Nothing yet: the body may go on.
    Clean,
    /// A `_method` field: the body must not reach its end.
    NamesAMethod,
    /// UTF-16 or UTF-32 by its byte order mark: not read.
    Unreadable,
}

/// The `_method` check of one body read piece by piece: [`OverrideScan::feed`] each piece
/// before it is forwarded, saying which is the last.
#[derive(Debug)]
pub(crate) struct OverrideScan {
    /// The first bytes, held until there are four (the byte order marks) or the body ends.
    head: Vec<u8>,
    /// Whether the first bytes were judged.
    headed: bool,
    json: JsonScan,
    /// Read as multipart when a multipart reader could read the body's type.
    multipart: Option<MultipartScan>,
}

impl OverrideScan {
    /// A scan of a body of a type some multipart reader reads (`multipart`) or not.
    pub(crate) fn new(multipart: bool) -> Self {
        OverrideScan {
            head: Vec::new(),
            headed: false,
            json: JsonScan::default(),
            multipart: multipart.then(MultipartScan::default),
        }
    }

    /// Reads the next piece of the body; `at_end` when no more will follow. Once it says
    /// other than [`Scanned::Clean`], the body must stop.
    pub(crate) fn feed(&mut self, piece: &[u8], at_end: bool) -> Scanned {
        if self.headed {
            return self.read(piece, at_end);
        }
        self.head.extend_from_slice(piece);
        if self.head.len() < 4 && !at_end {
            return Scanned::Clean;
        }
        self.headed = true;
        let head = std::mem::take(&mut self.head);
        if [&b"\xFF\xFE"[..], b"\xFE\xFF", b"\0\0\xFE\xFF"].iter().any(|bom| head.starts_with(bom)) {
            return Scanned::Unreadable;
        }
        self.read(head.strip_prefix(UTF8_BOM).unwrap_or(&head), at_end)
    }

    fn read(&mut self, piece: &[u8], at_end: bool) -> Scanned {
        let in_json = self.json.feed(piece);
        let in_parts = self.multipart.as_mut().is_some_and(|m| m.feed(piece, at_end));
        if in_json || in_parts { Scanned::NamesAMethod } else { Scanned::Clean }
    }
}

/// Where the JSON reader is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum JsonPhase {
    /// Before the first byte that is not white space.
    #[default]
    Start,
    /// Inside the top-level object.
    Object,
    /// Not an object, or past its end: nothing more to read.
    Done,
}

/// After a top-level key `_method`: what comes next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum AfterKey {
    #[default]
    Nothing,
    /// The `:`.
    Colon,
    /// The value's first byte (`n` for `null`).
    Value,
}

/// A top-level `"_method"` key with a value other than `null` in a JSON object, read byte by
/// byte: depth, strings and their escapes, and the keys of the top-level object decoded (up
/// to eight bytes: longer is not `_method`).
#[derive(Debug, Default)]
struct JsonScan {
    phase: JsonPhase,
    /// Nesting: 1 in the top-level object.
    depth: u32,
    in_string: bool,
    /// 0 outside an escape; 1 after `\`; 2 to 5 reading the hex digits of `\u`.
    escape: u8,
    hex: u32,
    /// The top-level key being read: its decoded bytes, how many, none outside a key.
    key: Option<([u8; 8], usize)>,
    /// At depth 1, the next string is a key (after `{` or `,`).
    expect_key: bool,
    after: AfterKey,
}

impl JsonScan {
    /// Reads `piece`; true once a `_method` key with a value other than `null` was read.
    fn feed(&mut self, piece: &[u8]) -> bool {
        let mut i = 0;
        while let Some(&b) = piece.get(i) {
            // Inside a string that is no top-level key, only `"` and `\` matter: skipped to
            // (most of an upload's bytes are such strings).
            if self.in_string && self.escape == 0 && self.key.is_none() && !matches!(b, b'"' | b'\\') {
                match memchr::memchr2(b'"', b'\\', &piece[i..]) {
                    Some(at) => i += at,
                    None => return false,
                }
                continue;
            }
            i += 1;
            match self.phase {
                JsonPhase::Done => return false,
                JsonPhase::Start => {
                    if !b.is_ascii_whitespace() {
                        self.phase = if b == b'{' { JsonPhase::Object } else { JsonPhase::Done };
                        (self.depth, self.expect_key) = (1, true);
                    }
                }
                JsonPhase::Object => {
                    if self.byte(b) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// One byte inside the top-level object; true on a `_method` value other than `null`.
    fn byte(&mut self, b: u8) -> bool {
        if self.in_string {
            self.string_byte(b);
            return false;
        }
        if b.is_ascii_whitespace() {
            return false;
        }
        if self.depth == 1 && self.after == AfterKey::Value {
            if b != b'n' {
                return true;
            }
            self.after = AfterKey::Nothing;
        }
        if self.depth == 1 && self.after == AfterKey::Colon {
            self.after = if b == b':' { AfterKey::Value } else { AfterKey::Nothing };
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.expect_key {
                    self.key = Some(([0; 8], 0));
                }
            }
            b'{' | b'[' => self.depth = self.depth.saturating_add(1),
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.phase = JsonPhase::Done;
                }
            }
            b',' if self.depth == 1 => self.expect_key = true,
            _ => {}
        }
        false
    }

    /// One byte inside a string (a key of the top-level object decoded as it goes).
    fn string_byte(&mut self, b: u8) {
        match self.escape {
            0 if b == b'\\' => self.escape = 1,
            0 if b == b'"' => {
                self.in_string = false;
                if let Some((key, len)) = self.key.take() {
                    self.expect_key = false;
                    if len == PARAMETER.len() && key[..len] == *PARAMETER {
                        self.after = AfterKey::Colon;
                    }
                }
            }
            0 => self.push(b),
            1 if b == b'u' => (self.escape, self.hex) = (2, 0),
            1 => {
                self.escape = 0;
                let decoded = match b {
                    b'b' => 0x08,
                    b'f' => 0x0C,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    other => other,
                };
                self.push(decoded);
            }
            _ => {
                // A digit of `\uXXXX`; what is not one makes the key no name (`0xFF`).
                let digit = char::from(b).to_digit(16).unwrap_or(0x1_0000);
                self.hex = self.hex.saturating_mul(16).saturating_add(digit);
                self.escape += 1;
                if self.escape == 6 {
                    self.escape = 0;
                    let ascii = u8::try_from(self.hex).ok().filter(u8::is_ascii);
                    self.push(ascii.unwrap_or(0xFF));
                }
            }
        }
    }

    /// One decoded byte of a top-level key (past eight, only counted).
    fn push(&mut self, b: u8) {
        if let Some((key, len)) = &mut self.key {
            if let Some(slot) = key.get_mut(*len) {
                *slot = b;
            }
            *len = len.saturating_add(1);
        }
    }
}

/// The most bytes of a part's name read after `name=` (and its quote) in the first reading
/// of [`names_method`].
const NAME_WINDOW: usize = PARAMETER.len() + 64;

/// The most bytes of a header line read after a key ([`KEYS`]): past them the name is read
/// as far as that.
const LINE_WINDOW: usize = 8 * 1024;

/// Where a multipart reader finds a part's name: `name=` of its `Content-Disposition` (PHP,
/// Rack, busboy), `name*=` (RFC 5987, busboy) and `Content-ID:` (Rack names a part without
/// a disposition name by it). Found in any letter case, anywhere: a file's content naming a
/// part so is refused too, on the safe side.
const KEYS: [&[u8]; 3] = [b"name=", b"name*=", b"content-id:"];

/// A part whose header names it `_method`, found across pieces, in the body as it is and
/// in the body with its header lines joined as PHP joins them ([`JoinedLines`]: `na` CRLF
/// `me=_method` is `name=_method` to PHP).
#[derive(Debug, Default)]
pub(super) struct MultipartScan {
    raw: KeyScan,
    joined: KeyScan,
    join: JoinedLines,
}

impl MultipartScan {
    /// Reads `piece`; true once a part named `_method` was found.
    pub(super) fn feed(&mut self, piece: &[u8], at_end: bool) -> bool {
        if self.raw.feed(piece, at_end) {
            return true;
        }
        let joined = self.join.feed(piece, at_end);
        self.joined.feed(&joined, at_end)
    }
}

/// The keys of [`scan_names`] found across pieces: the bytes from a key whose line is not
/// complete yet (or the last few, which may begin one) are carried over to the next piece.
/// While a key waits for its line, the carried bytes are read again only once they have
/// doubled (or the body ends): a client sending its body a byte at a time must not make
/// every byte cost a line's reading.
#[derive(Debug, Default)]
struct KeyScan {
    carry: Vec<u8>,
    /// The carry's length at which it is read again.
    read_at: usize,
    /// How many times the carry was read.
    #[cfg(test)]
    reads: usize,
}

impl KeyScan {
    fn feed(&mut self, piece: &[u8], at_end: bool) -> bool {
        // Nothing carried (a whole body, the first piece): the piece is read where it is.
        let carried = !self.carry.is_empty();
        if carried {
            self.carry.extend_from_slice(piece);
        }
        let window = if carried { &self.carry[..] } else { piece };
        if carried && !at_end && window.len() < self.read_at {
            return false;
        }
        #[cfg(test)]
        {
            self.reads += 1;
        }
        match scan_names(window, at_end) {
            Err(Found) => true,
            Ok(keep_from) => {
                // A copy: the window has the capacity of the largest piece.
                self.carry = window[keep_from..].to_vec();
                // Longer than the tail: a key waits for its line.
                let waiting = self.carry.len() > KEY_TAIL;
                self.read_at = if waiting { self.carry.len().saturating_mul(2).max(64) } else { 0 };
                false
            }
        }
    }
}

/// Bytes kept after a scan found no key waiting: the longest key but one byte.
const KEY_TAIL: usize = 10;

/// The body with every line break dropped that PHP's multipart header reader drops: before a
/// line that starts with white space or holds no `:` (PHP appends such a line to the header
/// before it, without a separator), never before an empty line (the end of a part's
/// headers). Applied to the whole body (content lines too, on the safe side). A line is held
/// until its end (at most [`LINE_WINDOW`] bytes: past them it goes on as one that joins).
#[derive(Debug, Default)]
struct JoinedLines {
    /// The current line's bytes so far, held until it is known whether it joins.
    held: Vec<u8>,
    /// A line break came before the held line.
    after_break: bool,
    /// The current line outgrew the window: it went on as joined, and goes on to its end.
    passing: bool,
}

impl JoinedLines {
    /// The joined bytes that `piece` completes (the held line is given out at the end).
    fn feed(&mut self, piece: &[u8], at_end: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(piece.len());
        let mut rest = piece;
        while !rest.is_empty() {
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(at) => (&rest[..at], Some(&rest[at + 1..])),
                None => (rest, None),
            };
            if self.passing {
                out.extend_from_slice(line);
            } else {
                self.held.extend_from_slice(line);
                if next.is_none() && self.held.len() > LINE_WINDOW {
                    // Too long to hold: joined, whatever follows.
                    out.extend_from_slice(&std::mem::take(&mut self.held));
                    (self.after_break, self.passing) = (false, true);
                }
            }
            let Some(next) = next else { break };
            self.end_line(&mut out);
            (self.after_break, self.passing) = (true, false);
            rest = next;
        }
        if at_end {
            self.end_line(&mut out);
        }
        out
    }

    /// Gives out the held line, after a line break unless it joins the line before.
    fn end_line(&mut self, out: &mut Vec<u8>) {
        let mut line = std::mem::take(&mut self.held);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let joins = line.first().is_some_and(|&b| is_c_space(b) || !line.contains(&b':'));
        if self.after_break && !joins {
            out.push(b'\n');
        }
        out.extend_from_slice(&line);
    }
}

/// White space as C's `isspace` reads it (PHP's multipart reader): Rust's ASCII white space
/// and the vertical tab.
fn is_c_space(b: u8) -> bool {
    b.is_ascii_whitespace() || b == 0x0B
}

/// `bytes` without leading [`is_c_space`] bytes.
fn trim_c_space(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| !is_c_space(b)).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A part named `_method` was found.
#[derive(Debug)]
pub(super) struct Found;

/// Looks for a part named `_method` in `window`: a key of [`KEYS`] whose value, read as each
/// reader reads it ([`names_method`]), is `_method` as PHP reads names. Unless `at_end`, a key
/// whose header line is not complete yet stops the scan: the position of the key, from which
/// the window must be kept, is returned; else the position of the last bytes that could
/// begin a key.
pub(super) fn scan_names(window: &[u8], at_end: bool) -> Result<usize, Found> {
    // Keys end in `=` or `:`, rarer in uploads than their first letters: found by those.
    for end in memchr::memchr2_iter(b'=', b':', window) {
        for key in KEYS.iter().filter(|k| k.last() == Some(&window[end])) {
            let Some(at) = (end + 1).checked_sub(key.len()) else { continue };
            if !window[at..=end].eq_ignore_ascii_case(key) {
                continue;
            }
            let value = &window[end + 1..];
            let Some(line) = logical_line(value, at_end) else {
                return Ok(at);
            };
            if names_method(key, value, &line) {
                return Err(Found);
            }
        }
    }
    Ok(window.len().saturating_sub(KEY_TAIL))
}

/// The header line that starts with `rest` (after a key), its folded continuations joined
/// as PHP joins them (a line break followed by a space or a tab is dropped), at most
/// [`LINE_WINDOW`] bytes; `None` when `rest` ends before the line does and more may come.
fn logical_line(rest: &[u8], at_end: bool) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut i = 0;
    while line.len() < LINE_WINDOW {
        let Some(&b) = rest.get(i) else {
            return at_end.then_some(line);
        };
        if b == b'\n' {
            match rest.get(i + 1) {
                Some(b' ' | b'\t') => {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    i += 1;
                    continue;
                }
                Some(_) => break,
                None if at_end => break,
                None => return None,
            }
        }
        line.push(b);
        i += 1;
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Some(line)
}

/// Whether the value of `key` (`raw`, the bytes after it; `line`, its header line as
/// [`logical_line`] reads it) names the part `_method` as some reader reads it: after
/// `name=`, as the whole-body check always read the raw bytes (one `"` stripped, cut at `"`,
/// `;` or a line end, at most [`NAME_WINDOW`] bytes), as PHP reads the line (white space
/// skipped, then a value quoted with `"` or `'`, `\` before the quote escaping it, or one cut
/// at white space or `;`) and as Rack unquotes it (every `\` escaping the next byte); after
/// `name*=`, percent-decoded past its `charset'language'` prefix; after `Content-ID:`, the
/// value trimmed.
fn names_method(key: &[u8], raw: &[u8], line: &[u8]) -> bool {
    let is = |name: &[u8]| {
        let end = name.iter().rposition(|&b| !is_c_space(b)).map_or(0, |i| i + 1);
        is_method_name(&name[..end]) || is_method_name(trim_c_space(&name[..end]))
    };
    match key {
        b"name=" => {
            let first = raw.strip_prefix(b"\"").unwrap_or(raw);
            let end = first.iter().take(NAME_WINDOW).position(|b| matches!(b, b'"' | b';' | b'\r' | b'\n'));
            let end = end.unwrap_or(first.len().min(NAME_WINDOW));
            if is(&first[..end]) {
                return true;
            }
            let value = trim_c_space(line);
            match value.first() {
                Some(&quote @ (b'"' | b'\'')) => {
                    is(&unquoted(&value[1..], quote, false))
                        || (quote == b'"' && is(&unquoted(&value[1..], quote, true)))
                }
                _ => is(value.split(|&b| is_c_space(b) || b == b';').next().unwrap_or_default()),
            }
        }
        b"name*=" => {
            let value = trim_c_space(line);
            let value = value.strip_prefix(b"\"").unwrap_or(value);
            let value =
                value.split(|&b| is_c_space(b) || matches!(b, b';' | b'"')).next().unwrap_or_default();
            // `charset'language'value`: the value past the second quote.
            let encoded = value.splitn(3, |&b| b == b'\'').nth(2).unwrap_or(value);
            super::decodes_to_method_name(encoded)
        }
        _ => is(trim_c_space(line)),
    }
}

/// A quoted value (after its opening `quote`) up to its closing one: with `any_escape`, a `\`
/// escapes any byte (Rack), else only the quote (PHP).
fn unquoted(value: &[u8], quote: u8, any_escape: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        match (b, value.get(i + 1)) {
            (b'\\', Some(&next)) if any_escape || next == quote => {
                out.push(next);
                i += 2;
            }
            _ if b == quote => break,
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// `body` fed in pieces cut at `cuts` (positions, any order), the last piece marked.
    fn scanned(multipart: bool, body: &[u8], cuts: &[usize]) -> Scanned {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
        cuts.sort_unstable();
        cuts.push(body.len());
        let mut scan = OverrideScan::new(multipart);
        let mut from = 0;
        for (i, &to) in cuts.iter().enumerate() {
            let result = scan.feed(&body[from..to], i + 1 == cuts.len());
            if result != Scanned::Clean {
                return result;
            }
            from = to;
        }
        Scanned::Clean
    }

    /// Every cut of `body` into two and three pieces (and one piece) gives `expected`.
    fn assert_every_cut(multipart: bool, body: &[u8], expected: Scanned) {
        assert_eq!(scanned(multipart, body, &[]), expected, "{}", String::from_utf8_lossy(body));
        for a in 0..=body.len() {
            assert_eq!(
                scanned(multipart, body, &[a]),
                expected,
                "cut at {a}: {}",
                String::from_utf8_lossy(body)
            );
            for b in (a..=body.len()).step_by(3) {
                assert_eq!(scanned(multipart, body, &[a, b]), expected, "cuts {a}, {b}");
            }
        }
    }

    #[test]
    fn json_top_level_method_keys_wherever_the_pieces_are_cut() {
        use Scanned::{Clean, NamesAMethod};
        for (body, expected) in [
            (r#"{"_method":"DELETE"}"#, NamesAMethod),
            (r#" {"a":1, "_method" : "PUT", "b":[1,2]}"#, NamesAMethod),
            (r#"{"_method":["DELETE"]}"#, NamesAMethod),
            (r#"{"_method":{"x":1}}"#, NamesAMethod),
            (r#"{"_method":0}"#, NamesAMethod),
            (r#"{"\u005fmethod":"DELETE"}"#, NamesAMethod),
            (r#"{"_m\u0065thod":"DELETE"}"#, NamesAMethod),
            (r#"{"_method":null}"#, Clean),
            (r#"{"_method":null,"x":"_method"}"#, Clean),
            (r#"{"x":{"_method":"DELETE"}}"#, Clean),
            (r#"{"x":["_method","DELETE"]}"#, Clean),
            (r#"{"x":"\"_method\":1"}"#, Clean),
            (r#"{"_methodx":"DELETE"}"#, Clean),
            (r#"{"_METHOD":"DELETE"}"#, Clean),
            (r#"{"_metho":"DELETE"}"#, Clean),
            (r#"{"\u00dfmethod":"DELETE"}"#, Clean),
            (r#"{"x":"_method"}"#, Clean),
            (r#"[{"_method":"DELETE"}]"#, Clean),
            (r#"{"a":1}{"_method":"DELETE"}"#, Clean),
            ("\u{feff}{\"_method\":\"DELETE\"}", NamesAMethod),
        ] {
            assert_every_cut(false, body.as_bytes(), expected);
        }
    }

    #[test]
    fn multipart_names_wherever_the_pieces_are_cut() {
        use Scanned::{Clean, NamesAMethod};
        let part = |disposition: &str| {
            format!("--b\r\nContent-Disposition: form-data; {disposition}\r\n\r\nDELETE\r\n--b--\r\n")
        };
        for (body, expected) in [
            (part("name=\"_method\""), NamesAMethod),
            (part("NAME=_method"), NamesAMethod),
            (part("name=\"_method[]\""), NamesAMethod),
            (part("name=\" _method\""), NamesAMethod),
            (part("name=\"title\"; filename=\"_method\""), NamesAMethod),
            // As PHP reads a name: white space skipped, single quotes, a bare name cut at
            // white space, a folded header line joined; as Rack unquotes one; `name*=`
            // (busboy) percent-decoded; a part Rack names by its `Content-ID`.
            (part("name='_method'"), NamesAMethod),
            (part("name= \"_method\""), NamesAMethod),
            (part("name=_method x"), NamesAMethod),
            (part("name=\r\n \"_method\""), NamesAMethod),
            (part("name=\"_\\method\""), NamesAMethod),
            (part("name*=UTF-8''%5Fmethod"), NamesAMethod),
            (part("name*=utf-8'en'_method; x=1"), NamesAMethod),
            ("--b\r\nContent-ID: _method\r\n\r\nDELETE\r\n--b--\r\n".to_string(), NamesAMethod),
            ("--b\r\nCONTENT-id:  _method \r\n\r\nDELETE\r\n--b--\r\n".to_string(), NamesAMethod),
            // PHP joins a line holding no `:` to the header before it, without a separator,
            // and reads C's white space (the vertical tab too); Rack 2's Content-ID crosses
            // a line break.
            (part("name=\r\n_method"), NamesAMethod),
            (
                "--b\r\nContent-Disposition: form-data; na\r\nme=\"_method\"\r\n\r\nDELETE\r\n--b--\r\n"
                    .to_string(),
                NamesAMethod,
            ),
            (part("name=\"_me\r\nthod\""), NamesAMethod),
            (part("name=\u{b}_method"), NamesAMethod),
            (part("name=_method\u{b}x"), NamesAMethod),
            ("--b\r\nContent-ID:\r\n_method\r\n\r\nDELETE\r\n--b--\r\n".to_string(), NamesAMethod),
            (part("name=\r\nContent-Type: _method"), Clean),
            (
                "--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nna\r\n\r\nme=_method\r\n--b--\r\n"
                    .to_string(),
                Clean,
            ),
            (part("name='title'"), Clean),
            (part("name=\"_met\\\"hod\""), Clean),
            (part("name*=UTF-8''title"), Clean),
            ("--b\r\nContent-ID: <part1@example.test>\r\n\r\n_method\r\n--b--\r\n".to_string(), Clean),
            (part("name=\"title\""), Clean),
            (part("name=\"_methods\""), Clean),
            (part("name=\"x_method\""), Clean),
            (
                format!("--b\r\nContent-Disposition: form-data; name=\"_method{}\"\r\n", "[".repeat(80)),
                NamesAMethod,
            ),
            ("name=_method".to_string(), NamesAMethod),
            ("name=_metho".to_string(), Clean),
            ("name=".to_string(), Clean),
        ] {
            assert_every_cut(true, body.as_bytes(), expected);
            assert_eq!(
                super::super::multipart_names_a_method(body.as_bytes()),
                expected == NamesAMethod,
                "{body}"
            );
        }
        // Not read as multipart unless a multipart reader could read the type.
        assert_eq!(scanned(false, part("name=\"_method\"").as_bytes(), &[]), Clean);
    }

    /// A key waiting for its line, its body sent a byte at a time: read again only as the
    /// carried bytes double, yet found before the body ends.
    #[test]
    fn a_key_waiting_for_its_line_is_read_again_as_it_doubles() {
        let mut body = b"--b\r\nContent-Disposition: form-data; name=".to_vec();
        body.extend(std::iter::repeat_n(b' ', 6000));
        body.extend_from_slice(b"_method\r\n\r\nDELETE\r\n--b--\r\n");
        let mut scan = KeyScan::default();
        let mut found = false;
        for (i, b) in body.iter().enumerate() {
            found = scan.feed(std::slice::from_ref(b), i + 1 == body.len());
            if found {
                break;
            }
        }
        assert!(found);
        assert!(scan.reads < 200, "{} readings of the carried bytes for {} bytes", scan.reads, body.len());
        assert_eq!(KEYS.iter().map(|k| k.len()).max(), Some(KEY_TAIL + 1));
    }

    #[test]
    fn utf16_and_utf32_are_not_read() {
        for bom in [&b"\xFF\xFE"[..], b"\xFE\xFF", b"\0\0\xFE\xFF", b"\xFF\xFE\0\0"] {
            let body = [bom, b"{\0}\0"].concat();
            assert_every_cut(false, &body, Scanned::Unreadable);
        }
        // Too short to hold a mark: read as it is.
        assert_eq!(scanned(false, b"{}", &[1]), Scanned::Clean);
    }

    /// A JSON object of `members` (key, value) with a top-level `_method` somewhere when
    /// `method` holds its value.
    fn json_body(
        members: &[(String, serde_json::Value)],
        method: Option<(usize, serde_json::Value)>,
    ) -> Vec<u8> {
        let mut object = serde_json::Map::new();
        for (k, v) in members {
            object.insert(k.clone(), v.clone());
        }
        let mut members: Vec<(String, serde_json::Value)> = object.into_iter().collect();
        members.retain(|(k, _)| k != "_method");
        if let Some((at, value)) = method {
            members.insert(at.min(members.len()), ("_method".into(), value));
        }
        let text: Vec<String> = members
            .iter()
            .map(|(k, v)| {
                format!("{}:{}", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap())
            })
            .collect();
        format!("{{{}}}", text.join(",")).into_bytes()
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[a-z_\"\\\\/\u{1}\u{e9}\u{1F600}]{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::vec(("[_a-z\"]{0,9}", inner), 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// On valid JSON objects with at most one top-level `_method`, the scan of the body in
        /// any pieces agrees with the whole-body check.
        #[test]
        fn json_pieces_agree_with_the_whole_body_check(
            members in prop::collection::vec(("[_a-z\"\\\\]{0,9}", json_value()), 0..6),
            method in prop::option::of((0usize..6, json_value())),
            cuts in prop::collection::vec(0usize..400, 0..6),
        ) {
            let body = json_body(&members, method);
            let whole = super::super::json_names_a_method(&body);
            prop_assert_eq!(scanned(false, &body, &cuts) == Scanned::NamesAMethod, whole);
        }

        /// Multipart text of names, quotes and line ends: the scan in any pieces finds what the
        /// whole-body check finds.
        #[test]
        fn multipart_pieces_agree_with_the_whole_body_check(
            body in "(name=|NAME=\"|name\\*=|Content-ID:|'|\"|;|\r\n|\r\n |\n|\\\\|%5F|_method|_METHOD| |\\[|\\.|x|_|method|[a-z]{1,3}){0,40}",
            cuts in prop::collection::vec(0usize..400, 0..8),
        ) {
            let whole = super::super::multipart_names_a_method(body.as_bytes());
            prop_assert_eq!(scanned(true, body.as_bytes(), &cuts) == Scanned::NamesAMethod, whole);
        }
    }
}
