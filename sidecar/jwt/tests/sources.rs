//! JWKS sources: a rotated file and a URL served from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use custos_jwt::{JwksSource, JwtError, Verifier};

/// Replaces `path` atomically (write + rename), as kubelet's symlink swap does.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(start_paused = true)]
async fn jwks_file_rotation_and_a_corrupted_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_atomically(&path, &jwks(&[TestKey::rsa_a().jwk("key-1")]));
    let v = Verifier::new(settings(), JwksSource::File(path.clone())).unwrap();
    let old = bearer(&TestKey::rsa_a().sign(Some("key-1"), &claims()));
    let new = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    assert!(v.verify_at(&old, now()).await.is_ok());
    assert_eq!(v.verify_at(&new, now()).await, Err(JwtError::UnknownKid));

    // Rotation: the new key is added; the file is looked at again after at most one second.
    write_atomically(&path, &jwks(&[TestKey::rsa_a().jwk("key-1"), TestKey::ed25519().jwk("key-2")]));
    assert_eq!(v.verify_at(&new, now()).await, Err(JwtError::UnknownKid), "checked at most once per second");
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert_eq!(v.verify_at(&new, now()).await.unwrap().id, "user-17");
    assert_eq!(v.key_count(), Some(2));

    // A corrupted file keeps the previous keys.
    write_atomically(&path, "{\"keys\": [ this is not json");
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert!(v.verify_at(&new, now()).await.is_ok());
    assert!(v.verify_at(&old, now()).await.is_ok());
    assert_eq!(v.key_count(), Some(2));
    assert_eq!(v.refresh().await.unwrap_err().code(), "invalid_jwks");
    // So does a file with only unusable keys, and a vanished file.
    write_atomically(&path, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert!(v.verify_at(&old, now()).await.is_ok());
    std::fs::remove_file(&path).unwrap();
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert!(v.verify_at(&old, now()).await.is_ok());
    assert_eq!(v.refresh().await.unwrap_err().code(), "jwks_file");

    // Key 1 is retired: its tokens are refused from then on.
    write_atomically(&path, &jwks(&[TestKey::ed25519().jwk("key-2")]));
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert_eq!(v.verify_at(&old, now()).await, Err(JwtError::UnknownKid));
    assert!(v.verify_at(&new, now()).await.is_ok());
    assert_eq!(v.key_count(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn jwks_file_edited_in_place_and_forced_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[TestKey::rsa_a().jwk("key-1")])).unwrap();
    let v = Verifier::new(settings(), JwksSource::File(path.clone())).unwrap();
    std::fs::write(&path, jwks(&[TestKey::rsa_a().jwk("key-1"), TestKey::ec_p256().jwk("key-3")])).unwrap();
    assert_eq!(v.refresh().await.unwrap(), 2);
    let token = bearer(&TestKey::ec_p256().sign(Some("key-3"), &claims()));
    assert!(v.verify_at(&token, now()).await.is_ok());
}

