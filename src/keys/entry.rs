//! One logical key as the index holds it: its objects and its metadata, from which the
//! JSON view is derived when asked for ([`Entry::view`]; only its etag and state are kept,
//! so the index holds each label once). Grouping a token's objects into keys happens here.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::meta::{self, AttrSet, Layout, MetaRecord};
use super::model::{KeyAttributes, KeyClass, KeyState, KeyType, KeyView, Kid, RoleName};
use crate::hsm::{is_reserved_label, Algorithm, Curve, KeyAttr, ObjectInfo, ObjectKind, ObjectRef};

/// The metadata of a key, when there is some.
#[derive(Debug, Clone)]
pub struct MetaSlot {
    /// The CKO_DATA object holding the newest record in the token (`None`: the record is
    /// not in the token yet and the background worker will create it).
    pub object: Option<ObjectRef>,
    /// A second v2 object whose label holds an older record: the next in-place write goes
    /// there, so a write torn by a crash (some tokens, SoftHSM2's file store among them,
    /// rewrite an object's file in place) never destroys the newest record.
    pub spare: Option<ObjectRef>,
    /// The object's layout.
    pub layout: Layout,
    /// Whether the object's CKA_LABEL carries the record (so it is rewritten in place).
    pub in_label: bool,
    /// The record as the key has it now (ahead of the token while `dirty`).
    pub record: MetaRecord,
    /// The token holds an older `updated_at`, or a `relabel` that is done: the worker
    /// writes `record` (without `relabel`) when the key has been quiet for a moment.
    pub dirty: bool,
}

/// A key in the index.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Key objects and certificates sharing the id.
    pub objects: Vec<ObjectInfo>,
    /// The metadata (boxed: keys no record names yet, all of a token hsmkeyd has not
    /// written to, then carry one pointer instead of the slot).
    pub meta: Option<Box<MetaSlot>>,
    /// Superseded metadata objects (older generations) the worker is to destroy.
    pub stale: Vec<ObjectRef>,
    /// The key is inconsistent only because its objects carry different labels, which a
    /// label update repairs.
    pub labels_differ_only: bool,
    /// The key's id.
    kid: Kid,
    /// What the key is made of.
    class: KeyClass,
    /// Where in `objects` the object is whose label and type the key shows.
    primary: usize,
    /// Why the key reads inconsistent (`None`: it is ok).
    problem: Option<Box<str>>,
    /// The view's etag (see [`etag_of`]).
    etag: [u8; 16],
}

/// Objects of one id before they become an entry.
#[derive(Default)]
pub struct Group {
    /// Key objects and certificates.
    pub objects: Vec<ObjectInfo>,
    /// Metadata objects naming this id (more than one only after an interrupted write).
    pub metas: Vec<ObjectInfo>,
}

/// Groups scanned objects by id. Objects without a usable CKA_ID, foreign data objects and
/// hsmkeyd's signing pairs are left out; the count of left-out key objects is returned for the log.
pub fn group(objects: Vec<ObjectInfo>) -> (BTreeMap<Kid, Group>, usize) {
    let mut groups: BTreeMap<Kid, Group> = BTreeMap::new();
    let mut skipped = 0;
    for o in objects {
        // hsmkeyd's own signing pairs (tokens, audit) are not managed keys.
        if is_reserved_label(&o.label) && o.kind != ObjectKind::Data {
            continue;
        }
        match o.kind {
            ObjectKind::SecretKey
            | ObjectKind::PrivateKey
            | ObjectKind::PublicKey
            | ObjectKind::Certificate => match Kid::from_id(&o.id) {
                // Room for one: most keys are one object, and a vector that grows from
                // empty takes room for four (800 bytes a key, freed again once the entry
                // is built, but by then it has spread the heap for the daemon's life).
                Some(kid) => groups
                    .entry(kid)
                    .or_insert_with(|| Group {
                        objects: Vec::with_capacity(1),
                        metas: Vec::new(),
                    })
                    .objects
                    .push(o),
                None => skipped += 1,
            },
            ObjectKind::Data if Layout::of(o.application.as_deref()).is_some() => {
                if let Some(kid) = meta::kid_of_label(&o.label) {
                    groups.entry(kid).or_default().metas.push(o);
                }
            }
            _ => {}
        }
    }
    (groups, skipped)
}

