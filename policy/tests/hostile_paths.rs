//! Hostile and tricky request-targets against `normalize`.

use custos_policy::normalize::{MAX_PATH_LEN, MAX_SEGMENTS, normalize};
use proptest::prelude::*;

include!("data/hostile_paths.rs");

#[test]
fn hostile_table() {
    assert!(HOSTILE.len() >= 30);
    let mut failures = Vec::new();
    for &(target, expect) in HOSTILE {
        let got = match normalize(target) {
            Ok(p) => Path(leak(p.as_str())),
            Err(e) => Reject(e),
        };
        if got != expect {
            failures.push(format!("{target:?}: expected {expect:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

#[test]
fn accepted_rows_are_fixed_points() {
    for &(target, expect) in HOSTILE {
        if let Path(p) = expect {
            let again = normalize(p).unwrap_or_else(|e| panic!("{target:?} -> {p:?}: {e}"));
            assert_eq!(again.as_str(), p, "{target:?}");
        }
    }
}

#[test]
fn rejection_messages_and_codes_never_echo_the_path() {
    let phone = "4915112345678";
    for target in [
        format!("/customers/{phone}%2fexport"),
        format!("/customers/{phone};x"),
        format!("/customers/{phone}%00"),
        format!("/customers/{phone}%zz"),
        format!("/customers/{phone}#x"),
        format!("http://x/{phone}"),
        format!("/customers/%c0{phone}"),
    ] {
        let err = normalize(&target).expect_err("must be rejected");
        assert!(!err.to_string().contains(phone), "{err}");
        assert!(!format!("{err:?}").contains(phone), "{err:?}");
        assert!(!err.code().contains(phone));
    }
}

#[test]
fn codes_are_unique_snake_case() {
    let codes: Vec<&str> = PathRejection::ALL.iter().map(|r| r.code()).collect();
    let mut unique = codes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), codes.len());
    for code in codes {
        assert!(code.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{code}");
    }
    assert_eq!(EncodedSlash.code(), "encoded_slash");
    // Every variant used in the table is listed in ALL.
    for &(_, expect) in HOSTILE {
        if let Reject(r) = expect {
            assert!(PathRejection::ALL.contains(&r));
        }
    }
}

#[test]
fn query_is_kept_raw() {
    let p = normalize("/customers/42?fields=name,phone&x=%zz").expect("valid");
    assert_eq!(p.as_str(), "/customers/42");
    assert_eq!(p.query(), Some("fields=name,phone&x=%zz"));
    assert_eq!(normalize("/a").expect("valid").query(), None);
    assert_eq!(normalize("/a?").expect("valid").query(), Some(""));
    assert_eq!(normalize("/a?b?c").expect("valid").query(), Some("b?c"));
    assert_eq!(normalize("/?q").expect("valid").query(), Some("q"));
    // The path and the query do not influence each other's equality.
    assert_ne!(normalize("/a?x").ok(), normalize("/a").ok());
    assert_eq!(normalize("/a/?x").ok(), normalize("//a?x").ok());
}

#[test]
fn segments_are_indexed() {
    let p = normalize("/customers/42/../43/orders").expect("valid");
    assert_eq!(p.as_str(), "/customers/43/orders");
    assert_eq!(p.segment_count(), 3);
    assert_eq!(p.segments().collect::<Vec<_>>(), ["customers", "43", "orders"]);
    assert_eq!(p.segments().rev().collect::<Vec<_>>(), ["orders", "43", "customers"]);
    assert_eq!(p.segments().len(), 3);
    assert_eq!(p.segment(1), Some("43"));
    assert_eq!(p.segment(3), None);
    assert!(!p.is_root());

    let root = normalize("/").expect("valid");
    assert!(root.is_root());
    assert_eq!(root.segment_count(), 0);
    assert_eq!(root.segments().next(), None);
    assert_eq!(root.segment(0), None);
}

#[test]
fn many_segments_spill_and_pop() {
    // More segments than are stored inline, then climb back down with '..'.
    let deep: String = (0..40).map(|i| format!("/s{i}")).collect();
    let p = normalize(&deep).expect("valid");
    assert_eq!(p.segment_count(), 40);
    assert_eq!(p.segment(39), Some("s39"));
    assert_eq!(p.as_str(), deep);

    let climbed = format!("{deep}{}/x", "/..".repeat(35));
    let p = normalize(&climbed).expect("valid");
    assert_eq!(p.as_str(), "/s0/s1/s2/s3/s4/x");
    assert_eq!(p.segments().collect::<Vec<_>>(), ["s0", "s1", "s2", "s3", "s4", "x"]);

    let too_far = format!("{deep}{}", "/..".repeat(41));
    assert_eq!(normalize(&too_far), Err(AboveRoot));
}

#[test]
fn length_limits() {
    let max = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
    assert_eq!(max.len(), MAX_PATH_LEN);
    assert_eq!(normalize(&max).expect("at the limit").as_str(), max);
    let over = format!("/{}", "a".repeat(MAX_PATH_LEN));
    assert_eq!(normalize(&over), Err(TooLong));
    // Slashes and dot segments count towards the raw length too.
    assert_eq!(normalize(&"/".repeat(MAX_PATH_LEN + 1)), Err(TooLong));
    // The query does not count.
    let long_query = format!("/a?{}", "q".repeat(MAX_PATH_LEN * 2));
    assert_eq!(normalize(&long_query).expect("valid").as_str(), "/a");

    let max_segments = "/s".repeat(MAX_SEGMENTS);
    assert_eq!(normalize(&max_segments).expect("valid").segment_count(), MAX_SEGMENTS);
    assert_eq!(normalize(&"/s".repeat(MAX_SEGMENTS + 1)), Err(TooLong));
    // Segments removed by '..' do not count.
    let churn = "/s/..".repeat(MAX_SEGMENTS * 2);
    assert_eq!(normalize(&churn).expect("valid").as_str(), "/");
}

#[test]
fn rejection_is_copy_and_displays_a_reason() {
    let r = EncodedSlash;
    let copy = r;
    assert_eq!(r, copy);
    assert_eq!(r.to_string(), "percent-encoded '/' in path");
    for r in PathRejection::ALL {
        assert!(!r.to_string().is_empty());
    }
}

/// Pieces that combine into nasty targets.
const PIECES: &[&str] = &[
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "a", "B", "é", "%c3%a9", "%c3", "%a9", "%c0%ae", "%2f",
    "%5c", "\\", ";", "%3b", "%25", "%2525", "%32", "%65", "%", "%4", "%zz", "?", "#", "%3f", "%23", "%00",
    "\0", "\t", "%09", " ", "%20", "*", "{", "~", "+",
];

fn tricky_target() -> impl Strategy<Value = String> {
    (prop::bool::weighted(0.9), prop::collection::vec(prop::sample::select(PIECES), 0..24)).prop_map(
        |(slash, pieces)| {
            let mut s = String::from(if slash { "/" } else { "" });
            for p in pieces {
                s.push_str(p);
            }
            s
        },
    )
}

fn check_invariants(target: &str) -> Result<(), TestCaseError> {
    let Ok(p) = normalize(target) else {
        return Ok(());
    };
    let s = p.as_str();
    prop_assert!(s.starts_with('/'), "{s:?}");
    for bad in ["//", "/./", "/../", "\\", "\0"] {
        prop_assert!(!s.contains(bad), "{target:?} -> {s:?} contains {bad:?}");
    }
    prop_assert!(s == "/" || !s.ends_with('/'), "{s:?}");
    prop_assert!(!s.ends_with("/.") && !s.ends_with("/.."), "{s:?}");
    prop_assert!(!s.contains('?') && !s.contains('#') && !s.contains(';'), "{s:?}");

    let segments: Vec<&str> = p.segments().collect();
    prop_assert_eq!(segments.len(), p.segment_count());
    for seg in &segments {
        prop_assert!(!seg.is_empty() && *seg != "." && *seg != "..");
    }
    let joined: String = segments.iter().map(|seg| format!("/{seg}")).collect();
    prop_assert_eq!(if joined.is_empty() { "/" } else { &joined }, s);

    // Idempotent: the output normalises to itself.
    let again = normalize(s);
    prop_assert!(again.is_ok(), "{target:?} -> {s:?} -> {again:?}");
    if let Ok(again) = again {
        prop_assert_eq!(again.as_str(), s);
        prop_assert_eq!(again.segments().collect::<Vec<_>>(), segments);
        prop_assert_eq!(again.query(), None);
    }
    Ok(())
}

/// A deliberately simple, independent normaliser: decode the whole segment, then check.
/// Only says whether a target is accepted and what it becomes (not which rejection).
fn reference(target: &str) -> Option<String> {
    if !target.starts_with('/') || target.contains('#') {
        return None;
    }
    let path = target.split('?').next()?;
    if path.len() > MAX_PATH_LEN {
        return None;
    }
    let mut stack: Vec<String> = Vec::new();
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let mut bytes = Vec::new();
        let mut rest = raw.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'%' {
                let [h, l, tail @ ..] = tail else {
                    return None;
                };
                if !h.is_ascii_hexdigit() || !l.is_ascii_hexdigit() {
                    return None;
                }
                let hex = [*h, *l];
                bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                rest = tail;
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        for (k, &b) in bytes.iter().enumerate() {
            if matches!(b, b'/' | b'\\' | b';' | b'?' | b'#' | 0..=0x1f | 0x7f) {
                return None;
            }
            let hex_at = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_hexdigit);
            if b == b'%' && hex_at(k + 1) && hex_at(k + 2) {
                return None;
            }
        }
        let text = String::from_utf8(bytes).ok()?;
        match text.as_str() {
            "." => {}
            ".." => {
                stack.pop()?;
            }
            _ => {
                if stack.len() == MAX_SEGMENTS {
                    return None;
                }
                stack.push(text.replace('%', "%25"));
            }
        }
    }
    Some(format!("/{}", stack.join("/")))
}

fn check_against_reference(target: &str) -> Result<(), TestCaseError> {
    let got = normalize(target);
    let want = reference(target);
    prop_assert_eq!(got.as_ref().ok().map(|p| p.as_str()), want.as_deref(), "{:?} -> {:?}", target, got);
    if let (Ok(p), Some(want)) = (&got, &want) {
        let want_segments: Vec<&str> = want.split('/').filter(|s| !s.is_empty()).collect();
        prop_assert_eq!(p.segments().collect::<Vec<_>>(), want_segments);
        prop_assert_eq!(p.query(), target.split_once('?').map(|(_, q)| q));
    }
    Ok(())
}

#[test]
fn table_agrees_with_reference() {
    for &(target, expect) in HOSTILE {
        assert_eq!(reference(target).is_some(), matches!(expect, Path(_)), "{target:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic(target in any::<String>()) {
        check_invariants(&target)?;
        let slashed = format!("/{target}");
        check_invariants(&slashed)?;
    }

    #[test]
    fn tricky_targets_keep_invariants(target in tricky_target()) {
        check_invariants(&target)?;
    }

    #[test]
    fn agrees_with_reference(target in tricky_target()) {
        check_against_reference(&target)?;
    }

    #[test]
    fn arbitrary_strings_agree_with_reference(target in any::<String>()) {
        check_against_reference(&format!("/{target}"))?;
    }
}
