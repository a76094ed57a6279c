//! Token verification against a static JWKS: algorithms, claims, attacks and malformed input.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use custos_jwt::{JwksSource, JwtError, MAX_TOKEN_LEN, Verifier, VerifierSettings};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// rsa-1 (RS256), ec-1 (ES256), ec-384 (ES384), ed-1 (EdDSA), rsa-any (key B, no alg).
fn verifier() -> Verifier {
    verifier_with(settings())
}

fn verifier_with(settings: VerifierSettings) -> Verifier {
    let doc = jwks(&[
        TestKey::rsa_a().jwk("rsa-1"),
        TestKey::ec_p256().jwk("ec-1"),
        TestKey::ec_p384().jwk("ec-384"),
        TestKey::ed25519().jwk("ed-1"),
        TestKey::rsa_b().jwk_without_alg("rsa-any"),
    ]);
    Verifier::new(settings, JwksSource::Static(doc)).unwrap()
}

async fn check(v: &Verifier, token: &str) -> Result<custos_policy::User, JwtError> {
    v.verify_at(&bearer(token), now()).await
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_map_claims_to_a_user() {
    let v = verifier();
    let tokens = [
        TestKey::rsa_a().sign(Some("rsa-1"), &claims()),
        TestKey::ec_p256().sign(Some("ec-1"), &claims()),
        TestKey::ec_p384().sign(Some("ec-384"), &claims()),
        TestKey::ed25519().sign(Some("ed-1"), &claims()),
        // A JWK without alg accepts every RSA algorithm.
        TestKey::rsa_b().sign_as(Algorithm::RS256, Some("rsa-any"), &claims()),
        TestKey::rsa_b().sign_as(Algorithm::RS384, Some("rsa-any"), &claims()),
        TestKey::rsa_b().sign_as(Algorithm::RS512, Some("rsa-any"), &claims()),
        TestKey::rsa_b().sign_as(Algorithm::PS256, Some("rsa-any"), &claims()),
    ];
    for token in tokens {
        let user = check(&v, &token).await.unwrap();
        assert_eq!(user.id, "user-17");
        let attrs: Vec<(&str, &str)> =
            user.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Strings as they are, numbers and booleans as JSON text, a one-element array as its
        // element; missing claims absent.
        assert_eq!(
            attrs,
            [("admin", "false"), ("branch", "B-042"), ("groups", "a"), ("level", "3"), ("role", "clerk")]
        );
    }
}

#[tokio::test]
async fn the_real_clock_is_used_by_verify() {
    let v = verifier();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let fresh = TestKey::ed25519().sign(Some("ed-1"), &claims_with("exp", json!(now + 3600)));
    assert!(v.verify(&bearer(&fresh)).await.is_ok());
    // `claims()` expired long before the real now.
    let old = TestKey::ed25519().sign(Some("ed-1"), &claims());
    assert_eq!(v.verify(&bearer(&old)).await.unwrap_err(), JwtError::Expired);
}

#[tokio::test]
async fn time_claims_with_leeway() {
    let v = verifier();
    let key = TestKey::ec_p256();
    let sign = |c| key.sign(Some("ec-1"), &c);
    let cases = [
        (claims_with("exp", json!(NOW - 3600)), Err(JwtError::Expired)),
        (claims_with("exp", json!(NOW - 30)), Err(JwtError::Expired)),
        (claims_with("exp", json!(NOW - 10)), Ok(())), // within the 30 s leeway
        (claims_with("nbf", json!(NOW + 3600)), Err(JwtError::NotYetValid)),
        (claims_with("nbf", json!(NOW + 10)), Ok(())), // within the leeway
        (claims_with("nbf", json!(NOW - 10)), Ok(())),
        (claims_with("iat", json!(NOW + 99_999)), Ok(())), // iat is ignored
        (claims_with("exp", json!("soon")), Err(JwtError::InvalidClaim("exp"))),
    ];
    for (claims, expected) in cases {
        assert_eq!(check(&v, &sign(claims.clone())).await.map(|_| ()), expected, "{claims}");
    }
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(check(&v, &sign(no_exp)).await.unwrap_err(), JwtError::MissingExpiry);

    // A zero leeway is exact.
    let strict = verifier_with(VerifierSettings { leeway: Duration::ZERO, ..settings() });
    let token = sign(claims_with("exp", json!(NOW - 1)));
    assert_eq!(check(&strict, &token).await.unwrap_err(), JwtError::Expired);
}

#[tokio::test]
async fn issuer_and_audience() {
    let v = verifier();
    let key = TestKey::rsa_a();
    let sign = |c| key.sign(Some("rsa-1"), &c);
    assert_eq!(
        check(&v, &sign(claims_with("iss", json!("https://evil.test")))).await,
        Err(JwtError::InvalidIssuer)
    );
    assert_eq!(
        check(&v, &sign(claims_with("aud", json!("other-api")))).await,
        Err(JwtError::InvalidAudience)
    );
    assert_eq!(check(&v, &sign(claims_with("aud", json!(["x", "y"])))).await, Err(JwtError::InvalidAudience));
    assert!(check(&v, &sign(claims_with("aud", json!(["x", "reports"])))).await.is_ok());
    assert!(check(&v, &sign(claims_with("aud", json!([AUDIENCE])))).await.is_ok());
    let mut no_iss = claims();
    no_iss.as_object_mut().unwrap().remove("iss");
    assert_eq!(check(&v, &sign(no_iss)).await, Err(JwtError::InvalidIssuer));

    // No audiences configured: nothing is accepted.
    let none = verifier_with(VerifierSettings { audiences: vec![], ..settings() });
    assert_eq!(check(&none, &sign(claims())).await, Err(JwtError::InvalidAudience));
}

#[tokio::test]
async fn id_claim() {
    let v = verifier();
    let key = TestKey::rsa_a();
    let sign = |c| key.sign(Some("rsa-1"), &c);
    let mut no_sub = claims();
    no_sub.as_object_mut().unwrap().remove("sub");
    let err = check(&v, &sign(no_sub)).await.unwrap_err();
    assert_eq!(err.code(), "missing_id_claim");
    assert!(err.is_client_error());
    assert_eq!(check(&v, &sign(claims_with("sub", json!("")))).await.unwrap_err().code(), "missing_id_claim");
    assert_eq!(check(&v, &sign(claims_with("sub", json!(17)))).await.unwrap_err().code(), "missing_id_claim");

    let by_email = verifier_with(VerifierSettings { id_claim: "preferred_username".into(), ..settings() });
    let user = check(&by_email, &sign(claims_with("preferred_username", json!("jdoe")))).await.unwrap();
    assert_eq!(user.id, "jdoe");
    let err = check(&by_email, &sign(claims())).await.unwrap_err();
    assert_eq!(err.to_string(), "token has no non-empty string `preferred_username` claim for the user id");
}

#[tokio::test]
async fn wrong_and_unknown_keys() {
    let v = verifier();
    // Signed by key B under key A's kid.
    let forged = TestKey::rsa_b().sign(Some("rsa-1"), &claims());
    assert_eq!(check(&v, &forged).await, Err(JwtError::InvalidSignature));
    let unknown = TestKey::rsa_a().sign(Some("rsa-404"), &claims());
    assert_eq!(check(&v, &unknown).await, Err(JwtError::UnknownKid));
    // Tampered payload.
    let token = TestKey::ed25519().sign(Some("ed-1"), &claims());
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(claims_with("sub", json!("admin")).to_string());
    assert_eq!(check(&v, &parts.join(".")).await, Err(JwtError::InvalidSignature));
    // A valid signature of another token.
    let other = TestKey::ed25519().sign(Some("ed-1"), &claims_with("role", json!("boss")));
    parts = token.split('.').map(str::to_owned).collect();
    parts[2] = other.rsplit('.').next().unwrap().to_owned();
    assert_eq!(check(&v, &parts.join(".")).await, Err(JwtError::InvalidSignature));
}

#[tokio::test]
async fn tokens_without_kid() {
    // One key per type: a kid-less token is tried against the only key of its type.
    let single = Verifier::new(
        settings(),
        JwksSource::Static(jwks(&[TestKey::rsa_a().jwk("rsa-1"), TestKey::ed25519().jwk("ed-1")])),
    )
    .unwrap();
    assert!(check(&single, &TestKey::rsa_a().sign(None, &claims())).await.is_ok());
    assert!(check(&single, &TestKey::ed25519().sign(None, &claims())).await.is_ok());
    assert_eq!(
        check(&single, &TestKey::rsa_b().sign(None, &claims())).await,
        Err(JwtError::InvalidSignature)
    );
    assert_eq!(check(&single, &TestKey::ec_p256().sign(None, &claims())).await, Err(JwtError::MissingKid));
    // rsa-1 is RS256 only.
    let rs384 = TestKey::rsa_a().sign_as(Algorithm::RS384, None, &claims());
    assert_eq!(check(&single, &rs384).await, Err(JwtError::AlgorithmMismatch));
    // Two RSA keys: ambiguous.
    let v = verifier();
    assert_eq!(check(&v, &TestKey::rsa_a().sign(None, &claims())).await, Err(JwtError::MissingKid));
}

fn unsigned(header: serde_json::Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    )
}

