//! Updates: from a validated patch to a plan, and from a plan to token writes that are
//! either all visible or none.
//!
//! Write order for a change that touches labels (several objects, no transaction in
//! PKCS#11). Every metadata write creates a new generation of the record and then destroys
//! the previous object (see `meta.rs`), so the token always holds a complete record.
//! 1. the metadata record is written with a `pending` entry holding every object's old
//!    label;
//! 2. CKA_LABEL is set on each object of the key;
//! 3. the metadata record is written with the new description/roles/updated_at and no
//!    `pending`: this single write commits the update.
//!
//! A failure in 2 or 3 sets the labels already changed back and restores the record from
//! before. A crash between 1 and 3 leaves `pending` in the token; the next scan sees it and
//! restores the old labels before serving ([`settle`]), so a half-applied update is never
//! served. Changes of description or roles alone are one record write, atomic by itself.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::entry::{kind_name, Entry, Group};
use super::meta::{self, MetaRecord, OldLabel, Pending};
use super::model::{Description, KeyState, Kid, Label, RoleName};
use super::{hsm_error, KeyError};
use crate::hsm::{Hsm, HsmError, HsmErrorKind, ObjectRef, SIGNING_KEY_LABEL};

/// A validated partial update. `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    /// New label for every object of the key.
    pub label: Option<Label>,
    /// New description; `Some(None)` clears it.
    pub description: Option<Option<Description>>,
    /// New roles (non-empty, duplicates dropped); `Some(None)` clears them.
    pub roles: Option<Option<Vec<RoleName>>>,
    /// The etag the caller expects the key to have (`If-Match`).
    pub if_match: Option<String>,
}

impl KeyPatch {
    /// Whether the patch names no field at all.
    pub fn is_empty(&self) -> bool {
        self.label.is_none() && self.description.is_none() && self.roles.is_none()
    }

