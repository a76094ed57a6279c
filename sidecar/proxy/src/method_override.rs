//! Method overrides by parameter: `_method=DELETE` in the query or in a form body makes
//! Rack (Rails), Laravel, Symfony and Express's `method-override` run a POST as the method it
//! names, which the policy never decided; Laravel reads it from a JSON body too. Like the
//! override headers, such a POST is refused. Only POSTs are checked: the frameworks honour
//! the parameter on nothing else. PHP turns a leading `.`, space or `[` of a parameter name
//! into `_`, so `.method` is `_method` to Laravel and Symfony and is refused as well.

use http::HeaderValue;

/// The parameter name the frameworks read.
const PARAMETER: &[u8] = b"_method";

/// Whether `query` (without the `?`) has a `_method` parameter (its name percent-decoded,
/// compared without regard to case).
pub(crate) fn query_names_a_method(query: &str) -> bool {
    form_names_a_method(query.as_bytes())
}

/// Whether a POST body of `content_type` carries a `_method` field: a form
/// (`application/x-www-form-urlencoded`) parameter, a `multipart/form-data` part named
/// `_method`, or a top-level `"_method"` key of a JSON object (Laravel). Other bodies are
/// never read.
pub(crate) fn body_names_a_method(content_type: Option<&HeaderValue>, body: &[u8]) -> bool {
    let Some(media) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let media = media.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        form_names_a_method(body)
    } else if media.eq_ignore_ascii_case("multipart/form-data") {
        multipart_names_a_method(body)
    } else if media.eq_ignore_ascii_case("application/json") || media.to_ascii_lowercase().ends_with("+json")
    {
        json_names_a_method(body)
    } else {
        false
    }
}

/// A top-level `"_method"` key of a JSON object, not null (invalid JSON names nothing).
fn json_names_a_method(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "_method")]
        method: Option<serde::de::IgnoredAny>,
    }
    // An object only: serde would also read a struct from an array, field by position.
    body.trim_ascii_start().starts_with(b"{")
        && serde_json::from_slice::<Probe>(body).is_ok_and(|p| p.method.is_some())
}

/// `a=1&_method=DELETE`: any parameter whose decoded name is `_method` as PHP reads it.
fn form_names_a_method(form: &[u8]) -> bool {
    form.split(|&b| b == b'&' || b == b';').any(|pair| {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        name.len() >= PARAMETER.len() && decodes_to_method_name(name)
    })
}

/// Whether `name` is `_method` as PHP reads parameter names: a leading `.`, space or `[`
/// becomes `_` (ASCII case ignored).
fn is_method_name(name: &[u8]) -> bool {
    name.len() == PARAMETER.len()
        && matches!(name[0], b'_' | b'.' | b' ' | b'[')
        && name[1..].eq_ignore_ascii_case(&PARAMETER[1..])
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
        value.len() >= PARAMETER.len()
            && is_method_name(&value[..PARAMETER.len()])
            && value.get(PARAMETER.len()).is_none_or(|b| matches!(b, b'"' | b';' | b'\r' | b'\n' | b' '))
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
            ("", false),
            ("%", false),
            ("%5", false),
        ] {
            assert_eq!(query_names_a_method(query), names, "{query:?}");
        }
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
            (None, b"_method=DELETE", false),
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
