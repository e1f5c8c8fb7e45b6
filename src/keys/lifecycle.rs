//! Creating and deleting keys, all or nothing.
//!
//! A create writes the key's metadata record first, marked [`Lifecycle::Creating`], then
//! has the token generate the key, then writes the record again without the marker. A
//! delete writes the record marked [`Lifecycle::Deleting`], then destroys the key's objects
//! and its metadata. A failure undoes what was done; a crash leaves the marker, and the next
//! scan ([`settle_lifecycle`]) keeps a complete new key, destroys an incomplete one, and
//! finishes a delete. So no crash leaves a half-made key, a key without its roles, or orphan
//! metadata.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use serde_json::{json, Value};

use super::entry::{Entry, Group};
use super::meta::{self, Lifecycle, MetaRecord};
use super::model::{
    Curve, Description, KeyAttributes, KeyClass, KeyState, KeyType, KeyView, Kid, Label, RoleName,
};
use super::patch::{Actor, Field, FieldChange, UpdateOutcome};
use super::plan::{self, now_rfc3339};
use super::update;
use super::{hsm_error, sync, KeyError, KeyStore};
use crate::hsm::{Hsm, HsmErrorKind, KeySpec, NewKey, ObjectInfo, ObjectKind, ObjectRef, Usage};

/// A key to create, validated.
#[derive(Debug, Clone)]
pub struct NewKeyRequest {
    /// The id to give it (`None`: 16 random bytes).
    pub kid: Option<Kid>,
    /// Type and size.
    pub spec: KeySpec,
    /// CKA_LABEL of its objects.
    pub label: Label,
    /// Description for its record.
    pub description: Option<Description>,
    /// Roles that may change it.
    pub roles: Vec<RoleName>,
    /// Usage flags.
    pub usage: Usage,
    /// CKA_START_DATE of its objects.
    pub not_before: Option<time::Date>,
    /// CKA_END_DATE of its objects.
    pub not_after: Option<time::Date>,
}

impl NewKeyRequest {
    /// A fresh kid: 16 random bytes.
    pub fn random_kid() -> Kid {
        Kid::from_id(&rand::random::<[u8; 16]>()).unwrap_or_else(|| unreachable!("16 bytes"))
    }

    /// The key as it will be once made (a dry run's answer): no etag, since it has no
    /// objects yet.
    fn preview(&self, kid: &Kid) -> KeyView {
        let (key_type, curve, bits) = match &self.spec {
            KeySpec::Aes(b) => (KeyType::Aes, None, Some(b * 8)),
            KeySpec::GenericSecret(b) => (KeyType::GenericSecret, None, Some(b * 8)),
            KeySpec::Ec(c) => (KeyType::Ec, Some(c.clone()), None),
            KeySpec::Ed25519 => (KeyType::Edwards(Curve::Ed25519), None, None),
            KeySpec::Rsa(b) => (KeyType::Rsa, None, Some(*b)),
        };
        let u = self.usage;
        KeyView {
            kid: kid.clone(),
            label: self.label.as_str().to_string(),
            description: self.description.as_ref().map(|d| d.as_str().to_string()),
            roles: self.roles.clone(),
            key_type,
            curve,
            bits,
            class: if self.spec.is_pair() {
                KeyClass::KeyPair
            } else {
                KeyClass::Secret
            },
            has_certificate: false,
            attributes: KeyAttributes {
                sensitive: Some(true),
                extractable: Some(false),
                modifiable: true,
                sign: u.sign,
                verify: u.verify,
                encrypt: u.encrypt,
                decrypt: u.decrypt,
                wrap: u.wrap,
                unwrap: u.unwrap,
                derive: u.derive,
            },
            not_before: self.not_before,
            not_after: self.not_after,
            updated_at: None,
            state: KeyState::Ok,
            etag: String::new(),
        }
    }

