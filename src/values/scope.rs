//! Scopes: what a caller may do. Parsed once (from config or a token), then compared as values.

use std::fmt;

use super::{Invalid, Kid};

/// One permission. The textual forms are the ones used in config files and tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `keymgmt:list`: list keys.
    KeysList,
    /// `keymgmt:search`: search keys by description (`keymgmt:list` also may).
    KeysSearch,
    /// `keymgmt:get`: read one key.
    KeysGet,
    /// `keymgmt:upd`: update any key.
    KeysUpdate,
    /// `keymgmt:upd:<kid>`: update one key only.
    KeysUpdateOne(Kid),
    /// `keymgmt:use:<kid>`: use one key, which includes reading it through
    /// `GET /api/keymgmt/get/<kid>` (as on the Encedo appliance).
    KeysUseOne(Kid),
    /// `keymgmt:gen`: create (generate) keys.
    KeysGenerate,
    /// `keymgmt:del`: delete keys.
    KeysDelete,
    /// `auth:token`: mint bearer tokens.
    AuthToken,
}

impl Scope {
    /// Parses the textual form; the error says what the accepted forms are.
    pub fn parse(s: &str) -> Result<Scope, Invalid> {
        match s {
            "keymgmt:list" => Ok(Scope::KeysList),
            "keymgmt:get" => Ok(Scope::KeysGet),
            "keymgmt:search" => Ok(Scope::KeysSearch),
            "keymgmt:upd" => Ok(Scope::KeysUpdate),
            "keymgmt:gen" => Ok(Scope::KeysGenerate),
            "keymgmt:del" => Ok(Scope::KeysDelete),
            "auth:token" => Ok(Scope::AuthToken),
            _ => {
                let one = |kid: &str, make: fn(Kid) -> Scope| {
                    Kid::parse(kid)
                        .map(make)
                        .map_err(|e| Invalid::new(format!("scope {s:?}: {e}")))
                };
                if let Some(kid) = s.strip_prefix("keymgmt:upd:") {
                    one(kid, Scope::KeysUpdateOne)
                } else if let Some(kid) = s.strip_prefix("keymgmt:use:") {
                    one(kid, Scope::KeysUseOne)
                } else {
                    Err(Invalid::new(format!(
                        "unknown scope {s:?}; known: keymgmt:list, keymgmt:search, keymgmt:get, keymgmt:upd, \
                         keymgmt:upd:<kid>, keymgmt:use:<kid>, keymgmt:gen, keymgmt:del, \
                         auth:token"
                    )))
                }
            }
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::KeysList => f.write_str("keymgmt:list"),
            Scope::KeysGet => f.write_str("keymgmt:get"),
            Scope::KeysSearch => f.write_str("keymgmt:search"),
            Scope::KeysUpdate => f.write_str("keymgmt:upd"),
            Scope::KeysUpdateOne(kid) => write!(f, "keymgmt:upd:{kid}"),
            Scope::KeysUseOne(kid) => write!(f, "keymgmt:use:{kid}"),
            Scope::KeysGenerate => f.write_str("keymgmt:gen"),
            Scope::KeysDelete => f.write_str("keymgmt:del"),
            Scope::AuthToken => f.write_str("auth:token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_unknown_ones_are_refused() {
        for s in [
            "keymgmt:list",
            "keymgmt:get",
            "keymgmt:search",
            "keymgmt:upd",
            "keymgmt:upd:0aff",
            "keymgmt:use:0aff",
            "keymgmt:gen",
            "keymgmt:del",
            "auth:token",
        ] {
            assert_eq!(Scope::parse(s).unwrap().to_string(), s);
        }
        assert!(Scope::parse("keymgmt:upd:xyz").is_err());
        assert!(Scope::parse("keymgmt:destroy").is_err());
        assert!(Scope::parse("keymgmt:use:xyz").is_err());
        assert!(Scope::parse("keymgmt:use").is_err());
        assert!(Scope::parse("keymgmt:delete").is_err());
        assert!(Scope::parse("").is_err());
    }
}
