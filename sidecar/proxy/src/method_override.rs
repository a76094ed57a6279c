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
//! the safe side). Bodies are read by what the frameworks accept, not only by the declared
//! type: a type with any `json` in it is JSON (Laravel), `multipart/*` is multipart (Rack), and
//! anything else, a missing type included, is read as a form (Rack parses a form without a
//! type; PHP and Rack cut a type at `,`). [`check_post_body`] decodes `gzip` and `deflate`
//! bodies first, and tells the proxy to refuse a form (declared, or a body without a type) it
//! did not read whole and a body in an encoding it cannot decode.

use http::HeaderValue;

use crate::body::{DecodeError, Encoding, decode};

/// The parameter name the frameworks read.
const PARAMETER: &[u8] = b"_method";

/// Whether `query` (without the `?`) has a `_method` parameter (its name percent-decoded,
/// compared without regard to case).
pub(crate) fn query_names_a_method(query: &str) -> bool {
    form_names_a_method(query.as_bytes())
}

/// Whether `method` is POST, in any letter case.
pub(crate) fn is_post(method: &http::Method) -> bool {
    method.as_str().eq_ignore_ascii_case("POST")
}

/// How a framework could read a POST body of some declared type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// A type with `json` in it.
    Json,
    /// `multipart/*`.
    Multipart,
    /// Anything else, a missing or unreadable type included.
    Form,
}

/// The media type of `content_type`, lower case, cut at `;` and `,`.
fn media_type(content_type: Option<&HeaderValue>) -> String {
    let media =
        content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase()).unwrap_or_default();
    media.split([';', ',']).next().unwrap_or("").trim().to_string()
}

/// Whether `content_type` declares a URL-encoded form.
pub(crate) fn is_declared_form(content_type: Option<&HeaderValue>) -> bool {
    media_type(content_type) == "application/x-www-form-urlencoded"
}

/// The kind of a body of `content_type` (see the [module documentation](self)).
pub(crate) fn body_kind(content_type: Option<&HeaderValue>) -> BodyKind {
    let media = media_type(content_type);
    if media.contains("json") {
        BodyKind::Json
    } else if media.starts_with("multipart/") {
        BodyKind::Multipart
    } else {
        BodyKind::Form
    }
}

/// What the check of a POST body found ([`check_post_body`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PostBody {
    /// No `_method` field, or a body no framework reads parameters from.
    Clean,
    /// A `_method` field: refused.
    NamesAMethod,
    /// A form (declared, or a body without a type, which Rack reads as one) that the sidecar
    /// did not read whole, or that decodes to more than the request buffer: refused (413).
    FormUnchecked,
    /// A body the frameworks could read parameters from whose `Content-Encoding` the sidecar
    /// cannot decode (the reason code): refused (415).
    Unreadable(&'static str),
}

/// Reason code of a POST body in a `Content-Encoding` the sidecar cannot decode.
pub(crate) const UNSUPPORTED_REQUEST_ENCODING: &str = "unsupported_request_encoding";

/// Reason code of a POST body that is not valid for its `Content-Encoding`.
pub(crate) const BAD_REQUEST_ENCODING: &str = "bad_request_encoding";

/// Checks a POST body for a `_method` field ([`body_names_a_method`]): `complete` when the
/// sidecar has it all (`whole` is then its bytes, none for no body), and a `gzip` or `deflate`
/// body is decoded first, to at most `decode_limit` bytes (Express's body parsers inflate
/// request bodies). A body without a type is a form here as a whole body is (Rack reads it
/// so), so it too is refused unread.
pub(crate) fn check_post_body(
    headers: &http::HeaderMap,
    complete: bool,
    whole: Option<&bytes::Bytes>,
    decode_limit: u64,
) -> PostBody {
    let content_type = headers.get(http::header::CONTENT_TYPE);
    // A form to Rack (declared, or no type at all); refused when it cannot be read.
    let form = content_type.is_none() || is_declared_form(content_type);
    let unread_form = || if form { PostBody::FormUnchecked } else { PostBody::Clean };
    let encoding = Encoding::of(headers);
    // A body some framework reads parameters from (anything else is read as a form only
    // when whole, on the safe side).
    let readable = form || body_kind(content_type) != BodyKind::Form;
    if !complete {
        // Not read whole: only a form is refused (JSON and multipart that large go on
        // unchecked in any encoding).
        return match (unread_form(), encoding) {
            (PostBody::FormUnchecked, None) => PostBody::Unreadable(UNSUPPORTED_REQUEST_ENCODING),
            (found, _) => found,
        };
    }
    let Some(body) = whole.filter(|b| !b.is_empty()) else {
        return PostBody::Clean;
    };
    let decoded = match encoding {
        Some(Encoding::Identity) => body.clone(),
        None if readable => return PostBody::Unreadable(UNSUPPORTED_REQUEST_ENCODING),
        None => return PostBody::Clean,
        Some(encoding) => match decode(body.clone(), encoding, decode_limit) {
            Ok(decoded) => decoded,
            Err(DecodeError::TooLarge) => return unread_form(),
            Err(DecodeError::Corrupt) if readable => return PostBody::Unreadable(BAD_REQUEST_ENCODING),
            Err(DecodeError::Corrupt) => return PostBody::Clean,
        },
    };
    if body_names_a_method(content_type, &decoded) { PostBody::NamesAMethod } else { PostBody::Clean }
}

