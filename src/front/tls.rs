//! The HTTPS front door: rustls (TLS 1.2 and 1.3) on a loopback TCP address, callers
//! identified by bearer token (checked in `api`, from the [`TlsPeer`] put in each request).
//!
//! Every connection must finish its handshake within the configured timeout. The first
//! bytes decide what a connection is: a TLS record goes to the handshake; clear-text HTTP
//! (any HTTP/1.x request line, or the HTTP/2 preface) gets `418 tls_required` and is
//! closed, as the Encedo appliance answers; anything else is closed at once.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::limits::{CallerSlots, Limits, TlsAdmission, Unauthenticated};
use super::{Connections, Shutdown};
use crate::auth::{ConnectionSlot, TlsPeer};
use crate::config::TlsConfig;
use crate::secret;
use crate::sync;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// How much of a clear-text request is read before answering 418 (so the answer is not
/// lost to a reset of unread data).
const MAX_CLEARTEXT_READ: usize = 16 * 1024;

/// Loads the certificate chain and key into a rustls configuration (ring provider; TLS 1.3
/// and 1.2; ALPN http/1.1).
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let chain_pem = std::fs::read(&cfg.cert)
        .map_err(|e| format!("cannot read tls.cert {}: {e}", cfg.cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "tls.cert {} is not PEM certificates: {e}",
                cfg.cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "tls.cert {} holds no certificate",
            cfg.cert.display()
        ));
    }
    let key_pem = secret::read_private_file(&cfg.key, "tls.key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "tls.key {} is not a PEM private key: {e}",
            cfg.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "tls.cert {} and tls.key {} do not make a usable pair: {e}",
                cfg.cert.display(),
                cfg.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Binds the TCP listener (inside the runtime).
pub fn bind(cfg: &TlsConfig) -> Result<TcpListener, String> {
    let std_listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| format!("cannot listen on {} (tls.listen): {e}", cfg.listen))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure {}: {e}", cfg.listen))?;
    TcpListener::from_std(std_listener).map_err(|e| format!("cannot register {}: {e}", cfg.listen))
}

/// Takes over a listening TCP socket systemd created (socket activation).
pub fn adopt(listener: std::net::TcpListener) -> Result<TcpListener, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure the activated TLS socket: {e}"))?;
    TcpListener::from_std(listener)
        .map_err(|e| format!("cannot register the activated TLS socket: {e}"))
}

/// The TLS configuration in force; a reload swaps it (new connections get the new
/// certificate, established ones keep theirs).
pub type SharedConfig = Arc<RwLock<Arc<ServerConfig>>>;

/// Accepts connections until shutdown; see the module doc for what each one gets. A
/// connection over the listener's budget is closed at once; a new one over the shared
/// budget of unauthenticated connections closes the oldest of those instead; one that has
/// not authenticated within `unauthenticated_timeout` of its handshake is closed
/// ([`super::limits`]).
pub async fn serve(
    listener: TcpListener,
    tls: SharedConfig,
    handshake_timeout: Duration,
    app: Router,
    conns: Connections,
    limits: Limits,
    shutdown: Shutdown,
) {
    let callers = CallerSlots::<String>::new(limits.per_caller);
    let anonymous = Unauthenticated::new(limits.unauthenticated);
    let max = conns.max();
    let lanes = Arc::new(tokio::sync::Semaphore::new(limits.connection_threads));
    super::accept_loop(listener, &conns, &shutdown, |stream, addr, permit| {
        let Some(permit) = permit else {
            tracing::warn!(%addr, max, "TLS listener full; connection closed");
            return;
        };
        // Answers are small and each is awaited: no Nagle delay on them.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "TCP_NODELAY not set");
        }
        let admission = Arc::new(TlsAdmission::new(anonymous.admit(), callers.clone()));
        let acceptor = TlsAcceptor::from(sync::read(&tls).clone());
        let (app, stop) = (app.clone(), shutdown.clone());
        // Handshake and requests on a thread of its own while there is one to spare (as on
        // the Unix socket), else on the runtime.
        let serve = move |stream: TcpStream| async move {
            let _permit = permit;
            let tls = tokio::time::timeout(handshake_timeout, handshake(stream, addr, acceptor));
            let stream = tokio::select! {
                r = tls => match r {
                    Ok(Some(stream)) => stream,
                    Ok(None) => return,
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out; closed");
                        return;
                    }
                },
                () = admission.evicted() => return,
            };
            let watch = admission.clone();
            let slot = ConnectionSlot(admission);
            let http = super::serve_http(
                stream,
                app,
                TlsPeer { addr },
                slot,
                limits.header_timeout,
                stop,
            );
            // Unauthenticated connections get a short life; authenticated ones are
            // bounded by their requests' own deadlines.
            let expire = async {
                tokio::time::sleep(limits.unauthenticated_timeout).await;
                if watch.authenticated() {
                    std::future::pending::<()>().await;
                }
            };
            // Eviction only reaches connections still unauthenticated: an authenticated
            // one has left the queue.
            tokio::select! {
                () = http => {}
                () = expire => {
                    tracing::debug!(%addr, "closed a TLS connection that did not authenticate in time");
                }
                () = watch.evicted() => {
                    tracing::debug!(%addr, "closed the oldest unauthenticated TLS connection to make room");
                }
            }
        };
        match lanes.clone().try_acquire_owned() {
            Ok(lane) => super::on_own_thread(stream, lane, serve),
            Err(_) => drop(tokio::spawn(serve(stream))),
        }
    })
    .await;
}

/// Sorts a new connection: TLS handshake, 418 for clear-text HTTP, or close.
async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => {}
        _ => return None,
    }
    if first[0] == TLS_HANDSHAKE {
        return match acceptor.accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "TLS handshake failed");
                None
            }
        };
    }
    if first[0].is_ascii_uppercase() {
        answer_tls_required(stream).await;
    } else {
        tracing::debug!(%addr, "closed a connection that speaks neither TLS nor HTTP");
    }
    None
}

/// Reads the clear-text request head, answers 418 and closes.
async fn answer_tls_required(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_CLEARTEXT_READ {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let version =
        if head.starts_with(b"PRI * HTTP/2.0") || !head.windows(8).any(|w| w == b"HTTP/1.0") {
            "HTTP/1.1"
        } else {
            "HTTP/1.0"
        };
    let answer = crate::api::error::ApiError::tls_required_answer(version);
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
}
