//! Authentication as one trait with one implementation per front door: peer credentials
//! (SO_PEERCRED) on the Unix socket, bearer JWTs on TLS. The API asks the authenticator of
//! the request's transport and maps an [`AuthError`] to its 401; nothing else decides who
//! a caller is.

use std::sync::Arc;

use super::jwt::TokenService;
use super::{Peer, Principal, Principals};
use crate::values::RoleName;

/// What a request presents to prove who it is.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The Unix-socket peer's credentials, when the request came that way.
    pub peer: Option<Peer>,
    /// The token of an `Authorization: Bearer` header.
    pub bearer: Option<&'a str>,
}

/// Why a caller was not identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token on a transport that needs one.
    TokenMissing,
    /// A token that is malformed, expired, badly signed or from an untrusted issuer.
    InvalidToken(String),
    /// The connection carries no peer credentials.
    NoPeerCredentials,
    /// The peer maps to no principal.
    UnknownPeer(Peer),
}

/// Turns credentials into a principal.
pub trait Authenticator: Send + Sync {
    /// The principal these credentials identify.
    fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Arc<Principal>, AuthError>;
}

impl Authenticator for Principals {
    fn authenticate(&self, c: &Credentials<'_>) -> Result<Arc<Principal>, AuthError> {
        let peer = c.peer.ok_or(AuthError::NoPeerCredentials)?;
        self.resolve(&peer).ok_or(AuthError::UnknownPeer(peer))
    }
}

/// Bearer tokens, verified by the token service; roles in tokens are limited to the
/// configuration's.
pub struct BearerTokens {
    /// Verification (and minting, for the token endpoint).
    pub tokens: Arc<TokenService>,
    /// Role names of the configuration.
    pub roles: Vec<RoleName>,
}

impl Authenticator for BearerTokens {
    fn authenticate(&self, c: &Credentials<'_>) -> Result<Arc<Principal>, AuthError> {
        let token = c.bearer.ok_or(AuthError::TokenMissing)?;
        self.tokens
            .verify(token, &self.roles)
            .map(Arc::new)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PrincipalConfig;
    use crate::values::Scope;

    #[test]
    fn peers_resolve_through_the_principals() {
        let p = Principals::new(&[PrincipalConfig {
            name: "alice".into(),
            uids: vec![1000],
            gids: vec![],
            scopes: vec![Scope::KeysList],
            roles: vec![],
        }]);
        let peer = |uid| Peer {
            uid,
            gid: 1,
            pid: 2,
        };
        let creds = |peer| Credentials { peer, bearer: None };
        assert_eq!(
            p.authenticate(&creds(Some(peer(1000)))).unwrap().name,
            "alice"
        );
        assert_eq!(
            p.authenticate(&creds(Some(peer(1001)))),
            Err(AuthError::UnknownPeer(peer(1001)))
        );
        assert_eq!(
            p.authenticate(&creds(None)),
            Err(AuthError::NoPeerCredentials)
        );
    }
}
