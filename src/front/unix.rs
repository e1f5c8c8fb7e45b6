//! The Unix-socket front door: plain HTTP/1.1, callers identified by SO_PEERCRED.
//!
//! The socket lives in a directory that group and others cannot write (so nobody can swap
//! the socket file), is created with the configured mode, and replaces a stale socket left
//! by an earlier run, but never one a live daemon still answers on.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{umask, Mode};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::limits::{CallerSlots, Decided, Limits};
use super::{Connections, Shutdown};
use crate::auth::{ConnectionSlot, Peer};
use crate::config::UnixConfig;

/// Creates the socket as described in the module doc.
pub fn bind(cfg: &UnixConfig) -> Result<UnixListener, String> {
    let path = &cfg.path;
    let dir = path
        .parent()
        .ok_or_else(|| format!("socket path {} has no directory", path.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!(
            "socket directory {} is not usable: {e}; create it (systemd: RuntimeDirectory=)",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "socket directory {} has mode {mode:04o}: group or others could replace the \
             socket; run chmod go-w {}",
            dir.display(),
            dir.display()
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(format!(
            "socket directory {} belongs to uid {}, not to the daemon (uid {euid}) or root",
            dir.display(),
            meta.uid()
        ));
    }
    remove_stale(path)?;
    // Create the socket with no access for anyone but the owner, then widen it to the
    // configured mode: there is never a moment it is more open than configured.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    let _ = umask(old);
    let std_listener =
        bound.map_err(|e| format!("cannot bind unix socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.mode))
        .map_err(|e| format!("cannot set mode of {}: {e}", path.display()))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure {}: {e}", path.display()))?;
    UnixListener::from_std(std_listener)
        .map_err(|e| format!("cannot register {}: {e}", path.display()))
}

/// Takes over a listening socket systemd created (socket activation).
pub fn adopt(listener: std::os::unix::net::UnixListener) -> Result<UnixListener, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure the activated unix socket: {e}"))?;
    UnixListener::from_std(listener)
        .map_err(|e| format!("cannot register the activated unix socket: {e}"))
}

fn remove_stale(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "another process is serving on {}; stop it first (is hsmkeyd already running?)",
            path.display()
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "removed a stale socket from an earlier run");
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot tell whether {} is in use ({e}); remove it if no daemon runs",
            path.display()
        )),
    }
}

fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = getsockopt(stream, PeerCredentials).map_err(std::io::Error::from)?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// How long a connection over a budget is given to send the request that gets its 503.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Refusals answered at once; past that, connections over a budget are closed unanswered.
const MAX_REFUSALS: usize = 64;

/// Accepts connections until shutdown, then stops accepting and lets open connections
/// finish their current request. A connection over the listener's or its uid's budget
/// ([`super::limits`]) gets 503 `too_many_connections` and is closed.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    conns: Connections,
    limits: Limits,
    shutdown: Shutdown,
) {
    let callers = CallerSlots::<u32>::new(limits.per_caller);
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let lanes = Arc::new(Semaphore::new(limits.connection_threads));
    let max = conns.max();
    super::accept_loop(listener, &conns, &shutdown, |stream, _, permit| {
        let peer = match peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read peer credentials; closing");
                return;
            }
        };
        let caller = match &permit {
            Some(_) => callers.try_take(peer.uid, "uid"),
            None => Err(format!(
                "all {max} connections of the unix socket are in use (server.max_connections)"
            )),
        };
        let (app, stop) = (app.clone(), shutdown.clone());
        match caller {
            Ok(caller) => {
                let slot = ConnectionSlot(Arc::new(Decided(Ok(()))));
                // Detached: the connection owns its permits, which the drain waits for. On a
                // thread of its own while there is one to spare, else on the runtime.
                let serve = move |stream| async move {
                    let _permits = (permit, caller);
                    super::serve_http(stream, app, peer, slot, limits.header_timeout, stop).await;
                };
                match lanes.clone().try_acquire_owned() {
                    Ok(lane) => super::on_own_thread(stream, lane, serve),
                    Err(_) => drop(tokio::spawn(serve(stream))),
                }
            }
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "connection over its budget");
                let Ok(refusal) = refusals.clone().try_acquire_owned() else {
                    return;
                };
                let slot = ConnectionSlot(Arc::new(Decided(Err(why))));
                drop(tokio::spawn(async move {
                    let _refusal = refusal;
                    let answer = super::serve_http(stream, app, peer, slot, REFUSAL_TIMEOUT, stop);
                    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await;
                }));
            }
        }
    })
    .await;
}
