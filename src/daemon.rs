//! Startup and shutdown: the one place that wires the layers together.
//!
//! Order: bind the listeners (refusing a live daemon or an unsafe socket directory before
//! the token is touched), open the token (login with the PIN `main` read), build the key
//! index, serve; on SIGTERM or SIGINT stop accepting, let in-flight requests finish (bounded by
//! `server.drain_timeout_s`), close the sessions and call C_Finalize.
//! May call: every module.

use std::sync::{Arc, RwLock};

use tokio::signal::unix::{signal, SignalKind};

use crate::api::{self, AppState};
use crate::audit::{Auditor, Entry, Event, Outcome};
use crate::auth::Principals;
use crate::config::Config;
use crate::front::{self, Connections};
use crate::hsm::Hsm;
use crate::keys::KeyStore;
use crate::secret::SecretString;
use crate::systemd;

/// A failure that stops the daemon, already worded for the operator.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sets the environment the PKCS#11 module reads. Must run before any thread starts.
pub fn set_module_env(config: &Config) {
    for (k, v) in &config.pkcs11.module_env {
        std::env::set_var(k, v);
    }
}

/// Removes the socket file when the daemon stops, however it stops after binding.
struct SocketFile<'a>(&'a std::path::Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Runs the daemon until a termination signal. Call [`set_module_env`] first; `pin` comes
/// from [`secret::read_pin_file`], which the caller checks so that a bad PIN file counts as
/// a configuration error.
pub fn run(config: Config, pin: SecretString) -> Result<(), Fatal> {
    // No audit trail, no daemon: checked before anything else.
    let audit = Arc::new(Auditor::open(config.audit.sink).map_err(|e| Fatal(e.to_string()))?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hsmkeyd")
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}")))?;
    // The socket is claimed first: a second daemon, or a socket directory others can write,
    // is refused before anything touches the token. Clients that connect while the token
    // is opened wait in the listen backlog.
    let listener = {
        let _ctx = runtime.enter();
        front::unix::bind(&config.unix).map_err(Fatal)?
    };
    let _socket_file = SocketFile(&config.unix.path);

    let hsm = match Hsm::open(&config.pkcs11, pin) {
        Ok(h) => h,
        Err(e) => {
            let entry = Entry::new(
                Event::HsmLogin,
                Outcome::Failed,
                format!("HSM login failed: {e}"),
            );
            if let Err(ae) = audit.write(&entry) {
                tracing::error!(error = %ae, "could not record the failed login");
            }
            return Err(Fatal(e.to_string()));
        }
    };
    tracing::info!(token = %hsm.token(), module = %config.pkcs11.module.display(), "logged in");
    audit
        .write(&Entry::new(
            Event::HsmLogin,
            Outcome::Ok,
            format!("logged in to {}", hsm.token()),
        ))
        .map_err(|e| Fatal(format!("cannot record the login in the audit trail: {e}")))?;
    let keys = KeyStore::open(hsm.clone(), config.roles.clone())
        .map_err(|e| Fatal(format!("scanning {} failed: {e}", hsm.token())))?;
    tracing::info!(keys = keys.len(), "key index built");

    let keys = Arc::new(keys);
    runtime.block_on(serve(&config, listener, keys.clone(), audit.clone()))?;
    drop(runtime);

    let keys =
        Arc::try_unwrap(keys).map_err(|_| Fatal("key store still in use at shutdown".into()))?;
    drop(keys);
    if let Err(e) = hsm.shutdown() {
        tracing::warn!(error = %e, "closing the token at shutdown failed");
    }
    if let Err(e) = audit.write(&Entry::new(Event::DaemonStopped, Outcome::Ok, "stopped")) {
        tracing::warn!(error = %e, "could not record the stop in the audit trail");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn serve(
    config: &Config,
    listener: tokio::net::UnixListener,
    keys: Arc<KeyStore>,
    audit: Arc<Auditor>,
) -> Result<(), Fatal> {
    let key_count = keys.len();
    let token = keys.hsm().token().to_string();
    let state = AppState {
        keys,
        audit: audit.clone(),
        principals: Arc::new(RwLock::new(Arc::new(Principals::new(&config.principals)))),
    };
    let app = api::router(state);
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Fatal(format!("cannot install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Fatal(format!("cannot install the SIGINT handler: {e}")))?;
    let (trigger, shutdown) = front::shutdown_pair();
    let conns = Connections::new(config.server.max_connections);
    let unix = tokio::spawn(front::unix::serve(
        listener,
        app,
        conns.clone(),
        shutdown.clone(),
    ));
    tracing::info!(socket = %config.unix.path.display(), "serving");
    audit
        .write_async(Entry::new(
            Event::DaemonStarted,
            Outcome::Ok,
            format!(
                "serving {key_count} keys on {} (config {})",
                config.unix.path.display(),
                config.source.display()
            ),
        ))
        .await
        .map_err(|e| Fatal(format!("cannot record the start in the audit trail: {e}")))?;
    systemd::ready(&format!(
        "serving {key_count} keys from {} on {}",
        token,
        config.unix.path.display()
    ));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = int.recv() => tracing::info!("SIGINT received; draining"),
    }
    systemd::stopping("draining in-flight requests");
    trigger.trigger();
    let _ = unix.await;
    // Nothing accepts any more: the path goes now so a successor can bind while we drain.
    let _ = std::fs::remove_file(&config.unix.path);
    if tokio::time::timeout(config.server.drain_timeout, conns.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = config.server.drain_timeout.as_secs(),
            "requests still running after the drain timeout; stopping anyway"
        );
    }
    Ok(())
}
