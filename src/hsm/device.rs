//! The Encedo login's device key: an X25519 private key that never exists in a file.
//!
//! SoftHSM 2.6.1 cannot hold an X25519 key: it has no CKM_EC_MONTGOMERY_KEY_PAIR_GEN, and
//! its CKM_ECDH1_DERIVE takes Weierstrass keys only (112..521 bits). So the key is derived
//! at start: C_Sign with CKM_SHA256_HMAC, under a token secret key that is sensitive and
//! not extractable ([`DEVICE_KEY_LABEL`], created on first start), over a fixed message.
//! The 32 bytes are the X25519 private key; they live in the daemon's memory only (wiped
//! on drop), the same on every start with the same token, and gone with the token.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use zeroize::Zeroizing;

use super::{Hsm, HsmError, ObjectRef};

/// CKA_LABEL of the generic secret key the device key is derived from.
pub const DEVICE_KEY_LABEL: &str = "hsmkeyd-encedo-device";

/// What the secret key signs: naming the purpose and a version, so a change of derivation
/// gives another key rather than reusing this one.
const DERIVATION_MESSAGE: &[u8] = b"hsmkeyd encedo device x25519 v1";

impl Hsm {
    /// The device's X25519 private key, derived through the token (see the module doc),
    /// from the secret keys a scan found under [`DEVICE_KEY_LABEL`]; the key is created
    /// when there is none. Startup only.
    pub fn encedo_device_secret(
        &self,
        found: &[ObjectRef],
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        let label = DEVICE_KEY_LABEL.as_bytes().to_vec();
        let live = self.live()?;
        let found = found
            .iter()
            .map(|r| live.handle(*r))
            .collect::<Result<Vec<_>, _>>()?;
        let key = match found.as_slice() {
            [k] => *k,
            [] => {
                let template = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.clone()),
                ];
                let k = live
                    .pool
                    .run(|s| s.generate_key(&Mechanism::GenericSecretKeyGen, &template))?;
                tracing::info!("created the Encedo device key {DEVICE_KEY_LABEL}");
                k
            }
            many => {
                return Err(HsmError::internal(
                    "C_FindObjects",
                    format!(
                        "{} secret keys carry the reserved label {DEVICE_KEY_LABEL}; keep one",
                        many.len()
                    ),
                ))
            }
        };
        let mac = Zeroizing::new(
            live.pool
                .run(|s| s.sign(&Mechanism::Sha256Hmac, key, DERIVATION_MESSAGE))?,
        );
        let secret: [u8; 32] = mac.as_slice().try_into().map_err(|_| {
            HsmError::internal(
                "C_Sign",
                format!("CKM_SHA256_HMAC gave {} bytes, not 32", mac.len()),
            )
        })?;
        Ok(Zeroizing::new(secret))
    }
}
