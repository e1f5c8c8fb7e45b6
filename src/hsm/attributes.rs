//! The attributes hsmkeyd writes to key objects after they exist (usage flags, the one-way
//! security flags, validity dates), and the one table of which usage flag fits which key
//! type (used by create and update alike).

use cryptoki::object::{Attribute, AttributeType};
use cryptoki::types::Date;

use super::generate::Usage;
use super::objects::{Algorithm, ObjectInfo, ObjectKind};
use super::{Hsm, HsmError, ObjectRef};

/// One usage flag (CKA_SIGN ... CKA_DERIVE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UsageFlag {
    /// CKA_SIGN.
    Sign,
    /// CKA_VERIFY.
    Verify,
    /// CKA_ENCRYPT.
    Encrypt,
    /// CKA_DECRYPT.
    Decrypt,
    /// CKA_WRAP.
    Wrap,
    /// CKA_UNWRAP.
    Unwrap,
    /// CKA_DERIVE.
    Derive,
}

impl UsageFlag {
    /// Every flag, in the order the API lists them.
    pub const ALL: [UsageFlag; 7] = [
        UsageFlag::Sign,
        UsageFlag::Verify,
        UsageFlag::Encrypt,
        UsageFlag::Decrypt,
        UsageFlag::Wrap,
        UsageFlag::Unwrap,
        UsageFlag::Derive,
    ];

    /// [`UsageFlag::ALL`]'s names.
    pub const ALL_NAMES: [&'static str; 7] = [
        "sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "derive",
    ];

    /// The name in request bodies (`sign`, ...).
    pub fn name(self) -> &'static str {
        match self {
            UsageFlag::Sign => "sign",
            UsageFlag::Verify => "verify",
            UsageFlag::Encrypt => "encrypt",
            UsageFlag::Decrypt => "decrypt",
            UsageFlag::Wrap => "wrap",
            UsageFlag::Unwrap => "unwrap",
            UsageFlag::Derive => "derive",
        }
    }

    /// The request field naming it (`usage.sign`, ...).
    pub fn field(self) -> &'static str {
        match self {
            UsageFlag::Sign => "usage.sign",
            UsageFlag::Verify => "usage.verify",
            UsageFlag::Encrypt => "usage.encrypt",
            UsageFlag::Decrypt => "usage.decrypt",
            UsageFlag::Wrap => "usage.wrap",
            UsageFlag::Unwrap => "usage.unwrap",
            UsageFlag::Derive => "usage.derive",
        }
    }

    /// The flag a request names, if it is one.
    pub fn parse(name: &str) -> Option<UsageFlag> {
        UsageFlag::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The object of a pair PKCS#11 defines the flag on: sign, decrypt, unwrap and derive
    /// on the private key, verify, encrypt and wrap on the public key (a secret key
    /// carries them all).
    pub fn object(self) -> ObjectKind {
        match self {
            UsageFlag::Sign | UsageFlag::Decrypt | UsageFlag::Unwrap | UsageFlag::Derive => {
                ObjectKind::PrivateKey
            }
            UsageFlag::Verify | UsageFlag::Encrypt | UsageFlag::Wrap => ObjectKind::PublicKey,
        }
    }

    /// Whether the flag goes on an object of `kind`.
    pub fn fits_object(self, kind: ObjectKind) -> bool {
        kind == ObjectKind::SecretKey || kind == self.object()
    }
}

/// **The one table** of which usage flags make sense for a key type (create and update
/// refuse the others). `None`: a type hsmkeyd does not know; the token decides.
pub fn usage_allowed(algorithm: &Algorithm) -> Option<&'static [UsageFlag]> {
    use UsageFlag::*;
    Some(match algorithm {
        Algorithm::Aes => &[Sign, Verify, Encrypt, Decrypt, Wrap, Unwrap, Derive],
        Algorithm::GenericSecret => &[Sign, Verify, Derive],
        Algorithm::Ec => &[Sign, Verify, Derive],
        Algorithm::EcEdwards => &[Sign, Verify],
        Algorithm::EcMontgomery => &[Derive],
        Algorithm::Rsa => &[Sign, Verify, Encrypt, Decrypt, Wrap, Unwrap],
        Algorithm::Other(_) => return None,
    })
}

