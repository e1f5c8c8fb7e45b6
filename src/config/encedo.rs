//! The `[encedo]` section: the Encedo HEM login (`/api/auth/token`) and its users.
//!
//! ```toml
//! [encedo]
//! eid = "..."            # optional; default derived from the token's serial
//! label = "my hsm"       # optional; the challenge's `lbl`, default the token label
//! challenge_ttl_s = 10   # how long a challenge may be answered
//!
//! [[encedo.users]]
//! name = "dev"
//! scopes = ["keymgmt:list", "keymgmt:get"]
//! roles = []
//! pubkey = "<std base64 of the user's X25519 public key, the eJWT's iss>"
//! # or: passphrase_file = "/etc/hsmkeyd/encedo-dev" (mode 0600; the key is derived at start)
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::{absolute, server::in_range, ConfigError};
use crate::values::{RoleName, Scope};

/// Seconds a challenge may be answered when the section does not say: the appliance gives
/// "a few seconds", and a client needs one round trip plus a PBKDF2 it may have cached.
const DEFAULT_CHALLENGE_TTL_S: u64 = 10;

/// The `[encedo]` section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncedoConfig {
    /// `eid`: the EncedoID clients salt their passphrase with; `None`: from the token.
    pub eid: Option<String>,
    /// `label`: the challenge's `lbl`; `None`: the token label.
    pub label: Option<String>,
    /// How long a challenge may be answered.
    pub challenge_ttl: Duration,
    /// `[[encedo.users]]`.
    pub users: Vec<EncedoUserConfig>,
}

/// One `[[encedo.users]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct EncedoUserConfig {
    /// Name in tokens (`sub`) and audit entries.
    pub name: String,
    /// Scopes the user may ask a token for (one per token).
    pub scopes: Vec<Scope>,
    /// Roles its tokens carry.
    pub roles: Vec<RoleName>,
    /// How the user's public key is known.
    pub key: UserKey,
}

/// How a user's X25519 public key is known.
#[derive(Debug, Clone, PartialEq)]
pub enum UserKey {
    /// Given (the 32 bytes of the eJWT's `iss`).
    Public([u8; 32]),
    /// Derived at start from the passphrase in this file (mode 0600), as the client does.
    PassphraseFile(PathBuf),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncedo {
    eid: Option<String>,
    label: Option<String>,
    challenge_ttl_s: Option<u64>,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    pubkey: Option<String>,
    passphrase_file: Option<PathBuf>,
}

/// Validates the section.
pub(super) fn encedo_config(
    raw: RawEncedo,
    roles: &BTreeSet<RoleName>,
    err: &impl Fn(&str, String) -> ConfigError,
) -> Result<EncedoConfig, ConfigError> {
    for (key, v) in [("encedo.eid", &raw.eid), ("encedo.label", &raw.label)] {
        if let Some(v) = v {
            if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
                return Err(err(
                    key,
                    "1..=128 characters without control characters".into(),
                ));
            }
        }
    }
    let ttl = in_range(
        err,
        "encedo.challenge_ttl_s",
        raw.challenge_ttl_s.unwrap_or(DEFAULT_CHALLENGE_TTL_S),
        1,
        300,
    )?;
    let mut users = Vec::new();
    let mut names = BTreeSet::new();
    for (i, u) in raw.users.into_iter().enumerate() {
        let key = |k: &str| format!("encedo.users[{i}].{k}");
        let name = u.name.trim().to_string();
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err(
                &key("name"),
                "a user name is 1..=64 printable ASCII characters without spaces".into(),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(&key("name"), format!("user {name:?} is defined twice")));
        }
        let mut scopes = Vec::new();
        for (j, s) in u.scopes.iter().enumerate() {
            let scope =
                Scope::parse(s).map_err(|e| err(&format!("{}[{j}]", key("scopes")), e.into()))?;
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        let mut uroles = Vec::new();
        for (j, r) in u.roles.iter().enumerate() {
            let k = format!("{}[{j}]", key("roles"));
            let role = RoleName::parse(r).map_err(|e| err(&k, e.into()))?;
            if !roles.contains(&role) {
                return Err(err(&k, format!("role {r:?} is not defined in keys.roles")));
            }
            if !uroles.contains(&role) {
                uroles.push(role);
            }
        }
        let user_key = match (u.pubkey, u.passphrase_file) {
            (Some(p), None) => {
                let bytes = STANDARD.decode(p.trim()).ok();
                match bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                    Some(k) => UserKey::Public(k),
                    None => {
                        return Err(err(
                            &key("pubkey"),
                            "not the standard base64 of a 32-byte X25519 public key (the \
                             eJWT's iss value)"
                                .into(),
                        ))
                    }
                }
            }
            (None, Some(f)) => {
                absolute(&f).map_err(|r| err(&key("passphrase_file"), r))?;
                UserKey::PassphraseFile(f)
            }
            _ => {
                return Err(err(
                    &key("pubkey"),
                    "set exactly one of pubkey (the std base64 iss value) and passphrase_file \
                     (a mode 0600 file)"
                        .into(),
                ))
            }
        };
        users.push(EncedoUserConfig {
            name,
            scopes,
            roles: uroles,
            key: user_key,
        });
    }
    Ok(EncedoConfig {
        eid: raw.eid,
        label: raw.label,
        challenge_ttl: Duration::from_secs(ttl),
        users,
    })
}
