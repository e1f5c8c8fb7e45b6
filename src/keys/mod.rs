//! The key domain: the in-memory index of the token's keys, listing and reading from it,
//! and updates (validation, planning, per-key locks, write order, rollback).
//!
//! Invariants: the token is the truth and the index only mirrors it (built by one scan at
//! startup, refreshed from the token after every write, rescanned on a miss at most once per
//! [`RESCAN_MIN_INTERVAL`]); no request searches the token. Writes to one key are serialized
//! by that key's lock; writes to different keys run in parallel. Every HSM call runs on a
//! blocking thread.
//! May call: `hsm`. Called by: `api`, `daemon`.

mod batch;
mod entry;
pub mod error;
mod health;
mod index;
mod labels;
mod lifecycle;
pub mod meta;
pub mod model;
mod patch;
mod plan;
pub mod public;
mod reserved;
mod scan;
use scan::{Scan, Scanner};
mod settle;
mod update;
mod worker;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use crate::hsm::{
    is_reserved_label, usage_allowed, KeySpec, Usage, UsageFlag, SIGNING_KEY_LABEL,
};
pub use batch::{
    Batch, BatchDone, BatchError, BatchFailure, BatchHooks, Phase, Refusal, Selector, MAX_BATCH,
};
pub use error::KeyError;
pub use health::TokenChange;
pub use lifecycle::NewKeyRequest;
pub use patch::{check_validity, Actor, Field, FieldChange, KeyPatch, UpdateOutcome};
pub use reserved::Reserved;

use crate::hsm::{audit_mark, Hsm, HsmError, HsmErrorKind, ObjectRef};
use crate::sync;
use entry::{Entry, Group, MetaSlot};
use index::Index;
use model::{KeyView, Kid, RoleName};

/// Least time between two rescans triggered by lookups of unknown ids: a client probing
/// random ids must not turn every request into a full token scan.
pub const RESCAN_MIN_INTERVAL: Duration = Duration::from_secs(2);
/// Largest page of a listing.
pub const MAX_PAGE: usize = 1000;
/// How long HSM work waits for its turn before the answer is 503 token_unavailable (the
/// session pool's own checkout limit).
const HSM_WAIT: Duration = Duration::from_secs(30);

/// A listing request, already validated by the caller.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Page size, 1..=[`MAX_PAGE`].
    pub limit: usize,
    /// Start after this kid.
    pub after: Option<Kid>,
    /// Only keys with exactly this label.
    pub label: Option<String>,
    /// Only keys whose label starts with this.
    pub label_prefix: Option<String>,
    /// Only keys whose `not_after` is before this day.
    pub expires_before: Option<time::Date>,
}

/// One page of keys, ordered by kid.
#[derive(Debug, Clone)]
pub struct Page {
    /// The keys.
    pub keys: Vec<KeyView>,
    /// The last kid of this page when more keys follow.
    pub next_after: Option<Kid>,
    /// Keys matching the filters in the whole index.
    pub total: usize,
}

/// The key store: index, locks and the token behind them.
pub struct KeyStore {
    hsm: Hsm,
    roles: RwLock<BTreeSet<RoleName>>,
    /// `keys.unique_labels`.
    unique_labels: std::sync::atomic::AtomicBool,
    /// Labels being given by creates and renames in progress.
    claims: labels::Claims,
    index: RwLock<Index>,
    locks: Mutex<HashMap<Kid, Arc<tokio::sync::Mutex<()>>>>,
    /// Updates hold it shared; a rescan holds it exclusively so it never reads a key
    /// half-way through an update.
    gate: tokio::sync::RwLock<()>,
    /// When a lookup miss last rescanned; `None` makes the next miss rescan.
    last_rescan: Mutex<Option<Instant>>,
    /// The token's login generation the index's handles belong to.
    generation: std::sync::atomic::AtomicU64,
    /// What blocking writes share with the store.
    shared: Arc<Shared>,
    /// Work left for the background worker.
    chores: worker::Chores,
    /// Objects the last scan could not read.
    unreadable: Arc<AtomicUsize>,
    /// hsmkeyd's own objects the opening scan found (signing pairs, audit marks).
    reserved: Reserved,
    /// Turns for HSM work on blocking threads: as many as the token has sessions, plus
    /// one. Waiting for a turn is async, so a token that stops answering holds that many
    /// threads and no more, and the audit trail keeps the rest.
    turns: Arc<tokio::sync::Semaphore>,
    /// The token is gone (see `health.rs`): nothing is served until it is back.
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// The token-signing key's private object, probed to notice a token that goes away.
    probe: Mutex<Option<ObjectRef>>,
    /// The token-signing key's CKA_ID: tells the token served from any other.
    identity: Mutex<Option<Vec<u8>>>,
    /// When the lost token is looked for next.
    recovery: Mutex<health::Recovery>,
    /// Held by the one attempt to get the token back that may run.
    recovering: tokio::sync::Mutex<()>,
    /// Losses and returns not yet taken by the daemon (for the audit trail).
    changes: Mutex<Vec<TokenChange>>,
}

