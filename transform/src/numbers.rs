//! Keeping numbers that `serde_json::Value` cannot hold exactly.
//!
//! Without serde_json's `arbitrary_precision` feature (which this workspace cannot enable:
//! features unify, and it breaks deserialising numbers through `#[serde(flatten)]` and
//! internally tagged or untagged enums, which kube and k8s-openapi use), a `Value` holds an
//! integer only if it fits an `i64` or `u64`, and anything else as an `f64`. Re-serialised, an
//! integer such as `123456789012345678901234` would come out as `1.2345678901234568e23`.
//!
//! So before parsing, one pass over the body finds the number tokens that would not survive
//! the round trip (see [`is_exact`]) and rewrites each into a string: a marker character
//! followed by the token's text. After serialising, the marked strings are turned back into
//! the original tokens, byte for byte. Masks and row filters treat such a string as the
//! number it stands for (masks by its text, CEL as a `double`).
//!
//! The marker is a Unicode noncharacter of U+FDD0..=U+FDEF that the body does not contain,
//! raw or escaped (in any letter case), picked per body: the first free one, U+FDD0 unless
//! the body holds it (a user may well put one in a profile field; that must not cost the
//! other records their numbers). Only a body holding all 32 of them is parsed as is: such
//! numbers then go through `f64` (integers beyond 64 bits and decimals with more than 15
//! significant digits lose precision; numbers beyond the `f64` range make the body fail to
//! parse).
//!
//! Numbers that do survive can still change spelling but never value: `1.50` becomes `1.5`,
//! `1e2` becomes `100.0`, `-0` becomes `0`.

use std::borrow::Cow;

/// The first marker candidate, U+FDD0: the marker of a body that holds none of them, and
/// the one a lone number token is wrapped with (`stream`).
pub(crate) const SENTINEL: char = '\u{FDD0}';
/// The marker candidates: U+FDD0..=U+FDEF, 32 noncharacters, one bit each in a `u32`.
const FIRST_MARKER: u32 = 0xFDD0;
const LAST_MARKER: u32 = 0xFDEF;

/// The candidate (its index, 0..32) whose UTF-8 (`EF B7 90`..`EF B7 AF`) starts at `at`.
#[inline]
pub(crate) fn raw_marker(body: &[u8], at: usize) -> Option<u32> {
    match body.get(at..at + 3)? {
        &[0xEF, 0xB7, third @ 0x90..=0xAF] => Some(u32::from(third - 0x90)),
        _ => None,
    }
}

/// The candidate (its index, 0..32) that the code unit of a `\uXXXX` escape stands for.
#[inline]
pub(crate) fn escaped_marker(code: u32) -> Option<u32> {
    (FIRST_MARKER..=LAST_MARKER).contains(&code).then(|| code - FIRST_MARKER)
}

/// The first candidate not in `present` (bit `k`: candidate `k` occurs), if any.
pub(crate) fn pick_marker(present: u32) -> Option<char> {
    let free = (!present).trailing_zeros();
    if free >= 32 { None } else { char::from_u32(FIRST_MARKER + free) }
}

/// The UTF-8 of a marker.
fn marker_bytes(marker: char) -> [u8; 3] {
    let mut bytes = [0; 3];
    marker.encode_utf8(&mut bytes);
    bytes
}

/// A body ready for `serde_json`.
pub(crate) struct Prepared<'a> {
    /// The body, with inexact number tokens wrapped in marked strings.
    pub body: Cow<'a, [u8]>,
    /// The character that starts the strings of the parsed document standing for numbers:
    /// one the body does not contain, `None` if it contains all the candidates (numbers are
    /// then not wrapped).
    pub marker: Option<char>,
    /// How many number tokens were wrapped.
    pub wrapped: usize,
    /// Where the wrapped tokens are in the original body (start, end).
    inexact: Vec<(usize, usize)>,
}

/// Bytes a wrapped token gains: two quotes and the marker.
const WRAPPING: usize = 2 + 3;

