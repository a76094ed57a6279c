//! `verify` never panics, whatever the header value.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use custos_jwt::{JwksSource, Verifier};
use proptest::prelude::*;
use std::sync::LazyLock;

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let doc = jwks(&[
        TestKey::rsa_a().jwk("rsa-1"),
        TestKey::ec_p256().jwk("ec-1"),
        TestKey::ed25519().jwk("ed-1"),
        TestKey::rsa_b().jwk_without_alg("rsa-any"),
    ]);
    Verifier::new(settings(), JwksSource::Static(doc)).unwrap()
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());

static ED25519: LazyLock<TestKey> = LazyLock::new(TestKey::ed25519);

fn verify(value: &[u8]) -> Result<custos_policy::User, custos_jwt::JwtError> {
    RUNTIME.block_on(VERIFIER.verify_at(value, now()))
}

/// Headers that reach key selection and signature checks: every accepted algorithm and
/// kid combination, plus junk.
fn header() -> impl Strategy<Value = String> {
    let alg = prop_oneof![
        Just("RS256"),
        Just("RS384"),
        Just("RS512"),
        Just("PS256"),
        Just("ES256"),
        Just("ES384"),
        Just("EdDSA"),
        Just("none"),
        Just("HS256"),
    ];
    let kid = prop_oneof![Just("rsa-1"), Just("ec-1"), Just("ed-1"), Just("rsa-any"), Just("x"), Just("")];
    prop_oneof![
        (alg.clone(), kid).prop_map(|(a, k)| format!(r#"{{"alg":"{a}","kid":"{k}"}}"#)),
        alg.prop_map(|a| format!(r#"{{"alg":"{a}"}}"#)),
        ".{0,64}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = verify(&bytes);
        let mut with_scheme = b"Bearer ".to_vec();
        with_scheme.extend_from_slice(&bytes);
        let _ = verify(&with_scheme);
    }

    #[test]
    fn structured_tokens_never_panic(
        header in header(),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        signature in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let token = format!(
            "Bearer {}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(signature)
        );
        let result = verify(token.as_bytes());
        prop_assert!(result.is_err());
        prop_assert!(result.unwrap_err().is_client_error());
    }
}

proptest! {
    // Signing is slow in debug builds: fewer cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn signed_arbitrary_claims_never_panic(
        claims in proptest::collection::btree_map("[a-z]{1,4}", any::<i64>().prop_map(serde_json::Value::from), 0..6),
        raw in proptest::option::of(".{0,40}"),
    ) {
        let claims = match raw {
            Some(raw) => serde_json::Value::String(raw),
            None => serde_json::to_value(claims).unwrap(),
        };
        let token = ED25519.sign(Some("ed-1"), &claims);
        let result = verify(&bearer(&token));
        prop_assert!(result.is_err());
    }
}