impl Usage {
    /// The value of one flag.
    pub fn get(&self, f: UsageFlag) -> bool {
        match f {
            UsageFlag::Sign => self.sign,
            UsageFlag::Verify => self.verify,
            UsageFlag::Encrypt => self.encrypt,
            UsageFlag::Decrypt => self.decrypt,
            UsageFlag::Wrap => self.wrap,
            UsageFlag::Unwrap => self.unwrap,
            UsageFlag::Derive => self.derive,
        }
    }

    /// Sets one flag.
    pub fn set(&mut self, f: UsageFlag, on: bool) {
        let slot = match f {
            UsageFlag::Sign => &mut self.sign,
            UsageFlag::Verify => &mut self.verify,
            UsageFlag::Encrypt => &mut self.encrypt,
            UsageFlag::Decrypt => &mut self.decrypt,
            UsageFlag::Wrap => &mut self.wrap,
            UsageFlag::Unwrap => &mut self.unwrap,
            UsageFlag::Derive => &mut self.derive,
        };
        *slot = on;
    }
}

/// An attribute hsmkeyd writes to an existing key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAttr {
    /// CKA_LABEL.
    Label(Vec<u8>),
    /// One usage flag.
    Usage(UsageFlag, bool),
    /// CKA_SENSITIVE (PKCS#11 lets it only go false → true).
    Sensitive(bool),
    /// CKA_EXTRACTABLE (PKCS#11 lets it only go true → false).
    Extractable(bool),
    /// CKA_START_DATE; `None` writes the empty value.
    StartDate(Option<time::Date>),
    /// CKA_END_DATE; `None` writes the empty value.
    EndDate(Option<time::Date>),
}

fn ck_date(d: Option<time::Date>, kind: AttributeType) -> Attribute {
    match d {
        // PKCS#11's empty value has length 0; cryptoki's `Date` always has 8 bytes, so
        // the empty value goes as raw bytes of the date's own type.
        None => Attribute::VendorDefined((kind, Vec::new())),
        Some(d) => {
            let text = format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day());
            let b = text.as_bytes();
            let date = Date::new([b[0], b[1], b[2], b[3]], [b[4], b[5]], [b[6], b[7]]);
            match kind {
                AttributeType::StartDate => Attribute::StartDate(date),
                _ => Attribute::EndDate(date),
            }
        }
    }
}

impl KeyAttr {
    pub(super) fn to_ck(&self) -> Attribute {
        match self {
            KeyAttr::Label(l) => Attribute::Label(l.clone()),
            KeyAttr::Usage(f, on) => {
                let on = *on;
                match f {
                    UsageFlag::Sign => Attribute::Sign(on),
                    UsageFlag::Verify => Attribute::Verify(on),
                    UsageFlag::Encrypt => Attribute::Encrypt(on),
                    UsageFlag::Decrypt => Attribute::Decrypt(on),
                    UsageFlag::Wrap => Attribute::Wrap(on),
                    UsageFlag::Unwrap => Attribute::Unwrap(on),
                    UsageFlag::Derive => Attribute::Derive(on),
                }
            }
            KeyAttr::Sensitive(b) => Attribute::Sensitive(*b),
            KeyAttr::Extractable(b) => Attribute::Extractable(*b),
            KeyAttr::StartDate(d) => ck_date(*d, AttributeType::StartDate),
            KeyAttr::EndDate(d) => ck_date(*d, AttributeType::EndDate),
        }
    }
}

impl KeyAttr {
    /// Whether the object holds this value already.
    pub fn held_by(&self, o: &ObjectInfo) -> bool {
        self == &self.as_held_by(o)
    }

    /// The same attribute with the value the object holds (an absent flag reads false).
    pub fn as_held_by(&self, o: &ObjectInfo) -> KeyAttr {
        match self {
            KeyAttr::Label(_) => KeyAttr::Label(o.label.clone()),
            KeyAttr::Usage(f, _) => KeyAttr::Usage(*f, flag_of(o, *f).unwrap_or(false)),
            KeyAttr::Sensitive(_) => KeyAttr::Sensitive(o.sensitive.unwrap_or(false)),
            KeyAttr::Extractable(_) => KeyAttr::Extractable(o.extractable.unwrap_or(false)),
            KeyAttr::StartDate(_) => KeyAttr::StartDate(o.start_date),
            KeyAttr::EndDate(_) => KeyAttr::EndDate(o.end_date),
        }
    }

    /// Whether PKCS#11 lets this attribute change one way only (so a write of it cannot
    /// be undone).
    pub fn is_one_way(&self) -> bool {
        matches!(self, KeyAttr::Sensitive(_) | KeyAttr::Extractable(_))
    }