/// Kind name used in pending records and messages.
pub fn kind_name(k: ObjectKind) -> &'static str {
    match k {
        ObjectKind::SecretKey => "secret",
        ObjectKind::PrivateKey => "private",
        ObjectKind::PublicKey => "public",
        ObjectKind::Certificate => "certificate",
        ObjectKind::Data => "data",
        ObjectKind::Other => "other",
    }
}

impl Entry {
    /// Builds the entry of `kid`, or `None` when the id has no key object (a lone
    /// certificate, or metadata whose key was deleted).
    pub fn build(kid: &Kid, group: Group) -> Option<Entry> {
        let Group { objects, metas } = group;
        let mut problem = None;
        let mut parsed = Vec::new();
        let mut unreadable = Vec::new();
        let mut seen = Vec::new();
        for m in &metas {
            if seen.contains(&m.handle) {
                continue;
            }
            seen.push(m.handle);
            let layout = Layout::of(m.application.as_deref()).unwrap_or(Layout::V2);
            match meta::record_of(kid, &m.label, m.value.as_deref()) {
                Ok(record) => {
                    let in_label = m.label != meta::object_label(kid);
                    parsed.push((record, m.handle, layout, in_label));
                }
                Err(e) => unreadable.push((m.handle, e)),
            }
        }
        // The highest generation is the truth; the next one, if it is a v2 record kept in
        // a label, is the spare the next write overwrites; the rest are superseded.
        parsed.sort_by_key(|p| std::cmp::Reverse(p.0.seq));
        let mut parsed = parsed.into_iter();
        let meta = parsed.next().map(|(record, object, layout, in_label)| {
            Box::new(MetaSlot {
                object: Some(object),
                spare: None,
                layout,
                in_label,
                record,
                dirty: false,
            })
        });
        let mut stale = Vec::new();
        let mut meta = meta;
        for (_, object, layout, in_label) in parsed {
            match &mut meta {
                Some(m) if m.spare.is_none() && m.in_label && in_label && layout == Layout::V2 => {
                    m.spare = Some(object)
                }
                _ => stale.push(object),
            }
        }
        for (object, e) in unreadable {
            if meta.is_some() {
                // Garbage beside a good record (a torn write of a spare) is only removed.
                tracing::warn!(%kid, error = %e, "an unreadable metadata object is removed");
                stale.push(object);
            } else {
                let _ = problem.get_or_insert(e);
            }
        }
        let mut e = Entry::assemble(kid, objects, meta, problem)?;
        e.stale = stale;
        Some(e)
    }

