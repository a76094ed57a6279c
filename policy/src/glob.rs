//! Path globs.
//!
//! Policy rules name request paths with [`PathGlob`]s such as `/customers/*`,
//! `/parcels/**` or `/customers/{id}/orders`. Globs are matched against a
//! [`NormalizedPath`] segment by segment, never against the raw request-target.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::normalize::{MAX_PATH_LEN, MAX_SEGMENTS, NormalizedPath};

/// Why a glob pattern was rejected by [`PathGlob::parse`].
///
/// Segment numbers count the non-empty segments of the pattern from 1
/// (in `/customers/{id`, `{id` is segment 2).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GlobError {
    /// The pattern is empty or does not start with `/`.
    #[error("pattern must start with '/'")]
    MissingLeadingSlash,
    /// The pattern is longer than [`MAX_PATH_LEN`] bytes.
    #[error("pattern is longer than 8192 bytes")]
    TooLong,
    /// The pattern has more than [`MAX_SEGMENTS`] segments.
    #[error("pattern has more than 256 segments")]
    TooManySegments,
    /// A `%` in the pattern: patterns are written decoded.
    #[error(
        "'%' in segment {segment}: percent-escapes are not allowed in patterns, write the decoded character"
    )]
    PercentEscape {
        /// 1-based segment number.
        segment: usize,
    },
    /// A character that never occurs in a normalised path (`\`, `;`, `?`, `#`, ASCII
    /// control characters).
    #[error("character {character:?} in segment {segment} can never match a normalised path")]
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// 1-based segment number.
        segment: usize,
    },
    /// A `.` or `..` segment.
    #[error("'.' and '..' segments are not allowed in patterns (segment {segment})")]
    DotSegment {
        /// 1-based segment number.
        segment: usize,
    },
    /// `**` combined with other characters in one segment.
    #[error("'**' must be a whole segment (segment {segment})")]
    DoubleStarInSegment {
        /// 1-based segment number.
        segment: usize,
    },
    /// A `{` without a matching `}` (or a nested `{`).
    #[error("unbalanced '{{' in segment {segment}")]
    UnbalancedOpenBrace {
        /// 1-based segment number.
        segment: usize,
    },
    /// A `}` without a matching `{`.
    #[error("unbalanced '}}' in segment {segment}")]
    UnbalancedCloseBrace {
        /// 1-based segment number.
        segment: usize,
    },
    /// A capture combined with other characters in one segment (`x{id}`, `{a}{b}`).
    #[error("a '{{name}}' capture must be a whole segment (segment {segment})")]
    CaptureNotWholeSegment {
        /// 1-based segment number.
        segment: usize,
    },
    /// `{}`.
    #[error("empty capture name in segment {segment}")]
    EmptyCaptureName {
        /// 1-based segment number.
        segment: usize,
    },
    /// A capture name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("invalid capture name '{name}' in segment {segment}: expected [A-Za-z_][A-Za-z0-9_]*")]
    InvalidCaptureName {
        /// The name as written.
        name: String,
        /// 1-based segment number.
        segment: usize,
    },
    /// The same capture name used twice.
    #[error("duplicate capture name '{0}'")]
    DuplicateCaptureName(String),
}

/// One compiled pattern segment.
#[derive(Clone, Debug)]
enum Token {
    /// Exactly this segment.
    Literal(Box<str>),
    /// One segment matching a within-segment wildcard; the literal parts between the `*`s
    /// (at least two parts, possibly empty).
    Wildcard(Box<[Box<str>]>),
    /// `*`: any one segment.
    One,
    /// `{name}`: any one segment, captured; index into `names`.
    Capture(usize),
    /// `**`: zero or more segments.
    Deep,
}

/// The character an app that routes without regard to case takes `c` for: ASCII letters in
/// lower case; the four characters whose simple case mapping is an ASCII letter as that
/// letter (`ſ` U+017F and `ı` U+0131 upper-case to `S` and `I`, `İ` U+0130 and the Kelvin sign
/// U+212A lower-case to `i` and `k`: Java's `equalsIgnoreCase` and Spring's case-insensitive
/// `PathPattern` take `/adminiſtrators` or `/\u{212A}eys` for the ASCII word); any other
/// character as the lower case of its upper case where both are single characters (`É` and `é`
/// alike, `ς` as `σ`, as ASP.NET Core's `OrdinalIgnoreCase` routing compares them), else as
/// itself.
pub fn fold_char(c: char) -> char {
    match c {
        _ if c.is_ascii() => c.to_ascii_lowercase(),
        '\u{17F}' => 's',
        '\u{130}' | '\u{131}' => 'i',
        '\u{212A}' => 'k',
        _ => {
            let mut upper = c.to_uppercase();
            let (Some(u), None) = (upper.next(), upper.next()) else { return c };
            let mut lower = u.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => c,
            }
        }
    }
}

