//! Batch updates: one patch (any field of a single update but the label) for up to
//! [`MAX_BATCH`] keys, checked as a whole before anything is written.
//!
//! The order: the selection is resolved from the index; every selected key is locked (in
//! kid order, under the store's gate, so two batches cannot deadlock) and checked as a
//! single update checks it ([`update::plan`]: roles, `If-Match`, state, modifiability,
//! and whatever else the planner refuses), and the caller's scope is asked per key. One
//! failure and nothing is written. Then the writes run in parallel across keys, at most
//! as many at once as the token has sessions, each as a single update writes (its own
//! hooks, its own undo). When one fails, no further key starts, and every key already
//! changed is set back by the inverse update ([`BatchHooks::inverse`]), recorded as a
//! rollback. Each key's writes are atomic as a single update's are, so a crash leaves each
//! key wholly before or wholly after; the batch as a whole is not (the per-key intent
//! entries, with the batch id, say which keys were reached).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::entry::Entry;
use super::model::{Kid, RoleName};
use super::patch::{Actor, FieldChange, KeyPatch, UpdateOutcome};
use super::plan::{self, Plan};
use super::{KeyError, KeyStore};
use crate::sync;

/// Most keys one batch may change.
pub const MAX_BATCH: usize = 1000;

/// Which keys a batch changes.
#[derive(Debug, Clone)]
pub enum Selector {
    /// These keys (each must exist).
    Kids(BTreeSet<Kid>),
    /// Every key whose label starts with this.
    LabelPrefix(String),
    /// Every key carrying this role.
    Role(RoleName),
}

impl Selector {
    fn matches(&self, key: &Entry) -> bool {
        match self {
            Selector::Kids(kids) => kids.contains(key.kid()),
            Selector::LabelPrefix(p) => key.label().starts_with(p.as_str()),
            Selector::Role(r) => key.roles().contains(r),
        }
    }
}

/// A batch update, validated by the caller (the patch names no label).
#[derive(Debug, Clone)]
pub struct Batch {
    /// The keys.
    pub select: Selector,
    /// What to change on each (its own `if_match` is ignored: see `if_match`).
    pub patch: KeyPatch,
    /// The etag each named key must have.
    pub if_match: BTreeMap<Kid, String>,
    /// Check everything, write nothing.
    pub dry_run: bool,
}

/// Whether a key's writes carry out the batch or set it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The batch's own change.
    Write,
    /// Setting a key back after another key's write failed.
    Rollback,
}

/// What the caller adds to a batch: its scope check and the audit side of each key.
pub trait BatchHooks: Send + Sync + 'static {
    /// Whether the caller's scopes let it update `kid`.
    fn permitted(&self, kid: &Kid) -> bool;
    /// Runs before the first token write to `kid` (the intent entry); an error stops that
    /// key before anything is written to it, and fails the batch.
    fn before_write(&self, kid: &Kid, phase: Phase, changes: &[FieldChange]) -> Result<(), String>;
    /// Runs right after the token writes to `kid`, with their outcome.
    fn after_write(&self, kid: &Kid, phase: Phase, outcome: Result<&[FieldChange], &KeyError>);
    /// The patch that sets back what `changes` changed; `None` if there is none.
    fn inverse(&self, changes: &[FieldChange]) -> Option<KeyPatch>;
}

/// Why a key failed the checks.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The caller's scopes do not cover it.
    NotPermitted,
    /// As a single update of the key would be refused.
    Key(KeyError),
}

/// A batch that was carried out (or, for a dry run, would be).
#[derive(Debug, Clone)]
pub struct BatchDone {
    /// Each key with what changed and how it is now (or would be), in kid order.
    pub keys: Vec<(Kid, UpdateOutcome)>,
}

/// A batch whose writes failed part-way.
#[derive(Debug, Clone)]
pub struct BatchFailure {
    /// The keys whose writes failed (each undone as a single update undoes a failed write).
    pub failed: Vec<(Kid, KeyError)>,
    /// The keys that had been changed and were set back.
    pub rolled_back: Vec<Kid>,
    /// Keys left changed, or not as they were: why.
    pub not_rolled_back: Vec<(Kid, KeyError)>,
    /// Keys not written to at all.
    pub not_started: Vec<Kid>,
}

/// Why a batch changed nothing, or not everything.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// The request or its selection is wrong (no key matches, too many, an `if_match`
    /// outside the selection, an unknown role): nothing was checked or written.
    Invalid(KeyError),
    /// The patch is wrong for every key (an unknown role): its field is the patch's.
    InvalidPatch(KeyError),
    /// Keys failed their checks: nothing was written.
    Refused {
        /// Each failing key and why.
        failures: Vec<(Kid, Refusal)>,
        /// How many keys were selected.
        selected: usize,
    },
    /// Writes failed part-way; see [`BatchFailure`].
    Failed(BatchFailure),
    /// The batch could not start (the token is unavailable): nothing was written.
    Unavailable(KeyError),
}