/// The parts of the store the blocking write code needs.
struct Shared {
    /// Shortest metadata label the token refused (records that long go to CKA_VALUE).
    label_limit: AtomicUsize,
}

impl KeyStore {
    /// Scans the token, rolls back interrupted label changes and builds the index.
    /// Blocks: call it before serving, or on a blocking thread.
    /// `max_backlog` bounds the superseded objects waiting for the worker: updates that
    /// would add more wait for it.
    /// `sessions` is the token's session limit, which bounds concurrent HSM work.
    pub fn open(
        hsm: Hsm,
        roles: BTreeSet<RoleName>,
        max_backlog: usize,
        sessions: usize,
    ) -> Result<KeyStore, HsmError> {
        let scanner = Scanner {
            hsm,
            shared: Arc::new(Shared {
                label_limit: AtomicUsize::new(usize::MAX),
            }),
            chores: worker::Chores::new(max_backlog),
            unreadable: Arc::new(AtomicUsize::new(0)),
            ahead: HashMap::new(),
        };
        let Scan {
            generation,
            index,
            reserved,
        } = scanner.scan()?;
        let Scanner {
            hsm,
            shared,
            chores,
            unreadable,
            ahead: _,
        } = scanner;
        let probe = reserved.token_signing.0.first().map(|(p, _)| *p);
        Ok(KeyStore {
            generation: generation.into(),
            hsm,
            roles: RwLock::new(roles),
            unique_labels: std::sync::atomic::AtomicBool::new(false),
            claims: labels::Claims::default(),
            index: RwLock::new(Index::new(index)),
            locks: Mutex::new(HashMap::new()),
            gate: tokio::sync::RwLock::new(()),
            last_rescan: Mutex::new(Some(Instant::now())),
            shared,
            chores,
            unreadable,
            reserved,
            turns: Arc::new(tokio::sync::Semaphore::new(sessions + 1)),
            lost: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            probe: Mutex::new(probe),
            identity: Mutex::new(None),
            recovery: Mutex::new(health::Recovery::default()),
            recovering: tokio::sync::Mutex::new(()),
            changes: Mutex::new(Vec::new()),
        })
    }

