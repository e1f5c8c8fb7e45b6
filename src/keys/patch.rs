//! What an update asks for and what it did: the validated [`KeyPatch`] (one type for a
//! PATCH, the Encedo update and a batch), the caller as an [`Actor`], and the changed
//! fields with their values before and after.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::model::{Description, Label, RoleName};
use super::KeyError;
use crate::hsm::UsageFlag;

/// A validated partial update. `None` (an empty map) leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    /// New label for every object of the key.
    pub label: Option<Label>,
    /// New description; `Some(None)` clears it.
    pub description: Option<Option<Description>>,
    /// New roles (non-empty, duplicates dropped); `Some(None)` clears them.
    pub roles: Option<Option<Vec<RoleName>>>,
    /// Usage flags to set, each on the objects PKCS#11 defines it for.
    pub usage: BTreeMap<UsageFlag, bool>,
    /// CKA_SENSITIVE of the private or secret key (false → true only).
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE of the private or secret key (true → false only).
    pub extractable: Option<bool>,
    /// CKA_START_DATE of the key objects; `Some(None)` clears it.
    pub not_before: Option<Option<time::Date>>,
    /// CKA_END_DATE of the key objects; `Some(None)` clears it.
    pub not_after: Option<Option<time::Date>>,
    /// The etag the caller expects the key to have (`If-Match`).
    pub if_match: Option<String>,
}

impl KeyPatch {
    /// Whether the patch names no field at all.
    pub fn is_empty(&self) -> bool {
        self.label.is_none()
            && self.description.is_none()
            && self.roles.is_none()
            && self.usage.is_empty()
            && self.sensitive.is_none()
            && self.extractable.is_none()
            && self.not_before.is_none()
            && self.not_after.is_none()
    }

    /// The checks that need no key: roles the configuration defines, and a validity
    /// that does not end before it starts (when the patch names both ends).
    pub fn check(&self, defined: &BTreeSet<RoleName>) -> Result<(), KeyError> {
        self.check_roles(defined)?;
        if let (Some(Some(from)), Some(Some(to))) = (self.not_before, self.not_after) {
            check_validity(Some(from), Some(to), "not_after")?;
        }
        Ok(())
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

/// 400 `invalid_validity` on `field` when `to` is before `from`.
pub fn check_validity(
    from: Option<time::Date>,
    to: Option<time::Date>,
    field: &'static str,
) -> Result<(), KeyError> {
    match (from, to) {
        (Some(from), Some(to)) if to < from => Err(KeyError::invalid(
            "invalid_validity",
            field,
            format!(
                "not_after ({}) is before not_before ({}); the key would never be valid",
                super::meta::date_text(to),
                super::meta::date_text(from)
            ),
        )),
        _ => Ok(()),
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
    /// Usage flags (`before`/`after`: the changed flags by name).
    Usage,
    /// CKA_SENSITIVE.
    Sensitive,
    /// CKA_EXTRACTABLE.
    Extractable,
    /// CKA_START_DATE (`YYYY-MM-DD` or null).
    NotBefore,
    /// CKA_END_DATE (`YYYY-MM-DD` or null).
    NotAfter,
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
            Field::Usage => "usage",
            Field::Sensitive => "sensitive",
            Field::Extractable => "extractable",
            Field::NotBefore => "not_before",
            Field::NotAfter => "not_after",
            Field::Key => "key",
        }
    }

    /// Whether the field lives in the metadata record (else in the key's objects).
    pub fn in_record(self) -> bool {
        matches!(self, Field::Description | Field::Roles)
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
