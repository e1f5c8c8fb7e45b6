//! Socket activation: listening sockets passed by systemd (`LISTEN_FDS`, named through
//! `FileDescriptorName=` in `LISTEN_FDNAMES`) instead of binding. hsmkeyd takes the socket
//! named `unix` as its Unix socket and the one named `tls` as its HTTPS listener.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use listenfd::ListenFd;

/// Sockets systemd passed, by name.
#[derive(Debug, Default)]
pub struct Activated {
    /// `FileDescriptorName=unix`.
    pub unix: Option<UnixListener>,
    /// `FileDescriptorName=tls`.
    pub tls: Option<TcpListener>,
}

/// The sockets passed to this process, or `None` when it was not socket-activated.
/// Must run before any thread starts (it reads the activation environment once).
pub fn from_env() -> Result<Option<Activated>, String> {
    let mut fds = ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    if names.len() != fds.len() {
        return Err(format!(
            "systemd passed {} sockets but LISTEN_FDNAMES names {} ({names:?}); give each \
             ListenStream= a FileDescriptorName= of unix or tls",
            fds.len(),
            names.len()
        ));
    }
    let mut got = Activated::default();
    for (i, name) in names.iter().enumerate() {
        let not = |what: &str| {
            format!(
                "the socket systemd passed as {name:?} (fd {}) is not {what}",
                i + 3
            )
        };
        match *name {
            "unix" if got.unix.is_none() => {
                got.unix = Some(
                    fds.take_unix_listener(i)
                        .map_err(|e| format!("{}: {e}", not("a listening Unix stream socket")))?
                        .ok_or_else(|| not("available"))?,
                );
            }
            "tls" if got.tls.is_none() => {
                got.tls = Some(
                    fds.take_tcp_listener(i)
                        .map_err(|e| format!("{}: {e}", not("a listening TCP socket")))?
                        .ok_or_else(|| not("available"))?,
                );
            }
            other => {
                return Err(format!(
                    "systemd passed a socket named {other:?}; hsmkeyd takes one named unix \
                     and one named tls (FileDescriptorName=)"
                ))
            }
        }
    }
    Ok(Some(got))
}