    /// Runs HSM work when it gets a turn (see `turns`): inline on a connection's own
    /// thread, else on a blocking thread ([`crate::blocking::run`]); the turn is held until
    /// the work is over, even if the caller stops waiting.
    pub async fn on_token<T, F>(&self, f: F) -> Result<T, KeyError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let turn = tokio::time::timeout(HSM_WAIT, self.turns.clone().acquire_owned())
            .await
            .map_err(|_| {
                KeyError::Unavailable(HsmError::unavailable(
                    "the token",
                    format!(
                        "no HSM call could start within {} s: every session is busy or the \
                         token does not answer",
                        HSM_WAIT.as_secs()
                    ),
                ))
            })?
            .map_err(|_| KeyError::Internal("the HSM turns were closed".into()))?;
        crate::blocking::run(move || {
            let _turn = turn;
            f()
        })
        .await
        .map_err(|e| KeyError::Internal(format!("HSM task failed: {e}")))
    }

    /// hsmkeyd's own objects the opening scan found: the signing pairs' objects (private,
    /// public) and the audit marks.
    pub fn reserved(&self) -> &Reserved {
        &self.reserved
    }

    /// The token behind the store.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// Number of keys in the index.
    pub fn len(&self) -> usize {
        sync::read(&self.index).len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the role names keys may carry (on reload).
    pub fn set_roles(&self, roles: BTreeSet<RoleName>) {
        *sync::write(&self.roles) = roles;
    }

    /// One page of keys.
    pub fn list(&self, q: &ListQuery) -> Result<Page, KeyError> {
        self.ensure_token()?;
        let index = sync::read(&self.index);
        let matches = |e: &Entry| {
            q.label.as_deref().is_none_or(|l| e.label() == l)
                && q.label_prefix
                    .as_deref()
                    .is_none_or(|p| e.label().starts_with(p))
                && q.expires_before
                    .is_none_or(|day| e.not_after().is_some_and(|end| end < day))
        };
        // One label: its keys come from the index's labels (in kid order), not a walk.
        let labelled = q.label.as_deref().map(|l| index.labelled(l));
        let total = match &labelled {
            Some(found) => found.iter().filter(|e| matches(e)).count(),
            None if q.label_prefix.is_none() && q.expires_before.is_none() => index.len(),
            None => index.values().filter(|e| matches(e)).count(),
        };
        let start = match &q.after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        let candidates: Box<dyn Iterator<Item = &Arc<Entry>>> = match labelled {
            Some(found) => Box::new(
                found
                    .into_iter()
                    .filter(|e| q.after.as_ref().is_none_or(|a| e.kid() > a)),
            ),
            None => Box::new(index.range((start, Bound::Unbounded)).map(|(_, e)| e)),
        };
        let mut keys = Vec::new();
        let mut more = false;
        for e in candidates {
            if !matches(e) {
                continue;
            }
            if keys.len() == q.limit {
                more = true;
                break;
            }
            keys.push(e.view());
        }
        let next_after = if more {
            keys.last().map(|k: &KeyView| k.kid.clone())
        } else {
            None
        };
        Ok(Page {
            keys,
            next_after,
            total,
        })
    }

    /// Keys `offset..offset + limit` in kid order, and the number of keys in the index.
    pub fn slice(&self, offset: usize, limit: usize) -> Result<(usize, Vec<KeyView>), KeyError> {
        self.ensure_token()?;
        let index = sync::read(&self.index);
        let keys = index
            .values()
            .skip(offset)
            .take(limit)
            .map(|e| e.view())
            .collect();
        Ok((index.len(), keys))
    }

    /// A key and its public key, encoded as [`public`] describes (`None` for secret keys,
    /// and for an EC private key stored without its public half).
    pub async fn get_with_public(&self, kid: &Kid) -> Result<(KeyView, Option<Vec<u8>>), KeyError> {
        self.refresh_handles().await?;
        let entry = self.entry(kid).await?;
        let Some(source) = public::source(&entry.objects) else {
            return Ok((entry.view(), None));
        };
        let (hsm, handle, algorithm) = (self.hsm.clone(), source.handle, source.algorithm.clone());
        let parts = self
            .on_token(move || hsm.public_parts(handle))
            .await?
            .map_err(|e| hsm_error(kid, e))?;
        Ok((entry.view(), public::encode(algorithm.as_ref(), &parts)))
    }

    /// One key; an unknown id may trigger a (rate-limited) rescan before answering
    /// [`KeyError::NotFound`].
    pub async fn get(&self, kid: &Kid) -> Result<KeyView, KeyError> {
        self.entry(kid).await.map(|e| e.view())
    }

    async fn entry(&self, kid: &Kid) -> Result<Arc<Entry>, KeyError> {
        self.ensure_token()?;
        if let Some(e) = sync::read(&self.index).get(kid) {
            return Ok(e.clone());
        }
        self.rescan_if_due().await?;
        sync::read(&self.index)
            .get(kid)
            .cloned()
            .ok_or_else(|| KeyError::NotFound(kid.clone()))
    }

    async fn rescan_if_due(&self) -> Result<(), KeyError> {
        {
            let mut last = sync::lock(&self.last_rescan);
            if last.is_some_and(|t| t.elapsed() < RESCAN_MIN_INTERVAL) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        self.rescan("a lookup miss").await
    }

    /// Rebuilds the index from one scan, with no update running.
    async fn rescan(&self, why: &str) -> Result<(), KeyError> {
        let _exclusive = self.gate.write().await;
        self.rescan_held(why).await
    }

    /// [`KeyStore::rescan`] for a caller that holds the gate exclusively. Records the
    /// token has not caught up with yet (dirty ones) are kept.
    async fn rescan_held(&self, why: &str) -> Result<(), KeyError> {
        let ahead = sync::read(&self.index)
            .iter()
            .filter_map(|(kid, e)| {
                let m = e.meta.as_deref().filter(|m| m.dirty)?;
                Some((kid.clone(), m.clone()))
            })
            .collect();
        let scanner = Scanner {
            hsm: self.hsm.clone(),
            shared: self.shared.clone(),
            chores: self.chores.clone(),
            unreadable: self.unreadable.clone(),
            ahead,
        };
        let Scan {
            generation,
            index: fresh,
            reserved,
        } = self
            .on_token(move || scanner.scan())
            .await?
            .map_err(KeyError::Unavailable)?;
        self.judge_scan(&reserved.token_signing.0)?;
        tracing::info!(keys = fresh.len(), reason = why, "index rebuilt");
        *sync::write(&self.index) = Index::new(fresh);
        self.generation
            .store(generation, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Rescans when the token logged in again since the index was built: its object
    /// handles may have been renumbered.
    async fn refresh_handles(&self) -> Result<(), KeyError> {
        let now = self.hsm.login_generation();
        if now != self.generation.load(std::sync::atomic::Ordering::SeqCst) {
            self.rescan("the token logged in again; object handles may have changed")
                .await?;
        }
        Ok(())
    }

    /// Takes the write lock of `kid`. The lock map holds only locks in use or waited
    /// for: the last holder removes its entry (see [`KeyLock`]), so the map does not grow
    /// with every key ever written.
    async fn key_lock(&self, kid: &Kid) -> KeyLock<'_> {
        let lock = sync::lock(&self.locks)
            .entry(kid.clone())
            .or_default()
            .clone();
        KeyLock {
            locks: &self.locks,
            kid: kid.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Sizes of the store's own per-key tables (for `GET /v1/status`): write locks in use
    /// or waited for, labels claimed by writes in progress. Both go back to 0 when no
    /// write runs.
    pub fn tables(&self) -> (usize, usize) {
        (sync::lock(&self.locks).len(), self.claims.len())
    }

    /// Applies `patch` to the key `kid` on behalf of `actor`: all of it, or nothing. With
    /// `dry_run`, every check runs and the answer is the key as it would be; nothing is
    /// written and the hooks do not run.
    ///
    /// `before_write` runs once the changes are known and just before the first token
    /// write, under the key's lock (not at all when nothing changes); if it fails, nothing
    /// is written and the update answers [`KeyError::NotRecorded`]. `after_write` runs
    /// right after the token writes, with their outcome, still under the lock. Both run on
    /// the blocking thread that makes the writes.
    pub async fn update<F, G>(
        &self,
        kid: &Kid,
        patch: KeyPatch,
        actor: &Actor,
        dry_run: bool,
        before_write: F,
        after_write: G,
    ) -> Result<UpdateOutcome, KeyError>
    where
        F: FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static,
        G: FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static,
    {
        // Validation that needs no key comes first, so bad input never waits on a lock.
        patch.check(&sync::read(&self.roles))?;
        self.chores.room().await;
        // Held to the end: the key's lock and the gate.
        let locked = self.lock_key(kid).await?;
        let current = locked.current.clone();
        let plan = plan::plan(kid, &current, &patch, actor)?;
        let _claim = self.claim_label(kid, patch.label.as_ref())?;
        if dry_run {
            let key = plan::preview(kid, &current, &plan)
                .ok_or_else(|| KeyError::Internal(format!("no preview of key {kid}")))?;
            return Ok(UpdateOutcome {
                key,
                changes: plan.changes,
            });
        }
        if plan.is_empty() {
            return Ok(UpdateOutcome {
                key: current.view(),
                changes: Vec::new(),
            });
        }
        self.write_plan(kid, current, plan, before_write, after_write)
            .await
    }

    /// The key `kid` under its write lock and the store's gate (shared), as the index has
    /// it once both are held: it may have changed while we waited. 404 for an unknown kid.
    async fn lock_key(&self, kid: &Kid) -> Result<Locked<'_>, KeyError> {
        self.refresh_handles().await?;
        let _ = self.entry(kid).await?;
        let gate = self.gate.read().await;
        let key = self.key_lock(kid).await;
        // The module may have been re-initialized (or logged in again) while we waited:
        // the index's handles would then name other objects.
        self.ensure_token()?;
        if self.hsm.login_generation() != self.generation() {
            return Err(KeyError::Unavailable(HsmError::unavailable(
                "the token",
                "the token was logged in again while this request waited; retry",
            )));
        }
        let current = sync::read(&self.index)
            .get(kid)
            .cloned()
            .ok_or_else(|| KeyError::NotFound(kid.clone()))?;
        Ok(Locked {
            _gate: gate,
            _key: key,
            current,
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A key held for writing: see [`KeyStore::lock_key`].
struct Locked<'a> {
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
    _key: KeyLock<'a>,
    current: Arc<Entry>,
}

/// A key's write lock, held; on drop the lock is released and, if nobody else holds or
/// waits for it, its entry leaves the map. (Everyone takes a clone of the entry under the
/// map's mutex, so a count of one there means no one else has it.)
struct KeyLock<'a> {
    locks: &'a Mutex<HashMap<Kid, Arc<tokio::sync::Mutex<()>>>>,
    kid: Kid,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = sync::lock(self.locks);
        if locks
            .get(&self.kid)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            let _ = locks.remove(&self.kid);
        }
    }
}

/// Maps an HSM failure during a key operation to the domain error.
fn hsm_error(kid: &Kid, e: HsmError) -> KeyError {
    match e.kind {
        HsmErrorKind::ReadOnly | HsmErrorKind::Refused => KeyError::HsmRefused {
            kid: kid.clone(),
            source: e,
        },
        HsmErrorKind::ObjectGone => KeyError::Inconsistent {
            kid: kid.clone(),
            reason: format!(
                "its objects changed in the token outside hsmkeyd ({e}); retry to use the \
                 refreshed index"
            ),
        },
        HsmErrorKind::Unavailable => KeyError::Unavailable(e),
        HsmErrorKind::Internal => KeyError::Internal(e.to_string()),
    }
}
