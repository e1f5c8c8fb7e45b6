//! Listeners: accept loops, per-connection HTTP, connection limits and draining.
//!
//! Owns: sockets. Puts the caller's identity (the [`crate::auth::Peer`]) into every
//! request's extensions and hands requests to the `api` router.
//! May call: `api` (the router), `auth` (the `Peer` type), `config`.

pub mod unix;

use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

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
