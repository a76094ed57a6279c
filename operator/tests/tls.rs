//! The webhooks over TLS: a generated certificate served by `serve` on 127.0.0.1 and trusted
//! through its CA alone (HTTP/1.1 with reqwest, HTTP/2 by ALPN, TLS 1.2), certificates
//! rotated on disk picked up by the next handshake, certificate files that cannot be used
//! reported by name, the generated certificate shared by replicas through a Secret, and the CA
//! bundle patched into the webhook configurations (kube-fake-client).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use custos_operator::OperatorMetrics;
use custos_operator::tls::{
    FileCertResolver, GeneratedCert, SHARED_CERT_ANNOTATION, TlsError, fixed_resolver, generate_self_signed,
    patch_ca_bundle, server_config, shared_self_signed,
};
use custos_operator::webhook::review::AdmissionReviewResponse;
use custos_operator::webhook::{StaticView, WebhookState, router, serve};
use custos_operator_core::inject::InjectSettings;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, ServiceReference, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const SERVICE: &str = "custos-webhook";
const NAMESPACE: &str = "custos-system";
const HOST: &str = "custos-webhook.custos-system.svc";

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)).unwrap()
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A running webhook server and the way to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(resolver: Arc<dyn rustls::server::ResolvesServerCert>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state =
            WebhookState::new(Arc::new(StaticView::new()), InjectSettings::default(), OperatorMetrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, server_config(resolver).unwrap(), router(state), async {
            let _ = stopped.await;
        }));
        Running { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// A TLS client that trusts only `ca_pem`, offering `alpn`.
fn connector(
    ca_pems: &[&str],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in ca_pems {
        roots.add(der(ca)).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    connector: &TlsConnector,
    addr: SocketAddr,
    host: &str,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await
}

/// The end-entity certificate the server presents.
async fn served_certificate(addr: SocketAddr, trusted: &[&str]) -> CertificateDer<'static> {
    let tls = handshake(&connector(trusted, &[], rustls::ALL_VERSIONS), addr, HOST).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn write_pair(dir: &Path, cert: &GeneratedCert) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, format!("{}{}", cert.cert_pem, cert.ca_pem)).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn a_generated_certificate_serves_admission_reviews_over_https() {
    install_provider();
    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let server = Running::start(fixed_resolver(&generated.cert_pem, &generated.key_pem).unwrap()).await;

    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(generated.ca_pem.as_bytes()).unwrap()])
        .resolve(HOST, server.addr)
        .https_only(true)
        .build()
        .unwrap();
    let response = client
        .post(format!("https://{HOST}:{}/mutate-pods", server.addr.port()))
        .header("content-type", "application/json")
        .body(fixture_bytes("pod-selected.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let review: AdmissionReviewResponse = response.json().await.unwrap();
    assert_eq!(review.kind, "AdmissionReview");
    assert_eq!(review.response.uid, "3f6c1a52-8d0b-4b8e-9a51-0c2b6e7d4f10");
    assert!(review.response.allowed);

    // A client that does not trust the generated CA refuses the server.
    let stranger = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    assert!(
        handshake(&connector(&[&stranger.ca_pem], &[], rustls::ALL_VERSIONS), server.addr, HOST)
            .await
            .is_err()
    );
    server.stop().await;
}

#[tokio::test]
async fn the_certificate_names_every_service_dns_name() {
    install_provider();
    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let server = Running::start(fixed_resolver(&generated.cert_pem, &generated.key_pem).unwrap()).await;
    let trust = connector(&[&generated.ca_pem], &[], rustls::ALL_VERSIONS);
    for host in [
        "custos-webhook",
        "custos-webhook.custos-system",
        "custos-webhook.custos-system.svc",
        "custos-webhook.custos-system.svc.cluster.local",
    ] {
        handshake(&trust, server.addr, host).await.unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    assert!(handshake(&trust, server.addr, "other-service.custos-system.svc").await.is_err());
    assert!(matches!(generate_self_signed("Custos_Webhook", NAMESPACE), Err(TlsError::InvalidName { .. })));
    server.stop().await;
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn_and_tls12_is_accepted() {
    install_provider();
    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let server = Running::start(fixed_resolver(&generated.cert_pem, &generated.key_pem).unwrap()).await;

    let h2 = connector(&[&generated.ca_pem], &[b"h2", b"http/1.1"], rustls::ALL_VERSIONS);
    let tls = handshake(&h2, server.addr, HOST).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("https://{HOST}/validate-policies"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(fixture_bytes("policy-audit.json"))))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["uid"], "a4c6e8f0-1b3d-4f5a-9c7e-2d4f6a8b0c13");
    assert_eq!(review["response"]["allowed"], true);

    let tls12 = connector(&[&generated.ca_pem], &[b"http/1.1"], &[&rustls::version::TLS12]);
    let tls = handshake(&tls12, server.addr, HOST).await.unwrap();
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    server.stop().await;
}

/// A client that completes the TLS handshake and then sends nothing, or a few bytes of the h2
/// preface, is closed after the webhook's 10 s header read time-out (hyper-util's protocol
/// detection has no timer of its own). The clock is paused, so the seconds pass at once.
#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed_after_the_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    install_provider();
    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let server = Running::start(fixed_resolver(&generated.cert_pem, &generated.key_pem).unwrap()).await;
    let client = connector(&[&generated.ca_pem], &[b"h2", b"http/1.1"], rustls::ALL_VERSIONS);
    for head in ["", "PRI * HTTP/2.0\r\n"] {
        let mut tls = handshake(&client, server.addr, HOST).await.unwrap();
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let begun = tokio::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(600), tls.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a connection that sent {head:?} is still open");
        assert_eq!(begun.elapsed().as_secs(), 10, "{head:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn rotated_certificate_files_are_served_by_the_next_handshake() {
    install_provider();
    let dir = tempfile::tempdir().unwrap();
    let first = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let (cert_path, key_path) = write_pair(dir.path(), &first);
    let resolver = FileCertResolver::load(&cert_path, &key_path).unwrap().with_check_interval(Duration::ZERO);
    let server = Running::start(Arc::new(resolver)).await;
    let second = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let third = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let all = [first.ca_pem.as_str(), second.ca_pem.as_str(), third.ca_pem.as_str()];

    assert_eq!(served_certificate(server.addr, &all).await, der(&first.cert_pem));
    write_pair(dir.path(), &second);
    assert_eq!(served_certificate(server.addr, &all).await, der(&second.cert_pem));

    // Half a rotation (new certificate, old key) keeps the last good pair.
    std::fs::write(&cert_path, &third.cert_pem).unwrap();
    assert_eq!(served_certificate(server.addr, &all).await, der(&second.cert_pem));
    std::fs::write(&key_path, &third.key_pem).unwrap();
    assert_eq!(served_certificate(server.addr, &all).await, der(&third.cert_pem));

    // Files gone: the last good pair is still served.
    std::fs::remove_file(&cert_path).unwrap();
    assert_eq!(served_certificate(server.addr, &all).await, der(&third.cert_pem));
    server.stop().await;
}

#[test]
fn unusable_certificate_files_are_reported_by_name() {
    install_provider();
    let dir = tempfile::tempdir().unwrap();
    let one = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let other = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let (cert_path, key_path) = write_pair(dir.path(), &one);
    assert!(FileCertResolver::load(&cert_path, &key_path).is_ok());

    let missing = dir.path().join("missing.crt");
    let error = FileCertResolver::load(&missing, &key_path).unwrap_err();
    assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains("missing.crt"), "{error}");

    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let error = FileCertResolver::load(&empty, &key_path).unwrap_err();
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error:?}");
    assert!(error.to_string().contains("empty.crt"), "{error}");

    let error = FileCertResolver::load(&cert_path, &cert_path).unwrap_err();
    assert!(matches!(error, TlsError::NoKey { .. }), "{error:?}");
    assert!(error.to_string().contains("holds no PEM private key"), "{error}");

    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let error = FileCertResolver::load(&cert_path, &other_key).unwrap_err();
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    assert!(error.to_string().contains("other.key") && error.to_string().contains("tls.crt"), "{error}");
}

