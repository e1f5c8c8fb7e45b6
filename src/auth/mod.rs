//! Who is calling and what they may do.
//!
//! Owns: the principals of the configuration, mapping a Unix peer (SO_PEERCRED uid/gid) to
//! one of them, bearer tokens for TLS callers ([`jwt`]), and scope checks. A uid match wins
//! over a gid match; a peer that maps to no principal is unknown (401).
//! May call: `config`, `values`. Called by: `api`, `front`, `daemon`.

pub mod authenticate;
pub mod encedo;
pub mod jwt;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::config::PrincipalConfig;
use crate::values::Scope;
use crate::values::{Kid, RoleName};

/// Credentials of a Unix-socket peer, read with SO_PEERCRED when the connection was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid of the peer process.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Pid.
    pub pid: i32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {} pid {}", self.uid, self.gid, self.pid)
    }
}

/// A known caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Name from the configuration.
    pub name: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Roles held.
    pub roles: Vec<RoleName>,
    /// The bearer token's `jti`, for callers identified by a token (never the token).
    pub token_id: Option<String>,
}

/// A connection's claim on its caller's share of the connection slots. The listener makes
/// one per connection; `api` asks it once the caller is known, and answers 503
/// `too_many_connections` (closing the connection) when it says no.
pub trait Admission: Send + Sync {
    /// Counts the connection against `principal`'s budget; `Err` says why it is over.
    fn admit(&self, principal: &str) -> Result<(), String>;
}

/// The [`Admission`] of the request's connection, in its extensions.
#[derive(Clone)]
pub struct ConnectionSlot(pub std::sync::Arc<dyn Admission>);

/// The remote end of a TLS connection; such callers are identified by bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPeer {
    /// Address and port of the client.
    pub addr: std::net::SocketAddr,
}

impl Principal {
    /// Whether the principal holds `scope` itself.
    pub fn has(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// Whether the principal may update `kid`: `keymgmt:upd`, or `keymgmt:upd:<kid>`.
    pub fn may_update(&self, kid: &Kid) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::KeysUpdate => true,
            Scope::KeysUpdateOne(k) => k == kid,
            _ => false,
        })
    }

    /// Whether the principal may read `kid` through the Encedo get: `keymgmt:get`, or
    /// `keymgmt:use:<kid>`.
    pub fn may_use(&self, kid: &Kid) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::KeysGet => true,
            Scope::KeysUseOne(k) => k == kid,
            _ => false,
        })
    }

    /// Whether the principal may update some key: `keymgmt:upd` or any `keymgmt:upd:<kid>`.
    pub fn may_update_some(&self) -> bool {
        self.scopes
            .iter()
            .any(|s| matches!(s, Scope::KeysUpdate | Scope::KeysUpdateOne(_)))
    }
}

/// The principals of one configuration, indexed by uid and gid.
#[derive(Debug, Default)]
pub struct Principals {
    by_uid: HashMap<u32, Arc<Principal>>,
    by_gid: HashMap<u32, Arc<Principal>>,
}

impl Principals {
    /// Indexes the configured principals (the config has checked that ids are unique).
    pub fn new(config: &[PrincipalConfig]) -> Principals {
        let mut p = Principals::default();
        for c in config {
            let principal = Arc::new(Principal {
                name: c.name.clone(),
                scopes: c.scopes.clone(),
                roles: c.roles.clone(),
                token_id: None,
            });
            for uid in &c.uids {
                let _ = p.by_uid.insert(*uid, principal.clone());
            }
            for gid in &c.gids {
                let _ = p.by_gid.insert(*gid, principal.clone());
            }
        }
        p
    }

    /// The principal a peer maps to.
    pub fn resolve(&self, peer: &Peer) -> Option<Arc<Principal>> {
        self.by_uid
            .get(&peer.uid)
            .or_else(|| self.by_gid.get(&peer.gid))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(name: &str, uids: Vec<u32>, gids: Vec<u32>, scopes: &[&str]) -> PrincipalConfig {
        PrincipalConfig {
            name: name.into(),
            uids,
            gids,
            scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
            roles: vec![],
        }
    }

    #[test]
    fn uid_wins_over_gid_and_strangers_are_unknown() {
        let p = Principals::new(&[
            pc("alice", vec![1000], vec![], &["keymgmt:list"]),
            pc(
                "ops",
                vec![],
                vec![50],
                &["keymgmt:upd:0a", "keymgmt:use:0c"],
            ),
        ]);
        let peer = |uid, gid| Peer { uid, gid, pid: 1 };
        assert_eq!(p.resolve(&peer(1000, 50)).unwrap().name, "alice");
        assert_eq!(p.resolve(&peer(1001, 50)).unwrap().name, "ops");
        assert!(p.resolve(&peer(1001, 51)).is_none());
        let ops = p.resolve(&peer(1, 50)).unwrap();
        assert!(ops.may_update(&Kid::parse("0a").unwrap()));
        assert!(!ops.may_update(&Kid::parse("0b").unwrap()));
        assert!(ops.may_use(&Kid::parse("0c").unwrap()));
        assert!(!ops.may_use(&Kid::parse("0a").unwrap()));
        assert!(!ops.has(&Scope::KeysGet));
    }
}