    /// Derives class, type, attributes, state and etag from objects and metadata.
    pub fn assemble(
        kid: &Kid,
        mut objects: Vec<ObjectInfo>,
        meta: Option<Box<MetaSlot>>,
        mut problem: Option<String>,
    ) -> Option<Entry> {
        // The scan grows each id's vector one push at a time (room for four); the index
        // keeps an entry per key for the daemon's life, so it keeps only what it holds.
        objects.shrink_to_fit();
        let count = |k| objects.iter().filter(|o| o.kind == k).count();
        let (secrets, privates, publics) = (
            count(ObjectKind::SecretKey),
            count(ObjectKind::PrivateKey),
            count(ObjectKind::PublicKey),
        );
        let class = match (secrets, privates, publics) {
            (0, 0, 0) => return None,
            (s, 0, 0) if s >= 1 => KeyClass::Secret,
            (0, p, q) if p >= 1 && q >= 1 => KeyClass::KeyPair,
            (0, p, 0) if p >= 1 => KeyClass::PrivateOnly,
            (0, 0, _) => KeyClass::PublicOnly,
            _ => KeyClass::Secret,
        };
        if secrets > 1 || privates > 1 || publics > 1 {
            let _ = problem.get_or_insert(format!(
                "{} objects of one class share the id ({secrets} secret, {privates} private, \
                 {publics} public)",
                secrets.max(privates).max(publics)
            ));
        } else if secrets == 1 && privates + publics > 0 {
            let _ = problem
                .get_or_insert("a secret key and an asymmetric key share the id".to_string());
        }
        let primary_at = objects
            .iter()
            .position(|o| matches!(o.kind, ObjectKind::SecretKey | ObjectKind::PrivateKey))
            .or_else(|| objects.iter().position(|o| o.kind == ObjectKind::PublicKey))?;
        let algs: Vec<_> = objects
            .iter()
            .filter(|o| o.kind != ObjectKind::Certificate)
            .filter_map(|o| o.algorithm.clone())
            .collect();
        if algs.windows(2).any(|w| w[0] != w[1]) {
            let _ = problem
                .get_or_insert("objects sharing the id have different key types".to_string());
        }
        if let Some(m) = &meta {
            if m.record.pending.is_some() {
                let _ = problem.get_or_insert(
                    "an interrupted label change could not be rolled back; restart to retry"
                        .to_string(),
                );
            }
            if let Some(marker) = &m.record.attrs {
                if !attrs_done(&objects, marker) {
                    let _ = problem.get_or_insert(
                        "an interrupted attribute change could not be completed; restart to \
                         retry"
                            .to_string(),
                    );
                }
            }
            if let Some(l) = m.record.relabel_bytes() {
                if objects.iter().any(|o| o.label != l) {
                    let _ = problem.get_or_insert(
                        "an interrupted label change could not be completed; restart to retry"
                            .to_string(),
                    );
                }
            }
        }
        // An update sets every object's label; objects that disagree without a pending
        // record were changed half-way (or outside hsmkeyd) and must not read as `ok`.
        let mut labels: Vec<&[u8]> = objects.iter().map(|o| o.label.as_slice()).collect();
        labels.sort();
        labels.dedup();
        let labels_differ_only = labels.len() > 1 && problem.is_none();
        if labels_differ_only {
            let _ = problem.get_or_insert(format!(
                "its objects carry different labels ({}); updating the label sets them all \
                 alike",
                objects
                    .iter()
                    .map(|o| format!(
                        "{} {:?}",
                        kind_name(o.kind),
                        String::from_utf8_lossy(&o.label)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(at) = meta.as_ref().and_then(|m| m.record.updated_at.as_deref()) {
            if let Err(e) = OffsetDateTime::parse(at, &Rfc3339) {
                tracing::warn!(%kid, updated_at = at, error = %e,
                    "the metadata record's updated_at is not RFC 3339; it is left out");
            }
        }
        let mut entry = Entry {
            objects,
            meta,
            stale: Vec::new(),
            labels_differ_only,
            kid: kid.clone(),
            class,
            primary: primary_at,
            problem: problem.map(String::into_boxed_str),
            etag: [0; 16],
        };
        entry.etag = etag_of(&entry.unstamped_view(), &entry.objects);
        Some(entry)
    }

    /// The key's id.
    pub fn kid(&self) -> &Kid {
        &self.kid
    }

    /// The label the key shows (its main object's).
    pub fn label(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.objects[self.primary].label)
    }

    /// The roles its record names (none without a record).
    pub fn roles(&self) -> &[RoleName] {
        self.meta.as_ref().map_or(&[], |m| &m.record.roles)
    }

    /// The key's CKA_END_DATE as it shows it.
    pub fn not_after(&self) -> Option<time::Date> {
        self.dated().end_date
    }

    /// The etag of the key's view.
    pub fn etag(&self) -> String {
        hex::encode(self.etag)
    }

    /// The object whose dates the key shows: the public key when there is one (some tokens
    /// cannot read back the dates of private objects, see `hsm::objects`).
    fn dated(&self) -> &ObjectInfo {
        let objects = &self.objects;
        objects
            .iter()
            .find(|o| o.kind == ObjectKind::PublicKey)
            .unwrap_or(&objects[self.primary])
    }

    /// What the API shows of the key.
    pub fn view(&self) -> KeyView {
        let mut view = self.unstamped_view();
        view.etag = self.etag();
        view
    }

    /// The view without its etag (the etag is a hash of this).
    fn unstamped_view(&self) -> KeyView {
        let (objects, kid, primary) = (&self.objects, &self.kid, &self.objects[self.primary]);
        let find = |k| objects.iter().find(|o| o.kind == k);
        let dated = self.dated();
        let private = find(ObjectKind::PrivateKey).or(find(ObjectKind::SecretKey));
        let public = find(ObjectKind::PublicKey).or(find(ObjectKind::SecretKey));
        let flag = |o: Option<&ObjectInfo>, f: fn(&ObjectInfo) -> Option<bool>| {
            o.and_then(f).unwrap_or(false)
        };
        let attributes = KeyAttributes {
            sensitive: private.and_then(|o| o.sensitive),
            extractable: private.and_then(|o| o.extractable),
            modifiable: objects.iter().all(|o| o.modifiable != Some(false)),
            sign: flag(private, |o| o.sign),
            verify: flag(public, |o| o.verify),
            encrypt: flag(public, |o| o.encrypt),
            decrypt: flag(private, |o| o.decrypt),
            wrap: flag(public, |o| o.wrap),
            unwrap: flag(private, |o| o.unwrap),
            derive: flag(private, |o| o.derive),
        };
        let curve = || {
            objects
                .iter()
                .find_map(|o| o.curve.clone())
                .unwrap_or(Curve::Unknown(None))
        };
        let modulus_bits = objects.iter().find_map(|o| o.modulus_bits);
        let value_bits = primary.value_len.map(|l| l * 8);
        let (key_type, curve, bits) = match primary.algorithm.clone() {
            Some(Algorithm::Aes) => (KeyType::Aes, None, value_bits),
            Some(Algorithm::GenericSecret) => (KeyType::GenericSecret, None, value_bits),
            Some(Algorithm::Rsa) => (KeyType::Rsa, None, modulus_bits),
            Some(Algorithm::Ec) => (KeyType::Ec, Some(curve()), None),
            Some(Algorithm::EcEdwards) => (KeyType::Edwards(curve()), None, None),
            Some(Algorithm::EcMontgomery) => (KeyType::Montgomery(curve()), None, None),
            Some(Algorithm::Other(name)) => (KeyType::Other(name), None, None),
            None => (KeyType::Unknown, None, None),
        };
        let record = self.meta.as_ref().map(|m| &m.record);
        KeyView {
            kid: kid.clone(),
            label: self.label().into_owned(),
            description: record
                .and_then(|r| r.description.as_ref())
                .map(|d| d.as_str().to_string()),
            roles: self.roles().to_vec(),
            key_type,
            curve,
            bits,
            class: self.class,
            has_certificate: find(ObjectKind::Certificate).is_some(),
            attributes,
            not_before: dated.start_date,
            not_after: dated.end_date,
            updated_at: record.and_then(updated_at),
            state: match &self.problem {
                None => KeyState::Ok,
                Some(p) => KeyState::Inconsistent(p.to_string()),
            },
            etag: String::new(),
        }
    }
}

/// What objects of each kind a record's attribute marker names still lack: (object index,
/// attributes to write). `None` when the marker names something this daemon cannot write.
pub fn attrs_missing(
    objects: &[ObjectInfo],
    marker: &BTreeMap<String, AttrSet>,
) -> Option<Vec<(usize, Vec<KeyAttr>)>> {
    let mut out = Vec::new();
    for (kind, set) in marker {
        let attrs = set.attrs()?;
        for (i, o) in objects.iter().enumerate() {
            if kind_name(o.kind) != kind {
                continue;
            }
            let missing: Vec<KeyAttr> = attrs.iter().filter(|a| !a.held_by(o)).cloned().collect();
            if !missing.is_empty() {
                out.push((i, missing));
            }
        }
    }
    Some(out)
}

fn attrs_done(objects: &[ObjectInfo], marker: &BTreeMap<String, AttrSet>) -> bool {
    attrs_missing(objects, marker).is_some_and(|m| m.is_empty())
}

/// A strong validator over everything the view shows plus every object's label (labels of
/// secondary objects are not in the view but a label change must change the etag).
fn etag_of(view: &KeyView, objects: &[ObjectInfo]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(view).unwrap_or_default());
    for o in objects {
        h.update(kind_name(o.kind).as_bytes());
        h.update((o.label.len() as u64).to_be_bytes());
        h.update(&o.label);
        // Dates of secondary objects are not in the view either.
        for d in [o.start_date, o.end_date] {
            h.update(d.map(meta::date_text).unwrap_or_default().as_bytes());
            h.update(b";");
        }
    }
    let mut tag = [0; 16];
    tag.copy_from_slice(&h.finalize()[..16]);
    tag
}

/// The record's `updated_at`; one that is not RFC 3339 (hsmkeyd never writes such) shows
/// as never updated (and is logged once, when the entry is built).
fn updated_at(record: &MetaRecord) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(record.updated_at.as_deref()?, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index holds one entry per key for the daemon's life (at 10,000 keys every 100
    /// bytes here are a MiB of RSS): a key no record names yet carries one pointer for
    /// its metadata slot, not the slot, and the JSON view is derived when asked for, not
    /// kept (it held the label, the kid and the etag a second time, as strings).
    #[test]
    fn an_index_entry_stays_small() {
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 136, "Entry is {size} bytes");
        assert_eq!(
            std::mem::size_of::<Option<Box<MetaSlot>>>(),
            std::mem::size_of::<usize>()
        );
    }
}