impl Prepared<'_> {
    /// The column in the original body of a parse error at `line`:`column` of the prepared
    /// body (serde_json counts columns in bytes; wrapping never adds lines).
    pub(crate) fn original_column(&self, line: usize, column: usize) -> usize {
        if self.inexact.is_empty() {
            return column;
        }
        let body: &[u8] = &self.body;
        let line_start = if line <= 1 {
            0
        } else {
            body.iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .nth(line - 2)
                .map_or(body.len(), |(i, _)| i + 1)
        };
        // the error is at the byte before `end`
        let end = line_start + column;
        let mut shift = 0;
        for (k, &(start, stop)) in self.inexact.iter().enumerate() {
            let wrapped_start = start + k * WRAPPING;
            let wrapped_end = stop + (k + 1) * WRAPPING;
            if wrapped_start < line_start {
                continue;
            }
            if wrapped_end <= end {
                shift += WRAPPING;
            } else {
                if wrapped_start < end {
                    // inside the wrapped token: report its first byte
                    return (wrapped_start + 1).saturating_sub(line_start + shift);
                }
                break;
            }
        }
        column.saturating_sub(shift)
    }
}

/// Scans `body` and wraps the number tokens that `serde_json::Value` cannot hold exactly, in
/// strings starting with a marker the body does not contain ([`Prepared::marker`]).
///
/// Escaped lone surrogates (`"\ud800"` not followed by a trailing surrogate escape, or a
/// trailing one alone) are rewritten to `\ufffd`, the replacement character, in place (the
/// same six bytes, so positions do not move). The JSON grammar allows them, and common
/// serialisers write them for a string that came in with one (JavaScript's
/// `JSON.stringify`, Python's `json.dumps`), but `serde_json` refuses them: one user who
/// stored such a string in a field would otherwise make every response holding that record
/// "not JSON" (a 502 for everyone, or, under `failOpen`, the others' data unmasked).
pub(crate) fn prepare(body: &[u8]) -> Prepared<'_> {
    let mut inexact: Vec<(usize, usize)> = Vec::new();
    let mut lone_surrogates: Vec<usize> = Vec::new();
    // the marker candidates the body holds, raw or escaped
    let mut present: u32 = 0;
    let n = body.len();
    let mut i = 0;
    'scan: while i < n {
        match body[i] {
            b'"' => {
                i += 1;
                loop {
                    i = skip_plain(body, i);
                    if i >= n {
                        break 'scan;
                    }
                    match body[i] {
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\\' => {
                            match (body.get(i + 1), hex4(body, i + 2)) {
                                (Some(b'u'), Some(code @ 0xFDD0..=0xFDEF)) => {
                                    present |= 1 << (u32::from(code) - FIRST_MARKER);
                                }
                                (Some(b'u'), Some(0xD800..=0xDBFF)) => {
                                    if body.get(i + 6..i + 8) == Some(&b"\\u"[..])
                                        && matches!(hex4(body, i + 8), Some(0xDC00..=0xDFFF))
                                    {
                                        // a pair: both escapes
                                        i += 12;
                                        continue;
                                    }
                                    lone_surrogates.push(i);
                                }
                                (Some(b'u'), Some(0xDC00..=0xDFFF)) => lone_surrogates.push(i),
                                _ => {}
                            }
                            i += 2;
                        }
                        _ => {
                            if let Some(k) = raw_marker(body, i) {
                                present |= 1 << k;
                            }
                            i += 1;
                        }
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < n && matches!(body[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
                if !is_exact(&body[start..i]) {
                    inexact.push((start, i));
                }
            }
            0xEF => {
                if let Some(k) = raw_marker(body, i) {
                    present |= 1 << k;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    let body: Cow<'_, [u8]> = if lone_surrogates.is_empty() {
        Cow::Borrowed(body)
    } else {
        let mut owned = body.to_vec();
        for at in lone_surrogates {
            owned[at..at + 6].copy_from_slice(b"\\ufffd");
        }
        Cow::Owned(owned)
    };
    let Some(marker) = pick_marker(present) else {
        return Prepared { body, marker: None, wrapped: 0, inexact: Vec::new() };
    };
    if inexact.is_empty() {
        return Prepared { body, marker: Some(marker), wrapped: 0, inexact };
    }
    let marker_bytes = marker_bytes(marker);
    let mut out = Vec::with_capacity(body.len() + inexact.len() * 5);
    let mut last = 0;
    for &(start, end) in &inexact {
        out.extend_from_slice(&body[last..start]);
        out.push(b'"');
        out.extend_from_slice(&marker_bytes);
        out.extend_from_slice(&body[start..end]);
        out.push(b'"');
        last = end;
    }
    out.extend_from_slice(&body[last..]);
    Prepared { body: Cow::Owned(out), marker: Some(marker), wrapped: inexact.len(), inexact }
}

/// The value of the four hex digits at `at`, if there are four.
fn hex4(body: &[u8], at: usize) -> Option<u16> {
    let digits = body.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

/// The position of the first `"`, `\\` or 0xEF byte (the first byte of every marker) at or after
/// `i`, or the length of `body`: eight bytes at a time, then byte by byte.
fn skip_plain(body: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // whether some byte of `word` is zero
    let zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS != 0;
    while let Some(chunk) = body.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(bytes);
        if zero_byte(word ^ (ONES * u64::from(b'"')))
            || zero_byte(word ^ (ONES * u64::from(b'\\')))
            || zero_byte(word ^ (ONES * 0xEF))
        {
            break;
        }
        i += 8;
    }
    while i < body.len() && !matches!(body[i], b'"' | b'\\' | 0xEF) {
        i += 1;
    }
    i
}

/// Whether the token, if it is a JSON number, comes back with the same value after a trip
/// through `serde_json::Value`. Tokens that are not JSON numbers count as exact: they are
/// left for the parser to reject.
///
/// Integers are exact when they fit an `i64` or `u64`. Other numbers are exact when their
/// digits (leading zeros aside, trailing zeros included) number at most 15 and their decimal
/// exponent is within ±22: serde_json then computes the nearest `f64` exactly (an integer
/// below 2^53 times or divided by an exact power of ten), and a decimal of at most 15
/// significant digits is the shortest representation of its nearest `f64`, which is what
/// serde_json writes back.
pub(crate) fn is_exact(token: &[u8]) -> bool {
    let Some(parts) = split_number(token) else {
        return true;
    };
    if parts.fraction.is_empty() && parts.exponent.is_none() {
        if parts.integer.len() <= 18 {
            return true;
        }
        let Ok(text) = std::str::from_utf8(token) else {
            return true;
        };
        return text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok();
    }
    let digits = parts.integer.iter().chain(parts.fraction).skip_while(|&&d| d == b'0').count();
    if digits == 0 {
        // zero, whatever its spelling
        return true;
    }
    if digits > 15 {
        return false;
    }
    let exponent = match parts.exponent {
        None => 0,
        Some(e) => {
            // more than 4 digits is far outside ±22 anyway
            if e.digits.len() > 4 {
                return false;
            }
            let v = e.digits.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
            if e.negative { -v } else { v }
        }
    };
    let fraction_len = i64::try_from(parts.fraction.len()).unwrap_or(i64::MAX);
    (exponent - fraction_len).abs() <= 22
}

struct NumberParts<'a> {
    integer: &'a [u8],
    fraction: &'a [u8],
    exponent: Option<Exponent<'a>>,
}

struct Exponent<'a> {
    negative: bool,
    digits: &'a [u8],
}

/// Splits a JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), or `None` if the
/// token is not one.
fn split_number(token: &[u8]) -> Option<NumberParts<'_>> {
    let rest = token.strip_prefix(b"-").unwrap_or(token);
    let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if int_len == 0 || (int_len > 1 && rest[0] == b'0') {
        return None;
    }
    let (integer, mut rest) = rest.split_at(int_len);
    let mut fraction: &[u8] = &[];
    if let Some(after) = rest.strip_prefix(b".") {
        let len = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        (fraction, rest) = after.split_at(len);
    }
    let mut exponent = None;
    if let Some((&e, after)) = rest.split_first()
        && (e == b'e' || e == b'E')
    {
        let (negative, after) = match after.split_first() {
            Some((b'-', a)) => (true, a),
            Some((b'+', a)) => (false, a),
            _ => (false, after),
        };
        let len = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 || len != after.len() {
            return None;
        }
        exponent = Some(Exponent { negative, digits: after });
        rest = &[];
    }
    rest.is_empty().then_some(NumberParts { integer, fraction, exponent })
}

/// The number text a string stands for, if it starts with `marker` (the body's
/// [`Prepared::marker`]; `None`: no string stands for a number).
pub(crate) fn number_text(s: &str, marker: Option<char>) -> Option<&str> {
    s.strip_prefix(marker?)
}

/// Turns the strings of serialised JSON that start with `marker` back into the number tokens
/// they hold (`None`: nothing to turn back).
pub(crate) fn unwrap(json: Vec<u8>, marker: Option<char>) -> Vec<u8> {
    let Some(marker) = marker else {
        return json;
    };
    let marker = marker_bytes(marker);
    let mut out: Option<Vec<u8>> = None;
    let mut last = 0;
    let mut i = 0;
    while i + 4 <= json.len() {
        if json[i] == b'"' && json[i + 1..i + 4] == marker {
            let start = i + 4;
            let len = json[start..]
                .iter()
                .take_while(|b| matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
                .count();
            if json.get(start + len) == Some(&b'"') {
                let buf = out.get_or_insert_with(|| Vec::with_capacity(json.len()));
                buf.extend_from_slice(&json[last..i]);
                buf.extend_from_slice(&json[start..start + len]);
                i = start + len + 1;
                last = i;
                continue;
            }
        }
        i += 1;
    }
    match out {
        Some(mut buf) => {
            buf.extend_from_slice(&json[last..]);
            buf
        }
        None => json,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn exactness() {
        for exact in [
            "0",
            "-0",
            "1",
            "-1",
            "123456789012345678",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "1.5",
            "0.1",
            "-2.50",
            "1e2",
            "1E-7",
            "123456789.012345",
            "0.000000000000000000001",
            "0.0e999",
            "1.0",
            // not numbers: left to the parser
            "01",
            "1.",
            "--1",
            "1e",
            "1.2.3",
        ] {
            assert!(is_exact(exact.as_bytes()), "{exact}");
        }
        for inexact in [
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "3.14159265358979323846",
            "0.30000000000000004",
            "1234567890.1234567",
            "1e400",
            "1e-400",
            "1.5e300",
            "0.0000000000000000000000001",
        ] {
            assert!(!is_exact(inexact.as_bytes()), "{inexact}");
        }
    }

    /// Every number deemed exact survives serde_json byte-for-value.
    #[test]
    fn exact_numbers_round_trip() {
        for s in ["1.5", "0.1", "123456789.012345", "1e22", "4.5e-10", "999999999999999", "0.000001"] {
            assert!(is_exact(s.as_bytes()));
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            let back = serde_json::to_string(&v).unwrap();
            assert_eq!(back.parse::<f64>().unwrap(), s.parse::<f64>().unwrap(), "{s} -> {back}");
            let x: f64 = s.parse().unwrap();
            assert_eq!(format!("{:e}", back.parse::<f64>().unwrap()), format!("{x:e}"));
        }
    }

    #[test]
    fn prepare_and_unwrap() {
        let body = br#"{"a":123456789012345678901234,"b":[1e400,2],"s":"123456789012345678901234"}"#;
        let p = prepare(body);
        assert_eq!(p.marker, Some(SENTINEL));
        assert_eq!(p.wrapped, 2);
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(number_text(v["a"].as_str().unwrap(), p.marker), Some("123456789012345678901234"));
        assert_eq!(v["s"], "123456789012345678901234");
        let out = unwrap(serde_json::to_vec(&v).unwrap(), p.marker);
        assert_eq!(out, body.to_vec());
    }

    #[test]
    fn error_columns_map_back() {
        let body = b"[1,\n 123456789012345678901234, 1e999 x,\n2]";
        let p = prepare(body);
        assert_eq!(p.wrapped, 2);
        let err = serde_json::from_slice::<serde_json::Value>(&p.body).unwrap_err();
        assert_eq!(err.line(), 2);
        // `x` is at column 34 of line 2 in the original
        assert_eq!(p.original_column(err.line(), err.column()), 34);
        let body = b"[1 123456789012345678901234]";
        let p = prepare(body);
        let err = serde_json::from_slice::<serde_json::Value>(&p.body).unwrap_err();
        let original = serde_json::from_slice::<serde_json::Value>(body).unwrap_err();
        assert_eq!(p.original_column(err.line(), err.column()), original.column());
    }

    /// The marker is the first candidate the body does not hold, raw or escaped in any
    /// letter case; the body's own noncharacters stay strings.
    #[test]
    fn the_marker_is_one_the_body_does_not_hold() {
        let big = "123456789012345678901234";
        for (body, marker) in [
            (format!("{{\"a\":\"\u{FDD0}1\",\"b\":{big}}}"), '\u{FDD1}'),
            (format!(r#"{{"a":"\ufdd01","b":{big}}}"#), '\u{FDD1}'),
            (format!(r#"{{"a":"\uFDD0","b":{big}}}"#), '\u{FDD1}'),
            (format!("{{\"a\":\"\\uFdD0\u{FDD1}x\",\"b\":{big}}}"), '\u{FDD2}'),
            (format!("{{\"\u{FDD0}\u{FDD2}\":\"\\ufdd1\",\"b\":{big}}}"), '\u{FDD3}'),
            // an escaped backslash before `ufdd0` is no escape of U+FDD0
            (format!(r#"{{"a":"\\ufdd0","b":{big}}}"#), '\u{FDD0}'),
        ] {
            let p = prepare(body.as_bytes());
            assert_eq!(p.marker, Some(marker), "{body}");
            assert_eq!(p.wrapped, 1, "{body}");
            let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            assert_eq!(number_text(v["b"].as_str().unwrap(), p.marker), Some(big), "{body}");
            let original: serde_json::Value = serde_json::from_str(&body.replace(big, "1")).unwrap();
            for (k, s) in original.as_object().unwrap().iter().filter(|(_, s)| s.is_string()) {
                assert_eq!(&v[k], s, "{body}");
                assert_eq!(number_text(s.as_str().unwrap(), p.marker), None, "{body}");
            }
            let out = String::from_utf8(unwrap(serde_json::to_vec(&v).unwrap(), p.marker)).unwrap();
            assert!(out.ends_with(&format!(r#""b":{big}}}"#)), "{body} -> {out}");
        }
        // all 32 held: nothing is wrapped
        let all: String = (0xFDD0..=0xFDEF).filter_map(char::from_u32).collect();
        for body in [
            format!(r#"{{"a":"{all}","b":{big}}}"#),
            format!(r#"{{"a":"{}{}","b":{big}}}"#, &all[..3 * 31], r"\uFDEF"),
        ] {
            let p = prepare(body.as_bytes());
            assert_eq!(p.marker, None);
            assert_eq!(p.wrapped, 0);
            assert!(matches!(p.body, Cow::Borrowed(_)));
        }
        // all but one: that one
        let body = format!(r#"{{"a":"{}","b":{big}}}"#, all.replace('\u{FDE7}', ""));
        let p = prepare(body.as_bytes());
        assert_eq!(p.marker, Some('\u{FDE7}'));
        assert_eq!(p.wrapped, 1);
        // neighbours of the range are no candidates
        let p = prepare("{\"a\":\"\u{FDCF}\u{FDF0}\\uFDCF\\uFDF0\"}".as_bytes());
        assert_eq!(p.marker, Some(SENTINEL));
    }

    #[test]
    fn skip_plain_finds_every_position() {
        for stop in [b'"', b'\\', 0xEF] {
            for at in 0..24 {
                let mut body = vec![b'a'; 24];
                body[at] = stop;
                for from in 0..=at {
                    assert_eq!(skip_plain(&body, from), at);
                }
                assert_eq!(skip_plain(&body, at + 1), 24);
            }
        }
        assert_eq!(skip_plain(b"", 0), 0);
    }

    #[test]
    fn numbers_inside_strings_are_not_touched() {
        let body = br#"{"a":"x\"123456789012345678901234\\","b":"\\"}"#;
        let p = prepare(body);
        assert_eq!(p.wrapped, 0);
    }
}