#[tokio::test]
async fn alg_none_is_refused() {
    let v = verifier();
    for alg in ["none", "None", "NONE"] {
        for kid in [json!("rsa-1"), json!(null)] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
            for sig in ["", "c2ln"] {
                let err = check(&v, &unsigned(header.clone(), sig)).await.unwrap_err();
                assert_eq!(err, JwtError::UnsupportedAlgorithm, "{header} {sig:?}");
                assert!(err.is_client_error());
            }
        }
    }
}

#[tokio::test]
async fn hmac_signed_with_the_rsa_public_key_is_refused() {
    let v = verifier();
    let public_pem = std::fs::read(testdata("test-only-rsa-a.pub.pem")).unwrap();
    let key = EncodingKey::from_secret(&public_pem);
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        for kid in [Some("rsa-1"), Some("rsa-any"), None] {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_owned);
            let token = jsonwebtoken::encode(&header, &claims(), &key).unwrap();
            assert_eq!(check(&v, &token).await, Err(JwtError::UnsupportedAlgorithm), "{alg:?} {kid:?}");
        }
    }
    // Even a JWKS that carries an `oct` key never enables HMAC.
    let with_oct = jwks(&[
        json!({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(b"secret")}),
        TestKey::ed25519().jwk("ed-1"),
    ]);
    let v = Verifier::new(settings(), JwksSource::Static(with_oct)).unwrap();
    assert_eq!(v.key_count(), Some(1));
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hmac".into());
    let token = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
    assert_eq!(check(&v, &token).await, Err(JwtError::UnsupportedAlgorithm));
}

