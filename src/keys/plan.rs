//! Update planning: from a validated patch and the key as the index holds it to the
//! [`Plan`] of writes that `update.rs` carries out, with the checks every change of an
//! existing key passes first (roles, `If-Match`, state) and the dry run's preview.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::entry::{kind_name, Entry, MetaSlot};
use super::meta::{date_text, AttrSet, Layout, MetaRecord};
use super::model::{Description, KeyState, Kid, RoleName};
use super::patch::{check_validity, Actor, Field, FieldChange, KeyPatch};
use super::KeyError;
use crate::hsm::{is_reserved_label, usage_allowed, KeyAttr, ObjectInfo, ObjectKind, ObjectRef};

/// One C_SetAttributeValue on one object of the key.
pub(super) struct ObjectWrite {
    /// The object.
    pub(super) handle: ObjectRef,
    /// Its kind, as records and messages name it (`secret`, `private`, `public`, ...).
    pub(super) kind: &'static str,
    /// What to set.
    pub(super) attrs: Vec<KeyAttr>,
    /// The values before, to set back after a failure (one-way attributes left out: the
    /// token would refuse them, which is why such a write goes last).
    pub(super) undo: Vec<KeyAttr>,
}

impl ObjectWrite {
    /// Whether the write sets an attribute PKCS#11 lets change one way only.
    pub(super) fn one_way(&self) -> bool {
        self.attrs.iter().any(KeyAttr::is_one_way)
    }
}

/// The writes an update needs.
pub(super) struct Plan {
    /// One write per object that changes, those with one-way attributes last.
    pub(super) writes: Vec<ObjectWrite>,
    /// The label every object takes, when the patch names one.
    pub(super) new_label: Option<Vec<u8>>,
    /// The record as the update leaves it (without markers).
    pub(super) record: MetaRecord,
    /// Whether the record's own fields (description, roles) change.
    pub(super) meta_changes: bool,
    /// What changes, for the audit trail and the answer.
    pub(super) changes: Vec<FieldChange>,
}

impl Plan {
    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The record's marker of attribute changes (`None`: only labels, or nothing).
    pub(super) fn attrs_marker(&self) -> Option<BTreeMap<String, AttrSet>> {
        let marker: BTreeMap<String, AttrSet> = self
            .writes
            .iter()
            .map(|w| (w.kind.to_string(), AttrSet::of(&w.attrs)))
            .filter(|(_, set)| set != &AttrSet::default())
            .collect();
        (!marker.is_empty()).then_some(marker)
    }
}

