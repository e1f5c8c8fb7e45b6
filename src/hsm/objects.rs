//! Objects: reading a token's objects into plain Rust values, and the few writes hsmkeyd
//! makes (CKA_LABEL of key objects; hsmkeyd's own CKO_DATA metadata objects).
//!
//! Key material is never read: CKA_VALUE is fetched only for CKO_DATA objects whose
//! CKA_APPLICATION the caller names.

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::ec::{self, Curve};
use super::{Hsm, HsmError};

/// An object of the token, opaque above this layer: its handle and the initialization of
/// the module it belongs to. Once the module is re-initialized (`Hsm::reinitialize`),
/// using it answers [`super::HsmErrorKind::Unavailable`] instead of reaching whatever
/// object now has that number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRef(pub(super) ObjectHandle, pub(super) u64);

/// CKA_CLASS, reduced to what hsmkeyd distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// CKO_SECRET_KEY.
    SecretKey,
    /// CKO_PRIVATE_KEY.
    PrivateKey,
    /// CKO_PUBLIC_KEY.
    PublicKey,
    /// CKO_CERTIFICATE.
    Certificate,
    /// CKO_DATA.
    Data,
    /// Any other class.
    Other,
}

/// CKA_KEY_TYPE, reduced to what hsmkeyd names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// CKK_AES.
    Aes,
    /// CKK_GENERIC_SECRET.
    GenericSecret,
    /// CKK_EC.
    Ec,
    /// CKK_RSA.
    Rsa,
    /// CKK_EC_EDWARDS.
    EcEdwards,
    /// CKK_EC_MONTGOMERY.
    EcMontgomery,
    /// Anything else, by its CKK_ name without the prefix, lowercase, `-` for `_`
    /// (`CKK_SHA256_HMAC` is `sha256-hmac`).
    Other(String),
}

/// The attributes hsmkeyd reads from one object. Absent attributes are `None`.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// The object.
    pub handle: ObjectRef,
    /// CKA_CLASS.
    pub kind: ObjectKind,
    /// CKA_ID (empty when absent).
    pub id: Vec<u8>,
    /// CKA_LABEL (empty when absent).
    pub label: Vec<u8>,
    /// CKA_KEY_TYPE.
    pub algorithm: Option<Algorithm>,
    /// The curve CKA_EC_PARAMS names (`None`: the object has no CKA_EC_PARAMS).
    pub curve: Option<Curve>,
    /// CKA_MODULUS_BITS, or the bit length of CKA_MODULUS.
    pub modulus_bits: Option<u32>,
    /// CKA_VALUE_LEN (bytes).
    pub value_len: Option<u32>,
    /// CKA_SENSITIVE.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    pub extractable: Option<bool>,
    /// CKA_MODIFIABLE.
    pub modifiable: Option<bool>,
    /// CKA_DESTROYABLE (PKCS#11 3.0; absent on older tokens, where every object is).
    pub destroyable: Option<bool>,
    /// CKA_SIGN.
    pub sign: Option<bool>,
    /// CKA_VERIFY.
    pub verify: Option<bool>,
    /// CKA_ENCRYPT.
    pub encrypt: Option<bool>,
    /// CKA_DECRYPT.
    pub decrypt: Option<bool>,
    /// CKA_WRAP.
    pub wrap: Option<bool>,
    /// CKA_UNWRAP.
    pub unwrap: Option<bool>,
    /// CKA_DERIVE.
    pub derive: Option<bool>,
    /// CKA_START_DATE of a key object (`None`: empty, absent or not a date).
    pub start_date: Option<time::Date>,
    /// CKA_END_DATE of a key object (`None`: empty, absent or not a date).
    pub end_date: Option<time::Date>,
    /// CKA_APPLICATION of a data object.
    pub application: Option<Vec<u8>>,
    /// CKA_VALUE, for data objects of the requested application only.
    pub value: Option<Vec<u8>>,
}

/// What a key object is read with first: [`READ`] and the dates.
const READ_WITH_DATES: &[AttributeType] = &[
    AttributeType::Class,
    AttributeType::Id,
    AttributeType::Label,
    AttributeType::KeyType,
    AttributeType::EcParams,
    AttributeType::ModulusBits,
    AttributeType::Modulus,
    AttributeType::ValueLen,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Modifiable,
    AttributeType::Destroyable,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
    AttributeType::Application,
    AttributeType::StartDate,
    AttributeType::EndDate,
];

/// The attributes every object is read with: all of [`READ_WITH_DATES`] but the dates.
const READ: &[AttributeType] = READ_WITH_DATES.split_at(READ_WITH_DATES.len() - 2).0;