    /// What the audit trail records of the key to be made.
    fn summary(&self, kid: &Kid) -> Value {
        let (kind, size) = match &self.spec {
            KeySpec::Aes(b) => ("aes", json!({"bits": b * 8})),
            KeySpec::GenericSecret(b) => ("generic-secret", json!({"bits": b * 8})),
            KeySpec::Ec(c) => ("ec", json!({"curve": c.name()})),
            KeySpec::Ed25519 => ("ed25519", json!({})),
            KeySpec::Rsa(bits) => ("rsa", json!({"bits": bits})),
        };
        let u = self.usage;
        let mut v = json!({
            "kid": kid,
            "type": kind,
            "label": self.label.as_str(),
            "description": self.description.as_ref().map(Description::as_str),
            "roles": self.roles,
            "usage": {"sign": u.sign, "verify": u.verify, "encrypt": u.encrypt,
                      "decrypt": u.decrypt, "wrap": u.wrap, "unwrap": u.unwrap,
                      "derive": u.derive},
            "not_before": self.not_before.map(meta::date_text),
            "not_after": self.not_after.map(meta::date_text),
        });
        if let (Some(obj), Some(size)) = (v.as_object_mut(), size.as_object()) {
            obj.extend(size.clone());
        }
        v
    }
}

/// Reads the objects `refs` back into an entry for `kid` (after a create).
fn read_back(hsm: &Hsm, kid: &Kid, refs: &[ObjectRef]) -> Result<Option<Entry>, KeyError> {
    let apps = [meta::APPLICATION, meta::APPLICATION_V1];
    let mut objects = Vec::new();
    let mut metas = Vec::new();
    for r in refs {
        let o = hsm.read(*r, &apps).map_err(|e| hsm_error(kid, e))?;
        if o.kind == ObjectKind::Data {
            metas.push(o);
        } else {
            objects.push(o);
        }
    }
    Ok(Entry::build(kid, Group::new(objects, metas)))
}

/// Destroys objects, best effort (undoing a create, finishing a delete at scan); says how
/// many could not be destroyed.
fn destroy_all(hsm: &Hsm, kid: &Kid, refs: impl IntoIterator<Item = ObjectRef>) -> usize {
    let mut left = 0;
    for r in refs {
        match hsm.destroy(r) {
            Ok(()) => {}
            Err(e) if e.kind == HsmErrorKind::ObjectGone => {}
            Err(e) => {
                tracing::error!(%kid, error = %e, "could not destroy an object of the key");
                left += 1;
            }
        }
    }
    left
}

/// The token work of a create, on a blocking thread. On error nothing of the key is left
/// (or, if even the undo failed, the record's marker makes the next scan remove it).
fn make(hsm: &Hsm, kid: &Kid, req: &NewKeyRequest, limit: &AtomicUsize) -> Result<Entry, KeyError> {
    let pair = req.spec.is_pair();
    let mut record = MetaRecord::empty(kid);
    record.seq = 1;
    record.description = req.description.clone();
    record.roles = req.roles.clone();
    record.updated_at = Some(now_rfc3339());
    record.lifecycle = Some(Lifecycle::Creating { pair });
    let marked =
        update::write_record(hsm, kid, None, &record, limit).map_err(|e| hsm_error(kid, e))?;
    let meta_refs: Vec<ObjectRef> = marked.slot.object.into_iter().collect();
    let key = NewKey {
        spec: req.spec.clone(),
        id: kid.id_bytes(),
        label: req.label.as_str().as_bytes().to_vec(),
        usage: req.usage,
        start_date: req.not_before,
        end_date: req.not_after,
    };
    let made = match hsm.generate(&key) {
        Ok(m) => m,
        Err(e) => {
            let _ = destroy_all(hsm, kid, meta_refs);
            return Err(hsm_error(kid, e));
        }
    };
    record.seq = 2;
    record.lifecycle = None;
    let written = match update::write_record(hsm, kid, Some(&marked.slot), &record, limit) {
        Ok(w) => w,
        Err(e) => {
            let _ = destroy_all(hsm, kid, made.iter().copied().chain(meta_refs));
            return Err(hsm_error(kid, e));
        }
    };
    let mut refs = made.clone();
    refs.extend(written.slot.object);
    refs.extend(written.slot.spare);
    refs.extend(written.superseded.iter().copied());
    match read_back(hsm, kid, &refs) {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) => Err(KeyError::Internal(format!(
            "key {kid} was generated but cannot be read back"
        ))),
        Err(e) => Err(e),
    }
}

