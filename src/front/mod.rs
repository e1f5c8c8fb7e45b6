//! Listeners: accept loops, per-connection HTTP, connection limits and draining.
//!
//! Owns: sockets. Puts the caller's identity (a [`crate::auth::Peer`] on the Unix socket,
//! a [`crate::auth::TlsPeer`] on TLS) into every request's extensions and hands requests
//! to the `api` router.
//! May call: `api` (the router), `auth` (the peer types), `config`, `secret`.

pub mod activation;
pub mod limits;
pub mod tls;
pub mod unix;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Longest back-off after failed accepts (EMFILE and friends), doubling from
/// [`ACCEPT_BACKOFF_START`]: long enough not to spin, short enough to recover quickly.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);

/// Exponential back-off between failed accepts; reset by a successful one.
pub(crate) struct Backoff(Option<Duration>);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(None)
    }

    /// A successful accept.
    pub(crate) fn reset(&mut self) {
        self.0 = None;
    }

    /// Sleeps after a failed accept, longer each time in a row.
    pub(crate) async fn wait(&mut self) {
        let d = self
            .0
            .map_or(ACCEPT_BACKOFF_START, |d| (d * 2).min(ACCEPT_BACKOFF_MAX));
        self.0 = Some(d);
        tokio::time::sleep(d).await;
    }
}

/// Serves HTTP/1.1 on one connection, with `identity` and `slot` in every request's
/// extensions, until the client closes or shutdown asks the connection to finish its
/// current request. Headers must arrive within `header_timeout`.
pub(crate) async fn serve_http<I, T>(
    io: I,
    app: Router,
    identity: T,
    slot: crate::auth::ConnectionSlot,
    header_timeout: Duration,
    mut stop: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
        let _ = req.extensions_mut().insert(identity.clone());
        let _ = req.extensions_mut().insert(slot.clone());
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    let _ = builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Signals listeners and connections to stop. Cloned into every task.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers a [`Shutdown`].
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A new shutdown pair.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Asks every listener and connection to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Completes once shutdown was triggered.
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Open connections of one listener, bounded; draining waits for all of them to end.
#[derive(Clone)]
pub struct Connections {
    slots: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Connections {
        let max = u32::try_from(max)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        Connections {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// A free slot, held for the life of the connection; `None` when all are in use
    /// (the connection is refused rather than left waiting).
    pub fn try_admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The number of slots.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Completes when every connection has ended.
    pub async fn drained(&self) {
        let _ = self.slots.acquire_many(self.max).await;
    }
}
