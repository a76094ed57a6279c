//! TLS of the admission webhooks: the serving certificate, from files or generated on start,
//! and the CA bundle of the webhook configurations.
//!
//! - **From files** (cert-manager, or a Secret the Helm chart renders): [`FileCertResolver`]
//!   serves the certificate chain and key of two PEM files and re-reads them when they change
//!   (checked at most every [`DEFAULT_CHECK_INTERVAL`], on a handshake), so a rotated
//!   certificate is served without a restart. A rotation caught half-written (new certificate,
//!   old key) keeps the previous pair until both files match again.
//! - **Generated on start** ([`generate_self_signed`]): a CA and a serving certificate for the
//!   webhook Service's DNS names, kept in memory; the CA goes into the `caBundle` of the
//!   webhook configurations with [`patch_ca_bundle`]. Every start makes a new CA, so this mode
//!   alone suits a single operator replica (several replicas would overwrite each other's CA);
//!   [`shared_self_signed`] stores the generated certificate in a Secret that every replica
//!   reads, so any number of replicas serve certificates of the one CA.
//!
//! [`server_config`] builds the rustls configuration the webhook server uses: TLS 1.2 and 1.3
//! (ring), no client authentication, ALPN `h2` and `http/1.1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{Datelike, Utc};
use custos_operator_core::names::{MANAGED_BY, MANAGED_BY_LABEL};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often [`FileCertResolver`] looks at its files by default.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Validity of generated certificates, in years.
const GENERATED_VALIDITY_YEARS: i32 = 10;

/// What can go wrong with the webhook's certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        /// `certificate file` or `key file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("the {what} {path} is not valid PEM: {reason}")]
    Pem {
        /// `certificate file` or `key file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser says.
        reason: String,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("the certificate file {path} holds no PEM CERTIFICATE")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key block.
    #[error("the key file {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is of a type rustls (ring) cannot sign with.
    #[error("the key in {path} cannot be used: {reason}")]
    UnusableKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("the key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The Service or namespace name is not a DNS label.
    #[error("cannot generate a certificate for '{name}': not a DNS label (lowercase letters, digits, '-')")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// rustls refused the server configuration.
    #[error("cannot build the webhook TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// Certificate generation failed.
    #[error("cannot generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A webhook configuration named for the CA bundle does not exist.
    #[error("{kind} {name} not found: cannot install the CA bundle (is the chart installed?)")]
    ConfigurationNotFound {
        /// `MutatingWebhookConfiguration` or `ValidatingWebhookConfiguration`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A webhook configuration has no webhooks to put the CA bundle in.
    #[error("{kind} {name} has no webhooks: nothing to put the CA bundle in")]
    NoWebhooks {
        /// The kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Replicas kept overwriting the shared certificate Secret.
    #[error("the shared webhook certificate Secret {name} kept changing while being written")]
    Contended {
        /// The Secret.
        name: String,
        /// The last conflict.
        #[source]
        source: Option<Box<kube::Error>>,
    },
    /// The Kubernetes API refused or failed a read or patch.
    #[error("cannot update the CA bundle of {kind} {name}: {source}")]
    Kube {
        /// The kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: Box<kube::Error>,
    },
}

/// The rustls server configuration of the webhooks: TLS 1.2+ with ring, no client
/// authentication, the certificate from `resolver`, ALPN `h2` and `http/1.1`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Parses a PEM certificate chain (end-entity first) and its private key into a rustls
/// [`CertifiedKey`], checking that the key belongs to the certificate. The paths only name the
/// sources in errors.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
        TlsError::Pem { what: "certificate file", path: cert_path.to_path_buf(), reason: e.to_string() }
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path.to_path_buf() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: key_path.to_path_buf() },
        other => TlsError::Pem { what: "key file", path: key_path.to_path_buf(), reason: other.to_string() },
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            TlsError::KeyMismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf() }
        }
        other => TlsError::UnusableKey { path: key_path.to_path_buf(), reason: other.to_string() },
    })
}

/// A resolver that always serves the same certificate (e.g. a generated one).
pub fn fixed_resolver(cert_pem: &str, key_pem: &str) -> Result<Arc<dyn ResolvesServerCert>, TlsError> {
    let key = certified_key(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        Path::new("(generated certificate)"),
        Path::new("(generated key)"),
    )?;
    Ok(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
}

/// Serves the certificate and key of two PEM files, re-read when their content changes.
///
/// The files are looked at during a handshake, at most once per check interval; reading two
/// small files is cheap enough to do inline. A pair that does not load (half-written
/// rotation, mismatched key) is logged once and the previous pair stays in use.
pub struct FileCertResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    check_interval: Duration,
    state: Mutex<LoadedPair>,
}

struct LoadedPair {
    current: Arc<CertifiedKey>,
    /// The file contents last looked at (loaded or not), to notice changes.
    seen: (Vec<u8>, Vec<u8>),
    checked_at: Instant,
}

impl std::fmt::Debug for FileCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCertResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("check_interval", &self.check_interval)
            .finish_non_exhaustive()
    }
}

