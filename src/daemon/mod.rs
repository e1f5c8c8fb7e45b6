//! Startup and shutdown: the one place that wires the layers together.
//!
//! Order: bind the listeners (refusing a live daemon or an unsafe socket directory before
//! the token is touched), open the token (login with the PIN `main` read), build the key
//! index, serve; on SIGTERM or SIGINT stop accepting, let in-flight requests finish (bounded by
//! `server.drain_timeout_s`), close the sessions and call C_Finalize.
//! May call: every module.

mod checkpoint;
mod login;
mod reload;

use std::sync::{Arc, RwLock};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, Live};
use crate::audit::{Auditor, Entry, Event, Outcome};
use crate::auth::jwt::{Signer, TokenService};
use crate::auth::Principals;
use crate::config::Config;
use crate::front::tls::SharedConfig;
use crate::front::{self, Connections};
use crate::hsm::{Hsm, SigningKey, SIGNING_KEY_LABEL};
use crate::keys::KeyStore;
use crate::secret;
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

/// Reads the token PIN the configuration names: its PIN file, or the systemd credential
/// (under `$CREDENTIALS_DIRECTORY`). Used at start and by every reload.
pub fn read_pin(config: &Config) -> Result<SecretString, String> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let path = config.pkcs11.pin.path(credentials.as_deref())?;
    secret::read_pin_file(&path).map_err(|e| e.to_string())
}

/// Sets the environment the PKCS#11 module reads. Must run before any thread starts.
pub fn set_module_env(config: &Config) {
    for (k, v) in &config.pkcs11.module_env {
        std::env::set_var(k, v);
    }
}

/// Blocking threads kept for audit writes (and the watchdog and reload checks) beyond
/// those HSM work may take.
const BLOCKING_FOR_AUDIT: usize = 64;

/// How often the status line is brought up to date.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the stop waits for the token to sign the last audit checkpoint (and for a
/// checkpoint in flight), so a token that hangs cannot hold the stop.
const STOP_CHECKPOINT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long runtime shutdown waits for blocking threads (HSM calls) after the drain.
const RUNTIME_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
    let audit = Arc::new(
        Auditor::open(config.audit.sink, config.audit.refusal_window)
            .map_err(|e| Fatal(e.to_string()))?,
    );
    // HSM work takes at most max_sessions + 1 blocking threads (KeyStore::on_token); the
    // rest are for audit writes, which must never wait behind a token that hangs. The
    // connections are served by `server.io_threads` (default 1: on a second serving thread
    // each update's hand-offs woke threads that then found nothing to do).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(config.server.io_threads)
        .max_blocking_threads(config.pkcs11.max_sessions + 1 + BLOCKING_FOR_AUDIT)
        .thread_name("hsmkeyd")
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}")))?;
    // The socket is claimed first: a second daemon, or a socket directory others can write,
    // is refused before anything touches the token. Clients that connect while the token
    // is opened wait in the listen backlog.
    let tls = match &config.tls {
        Some(t) => Some((t, front::tls::server_config(t).map_err(Fatal)?)),
        None => None,
    };
    // Sockets systemd passed (socket activation) are used as they are; the others are
    // bound here.
    let activated = front::activation::from_env()
        .map_err(Fatal)?
        .unwrap_or_default();
    if activated.tls.is_some() && tls.is_none() {
        return Err(Fatal(format!(
            "systemd passed a socket named tls but config {} has no [tls] section with the \
             certificate and key to serve it",
            config.source.display()
        )));
    }
    let owns_unix_path = activated.unix.is_none();
    let (listener, tls_listener) = {
        let _ctx = runtime.enter();
        let unix = match activated.unix {
            Some(l) => front::unix::adopt(l),
            None => front::unix::bind(&config.unix),
        }
        .map_err(Fatal)?;
        let tcp = match (activated.tls, &tls) {
            (Some(l), _) => Some(front::tls::adopt(l).map_err(Fatal)?),
            (None, Some((t, _))) => Some(front::tls::bind(t).map_err(Fatal)?),
            (None, None) => None,
        };
        (unix, tcp)
    };
    // A socket systemd made stays systemd's: only a socket bound here is removed.
    let _socket_file = owns_unix_path.then(|| SocketFile(&config.unix.path));

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
    // One scan finds the keys and hsmkeyd's own objects (signing pairs, audit marks).
    let keys = KeyStore::open(
        hsm.clone(),
        config.roles.clone(),
        config.max_cleanup_backlog,
        config.pkcs11.max_sessions,
    )
    .map_err(|e| Fatal(format!("scanning {} failed: {e}", hsm.token())))?;
    keys.set_unique_labels(config.unique_labels);
    tracing::info!(keys = keys.len(), "key index built");
    // From here on every entry is chained, continuing from the token's high-water mark.
    let anchor = checkpoint::anchor(
        &hsm,
        keys.reserved(),
        &audit,
        config.audit.checkpoint_entries,
    )?;
    audit
        .write(&Entry::new(
            Event::HsmLogin,
            Outcome::Ok,
            format!("logged in to {}", hsm.token()),
        ))
        .map_err(|e| Fatal(format!("cannot record the login in the audit trail: {e}")))?;
    let signer = signer(&hsm, &keys)?;
    let tokens = token_service(&config, signer.clone())?;
    let encedo_login = login::service(&config, &hsm, keys.reserved())?;
    let listeners = Listeners {
        owns_unix_path,
        unix: listener,
        tls: tls_listener
            .zip(tls)
            .map(|(l, (t, c))| (l, Arc::new(RwLock::new(c)), t.handshake_timeout)),
    };

    let keys = Arc::new(keys);
    let served = runtime.block_on(serve(
        &config,
        listeners,
        keys.clone(),
        audit.clone(),
        (signer, tokens),
        anchor,
        encedo_login,
    ));
    // A wedged HSM call must not hold the process: blocking threads still inside the
    // module after this grace are abandoned.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    drop(keys);
    match hsm.shutdown() {
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e,
            "closing the token at shutdown failed (C_Finalize is skipped while a call may \
             still run in the module)"),
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// The bound listeners, before serving.
struct Listeners {
    /// Whether the Unix socket was bound here (not passed by systemd).
    owns_unix_path: bool,
    unix: tokio::net::UnixListener,
    tls: Option<(tokio::net::TcpListener, SharedConfig, std::time::Duration)>,
}

