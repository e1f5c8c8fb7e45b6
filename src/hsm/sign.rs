//! hsmkeyd's own signing keys: EC P-256 pairs kept in the token under reserved labels,
//! created on first start when missing, never extractable. The token-signing key
//! ([`SIGNING_KEY_LABEL`]) signs bearer tokens; the audit-signing key
//! ([`AUDIT_SIGNING_KEY_LABEL`]) signs the audit trail's checkpoints. Both sign with C_Sign
//! (CKM_ECDSA over a SHA-256 digest computed here), so the private key never leaves the
//! HSM. Neither pair is a managed key: the key index leaves them out and no update may take
//! their labels ([`is_reserved_label`]).

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use sha2::{Digest, Sha256};
use std::sync::Mutex;

use super::ec::{self, Curve};
use super::ObjectRef;
use super::{Hsm, HsmError};
use crate::sync;

/// CKA_LABEL of the token-signing pair (both objects).
pub const SIGNING_KEY_LABEL: &str = "hsmkeyd-jwt-signing";

/// CKA_LABEL of the audit-signing pair (both objects): signs audit checkpoints only.
pub const AUDIT_SIGNING_KEY_LABEL: &str = "hsmkeyd-audit-signing";

/// Whether `label` is one of hsmkeyd's own keys (the two signing pairs, the Encedo device
/// key), which are not managed keys: no key may be created or renamed to one (a second key
/// under it would stop the daemon from telling its own).
pub fn is_reserved_label(label: &[u8]) -> bool {
    label == SIGNING_KEY_LABEL.as_bytes()
        || label == AUDIT_SIGNING_KEY_LABEL.as_bytes()
        || label == super::DEVICE_KEY_LABEL.as_bytes()
}

/// The signing pair, opaque above this layer.
#[derive(Debug)]
pub struct SigningKey {
    /// The reserved label the pair carries.
    label: &'static str,
    /// The private key's handle and the login generation it belongs to: a token may
    /// renumber private objects across a logout, so a stale handle is looked up again.
    private: Mutex<(u64, ObjectRef)>,
    point: Vec<u8>,
    id: Vec<u8>,
}

impl SigningKey {
    /// The private key's object, as last found.
    pub fn private_ref(&self) -> ObjectRef {
        sync::lock(&self.private).1
    }

    /// The public point, uncompressed SEC1 (0x04 || X || Y), 65 bytes.
    pub fn public_point(&self) -> &[u8] {
        &self.point
    }

    /// CKA_ID of the pair, hex: the JWT `kid` header.
    pub fn key_id(&self) -> String {
        hex::encode(&self.id)
    }

    /// CKA_ID of the pair: random, made when hsmkeyd created the pair, so it tells this
    /// token (or a copy of it) from any other.
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    /// The reserved label of the pair.
    pub fn label(&self) -> &'static str {
        self.label
    }
}

