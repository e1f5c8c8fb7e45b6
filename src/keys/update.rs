//! Updates: from a plan (`plan.rs`) to token writes that are either all visible or none,
//! at the token's own cost (see `meta.rs` for the layout).
//!
//! What an update writes on the request path:
//! - description/roles (with no label change): the record, once (a C_SetAttributeValue on
//!   the metadata object's label; a C_CreateObject if the key has no record yet or the
//!   token refuses long labels). One write: atomic by itself.
//! - a change of one object only (the label and/or usage flags, dates, the one-way flags
//!   of a secret key; a flag that lives on one object of a pair), and nothing else: that
//!   object, in one C_SetAttributeValue. The record's `updated_at` follows in the
//!   background ([`MetaSlot::dirty`]).
//! - any other change of key objects (two objects of a pair, or objects with
//!   description/roles): first the new record with its markers (`relabel` = the new label,
//!   `attrs` = the other attributes each kind of object takes), which commits the update,
//!   then one C_SetAttributeValue per object: all at once, each on its own session, where
//!   a spare HSM turn allows ([`write_objects`]); in order, the object with a one-way
//!   attribute (CKA_SENSITIVE, CKA_EXTRACTABLE) last, where one is set. A crash after the record is rolled forward at
//!   the next scan (`settle.rs`); a failed object write is undone at once (the objects set
//!   back, the old record written again). The worker later clears the markers.
//!
//! Nothing is destroyed and nothing is searched on the request path: superseded objects go
//! to the store's background worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::entry::{Entry, Group, MetaSlot};
use super::meta::{self, Layout, MetaRecord};
use super::model::Kid;
use super::plan::{ObjectWrite, Plan};
use super::{hsm_error, KeyError};
use crate::hsm::{Hsm, HsmError, HsmErrorKind, KeyAttr, ObjectRef};

/// Where a record write went.
pub(super) struct Written {
    /// The key's metadata now.
    pub(super) slot: MetaSlot,
    /// Objects that no longer hold the key's record.
    pub(super) superseded: Vec<ObjectRef>,
}

/// Writes `record` (whose `seq` the caller has set above every object's). Where the token
/// takes a label that long, the record goes into a v2 object's label: the key's spare
/// (never the object holding the newest record, so a torn write loses nothing), or a new
/// object that becomes the next write's target while the current one becomes the spare.
/// Otherwise it goes into the value of a new object, and the key's old objects are
/// superseded. `limit` is the shortest record label the token refused so far. An `Err`
/// means nothing was written.
pub(super) fn write_record(
    hsm: &Hsm,
    kid: &Kid,
    slot: Option<&MetaSlot>,
    record: &MetaRecord,
    limit: &AtomicUsize,
) -> Result<Written, HsmError> {
    let label = meta::record_label(record);
    let fits = label.len() < limit.load(Ordering::Relaxed);
    let refused = |e: &HsmError| matches!(e.kind, HsmErrorKind::Refused | HsmErrorKind::ReadOnly);
    let note_limit = |e: &HsmError| {
        let _ = limit.fetch_min(label.len(), Ordering::Relaxed);
        tracing::info!(%kid, bytes = label.len(), error = %e,
            "the token refuses metadata labels this long; such records go to CKA_VALUE");
    };
    // The current object stays as the spare if its record is in its label.
    let keeps = slot
        .filter(|s| s.in_label && s.layout == Layout::V2)
        .and_then(|s| s.object);
    let written = |object, in_label, spare| MetaSlot {
        object: Some(object),
        spare,
        layout: Layout::V2,
        in_label,
        record: record.clone(),
        dirty: false,
    };
    if let (Some(target), true) = (slot.and_then(|s| s.spare), fits) {
        match hsm.set_label(target, &label) {
            Ok(()) => {
                return Ok(Written {
                    slot: written(target, true, keeps),
                    superseded: Vec::new(),
                })
            }
            Err(e) if refused(&e) => note_limit(&e),
            Err(e) => return Err(e),
        }
    }
    let value = record.to_bytes();
    if label.len() < limit.load(Ordering::Relaxed) {
        match hsm.create_data(&label, meta::APPLICATION, &value) {
            Ok(o) => {
                // A current object that cannot be a spare (v1, or its record in its value)
                // is superseded.
                let superseded = match keeps {
                    Some(_) => Vec::new(),
                    None => slot.and_then(|s| s.object).into_iter().collect(),
                };
                return Ok(Written {
                    slot: written(o, true, keeps),
                    superseded,
                });
            }
            Err(e) if refused(&e) => note_limit(&e),
            Err(e) => return Err(e),
        }
    }
    let object = hsm.create_data(&meta::object_label(kid), meta::APPLICATION, &value)?;
    Ok(Written {
        slot: written(object, false, None),
        superseded: slot
            .into_iter()
            .flat_map(|s| s.object.into_iter().chain(s.spare))
            .collect(),
    })
}