/// Signs bearer tokens with the token-signing key in the HSM.
struct HsmSigner {
    hsm: Hsm,
    key: SigningKey,
}

impl Signer for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        self.hsm
            .sign_es256(&self.key, message)
            .map_err(|e| e.to_string())
    }

    fn public_point(&self) -> Vec<u8> {
        self.key.public_point().to_vec()
    }

    fn key_id(&self) -> String {
        self.key.key_id()
    }
}

fn signer(hsm: &Hsm, keys: &KeyStore) -> Result<Arc<dyn Signer>, Fatal> {
    let (privs, pubs) = &keys.reserved().token_signing;
    let privs: Vec<_> = privs.iter().map(|(p, _)| *p).collect();
    let key = hsm.signing_key_among(&privs, pubs);
    if let Ok(k) = &key {
        keys.watch_signing_key(k);
    }
    let key = key.map_err(|e| {
        Fatal(format!(
            "the token-signing key ({SIGNING_KEY_LABEL}) in {} is unusable: {e}",
            hsm.token()
        ))
    })?;
    Ok(Arc::new(HsmSigner {
        hsm: hsm.clone(),
        key,
    }))
}

/// The bearer-token service of `config` (also built by a reload).
fn token_service(config: &Config, signer: Arc<dyn Signer>) -> Result<Arc<TokenService>, Fatal> {
    let secret = |path: &std::path::Path| {
        secret::read_private_file(path, "HS256 secret").map(|s| {
            let mut v = s.to_vec();
            while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                let _ = v.pop();
            }
            v
        })
    };
    TokenService::new(&config.tokens, &config.issuers, signer, secret)
        .map(Arc::new)
        .map_err(|e| Fatal(format!("config {}: {e}", config.source.display())))
}