impl FileCertResolver {
    /// Loads `cert_path` (PEM chain, end-entity first) and `key_path` (PEM private key). Fails
    /// when either cannot be read or used: the webhook must not start without a certificate.
    pub fn load(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let (cert, key) = read_pair(&cert_path, &key_path)?;
        let current = Arc::new(certified_key(&cert, &key, &cert_path, &key_path)?);
        Ok(FileCertResolver {
            cert_path,
            key_path,
            check_interval: DEFAULT_CHECK_INTERVAL,
            state: Mutex::new(LoadedPair { current, seen: (cert, key), checked_at: Instant::now() }),
        })
    }

    /// Sets how often the files are looked at ([`DEFAULT_CHECK_INTERVAL`] by default; zero:
    /// on every handshake).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The pair currently served (after looking at the files if the interval has passed).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked_at.elapsed() >= self.check_interval {
            self.refresh(&mut state);
        }
        state.current.clone()
    }

    fn refresh(&self, state: &mut LoadedPair) {
        state.checked_at = Instant::now();
        let (cert, key) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "webhook certificate unreadable: keeping the current one");
                return;
            }
        };
        if state.seen.0 == cert && state.seen.1 == key {
            return;
        }
        match certified_key(&cert, &key, &self.cert_path, &self.key_path) {
            Ok(loaded) => {
                state.current = Arc::new(loaded);
                tracing::info!(cert = %self.cert_path.display(), "webhook certificate reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "new webhook certificate does not load: keeping the current one");
            }
        }
        state.seen = (cert, key);
    }
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
    };
    Ok((read("certificate file", cert_path)?, read("key file", key_path)?))
}

/// A CA and a serving certificate generated on start.
#[derive(Clone)]
pub struct GeneratedCert {
    /// The CA certificate (PEM): the webhook configurations' `caBundle`.
    pub ca_pem: String,
    /// The serving certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// The serving certificate's private key (PEM, PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for GeneratedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCert").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

/// Generates a CA and a serving certificate for the webhook Service `service` in `namespace`,
/// with the DNS names `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` and
/// `<svc>.<ns>.svc.cluster.local`. ECDSA P-256 keys, valid from yesterday for ten years (they
/// live as long as the process: every start generates new ones).
pub fn generate_self_signed(service: &str, namespace: &str) -> Result<GeneratedCert, TlsError> {
    for name in [service, namespace] {
        if !custos_policy::selector::is_dns_label(name) {
            return Err(TlsError::InvalidName { name: name.to_string() });
        }
    }
    let yesterday = Utc::now().date_naive().pred_opt().unwrap_or_else(|| Utc::now().date_naive());
    let date = |years: i32| {
        // Month and day come from a valid date: they fit u8. Feb 29 + 10 years is Feb 28.
        let day = if yesterday.month() == 2 && yesterday.day() == 29 { 28 } else { yesterday.day() };
        rcgen::date_time_ymd(yesterday.year() + years, small(yesterday.month()), small(day))
    };

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "custos-operator webhook CA");
    ca.distinguished_name.push(DnType::OrganizationName, "Custos");
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = date(0);
    ca.not_after = date(GENERATED_VALIDITY_YEARS);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name.push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = date(0);
    leaf.not_after = date(GENERATED_VALIDITY_YEARS);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    Ok(GeneratedCert { ca_pem: ca_cert.pem(), cert_pem: leaf_cert.pem(), key_pem: leaf_key.serialize_pem() })
}

/// A month or day number (1..=31) as rcgen takes it.
fn small(value: u32) -> u8 {
    u8::try_from(value).unwrap_or(1)
}

/// Annotation of the shared certificate Secret naming the DNS name it was generated for.
pub const SHARED_CERT_ANNOTATION: &str = "custos.dev/webhook-dns-name";
/// Attempts at creating or replacing the shared certificate Secret when replicas race.
const SHARED_CERT_ATTEMPTS: usize = 3;

/// The generated certificate shared by every operator replica through the `kubernetes.io/tls`
/// Secret `secret` in `namespace` (keys `tls.crt`, `tls.key`, `ca.crt`): the first replica
/// generates it ([`generate_self_signed`] for `service` in `namespace`) and creates the
/// Secret, the others (and later restarts) read it, so all replicas serve certificates of the
/// one CA the webhook configurations trust. A Secret that does not hold a usable pair for this
/// Service is replaced. Creation and replacement are conditional (create fails if the Secret
/// appeared meanwhile, replace carries the resourceVersion read), so racing replicas converge
/// on one certificate.
pub async fn shared_self_signed(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
    service: &str,
) -> Result<GeneratedCert, TlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let dns_name = format!("{service}.{namespace}.svc");
    let kube_error =
        |source| TlsError::Kube { kind: "Secret", name: secret.to_string(), source: Box::new(source) };
    let mut last_conflict = None;
    for _ in 0..SHARED_CERT_ATTEMPTS {
        let existing = api.get_opt(secret).await.map_err(kube_error)?;
        if let Some(cert) = existing.as_ref().and_then(|s| stored_cert(s, &dns_name)) {
            tracing::info!(namespace, secret, "using the shared webhook certificate");
            return Ok(cert);
        }
        let generated = generate_self_signed(service, namespace)?;
        let mut object = tls_secret(secret, &dns_name, &generated);
        let written = match existing {
            None => api.create(&PostParams::default(), &object).await,
            Some(current) => {
                tracing::warn!(
                    namespace,
                    secret,
                    "the shared webhook certificate Secret is unusable: replacing it"
                );
                object.metadata.resource_version = current.metadata.resource_version;
                api.replace(secret, &PostParams::default(), &object).await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(namespace, secret, "generated the shared webhook certificate");
                return Ok(generated);
            }
            // Another replica wrote it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                last_conflict = Some(kube::Error::Api(status))
            }
            Err(other) => return Err(kube_error(other)),
        }
    }
    Err(TlsError::Contended { name: secret.to_string(), source: last_conflict.map(Box::new) })
}

