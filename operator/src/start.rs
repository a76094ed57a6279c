//! Starting and stopping `custos operator`: the admin server, the webhook caches and server,
//! leader election and, while leader, the controller.

use std::sync::Arc;
use std::time::Duration;

use custos_operator_core::desired::{MeshIdentity, Options};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::args::{OperatorConfig, TlsSource};
use crate::context::{Context, Settings};
use crate::leader::{LeaderError, Leadership};
use crate::metrics::OperatorMetrics;
use crate::tls::{self, TlsError};
use crate::view::StoreView;
use crate::webhook::{self, WebhookState};

/// Secret (in the operator's namespace) holding the generated webhook CA and certificate.
pub const WEBHOOK_TLS_SECRET: &str = "custos-operator-webhook-tls";
/// How long a stopping operator lets open admin and webhook connections finish.
const DRAIN: Duration = Duration::from_secs(10);
/// How often a failed CA bundle patch is retried (the configurations may be installed later).
const CA_PATCH_RETRY: Duration = Duration::from_secs(10);

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No Kubernetes API to talk to.
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")]
    Client(#[source] kube::Error),
    /// An address could not be bound.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// What the address is for.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The webhook certificate could not be loaded or generated.
    #[error("webhook TLS")]
    Tls(#[from] TlsError),
    /// Leader election could not start.
    #[error(transparent)]
    Leader(#[from] LeaderError),
}

/// A running operator; [`RunningOperator::shutdown`] stops it.
pub struct RunningOperator {
    stop: watch::Sender<bool>,
    failed: watch::Receiver<Option<String>>,
    /// Tasks that end on stop: admin and webhook servers, leadership, CA patching.
    tasks: JoinSet<()>,
    /// Tasks that run until aborted: the webhook caches' reflectors.
    background: JoinSet<()>,
    /// Where the admin server listens.
    pub admin_addr: std::net::SocketAddr,
    /// Where the webhooks listen, if served.
    pub webhook_addr: Option<std::net::SocketAddr>,
    /// The operator's metrics.
    pub metrics: OperatorMetrics,
}

impl std::fmt::Debug for RunningOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningOperator")
            .field("admin_addr", &self.admin_addr)
            .field("webhook_addr", &self.webhook_addr)
            .finish_non_exhaustive()
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts the operator with a client from the environment (in-cluster config or KUBECONFIG).
pub async fn start(config: OperatorConfig) -> Result<RunningOperator, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await.map_err(StartError::Client)?;
    start_with_client(config, client).await
}

/// Starts the operator against `client`.
pub async fn start_with_client(
    config: OperatorConfig,
    client: kube::Client,
) -> Result<RunningOperator, StartError> {
    let metrics = OperatorMetrics::new();
    let readiness = Arc::new(Readiness::default());
    let (stop, stop_rx) = watch::channel(false);
    let (fail, failed) = watch::channel(None::<String>);
    let fail = Arc::new(fail);
    let mut tasks = JoinSet::new();
    let mut background = JoinSet::new();

    let admin_listener = TcpListener::bind(config.admin).await.map_err(|source| StartError::Bind {
        what: "admin",
        addr: config.admin,
        source,
    })?;
    let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind {
        what: "admin",
        addr: config.admin,
        source,
    })?;
    tracing::info!(addr = %admin_addr, "operator admin listening (/healthz, /readyz, /metrics)");
    tasks.spawn(admin::serve_plain(
        admin_listener,
        admin::router(metrics.clone(), readiness.clone()),
        stopped(stop_rx.clone()),
        DRAIN,
    ));

    let mut webhook_addr = None;
    if let Some(addr) = config.webhook_listen {
        let resolver = match &config.tls {
            TlsSource::Files { cert, key } => {
                let resolver: Arc<dyn rustls::server::ResolvesServerCert> =
                    Arc::new(tls::FileCertResolver::load(cert.clone(), key.clone())?);
                resolver
            }
            TlsSource::Generate { service, namespace, mutating, validating } => {
                // One CA for all replicas (kept in a Secret), else each replica would patch its
                // own CA over the others' and the Service would reach a replica the
                // apiserver does not trust.
                let generated =
                    tls::shared_self_signed(&client, namespace, WEBHOOK_TLS_SECRET, service).await?;
                tasks.spawn(patch_ca_until_done(
                    client.clone(),
                    mutating.clone(),
                    validating.clone(),
                    generated.ca_pem.clone(),
                    stop_rx.clone(),
                ));
                tls::fixed_resolver(&generated.cert_pem, &generated.key_pem)?
            }
        };
        let server_config = tls::server_config(resolver)?;
        let view = StoreView::start(&client, config.namespaces.as_ref(), &mut background);
        let ready = readiness.clone();
        let synced_view = view.clone();
        background.spawn(async move {
            synced_view.synced().await;
            tracing::info!("webhook policy cache synced");
            ready.set_caches_synced();
            synced_view.namespaces_synced().await;
            tracing::info!("webhook namespace cache synced");
        });
        let state = WebhookState::new(Arc::new(view), config.inject.clone(), metrics.clone());
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
            what: "webhooks",
            addr,
            source,
        })?;
        webhook_addr = Some(listener.local_addr().map_err(|source| StartError::Bind {
            what: "webhooks",
            addr,
            source,
        })?);
        let router = webhook::router(state);
        let shutdown = stopped(stop_rx.clone());
        let fail_webhooks = fail.clone();
        tasks.spawn(async move {
            if let Err(error) = webhook::serve(listener, server_config, router, shutdown).await {
                let _ = fail_webhooks.send(Some(format!("webhook server: {error}")));
            }
        });
        readiness.set_webhooks_serving();
    } else {
        tracing::info!("webhooks disabled (--disable-webhooks)");
        readiness.set_caches_synced();
        readiness.set_webhooks_serving();
    }

    let leadership = Leadership::elect(client.clone(), &config.leader).await?;
    let ctx = Arc::new(Context::new(
        client,
        metrics.clone(),
        Settings {
            instance: config.instance.clone(),
            namespaces: config.namespaces.clone(),
            secret_sync: config.secret_sync.clone(),
            options: Options {
                sidecar_metrics_from: config.sidecar_metrics_from.clone(),
                mesh_identity: MeshIdentity::from_sidecar_args(&config.inject.extra_args),
            },
        },
    ));
    let controller = move || crate::controller::run(ctx.clone());
    tasks.spawn(lead(leadership, controller, metrics.clone(), stop_rx));

    Ok(RunningOperator { stop, failed, tasks, background, admin_addr, webhook_addr, metrics })
}