/// Writes the token's losses and returns (`keys/health.rs`) to the audit trail; after a
/// return, a checkpoint writes the high-water mark to the token again (its objects are
/// found anew: the module was re-initialized).
async fn record_token_changes(
    keys: &KeyStore,
    audit: &Arc<Auditor>,
    anchor: &Arc<checkpoint::Anchor>,
) {
    use crate::keys::TokenChange;
    for change in keys.token_changes() {
        let (event, outcome, message, back) = match change {
            TokenChange::Lost(m) => (Event::TokenLost, Outcome::Failed, m, false),
            TokenChange::Foreign(m) => (Event::TokenLost, Outcome::Failed, m, false),
            TokenChange::Returned(m) => (Event::TokenReturned, Outcome::Ok, m, true),
        };
        if let Err(e) = audit.write_async(Entry::new(event, outcome, message)).await {
            tracing::error!(error = %e, "could not record a change of the token's availability");
        }
        if back {
            if let Err(e) = checkpoint::checkpoint(anchor, audit, keys, "token").await {
                tracing::error!(error = %e, "the audit checkpoint after the token's return was not written");
            }
        }
    }
}

async fn serve(
    config: &Config,
    listeners: Listeners,
    keys: Arc<KeyStore>,
    audit: Arc<Auditor>,
    (signer, tokens): (Arc<dyn Signer>, Arc<TokenService>),
    anchor: Arc<checkpoint::Anchor>,
    encedo_login: Option<Arc<api::encedo::LoginService>>,
) -> Result<(), Fatal> {
    let owns_unix_path = listeners.owns_unix_path;
    let key_count = keys.len();
    let hsm = keys.hsm().clone();
    let token = hsm.token().to_string();
    let live = Arc::new(RwLock::new(Arc::new(Live::new(
        Principals::new(&config.principals),
        tokens,
        config.roles.iter().cloned().collect(),
        config.allow_delete,
    ))));
    let tls_shared = listeners.tls.as_ref().map(|(_, c, _)| c.clone());
    let tasks = TaskTracker::new();
    let (stop_worker, worker_stop) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(keys.clone().run_worker(worker_stop));
    let last_reload = Arc::new(std::sync::Mutex::new(None));
    let (stop_checkpoints, checkpoints_stop) = tokio::sync::watch::channel(false);
    let checkpoints = tokio::spawn(checkpoint::run(
        anchor.clone(),
        audit.clone(),
        keys.clone(),
        config.audit.checkpoint_interval,
        checkpoints_stop,
    ));
    let state = AppState {
        keys: keys.clone(),
        audit: audit.clone(),
        live: live.clone(),
        tasks: tasks.clone(),
        body_limits: api::deadline::BodyLimits {
            deadline: config.server.request_timeout,
            min_rate: config.server.min_body_rate,
        },
        started: std::time::Instant::now(),
        last_reload: last_reload.clone(),
        encedo_login,
    };
    let app = api::router(state);
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Fatal(format!("cannot install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Fatal(format!("cannot install the SIGINT handler: {e}")))?;
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Fatal(format!("cannot install the SIGHUP handler: {e}")))?;
    let (trigger, shutdown) = front::shutdown_pair();
    let conns = Connections::new(config.server.max_connections);
    let tls_conns = Connections::new(config.server.max_connections);
    let limits = front::limits::Limits::of(&config.server);
    // Where the daemon really listens (an activated socket may differ from the config).
    let unix_at = listeners
        .unix
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_else(|| config.unix.path.display().to_string());
    let tls_at = listeners
        .tls
        .as_ref()
        .and_then(|(l, _, _)| l.local_addr().ok());
    let where_ = match tls_at {
        Some(a) => format!("https://{a} and {unix_at}"),
        None => unix_at.clone(),
    };
    let tls = listeners.tls.map(|(listener, tls, timeout)| {
        tokio::spawn(front::tls::serve(
            listener,
            tls,
            timeout,
            app.clone(),
            tls_conns.clone(),
            limits,
            shutdown.clone(),
        ))
    });
    let unix = tokio::spawn(front::unix::serve(
        listeners.unix,
        app,
        conns.clone(),
        limits,
        shutdown.clone(),
    ));
    if let Some(a) = tls_at {
        tracing::info!(address = %a, "serving HTTPS");
    }
    tracing::info!(socket = %unix_at, "serving");
    audit
        .write_async(Entry::new(
            Event::DaemonStarted,
            Outcome::Ok,
            format!(
                "serving {key_count} keys on {where_} (config {})",
                config.source.display()
            ),
        ))
        .await
        .map_err(|e| Fatal(format!("cannot record the start in the audit trail: {e}")))?;
    let status = format!("serving {key_count} keys from {token} on {where_}");
    systemd::ready(&status);
    // The watchdog proves the HSM answers (C_GetSessionInfo on a pooled session).
    let watchdog = systemd::watchdog_interval().map(|interval| {
        let (hsm, lost) = (hsm.clone(), keys.lost_flag());
        let alive = move || !lost.load(std::sync::atomic::Ordering::SeqCst) && hsm.ping().is_ok();
        tokio::spawn(systemd::feed_watchdog(interval, alive))
    });
    let mut reloader = reload::Reloader {
        running: config.clone(),
        live,
        tls: tls_shared,
        keys: keys.clone(),
        signer,
        audit: audit.clone(),
        status,
        last_reload,
    };
    // The status line follows the store's health (worker backlog, unreadable objects).
    // Housekeeping that may wait on the token or journald runs in a task of its own, so
    // that a token that hangs never keeps this loop from seeing a signal.
    let housekeeping = {
        let (keys, audit, anchor) = (reloader.keys.clone(), audit.clone(), anchor.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_INTERVAL);
            loop {
                let _ = tick.tick().await;
                audit.flush_refusals(false).await;
                keys.check_token(false).await;
                record_token_changes(&keys, &audit, &anchor).await;
            }
        })
    };
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut shown = String::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let health = reloader.keys.health();
                if health != shown {
                    let line = if health.is_empty() {
                        reloader.status.clone()
                    } else {
                        format!("{}; {health}", reloader.status)
                    };
                    systemd::status(&line);
                    shown = health;
                }
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received; draining");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received; draining");
                break;
            }
            _ = hup.recv() => {
                reloader.reload().await;
                // A lost token is looked for at once (in the background: it may hang).
                let keys = reloader.keys.clone();
                drop(tokio::spawn(async move { keys.check_token(true).await }));
            }
        }
    }
    drop(reloader);
    housekeeping.abort();
    systemd::stopping("draining in-flight requests");
    if let Some(w) = watchdog {
        w.abort();
    }
    trigger.trigger();
    let _ = unix.await;
    if let Some(t) = tls {
        let _ = t.await;
    }
    // Nothing accepts any more: the path goes now so a successor can bind while we drain.
    if owns_unix_path {
        let _ = std::fs::remove_file(&config.unix.path);
    }
    // Updates whose clients went away still run in their own tasks: wait for them too.
    let _ = tasks.close();
    let drained = async {
        conns.drained().await;
        tls_conns.drained().await;
        tasks.wait().await;
        audit.flush_refusals(true).await;
        // Updates are over: the worker writes the records still behind, then stops.
        let _ = stop_worker.send(true);
        let _ = worker.await;
    };
    if tokio::time::timeout(config.server.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = config.server.drain_timeout.as_secs(),
            "requests still running after the drain timeout; stopping anyway"
        );
    }
    // The last entries: the stop, and the checkpoint that signs it (the next run links
    // to that checkpoint).
    // A token that hangs must not hold the stop: each step is bounded.
    let _ = stop_checkpoints.send(true);
    let aborter = checkpoints.abort_handle();
    if tokio::time::timeout(STOP_CHECKPOINT_GRACE, checkpoints)
        .await
        .is_err()
    {
        aborter.abort();
    }
    if let Err(e) = audit
        .write_async(Entry::new(Event::DaemonStopped, Outcome::Ok, "stopped"))
        .await
    {
        tracing::warn!(error = %e, "could not record the stop in the audit trail");
    }
    let last = checkpoint::checkpoint(&anchor, &audit, &keys, "stop");
    match tokio::time::timeout(STOP_CHECKPOINT_GRACE, last).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e,
            "the final audit checkpoint was not written; the trail's tail stays unsigned"),
        Err(_) => tracing::error!(
            "the token did not sign the final audit checkpoint in time; the trail's tail \
             stays unsigned"
        ),
    }
    Ok(())
}
