//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): every replica serves
//! the webhooks and keeps its caches; only the holder of the Lease runs the controller, so
//! only one replica writes.
//!
//! The holder renews the Lease every `duration - grace`; a replica that stops renewing (crash,
//! partition) loses it after `duration`, and another takes over. On shutdown the holder
//! releases the Lease so that the next replica does not wait for it to expire.
//!
//! **Fencing.** The election library keeps saying "leader" while its renewals fail (it retries
//! them, with back-off, for as long as the API server does not answer), but after `duration`
//! another replica may take the Lease. So this replica leads only while the Lease *as last
//! read* names it and has not expired: a fence task reads the Lease every `grace / 8` while
//! the library says leader, and leadership ends `grace / 4` before `renewTime +
//! leaseDurationSeconds` unless a later read shows a renewal. The controller therefore stops
//! writing before another replica can take over (given clocks within `grace / 4` of each
//! other), and starts again once a read shows the Lease renewed. The library renews `grace`
//! before expiry, so a renewal has three quarters of a grace to be written and read back:
//! about a second per API call with the default 5 s grace.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How this replica decides whether it leads.
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    /// Elect on a Lease; when false this replica always leads (one replica only!).
    pub enabled: bool,
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    pub lease_namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

/// Why leader election could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be created or read.
    #[error("leader election on Lease {namespace}/{name}")]
    Lease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The cause.
        #[source]
        source: LeaseManagerError,
    },
    /// Grace must be shorter than the duration, both at least a second.
    #[error("lease duration ({duration:?}) must be longer than its grace ({grace:?}), and grace at least 1s")]
    Timing {
        /// Lease duration.
        duration: Duration,
        /// Renewal grace.
        grace: Duration,
    },
}

/// Whether this replica leads, as a watch channel.
pub struct Leadership {
    receiver: watch::Receiver<bool>,
    /// Held open when election is disabled (the answer never changes).
    _always: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>>,
    /// The fence between the election library's answer and `receiver`.
    fence: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("leader", &*self.receiver.borrow()).finish_non_exhaustive()
    }
}

impl Leadership {
    /// A replica that always leads (leader election disabled).
    pub fn always() -> Self {
        let (sender, receiver) = watch::channel(true);
        Self { receiver, _always: Some(sender), task: None, fence: None }
    }

    /// Starts electing on the Lease of `settings` (created when missing).
    pub async fn elect(client: kube::Client, settings: &LeaderSettings) -> Result<Self, LeaderError> {
        if !settings.enabled {
            return Ok(Self::always());
        }
        if settings.grace < Duration::from_secs(1) || settings.duration <= settings.grace {
            return Err(LeaderError::Timing { duration: settings.duration, grace: settings.grace });
        }
        let manager = LeaseManagerBuilder::new(client.clone(), settings.lease_name.clone())
            .with_namespace(settings.lease_namespace.clone())
            .with_identity(settings.identity.clone())
            .with_duration(settings.duration.as_secs())
            .with_grace(settings.grace.as_secs())
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .with_field_manager(format!("custos-operator-{}", settings.identity))
            .build()
            .await
            .map_err(|source| LeaderError::Lease {
                namespace: settings.lease_namespace.clone(),
                name: settings.lease_name.clone(),
                source,
            })?;
        let (elected, task) = manager.watch().await;
        let (sender, receiver) = watch::channel(false);
        let fence = Fence {
            leases: Api::namespaced(client, &settings.lease_namespace),
            lease_name: settings.lease_name.clone(),
            identity: settings.identity.clone(),
            margin: settings.grace / 4,
            interval: (settings.grace / 8).max(MIN_FENCE_INTERVAL),
            read_timeout: settings.grace,
        };
        let fence = tokio::spawn(fence.run(elected, sender));
        Ok(Self { receiver, _always: None, task: Some(task), fence: Some(fence) })
    }

    /// Leadership decided by `receiver` (tests of what runs while leading).
    #[cfg(test)]
    pub(crate) fn from_channel(receiver: watch::Receiver<bool>) -> Self {
        Self { receiver, _always: None, task: None, fence: None }
    }