/// The certificate a shared Secret holds, if it is complete, loads, and was made for
/// `dns_name`.
fn stored_cert(secret: &Secret, dns_name: &str) -> Option<GeneratedCert> {
    let annotations = secret.metadata.annotations.as_ref()?;
    if annotations.get(SHARED_CERT_ANNOTATION).map(String::as_str) != Some(dns_name) {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
    let cert =
        GeneratedCert { ca_pem: text("ca.crt")?, cert_pem: text("tls.crt")?, key_pem: text("tls.key")? };
    let name = Path::new("(shared Secret)");
    certified_key(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), name, name).ok()?;
    CertificateDer::from_pem_slice(cert.ca_pem.as_bytes()).ok()?;
    Some(cert)
}

fn tls_secret(name: &str, dns_name: &str, cert: &GeneratedCert) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(BTreeMap::from([(SHARED_CERT_ANNOTATION.to_string(), dns_name.to_string())])),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), bytes(&cert.cert_pem)),
            ("tls.key".to_string(), bytes(&cert.key_pem)),
            ("ca.crt".to_string(), bytes(&cert.ca_pem)),
        ])),
        ..Default::default()
    }
}

/// Sets `clientConfig.caBundle` to `ca_pem` on every webhook of the MutatingWebhookConfiguration
/// `mutating` and of the ValidatingWebhookConfiguration `validating` (each optional). One JSON
/// patch per configuration, guarded by `test` operations on the webhook names so that a
/// concurrent edit of the list fails the patch instead of writing into the wrong webhook. A
/// configuration whose bundles are already `ca_pem` is not written.
pub async fn patch_ca_bundle(
    client: &kube::Client,
    mutating: Option<&str>,
    validating: Option<&str>,
    ca_pem: &str,
) -> Result<(), TlsError> {
    if let Some(name) = mutating {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        patch_configuration(&api, "MutatingWebhookConfiguration", name, ca_pem, |c| {
            c.webhooks.iter().flatten().map(|w| (w.name.clone(), w.client_config.ca_bundle.clone())).collect()
        })
        .await?;
    }
    if let Some(name) = validating {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        patch_configuration(&api, "ValidatingWebhookConfiguration", name, ca_pem, |c| {
            c.webhooks.iter().flatten().map(|w| (w.name.clone(), w.client_config.ca_bundle.clone())).collect()
        })
        .await?;
    }
    Ok(())
}

type WebhookBundles = Vec<(String, Option<ByteString>)>;

async fn patch_configuration<K>(
    api: &Api<K>,
    kind: &'static str,
    name: &str,
    ca_pem: &str,
    webhooks: impl Fn(&K) -> WebhookBundles,
) -> Result<(), TlsError>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let kube_error = |source| TlsError::Kube { kind, name: name.to_string(), source: Box::new(source) };
    let configuration = api
        .get_opt(name)
        .await
        .map_err(kube_error)?
        .ok_or_else(|| TlsError::ConfigurationNotFound { kind, name: name.to_string() })?;
    let current = webhooks(&configuration);
    if current.is_empty() {
        return Err(TlsError::NoWebhooks { kind, name: name.to_string() });
    }
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    if current.iter().all(|(_, b)| b.as_ref() == Some(&bundle)) {
        tracing::debug!(kind, name, "webhook CA bundle already current");
        return Ok(());
    }
    let encoded = serde_json::Value::String(base64_of(&bundle));
    let mut operations = Vec::with_capacity(current.len() * 2);
    for (i, (webhook, _)) in current.iter().enumerate() {
        let index = i.to_string();
        operations.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "name"]),
            value: serde_json::Value::String(webhook.clone()),
        }));
        operations.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
            value: encoded.clone(),
        }));
    }
    let patch = json_patch::Patch(operations);
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await.map_err(kube_error)?;
    tracing::info!(kind, name, webhooks = current.len(), "webhook CA bundle installed");
    Ok(())
}

/// The base64 text of `bytes`, as the API carries `[]byte` fields in JSON.
fn base64_of(bytes: &ByteString) -> String {
    match serde_json::to_value(bytes) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}
