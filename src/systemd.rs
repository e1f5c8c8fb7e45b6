//! The service manager's side: readiness and status notifications (`sd_notify`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed
//! notification is logged, never fatal: systemd itself times out a service that never
//! reports ready.
//! Also the watchdog: `WATCHDOG=1` only while a liveness check (given by the caller) passes.
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

/// `STATUS=` alone: what `systemctl status` shows while serving.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status.to_string())]);
}

/// `STOPPING=1`: shutdown has begun; new connections are refused while requests drain.
pub fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(status.to_string()),
    ]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process), if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    libsystemd::daemon::watchdog_enabled(false)
}

/// Sends `WATCHDOG=1` every half `interval`, but only while `alive` proves the daemon can
/// do its work: each check runs on a blocking thread, one at a time, and must finish
/// within the half interval. A wedged check (a hung HSM call) stops the feeding, so systemd
/// restarts the service. Runs until the task is dropped.
pub async fn feed_watchdog<F>(interval: std::time::Duration, alive: F)
where
    F: Fn() -> bool + Send + Sync + Clone + 'static,
{
    let half = interval / 2;
    let mut pending: Option<tokio::task::JoinHandle<bool>> = None;
    loop {
        tokio::time::sleep(half).await;
        let mut check = match pending.take() {
            // The previous check is still running: the HSM is wedged; do not feed.
            Some(h) if !h.is_finished() => {
                tracing::warn!("the HSM has not answered the watchdog check; not feeding");
                pending = Some(h);
                continue;
            }
            _ => tokio::task::spawn_blocking(alive.clone()),
        };
        match tokio::time::timeout(half, &mut check).await {
            Ok(Ok(true)) => send(&[NotifyState::Watchdog]),
            Ok(_) => tracing::warn!("the watchdog check failed; not feeding"),
            Err(_) => {
                tracing::warn!("the HSM did not answer the watchdog check in time; not feeding");
                // Keep the running check so no second one piles up behind it.
                pending = Some(check);
            }
        }
    }
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (the time the reload began, CLOCK_MONOTONIC), as
/// `Type=notify-reload` expects; [`ready`] follows when the reload is done or refused.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    send(&[
        NotifyState::Reloading,
        NotifyState::Other(format!("MONOTONIC_USEC={usec}")),
        NotifyState::Status("reloading the configuration".to_string()),
    ]);
}
