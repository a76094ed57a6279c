//! Method overrides by parameter: `_method=DELETE` in the query or in a form body makes
//! Rack (Rails), Laravel, Symfony and Express's `method-override` run a POST as the method it
//! names, which the policy never decided; Laravel reads it from a JSON body too. Like the
//! override headers, such a POST is refused. Only POSTs are checked (in any letter case:
//! Symfony upper-cases the method first): the frameworks honour the parameter on nothing else.
//!
//! Names are read as PHP reads them, which is the most lenient: percent-decoded (`+` a space),
//! leading spaces dropped, cut at a NUL or at `[` (an array), spaces and dots turned into `_`;
//! so ` _method`, `.method`, `_method%00x` and `_method[]` are `_method` to Laravel and Symfony
//! and are refused as well (so are a few names PHP would not read so, such as `[method`: on
//! the safe side).
//!
//! The frameworks disagree on which types they read and how (PHP cuts a type at `;`, `,` and a
//! space, Rack at `;` and `,`; Laravel takes any type with `/json` or `+json` anywhere in it
//! for JSON), so a body the sidecar has whole is read by every reader, whatever its declared
//! type: as a form, as JSON when it starts with `{`, and as multipart when the type declares a
//! boundary (or is `multipart/*`). A leading UTF-8 byte order mark is skipped (Express's
//! body parsers skip it), and UTF-16 text (by its byte order mark or a declared `charset`) is
//! read again as UTF-8; UTF-32 and other Unicode charsets the sidecar does not read (UTF-7)
//! make a body the frameworks read parameters from unreadable (415).
//!
//! [`check_post_body`] decodes `gzip` and `deflate` bodies first, and tells the proxy about a
//! body some framework reads parameters from (a form, declared or without a type; JSON;
//! multipart) that it did not read whole ([`PostBody::Unchecked`]), and about one in an
//! encoding or charset it cannot read ([`PostBody::Unreadable`]).

mod stream;

use http::HeaderValue;

pub(crate) use self::stream::{OverrideScan, Scanned};
use crate::body::{DecodeError, Encoding, decode};

/// The parameter name the frameworks read.
const PARAMETER: &[u8] = b"_method";

/// The UTF-8 byte order mark, skipped before a body is read.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Whether `query` (without the `?`) has a `_method` parameter (its name percent-decoded,
/// compared without regard to case).
pub(crate) fn query_names_a_method(query: &str) -> bool {
    form_names_a_method(query.as_bytes())
}

/// Whether `method` is POST, in any letter case.
pub(crate) fn is_post(method: &http::Method) -> bool {
    method.as_str().eq_ignore_ascii_case("POST")
}

/// How a framework reads parameters from a POST body of some declared type ([`kind_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// JSON: a media type with `json` in it, or a type with `/json` or `+json` anywhere in it
    /// (Laravel's `isJson`).
    Json,
    /// `multipart/*`.
    Multipart,
    /// A URL-encoded form: declared, or a body without a type (Rack reads it as one).
    Form,
}

/// The Content-Type header as text, lower case (empty without one).
fn lower_type(content_type: Option<&HeaderValue>) -> String {
    content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase()).unwrap_or_default()
}

/// The media type of a lower-case Content-Type, cut at `;`, `,`, a space and a tab (as PHP
/// cuts it: `application/x-www-form-urlencoded json` is a form to PHP and Laravel, not JSON).
fn media_type(lower: &str) -> &str {
    lower.trim_start().split([';', ',', ' ', '\t']).next().unwrap_or("")
}

/// The media type of a URL-encoded form.
const FORM_TYPE: &str = "application/x-www-form-urlencoded";

/// The kind of a body of a (lower-case, [`lower_type`]) Content-Type that some framework reads
/// parameters from, or none for a body of another declared type (`application/octet-stream`,
/// `image/png`): a form when declared or without a type (an empty one too: Rack reads both as
/// forms), JSON when the media type has `json` in it or the type `/json` or `+json` anywhere
/// (Laravel), and multipart for `multipart/*`.
fn kind_of(lower: &str) -> Option<BodyKind> {
    let media = media_type(lower);
    if media.is_empty() || media == FORM_TYPE {
        Some(BodyKind::Form)
    } else if media.contains("json") {
        Some(BodyKind::Json)
    } else if media.starts_with("multipart/") {
        Some(BodyKind::Multipart)
    } else if lower.contains("/json") || lower.contains("+json") {
        Some(BodyKind::Json)
    } else {
        None
    }
}

