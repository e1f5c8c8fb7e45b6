//! The key domain's view of a key: what it is made of, its attributes and state, and the
//! JSON shape every endpoint returns. The validated value types it is built from
//! ([`Kid`], [`Label`], ...) live in [`crate::values`].

use serde::Serialize;

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
    pub key_type: String,
    /// Named curve, for EC keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<String>,
    /// Key size in bits where it has one (AES, generic secrets, RSA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// What the key is made of.
    pub class: KeyClass,
    /// Whether a certificate object shares the id.
    pub has_certificate: bool,
    /// The attributes that matter.
    pub attributes: KeyAttributes,
    /// Last update through hsmkeyd (RFC 3339), or null if never.
    pub updated_at: Option<String>,
    /// Whether updates are possible.
    #[serde(flatten)]
    pub state: KeyState,
    /// Changes whenever anything above changes.
    pub etag: String,
}
