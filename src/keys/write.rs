//! Carrying out a planned update of one key under its lock, for a single update and for each
//! key of a batch: the token writes on a blocking thread between the caller's two hooks,
//! then the index (and the worker's queues) brought in line with what the token holds.

use std::sync::Arc;

use super::entry::Entry;
use super::model::Kid;
use super::{hsm_error, update, FieldChange, KeyError, KeyStore, UpdateOutcome};
use crate::sync;

impl KeyStore {
    /// Carries out `plan` on `current` (the key held under its lock by the caller) on a
    /// blocking thread, between the two hooks of [`KeyStore::update`], and puts the result
    /// into the index.
    pub(super) async fn write_plan<F, G>(
        &self,
        kid: &Kid,
        current: Arc<Entry>,
        plan: super::plan::Plan,
        before_write: F,
        after_write: G,
    ) -> Result<UpdateOutcome, KeyError>
    where
        F: FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static,
        G: FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static,
    {
        let (hsm, kid2, store) = (self.hsm.clone(), kid.clone(), self.shared.clone());
        let turns = self.turns.clone();
        let (applied, changes) = self
            .on_token(move || {
                before_write(&plan.changes).map_err(KeyError::NotRecorded)?;
                let applied =
                    update::apply(&hsm, &kid2, &current, &plan, &store.label_limit, &turns);
                after_write(match &applied.result {
                    Ok(()) => Ok(&plan.changes),
                    Err(e) => Err(e),
                });
                Ok((applied, plan.changes))
            })
            .await??;
        self.install(kid, applied, changes)
    }

    /// Puts what [`update::apply`] left in the token into the index (and the worker's
    /// queues), under the key's lock; the outcome of the update it carried out.
    fn install(
        &self,
        kid: &Kid,
        applied: update::Applied,
        changes: Vec<FieldChange>,
    ) -> Result<UpdateOutcome, KeyError> {
        let result = applied.result;
        match applied.entry {
            Ok(Some(mut entry)) => {
                let stale = std::mem::take(&mut entry.stale);
                self.chores.superseded(self.generation(), kid, stale);
                if entry.meta.as_ref().is_some_and(|m| m.dirty) {
                    self.chores.dirty(kid);
                }
                let view = entry.view();
                sync::write(&self.index).insert(kid.clone(), Arc::new(entry));
                // Queued once the index no longer names them.
                self.chores
                    .superseded(self.generation(), kid, applied.superseded);
                result.map(|()| UpdateOutcome { key: view, changes })
            }
            Ok(None) => {
                let _ = sync::write(&self.index).remove(kid);
                self.chores
                    .superseded(self.generation(), kid, applied.superseded);
                result.and(Err(KeyError::NotFound(kid.clone())))
            }
            Err(e) => {
                // The token did not answer the re-read: force a rescan on the next miss.
                *sync::lock(&self.last_rescan) = None;
                result.and(Err(hsm_error(kid, e)))
            }
        }
    }
}
