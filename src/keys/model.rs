//! The key domain's view of a key: what it is made of, its attributes and state, and the
//! JSON shape every endpoint returns. The validated value types it is built from
//! ([`Kid`], [`Label`], ...) live in [`crate::values`].

use serde::Serialize;
use time::OffsetDateTime;

pub use crate::values::{
    Description, Kid, Label, RoleName, MAX_DESCRIPTION_CHARS, MAX_ID_BYTES, MAX_LABEL_BYTES,
    MAX_ROLE_BYTES,
};

/// What a logical key is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyClass {
    /// One secret key object.
    Secret,
    /// A private and a public key object.
    KeyPair,
    /// A public key object alone.
    PublicOnly,
    /// A private key object alone.
    PrivateOnly,
}

/// Attributes of a key that matter to its users. For a pair, each usage flag comes from
/// the object that carries it (sign/decrypt/unwrap/derive from the private key,
/// verify/encrypt/wrap from the public key); `modifiable` is true only if every object is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyAttributes {
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_DERIVE.
    pub derive: bool,
    /// CKA_ENCRYPT.
    pub encrypt: bool,
    /// CKA_EXTRACTABLE of the secret or private key.
    pub extractable: Option<bool>,
    /// CKA_MODIFIABLE of every object.
    pub modifiable: bool,
    /// CKA_SENSITIVE of the secret or private key.
    pub sensitive: Option<bool>,
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_UNWRAP.
    pub unwrap: bool,
    /// CKA_VERIFY.
    pub verify: bool,
    /// CKA_WRAP.
    pub wrap: bool,
}

/// Whether a key can be updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum KeyState {
    /// Objects agree; updates allowed.
    Ok,
    /// Objects disagree (two of one class share the id, or an interrupted update could not
    /// be undone): the key reads, updates answer 409.
    Inconsistent(String),
}

/// A key's curve, named by the token layer from CKA_EC_PARAMS.
pub use crate::hsm::Curve;

/// What a key is, as the API names it (`type`): `aes`, `generic-secret`, `rsa`, `ec`,
/// an Edwards or Montgomery key by its curve (`ed25519`, `x25519`, ...), another key type by
/// its PKCS#11 name (`des3`, ...), or `unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyType {
    /// CKK_AES.
    Aes,
    /// CKK_GENERIC_SECRET.
    GenericSecret,
    /// CKK_RSA.
    Rsa,
    /// CKK_EC; the curve is [`KeyView::curve`].
    Ec,
    /// CKK_EC_EDWARDS on this curve.
    Edwards(Curve),
    /// CKK_EC_MONTGOMERY on this curve.
    Montgomery(Curve),
    /// Another key type, by the name [`crate::hsm::Algorithm::Other`] gives it.
    Other(String),
    /// The token did not say (no CKA_KEY_TYPE).
    Unknown,
}

impl KeyType {
    /// The name the API shows.
    pub fn name(&self) -> &str {
        match self {
            KeyType::Aes => "aes",
            KeyType::GenericSecret => "generic-secret",
            KeyType::Rsa => "rsa",
            KeyType::Ec => "ec",
            KeyType::Edwards(c) | KeyType::Montgomery(c) => c.name(),
            KeyType::Other(name) => name,
            KeyType::Unknown => "unknown",
        }
    }
}

impl Serialize for KeyType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The JSON shape of one key, as every endpoint returns it. Serialized with its names in
/// byte order, as a `serde_json::Value` (whose maps are sorted) writes them, so that an
/// answer rendered straight from the view has the bytes it had through a `Value`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyView {
    /// Key id.
    pub kid: Kid,
    /// CKA_LABEL of the main object (secret or private key, else public).
    pub label: String,
    /// Free text kept in the token by hsmkeyd.
    pub description: Option<String>,
    /// Roles allowed to update the key; empty means any principal with the scope.
    pub roles: Vec<RoleName>,
    /// Algorithm: aes, generic-secret, ec, rsa, ed25519, ...
    pub key_type: KeyType,
    /// Named curve, for EC keys.
    pub curve: Option<Curve>,
    /// Key size in bits where it has one (AES, generic secrets, RSA).
    pub bits: Option<u32>,
    /// What the key is made of.
    pub class: KeyClass,
    /// Whether a certificate object shares the id.
    pub has_certificate: bool,
    /// The attributes that matter.
    pub attributes: KeyAttributes,
    /// CKA_START_DATE of the key (`YYYY-MM-DD` in JSON, null when empty).
    pub not_before: Option<time::Date>,
    /// CKA_END_DATE of the key (`YYYY-MM-DD` in JSON, null when empty).
    pub not_after: Option<time::Date>,
    /// Last update through hsmkeyd, or null if never (RFC 3339 in JSON).
    pub updated_at: Option<OffsetDateTime>,
    /// Whether updates are possible.
    pub state: KeyState,
    /// Changes whenever anything above changes.
    pub etag: String,
}