#[tokio::test]
async fn jwks_url_fetched_lazily_and_cached() {
    let server = JwksServer::start(jwks(&[TestKey::rsa_a().jwk("key-1")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    assert_eq!(v.key_count(), None);
    assert_eq!(server.hits(), 0, "nothing fetched before the first verification");
    let token = bearer(&TestKey::rsa_a().sign(Some("key-1"), &claims()));
    for _ in 0..5 {
        assert_eq!(v.verify_at(&token, now()).await.unwrap().id, "user-17");
    }
    assert_eq!(server.hits(), 1, "cached");
    assert_eq!(v.key_count(), Some(1));
}

#[tokio::test]
async fn unknown_kid_refetches_at_most_once_per_window() {
    let server = JwksServer::start(jwks(&[TestKey::rsa_a().jwk("key-1")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    assert_eq!(v.refresh().await.unwrap(), 1);
    assert_eq!(server.hits(), 1);

    // The issuer rotates in a new key; the first token naming it triggers one fetch.
    server.set(200, jwks(&[TestKey::rsa_a().jwk("key-1"), TestKey::ed25519().jwk("key-2")]));
    let rotated = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    assert!(v.verify_at(&rotated, now()).await.is_ok());
    assert_eq!(server.hits(), 2);

    // An attacker sending made-up kids: at most one more fetch in the window, however many.
    let bogus: Vec<Vec<u8>> =
        (0..20).map(|i| bearer(&TestKey::rsa_b().sign(Some(&format!("bogus-{i}")), &claims()))).collect();
    for token in &bogus {
        assert_eq!(v.verify_at(token, now()).await, Err(JwtError::UnknownKid));
    }
    // Also concurrently.
    let tasks: Vec<_> = bogus
        .iter()
        .cloned()
        .map(|t| {
            let v = v.clone();
            tokio::spawn(async move { v.verify_at(&t, now()).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Err(JwtError::UnknownKid));
    }
    assert_eq!(server.hits(), 2, "the window opened by the rotation fetch is still closed");
    // Known keys keep working without fetching.
    assert!(v.verify_at(&rotated, now()).await.is_ok());
    assert_eq!(server.hits(), 2);

    // Once the window has passed, an unknown kid may fetch again (once).
    skip_time(Duration::from_secs(11)).await;
    for token in &bogus[..3] {
        assert_eq!(v.verify_at(token, now()).await, Err(JwtError::UnknownKid));
    }
    assert_eq!(server.hits(), 3);
}

/// Moves tokio's clock forward without waiting, then lets it run on with real time (the tests
/// do real I/O, which paused time does not mix with).
async fn skip_time(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// A URL verifier (refreshed every 60 s) whose keys were fetched once and are now stale, its
/// server and a token it verifies.
async fn stale_verifier() -> (JwksServer, Verifier, Vec<u8>) {
    let server = JwksServer::start(jwks(&[TestKey::ed25519().jwk("key-2")])).await;
    let source = JwksSource::Url {
        url: server.url.clone(),
        refresh: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    };
    let v = Verifier::new(settings(), source).unwrap();
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    assert!(v.verify_at(&token, now()).await.is_ok());
    assert_eq!(server.hits(), 1);
    skip_time(Duration::from_secs(61)).await;
    (server, v, token)
}

#[tokio::test]
async fn stale_keys_are_refreshed_in_the_background() {
    let (server, v, token) = stale_verifier().await;
    // Stale keys still verify at once; a fetch starts in the background.
    assert!(v.verify_at(&token, now()).await.is_ok());
    while server.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(v.verify_at(&token, now()).await.is_ok());
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn concurrent_first_verifications_fetch_once() {
    let server = JwksServer::start(jwks(&[TestKey::ed25519().jwk("key-2")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (v, t) = (v.clone(), token.clone());
            tokio::spawn(async move { v.verify_at(&t, now()).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn start_fetches_in_the_background() {
    let server = JwksServer::start(jwks(&[TestKey::ed25519().jwk("key-2")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    let task = v.start().expect("a URL source starts a refresh task");
    assert!(v.start().is_none(), "started once");
    // Wait for the first fetch without timing: poll the key count, yielding.
    while v.key_count().is_none() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(server.hits(), 1);
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    assert!(v.verify_at(&token, now()).await.is_ok());
    assert_eq!(server.hits(), 1);
    // The task ends with the last verifier.
    drop(v);
    task.abort();
    let static_source =
        Verifier::new(settings(), JwksSource::Static(jwks(&[TestKey::ed25519().jwk("k")]))).unwrap();
    assert!(static_source.start().is_none());
}

#[tokio::test]
async fn bad_responses_keep_the_last_good_keys() {
    let server = JwksServer::start(jwks(&[TestKey::ed25519().jwk("key-2")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    assert_eq!(v.refresh().await.unwrap(), 1);
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));

    server.set(500, "oops".into());
    assert_eq!(v.refresh().await.unwrap_err(), JwtError::JwksFetch("HTTP status 500".into()));
    server.set(200, "<html>".into());
    assert_eq!(v.refresh().await.unwrap_err().code(), "invalid_jwks");
    server.set(200, r#"{"keys":[]}"#.into());
    assert_eq!(v.refresh().await.unwrap_err().code(), "invalid_jwks");
    assert!(v.verify_at(&token, now()).await.is_ok());
    assert_eq!(v.key_count(), Some(1));
}

#[tokio::test]
async fn unreachable_url_is_jwks_unavailable() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let source = JwksSource::Url {
        url: format!("http://127.0.0.1:{port}/jwks.json"),
        refresh: Duration::from_secs(300),
        timeout: Duration::from_secs(2),
    };
    let v = Verifier::new(settings(), source).unwrap();
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    let err = v.verify_at(&token, now()).await.unwrap_err();
    assert_eq!(err, JwtError::JwksUnavailable);
    assert_eq!(err.code(), "jwks_unavailable");
    assert!(!err.is_client_error(), "the sidecar answers 503, not 401");
    // Still unavailable (and rate-limited: no new attempt) on the next request.
    assert_eq!(v.verify_at(&token, now()).await.unwrap_err(), JwtError::JwksUnavailable);
    assert_eq!(v.refresh().await.unwrap_err().code(), "jwks_fetch_failed");
    // https: the TLS client (ring provider, platform verifier) is built and the connection
    // is refused (nothing listens on that port).
    let https = JwksSource::Url {
        url: format!("https://127.0.0.1:{port}/jwks.json"),
        refresh: Duration::from_secs(300),
        timeout: Duration::from_secs(2),
    };
    let tls = Verifier::new(settings(), https).unwrap();
    assert_eq!(tls.verify_at(&token, now()).await.unwrap_err(), JwtError::JwksUnavailable);
    let err = tls.refresh().await.unwrap_err();
    assert_eq!(err.code(), "jwks_fetch_failed", "{err}");
    // Malformed tokens are still refused as client errors, before any key is needed.
    assert_eq!(v.verify_at(b"Basic x", now()).await.unwrap_err().code(), "invalid_scheme");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    // Accept connections and hold them open without answering.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let source =
        JwksSource::Url { url, refresh: Duration::from_secs(300), timeout: Duration::from_millis(200) };
    let v = Verifier::new(settings(), source).unwrap();
    let token = bearer(&TestKey::ed25519().sign(Some("key-2"), &claims()));
    assert_eq!(v.verify_at(&token, now()).await.unwrap_err(), JwtError::JwksUnavailable);
    assert_eq!(v.refresh().await.unwrap_err().code(), "jwks_fetch_failed");
    holder.abort();
}

/// A token naming another issuer is refused without a fetch: neither the first one nor
/// one for an unknown `kid` (a pod whose policies trust several issuers tries each
/// verifier, and must not wait for this one's identity provider on another's tokens).
#[tokio::test]
async fn a_token_of_another_issuer_fetches_nothing() {
    let server = JwksServer::start(jwks(&[TestKey::rsa_a().jwk("key-1")])).await;
    let v = Verifier::new(settings(), JwksSource::url(&server.url)).unwrap();
    let mut other = claims();
    other["iss"] = serde_json::json!("https://another-issuer.example");
    let token = bearer(&TestKey::rsa_a().sign(Some("key-1"), &other));
    assert_eq!(v.verify_at(&token, now()).await, Err(JwtError::InvalidIssuer));
    assert_eq!(server.hits(), 0, "fetched keys for another issuer's token");
    // Keys loaded: an unknown kid of another issuer does not refetch either.
    assert_eq!(v.refresh().await.unwrap(), 1);
    let unknown = bearer(&TestKey::rsa_b().sign(Some("key-9"), &other));
    assert_eq!(v.verify_at(&unknown, now()).await, Err(JwtError::InvalidIssuer));
    assert_eq!(server.hits(), 1);
    // This issuer's token with an unknown kid still fetches (once).
    let ours = bearer(&TestKey::rsa_b().sign(Some("key-9"), &claims()));
    assert_eq!(v.verify_at(&ours, now()).await, Err(JwtError::UnknownKid));
    assert_eq!(server.hits(), 2);
}

/// Stale keys seen by many requests while a forced fetch is running: they queue one
/// background refresh at most, and it fetches nothing once the running fetch has made the
/// keys fresh.
#[tokio::test]
async fn stale_keys_during_a_running_fetch_fetch_nothing_more() {
    let (server, v, token) = stale_verifier().await;
    server.set_delay(Duration::from_millis(300));
    let forced = {
        let v = v.clone();
        tokio::spawn(async move { v.refresh().await })
    };
    while server.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The forced fetch is held by the server: every verification sees stale keys.
    for _ in 0..50 {
        assert!(v.verify_at(&token, now()).await.is_ok());
    }
    assert_eq!(forced.await.unwrap().unwrap(), 1);
    server.set_delay(Duration::ZERO);
    // Room for a queued refresh to show itself (it would be counted on arrival).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), 2, "a refresh fetched keys the forced fetch had just made fresh");
}