    /// Sets the value in `o` as the token would after the write (a dry run's preview, the
    /// index after a write).
    pub fn apply_to(&self, o: &mut ObjectInfo) {
        match self {
            KeyAttr::Label(l) => o.label = l.clone(),
            KeyAttr::Usage(f, on) => {
                let slot = match f {
                    UsageFlag::Sign => &mut o.sign,
                    UsageFlag::Verify => &mut o.verify,
                    UsageFlag::Encrypt => &mut o.encrypt,
                    UsageFlag::Decrypt => &mut o.decrypt,
                    UsageFlag::Wrap => &mut o.wrap,
                    UsageFlag::Unwrap => &mut o.unwrap,
                    UsageFlag::Derive => &mut o.derive,
                };
                *slot = Some(*on);
            }
            KeyAttr::Sensitive(b) => o.sensitive = Some(*b),
            KeyAttr::Extractable(b) => o.extractable = Some(*b),
            KeyAttr::StartDate(d) => o.start_date = *d,
            KeyAttr::EndDate(d) => o.end_date = *d,
        }
    }
}

/// One usage flag of an object, as read.
pub fn flag_of(o: &ObjectInfo, f: UsageFlag) -> Option<bool> {
    match f {
        UsageFlag::Sign => o.sign,
        UsageFlag::Verify => o.verify,
        UsageFlag::Encrypt => o.encrypt,
        UsageFlag::Decrypt => o.decrypt,
        UsageFlag::Wrap => o.wrap,
        UsageFlag::Unwrap => o.unwrap,
        UsageFlag::Derive => o.derive,
    }
}

/// A date attribute as the token holds it: `None` when empty, absent, or not a date.
pub(super) fn date_of(d: &Date) -> Option<time::Date> {
    if d.is_empty() {
        return None;
    }
    let digits = |b: &[u8]| std::str::from_utf8(b).ok()?.trim().parse::<u32>().ok();
    let (y, m, day) = (digits(&d.year)?, digits(&d.month)?, digits(&d.day)?);
    let month = time::Month::try_from(u8::try_from(m).ok()?).ok()?;
    time::Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(day).ok()?).ok()
}

impl Hsm {
    /// Sets these attributes of one object in one C_SetAttributeValue (the token applies
    /// all of them or none).
    pub fn set_attributes(&self, r: ObjectRef, attrs: &[KeyAttr]) -> Result<(), HsmError> {
        let template: Vec<Attribute> = attrs.iter().map(KeyAttr::to_ck).collect();
        let live = self.live()?;
        let h = live.handle(r)?;
        live.pool.run(|s| s.update_attributes(h, &template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_names_are_the_flags_names() {
        assert_eq!(UsageFlag::ALL.map(UsageFlag::name), UsageFlag::ALL_NAMES);
    }

    #[test]
    fn dates_go_to_the_token_as_digits_and_come_back() {
        let d = time::macros::date!(2031 - 02 - 03);
        let Attribute::StartDate(ck) = ck_date(Some(d), AttributeType::StartDate) else {
            panic!("not a start date")
        };
        assert_eq!(
            (&ck.year, &ck.month, &ck.day),
            (b"2031", b"02", b"03"),
            "CK_DATE is ASCII digits"
        );
        assert_eq!(date_of(&ck), Some(d));
        assert_eq!(date_of(&Date::new_empty()), None);
        assert_eq!(date_of(&Date::new(*b"2031", *b"13", *b"01")), None);
        assert!(matches!(
            ck_date(None, AttributeType::EndDate),
            Attribute::VendorDefined((AttributeType::EndDate, v)) if v.is_empty()
        ));
    }

    #[test]
    fn every_flag_has_one_object_of_a_pair_and_fits_a_secret_key() {
        for f in UsageFlag::ALL {
            assert_eq!(UsageFlag::parse(f.name()), Some(f));
            assert!(f.fits_object(ObjectKind::SecretKey));
            assert_ne!(
                f.fits_object(ObjectKind::PrivateKey),
                f.fits_object(ObjectKind::PublicKey),
                "{f:?}"
            );
        }
        assert_eq!(
            usage_allowed(&Algorithm::EcEdwards),
            Some(&[UsageFlag::Sign, UsageFlag::Verify][..])
        );
        assert_eq!(usage_allowed(&Algorithm::Other("des3".into())), None);
    }
}