impl Serialize for KeyView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        use time::format_description::well_known::Rfc3339;
        let day = |d: Option<time::Date>| d.map(super::meta::date_text);
        let updated_at = match self.updated_at {
            Some(t) => Some(t.format(&Rfc3339).map_err(serde::ser::Error::custom)?),
            None => None,
        };
        let (state, reason) = match &self.state {
            KeyState::Ok => ("ok", None),
            KeyState::Inconsistent(r) => ("inconsistent", Some(r)),
        };
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("attributes", &self.attributes)?;
        if let Some(bits) = self.bits {
            m.serialize_entry("bits", &bits)?;
        }
        m.serialize_entry("class", &self.class)?;
        if let Some(c) = &self.curve {
            m.serialize_entry("curve", c.name())?;
        }
        m.serialize_entry("description", &self.description)?;
        m.serialize_entry("etag", &self.etag)?;
        m.serialize_entry("has_certificate", &self.has_certificate)?;
        m.serialize_entry("kid", &self.kid)?;
        m.serialize_entry("label", &self.label)?;
        m.serialize_entry("not_after", &day(self.not_after))?;
        m.serialize_entry("not_before", &day(self.not_before))?;
        if let Some(r) = reason {
            m.serialize_entry("reason", r)?;
        }
        m.serialize_entry("roles", &self.roles)?;
        m.serialize_entry("state", state)?;
        m.serialize_entry("type", &self.key_type)?;
        m.serialize_entry("updated_at", &updated_at)?;
        m.end()
    }
}

#[cfg(test)]
impl KeyView {
    /// A key pair's view with nothing set but its type and curve, for tests.
    pub(crate) fn example(key_type: KeyType, curve: Option<Curve>) -> KeyView {
        KeyView {
            kid: Kid::parse("0a0b").unwrap(),
            label: "k".into(),
            description: None,
            roles: Vec::new(),
            key_type,
            curve,
            bits: None,
            class: KeyClass::KeyPair,
            has_certificate: false,
            attributes: KeyAttributes::default(),
            not_before: None,
            not_after: None,
            updated_at: None,
            state: KeyState::Ok,
            etag: "e".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_curve_and_time_serialize_as_the_strings_they_replace() {
        let mut ec = KeyView::example(KeyType::Ec, Some(Curve::P256));
        ec.updated_at = Some(time::macros::datetime!(2024-01-02 03:04:05.25 UTC));
        ec.not_after = Some(time::macros::date!(2030 - 12 - 31));
        assert_eq!(
            serde_json::to_string(&ec).unwrap(),
            r#"{"attributes":{"decrypt":false,"derive":false,"encrypt":false,"extractable":null,"modifiable":false,"sensitive":null,"sign":false,"unwrap":false,"verify":false,"wrap":false},"class":"key-pair","curve":"P-256","description":null,"etag":"e","has_certificate":false,"kid":"0a0b","label":"k","not_after":"2030-12-31","not_before":null,"roles":[],"state":"ok","type":"ec","updated_at":"2024-01-02T03:04:05.25Z"}"#
        );
        // Names in byte order, as through a Value (answers are written straight from the
        // view and must not change), the reason of an inconsistent key included.
        ec.bits = Some(256);
        ec.state = KeyState::Inconsistent("r".into());
        let direct = serde_json::to_string(&ec).unwrap();
        assert_eq!(
            direct,
            serde_json::to_string(&serde_json::to_value(&ec).unwrap()).unwrap()
        );
        assert!(
            direct.contains(r#""not_before":null,"reason":"r","roles":[],"state":"inconsistent""#)
        );
        let json = |k: KeyType, c: Option<Curve>| {
            let v = serde_json::to_value(KeyView::example(k, c)).unwrap();
            (
                v["type"].clone(),
                v.get("curve").cloned(),
                v["updated_at"].clone(),
            )
        };
        let s = |t: &str| serde_json::Value::String(t.into());
        let null = serde_json::Value::Null;
        for (k, c, t, curve) in [
            (KeyType::Aes, None, "aes", None),
            (KeyType::GenericSecret, None, "generic-secret", None),
            (KeyType::Rsa, None, "rsa", None),
            (KeyType::Ec, Some(Curve::P521), "ec", Some("P-521")),
            (
                KeyType::Ec,
                Some(Curve::Unknown(None)),
                "ec",
                Some("unknown"),
            ),
            (KeyType::Edwards(Curve::Ed25519), None, "ed25519", None),
            (KeyType::Montgomery(Curve::X448), None, "x448", None),
            (
                KeyType::Edwards(Curve::Unknown(None)),
                None,
                "unknown",
                None,
            ),
            (
                KeyType::Other("sha256-hmac".into()),
                None,
                "sha256-hmac",
                None,
            ),
            (KeyType::Unknown, None, "unknown", None),
        ] {
            assert_eq!(json(k, c), (s(t), curve.map(s), null.clone()), "{t}");
        }
    }
}
