//! Shared test helpers: the test-only keys under `testdata/`, JWKS documents, token signing and
//! a tiny JWKS HTTP server on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custos_jwt::VerifierSettings;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const ISSUER: &str = "https://sso.example.test";
pub const AUDIENCE: &str = "customer-api";
/// The fixed "now" of the tests, seconds since the epoch.
pub const NOW: u64 = 1_700_000_000;

pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(testdata(name)).unwrap()
}

/// One test key: how to sign with it and its public JWK.
pub struct TestKey {
    pub alg: Algorithm,
    pub encoding: EncodingKey,
}

impl TestKey {
    pub fn rsa_a() -> TestKey {
        TestKey {
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&read("test-only-rsa-a.pkcs1.der")),
        }
    }
    pub fn rsa_b() -> TestKey {
        TestKey {
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&read("test-only-rsa-b.pkcs1.der")),
        }
    }
    pub fn ec_p256() -> TestKey {
        TestKey {
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(&read("test-only-ec-p256.pkcs8.der")),
        }
    }
    pub fn ec_p384() -> TestKey {
        TestKey {
            alg: Algorithm::ES384,
            encoding: EncodingKey::from_ec_der(&read("test-only-ec-p384.pkcs8.der")),
        }
    }
    pub fn ed25519() -> TestKey {
        TestKey {
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(&read("test-only-ed25519.pkcs8.der")),
        }
    }

    /// The public JWK with this `kid` and the key's `alg`.
    pub fn jwk(&self, kid: &str) -> Value {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&self.encoding, self.alg).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk
    }

    /// The public JWK with this `kid` and no `alg` member.
    pub fn jwk_without_alg(&self, kid: &str) -> Value {
        let mut jwk = self.jwk(kid);
        jwk.as_object_mut().unwrap().remove("alg");
        jwk
    }

    /// A token with this header `alg` and `kid`, signed with this key.
    pub fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    pub fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        self.sign_as(self.alg, kid, claims)
    }
}

pub fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// Valid claims at [`NOW`].
pub fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-17",
        "exp": NOW + 600,
        "iat": NOW - 60,
        "branch_id": "B-042",
        "role": "clerk",
        "level": 3,
        "admin": false,
        "groups": ["a"],
    })
}

pub fn claims_with(key: &str, value: Value) -> Value {
    let mut c = claims();
    c[key] = value;
    c
}

pub fn settings() -> VerifierSettings {
    let attributes: BTreeMap<String, String> = [
        ("branch", "branch_id"),
        ("role", "role"),
        ("level", "level"),
        ("admin", "admin"),
        ("groups", "groups"),
        ("missing", "no_such_claim"),
    ]
    .into_iter()
    .map(|(a, c)| (a.to_owned(), c.to_owned()))
    .collect();
    VerifierSettings {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned(), "reports".to_owned()],
        leeway: Duration::from_secs(30),
        id_claim: "sub".to_owned(),
        attributes,
    }
}

pub fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

/// A JWKS server on 127.0.0.1 that answers every request with the current body and counts
/// the requests.
pub struct JwksServer {
    pub url: String,
    hits: Arc<AtomicUsize>,
    body: Arc<Mutex<(u16, String)>>,
    delay: Arc<Mutex<Duration>>,
}

impl JwksServer {
    pub async fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let body = Arc::new(Mutex::new((200, body)));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (h, b, d) = (hits.clone(), body.clone(), delay.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (h, b, d) = (h.clone(), b.clone(), d.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let pause = *d.lock().unwrap();
                    tokio::time::sleep(pause).await;
                    let (status, body) = b.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        JwksServer { url, hits, body, delay }
    }

    /// Answers each request this long after it arrived (counted on arrival).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set(&self, status: u16, body: String) {
        *self.body.lock().unwrap() = (status, body);
    }
}