/// What carrying out a plan did.
pub(super) struct Applied {
    /// `Ok` when the whole update is in the token.
    pub result: Result<(), KeyError>,
    /// The key as the token now holds it (`Ok(None)`: it is gone).
    pub entry: Result<Option<Entry>, HsmError>,
    /// Metadata objects the update superseded, for the worker to destroy.
    pub superseded: Vec<ObjectRef>,
}

/// Carries out `plan` as the module doc describes. On error every write already made has
/// been undone, or, if undoing failed too, the record's markers stay for the next start
/// to finish.
pub(super) fn apply(
    hsm: &Hsm,
    kid: &Kid,
    current: &Entry,
    plan: &Plan,
    limit: &AtomicUsize,
    turns: &Arc<Semaphore>,
) -> Applied {
    let mut superseded = Vec::new();
    let old = current.meta.as_deref();
    let next_seq = old.map_or(0, |m| m.record.seq) + 1;
    // After a failure the token is the truth: read back the key's objects, including a
    // record object this update made.
    let failed = |e: HsmError, superseded: Vec<ObjectRef>, made: Option<ObjectRef>| Applied {
        result: Err(hsm_error(kid, e)),
        entry: reread(hsm, kid, current, made).map(|e| e.map(|e| keep_dirty(kid, current, e))),
        superseded,
    };
    let marked = old.is_some_and(|m| m.record.relabel.is_some() || m.record.attrs.is_some());
    let slot = if plan.writes.is_empty() {
        // The record alone: one write.
        let mut record = plan.record.clone();
        record.seq = next_seq;
        match write_record(hsm, kid, old, &record, limit) {
            Ok(w) => {
                superseded.extend(w.superseded);
                Some(w.slot)
            }
            Err(e) => return failed(e, superseded, None),
        }
    } else if plan.writes.len() == 1 && !plan.meta_changes && !marked {
        // One object, one call: atomic by itself; `updated_at` reaches the token in the
        // background. (Not while the token's record still names an earlier change: a
        // crash would roll that one forward over this one.)
        let w = &plan.writes[0];
        if let Err(e) = hsm.set_attributes(w.handle, &w.attrs) {
            return failed(e, superseded, None);
        }
        let mut record = plan.record.clone();
        record.seq = next_seq - 1;
        Some(MetaSlot {
            object: old.and_then(|m| m.object),
            spare: old.and_then(|m| m.spare),
            layout: old.map_or(Layout::V2, |m| m.layout),
            in_label: old.is_some_and(|m| m.in_label),
            record,
            dirty: true,
        })
    } else {
        // The record with its markers commits the change; then each object.
        let mut record = plan.record.clone();
        record.seq = next_seq;
        let relabels = plan
            .writes
            .iter()
            .any(|w| w.attrs.iter().any(|a| matches!(a, KeyAttr::Label(_))));
        if relabels {
            record.relabel = plan.new_label.as_ref().map(hex::encode);
        }
        record.attrs = plan.attrs_marker();
        let mut slot = match write_record(hsm, kid, old, &record, limit) {
            Ok(w) => {
                superseded.extend(w.superseded);
                w.slot
            }
            Err(e) => return failed(e, superseded, None),
        };
        if let Err((e, done)) = write_objects(hsm, &plan.writes, turns) {
            let keep = undo(hsm, kid, &done, old, &slot, limit, &mut superseded);
            return failed(e, superseded, keep);
        }
        slot.dirty = true;
        Some(slot)
    };
    let mut objects = current.objects.clone();
    for w in &plan.writes {
        if let Some(o) = objects.iter_mut().find(|o| o.handle == w.handle) {
            for a in &w.attrs {
                a.apply_to(o);
            }
        }
    }
    let mut slot = slot.or_else(|| old.cloned());
    if let Some(s) = slot.as_mut().filter(|s| s.in_label && s.spare.is_none()) {
        // The worker gives the record its spare, so the next write is in place.
        s.dirty = true;
    }
    Applied {
        result: Ok(()),
        entry: Ok(Entry::assemble(kid, objects, slot.map(Box::new), None)),
        superseded,
    }
}