/// `text` with each character folded ([`fold_char`]).
pub fn fold_text(text: &str) -> String {
    if text.is_ascii() { text.to_ascii_lowercase() } else { text.chars().map(fold_char).collect() }
}

/// Whether `a` and `b` are the same text once folded ([`fold_char`]); ASCII text is compared
/// without allocating or decoding.
pub fn fold_eq(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    a.chars().map(fold_char).eq(b.chars().map(fold_char))
}

/// Whether `folded` (text [`fold_text`] folded) and `seg`, a segment of a path that is ASCII
/// when `ascii`, are the same text once folded. What Deny rules compare their literals with.
#[inline]
pub fn folded_eq(folded: &str, seg: &str, ascii: bool) -> bool {
    folded.eq_ignore_ascii_case(seg) || (!ascii && fold_eq(folded, seg))
}

impl Token {
    /// Whether this single-segment token matches `seg` (case ignored with `fold_case`, as
    /// [`fold_char`] folds it, the token's text then being folded; `ascii` when the path is
    /// ASCII, which a folded literal beyond ASCII can never match). Never called on `Deep`.
    fn matches_segment(&self, seg: &str, fold_case: bool, ascii: bool) -> bool {
        match self {
            Token::Literal(lit) if fold_case => folded_eq(lit, seg, ascii),
            Token::Literal(lit) => **lit == *seg,
            Token::Wildcard(parts) if fold_case && ascii => {
                wildcard_matches(parts, &seg.to_ascii_lowercase())
            }
            Token::Wildcard(parts) if fold_case => wildcard_matches(parts, &fold_text(seg)),
            Token::Wildcard(parts) => wildcard_matches(parts, seg),
            Token::One | Token::Capture(_) => true,
            Token::Deep => false,
        }
    }
}