impl Hsm {
    /// CKA_ID of every private key under the reserved label `name`: one search, to tell
    /// whether the token in the slot is the one hsmkeyd served before (see
    /// [`SigningKey::id`]) without reading or writing anything else.
    pub fn signing_key_ids(&self, name: &'static str) -> Result<Vec<Vec<u8>>, HsmError> {
        self.live()?.pool.run(|s| {
            let mut ids = Vec::new();
            for h in s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(name.as_bytes().to_vec()),
            ])? {
                for a in s.get_attributes(h, &[AttributeType::Id])? {
                    if let Attribute::Id(id) = a {
                        ids.push(id);
                    }
                }
            }
            Ok(ids)
        })
    }

    /// The token-signing pair from the objects a scan found under the reserved label (EC
    /// private and public keys), so startup does not search the token again.
    pub fn signing_key_among(
        &self,
        privs: &[ObjectRef],
        pubs: &[ObjectRef],
    ) -> Result<SigningKey, HsmError> {
        self.signing_key_labelled_among(SIGNING_KEY_LABEL, privs, pubs)
    }

    /// The pair under the reserved label `name`, from the objects a scan found there, or
    /// a new pair when the token has none. Startup only.
    pub fn signing_key_labelled_among(
        &self,
        name: &'static str,
        privs: &[ObjectRef],
        pubs: &[ObjectRef],
    ) -> Result<SigningKey, HsmError> {
        self.signing_key_of(name, privs.to_vec(), pubs.to_vec())
    }

    fn signing_key_of(
        &self,
        name: &'static str,
        mut privs: Vec<ObjectRef>,
        mut pubs: Vec<ObjectRef>,
    ) -> Result<SigningKey, HsmError> {
        if privs.len() > 1 || pubs.len() > 1 {
            return Err(HsmError::internal(
                "C_FindObjects",
                format!(
                    "{} private and {} public keys carry the reserved label {name}; \
                     keep one pair",
                    privs.len(),
                    pubs.len()
                ),
            ));
        }
        let (private, public) = match (privs.pop(), pubs.pop()) {
            (Some(p), Some(q)) => (p, q),
            (None, None) => self.generate_signing_pair(name)?,
            _ => {
                return Err(HsmError::internal(
                    "C_FindObjects",
                    format!("the {name} pair is incomplete in the token; remove the lone object"),
                ))
            }
        };
        let live = self.live()?;
        let public = live.handle(public)?;
        let attrs = live
            .pool
            .run(|s| s.get_attributes(public, &[AttributeType::EcPoint, AttributeType::Id]))?;
        let (mut point, mut id) = (None, Vec::new());
        for a in attrs {
            match a {
                Attribute::EcPoint(p) => point = ec::public_point(&p, &Curve::P256),
                Attribute::Id(i) => id = i,
                _ => {}
            }
        }
        let Some(point) = point.filter(|p| p.first() == Some(&0x04)) else {
            return Err(HsmError::internal(
                "C_GetAttributeValue",
                format!("the {name} public key is not an uncompressed P-256 point"),
            ));
        };
        Ok(SigningKey {
            label: name,
            private: Mutex::new((self.login_generation(), private)),
            point,
            id,
        })
    }

    fn generate_signing_pair(
        &self,
        name: &'static str,
    ) -> Result<(ObjectRef, ObjectRef), HsmError> {
        let label = name.as_bytes();
        let id: [u8; 16] = rand::random();
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(Curve::P256.params().unwrap_or_default().to_vec()),
            Attribute::Label(label.to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Label(label.to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let live = self.live()?;
        let (pubk, privk) = live
            .pool
            .run(|s| s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private))?;
        tracing::info!(kid = %hex::encode(id), "created the signing key {name}");
        Ok((live.object(privk), live.object(pubk)))
    }

    /// An ES256 signature (r || s, 64 bytes, as JWS wants it) of `message`.
    pub fn sign_es256(&self, key: &SigningKey, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let digest = Sha256::digest(message);
        // One hold on the module for the look-up and the signature: no re-initialization
        // between them.
        let live = self.live()?;
        let private = {
            let mut slot = sync::lock(&key.private);
            let now = self.login_generation();
            if slot.0 != now || slot.1 .1 != live.epoch {
                let found = live.pool.run(|s| {
                    s.find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(key.label.as_bytes().to_vec()),
                        Attribute::Id(key.id.clone()),
                    ])
                })?;
                let [h] = found.as_slice() else {
                    return Err(HsmError::internal(
                        "C_FindObjects",
                        format!("the {} private key is gone from the token", key.label),
                    ));
                };
                *slot = (now, live.object(*h));
            }
            live.handle(slot.1)?
        };
        let sig = live
            .pool
            .run(|s| s.sign(&Mechanism::Ecdsa, private, &digest))?;
        if sig.len() != 64 {
            return Err(HsmError::internal(
                "C_Sign",
                format!("CKM_ECDSA gave {} bytes, not 64", sig.len()),
            ));
        }
        Ok(sig)
    }
}
