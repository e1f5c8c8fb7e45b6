//! Value types, validated when they are made, so no layer re-checks a string: a [`Label`]
//! has already been length-checked, a [`Kid`] only holds lowercase hex, a [`Scope`] is one
//! of the known permissions.
//!
//! A leaf: nothing here imports from the crate, so every module (`config` included) may
//! use these types without a cycle.

mod scope;

pub use scope::Scope;

/// Why a value was refused: one sentence for the caller (an error body, a config error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(String);

impl Invalid {
    pub(crate) fn new(reason: impl Into<String>) -> Invalid {
        Invalid(reason.into())
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for String {
    fn from(e: Invalid) -> String {
        e.0
    }
}

use std::fmt;

use serde::Serialize;
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
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
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
    pub fn parse(s: &str) -> Result<Kid, Invalid> {
        if s.is_empty() || s.len() > MAX_ID_BYTES * 2 {
            return Err(Invalid::new(format!(
                "a key id is 2..={} hex characters",
                MAX_ID_BYTES * 2
            )));
        }
        if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Invalid::new("a key id is an even number of hex characters"));
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
    pub fn parse(s: &str) -> Result<Label, Invalid> {
        if s.is_empty() {
            return Err(Invalid::new("label must not be empty"));
        }
        if s.len() > MAX_LABEL_BYTES {
            return Err(Invalid::new(format!(
                "label is {} bytes long; the limit is {MAX_LABEL_BYTES} bytes of UTF-8",
                s.len()
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(Invalid::new("label must not contain control characters"));
        }
        // Format characters (Unicode category Cf: bidi overrides, zero-width joiners and
        // spaces, the BOM, ...) change how a label looks without being seen: a label that
        // reads "pay-ops" must be "pay-ops".
        if let Some(c) = s
            .chars()
            .find(|c| c.general_category() == GeneralCategory::Format)
        {
            return Err(Invalid::new(format!(
                "label must not contain invisible format characters (found U+{:04X})",
                c as u32
            )));
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
    pub fn parse(s: &str) -> Result<Description, Invalid> {
        let chars = s.chars().count();
        if chars > MAX_DESCRIPTION_CHARS {
            return Err(Invalid::new(format!(
                "description is {chars} characters long; the limit is {MAX_DESCRIPTION_CHARS}"
            )));
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(Invalid::new(
                "description must not contain control characters other than newline and tab",
            ));
        }
        Ok(Description(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Description {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
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
    pub fn parse(s: &str) -> Result<RoleName, Invalid> {
        if s.is_empty() || s.len() > MAX_ROLE_BYTES {
            return Err(Invalid::new(format!(
                "a role name is 1..={MAX_ROLE_BYTES} characters"
            )));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(Invalid::new(format!(
                "role name {s:?} may hold only letters, digits, '_', '.', ':' and '-'"
            )));
        }
        Ok(RoleName(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoleName {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
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
    fn role_names_are_restricted() {
        assert!(RoleName::parse("payments-ops").is_ok());
        assert!(RoleName::parse("has space").is_err());
        assert!(RoleName::parse("").is_err());
    }
}