/// The keys of a batch, checked and planned.
struct Planned {
    kid: Kid,
    current: Arc<Entry>,
    plan: Plan,
}

impl KeyStore {
    /// Carries out `batch` for `actor` as the module doc describes.
    pub async fn update_batch(
        self: &Arc<Self>,
        batch: Batch,
        actor: &Actor,
        hooks: Arc<dyn BatchHooks>,
    ) -> Result<BatchDone, BatchError> {
        let Batch {
            select,
            patch,
            if_match,
            dry_run,
        } = batch;
        patch
            .check(&sync::read(&self.roles))
            .map_err(BatchError::InvalidPatch)?;
        self.chores.room().await;
        self.refresh_handles()
            .await
            .map_err(BatchError::Unavailable)?;
        self.ensure_token().map_err(BatchError::Unavailable)?;
        let wanted = self.selected(&select).await?;
        if let Some(k) = if_match.keys().find(|k| !wanted.contains(*k)) {
            return Err(BatchError::Invalid(KeyError::invalid(
                "if_match_outside_selection",
                "if_match",
                format!("if_match names key {k}, which the selection does not include"),
            )));
        }

        // Held to the end: the gate, then every key's lock in kid order.
        let _gate = self.gate.read().await;
        let mut locks = Vec::with_capacity(wanted.len());
        for kid in &wanted {
            locks.push(self.key_lock(kid).await);
        }
        let entries: Vec<(Kid, Option<Arc<Entry>>)> = {
            let index = sync::read(&self.index);
            wanted
                .iter()
                .map(|k| (k.clone(), index.get(k).cloned()))
                .collect()
        };
        let mut failures = Vec::new();
        let mut planned = Vec::new();
        for (kid, current) in entries {
            // The scope first, as a PATCH checks it: a caller learns nothing of keys it may
            // not update, not even whether they exist.
            if !hooks.permitted(&kid) && current.as_ref().is_none_or(|c| select.matches(c)) {
                failures.push((kid, Refusal::NotPermitted));
                continue;
            }
            let Some(current) = current else {
                failures.push((kid.clone(), Refusal::Key(KeyError::NotFound(kid))));
                continue;
            };
            // A key renamed or given other roles while the batch waited is no longer selected.
            if !select.matches(&current) {
                continue;
            }
            let mut p = patch.clone();
            p.if_match = if_match.get(&kid).cloned();
            match plan::plan(&kid, &current, &p, actor) {
                Ok(plan) => planned.push(Planned { kid, current, plan }),
                Err(e) => failures.push((kid, Refusal::Key(e))),
            }
        }
        if !failures.is_empty() {
            return Err(BatchError::Refused {
                selected: failures.len() + planned.len(),
                failures,
            });
        }
        if planned.is_empty() {
            return Err(BatchError::Invalid(nothing_selected()));
        }
        if dry_run {
            return planned
                .into_iter()
                .map(|p| {
                    let key = plan::preview(&p.kid, &p.current, &p.plan).ok_or_else(|| {
                        BatchError::Unavailable(KeyError::Internal(format!(
                            "no preview of key {}",
                            p.kid
                        )))
                    })?;
                    Ok((
                        p.kid,
                        UpdateOutcome {
                            key,
                            changes: p.plan.changes,
                        },
                    ))
                })
                .collect::<Result<_, _>>()
                .map(|keys| BatchDone { keys });
        }
        let done = self.write_all(planned, &hooks).await;
        drop(locks);
        done
    }

    /// The keys `select` names, from the index (an unknown kid may rescan once, as a
    /// lookup does). Kids that stay unknown are kept: the checks report them.
    async fn selected(&self, select: &Selector) -> Result<BTreeSet<Kid>, BatchError> {
        let pick = |index: &BTreeMap<Kid, Arc<Entry>>| -> BTreeSet<Kid> {
            index
                .values()
                .filter(|e| select.matches(e))
                .map(|e| e.kid().clone())
                .collect()
        };
        let found = match select {
            Selector::Kids(kids) => {
                if kids
                    .iter()
                    .any(|k| !sync::read(&self.index).contains_key(k))
                {
                    self.rescan_if_due()
                        .await
                        .map_err(BatchError::Unavailable)?;
                }
                kids.clone()
            }
            _ => pick(&sync::read(&self.index)),
        };
        if found.is_empty() {
            return Err(BatchError::Invalid(nothing_selected()));
        }
        if found.len() > MAX_BATCH {
            return Err(BatchError::Invalid(KeyError::invalid(
                "too_many_keys",
                "select",
                format!(
                    "the selection matches {} keys; a batch changes at most {MAX_BATCH}",
                    found.len()
                ),
            )));
        }
        Ok(found)
    }