/// Writes the objects of a change the record already commits (a crash from here on is
/// rolled forward, whatever subset of the objects it left written). Where none of the
/// writes sets a one-way attribute, they run at once, each on a session of its own, so a
/// pair's label change waits for one object write after the record, not two: every object
/// after the first for which one of the store's `turns` is free goes to a helper on the
/// runtime's blocking pool, holding that turn; the rest are written here. Where one does,
/// they go one after another in the plan's order (that one last). Either way writing stops
/// at the first failure here. On failure: the first error, and the writes that may have
/// been made (in plan order), for [`undo`].
fn write_objects<'p>(
    hsm: &Hsm,
    writes: &'p [ObjectWrite],
    turns: &Arc<Semaphore>,
) -> Result<(), (HsmError, Vec<&'p ObjectWrite>)> {
    let Some(runtime) = crate::blocking::pool() else {
        return write_in_order(hsm, writes);
    };
    if writes.len() < 2 || writes.iter().any(ObjectWrite::one_way) {
        return write_in_order(hsm, writes);
    }
    // Per write: `None` not made, `Some(Ok(r))` its answer, `Some(Err(_))` a helper that
    // did not answer (it panicked): it may have written its object, so it counts as made
    // (undo sets it back) and as failed.
    let mut answers: Vec<Option<Result<Result<(), HsmError>, HsmError>>> =
        writes.iter().map(|_| None).collect();
    let mut helpers = Vec::new();
    for (i, w) in writes.iter().enumerate().skip(1) {
        let Ok(turn) = turns.clone().try_acquire_owned() else {
            continue;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (hsm, handle, attrs) = (hsm.clone(), w.handle, w.attrs.clone());
        // Its answer comes through the channel; the task itself is not awaited.
        drop(runtime.spawn_blocking(move || {
            let _turn = turn;
            let _ = tx.send(hsm.set_attributes(handle, &attrs));
        }));
        helpers.push((i, rx));
    }
    for (i, w) in writes.iter().enumerate() {
        let mine = !helpers.iter().any(|(h, _)| *h == i);
        let failed = answers.iter().flatten().any(|a| !matches!(a, Ok(Ok(()))));
        if mine && !failed {
            answers[i] = Some(Ok(hsm.set_attributes(w.handle, &w.attrs)));
        }
    }
    for (i, rx) in helpers {
        answers[i] = Some(rx.recv().map_err(|_| {
            HsmError::internal(
                "C_SetAttributeValue",
                "an object write on the blocking pool did not answer",
            )
        }));
    }
    let mut error = None;
    let mut done = Vec::new();
    for (w, a) in writes.iter().zip(answers) {
        match a {
            None => {}
            Some(Ok(Ok(()))) => done.push(w),
            Some(Ok(Err(e))) => error = error.or(Some(e)),
            Some(Err(e)) => {
                done.push(w);
                error = error.or(Some(e));
            }
        }
    }
    match error {
        None => Ok(()),
        Some(e) => Err((e, done)),
    }
}

/// [`write_objects`] one at a time, stopping at the first failure.
fn write_in_order<'p>(
    hsm: &Hsm,
    writes: &'p [ObjectWrite],
) -> Result<(), (HsmError, Vec<&'p ObjectWrite>)> {
    for (i, w) in writes.iter().enumerate() {
        if let Err(e) = hsm.set_attributes(w.handle, &w.attrs) {
            return Err((e, writes[..i].iter().collect()));
        }
    }
    Ok(())
}