/// Whether a multipart reader could read a body of `content_type`: the type is `multipart/*`
/// or declares a boundary at all (PHP looks for `boundary` anywhere in the type, and then for
/// an `=`), whatever its media type.
fn reads_multipart(lower: &str) -> bool {
    media_type(lower).starts_with("multipart/") || lower.contains("boundary")
}

/// What the check of a POST body found ([`check_post_body`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PostBody {
    /// No `_method` field, or a body no framework reads parameters from.
    Clean,
    /// A `_method` field: refused.
    NamesAMethod,
    /// A body some framework reads parameters from (its kind) that the sidecar did not read
    /// whole, or that decodes to more than the request buffer: it could name a method past
    /// what the sidecar saw.
    Unchecked(BodyKind),
    /// A body the frameworks could read parameters from whose `Content-Encoding` or charset
    /// the sidecar cannot read (the reason code): refused (415).
    Unreadable(&'static str),
}

/// Reason code of a POST body in a `Content-Encoding` the sidecar cannot decode.
pub(crate) const UNSUPPORTED_REQUEST_ENCODING: &str = "unsupported_request_encoding";

/// Reason code of a POST body that is not valid for its `Content-Encoding`.
pub(crate) const BAD_REQUEST_ENCODING: &str = "bad_request_encoding";

/// Reason code of a POST body in a charset the sidecar does not read: UTF-32 (declared, or
/// by its byte order mark), UTF-7 and other Unicode charsets but UTF-8 and UTF-16.
pub(crate) const UNSUPPORTED_REQUEST_CHARSET: &str = "unsupported_request_charset";

/// Checks a POST body for a `_method` field ([`names_a_method`]): `complete` when the
/// sidecar has it all (`whole` is then its bytes, none for no body), and a `gzip` or `deflate`
/// body is decoded first, to at most `decode_limit` bytes (Express's body parsers inflate
/// request bodies). A body of a kind some framework reads parameters from ([`kind_of`])
/// that is not read whole, or decodes to more than the limit, is
/// [`Unchecked`](PostBody::Unchecked); one of any other type is then
/// [`Clean`](PostBody::Clean). A whole body is read whatever its type (see the
/// [module documentation](self)).
pub(crate) fn check_post_body(
    headers: &http::HeaderMap,
    complete: bool,
    whole: Option<&bytes::Bytes>,
    decode_limit: u64,
) -> PostBody {
    // The type in lower case, read once for every question asked of it.
    let lower = lower_type(headers.get(http::header::CONTENT_TYPE));
    let kind = kind_of(&lower);
    let unread = || kind.map_or(PostBody::Clean, PostBody::Unchecked);
    let encoding = Encoding::of(headers);
    let charsets = declared_charsets(&lower);
    if !complete {
        // Not read whole: one that could not be read whole either says so.
        // JSON and multipart (uploads) are unchecked whatever their encoding or charset: the
        // proxy refuses them only where the override could change the decision.
        return match (kind, encoding) {
            (None, _) => PostBody::Clean,
            (Some(BodyKind::Form), None) => PostBody::Unreadable(UNSUPPORTED_REQUEST_ENCODING),
            (Some(BodyKind::Form), Some(_)) if charsets.unsupported => {
                PostBody::Unreadable(UNSUPPORTED_REQUEST_CHARSET)
            }
            (Some(kind), _) => PostBody::Unchecked(kind),
        };
    }
    let Some(body) = whole.filter(|b| !b.is_empty()) else {
        return PostBody::Clean;
    };
    let readable = kind.is_some();
    let decoded = match encoding {
        Some(Encoding::Identity) => body.clone(),
        None if readable => return PostBody::Unreadable(UNSUPPORTED_REQUEST_ENCODING),
        None => return PostBody::Clean,
        Some(encoding) => match decode(body.clone(), encoding, decode_limit) {
            Ok(decoded) => decoded,
            Err(DecodeError::TooLarge) => return unread(),
            Err(DecodeError::Corrupt) if readable => return PostBody::Unreadable(BAD_REQUEST_ENCODING),
            Err(DecodeError::Corrupt) => return PostBody::Clean,
        },
    };
    let utf32 = decoded.starts_with(b"\0\0\xFE\xFF") || decoded.starts_with(b"\xFF\xFE\0\0");
    if readable && (charsets.unsupported || utf32) {
        return PostBody::Unreadable(UNSUPPORTED_REQUEST_CHARSET);
    }
    if names_a_method(&lower, &decoded) {
        return PostBody::NamesAMethod;
    }
    // UTF-16 text, by its byte order mark or its declared charset, read again as UTF-8 in
    // each byte order it may have.
    let (text, little, big) = match decoded.get(..2) {
        Some(b"\xFF\xFE") => (&decoded[2..], true, charsets.utf16_big),
        Some(b"\xFE\xFF") => (&decoded[2..], charsets.utf16_little, true),
        _ => (&decoded[..], charsets.utf16_little, charsets.utf16_big),
    };
    let names = |little_endian: bool| names_a_method(&lower, utf16_to_utf8(text, little_endian).as_bytes());
    if (little && names(true)) || (big && names(false)) { PostBody::NamesAMethod } else { PostBody::Clean }
}

