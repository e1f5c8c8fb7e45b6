//! hsmkeyd's metadata for a key (description, roles, updated_at), kept **in the token** as one
//! private CKO_DATA object per key, so a token backup carries it and nothing can drift.
//!
//! Layout v2 (CKA_APPLICATION = [`APPLICATION`]): the record is JSON ([`MetaRecord`]) and
//! lives in one of two places of the object:
//! - **in CKA_LABEL**, as `hsmkeyd-meta:<kid> <json>`. PKCS#11 tokens let a data object's
//!   label be rewritten in place (SoftHSM2 keeps CKA_VALUE read-only), so a record write is
//!   one C_SetAttributeValue, as cheap as a key's label change;
//! - **in CKA_VALUE**, under the short label `hsmkeyd-meta:<kid>`, for tokens that refuse
//!   labels that long (many HSMs cap labels at 32-127 bytes). Such a record is never
//!   rewritten: a write creates a new object with the next `seq`, and the old one is
//!   destroyed later by the store's background worker, never on the request path.
//!
//! Every object is created with its record in CKA_VALUE too; a record in the label
//! supersedes it. Across objects of one key the highest `seq` wins, so a crash between a
//! create and the removal of its predecessor leaves a readable state.
//!
//! A record may carry `relabel`: a label change in progress. It is written before the first
//! key-object label (with the rest of the new record), so from then on the update is
//! committed: a scan that finds it sets every object of the key to that label (roll
//! forward). The worker clears it once the change is complete.
//!
//! Layout v1 (`hsmkeyd.meta.v1`: record in CKA_VALUE only, `pending` = old labels to roll
//! back) is still read; its interrupted changes are rolled back, and its records are
//! rewritten as v2 by the worker after start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::{Description, Kid, RoleName};
use crate::hsm::{KeyAttr, UsageFlag};

/// CKA_APPLICATION of hsmkeyd's metadata objects.
pub const APPLICATION: &[u8] = b"hsmkeyd.meta.v2";
/// CKA_APPLICATION of the first layout, read and migrated.
pub const APPLICATION_V1: &[u8] = b"hsmkeyd.meta.v1";
const LABEL_PREFIX: &str = "hsmkeyd-meta:";

/// The layout an object was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `hsmkeyd.meta.v1`.
    V1,
    /// `hsmkeyd.meta.v2`.
    V2,
}

impl Layout {
    /// The layout of a data object with this CKA_APPLICATION, if it is one of ours.
    pub fn of(application: Option<&[u8]>) -> Option<Layout> {
        match application {
            Some(APPLICATION) => Some(Layout::V2),
            Some(APPLICATION_V1) => Some(Layout::V1),
            _ => None,
        }
    }
}

/// The short CKA_LABEL of the metadata object of `kid` (record in CKA_VALUE).
pub fn object_label(kid: &Kid) -> Vec<u8> {
    format!("{LABEL_PREFIX}{kid}").into_bytes()
}

/// The CKA_LABEL that carries `record` itself.
pub fn record_label(record: &MetaRecord) -> Vec<u8> {
    let mut l = object_label(&record.kid);
    l.push(b' ');
    l.extend_from_slice(&record.to_bytes());
    l
}

/// The kid a metadata object's label names, if it is one of ours.
pub fn kid_of_label(label: &[u8]) -> Option<Kid> {
    let rest = std::str::from_utf8(label)
        .ok()?
        .strip_prefix(LABEL_PREFIX)?;
    let kid = rest.split_once(' ').map_or(rest, |(k, _)| k);
    Kid::parse(kid).ok()
}

/// The record an object holds: the one in its label if there is one, else its CKA_VALUE.
pub fn record_of(kid: &Kid, label: &[u8], value: Option<&[u8]>) -> Result<MetaRecord, String> {
    let prefix = object_label(kid);
    match label.strip_prefix(prefix.as_slice()) {
        Some([b' ', json @ ..]) => MetaRecord::from_bytes(kid, json),
        _ => MetaRecord::from_bytes(kid, value.unwrap_or_default()),
    }
}

/// The CKA_VALUE of a metadata object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaRecord {
    /// The key this record belongs to (checked against the object's label).
    pub kid: Kid,
    /// Generation: each write of the record has a higher one.
    pub seq: u64,
    /// Free text.
    pub description: Option<Description>,
    /// Roles allowed to update the key.
    #[serde(default)]
    pub roles: Vec<RoleName>,
    /// Last successful update (RFC 3339).
    pub updated_at: Option<String>,
    /// v1: a label change that was started and not yet committed (rolled back at scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// v2: a committed label change, hex of the label every object of the key takes
    /// (rolled forward at scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relabel: Option<String>,
    /// v2: a committed change of other attributes (usage flags, the one-way flags,
    /// dates), by the kind of object that takes it (`secret`, `private`, `public`); rolled
    /// forward at scan like `relabel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<BTreeMap<String, AttrSet>>,
    /// v2: the key is being created or deleted; a scan that finds this finishes or undoes
    /// it (see [`Lifecycle`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

/// A create or delete in progress. The record is written before the key's objects are
/// made or destroyed, so a crash leaves a marker that says what to do with what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Generation is under way: a complete key (`pair`: a private and a public object,
    /// else one secret key) keeps its record without the marker; anything less is
    /// destroyed, record included.
    Creating {
        /// Whether the key is a pair.
        pair: bool,
    },
    /// Deletion is under way: whatever is left of the key is destroyed.
    Deleting,
}

/// The attributes one object of a key takes in a committed change (absent: left alone).
/// Dates are `YYYY-MM-DD`, or empty for the empty date.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttrSet {
    /// Usage flags by name (`sign`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub usage: BTreeMap<String, bool>,
    /// CKA_SENSITIVE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractable: Option<bool>,
    /// CKA_START_DATE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_date: Option<String>,
    /// CKA_END_DATE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<String>,
}

