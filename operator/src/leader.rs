//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): every replica serves
//! the webhooks and keeps its caches; only the holder of the Lease runs the controller, so
//! only one replica writes.
//!
//! The holder renews the Lease every `duration - grace`; a replica that stops renewing (crash,
//! partition) loses it after `duration`, and another takes over. On shutdown the holder
//! releases the Lease so that the next replica does not wait for it to expire.

use std::time::Duration;

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
        Self { receiver, _always: Some(sender), task: None }
    }

    /// Starts electing on the Lease of `settings` (created when missing).
    pub async fn elect(client: kube::Client, settings: &LeaderSettings) -> Result<Self, LeaderError> {
        if !settings.enabled {
            return Ok(Self::always());
        }
        if settings.grace < Duration::from_secs(1) || settings.duration <= settings.grace {
            return Err(LeaderError::Timing { duration: settings.duration, grace: settings.grace });
        }
        let manager = LeaseManagerBuilder::new(client, settings.lease_name.clone())
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
        let (receiver, task) = manager.watch().await;
        Ok(Self { receiver, _always: None, task: Some(task) })
    }

    /// Leadership decided by `receiver` (tests of what runs while leading).
    #[cfg(test)]
    pub(crate) fn from_channel(receiver: watch::Receiver<bool>) -> Self {
        Self { receiver, _always: None, task: None }
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
        let Self { receiver, _always, task } = self;
        drop(receiver);
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
