//! The demo's Custos deployment in one process: the collector (SQLite, detectors on,
//! Kubernetes Events off) and one sidecar per protected service, with the compiled config of
//! its namespace, its pod labels, a shared hash key and the JWKS the examples reference.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use custos_collector::{Auth, CollectorConfig, KubeEvents, RunningCollector};
use custos_sidecar::{CollectorSettings, RunningSidecar, SidecarSettings};
use custos_store::AnyStore;

use super::app::{Apps, Service};
use super::detection;
use super::policies::Policies;

/// JWKS Secret names the examples reference (`identity.users.jwt.jwksSecretRef`).
const JWKS_SECRETS: [&str; 2] = ["swiftparcel-sso-jwks", "device-registry-jwks"];

/// Files of the demo: store, configs, token, hash key, JWKS, spools.
pub(crate) struct Files {
    dir: PathBuf,
}

impl Files {
    /// Writes the token, the hash key, the JWKS and the configs under `dir`.
    pub(crate) fn write(
        dir: &Path,
        policies: &Policies,
        jwks: &str,
        hash_key: &[u8],
    ) -> anyhow::Result<Files> {
        let files = Files { dir: dir.to_path_buf() };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(files.token(), format!("{}\n", random_hex(32)))?;
        std::fs::write(files.hash_key(), hash_key)?;
        for secret in JWKS_SECRETS {
            let secret_dir = files.jwks_dir().join(secret);
            std::fs::create_dir_all(&secret_dir)?;
            std::fs::write(secret_dir.join("jwks.json"), jwks)?;
        }
        for (namespace, compiled) in &policies.namespaces {
            std::fs::write(files.config(namespace), &compiled.config_json)?;
        }
        Ok(files)
    }

    /// The SQLite audit store.
    pub(crate) fn store(&self) -> PathBuf {
        self.dir.join("audit.db")
    }

    fn token(&self) -> PathBuf {
        self.dir.join("collector.token")
    }

    fn hash_key(&self) -> PathBuf {
        self.dir.join("hash.key")
    }

    fn jwks_dir(&self) -> PathBuf {
        self.dir.join("jwks")
    }

    fn config(&self, namespace: &str) -> PathBuf {
        self.dir.join(format!("config-{namespace}.json"))
    }
}

/// `bytes` random bytes as hex (from the OS-seeded generator of ring).
pub(crate) fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    // The system generator does not fail on Linux; a failure leaves zeros, which only weakens
    // the demo's throw-away token and key.
    let _ = ring::rand::SystemRandom::new().fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running collector and sidecars.
pub(crate) struct Stack {
    collector: RunningCollector,
    sidecars: BTreeMap<Service, RunningSidecar>,
}

impl Stack {
    /// Starts the collector, then the sidecars in front of `apps`.
    pub(crate) async fn start(files: &Files, apps: &Apps) -> anyhow::Result<Stack> {
        let mut config = CollectorConfig::new(
            format!("sqlite:{}", files.store().display()),
            Auth::TokenFile(files.token()),
        );
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.detect = Some(detection::config());
        config.kube_events = KubeEvents::Off;
        config.shutdown_timeout = Duration::from_secs(10);
        let collector = custos_collector::start(config).await.context("the collector did not start")?;
        let collector_url = format!("http://{}", collector.addr());
        let hash_key = std::fs::read(files.hash_key())?;
        let mut sidecars = BTreeMap::new();
        for service in Service::ALL {
            let mut s = SidecarSettings::new(files.config(service.namespace()));
            s.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            s.admin = SocketAddr::from(([127, 0, 0, 1], 0));
            s.upstream = Some(apps.addr(service));
            s.namespace = Some(service.namespace().to_owned());
            s.pod_labels = BTreeMap::from([("app".to_owned(), service.app().to_owned())]);
            s.pod_name = Some(format!("{}-0", service.app()));
            s.hash_key = Some(hash_key.clone());
            s.jwks_dir = files.jwks_dir();
            s.proxy_threads = 0;
            s.drain_timeout = Duration::from_secs(5);
            s.shipper_shutdown_timeout = Duration::from_secs(10);
            let mut c =
                CollectorSettings::new(&collector_url, files.dir.join(format!("spool-{}", service.app())));
            c.token_file = Some(files.token());
            c.flush_interval = Duration::from_millis(200);
            s.collector = Some(c);
            let sidecar = custos_sidecar::start(s)
                .await
                .with_context(|| format!("the sidecar of {} did not start", service.app()))?;
            sidecars.insert(service, sidecar);
        }
        Ok(Stack { collector, sidecars })
    }

    /// The proxy address of a service's sidecar.
    pub(crate) fn proxy(&self, service: Service) -> SocketAddr {
        self.sidecars
            .get(&service)
            .map_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)), RunningSidecar::proxy_addr)
    }

    /// The audit store (shared with the collector).
    pub(crate) fn store(&self) -> AnyStore {
        self.collector.store().clone()
    }

    /// Waits until every sidecar answers `/ready` (configs loaded, JWKS fetched).
    pub(crate) async fn ready(&self) -> anyhow::Result<()> {
        for (service, sidecar) in &self.sidecars {
            let mut attempts = 0;
            while !admin_ready(sidecar.admin_addr()).await {
                attempts += 1;
                if attempts > 100 {
                    return Err(anyhow!("the sidecar of {} did not get ready within 10 s", service.app()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stops the sidecars (which flush their audit events to the collector), waits until the
    /// store holds `expected` events, then stops the collector (which finishes running the
    /// detectors over them). Returns the number of events stored.
    pub(crate) async fn stop(self, expected: u64) -> anyhow::Result<u64> {
        let store = self.store();
        for (service, sidecar) in self.sidecars {
            sidecar
                .shutdown()
                .await
                .with_context(|| format!("the sidecar of {} did not stop", service.app()))?;
        }
        let mut stored = 0;
        for _ in 0..300 {
            stored = store.head().await.map_err(|e| anyhow!("the store failed: {e}"))?.seq;
            if stored >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.collector.shutdown().await;
        Ok(stored)
    }
}

/// Whether a sidecar's admin server answers `/ready` with 200.
async fn admin_ready(admin: SocketAddr) -> bool {
    let mut caller = super::client::Caller::new(std::net::Ipv4Addr::LOCALHOST, admin, None);
    caller.get("/ready").await.is_ok_and(|a| a.status == 200)
}