#[tokio::test]
async fn header_alg_must_match_the_key() {
    let v = verifier();
    // Properly signed RS384 token, but the JWK says RS256.
    let rs384 = TestKey::rsa_a().sign_as(Algorithm::RS384, Some("rsa-1"), &claims());
    assert_eq!(check(&v, &rs384).await, Err(JwtError::AlgorithmMismatch));
    let ps256 = TestKey::rsa_a().sign_as(Algorithm::PS256, Some("rsa-1"), &claims());
    assert_eq!(check(&v, &ps256).await, Err(JwtError::AlgorithmMismatch));
    // ES256 header naming an RSA key, EdDSA naming an EC key, ES384 naming a P-256 key.
    let es = TestKey::ec_p256().sign(Some("rsa-1"), &claims());
    assert_eq!(check(&v, &es).await, Err(JwtError::AlgorithmMismatch));
    let ed = TestKey::ed25519().sign(Some("ec-1"), &claims());
    assert_eq!(check(&v, &ed).await, Err(JwtError::AlgorithmMismatch));
    let es384 = TestKey::ec_p384().sign(Some("ec-1"), &claims());
    assert_eq!(check(&v, &es384).await, Err(JwtError::AlgorithmMismatch));
    // The RSA key without alg still refuses non-RSA algorithms.
    let es_any = TestKey::ec_p256().sign(Some("rsa-any"), &claims());
    assert_eq!(check(&v, &es_any).await, Err(JwtError::AlgorithmMismatch));
}

