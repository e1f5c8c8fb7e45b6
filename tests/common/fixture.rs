//! What the tests put in a token and in a config: the kids they share, the keys generated
//! under them, and the `[keys]`/`[[principals]]` TOML built from typed values instead of
//! strings pasted per file.

use serde_json::to_string as json;

use super::{uid, Token};

/// The usual AES-256 key.
pub const AES: &str = "a1a1";
/// A second AES-256 key, for tests that need two keys or one the caller may not touch.
pub const OTHER: &str = "b2b2";
/// The usual P-256 key pair.
pub const EC: &str = "ec01";
/// A second P-256 key pair.
pub const EC2: &str = "ec02";
/// An RSA-2048 key pair.
pub const RSA: &str = "5a01";
/// An Ed25519 key pair.
pub const ED: &str = "ed01";
/// An AES-256 key generated with CKA_MODIFIABLE false.
pub const LOCKED: &str = "10c4";
/// The id two secret keys share: an inconsistent key.
pub const DUP: &str = "dddd";
/// A well-formed kid that names no key.
pub const NO_KEY: &str = "00ff";

/// Every key-management scope (minting excluded).
pub const ALL_SCOPES: [&str; 3] = ["keymgmt:list", "keymgmt:get", "keymgmt:upd"];
/// Every key-management scope and minting.
pub const MINTING_SCOPES: [&str; 4] = ["keymgmt:list", "keymgmt:get", "keymgmt:upd", "auth:token"];
/// The roles the tests define in `[keys]`.
pub const BOTH_ROLES: [&str; 2] = ["ops", "payments"];

/// One key to generate: `kind` as hsmkeyd-devtoken names it, extra devtoken flags after.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub kind: &'static str,
    pub kid: &'static str,
    pub label: &'static str,
    pub flags: &'static [&'static str],
}

impl Key {
    pub const fn new(kind: &'static str, kid: &'static str, label: &'static str) -> Key {
        Key {
            kind,
            kid,
            label,
            flags: &[],
        }
    }

    pub const fn aes(kid: &'static str, label: &'static str) -> Key {
        Key::new("aes256", kid, label)
    }

    pub const fn ec(kid: &'static str, label: &'static str) -> Key {
        Key::new("ec-p256", kid, label)
    }

    /// The same key with these devtoken flags (`--non-modifiable`, `--public-label X`).
    pub const fn flags(self, flags: &'static [&'static str]) -> Key {
        Key { flags, ..self }
    }
}

/// `AES` labelled "aes-key".
pub const AES_KEY: Key = Key::aes(AES, "aes-key");
/// `OTHER` labelled "other-key".
pub const OTHER_KEY: Key = Key::aes(OTHER, "other-key");
/// `EC` labelled "ec-key".
pub const EC_KEY: Key = Key::ec(EC, "ec-key");
/// `RSA` labelled "rsa-key".
pub const RSA_KEY: Key = Key::new("rsa2048", RSA, "rsa-key");
/// `ED` labelled "ed-key".
pub const ED_KEY: Key = Key::new("ed25519", ED, "ed-key");
/// `LOCKED` labelled "locked-key", not modifiable.
pub const LOCKED_KEY: Key = Key::aes(LOCKED, "locked-key").flags(&["--non-modifiable"]);
/// The two halves of the inconsistent key `DUP`.
pub const DUP_KEYS: [Key; 2] = [Key::aes(DUP, "dup-1"), Key::aes(DUP, "dup-2")];

/// A fresh token (its own directory) holding `keys`, generated in this order.
pub fn token_with(keys: &[Key]) -> Token {
    let t = Token::new();
    for k in keys {
        let _ = t.gen(k.kind, k.kid, k.label, k.flags);
    }
    t
}

/// One key of each family the key API describes, and one it may not modify:
/// `AES_KEY`, `EC_KEY`, `RSA_KEY`, `LOCKED_KEY`.
pub fn demo_token() -> Token {
    token_with(&[AES_KEY, EC_KEY, RSA_KEY, LOCKED_KEY])
}

/// What [`Token::labels_of`] gives for a key pair whose two halves are labelled `label`.
pub fn pair(label: &str) -> Vec<(String, String)> {
    vec![
        ("Private".to_string(), label.to_string()),
        ("Public".to_string(), label.to_string()),
    ]
}

/// One `[[principals]]` entry.
#[derive(Debug, Clone)]
pub struct Principal {
    name: String,
    uids: Vec<u32>,
    gids: Vec<u32>,
    scopes: Vec<String>,
    roles: Vec<String>,
}

impl Principal {
    /// A principal matched by no id yet.
    pub fn named(name: &str) -> Principal {
        Principal {
            name: name.to_string(),
            uids: Vec::new(),
            gids: Vec::new(),
            scopes: Vec::new(),
            roles: Vec::new(),
        }
    }

    /// A principal for the uid the tests run as.
    pub fn me(name: &str) -> Principal {
        Principal::named(name).uids(&[uid()])
    }

    pub fn uids(mut self, uids: &[u32]) -> Principal {
        self.uids = uids.to_vec();
        self
    }

    pub fn gids(mut self, gids: &[u32]) -> Principal {
        self.gids = gids.to_vec();
        self
    }

    pub fn scopes(mut self, scopes: &[&str]) -> Principal {
        self.scopes = scopes.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn roles(mut self, roles: &[&str]) -> Principal {
        self.roles = roles.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The entry as config TOML (ids, gids and roles only when given).
    pub fn toml(&self) -> String {
        let mut s = format!("[[principals]]\nname = {}\n", json(&self.name).unwrap());
        if !self.uids.is_empty() {
            s.push_str(&format!("uids = {}\n", json(&self.uids).unwrap()));
        }
        if !self.gids.is_empty() {
            s.push_str(&format!("gids = {}\n", json(&self.gids).unwrap()));
        }
        s.push_str(&format!("scopes = {}\n", json(&self.scopes).unwrap()));
        if !self.roles.is_empty() {
            s.push_str(&format!("roles = {}\n", json(&self.roles).unwrap()));
        }
        s
    }
}

/// A `[keys]` section defining `roles` (left out when there are none), then `principals`.
pub fn access(roles: &[&str], principals: &[Principal]) -> String {
    let mut s = String::new();
    if !roles.is_empty() {
        s.push_str(&format!("[keys]\nroles = {}\n", json(roles).unwrap()));
    }
    for p in principals {
        s.push('\n');
        s.push_str(&p.toml());
    }
    s
}

/// The test's uid ("tester") holds `scopes` and both roles, which `[keys]` defines.
fn tester(scopes: &[&str]) -> String {
    access(
        &BOTH_ROLES,
        &[Principal::me("tester").scopes(scopes).roles(&BOTH_ROLES)],
    )
}

/// The default: the test's uid ("tester") holds every key-management scope and both roles.
pub fn all_access() -> String {
    tester(&ALL_SCOPES)
}

/// As [`all_access`], minting included.
pub fn minting_access() -> String {
    tester(&MINTING_SCOPES)
}

/// The test's uid ("tester") may do everything with keys (create and delete included), with
/// role "ops" of the two defined.
pub fn keys_access() -> String {
    access(
        &BOTH_ROLES,
        &[Principal::me("tester")
            .scopes(&[
                "keymgmt:list",
                "keymgmt:get",
                "keymgmt:upd",
                "keymgmt:gen",
                "keymgmt:del",
            ])
            .roles(&["ops"])],
    )
}
