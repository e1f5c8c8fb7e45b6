//! hsmkeyd's metadata for a key (description, roles, updated_at), kept **in the token** as one
//! private CKO_DATA object per key, so a token backup carries it and nothing can drift.
//!
//! The object: CKA_APPLICATION = [`APPLICATION`], CKA_LABEL = `hsmkeyd-meta:<kid>`,
//! CKA_VALUE = the JSON of [`MetaRecord`]. Tokens may treat CKA_VALUE of data objects as
//! read-only once created (SoftHSM2 does), so a record is never rewritten in place: a write
//! creates a new object with the next `seq` and then destroys the old one. If two objects
//! exist (a crash between the two steps), the higher `seq` is the truth and the other is
//! removed at the next scan. A `pending` entry marks a label change in progress (see
//! `update.rs` for the write order); one found at startup is rolled back.

use serde::{Deserialize, Serialize};

use super::model::{Description, Kid, RoleName};

/// CKA_APPLICATION of hsmkeyd's metadata objects; the version changes if the JSON does.
pub const APPLICATION: &[u8] = b"hsmkeyd.meta.v1";
const LABEL_PREFIX: &str = "hsmkeyd-meta:";

/// CKA_LABEL of the metadata object of `kid`.
pub fn object_label(kid: &Kid) -> Vec<u8> {
    format!("{LABEL_PREFIX}{kid}").into_bytes()
}

/// The kid a metadata object's label names, if it is one of ours.
pub fn kid_of_label(label: &[u8]) -> Option<Kid> {
    std::str::from_utf8(label)
        .ok()?
        .strip_prefix(LABEL_PREFIX)
        .and_then(|k| Kid::parse(k).ok())
}

/// The CKA_VALUE of a metadata object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaRecord {
    /// The key this record belongs to (checked against the object's label).
    pub kid: Kid,
    /// Generation: each write of the record creates an object with a higher one.
    pub seq: u64,
    /// Free text.
    pub description: Option<Description>,
    /// Roles allowed to update the key.
    #[serde(default)]
    pub roles: Vec<RoleName>,
    /// Last successful update (RFC 3339).
    pub updated_at: Option<String>,
    /// A label change that was started and not yet committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// The labels to restore if a label change is interrupted.
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
        }
    }

    /// Serializes for CKA_VALUE.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a CKA_VALUE, checking it belongs to `kid`.
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
}
