//! The audit trail's high-water mark in the token: private CKO_DATA objects
//! (CKA_APPLICATION [`APPLICATION`]) each holding one record that `audit` encodes (opaque
//! here; `daemon` carries it across). Two objects are kept and writes alternate between
//! them, so a write torn by a crash (SoftHSM2's file store rewrites in place) leaves the
//! other whole; the reader keeps the higher record.
//!
//! As for key metadata (`keys/meta.rs`), the record lives in CKA_LABEL
//! (`hsmkeyd-audit-mark <record>`: one C_SetAttributeValue per write); a token that refuses
//! labels that long gets the record in CKA_VALUE of a new object per write (label
//! `hsmkeyd-audit-mark`), and the object it replaces is destroyed. Mark writes happen at
//! start and at each audit checkpoint, never while a client waits.

use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use std::sync::Mutex;

use super::{Ckr, Hsm, HsmError, ObjectInfo, ObjectKind, ObjectRef};
use crate::sync;

/// CKA_APPLICATION of the mark objects.
pub const APPLICATION: &[u8] = b"hsmkeyd.audit.v1";
/// CKA_LABEL of a mark object whose record is in CKA_VALUE; a label holding the record
/// starts with this and one space.
const LABEL: &[u8] = b"hsmkeyd-audit-mark";

#[derive(Debug)]
struct Slots {
    /// Login generation the handles belong to.
    generation: u64,
    handles: [ObjectRef; 2],
    /// The slot the next write goes to.
    next: usize,
    /// The token refused a label holding the record: records go to CKA_VALUE.
    in_value: bool,
    /// The record written last (to tell the slots apart after a re-login).
    last: Vec<u8>,
}

/// The two mark objects and which one the next write goes to.
#[derive(Debug)]
pub struct AuditMark {
    slots: Mutex<Slots>,
}

impl AuditMark {
    /// The slot (0 or 1) the next write goes to: the one holding the lower record, so the
    /// higher one survives a torn write.
    pub fn write_first(&self, slot: usize) {
        sync::lock(&self.slots).next = slot.min(1);
    }
}

/// The record of a mark object as a scan read it (the scan must have asked for
/// [`APPLICATION`]'s values); `None` for every other object.
pub fn record_of(o: &ObjectInfo) -> Option<Vec<u8>> {
    (o.kind == ObjectKind::Data && o.application.as_deref() == Some(APPLICATION))
        .then(|| record_in(&o.label, o.value.clone().unwrap_or_default()))
}

/// A mark object's record: in its label after [`LABEL`] and a space, else its CKA_VALUE.
fn record_in(label: &[u8], value: Vec<u8>) -> Vec<u8> {
    match label.strip_prefix(LABEL) {
        Some([b' ', rest @ ..]) => rest.to_vec(),
        _ => value,
    }
}

fn label_with(record: &[u8]) -> Vec<u8> {
    let mut l = LABEL.to_vec();
    l.push(b' ');
    l.extend_from_slice(record);
    l
}

impl Hsm {
    /// Takes the mark objects a scan found ([`record_of`]), creating them with `initial`
    /// when there are fewer than two, and returns the records of both, in slot order, so
    /// the caller can pick the higher and [`AuditMark::write_first`] the other. More than
    /// two (a crash between a create and a destroy) are cut down to the two the caller's
    /// `rank` puts highest. Startup only.
    pub fn audit_mark_among(
        &self,
        found: &[(ObjectRef, Vec<u8>)],
        initial: &[u8],
        rank: impl Fn(&[u8]) -> Option<u64>,
    ) -> Result<(AuditMark, [Vec<u8>; 2]), HsmError> {
        let mut found = found.to_vec();
        found.sort_by_key(|(_, r)| std::cmp::Reverse(rank(r)));
        for (h, _) in found.drain(found.len().min(2)..) {
            self.destroy(h)?;
        }
        while found.len() < 2 {
            let r = self.create_data(LABEL, APPLICATION, initial)?;
            found.push((r, initial.to_vec()));
        }
        let records = [found[0].1.clone(), found[1].1.clone()];
        Ok((
            AuditMark {
                slots: Mutex::new(Slots {
                    generation: self.login_generation(),
                    handles: [found[0].0, found[1].0],
                    next: 0,
                    in_value: false,
                    last: Vec::new(),
                }),
            },
            records,
        ))
    }

    /// Writes `record` into the older of the two mark objects: one C_SetAttributeValue (a
    /// search first only when a new login may have renumbered the objects), or on a token
    /// that caps labels a new object and the destruction of the one it replaces.
    pub fn write_audit_mark(&self, mark: &AuditMark, record: &[u8]) -> Result<(), HsmError> {
        let mut slots = sync::lock(&mark.slots);
        let now = self.login_generation();
        let epoch = self.live()?.epoch;
        if slots.generation != now || slots.handles[0].1 != epoch {
            let found = self.find_marks()?;
            let [a, b] = found.as_slice() else {
                return Err(HsmError::internal(
                    "C_FindObjects",
                    "the audit high-water mark objects are gone from the token",
                ));
            };
            // The slot to write next is the one not holding the last record written.
            slots.generation = now;
            slots.handles = [a.0, b.0];
            if !slots.last.is_empty() {
                slots.next = usize::from(a.1 == slots.last);
            }
        }
        let at = slots.next;
        let old = slots.handles[at];
        if !slots.in_value {
            match self.set_label(old, &label_with(record)) {
                Ok(()) => {
                    slots.next = 1 - at;
                    slots.last = record.to_vec();
                    return Ok(());
                }
                Err(e) if e.ckr() == Some(&Ckr::AttributeValueInvalid) => {
                    tracing::info!(
                        "the token refuses long labels; the audit high-water mark goes to \
                         CKA_VALUE of new objects"
                    );
                    slots.in_value = true;
                }
                Err(e) => return Err(e),
            }
        }
        let new = self.create_data(LABEL, APPLICATION, record)?;
        slots.handles[at] = new;
        slots.next = 1 - at;
        slots.last = record.to_vec();
        // The other slot still holds the previous record; a failed destroy leaves a third
        // object, cut down at the next start.
        if let Err(e) = self.destroy(old) {
            tracing::warn!(error = %e, "a superseded audit high-water mark object stays in the token");
        }
        Ok(())
    }

    /// Every mark object and its record (from the label, else CKA_VALUE).
    fn find_marks(&self) -> Result<Vec<(ObjectRef, Vec<u8>)>, HsmError> {
        let live = self.live()?;
        live.pool.run(|s| {
            let handles = s.find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(APPLICATION.to_vec()),
            ])?;
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                let (mut label, mut value) = (Vec::new(), Vec::new());
                for a in s.get_attributes(h, &[AttributeType::Label, AttributeType::Value])? {
                    match a {
                        Attribute::Label(l) => label = l,
                        Attribute::Value(v) => value = v,
                        _ => {}
                    }
                }
                out.push((live.object(h), record_in(&label, value)));
            }
            Ok(out)
        })
    }
}