/// The key as `plan` would leave it, for a dry run: nothing is written.
pub(super) fn preview(kid: &Kid, current: &Entry, plan: &Plan) -> Option<super::model::KeyView> {
    if plan.is_empty() {
        return Some(current.view());
    }
    let mut objects = current.objects.clone();
    for w in &plan.writes {
        if let Some(o) = objects.iter_mut().find(|o| o.handle == w.handle) {
            for a in &w.attrs {
                a.apply_to(o);
            }
        }
    }
    let slot = match &current.meta {
        Some(m) => MetaSlot {
            record: plan.record.clone(),
            ..(**m).clone()
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
    Entry::assemble(kid, objects, Some(Box::new(slot)), None).map(|e| e.view())
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
    let view = &current.view();
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
    let view = &current.view();
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
    // What each object takes, by its index in `current.objects`.
    let mut attrs: Vec<Vec<KeyAttr>> = vec![Vec::new(); current.objects.len()];
    if let Some(l) = patch
        .label
        .as_ref()
        .filter(|l| is_reserved_label(l.as_str().as_bytes()))
    {
        return Err(KeyError::invalid(
            "invalid_label",
            "label",
            format!(
                "the label {} is reserved for hsmkeyd's own keys",
                l.as_str()
            ),
        ));
    }
    if let Some(label) = &patch.label {
        let set = KeyAttr::Label(label.as_str().as_bytes().to_vec());
        if want(&mut attrs, &current.objects, &set, |_| true) {
            changes.push(FieldChange {
                field: Field::Label,
                before: json!(view.label),
                after: json!(label.as_str()),
            });
        }
    }
    plan_attributes(kid, current, patch, &mut attrs, &mut changes)?;
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
    let meta_changes = changes.iter().any(|c| c.field.in_record());
    record.updated_at = Some(now_rfc3339());
    // Whatever the key's record had in progress is over by now (its update finished
    // under this lock, or the scan finished it).
    record.pending = None;
    record.relabel = None;
    record.attrs = None;
    let mut writes: Vec<ObjectWrite> = current
        .objects
        .iter()
        .zip(attrs)
        .filter(|(_, a)| !a.is_empty())
        .map(|(o, attrs)| ObjectWrite {
            handle: o.handle,
            kind: kind_name(o.kind),
            undo: attrs
                .iter()
                .filter(|a| !a.is_one_way())
                .map(|a| a.as_held_by(o))
                .collect(),
            attrs,
        })
        .collect();
    // A one-way write cannot be undone, so it goes after every write that can.
    writes.sort_by_key(ObjectWrite::one_way);
    Ok(Plan {
        writes,
        new_label: patch.label.as_ref().map(|l| l.as_str().as_bytes().to_vec()),
        record,
        meta_changes,
        changes,
    })
}

/// Adds `attr` to every object `fits` picks that does not hold it yet; says whether any
/// needs it.
fn want(
    attrs: &mut [Vec<KeyAttr>],
    objects: &[ObjectInfo],
    attr: &KeyAttr,
    fits: impl Fn(&ObjectInfo) -> bool,
) -> bool {
    let mut any = false;
    for (i, o) in objects.iter().enumerate() {
        if fits(o) && !attr.held_by(o) {
            attrs[i].push(attr.clone());
            any = true;
        }
    }
    any
}

fn is_key_object(o: &ObjectInfo) -> bool {
    matches!(
        o.kind,
        ObjectKind::SecretKey | ObjectKind::PrivateKey | ObjectKind::PublicKey
    )
}

/// Usage flags, the one-way flags and the dates: each checked against the key (its type,
/// its objects, PKCS#11's one-way rules, its current validity), then planned on the
/// objects that carry it.
fn plan_attributes(
    kid: &Kid,
    current: &Entry,
    patch: &KeyPatch,
    attrs: &mut [Vec<KeyAttr>],
    changes: &mut Vec<FieldChange>,
) -> Result<(), KeyError> {
    let objects = &current.objects;
    let view = &current.view();
    let algorithm = objects
        .iter()
        .filter(|o| is_key_object(o))
        .find_map(|o| o.algorithm.clone());
    let allowed = algorithm.as_ref().and_then(usage_allowed);
    let (mut before, mut after) = (Map::new(), Map::new());
    for (&flag, &on) in &patch.usage {
        if on && allowed.is_some_and(|a| !a.contains(&flag)) {
            return Err(KeyError::invalid(
                "invalid_usage",
                flag.field(),
                format!(
                    "usage.{} makes no sense for a {} key; it allows {}",
                    flag.name(),
                    view.key_type.name(),
                    allowed
                        .unwrap_or_default()
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let Some(target) = objects.iter().find(|o| flag.fits_object(o.kind)) else {
            return Err(KeyError::invalid(
                "invalid_usage",
                flag.field(),
                format!(
                    "key {kid} has no {} object to carry usage.{}",
                    super::entry::kind_name(flag.object()),
                    flag.name()
                ),
            ));
        };
        let set = KeyAttr::Usage(flag, on);
        if want(attrs, objects, &set, |o| flag.fits_object(o.kind)) {
            let was = crate::hsm::attributes::flag_of(target, flag).unwrap_or(false);
            let _ = before.insert(flag.name().into(), json!(was));
            let _ = after.insert(flag.name().into(), json!(on));
        }
    }
    if !after.is_empty() {
        changes.push(FieldChange {
            field: Field::Usage,
            before: Value::Object(before),
            after: Value::Object(after),
        });
    }
    let hidden = |o: &ObjectInfo| matches!(o.kind, ObjectKind::SecretKey | ObjectKind::PrivateKey);
    for (field, wanted, now, set) in [
        (
            Field::Sensitive,
            patch.sensitive,
            view.attributes.sensitive,
            KeyAttr::Sensitive as fn(bool) -> KeyAttr,
        ),
        (
            Field::Extractable,
            patch.extractable,
            view.attributes.extractable,
            KeyAttr::Extractable,
        ),
    ] {
        let Some(wanted) = wanted else { continue };
        let name = field.name();
        if !objects.iter().any(hidden) {
            return Err(KeyError::invalid(
                "invalid_field",
                name,
                format!("key {kid} has no private or secret key object to carry {name}"),
            ));
        }
        // PKCS#11: CKA_SENSITIVE may only become true, CKA_EXTRACTABLE only false.
        let allowed_to = field == Field::Sensitive;
        if now == Some(!wanted) && wanted != allowed_to {
            return Err(KeyError::invalid(
                "irreversible_attribute",
                name,
                format!(
                    "{name} is {} and PKCS#11 lets it change only to {allowed_to}; once set it cannot be undone",
                    !wanted
                ),
            ));
        }
        if want(attrs, objects, &set(wanted), hidden) {
            changes.push(FieldChange {
                field,
                before: json!(now),
                after: json!(wanted),
            });
        }
    }
    if patch.not_before.is_some() || patch.not_after.is_some() {
        let from = patch.not_before.unwrap_or(view.not_before);
        let to = patch.not_after.unwrap_or(view.not_after);
        let field = if patch.not_after.is_some() {
            "not_after"
        } else {
            "not_before"
        };
        check_validity(from, to, field)?;
    }
    for (field, wanted, now, set) in [
        (
            Field::NotBefore,
            patch.not_before,
            view.not_before,
            KeyAttr::StartDate as fn(Option<time::Date>) -> KeyAttr,
        ),
        (
            Field::NotAfter,
            patch.not_after,
            view.not_after,
            KeyAttr::EndDate,
        ),
    ] {
        let Some(wanted) = wanted else { continue };
        if want(attrs, objects, &set(wanted), is_key_object) {
            changes.push(FieldChange {
                field,
                before: json!(now.map(date_text)),
                after: json!(wanted.map(date_text)),
            });
        }
    }
    Ok(())
}
