//! Updates of a pod that has the sidecar: what may not change once it runs.
//!
//! A pod's spec is mostly immutable, but an update may still replace a container's image, and
//! `kubectl debug` adds ephemeral containers (the `pods/ephemeralcontainers` subresource).
//! Either could take the enforcement away from a running pod that admission let in with its
//! sidecar: a sidecar image swapped for a plain TCP forwarder passes every request unchecked,
//! and a debug container that mounts the sidecar's volumes or shares its process namespace
//! (`--target custos-sidecar`) reads the collector token and the hash key, or erases audit
//! events before they ship. So, for a pod whose old version has the `custos-sidecar`
//! container, [`check_update`] refuses:
//!
//! - a change of the sidecar container's image, command or arguments, or its removal;
//! - a new ephemeral container that mounts a volume the sidecar mounts, or that targets the
//!   sidecar's process namespace;
//! - any new ephemeral container in a pod that shares one process namespace among its
//!   containers (`shareProcessNamespace: true`): it sees the sidecar's processes without a
//!   target, and with `SYS_PTRACE` (`kubectl debug --profile=general`) reads their files
//!   through `/proc/<pid>/root`.
//!
//! Whatever the policies' modes: the sidecar also writes the audit trail of `Audit` policies.
//! Pods without the sidecar are not looked at (the webhook is only called for pods labelled
//! `custos.dev/sidecar=injected`, old or new).

use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::names::SIDECAR_CONTAINER;

/// Why an update of a pod with the sidecar is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateRefusal {
    /// The update changes a field of the sidecar container.
    SidecarChanged {
        /// The field (`image`, `command`, `args`).
        field: &'static str,
    },
    /// The update removes the sidecar container.
    SidecarRemoved,
    /// A new ephemeral container mounts a volume the sidecar mounts.
    SidecarVolumeMounted {
        /// The ephemeral container.
        container: String,
        /// The volume.
        volume: String,
    },
    /// A new ephemeral container shares the sidecar's process namespace
    /// (`targetContainerName`), which exposes its files and environment.
    SidecarTargeted {
        /// The ephemeral container.
        container: String,
    },
    /// A new ephemeral container in a pod whose containers share one process namespace, the
    /// sidecar's included.
    SharedProcessNamespace {
        /// The ephemeral container.
        container: String,
    },
}

impl UpdateRefusal {
    /// Short, stable name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            UpdateRefusal::SidecarChanged { .. } => "sidecar-changed",
            UpdateRefusal::SidecarRemoved => "sidecar-removed",
            UpdateRefusal::SidecarVolumeMounted { .. } => "sidecar-volume-mounted",
            UpdateRefusal::SidecarTargeted { .. } => "sidecar-targeted",
            UpdateRefusal::SharedProcessNamespace { .. } => "shared-process-namespace",
        }
    }
}

impl fmt::Display for UpdateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateRefusal::SidecarChanged { field } => write!(
                f,
                "the update changes the {field} of the {SIDECAR_CONTAINER} container; recreate the pod \
                 (e.g. roll its Deployment) for the injection to set it"
            ),
            UpdateRefusal::SidecarRemoved => {
                write!(f, "the update removes the {SIDECAR_CONTAINER} container")
            }
            UpdateRefusal::SidecarVolumeMounted { container, volume } => write!(
                f,
                "ephemeral container {container} mounts {volume}, a volume only the {SIDECAR_CONTAINER} \
                 container may mount"
            ),
            UpdateRefusal::SidecarTargeted { container } => write!(
                f,
                "ephemeral container {container} targets the {SIDECAR_CONTAINER} container's process \
                 namespace; target the app's container instead"
            ),
            UpdateRefusal::SharedProcessNamespace { container } => write!(
                f,
                "ephemeral container {container} would join the pod's shared process namespace \
                 (shareProcessNamespace: true), where it sees the {SIDECAR_CONTAINER} container's \
                 processes and files; debug a copy of the pod instead (kubectl debug --copy-to)"
            ),
        }
    }
}

/// Checks the update of `old` into `new`; `None`: admitted. See the [module documentation](self).
pub fn check_update(old: &Pod, new: &Pod) -> Option<UpdateRefusal> {
    let before = sidecar_of(old)?;
    let Some(after) = sidecar_of(new) else { return Some(UpdateRefusal::SidecarRemoved) };
    for (field, changed) in [
        ("image", before.image != after.image),
        ("command", before.command != after.command),
        ("args", before.args != after.args),
    ] {
        if changed {
            return Some(UpdateRefusal::SidecarChanged { field });
        }
    }
    let sidecar_volumes: Vec<&str> = after.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    let existing = ephemeral_names(old);
    let added = new
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| !existing.contains(&c.name.as_str()));
    let shared = new.spec.as_ref().and_then(|s| s.share_process_namespace) == Some(true);
    for c in added {
        if shared {
            return Some(UpdateRefusal::SharedProcessNamespace { container: c.name.clone() });
        }
        if c.target_container_name.as_deref() == Some(SIDECAR_CONTAINER) {
            return Some(UpdateRefusal::SidecarTargeted { container: c.name.clone() });
        }
        if let Some(m) = c.volume_mounts.iter().flatten().find(|m| sidecar_volumes.contains(&m.name.as_str()))
        {
            return Some(UpdateRefusal::SidecarVolumeMounted {
                container: c.name.clone(),
                volume: m.name.clone(),
            });
        }
    }
    None
}

/// The pod's `custos-sidecar` container (regular or native).
fn sidecar_of(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).find(|c| c.name == SIDECAR_CONTAINER)
}

fn ephemeral_names(pod: &Pod) -> Vec<&str> {
    pod.spec.iter().flat_map(|s| s.ephemeral_containers.iter().flatten()).map(|c| c.name.as_str()).collect()
}
