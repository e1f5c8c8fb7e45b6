//! The key store's background worker: the token writes an update does not wait for.
//! - **Destroying superseded metadata objects** (older generations left by a write that
//!   had to create a new object, v1 records after migration). Never on the request path
//!   (C_DestroyObject grows with the token's size on SoftHSM2). The backlog is bounded:
//!   updates that would grow it past `keys.max_cleanup_backlog` wait for the worker.
//!   Before destroying, the worker reads the object again and checks it is still a
//!   metadata object of that key that is not the key's current one; a re-login (which may
//!   renumber handles) drops the queue, and the next scan finds the objects again.
//! - **Writing dirty records**: the `updated_at` of a label-only change and the clearing of
//!   a completed `relabel`, once the key has been quiet for [`SETTLE_DELAY`] (so a key
//!   under sustained load costs no extra writes), and all of them at shutdown.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::meta::{self, Layout};
use super::model::Kid;
use super::{settle, KeyStore};
use crate::hsm::{HsmErrorKind, ObjectKind, ObjectRef};
use crate::sync;

/// How long a key must go without an update before its dirty record is written: long
/// enough that a busy key is not written twice per update, short enough that the token
/// catches up within a second.
pub const SETTLE_DELAY: Duration = Duration::from_millis(200);

/// Work left for the worker. Cheap to clone.
#[derive(Clone)]
pub(super) struct Chores(Arc<Inner>);

struct Inner {
    max_backlog: usize,
    state: Mutex<State>,
    /// Something was queued.
    wake: Notify,
    /// The destroy backlog shrank.
    room: Notify,
}

#[derive(Default)]
struct State {
    doomed: VecDeque<Doomed>,
    dirty: HashMap<Kid, Instant>,
}

/// A superseded metadata object.
struct Doomed {
    generation: u64,
    kid: Kid,
    object: ObjectRef,
}

/// How far the worker is behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Superseded objects not destroyed yet.
    pub objects: usize,
    /// Keys whose record in the token is behind.
    pub records: usize,
}