    /// The write phase: every planned key, in parallel up to the token's session count;
    /// on the first failure no further key starts and the changed ones are set back.
    async fn write_all(
        self: &Arc<Self>,
        planned: Vec<Planned>,
        hooks: &Arc<dyn BatchHooks>,
    ) -> Result<BatchDone, BatchError> {
        let parallel = self.hsm.sessions().2.max(1);
        let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        let mut done = Vec::new();
        for Planned { kid, current, plan } in planned {
            if plan.is_empty() {
                done.push((
                    kid,
                    UpdateOutcome {
                        key: current.view(),
                        changes: Vec::new(),
                    },
                ));
                continue;
            }
            let (store, hooks, limit, stop) =
                (self.clone(), hooks.clone(), limit.clone(), stop.clone());
            let _ = tasks.spawn(async move {
                let _turn = limit.acquire_owned().await;
                if stop.load(Ordering::SeqCst) {
                    return (kid, current, None);
                }
                let result = store.write_key(&kid, current.clone(), plan, Phase::Write, &hooks);
                let result = result.await;
                if result.is_err() {
                    stop.store(true, Ordering::SeqCst);
                }
                (kid, current, Some(result))
            });
        }
        let mut failure = BatchFailure {
            failed: Vec::new(),
            rolled_back: Vec::new(),
            not_rolled_back: Vec::new(),
            not_started: Vec::new(),
        };
        let mut changed = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (kid, before, result) = joined.map_err(|e| {
                BatchError::Unavailable(KeyError::Internal(format!("batch task failed: {e}")))
            })?;
            match result {
                None => failure.not_started.push(kid),
                Some(Ok(outcome)) => changed.push((kid, before, outcome)),
                Some(Err(e)) => {
                    // The key's own undo ran; the index holds what the token has now.
                    if !self.holds(&kid, &before) {
                        failure.not_rolled_back.push((kid.clone(), e.clone()));
                    }
                    failure.failed.push((kid, e));
                }
            }
        }
        if failure.failed.is_empty() {
            done.extend(changed.into_iter().map(|(k, _, o)| (k, o)));
            done.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(BatchDone { keys: done });
        }
        for (kid, before, outcome) in changed {
            match self.set_back(&kid, &outcome, hooks).await {
                Ok(()) if self.holds(&kid, &before) => failure.rolled_back.push(kid),
                Ok(()) => failure.not_rolled_back.push((
                    kid.clone(),
                    KeyError::Internal(format!("key {kid} differs from before the batch")),
                )),
                Err(e) => failure.not_rolled_back.push((kid, e)),
            }
        }
        for list in [&mut failure.rolled_back, &mut failure.not_started] {
            list.sort();
        }
        failure.failed.sort_by(|a, b| a.0.cmp(&b.0));
        failure.not_rolled_back.sort_by(|a, b| a.0.cmp(&b.0));
        Err(BatchError::Failed(failure))
    }

    /// One key's writes, with the batch's hooks for that key.
    async fn write_key(
        &self,
        kid: &Kid,
        current: Arc<Entry>,
        plan: Plan,
        phase: Phase,
        hooks: &Arc<dyn BatchHooks>,
    ) -> Result<UpdateOutcome, KeyError> {
        let (h1, h2, k1, k2) = (hooks.clone(), hooks.clone(), kid.clone(), kid.clone());
        self.write_plan(
            kid,
            current,
            plan,
            move |changes| h1.before_write(&k1, phase, changes),
            move |outcome| h2.after_write(&k2, phase, outcome),
        )
        .await
    }

    /// Sets `kid` back to what it was before `outcome` (the key's lock is held). The
    /// inverse update is checked as any other, for an actor holding the key's roles: the
    /// batch's caller may have changed them.
    async fn set_back(
        &self,
        kid: &Kid,
        outcome: &UpdateOutcome,
        hooks: &Arc<dyn BatchHooks>,
    ) -> Result<(), KeyError> {
        let inverse = hooks
            .inverse(&outcome.changes)
            .ok_or_else(|| KeyError::Internal(format!("no update sets key {kid} back")))?;
        let current = sync::read(&self.index)
            .get(kid)
            .cloned()
            .ok_or_else(|| KeyError::NotFound(kid.clone()))?;
        let actor = Actor {
            roles: current.roles().to_vec(),
        };
        let plan = plan::plan(kid, &current, &inverse, &actor)?;
        if plan.is_empty() {
            return Ok(());
        }
        self.write_key(kid, current, plan, Phase::Rollback, hooks)
            .await
            .map(|_| ())
    }

    /// Whether the index holds `kid` as `before` had it, but for `updated_at` (a rollback
    /// writes the record again, at its own time).
    fn holds(&self, kid: &Kid, before: &Entry) -> bool {
        let index = sync::read(&self.index);
        let Some(now) = index.get(kid) else {
            return false;
        };
        let (mut a, mut b) = (now.view(), before.view());
        (a.updated_at, b.updated_at) = (None, None);
        (a.etag, b.etag) = (String::new(), String::new());
        serde_json::to_value(&a).ok() == serde_json::to_value(&b).ok()
    }
}

fn nothing_selected() -> KeyError {
    KeyError::invalid(
        "no_keys_selected",
        "select",
        "the selection matches no key; nothing was changed",
    )
}