/// `YYYY-MM-DD`, the one date format of the API and the record.
pub const DATE_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

/// A date as the API and the record write it.
pub fn date_text(d: time::Date) -> String {
    d.format(DATE_FORMAT).unwrap_or_default()
}

impl AttrSet {
    /// The record form of `attrs` (labels are left out: `relabel` carries them).
    pub fn of(attrs: &[KeyAttr]) -> AttrSet {
        let date = |d: &Option<time::Date>| d.map(date_text).unwrap_or_default();
        let mut set = AttrSet::default();
        for a in attrs {
            match a {
                KeyAttr::Label(_) => {}
                KeyAttr::Usage(f, on) => {
                    let _ = set.usage.insert(f.name().to_string(), *on);
                }
                KeyAttr::Sensitive(b) => set.sensitive = Some(*b),
                KeyAttr::Extractable(b) => set.extractable = Some(*b),
                KeyAttr::StartDate(d) => set.start_date = Some(date(d)),
                KeyAttr::EndDate(d) => set.end_date = Some(date(d)),
            }
        }
        set
    }

    /// The attributes, as the token writes them (`None`: the set names something this
    /// daemon does not know, and it must not guess).
    pub fn attrs(&self) -> Option<Vec<KeyAttr>> {
        let date = |s: &str| match s {
            "" => Some(None),
            s => time::Date::parse(s, DATE_FORMAT).ok().map(Some),
        };
        let mut out = Vec::new();
        for (name, on) in &self.usage {
            out.push(KeyAttr::Usage(UsageFlag::parse(name)?, *on));
        }
        out.extend(self.sensitive.map(KeyAttr::Sensitive));
        out.extend(self.extractable.map(KeyAttr::Extractable));
        if let Some(d) = &self.start_date {
            out.push(KeyAttr::StartDate(date(d)?));
        }
        if let Some(d) = &self.end_date {
            out.push(KeyAttr::EndDate(date(d)?));
        }
        Some(out)
    }
}

/// The labels to restore if a v1 label change was interrupted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// Each object's label before the change, by object kind, hex-encoded (labels are bytes).
    pub old_labels: Vec<OldLabel>,
}

/// One object's label before a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OldLabel {
    /// `secret`, `private`, `public` or `certificate`.
    pub kind: String,
    /// The label bytes, hex.
    pub label_hex: String,
}

impl MetaRecord {
    /// The record of a key hsmkeyd has never written.
    pub fn empty(kid: &Kid) -> MetaRecord {
        MetaRecord {
            kid: kid.clone(),
            seq: 0,
            description: None,
            roles: Vec::new(),
            updated_at: None,
            pending: None,
            relabel: None,
            attrs: None,
            lifecycle: None,
        }
    }

    /// The label a committed relabel sets, decoded.
    pub fn relabel_bytes(&self) -> Option<Vec<u8>> {
        self.relabel.as_deref().and_then(|h| hex::decode(h).ok())
    }

    /// Serializes for CKA_VALUE.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a record, checking it belongs to `kid`.
    pub fn from_bytes(kid: &Kid, bytes: &[u8]) -> Result<MetaRecord, String> {
        let rec: MetaRecord = serde_json::from_slice(bytes)
            .map_err(|e| format!("metadata object unreadable: {e}"))?;
        if &rec.kid != kid {
            return Err(format!(
                "metadata object labelled for key {kid} holds the record of key {}",
                rec.kid
            ));
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_checks_its_kid() {
        let kid = Kid::parse("0a0b").unwrap();
        let mut rec = MetaRecord::empty(&kid);
        rec.description = Some(Description::parse("d").unwrap());
        rec.pending = Some(Pending {
            old_labels: vec![OldLabel {
                kind: "secret".into(),
                label_hex: "6f6c64".into(),
            }],
        });
        let bytes = rec.to_bytes();
        assert_eq!(MetaRecord::from_bytes(&kid, &bytes).unwrap(), rec);
        let other = Kid::parse("ffff").unwrap();
        assert!(MetaRecord::from_bytes(&other, &bytes).is_err());
        assert_eq!(kid_of_label(&object_label(&kid)), Some(kid));
        assert_eq!(kid_of_label(b"something else"), None);
    }

    #[test]
    fn a_record_in_the_label_supersedes_the_value() {
        let kid = Kid::parse("0a0b").unwrap();
        let old = MetaRecord::empty(&kid);
        let mut new = old.clone();
        new.seq = 7;
        new.relabel = Some(hex::encode("x"));
        let set = vec![
            KeyAttr::Usage(UsageFlag::Verify, false),
            KeyAttr::EndDate(Some(time::macros::date!(2030 - 01 - 31))),
            KeyAttr::StartDate(None),
        ];
        new.attrs = Some(BTreeMap::from([("public".to_string(), AttrSet::of(&set))]));
        let back = new.attrs.as_ref().unwrap()["public"].attrs().unwrap();
        assert_eq!(
            (back.len(), back.iter().all(|a| set.contains(a))),
            (3, true),
            "{back:?}"
        );
        let label = record_label(&new);
        assert_eq!(kid_of_label(&label), Some(kid.clone()));
        let value = old.to_bytes();
        assert_eq!(record_of(&kid, &label, Some(&value)).unwrap(), new);
        assert_eq!(
            record_of(&kid, &object_label(&kid), Some(&value)).unwrap(),
            old
        );
        assert_eq!(new.relabel_bytes(), Some(b"x".to_vec()));
        // A label naming another key's record is refused, not taken.
        let other = Kid::parse("ffff").unwrap();
        assert!(record_of(&other, &label, None).is_err());
    }
}