impl KeyStore {
    /// Generates a key in the token with its metadata, on behalf of `actor` (who must hold
    /// one of `req.roles` when there are any). `before_write` and `after_write` are the
    /// audit hooks, as for [`KeyStore::update`]. Answers the new key; with `dry_run`, after
    /// every check, only the change (what would be made) and no token write.
    pub async fn create<F, G>(
        &self,
        req: NewKeyRequest,
        actor: &Actor,
        dry_run: bool,
        before_write: F,
        after_write: G,
    ) -> Result<UpdateOutcome, KeyError>
    where
        F: FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static,
        G: FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static,
    {
        {
            let defined = sync::read(&self.roles);
            if let Some(r) = req.roles.iter().find(|r| !defined.contains(*r)) {
                return Err(KeyError::invalid(
                    "unknown_role",
                    "roles",
                    format!("role {r} is not defined in keys.roles"),
                ));
            }
        }
        if !req.roles.is_empty() && !req.roles.iter().any(|r| actor.roles.contains(r)) {
            return Err(KeyError::invalid(
                "role_not_held",
                "roles",
                "a new key's roles must include one the caller holds, or the caller could \
                 not change the key it made",
            ));
        }
        let kid = req.kid.clone().unwrap_or_else(NewKeyRequest::random_kid);
        self.chores.room().await;
        self.refresh_handles().await?;
        // A kid the index does not know may be new in the token: look once (rate-limited).
        match self.entry(&kid).await {
            Ok(_) => return Err(KeyError::KidTaken(kid)),
            Err(KeyError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let _shared = self.gate.read().await;
        let _guard = self.key_lock(&kid).await;
        if sync::read(&self.index).contains_key(&kid) {
            return Err(KeyError::KidTaken(kid));
        }
        let _claim = self.claim_label(&kid, Some(&req.label))?;
        let changes = vec![FieldChange {
            field: Field::Key,
            before: Value::Null,
            after: req.summary(&kid),
        }];
        if dry_run {
            // Nothing to show but what would be made: the change's `after`.
            return Ok(UpdateOutcome {
                key: req.preview(&kid),
                changes,
            });
        }
        let (hsm, kid2, store) = (self.hsm.clone(), kid.clone(), self.shared.clone());
        let (made, changes) = self
            .on_token(move || {
                before_write(&changes).map_err(KeyError::NotRecorded)?;
                let made = make(&hsm, &kid2, &req, &store.label_limit);
                after_write(match &made {
                    Ok(_) => Ok(&changes),
                    Err(e) => Err(e),
                });
                Ok::<_, KeyError>((made, changes))
            })
            .await??;
        let entry = made?;
        let view = entry.view();
        sync::write(&self.index).insert(kid, Arc::new(entry));
        Ok(UpdateOutcome { key: view, changes })
    }

    /// Destroys every object of the key `kid` (key objects, certificate, metadata) on
    /// behalf of `actor`, after the role and `If-Match` checks. Answers the key as it was.
    pub async fn delete<F, G>(
        &self,
        kid: &Kid,
        if_match: Option<&str>,
        actor: &Actor,
        dry_run: bool,
        before_write: F,
        after_write: G,
    ) -> Result<UpdateOutcome, KeyError>
    where
        F: FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static,
        G: FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static,
    {
        // Held to the end: the key's lock and the gate.
        let locked = self.lock_key(kid).await?;
        let current = locked.current.clone();
        plan::may_change(kid, &current, actor, if_match)?;
        if current.objects.iter().any(|o| o.destroyable == Some(false)) {
            return Err(KeyError::NotDestroyable(kid.clone()));
        }
        let changes = vec![FieldChange {
            field: Field::Key,
            before: serde_json::to_value(current.view()).unwrap_or(Value::Null),
            after: Value::Null,
        }];
        if dry_run {
            return Ok(UpdateOutcome {
                key: current.view(),
                changes,
            });
        }
        let (hsm, kid2, store, entry) = (
            self.hsm.clone(),
            kid.clone(),
            self.shared.clone(),
            current.clone(),
        );
        let (result, changes) = self
            .on_token(move || {
                before_write(&changes).map_err(KeyError::NotRecorded)?;
                let result = destroy(&hsm, &kid2, &entry, &store.label_limit);
                after_write(match &result {
                    Ok(()) => Ok(&changes),
                    Err(e) => Err(e),
                });
                Ok::<_, KeyError>((result, changes))
            })
            .await??;
        match result {
            Ok(()) => {
                let _ = sync::write(&self.index).remove(kid);
                Ok(UpdateOutcome {
                    key: current.view(),
                    changes,
                })
            }
            Err(e) => {
                // Part of the key may be gone: the next lookup rescans, and the scan
                // finishes the delete its record announces.
                *sync::lock(&self.last_rescan) = None;
                Err(e)
            }
        }
    }
}

/// The token work of a delete: the marker first (a failure there changes nothing), then
/// the key's objects, then its metadata.
fn destroy(hsm: &Hsm, kid: &Kid, entry: &Entry, limit: &AtomicUsize) -> Result<(), KeyError> {
    let mut record = entry
        .meta
        .as_ref()
        .map_or_else(|| MetaRecord::empty(kid), |m| m.record.clone());
    record.seq += 1;
    record.relabel = None;
    record.lifecycle = Some(Lifecycle::Deleting);
    let marked = update::write_record(hsm, kid, entry.meta.as_deref(), &record, limit)
        .map_err(|e| hsm_error(kid, e))?;
    for o in &entry.objects {
        hsm.destroy(o.handle).map_err(|e| hsm_error(kid, e))?;
    }
    let metas = marked
        .slot
        .object
        .into_iter()
        .chain(marked.slot.spare)
        .chain(marked.superseded)
        .chain(
            entry
                .meta
                .iter()
                .flat_map(|m| m.object.into_iter().chain(m.spare)),
        )
        .chain(entry.stale.iter().copied());
    let mut seen = Vec::new();
    for r in metas {
        if !seen.contains(&r) {
            seen.push(r);
        }
    }
    if destroy_all(hsm, kid, seen) > 0 {
        tracing::warn!(%kid, "some metadata objects of a deleted key remain; the next start removes them");
    }
    Ok(())
}

/// At scan: what a record's lifecycle marker says to do with the key's objects. `None`
/// when the group carries no marker (the caller settles it as usual). `Some(entry)` is the
/// key to keep (a complete create), `Some(None)` means the key is gone.
pub(super) fn settle_lifecycle(hsm: &Hsm, kid: &Kid, group: &Group) -> Option<Option<Entry>> {
    let newest = group
        .metas
        .iter()
        .filter_map(|m| meta::record_of(kid, &m.label, m.value.as_deref()).ok())
        .max_by_key(|r| r.seq)?;
    let fate = newest.lifecycle?;
    let count = |k| {
        group
            .objects
            .iter()
            .filter(|o: &&ObjectInfo| o.kind == k)
            .count()
    };
    let complete = match fate {
        Lifecycle::Creating { pair: true } => {
            count(ObjectKind::PrivateKey) == 1 && count(ObjectKind::PublicKey) == 1
        }
        Lifecycle::Creating { pair: false } => count(ObjectKind::SecretKey) == 1,
        Lifecycle::Deleting => false,
    };
    if complete {
        // Generation finished before the crash: keep the key; the worker rewrites its
        // record without the marker.
        let mut entry = Entry::build(kid, Group::new(group.objects.clone(), group.metas.clone()))?;
        if let Some(m) = entry.meta.as_mut() {
            m.record.lifecycle = None;
            m.dirty = true;
        }
        tracing::warn!(%kid, "kept a key whose creation was interrupted after generation");
        return Some(Some(entry));
    }
    let what = if fate == Lifecycle::Deleting {
        "finished deleting"
    } else {
        "removed what was made of"
    };
    let refs = group
        .objects
        .iter()
        .chain(&group.metas)
        .map(|o| o.handle)
        .collect::<Vec<_>>();
    let left = destroy_all(hsm, kid, refs);
    tracing::warn!(%kid, left, "{what} a key whose operation a crash interrupted");
    Some(None)
}
