//! Bringing a key's record to rest: the worker's write of a dirty record (and its spare),
//! and the scan's repair of a change a crash interrupted (v2: rolled forward from its
//! `relabel` and `attrs` markers; v1: rolled back from its `pending` labels).

use std::sync::atomic::AtomicUsize;

use super::entry::{kind_name, Entry, Group, MetaSlot};
use super::meta::{self, Layout};
use super::model::Kid;
use super::update::write_record;
use crate::hsm::{Hsm, HsmError, KeyAttr, ObjectRef};

/// Writes a dirty record to the token (the worker's job): `updated_at` of a label change,
/// or a `relabel` that is complete; and gives a key whose record lives in a label its
/// spare, so that its next write on the request path is in place. Returns the key's new
/// slot and what it superseded.
pub(super) fn flush(
    hsm: &Hsm,
    kid: &Kid,
    slot: &MetaSlot,
    limit: &AtomicUsize,
) -> Result<(MetaSlot, Vec<ObjectRef>), HsmError> {
    let mut record = slot.record.clone();
    record.seq += 1;
    record.relabel = None;
    record.attrs = None;
    record.pending = None;
    let mut w = write_record(hsm, kid, Some(slot), &record, limit)?;
    if w.slot.in_label && w.slot.spare.is_none() {
        let label = meta::record_label(&w.slot.record);
        match hsm.create_data(&label, meta::APPLICATION, &w.slot.record.to_bytes()) {
            Ok(spare) => w.slot.spare = Some(spare),
            Err(e) => tracing::debug!(%kid, error = %e, "no spare record object made"),
        }
    }
    Ok((w.slot, w.superseded))
}

/// Brings a key to a settled state at scan time: an interrupted v2 label change (a
/// `relabel` record) is rolled forward, an interrupted v1 change (`pending`) rolled back;
/// v1 records are marked for rewriting as v2. Superseded generations stay in
/// [`Entry::stale`] for the worker. Returns the entry as the token now holds it. `mine`:
/// the index holds this key's record ahead of the token (a rescan), so a marker is of a
/// change the daemon finished, not one a crash interrupted.
pub(super) fn settle(
    hsm: &Hsm,
    kid: &Kid,
    group: Group,
    limit: &AtomicUsize,
    mine: bool,
) -> Option<Entry> {
    if let Some(fate) = super::lifecycle::settle_lifecycle(hsm, kid, &group) {
        return fate;
    }
    let mut entry = Entry::build(kid, group)?;
    let Some(mut slot) = entry.meta.clone() else {
        return Some(entry);
    };
    let mut objects = entry.objects.clone();
    // Each object's writes: (index, attributes), one C_SetAttributeValue each.
    let mut target: Vec<(usize, Vec<KeyAttr>)> = Vec::new();
    let direction = if slot.record.relabel.is_some() || slot.record.attrs.is_some() {
        if let Some(new) = slot.record.relabel_bytes() {
            for (i, o) in objects.iter().enumerate() {
                if o.label != new {
                    target.push((i, vec![KeyAttr::Label(new.clone())]));
                }
            }
        }
        if let Some(marker) = &slot.record.attrs {
            let Some(missing) = super::entry::attrs_missing(&objects, marker) else {
                tracing::error!(%kid, "an interrupted attribute change names attributes \
                    this daemon cannot write; the key stays inconsistent");
                return Some(entry);
            };
            for (i, attrs) in missing {
                match target.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, t)) => t.extend(attrs),
                    None => target.push((i, attrs)),
                }
            }
        }
        "completed a change"
    } else if let Some(pending) = &slot.record.pending {
        let mut old = pending.old_labels.clone();
        for (i, o) in objects.iter().enumerate() {
            if let Some(pos) = old.iter().position(|l| l.kind == kind_name(o.kind)) {
                let label = hex::decode(&old.remove(pos).label_hex).unwrap_or_default();
                if o.label != label {
                    target.push((i, vec![KeyAttr::Label(label)]));
                }
            }
        }
        "rolled back a label change"
    } else {
        if slot.layout == Layout::V1 {
            slot.dirty = true;
            entry.meta = Some(slot);
        }
        return Some(entry);
    };
    // One-way attributes last, as the update wrote them.
    target.sort_by_key(|(_, attrs)| attrs.iter().any(KeyAttr::is_one_way));
    for (i, attrs) in target {
        match hsm.set_attributes(objects[i].handle, &attrs) {
            Ok(()) => {
                for a in &attrs {
                    a.apply_to(&mut objects[i]);
                }
            }
            Err(e) => {
                tracing::error!(%kid, error = %e, "finishing an interrupted change failed");
                return Some(entry);
            }
        }
    }
    match flush(hsm, kid, &slot, limit) {
        Ok((fresh, superseded)) => {
            if mine {
                tracing::debug!(%kid, "cleared the marker of a finished change");
            } else {
                tracing::warn!(%kid, "{direction} interrupted by a crash");
            }
            *slot = fresh;
            entry.stale.extend(superseded);
        }
        Err(e) => {
            tracing::error!(%kid, error = %e, "clearing an interrupted change failed");
            return Some(entry);
        }
    }
    let stale = std::mem::take(&mut entry.stale);
    let mut settled = Entry::assemble(kid, objects, Some(slot), None)?;
    settled.stale = stale;
    Some(settled)
}
