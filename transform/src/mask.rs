//! Masking one JSON value by strategy.

use std::borrow::Cow;

use custos_api::policy::MaskStrategy;
use serde_json::Value;

use crate::hash::{HashKey, push_hex};
use crate::numbers;

/// The string a `Redact` mask writes.
pub const REDACTED: &str = "[REDACTED]";

/// Rewrites values with one strategy.
pub(crate) struct Masker<'a> {
    pub strategy: MaskStrategy,
    pub key: &'a HashKey,
    /// The character that starts strings standing for numbers ([`numbers::Prepared::marker`]).
    pub marker: Option<char>,
}

impl Masker<'_> {
    /// Masks `value` in place (reusing a string's buffer where it can); not used for
    /// `Remove`, which deletes instead.
    pub fn apply(&self, value: &mut Value) {
        if let Value::String(s) = value
            && numbers::number_text(s, self.marker).is_none()
        {
            match self.strategy {
                MaskStrategy::Redact => {
                    s.clear();
                    s.push_str(REDACTED);
                }
                MaskStrategy::Hash => {
                    let mac = self.key.mask_mac(s.as_bytes());
                    s.clear();
                    push_hash(s, &mac);
                }
                MaskStrategy::ShowLast4 | MaskStrategy::ShowFirst1 => show_part(s, self.strategy),
                MaskStrategy::Null | MaskStrategy::Remove => *value = Value::Null,
            }
            return;
        }
        *value = self.masked(value);
    }

    /// The masked replacement of `value`.
    pub fn masked(&self, value: &Value) -> Value {
        match self.strategy {
            MaskStrategy::Redact => Value::String(REDACTED.to_owned()),
            MaskStrategy::Null | MaskStrategy::Remove => Value::Null,
            MaskStrategy::Hash => {
                let mac = match value {
                    Value::String(s) => {
                        let text = numbers::number_text(s, self.marker).unwrap_or(s);
                        self.key.mask_mac(text.as_bytes())
                    }
                    other => self.key.mask_mac(&json_text(other, self.marker)),
                };
                let mut out = String::with_capacity(34);
                push_hash(&mut out, &mac);
                Value::String(out)
            }
            // The end (or start) of an object's or array's JSON text would be the value of one
            // of its members, which may be another field altogether: redacted whole.
            MaskStrategy::ShowLast4 | MaskStrategy::ShowFirst1 if value.is_object() || value.is_array() => {
                Value::String(REDACTED.to_owned())
            }
            MaskStrategy::ShowLast4 | MaskStrategy::ShowFirst1 => {
                let mut text = self.text(value).into_owned();
                show_part(&mut text, self.strategy);
                Value::String(text)
            }
        }
    }

    /// A value as text: strings as they are, everything else as its JSON.
    fn text<'v>(&self, value: &'v Value) -> Cow<'v, str> {
        match value {
            Value::String(s) => Cow::Borrowed(numbers::number_text(s, self.marker).unwrap_or(s)),
            other => Cow::Owned(String::from_utf8_lossy(&json_text(other, self.marker)).into_owned()),
        }
    }
}

/// Appends `h:` and the first 32 hex digits of `mac`.
fn push_hash(out: &mut String, mac: &[u8; 32]) {
    out.push_str("h:");
    push_hex(out, &mac[..16]);
}

/// Compact JSON of a value, numbers kept as written (`marker`: see [`Masker::marker`]).
pub(crate) fn json_text(value: &Value, marker: Option<char>) -> Vec<u8> {
    numbers::unwrap(serde_json::to_vec(value).unwrap_or_default(), marker)
}

const STARS: &str = "****************************************************************";

/// `n` stars.
fn stars(n: usize) -> Cow<'static, str> {
    match STARS.get(..n) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned("*".repeat(n)),
    }
}

