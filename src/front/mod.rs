//! Listeners: accept loops, per-connection HTTP, connection limits and draining.
//!
//! Owns: sockets. Puts the caller's identity (a [`crate::auth::Peer`] on the Unix socket,
//! a [`crate::auth::TlsPeer`] on TLS) into every request's extensions and hands requests
//! to the `api` router.
//! May call: `api` (the router), `auth` (the peer types), `config`, `secret`.

pub mod activation;
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

/// A request that has not sent its headers within this time is dropped: slow-loris
/// protection that no legitimate client comes near.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 on one connection, with `identity` in every request's extensions, until
/// the client closes or shutdown asks the connection to finish its current request.
pub(crate) async fn serve_http<I, T>(io: I, app: Router, identity: T, mut stop: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
        let _ = req.extensions_mut().insert(identity.clone());
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    let _ = builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
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

    /// Waits for a free slot; the permit is held for the life of the connection.
    pub async fn admit(&self) -> tokio::sync::OwnedSemaphorePermit {
        // The semaphore is never closed.
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("connection semaphore closed")
    }

    /// Completes when every connection has ended.
    pub async fn drained(&self) {
        let _ = self.slots.acquire_many(self.max).await;
    }
}
