//! The service manager's side: readiness and status notifications (`sd_notify`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed
//! notification is logged, never fatal: systemd itself times out a service that never
//! reports ready.
//! Called by: `daemon` only. May call: nothing else in the crate.

use libsystemd::daemon::{notify, NotifyState};

fn send(states: &[NotifyState]) {
    if let Err(e) = notify(false, states) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// `READY=1` with a status line: the token is open, the index built and every listener
/// bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status.to_string())]);
}

/// `STOPPING=1`: shutdown has begun; new connections are refused while requests drain.
pub fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(status.to_string()),
    ]);
}