impl Chores {
    pub(super) fn new(max_backlog: usize) -> Chores {
        Chores(Arc::new(Inner {
            max_backlog: max_backlog.max(1),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            room: Notify::new(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        sync::lock(&self.0.state)
    }

    /// Queues superseded objects of `kid` (handles of login `generation`).
    pub(super) fn superseded(&self, generation: u64, kid: &Kid, objects: Vec<ObjectRef>) {
        if objects.is_empty() {
            return;
        }
        self.state()
            .doomed
            .extend(objects.into_iter().map(|object| Doomed {
                generation,
                kid: kid.clone(),
                object,
            }));
        self.0.wake.notify_one();
    }

    /// The record of `kid` in the token is behind the index.
    pub(super) fn dirty(&self, kid: &Kid) {
        // No wake-up: the worker looks every SETTLE_DELAY anyway, and an update should
        // not cost a thread switch.
        let _ = self.state().dirty.insert(kid.clone(), Instant::now());
    }

    /// Forgets every queued object (before a rescan, which finds them again). Dirty
    /// records stay: the index is rebuilt from the token, so they are re-marked or gone.
    pub(super) fn forget_all(&self) {
        self.state().doomed.clear();
        self.0.room.notify_waiters();
    }

    /// Waits until the destroy backlog is under its bound.
    pub(super) async fn room(&self) {
        loop {
            let room = self.0.room.notified();
            if self.state().doomed.len() < self.0.max_backlog {
                return;
            }
            room.await;
        }
    }

    /// How far behind the worker is.
    pub(super) fn backlog(&self) -> Backlog {
        let s = self.state();
        Backlog {
            objects: s.doomed.len(),
            records: s.dirty.len(),
        }
    }

    fn next_doomed(&self) -> Option<Doomed> {
        let d = self.state().doomed.pop_front();
        self.0.room.notify_waiters();
        d
    }

    /// Dirty keys quiet for [`SETTLE_DELAY`] (every dirty key when `all`), taken off the list.
    fn quiet(&self, all: bool) -> Vec<Kid> {
        let mut s = self.state();
        let ready: Vec<Kid> = s
            .dirty
            .iter()
            .filter(|(_, at)| all || at.elapsed() >= SETTLE_DELAY)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &ready {
            let _ = s.dirty.remove(k);
        }
        ready
    }
}

impl KeyStore {
    /// How far the background worker is behind.
    pub fn backlog(&self) -> Backlog {
        self.chores.backlog()
    }

    /// Objects the last scan could not read (and so left out).
    pub fn unreadable(&self) -> usize {
        self.unreadable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store's state beyond its keys, for the service status line: the worker's
    /// backlog and the objects the last scan could not read. Empty when all is well.
    pub fn health(&self) -> String {
        let b = self.backlog();
        let unreadable = self.unreadable.load(std::sync::atomic::Ordering::Relaxed);
        let mut parts = Vec::new();
        if self.is_lost() {
            parts.push("TOKEN UNAVAILABLE: hsmkeyd's token-signing key is gone".to_string());
        }
        if b.objects > 0 || b.records > 0 {
            parts.push(format!(
                "cleanup backlog {} objects, {} records",
                b.objects, b.records
            ));
        }
        if unreadable > 0 {
            parts.push(format!("{unreadable} unreadable token objects skipped"));
        }
        parts.join("; ")
    }

    /// Runs the background worker until `stop` turns true, then writes every dirty record
    /// once more (the superseded objects left wait for the next start's scan).
    pub async fn run_worker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let wake = self.chores.0.wake.notified();
            self.work(false).await;
            tokio::select! {
                () = wake => {}
                () = tokio::time::sleep(SETTLE_DELAY) => {}
                _ = stop.wait_for(|v| *v) => break,
            }
        }
        self.work(true).await;
    }

    async fn work(&self, all: bool) {
        while let Some(d) = self.chores.next_doomed() {
            self.destroy(d).await;
        }
        for kid in self.chores.quiet(all) {
            self.flush(&kid).await;
        }
    }

    /// Destroys a superseded object after checking it is still one.
    async fn destroy(&self, d: Doomed) {
        if d.generation != self.generation() {
            // Handles may have been renumbered; the next scan finds the object again.
            return;
        }
        // No key lock: updates never write to a superseded object, so the key's updates
        // need not wait for a destroy (slow on large SoftHSM2 tokens).
        let _shared = self.gate.read().await;
        let in_use = sync::read(&self.index)
            .get(&d.kid)
            .and_then(|e| e.meta.as_ref().map(|m| (m.object, m.spare)))
            .is_some_and(|(o, s)| o == Some(d.object) || s == Some(d.object));
        if in_use {
            return;
        }
        let hsm = self.hsm.clone();
        let kid = d.kid.clone();
        let done = self
            .on_token(move || {
                let o = match hsm.read(d.object, &[meta::APPLICATION, meta::APPLICATION_V1]) {
                    Ok(o) => o,
                    Err(e) if e.kind == HsmErrorKind::ObjectGone => return Ok(()),
                    Err(e) => return Err(e),
                };
                let ours = o.kind == ObjectKind::Data
                    && Layout::of(o.application.as_deref()).is_some()
                    && meta::kid_of_label(&o.label).as_ref() == Some(&kid);
                if !ours {
                    tracing::error!(%kid, "a queued metadata object is no longer one; left alone");
                    return Ok(());
                }
                match hsm.destroy(d.object) {
                    Err(e) if e.kind != HsmErrorKind::ObjectGone => Err(e),
                    _ => Ok(()),
                }
            })
            .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(kid = %d.kid, error = %e,
                "destroying a superseded metadata object failed; the next start retries"),
            Err(e) => tracing::error!(error = %e, "cleanup task failed"),
        }
    }

    /// Writes the dirty record of `kid` to the token.
    async fn flush(&self, kid: &Kid) {
        let _shared = self.gate.read().await;
        let _guard = self.key_lock(kid).await;
        let Some(entry) = sync::read(&self.index).get(kid).cloned() else {
            return;
        };
        let Some(slot) = entry.meta.clone().filter(|m| m.dirty) else {
            return;
        };
        let (hsm, kid2, shared) = (self.hsm.clone(), kid.clone(), self.shared.clone());
        let written = self
            .on_token(move || settle::flush(&hsm, &kid2, &slot, &shared.label_limit))
            .await;
        match written {
            Ok(Ok((fresh, superseded))) => {
                let mut e = (*entry).clone();
                e.meta = Some(Box::new(fresh));
                sync::write(&self.index).insert(kid.clone(), Arc::new(e));
                self.chores.superseded(self.generation(), kid, superseded);
            }
            Ok(Err(e)) => {
                tracing::warn!(%kid, error = %e, "writing a key's record failed; retrying later");
                self.chores.dirty(kid);
            }
            Err(e) => tracing::error!(error = %e, "record task failed"),
        }
    }
}
