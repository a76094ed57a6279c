//! Errors of starting and running the sidecar. Request-time problems are HTTP responses, not
//! errors.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the sidecar cannot start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    File {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initial config is invalid (a later invalid config only fails its reload).
    #[error("config {}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The audit shipper could not start.
    #[error("audit shipper: {0}")]
    Shipper(String),
    /// A background task failed.
    #[error("sidecar task failed: {0}")]
    Task(String),
}