/// The check of an [`Unchecked`](PostBody::Unchecked) POST body as it goes on to the app
/// ([`OverrideScan`]), for a JSON or multipart body sent as it is (no `Content-Encoding` but
/// `identity`) in UTF-8 (no `charset` of UTF-16 or another Unicode charset declared); none
/// for others (a form, a compressed body), which stay unchecked.
pub(crate) fn scan_on_the_way(headers: &http::HeaderMap) -> Option<OverrideScan> {
    let lower = lower_type(headers.get(http::header::CONTENT_TYPE));
    let charsets = declared_charsets(&lower);
    let plain = Encoding::of(headers) == Some(Encoding::Identity) && charsets == Charsets::default();
    let kind = kind_of(&lower);
    (plain && matches!(kind, Some(BodyKind::Json | BodyKind::Multipart)))
        .then(|| OverrideScan::new(reads_multipart(&lower)))
}

/// What the `charset` parameters of a Content-Type declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Charsets {
    /// UTF-16 that may be little-endian (`utf-16le`; `utf-16` without a byte order mark may be
    /// either: Express's iconv-lite guesses, RFC 2781 says big-endian).
    utf16_little: bool,
    /// UTF-16 that may be big-endian (`utf-16be`, `utf-16`).
    utf16_big: bool,
    /// A Unicode charset the sidecar does not read (UTF-32, UTF-7, UCS-4, ...): Express's JSON
    /// parser decodes any `utf-*` charset iconv-lite knows.
    unsupported: bool,
}

/// Every `charset` parameter of a lower-case Content-Type `text` (any text `charset` followed by `=`, the value
/// unquoted), its name compared as iconv-lite compares them (lower case, letters and digits
/// only, so `UTF_16LE` is `utf16le`). Charsets that are not Unicode are not read here: PHP and
/// Rack read parameter names byte for byte, and Express's JSON parser refuses them.
fn declared_charsets(text: &str) -> Charsets {
    let mut found = Charsets::default();
    for (at, _) in text.match_indices("charset") {
        let Some(value) = text[at + "charset".len()..].trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let value = value.strip_prefix('"').unwrap_or(value);
        let name: String = value
            .chars()
            .take_while(|c| !matches!(c, '"' | ';' | ',' | ' ' | '\t'))
            .filter(char::is_ascii_alphanumeric)
            .collect();
        if name.starts_with("utf16") || name == "ucs2" {
            found.utf16_little |= !name.ends_with("be");
            found.utf16_big |= !name.ends_with("le") && name != "ucs2";
        } else if (name.starts_with("utf") && !name.starts_with("utf8")) || name.starts_with("ucs") {
            found.unsupported = true;
        }
    }
    found
}

/// `bytes` read as UTF-16 in the given byte order (a last odd byte dropped), as UTF-8;
/// unpaired surrogates become U+FFFD.
fn utf16_to_utf8(bytes: &[u8], little_endian: bool) -> String {
    let units = bytes.chunks_exact(2).map(|pair| {
        let pair = [pair[0], pair[1]];
        if little_endian { u16::from_le_bytes(pair) } else { u16::from_be_bytes(pair) }
    });
    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}

/// Whether a POST body of a (lower-case, [`lower_type`]) Content-Type carries a `_method`
/// field as any framework may read it, whatever its declared type (a leading UTF-8 byte order
/// mark skipped): a form parameter; a top-level `"_method"` key of a JSON object (Laravel)
/// when the body starts with `{`; a multipart part named `_method` when a multipart reader
/// could read it ([`reads_multipart`]).
fn names_a_method(lower: &str, body: &[u8]) -> bool {
    let body = body.strip_prefix(UTF8_BOM).unwrap_or(body);
    form_names_a_method(body)
        || json_names_a_method(body)
        || (reads_multipart(lower) && multipart_names_a_method(body))
}