fn read_one(
    s: &Session,
    h: ObjectHandle,
    epoch: u64,
    data_applications: &[&[u8]],
) -> cryptoki::error::Result<ObjectInfo> {
    let mut o = ObjectInfo {
        handle: ObjectRef(h, epoch),
        kind: ObjectKind::Other,
        id: Vec::new(),
        label: Vec::new(),
        algorithm: None,
        curve: None,
        modulus_bits: None,
        value_len: None,
        sensitive: None,
        extractable: None,
        modifiable: None,
        destroyable: None,
        sign: None,
        verify: None,
        encrypt: None,
        decrypt: None,
        wrap: None,
        unwrap: None,
        derive: None,
        start_date: None,
        end_date: None,
        application: None,
        value: None,
    };
    // One call for everything, dates included, where the module answers it (SoftHSM does
    // for all but the objects below). Where it fails, the attributes are read again
    // without the dates, and the dates of a key object in a call of their own, whose
    // failure leaves the dates unknown and never the object unreadable: cryptoki refuses a
    // date that is not digits, and SoftHSM 2.6 keeps the dates of private objects
    // unencrypted and then fails to read them back (CKR_GENERAL_ERROR once the object is
    // reloaded; SoftHSMv2 issue 655). The dates of other objects (a certificate's) are
    // not kept.
    let (attrs, dated) = match s.get_attributes(h, READ_WITH_DATES) {
        Ok(all) => (all, true),
        Err(_) => (s.get_attributes(h, READ)?, false),
    };
    let mut dates = Vec::new();
    for a in attrs {
        match a {
            Attribute::Class(c) => o.kind = kind_of(c),
            Attribute::Id(v) => o.id = v,
            Attribute::Label(v) => o.label = v,
            Attribute::KeyType(k) => o.algorithm = Some(algorithm_of(k)),
            Attribute::EcParams(v) => o.curve = Some(Curve::of_params(&v)),
            Attribute::ModulusBits(b) => {
                o.modulus_bits = u32::try_from(u64::from(b)).ok().or(o.modulus_bits)
            }
            Attribute::Modulus(m) if o.modulus_bits.is_none() => {
                let leading = m.iter().take_while(|b| **b == 0).count();
                let rest = &m[leading..];
                o.modulus_bits = rest
                    .first()
                    .map(|b| (rest.len() as u32 - 1) * 8 + (8 - b.leading_zeros()));
            }
            Attribute::ValueLen(l) => o.value_len = u32::try_from(u64::from(l)).ok(),
            Attribute::Sensitive(b) => o.sensitive = Some(b),
            Attribute::Extractable(b) => o.extractable = Some(b),
            Attribute::Modifiable(b) => o.modifiable = Some(b),
            Attribute::Destroyable(b) => o.destroyable = Some(b),
            Attribute::Sign(b) => o.sign = Some(b),
            Attribute::Verify(b) => o.verify = Some(b),
            Attribute::Encrypt(b) => o.encrypt = Some(b),
            Attribute::Decrypt(b) => o.decrypt = Some(b),
            Attribute::Wrap(b) => o.wrap = Some(b),
            Attribute::Unwrap(b) => o.unwrap = Some(b),
            Attribute::Derive(b) => o.derive = Some(b),
            Attribute::Application(v) => o.application = Some(v),
            a @ (Attribute::StartDate(_) | Attribute::EndDate(_)) => dates.push(a),
            _ => {}
        }
    }
    let key = matches!(
        o.kind,
        ObjectKind::SecretKey | ObjectKind::PrivateKey | ObjectKind::PublicKey
    );
    if key && !dated {
        match s.get_attributes(h, &[AttributeType::StartDate, AttributeType::EndDate]) {
            Ok(d) => dates = d,
            Err(e) => tracing::debug!(error = %e, "a key object's dates cannot be read"),
        }
    }
    if key {
        for a in dates {
            match a {
                Attribute::StartDate(d) => o.start_date = super::attributes::date_of(&d),
                Attribute::EndDate(d) => o.end_date = super::attributes::date_of(&d),
                _ => {}
            }
        }
    }
    let ours = |a: &[u8]| data_applications.contains(&a);
    if o.kind == ObjectKind::Data && o.application.as_deref().is_some_and(ours) {
        for a in s.get_attributes(h, &[AttributeType::Value])? {
            if let Attribute::Value(v) = a {
                o.value = Some(v);
            }
        }
    }
    Ok(o)
}

fn kind_of(c: ObjectClass) -> ObjectKind {
    match c {
        ObjectClass::SECRET_KEY => ObjectKind::SecretKey,
        ObjectClass::PRIVATE_KEY => ObjectKind::PrivateKey,
        ObjectClass::PUBLIC_KEY => ObjectKind::PublicKey,
        ObjectClass::CERTIFICATE => ObjectKind::Certificate,
        ObjectClass::DATA => ObjectKind::Data,
        _ => ObjectKind::Other,
    }
}

fn algorithm_of(k: KeyType) -> Algorithm {
    match k {
        KeyType::AES => Algorithm::Aes,
        KeyType::GENERIC_SECRET => Algorithm::GenericSecret,
        KeyType::EC => Algorithm::Ec,
        KeyType::RSA => Algorithm::Rsa,
        KeyType::EC_EDWARDS => Algorithm::EcEdwards,
        KeyType::EC_MONTGOMERY => Algorithm::EcMontgomery,
        other => Algorithm::Other(
            other
                .to_string()
                .trim_start_matches("CKK_")
                .to_ascii_lowercase()
                .replace('_', "-"),
        ),
    }
}