    /// True while this replica holds the Lease.
    pub fn is_leader(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves when this replica becomes the leader (at once if it is). `false` when the
    /// election stopped (its task ended).
    pub async fn acquired(&mut self) -> bool {
        self.receiver.wait_for(|leader| *leader).await.is_ok()
    }

    /// Resolves when this replica loses the Lease (or the election stops).
    pub async fn lost(&mut self) {
        let _ = self.receiver.wait_for(|leader| !*leader).await;
    }

    /// Stops electing and releases the Lease if held.
    pub async fn release(self) {
        let Self { receiver, _always, task, fence } = self;
        drop(receiver);
        // The fence ends when nobody listens, dropping the election's receiver, which makes
        // the election release the Lease.
        if let Some(fence) = fence {
            let _ = fence.await;
        }
        if let Some(task) = task {
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(Ok(_))) => tracing::info!("leader Lease released"),
                Ok(Ok(Err(error))) => tracing::warn!(%error, "cannot release the leader Lease"),
                Ok(Err(error)) => tracing::warn!(%error, "leader election task failed"),
                Err(_) => tracing::warn!("leader Lease release timed out"),
            }
        }
    }
}

/// The shortest time between two reads of the Lease by the fence.
const MIN_FENCE_INTERVAL: Duration = Duration::from_millis(100);

/// Until when the replica `identity` may act as leader by `lease` as read: `margin` before
/// `renewTime + leaseDurationSeconds`, if it holds the Lease (`None` otherwise, or when the
/// Lease says neither).
pub fn valid_until(lease: &Lease, identity: &str, margin: Duration) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    renewed.checked_add(duration)?.checked_sub(margin)
}

/// Passes the election's "leader" on only while the Lease, as last read, confirms it (see
/// the module docs).
struct Fence {
    leases: Api<Lease>,
    lease_name: String,
    identity: String,
    margin: Duration,
    interval: Duration,
    /// A read slower than this is abandoned and started again (a read in flight is also
    /// abandoned when leadership lapses meanwhile, and then started again).
    read_timeout: Duration,
}

impl Fence {
    async fn run(self, mut elected: watch::Receiver<bool>, leading: watch::Sender<bool>) {
        let mut confirmed: Option<SystemTime> = None;
        let mut next_read = tokio::time::Instant::now();
        loop {
            let by_election = *elected.borrow_and_update();
            if !by_election {
                confirmed = None;
            }
            let now = SystemTime::now();
            let left = confirmed.and_then(|until| until.duration_since(now).ok()).filter(|_| by_election);
            let lead = left.is_some();
            leading.send_if_modified(|was| {
                if *was == lead {
                    return false;
                }
                if !lead && by_election {
                    tracing::warn!(
                        lease = %self.lease_name,
                        "leader Lease not confirmed renewed in time: stopping writes until a read shows it renewed"
                    );
                }
                *was = lead;
                true
            });
            let expiry = async {
                match left {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            let read = async {
                if !by_election {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(next_read).await;
                tokio::time::timeout(self.read_timeout, self.leases.get_opt(&self.lease_name)).await
            };
            tokio::select! {
                biased;
                () = leading.closed() => return,
                changed = elected.changed() => {
                    if changed.is_err() {
                        // The election stopped: nobody leads from here on (dropping the
                        // sender tells those waiting to lead).
                        leading.send_replace(false);
                        return;
                    }
                    next_read = tokio::time::Instant::now();
                }
                () = expiry => {}
                read = read => {
                    next_read = tokio::time::Instant::now() + self.interval;
                    match read {
                        Ok(Ok(lease)) => {
                            confirmed = lease.as_ref().and_then(|l| valid_until(l, &self.identity, self.margin));
                        }
                        Ok(Err(error)) => tracing::warn!(%error, lease = %self.lease_name, "cannot read the leader Lease"),
                        Err(_) => tracing::warn!(lease = %self.lease_name, "reading the leader Lease timed out"),
                    }
                }
            }
        }
    }
}
