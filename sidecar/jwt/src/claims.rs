//! Claim validation (exp, nbf, iss, aud) and the mapping of claims to a policy user.

use std::collections::BTreeMap;

use custos_policy::User;
use serde_json::{Map, Value};

use crate::{JwtError, VerifierSettings};

/// Validates the claims of a token whose signature has been verified, and maps them to a
/// user. `now` is seconds since the Unix epoch.
pub(crate) fn validate(payload: &[u8], settings: &VerifierSettings, now: f64) -> Result<User, JwtError> {
    let claims: Map<String, Value> =
        serde_json::from_slice(payload).map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    let leeway = settings.leeway.as_secs_f64();

    let exp = match claims.get("exp") {
        None => return Err(JwtError::MissingExpiry),
        Some(exp) => exp.as_f64().ok_or(JwtError::InvalidClaim("exp"))?,
    };
    if now >= exp + leeway {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().ok_or(JwtError::InvalidClaim("nbf"))?;
        if now + leeway < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == settings.issuer => {}
        _ => return Err(JwtError::InvalidIssuer),
    }
    let accepted = |aud: &str| settings.audiences.iter().any(|a| a == aud);
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => accepted(aud),
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(accepted),
        _ => false,
    };
    if !audience_ok {
        return Err(JwtError::InvalidAudience);
    }

    let id = match claims.get(&settings.id_claim) {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => return Err(JwtError::MissingIdClaim { claim: settings.id_claim.clone() }),
    };
    if id.len() > crate::MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(JwtError::UnusableClaim { claim: settings.id_claim.clone() });
    }
    let mut attributes = BTreeMap::new();
    for (attribute, claim) in &settings.attributes {
        let value = match claims.get(claim).map(attribute_value) {
            None | Some(Ok(None)) => continue,
            Some(Ok(Some(value))) => value,
            Some(Err(Unusable)) => return Err(JwtError::UnusableClaim { claim: claim.clone() }),
        };
        if value.len() > crate::MAX_ATTRIBUTE_BYTES || value.contains('\0') {
            return Err(JwtError::UnusableClaim { claim: claim.clone() });
        }
        attributes.insert(attribute.clone(), value);
    }
    Ok(User { id, attributes })
}

/// Whether the `iss` claim of a payload (not yet verified) is the verifier's issuer: only
/// to skip a key fetch for a token of another issuer, never to accept one.
pub(crate) fn issued_by(payload: &[u8], settings: &VerifierSettings) -> bool {
    #[derive(serde::Deserialize)]
    struct Issuer<'a> {
        #[serde(borrow)]
        iss: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Issuer<'_>>(payload).is_ok_and(|c| c.iss.as_deref() == Some(&*settings.issuer))
}

/// A claim that cannot be an attribute value: it holds several values or an object.
#[derive(Debug, PartialEq, Eq)]
struct Unusable;