impl Hsm {
    /// Reads every object the logged-in user can see: one C_FindObjects pass, then the
    /// attributes of each object. CKA_VALUE is read only for CKO_DATA objects whose
    /// CKA_APPLICATION is one of `data_applications`. An object the module cannot read
    /// (a torn file after a crash, say) is left out with a warning and counted in the
    /// result, never a failed scan: the keys made of readable objects keep working.
    pub fn scan(&self, data_applications: &[&[u8]]) -> Result<Scanned, HsmError> {
        use cryptoki::error::{Error, RvError};
        let live = self.live()?;
        let epoch = live.epoch;
        live.pool.run(|s| {
            let handles = s.find_objects(&[])?;
            let mut out = Scanned {
                objects: Vec::with_capacity(handles.len()),
                unreadable: 0,
            };
            for h in handles {
                match read_one(s, h, epoch, data_applications) {
                    Ok(o) => out.objects.push(o),
                    // Deleted by another application between the find and the read.
                    Err(Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                    // The session or the token itself failed: the whole scan did.
                    Err(e @ Error::Pkcs11(rv, _))
                        if super::Ckr::of(rv).kind() == super::HsmErrorKind::Unavailable =>
                    {
                        return Err(e)
                    }
                    Err(e) => {
                        tracing::warn!(error = %HsmError::from_ck(&e),
                            "an object of the token cannot be read; it is left out");
                        out.unreadable += 1;
                    }
                }
            }
            Ok(out)
        })
    }

    /// Reads one object again (after a write, or to check it still exists).
    pub fn read(&self, r: ObjectRef, data_applications: &[&[u8]]) -> Result<ObjectInfo, HsmError> {
        let live = self.live()?;
        let h = live.handle(r)?;
        live.pool.run(|s| read_one(s, h, r.1, data_applications))
    }

    /// Sets CKA_LABEL of one object.
    pub fn set_label(&self, r: ObjectRef, label: &[u8]) -> Result<(), HsmError> {
        let live = self.live()?;
        let h = live.handle(r)?;
        live.pool
            .run(|s| s.update_attributes(h, &[Attribute::Label(label.to_vec())]))
    }

    /// Creates a private token CKO_DATA object.
    pub fn create_data(
        &self,
        label: &[u8],
        application: &[u8],
        value: &[u8],
    ) -> Result<ObjectRef, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Label(label.to_vec()),
            Attribute::Application(application.to_vec()),
            Attribute::Value(value.to_vec()),
        ];
        let live = self.live()?;
        live.pool
            .run(|s| s.create_object(&template))
            .map(|h| live.object(h))
    }

    /// Destroys an object.
    pub fn destroy(&self, r: ObjectRef) -> Result<(), HsmError> {
        let live = self.live()?;
        let h = live.handle(r)?;
        live.pool.run(|s| s.destroy_object(h))
    }
}

/// What a scan found.
#[derive(Debug, Clone)]
pub struct Scanned {
    /// The objects that could be read.
    pub objects: Vec<ObjectInfo>,
    /// How many objects the module could not read (left out).
    pub unreadable: usize,
}

/// The public parts of a key object, as the token stores them. Reading them never touches
/// private or secret material: CKA_EC_POINT and CKA_PUBLIC_KEY_INFO exist on public keys
/// only, and CKA_MODULUS / CKA_PUBLIC_EXPONENT are public on RSA private keys too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicParts {
    /// The public point of an EC, Edwards or Montgomery public key, out of its DER
    /// wrapping (`04 || X || Y` for Weierstrass curves, the raw key bytes for the others);
    /// `None` when the object has no CKA_EC_POINT or it holds no point of the key's curve
    /// (see [`ec::public_point`]).
    pub ec_point: Option<Vec<u8>>,
    /// CKA_MODULUS (RSA), big-endian.
    pub modulus: Option<Vec<u8>>,
    /// CKA_PUBLIC_EXPONENT (RSA), big-endian.
    pub public_exponent: Option<Vec<u8>>,
}

impl Hsm {
    /// Reads the public parts of a key object (absent attributes stay `None`).
    pub fn public_parts(&self, r: ObjectRef) -> Result<PublicParts, HsmError> {
        let live = self.live()?;
        let h = live.handle(r)?;
        live.pool.run(|s| {
            let mut p = PublicParts::default();
            let (mut point, mut curve) = (None, Curve::Unknown(None));
            for a in s.get_attributes(
                h,
                &[
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )? {
                match a {
                    Attribute::EcParams(v) => curve = Curve::of_params(&v),
                    Attribute::EcPoint(v) => point = Some(v),
                    Attribute::Modulus(v) => p.modulus = Some(v),
                    Attribute::PublicExponent(v) => p.public_exponent = Some(v),
                    _ => {}
                }
            }
            if let Some(raw) = point {
                p.ec_point = ec::public_point(&raw, &curve);
                if p.ec_point.is_none() {
                    tracing::warn!(%curve, ec_point = %hex::encode(&raw),
                        "CKA_EC_POINT holds no point of the key's curve; no public key is shown");
                }
            }
            Ok(p)
        })
    }
}