/// Sets the `done` objects back to what they held and writes the record from before the
/// update again (without markers). Logs and leaves the markers in place if the token
/// refuses: the key then reads inconsistent and the next start rolls the change forward.
/// Returns the record object the key keeps (a key that had no record gets none: the
/// object made for the update is cleared and queued for destruction).
fn undo(
    hsm: &Hsm,
    kid: &Kid,
    done: &[&ObjectWrite],
    old: Option<&MetaSlot>,
    written: &MetaSlot,
    limit: &AtomicUsize,
    superseded: &mut Vec<ObjectRef>,
) -> Option<ObjectRef> {
    for w in done.iter().rev() {
        if let Err(e) = hsm.set_attributes(w.handle, &w.undo) {
            tracing::error!(%kid, object = w.kind, error = %e,
                "could not restore an object after a failed update; the key stays blocked \
                 until the next start completes the change");
            return written.object;
        }
    }
    let mut record = old
        .map(|m| m.record.clone())
        .unwrap_or_else(|| MetaRecord::empty(kid));
    record.seq = written.record.seq + 1;
    record.relabel = None;
    record.attrs = None;
    match write_record(hsm, kid, Some(written), &record, limit) {
        Ok(w) if old.is_none() => {
            // The older object (with the markers) goes before the cleared one: were the
            // cleared one destroyed first, a crash could leave the markers as the newest.
            superseded.extend(w.superseded);
            superseded.extend(w.slot.spare);
            superseded.extend(w.slot.object);
            None
        }
        Ok(w) => {
            superseded.extend(w.superseded);
            w.slot.object
        }
        Err(e) => {
            tracing::error!(%kid, error = %e,
                "objects restored but the record could not be; the next start completes the \
                 change");
            written.object
        }
    }
}

/// Reads the key's objects and metadata back from the token by handle (no search), after a
/// failed write, so the index mirrors what the token holds. `None` if the key is gone.
pub(super) fn reread(
    hsm: &Hsm,
    kid: &Kid,
    current: &Entry,
    made: Option<ObjectRef>,
) -> Result<Option<Entry>, HsmError> {
    let apps = [meta::APPLICATION, meta::APPLICATION_V1];
    let mut objects = Vec::with_capacity(current.objects.len());
    for o in &current.objects {
        match hsm.read(o.handle, &apps) {
            Ok(fresh) => objects.push(fresh),
            Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
            Err(e) => return Err(e),
        }
    }
    // The metadata objects the key may have now: the one it had, and the one made since.
    let mut metas = Vec::new();
    let mut known: Vec<ObjectRef> = Vec::new();
    let candidates = current
        .meta
        .iter()
        .flat_map(|m| m.object.into_iter().chain(m.spare))
        .chain(made);
    for r in candidates {
        if !known.contains(&r) {
            known.push(r);
        }
    }
    for r in known {
        match hsm.read(r, &apps) {
            Ok(m) => metas.push(m),
            Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Entry::build(kid, Group::new(objects, metas)))
}

/// A record the token has not caught up with yet (a dirty one) survives a re-read that
/// finds the token's older one.
fn keep_dirty(kid: &Kid, current: &Entry, fresh: Entry) -> Entry {
    let Some(dirty) = current.meta.as_ref().filter(|m| m.dirty) else {
        return fresh;
    };
    if fresh
        .meta
        .as_ref()
        .is_some_and(|m| m.record.seq > dirty.record.seq)
    {
        return fresh;
    }
    let stale = fresh.stale.clone();
    match Entry::assemble(kid, fresh.objects.clone(), Some(dirty.clone()), None) {
        Some(mut e) => {
            e.stale = stale;
            e
        }
        None => fresh,
    }
}