/// A claim as an attribute value: strings as they are, numbers and booleans as their JSON
/// text; an array holding exactly one of those as that one. Null and an empty array leave the
/// attribute absent (as a missing claim does). An array of several elements, an array whose
/// element is null, an array or an object, and an object are [`Unusable`]: an attribute
/// holds one value, and leaving it absent would make a `Deny` rule on it fail open (a
/// Keycloak or Azure token sends `"role": ["contractor"]`).
fn attribute_value(claim: &Value) -> Result<Option<String>, Unusable> {
    fn scalar(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }
    match claim {
        Value::Null => Ok(None),
        Value::Array(items) => match items.as_slice() {
            [] => Ok(None),
            [only] => scalar(only).map(Some).ok_or(Unusable),
            _ => Err(Unusable),
        },
        Value::Object(_) => Err(Unusable),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(scalar(claim)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn settings() -> VerifierSettings {
        VerifierSettings {
            issuer: "https://sso.example".into(),
            audiences: vec!["api".into(), "other".into()],
            leeway: Duration::from_secs(30),
            id_claim: "sub".into(),
            attributes: [
                ("branch".to_owned(), "branch_id".to_owned()),
                ("role".to_owned(), "role".to_owned()),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn check(claims: Value, now: f64) -> Result<User, JwtError> {
        validate(claims.to_string().as_bytes(), &settings(), now)
    }

    fn base() -> Value {
        json!({"iss": "https://sso.example", "aud": "api", "sub": "u1", "exp": 1000})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut claims = base();
        claims[key] = value;
        claims
    }

    #[test]
    fn time_boundaries_with_leeway() {
        assert!(check(base(), 1029.0).is_ok());
        assert_eq!(check(base(), 1030.0).unwrap_err(), JwtError::Expired);
        assert!(check(with("nbf", json!(900)), 870.0).is_ok());
        assert_eq!(check(with("nbf", json!(900)), 869.0).unwrap_err(), JwtError::NotYetValid);
        assert!(check(with("exp", json!(1000.5)), 1030.0).is_ok());
        assert_eq!(check(with("exp", json!("1000")), 0.0).unwrap_err(), JwtError::InvalidClaim("exp"));
        assert_eq!(check(with("nbf", json!(null)), 0.0).unwrap_err(), JwtError::InvalidClaim("nbf"));
        let mut no_exp = base();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(check(no_exp, 0.0).unwrap_err(), JwtError::MissingExpiry);
    }

    #[test]
    fn issuer_and_audience() {
        assert_eq!(check(with("iss", json!("https://evil")), 0.0).unwrap_err(), JwtError::InvalidIssuer);
        assert_eq!(
            check(with("iss", json!(["https://sso.example"])), 0.0).unwrap_err(),
            JwtError::InvalidIssuer
        );
        assert_eq!(check(with("aud", json!("nope")), 0.0).unwrap_err(), JwtError::InvalidAudience);
        assert_eq!(check(with("aud", json!([])), 0.0).unwrap_err(), JwtError::InvalidAudience);
        assert_eq!(check(with("aud", json!(7)), 0.0).unwrap_err(), JwtError::InvalidAudience);
        assert!(check(with("aud", json!(["x", 3, "other"])), 0.0).is_ok());
        let mut no_aud = base();
        no_aud.as_object_mut().unwrap().remove("aud");
        assert_eq!(check(no_aud, 0.0).unwrap_err(), JwtError::InvalidAudience);
    }

    #[test]
    fn id_and_attribute_mapping() {
        for sub in [json!(""), json!(5), json!(null)] {
            assert_eq!(check(with("sub", sub), 0.0).unwrap_err().code(), "missing_id_claim");
        }
        let user = check(with("branch_id", json!(42)), 0.0).unwrap();
        assert_eq!(user.id, "u1");
        assert_eq!(user.attributes.get("branch").map(String::as_str), Some("42"));
        assert!(!user.attributes.contains_key("role"));
        for (value, expected) in [
            (json!("clerk"), Some("clerk")),
            (json!(true), Some("true")),
            (json!(1.5), Some("1.5")),
            (json!(null), None),
        ] {
            let user = check(with("role", value), 0.0).unwrap();
            assert_eq!(user.attributes.get("role").map(String::as_str), expected);
        }
        assert_eq!(validate(b"[1]", &settings(), 0.0).unwrap_err().code(), "malformed_token");
    }

    /// A user whose id or attributes the audit trail could not hold (the collector refuses
    /// NUL characters and principals over 1 KiB) is refused, not let through unaudited.
    #[test]
    fn ids_and_attributes_the_audit_trail_cannot_hold_are_refused() {
        let unusable = |claim: &str| JwtError::UnusableClaim { claim: claim.into() };
        assert_eq!(check(with("sub", json!("u".repeat(256))), 0.0).unwrap().id.len(), 256);
        for sub in [json!("u".repeat(257)), json!("u\u{0}x"), json!("u\nx"), json!("u\u{85}x")] {
            assert_eq!(check(with("sub", sub.clone()), 0.0).unwrap_err(), unusable("sub"), "{sub}");
        }
        let long = "b".repeat(crate::MAX_ATTRIBUTE_BYTES);
        assert_eq!(check(with("branch_id", json!(long)), 0.0).unwrap().attributes["branch"].len(), 1024);
        for value in [json!("b".repeat(1025)), json!("no\u{0}rth")] {
            assert_eq!(
                check(with("branch_id", value.clone()), 0.0).unwrap_err(),
                unusable("branch_id"),
                "{value}"
            );
        }
        assert_eq!(unusable("sub").code(), "invalid_claim");
    }

    /// A single-valued array (Keycloak, Azure AD: `"role": ["contractor"]`) is that value;
    /// an empty one is absent, like null; several values or an object refuse the token, so
    /// that a `Deny` rule on the attribute cannot fail open.
    #[test]
    fn array_and_object_claims() {
        for (value, expected) in [
            (json!(["contractor"]), "contractor"),
            (json!([7]), "7"),
            (json!([2.5]), "2.5"),
            (json!([false]), "false"),
        ] {
            let user = check(with("role", value.clone()), 0.0).unwrap();
            assert_eq!(user.attributes.get("role").map(String::as_str), Some(expected), "{value}");
        }
        for value in [json!([]), json!(null)] {
            let user = check(with("role", value.clone()), 0.0).unwrap();
            assert!(!user.attributes.contains_key("role"), "{value}");
        }
        let unusable = JwtError::UnusableClaim { claim: "role".into() };
        for value in [
            json!(["clerk", "contractor"]),
            json!(["contractor", "contractor"]),
            json!([["contractor"]]),
            json!([{"name": "contractor"}]),
            json!([null]),
            json!({"name": "contractor"}),
            json!({}),
        ] {
            let error = check(with("role", value.clone()), 0.0).unwrap_err();
            assert_eq!(error, unusable, "{value}");
            assert_eq!(error.code(), "invalid_claim");
            assert!(!error.to_string().contains("contractor"), "{error}");
        }
        // A too-long single value is refused like a too-long string.
        let long = json!(["b".repeat(crate::MAX_ATTRIBUTE_BYTES + 1)]);
        assert_eq!(
            check(with("branch_id", long), 0.0).unwrap_err(),
            JwtError::UnusableClaim { claim: "branch_id".into() }
        );
        // Unmapped claims are not looked at.
        assert!(check(with("groups", json!(["a", "b"])), 0.0).is_ok());
    }
}