fn client_config(path: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        ca_bundle: None,
        service: Some(ServiceReference {
            name: SERVICE.to_string(),
            namespace: NAMESPACE.to_string(),
            path: Some(path.to_string()),
            port: Some(443),
        }),
        url: None,
    }
}

fn mutating(name: &str, webhooks: &[&str]) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
        webhooks: Some(
            webhooks
                .iter()
                .map(|w| MutatingWebhook {
                    name: w.to_string(),
                    admission_review_versions: vec!["v1".to_string()],
                    client_config: client_config("/mutate-pods"),
                    side_effects: "None".to_string(),
                    failure_policy: Some("Fail".to_string()),
                    ..MutatingWebhook::default()
                })
                .collect(),
        ),
    }
}

fn validating(name: &str, webhooks: &[&str]) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
        webhooks: Some(
            webhooks
                .iter()
                .map(|w| ValidatingWebhook {
                    name: w.to_string(),
                    admission_review_versions: vec!["v1".to_string()],
                    client_config: client_config("/validate-policies"),
                    side_effects: "None".to_string(),
                    ..ValidatingWebhook::default()
                })
                .collect(),
        ),
    }
}

#[tokio::test]
async fn the_ca_bundle_is_patched_into_every_webhook() {
    install_provider();
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let pp = PostParams::default();
    mutating_api.create(&pp, &mutating("custos-injector", &["inject.custos.dev"])).await.unwrap();
    validating_api
        .create(&pp, &validating("custos-validator", &["validate.custos.dev", "validate-v2.custos.dev"]))
        .await
        .unwrap();

    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    patch_ca_bundle(&client, Some("custos-injector"), Some("custos-validator"), &generated.ca_pem)
        .await
        .unwrap();
    let expected = Some(ByteString(generated.ca_pem.as_bytes().to_vec()));

    let m = mutating_api.get("custos-injector").await.unwrap();
    let hooks = m.webhooks.unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].client_config.ca_bundle, expected);
    assert_eq!(hooks[0].name, "inject.custos.dev");
    assert_eq!(hooks[0].failure_policy.as_deref(), Some("Fail"), "other fields are untouched");
    assert_eq!(hooks[0].client_config.service.as_ref().and_then(|s| s.path.as_deref()), Some("/mutate-pods"));
    let v = validating_api.get("custos-validator").await.unwrap();
    let hooks = v.webhooks.unwrap();
    assert_eq!(hooks.len(), 2);
    assert!(hooks.iter().all(|h| h.client_config.ca_bundle == expected), "{hooks:?}");

    // A second CA replaces the first.
    let next = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    patch_ca_bundle(&client, None, Some("custos-validator"), &next.ca_pem).await.unwrap();
    let hooks = validating_api.get("custos-validator").await.unwrap().webhooks.unwrap();
    assert!(
        hooks.iter().all(|h| h.client_config.ca_bundle == Some(ByteString(next.ca_pem.as_bytes().to_vec())))
    );
    let hooks = mutating_api.get("custos-injector").await.unwrap().webhooks.unwrap();
    assert_eq!(hooks[0].client_config.ca_bundle, expected, "the mutating configuration was not named");
}

