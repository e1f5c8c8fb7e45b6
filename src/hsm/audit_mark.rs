//! The audit trail's high-water mark in the token: two private CKO_DATA objects
//! (CKA_APPLICATION [`APPLICATION`]) whose CKA_LABEL holds the record `audit` encodes.
//! Writes alternate between the two, so a write torn by a crash (SoftHSM2's file store
//! rewrites in place) leaves the other one whole; the reader keeps the higher record. The
//! record itself is opaque here: `audit` owns its format, `daemon` carries it across.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use std::sync::Mutex;

use super::{Hsm, HsmError, ObjectRef};
use crate::sync;

/// CKA_APPLICATION of the two mark objects.
pub const APPLICATION: &[u8] = b"hsmkeyd.audit.v1";

/// The two mark objects and which one the next write goes to.
#[derive(Debug)]
pub struct AuditMark {
    /// Login generation the handles belong to, the handles, the next slot to write.
    slots: Mutex<(u64, [ObjectHandle; 2], usize)>,
}

impl AuditMark {
    /// The slot (0 or 1) the next write goes to: the one holding the lower record, so the
    /// higher one survives a torn write.
    pub fn write_first(&self, slot: usize) {
        sync::lock(&self.slots).2 = slot.min(1);
    }
}

impl Hsm {
    /// Finds the mark objects (creating the missing ones, with `initial` as their label)
    /// and returns them with the labels of both, in slot order, so the caller can pick the
    /// higher record and [`AuditMark::write_first`] the other. Startup only: this searches
    /// the token.
    pub fn audit_mark(&self, initial: &[u8]) -> Result<(AuditMark, Vec<Vec<u8>>), HsmError> {
        let mut found = self.find_marks()?;
        if found.len() > 2 {
            return Err(HsmError::internal(
                "C_FindObjects",
                format!(
                    "{} data objects of application {} are in the token; hsmkeyd keeps two",
                    found.len(),
                    String::from_utf8_lossy(APPLICATION)
                ),
            ));
        }
        while found.len() < 2 {
            let r = self.create_data(initial, APPLICATION, b"")?;
            found.push((r.0, initial.to_vec()));
        }
        let labels: Vec<Vec<u8>> = found.iter().map(|(_, l)| l.clone()).collect();
        let handles = [found[0].0, found[1].0];
        Ok((
            AuditMark {
                slots: Mutex::new((self.login_generation(), handles, 0)),
            },
            labels,
        ))
    }

    /// Writes `label` into the older of the two mark objects: one C_SetAttributeValue
    /// (a search first only when a new login may have renumbered the objects).
    pub fn write_audit_mark(&self, mark: &AuditMark, label: &[u8]) -> Result<(), HsmError> {
        let mut slots = sync::lock(&mark.slots);
        let now = self.login_generation();
        if slots.0 != now {
            let found = self.find_marks()?;
            let [a, b] = found.as_slice() else {
                return Err(HsmError::internal(
                    "C_FindObjects",
                    "the audit high-water mark objects are gone from the token",
                ));
            };
            slots.0 = now;
            slots.1 = [a.0, b.0];
        }
        let h = slots.1[slots.2];
        self.set_label(ObjectRef(h), label)?;
        slots.2 = 1 - slots.2;
        Ok(())
    }

    fn find_marks(&self) -> Result<Vec<(ObjectHandle, Vec<u8>)>, HsmError> {
        self.pool().run(|s| {
            let handles = s.find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(APPLICATION.to_vec()),
            ])?;
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                let mut label = Vec::new();
                for a in s.get_attributes(h, &[AttributeType::Label])? {
                    if let Attribute::Label(l) = a {
                        label = l;
                    }
                }
                out.push((h, label));
            }
            Ok(out)
        })
    }
}