/// Whether `strategy` keeps part of a string ([`show_part`], [`write_partial`]).
pub(crate) fn keeps_part(strategy: MaskStrategy) -> bool {
    matches!(strategy, MaskStrategy::ShowLast4 | MaskStrategy::ShowFirst1)
}

/// Where a [`keeps_part`] strategy cuts the UTF-8 `text`: the kept prefix `text[..front]`,
/// then `stars` stars in place of `text[front..back]`, then the kept suffix `text[back..]`.
/// Characters are counted (the last 4, the first 1); `ascii` says there is one byte to each.
/// Other strategies star everything.
fn partial_cut(text: &[u8], ascii: bool, strategy: MaskStrategy) -> (usize, usize, usize) {
    let is_start = |b: &u8| *b & 0xC0 != 0x80;
    let n = if ascii { text.len() } else { text.iter().filter(|b| is_start(b)).count() };
    let (keep_front, keep_back) = match strategy {
        MaskStrategy::ShowLast4 if n > 4 => (0, 4),
        MaskStrategy::ShowFirst1 if n > 1 => (1, 0),
        _ => (0, 0),
    };
    // the byte offset of character `k`
    let offset = |k: usize| match ascii {
        true => k,
        false => text.iter().enumerate().filter(|(_, b)| is_start(b)).nth(k).map_or(text.len(), |(i, _)| i),
    };
    (offset(keep_front), offset(n - keep_back), n - keep_front - keep_back)
}

/// Masks `text` in place by a [`keeps_part`] strategy.
fn show_part(text: &mut String, strategy: MaskStrategy) {
    let (front, back, count) = partial_cut(text.as_bytes(), text.is_ascii(), strategy);
    text.replace_range(front..back, &stars(count));
}

/// Masks the ASCII `text` in place by a [`keeps_part`] strategy: what [`write_partial`]
/// writes between the quotes (one star for each character replaced).
pub(crate) fn star_ascii(text: &mut [u8], strategy: MaskStrategy) {
    let (front, back, _) = partial_cut(text, true, strategy);
    for b in &mut text[front..back] {
        *b = b'*';
    }
}