#[tokio::test]
async fn a_missing_or_empty_webhook_configuration_is_an_error() {
    install_provider();
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let generated = generate_self_signed(SERVICE, NAMESPACE).unwrap();

    let error = patch_ca_bundle(&client, Some("custos-injector"), None, &generated.ca_pem).await.unwrap_err();
    assert!(
        matches!(error, TlsError::ConfigurationNotFound { kind: "MutatingWebhookConfiguration", .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("MutatingWebhookConfiguration custos-injector not found"), "{error}");
    let error =
        patch_ca_bundle(&client, None, Some("custos-validator"), &generated.ca_pem).await.unwrap_err();
    assert!(
        matches!(error, TlsError::ConfigurationNotFound { kind: "ValidatingWebhookConfiguration", .. }),
        "{error:?}"
    );

    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    api.create(&PostParams::default(), &validating("custos-validator", &[])).await.unwrap();
    let error =
        patch_ca_bundle(&client, None, Some("custos-validator"), &generated.ca_pem).await.unwrap_err();
    assert!(matches!(error, TlsError::NoWebhooks { .. }), "{error:?}");
}

#[tokio::test]
async fn replicas_share_one_generated_certificate_through_a_secret() {
    install_provider();
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let first = shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE).await.unwrap();
    let second = shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE).await.unwrap();
    assert_eq!(first.ca_pem, second.ca_pem, "the second replica reads the first one's certificate");
    assert_eq!(first.cert_pem, second.cert_pem);
    assert_eq!(first.key_pem, second.key_pem);

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let stored = secrets.get("custos-webhook-tls").await.unwrap();
    assert_eq!(stored.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = stored.data.clone().unwrap();
    assert_eq!(data["ca.crt"].0, first.ca_pem.as_bytes());
    assert_eq!(data["tls.crt"].0, first.cert_pem.as_bytes());
    let annotations = stored.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[SHARED_CERT_ANNOTATION], "custos-webhook.custos-system.svc");

    // The shared certificate serves the Service's name under its CA.
    let server = Running::start(fixed_resolver(&second.cert_pem, &second.key_pem).unwrap()).await;
    handshake(&connector(&[&first.ca_pem], &[], rustls::ALL_VERSIONS), server.addr, HOST).await.unwrap();
    server.stop().await;

    // A Secret made for another Service is replaced, not used.
    let other =
        shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", "custos-webhook-v2").await.unwrap();
    assert_ne!(other.ca_pem, first.ca_pem);
    let stored = secrets.get("custos-webhook-tls").await.unwrap();
    assert_eq!(
        stored.metadata.annotations.unwrap()[SHARED_CERT_ANNOTATION],
        "custos-webhook-v2.custos-system.svc"
    );
}