    /// Checks that every role is one the configuration defines.
    pub fn check_roles(&self, defined: &BTreeSet<RoleName>) -> Result<(), KeyError> {
        if let Some(Some(roles)) = &self.roles {
            if let Some(r) = roles.iter().find(|r| !defined.contains(*r)) {
                return Err(KeyError::invalid(
                    "unknown_role",
                    "roles",
                    format!(
                        "role {:?} is not defined in the configuration (defined: {})",
                        r.as_str(),
                        defined
                            .iter()
                            .map(RoleName::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Who is updating, as far as the key domain cares.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Roles the caller holds.
    pub roles: Vec<RoleName>,
}

/// One changed field, with its value before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// `label`, `description` or `roles`.
    pub field: &'static str,
    /// Value before.
    pub before: Value,
    /// Value after.
    pub after: Value,
}

/// What an update did.
#[derive(Debug, Clone)]
pub struct UpdateOutcome {
    /// The key as the token now holds it.
    pub key: super::model::KeyView,
    /// What changed; empty when the patch matched the key already.
    pub changes: Vec<FieldChange>,
}

/// The writes an update needs.
pub(super) struct Plan {
    label_writes: Vec<(ObjectRef, Vec<u8>, &'static str)>,
    new_label: Option<Vec<u8>>,
    record: MetaRecord,
    meta_changes: bool,
    pub(super) changes: Vec<FieldChange>,
}

impl Plan {
    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Checks permissions and state, and works out what must be written.
pub(super) fn plan(
    kid: &Kid,
    current: &Entry,
    patch: &KeyPatch,
    actor: &Actor,
) -> Result<Plan, KeyError> {
    let view = &current.view;
    if !view.roles.is_empty() && !view.roles.iter().any(|r| actor.roles.contains(r)) {
        return Err(KeyError::MissingRole {
            kid: kid.clone(),
            roles: view
                .roles
                .iter()
                .map(RoleName::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if let Some(expected) = &patch.if_match {
        if expected != &view.etag {
            return Err(KeyError::PreconditionFailed {
                kid: kid.clone(),
                current: view.etag.clone(),
            });
        }
    }
    let repair = current.labels_differ_only && patch.label.is_some();
    if let (KeyState::Inconsistent(reason), false) = (&view.state, repair) {
        return Err(KeyError::Inconsistent {
            kid: kid.clone(),
            reason: reason.clone(),
        });
    }
    if !view.attributes.modifiable {
        return Err(KeyError::NotModifiable(kid.clone()));
    }

    let mut changes = Vec::new();
    let mut label_writes = Vec::new();
    if patch.label.as_ref().map(Label::as_str) == Some(SIGNING_KEY_LABEL) {
        return Err(KeyError::invalid(
            "invalid_label",
            "label",
            format!("the label {SIGNING_KEY_LABEL} is reserved for hsmkeyd's token-signing key"),
        ));
    }
    if let Some(label) = &patch.label {
        let bytes = label.as_str().as_bytes();
        label_writes = current
            .objects
            .iter()
            .filter(|o| o.label != bytes)
            .map(|o| (o.handle, o.label.clone(), kind_name(o.kind)))
            .collect();
        if !label_writes.is_empty() {
            changes.push(FieldChange {
                field: "label",
                before: json!(view.label),
                after: json!(label.as_str()),
            });
        }
    }
    let old = current
        .meta
        .as_ref()
        .map(|m| m.record.clone())
        .unwrap_or_else(|| MetaRecord::empty(kid));
    let mut record = old.clone();
    if let Some(d) = &patch.description {
        if &record.description != d {
            changes.push(FieldChange {
                field: "description",
                before: json!(record.description.as_ref().map(Description::as_str)),
                after: json!(d.as_ref().map(Description::as_str)),
            });
            record.description = d.clone();
        }
    }
    if let Some(r) = &patch.roles {
        let new: Vec<RoleName> = r.clone().unwrap_or_default();
        let same = new.iter().collect::<BTreeSet<_>>() == record.roles.iter().collect();
        if !same {
            changes.push(FieldChange {
                field: "roles",
                before: json!(record.roles),
                after: json!(new),
            });
            record.roles = new;
        }
    }
    let meta_changes = changes.iter().any(|c| c.field != "label");
    record.updated_at = Some(now_rfc3339());
    record.pending = None;
    Ok(Plan {
        label_writes,
        new_label: patch.label.as_ref().map(|l| l.as_str().as_bytes().to_vec()),
        record,
        meta_changes,
        changes,
    })
}

/// Writes `record` as generation `*seq + 1`: a new metadata object is created, then the
/// previous one (`slot`) destroyed. Tokens may refuse to rewrite CKA_VALUE of a data object
/// in place, and create-then-destroy never leaves the key without a record: if the destroy
/// fails, the older generation is removed at the next scan (the highest `seq` wins).
fn write_meta(
    hsm: &Hsm,
    kid: &Kid,
    slot: Option<ObjectRef>,
    record: &MetaRecord,
    seq: &mut u64,
) -> Result<ObjectRef, HsmError> {
    let mut record = record.clone();
    record.seq = *seq + 1;
    let created = hsm.create_data(
        &meta::object_label(kid),
        meta::APPLICATION,
        &record.to_bytes(),
    )?;
    *seq = record.seq;
    if let Some(old) = slot {
        drop_stale(hsm, kid, old);
    }
    Ok(created)
}

/// Destroys a superseded metadata object; a failure only delays its removal to the next scan.
fn drop_stale(hsm: &Hsm, kid: &Kid, object: ObjectRef) {
    match hsm.destroy(object) {
        Ok(()) => {}
        Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
        Err(e) => tracing::warn!(%kid, error = %e,
            "a superseded metadata object could not be destroyed; the next scan removes it"),
    }
}

/// Carries out `plan`. On error every write already made has been undone, or, if undoing
/// failed too, the `pending` record stays in the token for the next startup to finish.
/// `meta_slot` holds the key's metadata object and follows every generation written.
pub(super) fn apply(
    hsm: &Hsm,
    kid: &Kid,
    current: &Entry,
    plan: &Plan,
    meta_slot: &mut Option<ObjectRef>,
) -> Result<(), KeyError> {
    let fail = |e: HsmError| hsm_error(kid, e);
    let old_record = current.meta.as_ref().map(|m| m.record.clone());
    let mut seq = old_record.as_ref().map_or(0, |r| r.seq);
    if plan.label_writes.is_empty() {
        let r = write_meta(hsm, kid, *meta_slot, &plan.record, &mut seq).map_err(fail)?;
        *meta_slot = Some(r);
        return Ok(());
    }
    debug_assert!(plan.new_label.is_some() || !plan.meta_changes);
    let new_label = plan.new_label.as_deref().unwrap_or_default();
    let mut pending = old_record.clone().unwrap_or_else(|| MetaRecord::empty(kid));
    pending.pending = Some(Pending {
        old_labels: plan
            .label_writes
            .iter()
            .map(|(_, old, kind)| OldLabel {
                kind: kind.to_string(),
                label_hex: hex::encode(old),
            })
            .collect(),
    });
    // 1. Record the intent.
    let slot = write_meta(hsm, kid, *meta_slot, &pending, &mut seq).map_err(fail)?;
    *meta_slot = Some(slot);
    // 2. Relabel every object.
    for (i, (obj, _, _)) in plan.label_writes.iter().enumerate() {
        if let Err(e) = hsm.set_label(*obj, new_label) {
            let done = &plan.label_writes[..i];
            undo(hsm, kid, meta_slot, done, old_record.as_ref(), &mut seq);
            return Err(fail(e));
        }
    }
    // 3. Commit.
    match write_meta(hsm, kid, Some(slot), &plan.record, &mut seq) {
        Ok(r) => {
            *meta_slot = Some(r);
            Ok(())
        }
        Err(e) => {
            undo(
                hsm,
                kid,
                meta_slot,
                &plan.label_writes,
                old_record.as_ref(),
                &mut seq,
            );
            Err(fail(e))
        }
    }
}

/// Sets `done` objects back to their old labels and replaces the pending record by the
/// record from before the update (or removes it if the key had none). Logs and leaves
/// `pending` in place if the token refuses: the next scan rolls it back.
fn undo(
    hsm: &Hsm,
    kid: &Kid,
    meta_slot: &mut Option<ObjectRef>,
    done: &[(ObjectRef, Vec<u8>, &'static str)],
    old_record: Option<&MetaRecord>,
    seq: &mut u64,
) {
    for (obj, old, kind) in done.iter().rev() {
        if let Err(e) = hsm.set_label(*obj, old) {
            tracing::error!(%kid, object = kind, error = %e,
                "could not restore a label after a failed update; the key stays blocked until \
                 the next start rolls it back");
            return;
        }
    }
    let Some(slot) = *meta_slot else { return };
    let restored = match old_record {
        Some(r) => write_meta(hsm, kid, Some(slot), r, seq).map(Some),
        None => hsm.destroy(slot).map(|()| None),
    };
    match restored {
        Ok(r) => *meta_slot = r,
        Err(e) => tracing::error!(%kid, error = %e,
            "labels restored but the pending record could not be cleared; the next start \
             clears it"),
    }
}

/// Reads the key's objects and metadata back from the token (no search: the handles are
/// known), so the index mirrors exactly what was written. `None` if the key is gone.
pub(super) fn reread(
    hsm: &Hsm,
    kid: &Kid,
    current: &Entry,
    meta_slot: Option<ObjectRef>,
) -> Result<Option<Entry>, HsmError> {
    let mut objects = Vec::with_capacity(current.objects.len());
    for o in &current.objects {
        match hsm.read(o.handle, meta::APPLICATION) {
            Ok(fresh) => objects.push(fresh),
            Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
            Err(e) => return Err(e),
        }
    }
    let mut metas = Vec::new();
    if let Some(r) = meta_slot {
        match hsm.read(r, meta::APPLICATION) {
            Ok(m) => metas.push(m),
            Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Entry::build(kid, Group::new(objects, metas)))
}

/// Brings a key's metadata to one settled object at scan time: superseded generations
/// (a crash between creating a record and destroying the one before) are destroyed, and an
/// interrupted label change (a `pending` record) is rolled back: old labels restored, then
/// the record rewritten without `pending`. Returns the group as the token now holds it.
/// Unreadable metadata objects are left alone for [`Entry::build`] to report.
pub(super) fn settle(hsm: &Hsm, kid: &Kid, mut group: Group) -> Group {
    let newest = group
        .metas
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            MetaRecord::from_bytes(kid, m.value.as_deref().unwrap_or_default())
                .ok()
                .map(|r| (i, r))
        })
        .max_by_key(|(_, r)| r.seq);
    let Some((keep, mut record)) = newest else {
        return group;
    };
    let keep_ref = group.metas[keep].handle;
    group.metas.retain(|m| {
        let stale = m.handle != keep_ref
            && MetaRecord::from_bytes(kid, m.value.as_deref().unwrap_or_default()).is_ok();
        if stale {
            drop_stale(hsm, kid, m.handle);
        }
        !stale
    });
    let Some(pending) = record.pending.take() else {
        return group;
    };
    let mut old = pending.old_labels.clone();
    let mut ok = true;
    for o in group.objects.iter_mut() {
        let Some(pos) = old.iter().position(|l| l.kind == kind_name(o.kind)) else {
            continue;
        };
        let label = hex::decode(&old.remove(pos).label_hex).unwrap_or_default();
        if o.label == label {
            continue;
        }
        match hsm.set_label(o.handle, &label) {
            Ok(()) => o.label = label,
            Err(e) => {
                tracing::error!(%kid, error = %e, "rolling back an interrupted label change failed");
                ok = false;
            }
        }
    }
    if !ok {
        return group;
    }
    let mut seq = record.seq;
    match write_meta(hsm, kid, Some(keep_ref), &record, &mut seq) {
        Ok(fresh) => {
            tracing::warn!(%kid, "rolled back a label change interrupted by a crash");
            record.seq = seq;
            if let Some(m) = group.metas.iter_mut().find(|m| m.handle == keep_ref) {
                m.handle = fresh;
                m.value = Some(record.to_bytes());
            }
        }
        Err(e) => tracing::error!(%kid, error = %e, "clearing a pending record failed"),
    }
    group
}