/// Matches `seg` against `parts[0] * parts[1] * ... * parts[n-1]` (`n >= 2`), where
/// each `*` matches any run of characters, possibly empty. Leftmost-first search of the
/// middle parts is exact for a pattern made of `*`s and literals only.
fn wildcard_matches(parts: &[Box<str>], seg: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        // A wildcard always has at least two parts; a single part is a literal.
        return parts.first().is_some_and(|p| **p == *seg);
    };
    if seg.len() < first.len() + last.len() {
        return false;
    }
    let Some(rest) = seg.strip_prefix(&**first) else {
        return false;
    };
    let Some(mut rest) = rest.strip_suffix(&**last) else {
        return false;
    };
    for part in middle {
        match rest.find(&**part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// A compiled path glob.
///
/// # Grammar
///
/// ```text
/// pattern  = "/" [ segment *( "/" segment ) ] [ "/" ]
/// segment  = "**"                 ; zero or more segments, anywhere in the pattern
///          | "*"                  ; exactly one segment
///          | "{" name "}"         ; exactly one segment, captured under `name`
///          | literal              ; exactly this segment, case-sensitive
///          | wildcard             ; one segment; each '*' matches any run of characters
///                                 ;   within the segment, possibly empty ("*.csv")
/// name     = [A-Za-z_] *[A-Za-z0-9_]   ; unique within the pattern
/// literal  = 1*char               ; no '*', '{', '}'
/// wildcard = literal-or-empty 1*( "*" literal ) ...   ; has '*' but no "**"
/// char     = any character except "/", "%", "\", ";", "?", "#", "*", "{", "}"
///            and ASCII control characters
/// ```
///
/// - Literals are written decoded (`/café`, not `/caf%C3%A9`): `%` is rejected, and so are
///   characters that can never occur in a [`NormalizedPath`] (`\`, `;`, `?`, `#`,
///   control characters), and `.`/`..` segments.
/// - Empty segments (`//`) and a trailing `/` are ignored: `/a//b/` is `/a/b`.
/// - `/` matches only the root; `/**` matches every path, including the root;
///   `/a/**` matches `/a` and everything below it.
/// - `**` may appear several times and in the middle (`/a/**/b`); matching takes
///   O(pattern × path) time at worst, never exponential.
/// - When `**` makes a match ambiguous, each `**` takes as few segments as possible,
///   from left to right; captures report that match.
/// - At most [`MAX_PATH_LEN`] bytes and [`MAX_SEGMENTS`] segments.
///
/// [`as_str`](PathGlob::as_str) is the canonical form: empty segments and the trailing
/// slash removed.
#[derive(Clone, Debug)]
pub struct PathGlob {
    source: String,
    tokens: Box<[Token]>,
    names: Box<[Box<str>]>,
    /// Number of single-segment tokens: the minimum path length.
    min_segments: usize,
    has_deep: bool,
    /// Literal text matches without regard to ASCII case ([`PathGlob::folding_case`]).
    fold_case: bool,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Parses one non-empty pattern segment (1-based number `n`).
fn parse_segment(seg: &str, n: usize, names: &mut Vec<Box<str>>) -> Result<Token, GlobError> {
    let mut open = false;
    let mut braces = 0usize;
    for c in seg.chars() {
        match c {
            '%' => return Err(GlobError::PercentEscape { segment: n }),
            '\\' | ';' | '?' | '#' => {
                return Err(GlobError::InvalidCharacter { character: c, segment: n });
            }
            c if c.is_ascii_control() => {
                return Err(GlobError::InvalidCharacter { character: c, segment: n });
            }
            '{' if open => return Err(GlobError::UnbalancedOpenBrace { segment: n }),
            '{' => {
                open = true;
                braces += 1;
            }
            '}' if !open => return Err(GlobError::UnbalancedCloseBrace { segment: n }),
            '}' => open = false,
            _ => {}
        }
    }
    if open {
        return Err(GlobError::UnbalancedOpenBrace { segment: n });
    }
    if braces > 0 {
        let name = match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) if braces == 1 => name,
            _ => return Err(GlobError::CaptureNotWholeSegment { segment: n }),
        };
        let mut chars = name.chars();
        match chars.next() {
            None => return Err(GlobError::EmptyCaptureName { segment: n }),
            Some(c) if is_name_start(c) && chars.all(is_name_char) => {}
            Some(_) => {
                return Err(GlobError::InvalidCaptureName { name: name.to_owned(), segment: n });
            }
        }
        if names.iter().any(|existing| **existing == *name) {
            return Err(GlobError::DuplicateCaptureName(name.to_owned()));
        }
        names.push(name.into());
        return Ok(Token::Capture(names.len() - 1));
    }
    match seg {
        "**" => Ok(Token::Deep),
        "*" => Ok(Token::One),
        "." | ".." => Err(GlobError::DotSegment { segment: n }),
        _ if seg.contains("**") => Err(GlobError::DoubleStarInSegment { segment: n }),
        _ if seg.contains('*') => Ok(Token::Wildcard(seg.split('*').map(Box::from).collect())),
        _ => Ok(Token::Literal(seg.into())),
    }
}

impl PathGlob {
    /// Parses and compiles a pattern; see the [type documentation](PathGlob) for the
    /// grammar.
    ///
    /// ```
    /// use custos_policy::glob::PathGlob;
    /// use custos_policy::normalize::normalize;
    ///
    /// let glob = PathGlob::parse("/customers/{id}/orders/**").unwrap();
    /// let path = normalize("/customers/42/orders/7/lines").unwrap();
    /// assert!(glob.matches(&path));
    /// assert_eq!(glob.captures(&path), Some(vec![("id".to_owned(), "42".to_owned())]));
    /// ```
    pub fn parse(pattern: &str) -> Result<PathGlob, GlobError> {
        let Some(body) = pattern.strip_prefix('/') else {
            return Err(GlobError::MissingLeadingSlash);
        };
        if pattern.len() > MAX_PATH_LEN {
            return Err(GlobError::TooLong);
        }
        let mut tokens = Vec::new();
        let mut names = Vec::new();
        let mut source = String::with_capacity(pattern.len());
        let mut count = 0usize;
        for seg in body.split('/').filter(|s| !s.is_empty()) {
            count += 1;
            if count > MAX_SEGMENTS {
                return Err(GlobError::TooManySegments);
            }
            let token = parse_segment(seg, count, &mut names)?;
            source.push('/');
            source.push_str(seg);
            // `**/**` is the same as `**`.
            if matches!(token, Token::Deep) && matches!(tokens.last(), Some(Token::Deep)) {
                continue;
            }
            tokens.push(token);
        }
        if source.is_empty() {
            source.push('/');
        }
        let min_segments = tokens.iter().filter(|t| !matches!(t, Token::Deep)).count();
        let has_deep = min_segments != tokens.len();
        Ok(PathGlob {
            source,
            tokens: tokens.into_boxed_slice(),
            names: names.into_boxed_slice(),
            min_segments,
            has_deep,
            fold_case: false,
        })
    }

    /// This glob matching literal text without regard to case: `/customers/export` then also
    /// matches `/Customers/EXPORT`, and `/cu\u{17F}tomers/export` ([`fold_char`]). For Deny
    /// rules, since apps that route without regard to case (Express, ASP.NET Core by default)
    /// would serve such a path from the handler the rule denies; matching more can only refuse
    /// more.
    pub fn folding_case(mut self) -> Self {
        for token in self.tokens.iter_mut() {
            match token {
                Token::Literal(lit) => *lit = fold_text(lit).into_boxed_str(),
                Token::Wildcard(parts) => {
                    for part in parts.iter_mut() {
                        *part = fold_text(part).into_boxed_str();
                    }
                }
                Token::One | Token::Capture(_) | Token::Deep => {}
            }
        }
        self.fold_case = true;
        self
    }

    /// The canonical pattern text (empty segments and trailing slash removed).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` matches. Allocation-free; O(pattern × path) at worst.
    pub fn matches(&self, path: &NormalizedPath) -> bool {
        // Most globs of a policy part from a request at its first segment: a leading literal
        // is compared before the general matcher is set up (it can only ever match segment 0).
        if let Some(first) = self.first_literal()
            && !path.segment(0).is_some_and(|s| {
                if self.fold_case { folded_eq(first, s, path.is_ascii()) } else { first == s }
            })
        {
            return false;
        }
        self.match_with(path, |_, _| {})
    }

    /// The `{name}` captures of a match, in pattern order, as `(name, segment)` pairs;
    /// `None` if `path` does not match. With several `**`, each takes as few segments as
    /// possible from left to right.
    pub fn captures(&self, path: &NormalizedPath) -> Option<Vec<(String, String)>> {
        let mut bound = vec![0usize; self.names.len()];
        let matched = self.match_with(path, |capture, segment| {
            if let Some(slot) = bound.get_mut(capture) {
                *slot = segment;
            }
        });
        if !matched {
            return None;
        }
        self.names
            .iter()
            .zip(bound)
            .map(|(name, segment)| Some((name.to_string(), path.segment(segment)?.to_owned())))
            .collect()
    }

    /// The first segment every path this glob matches starts with, when the pattern starts
    /// with a literal segment.
    pub fn first_literal(&self) -> Option<&str> {
        match self.tokens.first()? {
            Token::Literal(first) => Some(first),
            _ => None,
        }
    }

    /// The capture names, in pattern order.
    pub fn param_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// Greedy matcher with a single backtracking point (the most recent `**`), as in
    /// classic wildcard matching: every other token consumes exactly one segment, so when
    /// a later `**` is reached, the extent of the earlier ones never needs revisiting.
    /// `bind(capture_index, segment_index)` is called for each capture as it is matched;
    /// after a successful match the last binding of each capture is the final one.
    fn match_with(&self, path: &NormalizedPath, mut bind: impl FnMut(usize, usize)) -> bool {
        let n = path.segment_count();
        if n < self.min_segments || (!self.has_deep && n != self.min_segments) {
            return false;
        }
        let tokens = &self.tokens;
        let (mut p, mut s) = (0usize, 0usize);
        // (token after the last `**`, first segment that `**` does not cover).
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            match tokens.get(p) {
                Some(Token::Deep) => {
                    if p + 1 == tokens.len() {
                        return true;
                    }
                    p += 1;
                    backtrack = Some((p, s));
                    continue;
                }
                Some(token) => {
                    if let Some(seg) = path.segment(s)
                        && token.matches_segment(seg, self.fold_case, path.is_ascii())
                    {
                        if let Token::Capture(c) = token {
                            bind(*c, s);
                        }
                        p += 1;
                        s += 1;
                        continue;
                    }
                }
                None if s == n => return true,
                None => {}
            }
            // Mismatch: let the last `**` swallow one more segment and retry after it.
            match backtrack {
                Some((bp, bs)) if bs < n => {
                    backtrack = Some((bp, bs + 1));
                    p = bp;
                    s = bs + 1;
                }
                _ => return false,
            }
        }
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for PathGlob {
    type Err = GlobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PathGlob::parse(s)
    }
}