/// A top-level `"_method"` key of a JSON object, not null, the last one when it repeats (as
/// PHP keeps it). An object serde cannot read (nested deeper than its limit of 128, which PHP
/// reads up to 512) names a method when the word `method` appears in it at all, on the safe
/// side; other invalid JSON names nothing (the frameworks read no parameters from it).
fn json_names_a_method(body: &[u8]) -> bool {
    if !body.trim_ascii_start().starts_with(b"{") {
        return false;
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(object) => object.get("_method").is_some_and(|v| !v.is_null()),
        Err(_) => body.windows(b"method".len()).any(|w| w.eq_ignore_ascii_case(b"method")),
    }
}

/// `a=1&_method=DELETE`: any parameter whose decoded name is `_method` as PHP reads it.
fn form_names_a_method(form: &[u8]) -> bool {
    form.split(|&b| b == b'&' || b == b';').any(|pair| {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        name.len() >= PARAMETER.len() && decodes_to_method_name(name)
    })
}

/// Whether the decoded `name` is `_method` as PHP reads parameter names (ASCII case ignored):
/// leading spaces dropped, cut at NUL and at a `[` after the first byte, spaces and dots
/// (and a leading `[`) turned into `_`. The name is also tried without dropping the leading
/// spaces (` method`), on the safe side.
fn is_method_name(name: &[u8]) -> bool {
    let php = |name: &[u8]| {
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let end = name.iter().skip(1).position(|&b| b == b'[').map_or(name.len(), |i| i + 1);
        let name = &name[..end];
        name.len() == PARAMETER.len()
            && name.iter().zip(PARAMETER).enumerate().all(|(i, (&b, &p))| {
                let b = match b {
                    b' ' | b'.' => b'_',
                    b'[' if i == 0 => b'_',
                    b => b,
                };
                b.eq_ignore_ascii_case(&p)
            })
    };
    php(name) || php(name.trim_ascii_start())
}

/// A part whose `Content-Disposition` names it `_method` (`name="_method"` or `name=_method`).
/// Read as bytes: a file part containing that text is refused too, which errs on the safe
/// side.
fn multipart_names_a_method(body: &[u8]) -> bool {
    stream::MultipartScan::default().feed(body, true)
}

