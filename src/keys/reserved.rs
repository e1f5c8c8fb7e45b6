//! hsmkeyd's own objects, as a scan finds them: the token-signing pair, the audit-signing
//! pair, the audit trail's high-water mark objects (with their records) and the Encedo
//! device key. They are not
//! managed keys; the daemon takes them from the opening scan, so startup searches the
//! token once (on SoftHSM2 every C_FindObjects reads every object of the token again).

use crate::hsm::{
    audit_mark, Algorithm, ObjectInfo, ObjectKind, ObjectRef, AUDIT_SIGNING_KEY_LABEL,
    DEVICE_KEY_LABEL, SIGNING_KEY_LABEL,
};

/// The EC private and public key objects under one reserved label.
pub type Pair = (Vec<ObjectRef>, Vec<ObjectRef>);

/// The token-signing pair's objects: the private keys with their CKA_ID (which tells the
/// token served from any other, `health.rs`), the public keys.
pub type SigningObjects = (Vec<(ObjectRef, Vec<u8>)>, Vec<ObjectRef>);

/// What a scan found of hsmkeyd's own objects.
#[derive(Debug, Default, Clone)]
pub struct Reserved {
    /// Under the token-signing key's label.
    pub token_signing: SigningObjects,
    /// Under the audit-signing key's label.
    pub audit_signing: Pair,
    /// The audit high-water mark objects and their records.
    pub audit_marks: Vec<(ObjectRef, Vec<u8>)>,
    /// Secret keys under the Encedo device key's label.
    pub encedo_device: Vec<ObjectRef>,
}

impl Reserved {
    /// Takes note of `o` if it is one of hsmkeyd's own objects.
    pub(super) fn note(&mut self, o: &ObjectInfo) {
        if let Some(record) = audit_mark::record_of(o) {
            self.audit_marks.push((o.handle, record));
            return;
        }
        if o.label == DEVICE_KEY_LABEL.as_bytes() {
            if o.kind == ObjectKind::SecretKey {
                self.encedo_device.push(o.handle);
            }
            return;
        }
        if o.algorithm != Some(Algorithm::Ec) {
            return;
        }
        if o.label == SIGNING_KEY_LABEL.as_bytes() {
            match o.kind {
                ObjectKind::PrivateKey => self.token_signing.0.push((o.handle, o.id.clone())),
                ObjectKind::PublicKey => self.token_signing.1.push(o.handle),
                _ => {}
            }
        } else if o.label == AUDIT_SIGNING_KEY_LABEL.as_bytes() {
            match o.kind {
                ObjectKind::PrivateKey => self.audit_signing.0.push(o.handle),
                ObjectKind::PublicKey => self.audit_signing.1.push(o.handle),
                _ => {}
            }
        }
    }
}
