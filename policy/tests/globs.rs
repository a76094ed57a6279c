//! Path glob parsing and matching.

use custos_policy::glob::{GlobError, PathGlob};
use custos_policy::normalize::{NormalizedPath, normalize};
use proptest::prelude::*;

/// `(name, value)` captures expected from a match.
type Captures = &'static [(&'static str, &'static str)];

/// (pattern, request-target, matches?, captures when it matches).
const MATCHES: &[(&str, &str, bool, Captures)] = &[
    // Root and everything.
    ("/", "/", true, &[]),
    ("/", "/a", false, &[]),
    ("/**", "/", true, &[]),
    ("/**", "/a/b/c", true, &[]),
    // Literals: whole segments, case-sensitive, matched after normalisation.
    ("/customers/export", "/customers/export", true, &[]),
    ("/customers/export", "/customers/exp%6frt", true, &[]),
    ("/customers/export", "//customers/./export/", true, &[]),
    ("/customers/export", "/customers/x/../export", true, &[]),
    ("/customers/export", "/customers/export?format=csv", true, &[]),
    ("/customers/export", "/Customers/export", false, &[]),
    ("/customers/export", "/customers/exports", false, &[]),
    ("/customers/export", "/customers/export/x", false, &[]),
    ("/customers/export", "/customers/export%20", false, &[]),
    ("/customers/export/", "/customers/export", true, &[]),
    ("//customers//export", "/customers/export", true, &[]),
    ("/café/*", "/caf%C3%A9/1", true, &[]),
    // '*': exactly one segment.
    ("/customers/*", "/customers/42", true, &[]),
    ("/customers/*", "/customers", false, &[]),
    ("/customers/*", "/customers/42/orders", false, &[]),
    ("/*/export", "/customers/export", true, &[]),
    ("/*", "/", false, &[]),
    ("/discount/*", "/discount/50%25", true, &[]),
    // '**': zero or more segments, anywhere.
    ("/parcels/**", "/parcels", true, &[]),
    ("/parcels/**", "/parcels/1/2/3", true, &[]),
    ("/parcels/**", "/parcelsX/1", false, &[]),
    ("/parcels/**", "/", false, &[]),
    ("/a/**/b", "/a/b", true, &[]),
    ("/a/**/b", "/a/x/y/b", true, &[]),
    ("/a/**/b", "/a/b/b", true, &[]),
    ("/a/**/b", "/a/x/y/b/c", false, &[]),
    ("/a/**/b", "/b", false, &[]),
    ("/**/export", "/export", true, &[]),
    ("/**/export", "/customers/export", true, &[]),
    ("/**/export", "/customers/export/x", false, &[]),
    ("/**/**/x", "/x", true, &[]),
    ("/a/*/**", "/a", false, &[]),
    ("/a/*/**", "/a/b", true, &[]),
    ("/**/a/**/b", "/b/a/a/b", true, &[]),
    ("/**/a/**/b", "/b/b/a", false, &[]),
    // Captures.
    ("/customers/{id}", "/customers/42", true, &[("id", "42")]),
    ("/customers/{id}", "/customers", false, &[]),
    ("/customers/{id}", "/customers/caf%C3%A9", true, &[("id", "café")]),
    ("/customers/{id}/orders/{order_id}", "/customers/42/orders/7", true, &[("id", "42"), ("order_id", "7")]),
    ("/{_x1}/**", "/a/b/c", true, &[("_x1", "a")]),
    // With '**', each '**' takes as few segments as possible, left to right.
    ("/**/{id}", "/a/b/c", true, &[("id", "c")]),
    ("/**/{id}/**", "/a/b/c", true, &[("id", "a")]),
    ("/a/**/{x}/b/**", "/a/1/b/2/b/3", true, &[("x", "1")]),
    ("/**/{x}/b/**/{y}/c", "/q/w/b/b/e/c/c", true, &[("x", "w"), ("y", "c")]),
    // Within-segment wildcards.
    ("/files/*.csv", "/files/report.csv", true, &[]),
    ("/files/*.csv", "/files/.csv", true, &[]),
    ("/files/*.csv", "/files/report.csv.exe", false, &[]),
    ("/files/*.csv", "/files/report.CSV", false, &[]),
    ("/files/*.csv", "/files/dir/report.csv", false, &[]),
    ("/files/report-*-*.csv", "/files/report-2024-01.csv", true, &[]),
    ("/files/report-*-*.csv", "/files/report-2024.csv", false, &[]),
    ("/files/a*a", "/files/a", false, &[]),
    ("/files/a*a", "/files/aa", true, &[]),
    ("/files/a*a", "/files/abca", true, &[]),
    ("/files/*-*", "/files/abc", false, &[]),
    ("/files/*é*", "/files/caf%C3%A9s", true, &[]),
    ("/files/x*", "/files/x", true, &[]),
    ("/files/**/*.csv", "/files/a/b/c.csv", true, &[]),
];