/// Appends the UTF-8 `text` masked by a [`keeps_part`] strategy as a JSON string literal,
/// exactly what [`Masker::apply`] then serialising gives; `text` must need no escaping (it is
/// the content of a JSON string that had no escapes); `ascii`: it is all ASCII (ASCII text
/// is masked in place, [`star_ascii`], where it can be).
pub(crate) fn write_partial(out: &mut Vec<u8>, text: &[u8], ascii: bool, strategy: MaskStrategy) {
    let (front, back, count) = partial_cut(text, ascii, strategy);
    out.reserve(front + count + (text.len() - back) + 2);
    out.push(b'"');
    out.extend_from_slice(&text[..front]);
    out.resize(out.len() + count, b'*');
    out.extend_from_slice(&text[back..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn last4(s: &str) -> String {
        let mut s = s.to_owned();
        show_part(&mut s, MaskStrategy::ShowLast4);
        s
    }

    fn first1(s: &str) -> String {
        let mut s = s.to_owned();
        show_part(&mut s, MaskStrategy::ShowFirst1);
        s
    }

    #[test]
    fn partial_masks_written_directly_equal_the_serialised_masks() {
        let key = HashKey::new("k");
        for strategy in [MaskStrategy::ShowLast4, MaskStrategy::ShowFirst1] {
            let masker = Masker { strategy, key: &key, marker: Some(numbers::SENTINEL) };
            let long: Vec<String> = (60..=64).map(|n| "x".repeat(n)).collect();
            let short =
                ["", "a", "ab", "1234", "12345", "13812345678", "张三丰", "😀", "a😀b😀c", "e\u{301}cole"];
            for text in short.into_iter().chain(long.iter().map(String::as_str)) {
                let mut value = json!(text);
                masker.apply(&mut value);
                let expected = serde_json::to_string(&value).unwrap();
                let mut out = Vec::new();
                write_partial(&mut out, text.as_bytes(), false, strategy);
                assert_eq!(String::from_utf8(out).unwrap(), expected, "{text}");
                if text.is_ascii() {
                    let mut out = Vec::new();
                    write_partial(&mut out, text.as_bytes(), true, strategy);
                    assert_eq!(String::from_utf8(out).unwrap(), expected, "{text}");
                    // in place, between the quotes the original literal already has
                    let mut literal = format!("\"{text}\"").into_bytes();
                    let end = literal.len() - 1;
                    star_ascii(&mut literal[1..end], strategy);
                    assert_eq!(String::from_utf8(literal).unwrap(), expected, "{text}");
                }
            }
        }
    }

    #[test]
    fn show_last_and_first_count_chars() {
        assert_eq!(last4("13812345678"), "*******5678");
        assert_eq!(last4("1234"), "****");
        assert_eq!(last4(""), "");
        assert_eq!(last4("电话号码是一二三四"), "*****一二三四");
        assert_eq!(last4("a😀b😀c"), "*😀b😀c");
        assert_eq!(last4(&"x".repeat(100)), format!("{}xxxx", "*".repeat(96)));
        assert_eq!(first1("张三丰"), "张**");
        assert_eq!(first1("😀"), "*");
        assert_eq!(first1("😀😀"), "😀*");
        assert_eq!(first1(""), "");
        // combining characters count as characters
        assert_eq!(first1("e\u{301}cole"), "e*****");
    }

    #[test]
    fn in_place_equals_replacement() {
        let key = HashKey::new("k");
        for strategy in [
            MaskStrategy::Redact,
            MaskStrategy::Hash,
            MaskStrategy::ShowLast4,
            MaskStrategy::ShowFirst1,
            MaskStrategy::Null,
        ] {
            let m = Masker { strategy, key: &key, marker: Some(numbers::SENTINEL) };
            for v in [
                json!("13812345678"),
                json!("张三"),
                json!(""),
                json!(42),
                json!([1, "a"]),
                json!("\u{FDD0}1e400"),
            ] {
                let mut w = v.clone();
                m.apply(&mut w);
                assert_eq!(w, m.masked(&v), "{strategy:?} {v}");
            }
        }
    }

    #[test]
    fn strategies() {
        let key = HashKey::new("k");
        let m = |strategy| Masker { strategy, key: &key, marker: Some(numbers::SENTINEL) };
        assert_eq!(m(MaskStrategy::Redact).masked(&json!({"a": 1})), json!("[REDACTED]"));
        assert_eq!(m(MaskStrategy::Null).masked(&json!("x")), Value::Null);
        assert_eq!(m(MaskStrategy::ShowLast4).masked(&json!(1234567)), json!("***4567"));
        assert_eq!(m(MaskStrategy::ShowFirst1).masked(&json!(true)), json!("t***"));
        // An object's or array's text would show a member's value: redacted whole.
        let nested = json!({"n": "+4917612345678", "pin": "9876"});
        assert_eq!(m(MaskStrategy::ShowLast4).masked(&nested), json!("[REDACTED]"));
        assert_eq!(m(MaskStrategy::ShowFirst1).masked(&json!(["+49176"])), json!("[REDACTED]"));
        let h = m(MaskStrategy::Hash).masked(&json!("x"));
        let hs = h.as_str().unwrap_or_default();
        assert_eq!(hs.len(), 34);
        assert!(hs.starts_with("h:"));
        assert_eq!(&hs[2..], &key.mask_hash_hex(b"x")[..32]);
        // numbers hash by their JSON text, a number sentinel by the number it stands for
        assert_eq!(m(MaskStrategy::Hash).masked(&json!(12)), m(MaskStrategy::Hash).masked(&json!("12")));
        assert_eq!(
            m(MaskStrategy::Hash).masked(&json!("\u{FDD0}123456789012345678901234")),
            m(MaskStrategy::Hash).masked(&json!("123456789012345678901234"))
        );
    }
}