/// Runs the controller (started by `controller`, the only writer) while this replica leads;
/// stops it when the Lease is lost; releases the Lease on shutdown.
async fn lead<F, Fut>(
    mut leadership: Leadership,
    controller: F,
    metrics: OperatorMetrics,
    stop: watch::Receiver<bool>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let acquired = tokio::select! {
            acquired = leadership.acquired() => acquired,
            () = stopped(stop.clone()) => break,
        };
        if !acquired {
            tracing::error!("leader election stopped; this replica no longer reconciles");
            break;
        }
        tracing::info!("leading: starting the controller");
        metrics.set_leader(true);
        let running = tokio::spawn(controller());
        let stopping = tokio::select! {
            () = leadership.lost() => {
                tracing::warn!("leader Lease lost: stopping the controller");
                false
            }
            () = stopped(stop.clone()) => true,
        };
        running.abort();
        let _ = running.await;
        metrics.set_leader(false);
        if stopping {
            break;
        }
    }
    leadership.release().await;
}

async fn patch_ca_until_done(
    client: kube::Client,
    mutating: String,
    validating: String,
    ca_pem: String,
    stop: watch::Receiver<bool>,
) {
    loop {
        match tls::patch_ca_bundle(&client, Some(&mutating), Some(&validating), &ca_pem).await {
            Ok(()) => {
                tracing::info!(%mutating, %validating, "generated CA patched into the webhook configurations");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_s = CA_PATCH_RETRY.as_secs(), "cannot patch the webhook CA bundle")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CA_PATCH_RETRY) => {}
            () = stopped(stop.clone()) => return,
        }
    }
}

impl RunningOperator {
    /// Resolves with the reason when a part the operator cannot run without fails.
    pub async fn failed(&self) -> String {
        let mut failed = self.failed.clone();
        match failed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops serving (draining open connections), stops the controller and releases the Lease.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(DRAIN + Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("operator tasks still running after the drain time-out; aborting them");
            self.tasks.abort_all();
        }
        self.background.abort_all();
        while self.background.join_next().await.is_some() {}
        tracing::info!("operator stopped");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts running controllers; a controller is "running" from its start until it is
    /// aborted (dropped).
    #[derive(Clone, Default)]
    struct Running(Arc<AtomicUsize>);

    struct Guard(Arc<AtomicUsize>);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Running {
        fn start(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let guard = Guard(self.0.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }
        }

        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// `lead` on a Lease decided by the returned sender, counting the controllers it runs.
    fn spawn_lead(
        metrics: &OperatorMetrics,
        stop: watch::Receiver<bool>,
    ) -> (watch::Sender<bool>, Running, tokio::task::JoinHandle<()>) {
        let (lease, leadership) = watch::channel(false);
        let running = Running::default();
        let starter = running.clone();
        let task = tokio::spawn(lead(
            Leadership::from_channel(leadership),
            move || starter.start(),
            metrics.clone(),
            stop,
        ));
        (lease, running, task)
    }

    fn leader_gauge(metrics: &OperatorMetrics) -> bool {
        metrics.encode().lines().any(|line| line == "custos_operator_leader 1")
    }

    #[tokio::test]
    async fn only_the_leader_runs_the_controller() {
        let (stop, stop_rx) = watch::channel(false);
        let metrics = OperatorMetrics::new();
        let (lease, running, task) = spawn_lead(&metrics, stop_rx);

        // A follower: no controller, so nothing is written.
        settle().await;
        assert_eq!(running.count(), 0, "a follower must not run the controller");
        assert!(!leader_gauge(&metrics));

        // Elected: exactly one controller.
        lease.send_replace(true);
        settle().await;
        assert_eq!(running.count(), 1);
        assert!(leader_gauge(&metrics));

        // Lease lost (another replica took it): the controller is stopped.
        lease.send_replace(false);
        settle().await;
        assert_eq!(running.count(), 0, "a replica that lost the Lease must stop writing");
        assert!(!leader_gauge(&metrics));

        // Elected again, then shut down: stopped, and `lead` returns.
        lease.send_replace(true);
        settle().await;
        assert_eq!(running.count(), 1);
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(running.count(), 0);
        assert!(!leader_gauge(&metrics));
    }

    #[tokio::test]
    async fn a_stopped_election_stops_leading() {
        let (_stop, stop_rx) = watch::channel(false);
        let (lease, running, task) = spawn_lead(&OperatorMetrics::new(), stop_rx);
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(running.count(), 0);
    }
}
