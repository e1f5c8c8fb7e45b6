//! Labels as names: finding a key by its label, and `keys.unique_labels`, under which no
//! two keys may take one label. A label being written is claimed first, so two concurrent
//! requests can never both give one label to different keys: the check and the claim are
//! one step under a lock, and the claim lasts until the write is over and the index shows
//! it. Both look the label up in the index's labels (`index.rs`), never walk every key.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::{sync, KeyError, KeyStore};
use crate::values::{Kid, Label};

/// Labels claimed by creates and renames in progress.
#[derive(Debug, Default)]
pub(super) struct Claims(Mutex<HashSet<String>>);

/// A claimed label; released on drop.
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    label: Option<String>,
}

impl Claims {
    /// Labels claimed now.
    pub(super) fn len(&self) -> usize {
        sync::lock(&self.0).len()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.label.take() {
            let _ = sync::lock(&self.claims.0).remove(&l);
        }
    }
}

impl KeyStore {
    /// Turns `keys.unique_labels` on or off (at start and on reload).
    pub fn set_unique_labels(&self, on: bool) {
        self.unique_labels.store(on, Ordering::SeqCst);
    }

    /// The key whose label is `label`: 404 when none, 409 `label_ambiguous` when several
    /// keys carry it.
    pub fn kid_by_label(&self, label: &str) -> Result<Kid, KeyError> {
        self.ensure_token()?;
        let index = sync::read(&self.index);
        let mut found = index.labelled(label).into_iter();
        match (found.next(), found.next()) {
            (Some(e), None) => Ok(e.kid().clone()),
            (None, _) => Err(KeyError::NoSuchLabel(label.to_string())),
            (Some(a), Some(b)) => Err(KeyError::LabelAmbiguous {
                label: label.to_string(),
                kids: [a, b]
                    .into_iter()
                    .chain(found)
                    .map(|e| e.kid().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The kids of keys whose label starts with `label_prefix` and that carry `role`
    /// (either filter may be absent), at most `max`, in kid order; `true` when more matched.
    pub fn select(
        &self,
        label_prefix: Option<&str>,
        role: Option<&crate::values::RoleName>,
        max: usize,
    ) -> Result<(Vec<Kid>, bool), KeyError> {
        self.ensure_token()?;
        let index = sync::read(&self.index);
        let mut hits = index.values().filter(|e| {
            label_prefix.is_none_or(|p| e.label().starts_with(p))
                && role.is_none_or(|r| e.roles().contains(r))
        });
        let kids: Vec<Kid> = hits.by_ref().take(max).map(|e| e.kid().clone()).collect();
        Ok((kids, hits.next().is_some()))
    }

    /// Claims `label` for `kid` when labels are unique: 409 `label_taken` if another key
    /// has it or is being given it. With unique labels off, or no label, claims nothing.
    pub(super) fn claim_label(
        &self,
        kid: &Kid,
        label: Option<&Label>,
    ) -> Result<Claim<'_>, KeyError> {
        let none = Claim {
            claims: &self.claims,
            label: None,
        };
        let Some(label) = label.filter(|_| self.unique_labels.load(Ordering::SeqCst)) else {
            return Ok(none);
        };
        let mut claimed = sync::lock(&self.claims.0);
        let taken = sync::read(&self.index)
            .labelled(label.as_str())
            .into_iter()
            .find(|e| e.kid() != kid)
            .map(|e| e.kid().clone());
        if let Some(other) = taken {
            return Err(KeyError::LabelTaken {
                label: label.as_str().to_string(),
                kid: other,
            });
        }
        if !claimed.insert(label.as_str().to_string()) {
            return Err(KeyError::LabelTaken {
                label: label.as_str().to_string(),
                kid: kid.clone(),
            });
        }
        Ok(Claim {
            claims: &self.claims,
            label: Some(label.as_str().to_string()),
        })
    }
}
