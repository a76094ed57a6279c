//! Audit events: built on the request path, emitted once the response body has been sent (so
//! that the byte count is the real one), handed to the shipper without blocking.

use custos_api::AuditEvent;
use custos_shipper::Shipper;

/// An event waiting for its response body to end.
pub(crate) struct PendingEvent {
    event: Box<AuditEvent>,
    shipper: Shipper,
    bytes: u64,
    incomplete: bool,
}

impl PendingEvent {
    /// Wraps `event` for `shipper`.
    pub(crate) fn new(event: AuditEvent, shipper: Shipper) -> Self {
        PendingEvent { event: Box::new(event), shipper, bytes: 0, incomplete: false }
    }

    /// Counts body bytes sent.
    pub(crate) fn add_bytes(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_add(n);
    }

    /// The body did not reach its end (client gone, app failed mid-body).
    pub(crate) fn mark_incomplete(&mut self) {
        self.incomplete = true;
    }

    /// Hands the event to the shipper (never blocks).
    pub(crate) fn emit(self) {
        let mut event = *self.event;
        event.bytes = self.bytes;
        if self.incomplete {
            event.reason.push_str(",response_incomplete");
        }
        self.shipper.emit(event);
    }
}
