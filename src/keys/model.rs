//! Value types of the key domain. Each one is validated when it is made, so the layers
//! above and below never re-check a string: a [`Label`] has already been length-checked,
//! a [`Kid`] only holds lowercase hex.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Longest CKA_ID accepted, in bytes. PKCS#11 sets no bound; 128 bytes is far beyond any
/// HSM's key ids (Encedo uses 16) and keeps paths short.
pub const MAX_ID_BYTES: usize = 128;
/// Longest label, in UTF-8 bytes.
pub const MAX_LABEL_BYTES: usize = 64;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 250;
/// Longest role name, in bytes.
pub const MAX_ROLE_BYTES: usize = 64;

/// A key id: the lowercase hex of the CKA_ID shared by a key's objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Kid(String);

impl TryFrom<String> for Kid {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Kid::parse(&s)
    }
}

impl From<Kid> for String {
    fn from(k: Kid) -> String {
        k.0
    }
}

impl Kid {
    /// Parses hex (either case) into the canonical lowercase form.
    pub fn parse(s: &str) -> Result<Kid, String> {
        if s.is_empty() || s.len() > MAX_ID_BYTES * 2 {
            return Err(format!(
                "a key id is 2..={} hex characters",
                MAX_ID_BYTES * 2
            ));
        }
        if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a key id is an even number of hex characters".into());
        }
        Ok(Kid(s.to_ascii_lowercase()))
    }

    /// The kid of a CKA_ID value, or `None` for an empty or over-long id.
    pub fn from_id(id: &[u8]) -> Option<Kid> {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            None
        } else {
            Some(Kid(hex::encode(id)))
        }
    }

    /// The CKA_ID bytes.
    pub fn id_bytes(&self) -> Vec<u8> {
        // A Kid only ever holds valid hex of even length.
        hex::decode(&self.0).unwrap_or_default()
    }

    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key label: 1..=64 UTF-8 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    /// Checks the length and characters.
    pub fn parse(s: &str) -> Result<Label, String> {
        if s.is_empty() {
            return Err("label must not be empty".into());
        }
        if s.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "label is {} bytes long; the limit is {MAX_LABEL_BYTES} bytes of UTF-8",
                s.len()
            ));
        }
        if s.chars().any(char::is_control) {
            return Err("label must not contain control characters".into());
        }
        // Format characters (Unicode category Cf: bidi overrides, zero-width joiners and
        // spaces, the BOM, ...) change how a label looks without being seen: a label that
        // reads "pay-ops" must be "pay-ops".
        if let Some(c) = s
            .chars()
            .find(|c| c.general_category() == GeneralCategory::Format)
        {
            return Err(format!(
                "label must not contain invisible format characters (found U+{:04X})",
                c as u32
            ));
        }
        Ok(Label(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key description: 0..=250 characters, no control characters other than newline and tab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Description(String);

impl Description {
    /// Checks the length and characters.
    pub fn parse(s: &str) -> Result<Description, String> {
        let chars = s.chars().count();
        if chars > MAX_DESCRIPTION_CHARS {
            return Err(format!(
                "description is {chars} characters long; the limit is {MAX_DESCRIPTION_CHARS}"
            ));
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(
                "description must not contain control characters other than newline and tab".into(),
            );
        }
        Ok(Description(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Description {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Description::parse(&s)
    }
}

impl From<Description> for String {
    fn from(d: Description) -> String {
        d.0
    }
}

/// A role name: 1..=64 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoleName(String);

impl RoleName {
    /// Checks the length and characters.
    pub fn parse(s: &str) -> Result<RoleName, String> {
        if s.is_empty() || s.len() > MAX_ROLE_BYTES {
            return Err(format!("a role name is 1..={MAX_ROLE_BYTES} characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(format!(
                "role name {s:?} may hold only letters, digits, '_', '.', ':' and '-'"
            ));
        }
        Ok(RoleName(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoleName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        RoleName::parse(&s)
    }
}

impl From<RoleName> for String {
    fn from(r: RoleName) -> String {
        r.0
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
    /// CKA_SENSITIVE of the secret or private key.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE of the secret or private key.
    pub extractable: Option<bool>,
    /// CKA_MODIFIABLE of every object.
    pub modifiable: bool,
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

fn curve_name<S: serde::Serializer>(c: &Option<Curve>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.serialize_str(c.name()),
        None => s.serialize_none(),
    }
}

fn rfc3339<S: serde::Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    use time::format_description::well_known::Rfc3339;
    match t {
        Some(t) => s.serialize_str(&t.format(&Rfc3339).map_err(serde::ser::Error::custom)?),
        None => s.serialize_none(),
    }
}

/// The JSON shape of one key, as every endpoint returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// Named curve, for EC keys.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "curve_name")]
    pub curve: Option<Curve>,
    /// Key size in bits where it has one (AES, generic secrets, RSA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// What the key is made of.
    pub class: KeyClass,
    /// Whether a certificate object shares the id.
    pub has_certificate: bool,
    /// The attributes that matter.
    pub attributes: KeyAttributes,
    /// Last update through hsmkeyd, or null if never (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: Option<OffsetDateTime>,
    /// Whether updates are possible.
    #[serde(flatten)]
    pub state: KeyState,
    /// Changes whenever anything above changes.
    pub etag: String,
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
    fn kid_is_canonical_lowercase_hex() {
        assert_eq!(Kid::parse("0AfF").unwrap().as_str(), "0aff");
        assert_eq!(Kid::parse("0aff").unwrap().id_bytes(), vec![0x0a, 0xff]);
        for bad in ["", "0", "0g", "abc", &"00".repeat(MAX_ID_BYTES + 1)] {
            assert!(Kid::parse(bad).is_err(), "{bad}");
        }
        assert!(Kid::from_id(&[]).is_none());
    }

    #[test]
    fn label_limits_are_bytes_and_control_characters() {
        assert!(Label::parse(&"a".repeat(64)).is_ok());
        assert!(Label::parse(&"a".repeat(65)).is_err());
        assert!(Label::parse(&"é".repeat(33)).is_err()); // 66 bytes, 33 characters
        assert!(Label::parse("").is_err());
        assert!(Label::parse("a\u{7}b").is_err());
        assert!(Label::parse("a\u{85}b").is_err());
        assert!(Label::parse("päyments key").is_ok());
    }

    #[test]
    fn description_limit_is_characters() {
        assert!(Description::parse(&"é".repeat(250)).is_ok());
        assert!(Description::parse(&"a".repeat(251)).is_err());
        assert!(Description::parse("").is_ok());
        assert!(Description::parse("line\nline").is_ok());
        assert!(Description::parse("nul\0").is_err());
    }

    #[test]
    fn key_type_curve_and_time_serialize_as_the_strings_they_replace() {
        let mut ec = KeyView::example(KeyType::Ec, Some(Curve::P256));
        ec.updated_at = Some(time::macros::datetime!(2024-01-02 03:04:05.25 UTC));
        assert_eq!(
            serde_json::to_string(&ec).unwrap(),
            r#"{"kid":"0a0b","label":"k","description":null,"roles":[],"type":"ec","curve":"P-256","class":"key-pair","has_certificate":false,"attributes":{"sensitive":null,"extractable":null,"modifiable":false,"sign":false,"verify":false,"encrypt":false,"decrypt":false,"wrap":false,"unwrap":false,"derive":false},"updated_at":"2024-01-02T03:04:05.25Z","state":"ok","etag":"e"}"#
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

    #[test]
    fn role_names_are_restricted() {
        assert!(RoleName::parse("payments-ops").is_ok());
        assert!(RoleName::parse("has space").is_err());
        assert!(RoleName::parse("").is_err());
    }
}