#[tokio::test]
async fn malformed_inputs() {
    let v = verifier();
    let good = TestKey::ed25519().sign(Some("ed-1"), &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let huge = format!("Bearer {}", "a".repeat(20 * 1024));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "empty_token"),
        (b"   ".to_vec(), "empty_token"),
        (b"Bearer".to_vec(), "empty_token"),
        (b"Bearer ".to_vec(), "empty_token"),
        (b"Basic x".to_vec(), "invalid_scheme"),
        (b"Basic dXNlcjpwYXNz".to_vec(), "invalid_scheme"),
        (b"Token abc".to_vec(), "invalid_scheme"),
        (good.clone().into_bytes(), "invalid_scheme"), // no scheme at all
        (bearer(&format!("{}.{}", parts[0], parts[1])), "malformed_token"),
        (bearer(&format!("{good}.x")), "malformed_token"),
        (bearer("a.b.c"), "malformed_token"),
        (bearer(&format!("!!!.{}.{}", parts[1], parts[2])), "malformed_token"),
        (bearer(&format!("{}=.{}.{}", parts[0], parts[1], parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.{}", b64("not json"), parts[1], parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.{}", b64("[1,2]"), parts[1], parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.{}", b64("{}"), parts[1], parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.{}", parts[0], "@@", parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.{}", parts[0], parts[1], "###")), "malformed_token"),
        (bearer(&format!("{}.{}.{}", parts[0], parts[1], "a")), "malformed_token"),
        (bearer(&format!("{}..{}", parts[0], parts[2])), "malformed_token"),
        (bearer(&format!("{}.{}.", parts[0], parts[1])), "invalid_signature"),
        (b"Bearer a.b.c d".to_vec(), "malformed_token"),
        (b"Bearer \xc3\xa9.b.c".to_vec(), "malformed_token"),
        (huge.clone().into_bytes(), "token_too_large"),
        (format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1)).into_bytes(), "token_too_large"),
    ];
    for (input, code) in cases {
        let err = v.verify_at(&input, now()).await.unwrap_err();
        assert_eq!(err.code(), code, "{:?}", String::from_utf8_lossy(&input));
        assert!(err.is_client_error());
        // Messages never echo the token.
        if input.len() > 12 {
            let token = String::from_utf8_lossy(&input[7..]).into_owned();
            assert!(!err.to_string().contains(&token), "{err}");
        }
    }
    // A signed token whose payload is not a JSON object.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()), b64("[]"));
    let sig =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &TestKey::ed25519().encoding, Algorithm::EdDSA)
            .unwrap();
    let err = check(&v, &format!("{signing_input}.{sig}")).await.unwrap_err();
    assert_eq!(err, JwtError::Malformed("payload is not a JSON object"));
}

#[tokio::test]
async fn errors_do_not_leak_claim_values() {
    let v = verifier();
    let secret = "s3cr3t-value-of-a-claim";
    let claims = claims_with("iss", json!(secret));
    let token = TestKey::rsa_a().sign(Some("rsa-1"), &claims);
    let err = check(&v, &token).await.unwrap_err();
    assert_eq!(err.code(), "invalid_issuer");
    assert!(!format!("{err} {err:?}").contains(secret));
}

#[test]
fn construction_errors() {
    let bad = |s: VerifierSettings, src: JwksSource| Verifier::new(s, src).unwrap_err();
    let doc = || JwksSource::Static(jwks(&[TestKey::ed25519().jwk("ed-1")]));
    assert_eq!(
        bad(VerifierSettings { issuer: String::new(), ..settings() }, doc()).code(),
        "invalid_settings"
    );
    assert_eq!(
        bad(VerifierSettings { id_claim: String::new(), ..settings() }, doc()).code(),
        "invalid_settings"
    );
    assert_eq!(bad(settings(), JwksSource::Static("{".into())).code(), "invalid_jwks");
    assert_eq!(bad(settings(), JwksSource::Static(r#"{"keys":[]}"#.into())).code(), "invalid_jwks");
    let missing = bad(settings(), JwksSource::File("/nonexistent/jwks.json".into()));
    assert_eq!(missing.code(), "jwks_file");
    assert!(!missing.is_client_error());
    assert_eq!(bad(settings(), JwksSource::url("http://sso.example.test/jwks")).code(), "invalid_settings");
    assert_eq!(bad(settings(), JwksSource::url("ftp://127.0.0.1/jwks")).code(), "invalid_settings");
    let debug = format!("{:?}", Verifier::new(settings(), doc()).unwrap());
    assert!(debug.contains("keys: Some(1)"), "{debug}");
}
