//! Update planning: from a validated patch and the key as the index holds it to the
//! [`Plan`] of writes that `update.rs` carries out, with the checks every change of an
//! existing key passes first (roles, `If-Match`, state) and the dry run's preview.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::entry::{kind_name, Entry, MetaSlot};
use super::meta::{Layout, MetaRecord};
use super::model::{Description, KeyState, Kid, Label, RoleName};
use super::KeyError;
use crate::hsm::{is_reserved_label, ObjectRef};

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
    /// What changed.
    pub field: Field,
    /// Value before.
    pub before: Value,
    /// Value after.
    pub after: Value,
}

/// The attributes an update can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// CKA_LABEL of every object of the key.
    Label,
    /// The description in the metadata record.
    Description,
    /// The roles in the metadata record.
    Roles,
    /// The whole key: made (`before` null) or destroyed (`after` null).
    Key,
}

impl Field {
    /// The name in request bodies, `changed` lists and `HSMKEYD_CHANGES`.
    pub fn name(self) -> &'static str {
        match self {
            Field::Label => "label",
            Field::Description => "description",
            Field::Roles => "roles",
            Field::Key => "key",
        }
    }
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
    pub(super) label_writes: Vec<(ObjectRef, Vec<u8>, &'static str)>,
    pub(super) new_label: Option<Vec<u8>>,
    pub(super) record: MetaRecord,
    pub(super) meta_changes: bool,
    pub(super) changes: Vec<FieldChange>,
}

impl Plan {
    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The key as `plan` would leave it, for a dry run: nothing is written.
pub(super) fn preview(kid: &Kid, current: &Entry, plan: &Plan) -> Option<super::model::KeyView> {
    if plan.is_empty() {
        return Some(current.view.clone());
    }
    let mut objects = current.objects.clone();
    if let Some(l) = &plan.new_label {
        for o in objects.iter_mut() {
            o.label = l.clone();
        }
    }
    let slot = match &current.meta {
        Some(m) => MetaSlot {
            record: plan.record.clone(),
            ..m.clone()
        },
        None => MetaSlot {
            object: None,
            spare: None,
            layout: Layout::V2,
            in_label: true,
            record: plan.record.clone(),
            dirty: true,
        },
    };
    Entry::assemble(kid, objects, Some(slot), None).map(|e| e.view)
}

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Checks permissions and state, and works out what must be written.
/// The checks every change of an existing key passes first: the caller holds one of the
/// key's roles (when it has any), and `If-Match` names its current etag.
pub(super) fn may_change(
    kid: &Kid,
    current: &Entry,
    actor: &Actor,
    if_match: Option<&str>,
) -> Result<(), KeyError> {
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
    match if_match {
        Some(expected) if expected != view.etag => Err(KeyError::PreconditionFailed {
            kid: kid.clone(),
            current: view.etag.clone(),
        }),
        _ => Ok(()),
    }
}

pub(super) fn plan(
    kid: &Kid,
    current: &Entry,
    patch: &KeyPatch,
    actor: &Actor,
) -> Result<Plan, KeyError> {
    let view = &current.view;
    may_change(kid, current, actor, patch.if_match.as_deref())?;
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
    if let Some(l) = patch
        .label
        .as_ref()
        .filter(|l| is_reserved_label(l.as_str().as_bytes()))
    {
        return Err(KeyError::invalid(
            "invalid_label",
            "label",
            format!(
                "the label {} is reserved for hsmkeyd's own signing keys",
                l.as_str()
            ),
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
                field: Field::Label,
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
                field: Field::Description,
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
                field: Field::Roles,
                before: json!(record.roles),
                after: json!(new),
            });
            record.roles = new;
        }
    }
    let meta_changes = changes.iter().any(|c| c.field != Field::Label);
    record.updated_at = Some(now_rfc3339());
    // Whatever the key's record had in progress is over by now (its update finished
    // under this lock, or the scan finished it).
    record.pending = None;
    record.relabel = None;
    Ok(Plan {
        label_writes,
        new_label: patch.label.as_ref().map(|l| l.as_str().as_bytes().to_vec()),
        record,
        meta_changes,
        changes,
    })
}