#[tokio::test]
async fn an_unusable_shared_secret_is_replaced() {
    install_provider();
    let one = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let other = generate_self_signed(SERVICE, NAMESPACE).unwrap();
    let broken = Secret {
        metadata: ObjectMeta {
            name: Some("custos-webhook-tls".to_string()),
            namespace: Some(NAMESPACE.to_string()),
            annotations: Some(
                [(SHARED_CERT_ANNOTATION.to_string(), "custos-webhook.custos-system.svc".to_string())].into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(one.cert_pem.into_bytes())),
                ("tls.key".to_string(), ByteString(other.key_pem.into_bytes())),
                ("ca.crt".to_string(), ByteString(one.ca_pem.into_bytes())),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    let client = kube_fake_client::ClientBuilder::new().with_object(broken).build().await.unwrap();
    let fixed = shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let data = secrets.get("custos-webhook-tls").await.unwrap().data.unwrap();
    assert_eq!(data["tls.key"].0, fixed.key_pem.as_bytes(), "the mismatched pair was replaced");
    let again = shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE).await.unwrap();
    assert_eq!(again.cert_pem, fixed.cert_pem);
}

#[tokio::test]
async fn racing_replicas_converge_on_one_certificate() {
    install_provider();
    let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
    let (a, b, c) = tokio::join!(
        shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE),
        shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE),
        shared_self_signed(&client, NAMESPACE, "custos-webhook-tls", SERVICE),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.ca_pem, b.ca_pem);
    assert_eq!(b.ca_pem, c.ca_pem);
    assert_eq!(a.key_pem, c.key_pem);
}