/// Whether a POST body of `content_type` carries a `_method` field: a form parameter, a
/// multipart part named `_method`, or a top-level `"_method"` key of a JSON object (Laravel),
/// by [`body_kind`].
pub(crate) fn body_names_a_method(content_type: Option<&HeaderValue>, body: &[u8]) -> bool {
    match body_kind(content_type) {
        BodyKind::Json => json_names_a_method(body),
        BodyKind::Multipart => multipart_names_a_method(body),
        BodyKind::Form => form_names_a_method(body),
    }
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
    body.windows(b"name=".len()).enumerate().any(|(at, w)| {
        if !w.eq_ignore_ascii_case(b"name=") {
            return false;
        }
        let value = &body[at + w.len()..];
        let value = value.strip_prefix(b"\"").unwrap_or(value);
        let end = value
            .iter()
            .position(|b| matches!(b, b'"' | b';' | b'\r' | b'\n'))
            .unwrap_or(value.len())
            .min(PARAMETER.len() + 64);
        value.len() >= PARAMETER.len() && is_method_name(value[..end].trim_ascii_end())
    })
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
            (Some(form), &["gzip"], true, Some(&big), FormUnchecked),
            (Some(json), &["gzip"], true, Some(&big), Clean),
            (Some(form), &["gzip"], true, Some(&corrupt), Unreadable(BAD_REQUEST_ENCODING)),
            (Some(octets), &["gzip"], true, Some(&corrupt), Clean),
            (Some(form), &["br"], true, Some(&named), Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (Some(json), &["gzip", "gzip"], true, Some(&named), Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (Some(octets), &["br"], true, Some(&named), Clean),
            (Some(form), &[], false, None, FormUnchecked),
            (None, &[], false, None, FormUnchecked),
            (Some(json), &[], false, None, Clean),
            (Some(octets), &[], false, None, Clean),
            (Some("multipart/form-data; boundary=x"), &["zstd"], false, None, Clean),
            (None, &["zstd"], false, None, Unreadable(UNSUPPORTED_REQUEST_ENCODING)),
            (None, &["identity"], true, Some(&named), NamesAMethod),
        ];
        for (k, (content_type, encodings, complete, body, found)) in cases.into_iter().enumerate() {
            let mut headers = http::HeaderMap::new();
            if let Some(t) = content_type {
                headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(t));
            }
            for e in encodings {
                headers.append(http::header::CONTENT_ENCODING, HeaderValue::from_static(e));
            }
            assert_eq!(
                check_post_body(&headers, complete, body, 64),
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
            (Some(&json), br#"{"title":"a&_method=x"}"#, false),
            (Some(&json), br#"{"_method":"DELETE","_method":null}"#, false),
        ] {
            assert_eq!(body_names_a_method(content_type, body), names, "{:?}", String::from_utf8_lossy(body));
        }
    }

    proptest::proptest! {
        /// Any bytes: no panic, and a form that names no `_` parameter is never refused.
        #[test]
        fn any_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let form = HeaderValue::from_static("application/x-www-form-urlencoded");
            let multipart = HeaderValue::from_static("multipart/form-data");
            let named = body_names_a_method(Some(&form), &body);
            let _ = body_names_a_method(Some(&multipart), &body);
            if !body.contains(&b'_') && !body.contains(&b'%') {
                proptest::prop_assert!(!named);
            }
        }
    }
}
