//! The in-memory index: every key by its kid, and beside it the keys by their label, kept
//! together by the only two ways the index changes (a key put in, a key taken out), so a
//! lookup by label (`keys.unique_labels`, `/v1/keys/by-label/{label}`) costs a hash and
//! not a walk over every key: at 10,000 keys that walk cost more than the label set
//! itself.
//!
//! The labels are kept as a hash of the label (SipHash with this process's random key)
//! pointing at the entries that carry it: a table slot and a one-pointer list, under 100
//! bytes a key (the 10,000-key bench's heap: 5.4 MiB, 4.5 before); a lookup checks
//! each candidate's label itself, so a collision costs a comparison, never a wrong answer.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::ops::Deref;
use std::sync::Arc;

use super::entry::Entry;
use crate::values::Kid;

/// The keys by kid (read through `Deref`), and by label.
pub(super) struct Index {
    keys: BTreeMap<Kid, Arc<Entry>>,
    labels: HashMap<u64, Vec<Arc<Entry>>>,
    hasher: RandomState,
}

impl Index {
    /// The index of `keys` (a scan's).
    pub(super) fn new(keys: BTreeMap<Kid, Arc<Entry>>) -> Index {
        let mut index = Index {
            keys: BTreeMap::new(),
            labels: HashMap::with_capacity(keys.len()),
            hasher: RandomState::new(),
        };
        for entry in keys.values() {
            index.add_label(entry);
        }
        index.keys = keys;
        index
    }

    /// Puts `entry` in as `kid`'s, in place of the one it had.
    pub(super) fn insert(&mut self, kid: Kid, entry: Arc<Entry>) {
        match self.keys.insert(kid, entry.clone()) {
            Some(old) if Arc::ptr_eq(&old, &entry) => {}
            Some(old) => {
                self.drop_label(&old);
                self.add_label(&entry);
            }
            None => self.add_label(&entry),
        }
    }

    /// Takes `kid`'s entry out.
    pub(super) fn remove(&mut self, kid: &Kid) -> Option<Arc<Entry>> {
        let old = self.keys.remove(kid)?;
        self.drop_label(&old);
        Some(old)
    }

    /// The keys whose label is `label`, in kid order.
    pub(super) fn labelled(&self, label: &str) -> Vec<&Arc<Entry>> {
        let mut found: Vec<&Arc<Entry>> = self
            .labels
            .get(&self.hasher.hash_one(label))
            .into_iter()
            .flatten()
            .filter(|e| e.label() == label)
            .collect();
        found.sort_unstable_by(|a, b| a.kid().cmp(b.kid()));
        found
    }

    fn add_label(&mut self, entry: &Arc<Entry>) {
        let hash = self.hasher.hash_one(entry.label().as_ref());
        self.labels.entry(hash).or_default().push(entry.clone());
    }

    /// Drops every mention of `entry` (the same allocation) from its label's list.
    fn drop_label(&mut self, entry: &Arc<Entry>) {
        let hash = self.hasher.hash_one(entry.label().as_ref());
        if let Some(list) = self.labels.get_mut(&hash) {
            list.retain(|e| !Arc::ptr_eq(e, entry));
            if list.is_empty() {
                let _ = self.labels.remove(&hash);
            }
        }
    }
}

impl Deref for Index {
    type Target = BTreeMap<Kid, Arc<Entry>>;

    fn deref(&self) -> &Self::Target {
        &self.keys
    }
}
