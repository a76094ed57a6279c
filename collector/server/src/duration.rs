//! Durations as people write them: `500ms`, `30s`, `15m`, `24h`, `7d`, `2w`, `1h30m`.

use std::time::Duration;

/// Longest accepted duration: 100 years (beyond, date arithmetic would overflow).
const MAX_SECS: u64 = 100 * 366 * 86_400;

/// Parses a duration: one or more `<integer><unit>` terms, units `ms`, `s`, `m`, `h`, `d`
/// (24 h) and `w` (7 d). The error says what is wrong without repeating the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (e.g. 30s, 15m, 24h, 7d)".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err("a duration is a number followed by a unit (ms, s, m, h, d, w), e.g. 30s, 7d".into());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| "duration number is too large".to_owned())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let term = match unit {
            "ms" => Some(Duration::from_millis(value)),
            "s" => Some(Duration::from_secs(value)),
            "m" => value.checked_mul(60).map(Duration::from_secs),
            "h" => value.checked_mul(3_600).map(Duration::from_secs),
            "d" => value.checked_mul(86_400).map(Duration::from_secs),
            "w" => value.checked_mul(7 * 86_400).map(Duration::from_secs),
            "" => return Err("a duration needs a unit (ms, s, m, h, d or w), e.g. 30s, 7d".into()),
            _ => return Err("unknown duration unit (use ms, s, m, h, d or w)".into()),
        };
        total = term
            .and_then(|t| total.checked_add(t))
            .filter(|t| t.as_secs() <= MAX_SECS)
            .ok_or_else(|| "duration is out of range (at most 100 years)".to_owned())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn units_and_compound_durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration(" 1h30m ").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn malformed_durations_are_refused() {
        for bad in ["", "10", "s", "1.5h", "3x", "-1h", "1h 2m", "99999999999999999999s", "200000w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