/// Whether percent-decoding `encoded` (`+` as a space) gives `_method` as PHP reads it
/// ([`is_method_name`]).
fn decodes_to_method_name(encoded: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let b = encoded[i];
        if b == b'%'
            && let Some(byte) = encoded
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            decoded.push(byte);
            i += 3;
            continue;
        }
        decoded.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    is_method_name(&decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`kind_of`] of a Content-Type header.
    fn body_kind(content_type: Option<&HeaderValue>) -> Option<BodyKind> {
        kind_of(&lower_type(content_type))
    }

    /// [`names_a_method`] of a body under a Content-Type header.
    fn body_names_a_method(content_type: Option<&HeaderValue>, body: &[u8]) -> bool {
        names_a_method(&lower_type(content_type), body)
    }

    /// Whether `content_type` declares a URL-encoded form.
    fn is_declared_form(content_type: Option<&HeaderValue>) -> bool {
        media_type(&lower_type(content_type)) == FORM_TYPE
    }

    #[test]
    fn queries() {
        for (query, names) in [
            ("_method=DELETE", true),
            ("a=1&_method=delete", true),
            ("_METHOD=PUT", true),
            ("%5Fmethod=DELETE", true),
            ("%5fMethod=PATCH", true),
            ("_%6Dethod=DELETE", true),
            ("a=1;_method=DELETE", true),
            ("_method", true),
            ("_method=", true),
            ("method=DELETE", false),
            ("x_method=DELETE", false),
            ("_methods=DELETE", false),
            ("q=_method", false),
            ("a=_method%3DDELETE", false),
            (".method=DELETE", true),
            ("%2Emethod=DELETE", true),
            ("+method=DELETE", true),
            ("%20method=DELETE", true),
            ("[method=DELETE", true),
            ("-method=DELETE", false),
            ("__method=DELETE", false),
            // As PHP reads names: leading spaces dropped, cut at NUL and at an array's `[`.
            ("+_method=DELETE", true),
            ("%20%20_method=DELETE", true),
            ("_method%00x=DELETE", true),
            ("_method[]=DELETE", true),
            ("_method[a]=DELETE", true),
            ("_method.=DELETE", false),
            ("_me.hod=DELETE", false),
            ("", false),
            ("%", false),
            ("%5", false),
        ] {
            assert_eq!(query_names_a_method(query), names, "{query:?}");
        }
    }

    /// Nested deeper than serde reads (PHP reads up to 512 levels): refused when `method`
    /// appears, forwarded otherwise.
    #[test]
    fn json_too_deep_for_serde() {
        let json = HeaderValue::from_static("application/json");
        let deep =
            |key: &str| format!("{{\"{key}\":\"DELETE\",\"x\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(body_names_a_method(Some(&json), deep("_method").as_bytes()));
        assert!(!body_names_a_method(Some(&json), deep("title").as_bytes()));
    }

    fn gzip(body: &[u8]) -> bytes::Bytes {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(body).expect("in memory");
        encoder.finish().expect("in memory").into()
    }

    /// [`check_post_body`] of a body of `content_type` and `encodings` (a decode limit of 64
    /// bytes).
    fn check(
        content_type: Option<&'static str>,
        encodings: &[&'static str],
        complete: bool,
        body: Option<&bytes::Bytes>,
    ) -> PostBody {
        let mut headers = http::HeaderMap::new();
        if let Some(t) = content_type {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(t));
        }
        for e in encodings {
            headers.append(http::header::CONTENT_ENCODING, HeaderValue::from_static(e));
        }
        check_post_body(&headers, complete, body, 64)
    }

    /// Whole and partly read bodies, their types and encodings: what a POST's check finds.
    #[test]
    fn post_bodies_by_type_encoding_and_completeness() {
        use PostBody::*;
        let form = "application/x-www-form-urlencoded";
        let json = "application/json";
        let octets = "application/octet-stream";
        let named = bytes::Bytes::from_static(b"a=1&_method=DELETE");
        let plain = bytes::Bytes::from_static(b"a=1&b=2");
        let zipped = gzip(&named);
        let big = gzip(format!("a={}&_method=DELETE", "x".repeat(100)).as_bytes());
        let corrupt = bytes::Bytes::from_static(b"\x1f\x8b not gzip");
        let json_named = gzip(br#"{"_method":"PUT"}"#);
        /// Type, encodings, complete, body, what is found (a decode limit of 64 bytes).
        type Case<'a> =
            (Option<&'static str>, &'static [&'static str], bool, Option<&'a bytes::Bytes>, PostBody);
        let cases: [Case; 23] = [
            (Some(form), &[], true, Some(&named), NamesAMethod),
            (Some(form), &[], true, Some(&plain), Clean),
            (None, &[], true, Some(&named), NamesAMethod),
            (None, &[], true, None, Clean),
            (Some(form), &["gzip"], true, None, Clean),
            (Some(form), &["gzip"], true, Some(&zipped), NamesAMethod),
            (None, &["x-gzip"], true, Some(&zipped), NamesAMethod),
            (Some(json), &["gzip"], true, Some(&json_named), NamesAMethod),
            // As a whole body of any type but JSON and multipart is read: as a form.
            (Some(octets), &["gzip"], true, Some(&zipped), NamesAMethod),
            (Some(form), &["gzip"], true, Some(&big), Unchecked(BodyKind::Form)),
            (Some(json), &["gzip"], true, Some(&big), Unchecked(BodyKind::Json)),
            (Some(form), &["gzip"], true, Some(&corrupt), Unreadable(BAD_REQUEST_ENCODING)),
            (Some(octets), &["gzip"], true, Some(&corrupt), Clean),
            (Some(form), &["br"], true, Some(&named), Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (Some(json), &["gzip", "gzip"], true, Some(&named), Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (Some(octets), &["br"], true, Some(&named), Clean),
            (Some(form), &[], false, None, Unchecked(BodyKind::Form)),
            (None, &[], false, None, Unchecked(BodyKind::Form)),
            (Some(json), &[], false, None, Unchecked(BodyKind::Json)),
            (Some(octets), &[], false, None, Clean),
            (
                Some("multipart/form-data; boundary=x"),
                &["zstd"],
                false,
                None,
                // Unread uploads are unchecked in any encoding (the proxy decides by path).
                Unchecked(BodyKind::Multipart),
            ),
            (None, &["zstd"], false, None, Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (None, &["identity"], true, Some(&named), NamesAMethod),
        ];
        for (k, (content_type, encodings, complete, body, found)) in cases.into_iter().enumerate() {
            assert_eq!(
                check(content_type, encodings, complete, body),
                found,
                "case {k}: {content_type:?} {encodings:?}"
            );
        }
    }

    #[test]
    fn declared_forms() {
        for (value, form) in [
            ("application/x-www-form-urlencoded", true),
            ("Application/X-WWW-Form-Urlencoded; charset=utf-8", true),
            ("application/x-www-form-urlencoded,x", true),
            ("multipart/form-data; boundary=x", false),
            ("application/octet-stream", false),
        ] {
            assert_eq!(is_declared_form(Some(&HeaderValue::from_static(value))), form, "{value}");
        }
        assert!(!is_declared_form(None));
        assert!(
            is_post(&http::Method::from_bytes(b"pOsT").expect("a method")) && !is_post(&http::Method::PUT)
        );
    }

    #[test]
    fn bodies() {
        let form = HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8");
        let multipart = HeaderValue::from_static("multipart/form-data; boundary=X");
        let json = HeaderValue::from_static("application/json");
        for (content_type, body, names) in [
            (Some(&form), &b"title=x&_method=delete"[..], true),
            (Some(&form), b"title=_method", false),
            (Some(&json), br#"{"_method":"DELETE"}"#, true),
            (Some(&json), br#"{"title":"x","_method":"put"}"#, true),
            (Some(&json), br#"{"_method":null}"#, false),
            (Some(&json), br#"{"title":{"_method":"DELETE"}}"#, false),
            (Some(&json), br#"["_method"]"#, false),
            (Some(&json), b"{not json", false),
            (
                Some(&multipart),
                b"--X\r\nContent-Disposition: form-data; name=\".method\"\r\n\r\nDELETE\r\n--X--",
                true,
            ),
            (None, b"_method=DELETE", true),
            (
                Some(&multipart),
                b"--X\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--X--",
                true,
            ),
            (
                Some(&multipart),
                b"--X\r\nContent-Disposition: form-data; NAME=_method\r\n\r\nDELETE\r\n--X--",
                true,
            ),
            (
                Some(&multipart),
                b"--X\r\nContent-Disposition: form-data; name=\"_methods\"\r\n\r\nx\r\n--X--",
                false,
            ),
            (
                Some(&multipart),
                b"--X\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nx\r\n--X--",
                false,
            ),
            (Some(&multipart), b"name=", false),
            // Read by what the frameworks accept, not only by the declared type.
            (None, b"a=1&_method=PUT", true),
            (Some(&HeaderValue::from_static("application/x-www-form-urlencoded,x")), b"_method=DELETE", true),
            (Some(&HeaderValue::from_static("text/plain")), b"_method=DELETE", true),
            (Some(&HeaderValue::from_static("text/plain")), b"title=x", false),
            (
                Some(&HeaderValue::from_static("multipart/mixed; boundary=X")),
                b"--X\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--X--",
                true,
            ),
            (Some(&HeaderValue::from_static("text/json")), br#"{"_method":"DELETE"}"#, true),
            (Some(&HeaderValue::from_static("application/vnd.api+JSON")), br#"{"_method":"DELETE"}"#, true),
            (Some(&json), br#"{"_method":"DELETE","_method":"DELETE"}"#, true),
            (Some(&json), br#"{"\u005fmethod":"DELETE"}"#, true),
            // Read as a form too, whatever the declared type (on the safe side).
            (Some(&json), br#"{"title":"a&_method=x"}"#, true),
            (Some(&json), br#"{"_method":"DELETE","_method":null}"#, false),
        ] {
            assert_eq!(body_names_a_method(content_type, body), names, "{:?}", String::from_utf8_lossy(body));
        }
    }

    /// Fix: the media type is cut at a space and a tab as PHP cuts it, so a form with `json`
    /// after a space is a form (to PHP and to Laravel, whose `isJson` wants `/json` or
    /// `+json`), not JSON.
    #[test]
    fn media_types_are_cut_at_spaces_and_tabs() {
        use BodyKind::*;
        for (value, form, kind) in [
            ("application/x-www-form-urlencoded json", true, Some(Form)),
            ("application/x-www-form-urlencoded\tjson", true, Some(Form)),
            ("application/x-www-form-urlencoded application/json", true, Some(Form)),
            ("application/json x", false, Some(Json)),
            ("multipart/form-data boundary=x", false, Some(Multipart)),
            ("text/plain json", false, None),
            // Laravel's `isJson` reads the whole type.
            ("text/plain +json", false, Some(Json)),
            ("text/plain; x=/json", false, Some(Json)),
            ("", false, Some(Form)),
        ] {
            let value = HeaderValue::from_static(value);
            assert_eq!((is_declared_form(Some(&value)), body_kind(Some(&value))), (form, kind), "{value:?}");
        }
        // Unread, such a form is a form.
        assert_eq!(
            check(Some("application/x-www-form-urlencoded json"), &[], false, None),
            PostBody::Unchecked(Form)
        );
    }

    /// Fix: a whole body is read as a form, as JSON (when it starts with `{`) and as
    /// multipart (when the type declares a boundary), whatever its declared type.
    #[test]
    fn whole_bodies_are_read_by_every_reader() {
        use PostBody::*;
        let form = b"a=1&_method=DELETE";
        let json = br#"{"title":"x","_method":"DELETE"}"#;
        let multipart = b"--X\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--X--";
        let cases: [(Option<&'static str>, &[u8], PostBody); 14] = [
            (Some("application/json"), form, NamesAMethod),
            (Some("application/x-www-form-urlencoded"), json, NamesAMethod),
            (Some("application/x-www-form-urlencoded json"), json, NamesAMethod),
            (Some("multipart/form-data; boundary=X"), json, NamesAMethod),
            (Some("multipart/form-data; boundary=X"), form, NamesAMethod),
            (Some("text/plain"), json, NamesAMethod),
            (None, json, NamesAMethod),
            (Some("application/octet-stream; boundary=X"), multipart, NamesAMethod),
            (Some("application/json; boundary=X"), multipart, NamesAMethod),
            (Some("application/x-www-form-urlencoded; Boundary=X"), multipart, NamesAMethod),
            // No boundary: no multipart reader reads it.
            (Some("application/octet-stream"), multipart, Clean),
            (Some("application/json"), multipart, Clean),
            // JSON is read only from an object.
            (Some("application/json"), br#"["_method"]"#, Clean),
            (Some("multipart/form-data; boundary=X"), b"title=x", Clean),
        ];
        for (k, (content_type, body, found)) in cases.into_iter().enumerate() {
            let body = bytes::Bytes::copy_from_slice(body);
            assert_eq!(check(content_type, &[], true, Some(&body)), found, "case {k}: {content_type:?}");
        }
    }

    /// `text` in UTF-16, little- or big-endian, after `prefix` (a byte order mark).
    fn utf16(prefix: &[u8], text: &str, little_endian: bool) -> Vec<u8> {
        let units = text.encode_utf16();
        let bytes = units.flat_map(|u| if little_endian { u.to_le_bytes() } else { u.to_be_bytes() });
        prefix.iter().copied().chain(bytes).collect()
    }

    /// Fix: a leading UTF-8 byte order mark is skipped, UTF-16 bodies (by their byte order
    /// mark or declared charset) are read as UTF-8, and UTF-32 and UTF-7 ones are unreadable
    /// when the frameworks read parameters from their type.
    #[test]
    fn byte_order_marks_and_unicode_charsets() {
        use PostBody::*;
        let json = "application/json";
        let named = r#"{"title":"x","_method":"DELETE"}"#;
        let plain = r#"{"title":"x"}"#;
        let charset = Unreadable(UNSUPPORTED_REQUEST_CHARSET);
        let cases: [(&'static str, Vec<u8>, PostBody); 21] = [
            (json, [UTF8_BOM, named.as_bytes()].concat(), NamesAMethod),
            (json, [UTF8_BOM, b" ", named.as_bytes()].concat(), NamesAMethod),
            ("application/x-www-form-urlencoded", [UTF8_BOM, b"_method=DELETE"].concat(), NamesAMethod),
            (json, utf16(b"\xFF\xFE", named, true), NamesAMethod),
            (json, utf16(b"\xFE\xFF", named, false), NamesAMethod),
            (
                "application/x-www-form-urlencoded",
                utf16(b"\xFF\xFE", "a=1&_method=DELETE", true),
                NamesAMethod,
            ),
            ("application/json; charset=utf-16le", utf16(b"", named, true), NamesAMethod),
            ("application/json; charset=UTF-16BE", utf16(b"", named, false), NamesAMethod),
            ("application/json; charset=\"utf-16\"", utf16(b"", named, false), NamesAMethod),
            ("application/json; charset=utf-16", utf16(b"", named, true), NamesAMethod),
            // Declared one way, marked the other: both are read.
            ("application/json; charset=utf-16be", utf16(b"\xFF\xFE", named, true), NamesAMethod),
            ("application/json; charset=utf-16", utf16(b"", plain, true), Clean),
            (json, utf16(b"\xFF\xFE", plain, true), Clean),
            ("application/json; charset=utf-8", plain.into(), Clean),
            ("application/json; charset=iso-8859-1", plain.into(), Clean),
            ("application/json; charset=utf-32", plain.into(), charset),
            ("application/x-www-form-urlencoded; charset=UTF-32LE", b"a=1".to_vec(), charset),
            ("application/json; charset=utf-7", br#"{"+AF8-method":"DELETE"}"#.to_vec(), charset),
            (json, [&b"\0\0\xFE\xFF"[..], b"\0\0\0{\0\0\0}"].concat(), charset),
            (json, [&b"\xFF\xFE\0\0"[..], b"{\0\0\0}\0\0\0"].concat(), charset),
            // A type no framework reads parameters from is read as it is.
            ("application/octet-stream", [&b"\xFF\xFE\0\0"[..], b"{\0\0\0}\0\0\0"].concat(), Clean),
        ];
        for (k, (content_type, body, found)) in cases.into_iter().enumerate() {
            let body = bytes::Bytes::from(body);
            assert_eq!(
                check(Some(content_type), &[], true, Some(&body)),
                found,
                "case {k}: {content_type:?}"
            );
        }
        // Gzipped UTF-16 is decoded, then read as UTF-16.
        let zipped = gzip(&utf16(b"\xFF\xFE", r#"{"_method":"PUT"}"#, true));
        assert_eq!(check(Some(json), &["gzip"], true, Some(&zipped)), NamesAMethod);
        // Unread, a form in a charset the sidecar cannot read says so; JSON is unchecked (the
        // proxy decides by path).
        assert_eq!(
            check(Some("application/x-www-form-urlencoded; charset=utf-32"), &[], false, None),
            charset
        );
        assert_eq!(
            check(Some("application/json; charset=utf-32"), &[], false, None),
            PostBody::Unchecked(BodyKind::Json)
        );
        assert_eq!(check(Some("image/png; charset=utf-32"), &[], false, None), Clean);
    }

    /// Fix: a body of any kind some framework reads parameters from (a form, JSON,
    /// multipart) that the sidecar did not read whole, or that decodes past the limit, is
    /// unchecked (with its kind); a body of another type is not.
    #[test]
    fn unread_bodies_of_kinds_frameworks_read_are_unchecked() {
        use BodyKind::*;
        use PostBody::*;
        let multipart = "multipart/form-data; boundary=X";
        let big_json = gzip(format!(r#"{{"a":"{}","_method":"DELETE"}}"#, "x".repeat(100)).as_bytes());
        let big_multipart = gzip(
            format!("--X\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n{}\r\n--X--", "x".repeat(100))
                .as_bytes(),
        );
        type Case<'a> =
            (Option<&'static str>, &'static [&'static str], bool, Option<&'a bytes::Bytes>, PostBody);
        let cases: [Case; 15] = [
            (Some("application/x-www-form-urlencoded"), &[], false, None, Unchecked(Form)),
            (None, &[], false, None, Unchecked(Form)),
            (Some(""), &[], false, None, Unchecked(Form)),
            (Some("application/json"), &[], false, None, Unchecked(Json)),
            (Some("application/vnd.api+json"), &["gzip"], false, None, Unchecked(Json)),
            (Some("text/plain; x=/json"), &[], false, None, Unchecked(Json)),
            (Some(multipart), &[], false, None, Unchecked(Multipart)),
            (Some("application/octet-stream"), &[], false, None, Clean),
            (Some("image/png"), &[], false, None, Clean),
            (Some(multipart), &["zstd"], false, None, Unchecked(Multipart)),
            (
                Some("application/x-www-form-urlencoded"),
                &["zstd"],
                false,
                None,
                Unreadable(UNSUPPORTED_REQUEST_ENCODING),
            ),
            (Some("image/png"), &["zstd"], false, None, Clean),
            (Some("application/json"), &["gzip"], true, Some(&big_json), Unchecked(Json)),
            (Some(multipart), &["gzip"], true, Some(&big_multipart), Unchecked(Multipart)),
            (Some("application/octet-stream"), &["gzip"], true, Some(&big_json), Clean),
        ];
        for (k, (content_type, encodings, complete, body, found)) in cases.into_iter().enumerate() {
            assert_eq!(
                check(content_type, encodings, complete, body),
                found,
                "case {k}: {content_type:?} {encodings:?}"
            );
        }
    }

    proptest::proptest! {
        /// Any bytes: no panic, and a body without `method` (in any case), `%` or `\\` (which
        /// could spell it) is never refused, however it is read.
        #[test]
        fn any_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let form = HeaderValue::from_static("application/x-www-form-urlencoded");
            let multipart = HeaderValue::from_static("multipart/form-data; boundary=X");
            let named = body_names_a_method(Some(&form), &body);
            let named = body_names_a_method(Some(&multipart), &body) || named;
            let spells = body.windows(6).any(|w| w.eq_ignore_ascii_case(b"method"));
            if !spells && !body.contains(&b'%') && !body.contains(&b'\\') {
                proptest::prop_assert!(!named);
            }
            // Read again as UTF-16 in both byte orders, and as UTF-32: no panic.
            let body = bytes::Bytes::from(body);
            let _ = check(Some("application/json; charset=utf-16"), &[], true, Some(&body));
            let _ = check(Some("application/json; charset=utf-32"), &[], true, Some(&body));
        }
    }
}