fn path(target: &str) -> NormalizedPath {
    normalize(target).unwrap_or_else(|e| panic!("{target:?}: {e}"))
}

fn glob(pattern: &str) -> PathGlob {
    PathGlob::parse(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"))
}

#[test]
fn match_table() {
    let mut failures = Vec::new();
    for &(pattern, target, expect, captures) in MATCHES {
        let g = glob(pattern);
        let p = path(target);
        let got = g.matches(&p);
        let got_captures = g.captures(&p);
        let want_captures =
            expect.then(|| captures.iter().map(|&(n, v)| (n.to_owned(), v.to_owned())).collect::<Vec<_>>());
        if got != expect || got_captures != want_captures {
            failures.push(format!(
                "{pattern:?} vs {target:?}: expected {expect} {want_captures:?}, got {got} {got_captures:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// (pattern, error message).
const BAD: &[(&str, &str)] = &[
    ("", "pattern must start with '/'"),
    ("customers/*", "pattern must start with '/'"),
    ("*", "pattern must start with '/'"),
    ("/a/**b", "'**' must be a whole segment (segment 2)"),
    ("/a/***", "'**' must be a whole segment (segment 2)"),
    ("/a/x**", "'**' must be a whole segment (segment 2)"),
    ("/a/{}", "empty capture name in segment 2"),
    ("/{id}/{id}", "duplicate capture name 'id'"),
    ("/{id}/**/{ID}/{id}", "duplicate capture name 'id'"),
    ("/a/{id", "unbalanced '{' in segment 2"),
    ("/a/{{id}}", "unbalanced '{' in segment 2"),
    ("/a/id}", "unbalanced '}' in segment 2"),
    ("/a/}{", "unbalanced '}' in segment 2"),
    ("/a/x{id}", "a '{name}' capture must be a whole segment (segment 2)"),
    ("/a/{a}{b}", "a '{name}' capture must be a whole segment (segment 2)"),
    ("/a/{id}*", "a '{name}' capture must be a whole segment (segment 2)"),
    ("/a/{1id}", "invalid capture name '1id' in segment 2: expected [A-Za-z_][A-Za-z0-9_]*"),
    ("/a/{my-id}", "invalid capture name 'my-id' in segment 2: expected [A-Za-z_][A-Za-z0-9_]*"),
    ("/a/{*}", "invalid capture name '*' in segment 2: expected [A-Za-z_][A-Za-z0-9_]*"),
    ("/a/%2e", "'%' in segment 2: percent-escapes are not allowed in patterns, write the decoded character"),
    (
        "/caf%C3%A9",
        "'%' in segment 1: percent-escapes are not allowed in patterns, write the decoded character",
    ),
    ("/a/../b", "'.' and '..' segments are not allowed in patterns (segment 2)"),
    ("/./a", "'.' and '..' segments are not allowed in patterns (segment 1)"),
    ("/a;b", "character ';' in segment 1 can never match a normalised path"),
    ("/a/b\\c", "character '\\\\' in segment 2 can never match a normalised path"),
    ("/a?x=1", "character '?' in segment 1 can never match a normalised path"),
    ("/a#b", "character '#' in segment 1 can never match a normalised path"),
    ("/a\tb", "character '\\t' in segment 1 can never match a normalised path"),
];

#[test]
fn bad_patterns() {
    let mut failures = Vec::new();
    for &(pattern, message) in BAD {
        match PathGlob::parse(pattern) {
            Ok(g) => failures.push(format!("{pattern:?}: accepted as {g:?}")),
            Err(e) if e.to_string() != message => {
                failures.push(format!("{pattern:?}: expected {message:?}, got {:?}", e.to_string()));
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn size_limits() {
    let long = format!("/{}", "a".repeat(8192));
    assert_eq!(PathGlob::parse(&long).map(|_| ()), Err(GlobError::TooLong));
    assert_eq!(GlobError::TooLong.to_string(), "pattern is longer than 8192 bytes");
    let many = "/a".repeat(257);
    assert_eq!(PathGlob::parse(&many).map(|_| ()), Err(GlobError::TooManySegments));
    assert_eq!(GlobError::TooManySegments.to_string(), "pattern has more than 256 segments");
    assert!(PathGlob::parse(&"/a".repeat(256)).is_ok());
}

#[test]
fn canonical_form_and_names() {
    let g = glob("//customers//{id}/orders/{order_id}/");
    assert_eq!(g.as_str(), "/customers/{id}/orders/{order_id}");
    assert_eq!(g.to_string(), g.as_str());
    assert_eq!(g.param_names().collect::<Vec<_>>(), ["id", "order_id"]);
    assert_eq!(glob("/").as_str(), "/");
    assert_eq!(glob("//").as_str(), "/");
    assert_eq!(glob("/**").param_names().count(), 0);
    let parsed: PathGlob = "/a/*".parse().expect("valid");
    assert_eq!(parsed.as_str(), "/a/*");
}

#[test]
fn pathological_double_stars_are_correct() {
    // 200 segments of "a": no "b" anywhere, so no match.
    let all_a = path(&"/a".repeat(200));
    let g = glob("/**/a/**/a/**/a/**/b");
    assert!(!g.matches(&all_a));
    assert_eq!(g.captures(&all_a), None);

    let ends_b = path(&format!("{}/b", "/a".repeat(199)));
    assert!(g.matches(&ends_b));

    let many = glob(&format!("{}/**/b", "/**/a".repeat(40)));
    assert!(!many.matches(&all_a));
    assert!(many.matches(&ends_b));
    let too_few_a = path(&format!("{}/b", "/a".repeat(39)));
    assert!(!many.matches(&too_few_a));

    let captured = glob("/**/{x}/a/**/{y}/b");
    assert_eq!(
        captured.captures(&ends_b),
        Some(vec![("x".to_owned(), "a".to_owned()), ("y".to_owned(), "a".to_owned())])
    );

    let star_in_segment = glob("/**/*a*a*a*a*b");
    let long_segment = path(&format!("/{}", "a".repeat(4000)));
    assert!(!star_in_segment.matches(&long_segment));
}

// ---- Reference matcher, for the property test ----

#[derive(Debug, Clone)]
enum Tok {
    Lit(&'static str),
    One,
    Deep,
    Capture,
}

/// Exhaustive recursive matcher: tries each `**` extent from shortest to longest, so the
/// first match found is the leftmost-shortest one.
fn reference(tokens: &[Tok], segs: &[&str], caps: &mut Vec<String>) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return segs.is_empty();
    };
    match first {
        Tok::Deep => (0..=segs.len()).any(|k| reference(rest, &segs[k..], caps)),
        _ => {
            let Some((seg, more)) = segs.split_first() else {
                return false;
            };
            match first {
                Tok::Lit(l) if l != seg => false,
                Tok::Capture => {
                    caps.push((*seg).to_owned());
                    let ok = reference(rest, more, caps);
                    if !ok {
                        caps.pop();
                    }
                    ok
                }
                _ => reference(rest, more, caps),
            }
        }
    }
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        3 => prop::sample::select(&["a", "b"][..]).prop_map(Tok::Lit),
        1 => Just(Tok::One),
        2 => Just(Tok::Deep),
        1 => Just(Tok::Capture),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn agrees_with_reference(
        tokens in prop::collection::vec(tok(), 0..8),
        segs in prop::collection::vec(prop::sample::select(&["a", "b", "c"][..]), 0..9),
    ) {
        let mut pattern = String::new();
        let mut n = 0;
        for t in &tokens {
            pattern.push('/');
            match t {
                Tok::Lit(l) => pattern.push_str(l),
                Tok::One => pattern.push('*'),
                Tok::Deep => pattern.push_str("**"),
                Tok::Capture => {
                    pattern.push_str(&format!("{{c{n}}}"));
                    n += 1;
                }
            }
        }
        if pattern.is_empty() {
            pattern.push('/');
        }
        let target: String = if segs.is_empty() {
            "/".to_owned()
        } else {
            segs.iter().map(|s| format!("/{s}")).collect()
        };
        let g = PathGlob::parse(&pattern).expect("generated pattern is valid");
        let p = normalize(&target).expect("generated path is valid");

        let mut caps = Vec::new();
        let want = reference(&tokens, &segs, &mut caps);
        prop_assert_eq!(g.matches(&p), want, "{} vs {}", pattern, target);
        let got = g.captures(&p).map(|c| c.into_iter().map(|(_, v)| v).collect::<Vec<_>>());
        prop_assert_eq!(got, want.then_some(caps), "{} vs {}", pattern, target);
    }

    #[test]
    fn parse_never_panics(pattern in any::<String>()) {
        let _ = PathGlob::parse(&pattern);
        if let Ok(g) = PathGlob::parse(&format!("/{pattern}")) {
            // The canonical form parses to itself.
            let again = PathGlob::parse(g.as_str());
            prop_assert!(again.is_ok());
            if let Ok(again) = again {
                prop_assert_eq!(again.as_str(), g.as_str());
            }
        }
    }

    #[test]
    fn wildcard_segments_agree_with_reference(
        first in prop::sample::select(&["", "a", "b", "ab"][..]),
        inner in prop::collection::vec(prop::sample::select(&["a", "b", "ab"][..]), 0..3),
        last in prop::sample::select(&["", "a", "b", "ab"][..]),
        seg in "[ab]{1,8}",
    ) {
        // Parts joined by `*`. Only the first and the last may be empty, so no `**` (a deep
        // wildcard) appears: generated, not rejected (a quarter of the patterns would be, and
        // proptest aborts past 1,024 rejects).
        let parts: Vec<&str> = std::iter::once(first).chain(inner).chain(std::iter::once(last)).collect();
        let pattern_seg = parts.join("*");
        prop_assert!(!pattern_seg.contains("**"));
        let g = PathGlob::parse(&format!("/{pattern_seg}")).expect("valid");
        let p = normalize(&format!("/{seg}")).expect("valid");
        prop_assert_eq!(g.matches(&p), naive_wildcard(pattern_seg.as_bytes(), seg.as_bytes()));
    }
}

/// Textbook recursive `*` matcher over bytes.
fn naive_wildcard(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|k| naive_wildcard(rest, &s[k..])),
        Some((c, rest)) => s.split_first().is_some_and(|(d, more)| c == d && naive_wildcard(rest, more)),
    }
}

/// `text` percent-encoded where it is not ASCII, as a client sends it.
fn encode_non_ascii(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// The spellings of `c` an app folding case takes for it: itself, its single-character upper
/// and lower cases, and the non-ASCII letters whose case mapping is this ASCII letter.
fn spellings(c: char) -> Vec<char> {
    let mut out = vec![c];
    for mapped in [c.to_uppercase().collect::<Vec<_>>(), c.to_lowercase().collect::<Vec<_>>()] {
        if let [one] = mapped[..] {
            out.push(one);
        }
    }
    out.extend(match c.to_ascii_lowercase() {
        's' => &['\u{17F}'][..],
        'i' => &['\u{130}', '\u{131}'][..],
        'k' => &['\u{212A}'][..],
        _ => &[][..],
    });
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A folded glob (Deny rules) matches every spelling of its literal an app routing
    /// without regard to case would take for it, sent percent-encoded.
    #[test]
    fn folded_literals_match_every_spelling(
        word in "[a-zA-Z0-9éÉſıİKσςΣßæ_-]{1,12}",
        picks in prop::collection::vec(any::<prop::sample::Index>(), 12),
    ) {
        let glob = PathGlob::parse(&format!("/{word}/x")).expect("valid").folding_case();
        let spelled: String = word
            .chars()
            .zip(&picks)
            .map(|(c, pick)| {
                let options = spellings(c);
                options[pick.index(options.len())]
            })
            .collect();
        let target = format!("/{}/X", encode_non_ascii(&spelled));
        let path = normalize(&target).expect("valid");
        prop_assert!(glob.matches(&path), "/{} vs {}", word, target);
        prop_assert!(custos_policy::glob::fold_eq(&word, &spelled));
    }

    /// Folding only widens a glob: what it matched as written, it matches folded.
    #[test]
    fn folding_never_loses_a_match(word in "\\PC{1,10}", seg_is_word in any::<bool>(), other in "\\PC{1,10}") {
        let Ok(glob) = PathGlob::parse(&format!("/{word}")) else { return Ok(()) };
        let seg = if seg_is_word { word.clone() } else { other };
        let Ok(path) = normalize(&format!("/{}", encode_non_ascii(&seg))) else { return Ok(()) };
        if glob.matches(&path) {
            prop_assert!(glob.clone().folding_case().matches(&path), "/{} vs /{}", word, seg);
        }
    }
}
