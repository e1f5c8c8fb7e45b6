//! Key generation in the token. Key material is made by the token and never leaves it:
//! secret and private keys are always CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, and not
//! CKA_EXTRACTABLE, whatever the caller asks.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};

use super::attributes::KeyAttr;
use super::ec::Curve;
use super::objects::Algorithm;
use super::{Hsm, HsmError, ObjectRef};

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// CKK_AES of this many bytes (16, 24, 32).
    Aes(u32),
    /// CKK_GENERIC_SECRET (HMAC) of this many bytes.
    GenericSecret(u32),
    /// CKK_EC on a Weierstrass curve.
    Ec(Curve),
    /// CKK_EC_EDWARDS on Ed25519.
    Ed25519,
    /// CKK_RSA with this modulus size, public exponent 65537.
    Rsa(u32),
}

impl KeySpec {
    /// Whether this makes a pair (private and public key objects).
    pub fn is_pair(&self) -> bool {
        !matches!(self, KeySpec::Aes(_) | KeySpec::GenericSecret(_))
    }

    /// The key type the token will report.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            KeySpec::Aes(_) => Algorithm::Aes,
            KeySpec::GenericSecret(_) => Algorithm::GenericSecret,
            KeySpec::Ec(_) => Algorithm::Ec,
            KeySpec::Ed25519 => Algorithm::EcEdwards,
            KeySpec::Rsa(_) => Algorithm::Rsa,
        }
    }
}

/// The usage flags of a new key: each goes on the objects PKCS#11 defines it for
/// (sign, decrypt, unwrap, derive on the private key; verify, encrypt, wrap on the public
/// key; all on a secret key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_VERIFY.
    pub verify: bool,
    /// CKA_ENCRYPT.
    pub encrypt: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_WRAP.
    pub wrap: bool,
    /// CKA_UNWRAP.
    pub unwrap: bool,
    /// CKA_DERIVE.
    pub derive: bool,
}

impl Usage {
    /// The flags a new key of this type gets unless the request says otherwise.
    pub fn defaults(spec: &KeySpec) -> Usage {
        match spec {
            KeySpec::Aes(_) => Usage {
                encrypt: true,
                decrypt: true,
                wrap: true,
                unwrap: true,
                ..Usage::default()
            },
            KeySpec::GenericSecret(_) | KeySpec::Ec(_) | KeySpec::Ed25519 => Usage {
                sign: true,
                verify: true,
                ..Usage::default()
            },
            KeySpec::Rsa(_) => Usage {
                sign: true,
                verify: true,
                encrypt: true,
                decrypt: true,
                ..Usage::default()
            },
        }
    }
}

/// A key to generate.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Type and size.
    pub spec: KeySpec,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// CKA_LABEL of every object.
    pub label: Vec<u8>,
    /// Usage flags.
    pub usage: Usage,
    /// CKA_START_DATE of every object (`None`: left empty).
    pub start_date: Option<time::Date>,
    /// CKA_END_DATE of every object (`None`: left empty).
    pub end_date: Option<time::Date>,
}

impl Hsm {
    /// Generates `key` in the token: one object for a secret key, (private, public) for a
    /// pair, in that order.
    pub fn generate(&self, key: &NewKey) -> Result<Vec<ObjectRef>, HsmError> {
        let u = key.usage;
        let common = |private: bool| {
            let mut t = vec![
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Modifiable(true),
                Attribute::Label(key.label.clone()),
                Attribute::Id(key.id.clone()),
            ];
            if key.start_date.is_some() {
                t.push(KeyAttr::StartDate(key.start_date).to_ck());
            }
            if key.end_date.is_some() {
                t.push(KeyAttr::EndDate(key.end_date).to_ck());
            }
            t
        };
        let hidden = [Attribute::Sensitive(true), Attribute::Extractable(false)];
        let (mechanism, public_extra) = match &key.spec {
            KeySpec::Aes(bytes) | KeySpec::GenericSecret(bytes) => {
                let mut t = common(true);
                t.extend(hidden.iter().cloned());
                t.extend([
                    Attribute::ValueLen((*bytes as u64).into()),
                    Attribute::Sign(u.sign),
                    Attribute::Verify(u.verify),
                    Attribute::Encrypt(u.encrypt),
                    Attribute::Decrypt(u.decrypt),
                    Attribute::Wrap(u.wrap),
                    Attribute::Unwrap(u.unwrap),
                    Attribute::Derive(u.derive),
                ]);
                let mechanism = if matches!(key.spec, KeySpec::Aes(_)) {
                    Mechanism::AesKeyGen
                } else {
                    Mechanism::GenericSecretKeyGen
                };
                let live = self.live()?;
                let h = live.pool.run(|s| s.generate_key(&mechanism, &t))?;
                return Ok(vec![live.object(h)]);
            }
            KeySpec::Ec(curve) => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(curve_params(curve)?)],
            ),
            KeySpec::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                vec![Attribute::EcParams(curve_params(&Curve::Ed25519)?)],
            ),
            KeySpec::Rsa(bits) => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits((*bits as u64).into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ],
            ),
        };
        let mut public = common(false);
        public.extend(public_extra);
        public.extend([
            Attribute::Verify(u.verify),
            Attribute::Encrypt(u.encrypt),
            Attribute::Wrap(u.wrap),
        ]);
        let mut private = common(true);
        private.extend(hidden.iter().cloned());
        private.extend([
            Attribute::Sign(u.sign),
            Attribute::Decrypt(u.decrypt),
            Attribute::Unwrap(u.unwrap),
            Attribute::Derive(u.derive),
        ]);
        let live = self.live()?;
        let (pubk, privk): (ObjectHandle, ObjectHandle) = live
            .pool
            .run(|s| s.generate_key_pair(&mechanism, &public, &private))?;
        Ok(vec![live.object(privk), live.object(pubk)])
    }
}

fn curve_params(c: &Curve) -> Result<Vec<u8>, HsmError> {
    c.params()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| HsmError::internal("C_GenerateKeyPair", format!("no OID for curve {c}")))
}
