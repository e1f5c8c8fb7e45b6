//! Bearer tokens (JWT): minting hsmkeyd's own, and verifying own and external ones.
//!
//! hsmkeyd's issuer signs ES256 with a key that lives in the HSM (through [`Signer`]); the
//! public half is published as a JWK set. External issuers are configured with `iss`,
//! `aud`, their algorithms and a verification key. Verification is `jsonwebtoken` (>= 10.3,
//! which rejects an `exp` sent as a string) with: the algorithm list of the issuer named by
//! the token's `iss` (never `none`), `exp` required, `nbf` honoured, `iss` and `aud`
//! checked, configured leeway. `jku`, `x5u`, `x5c` and embedded `jwk` headers are refused,
//! never followed. Scopes come from the space-separated `scope` claim, roles from `roles`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::Principal;
use crate::config::{IssuerConfig, JwtAlgorithm, TokensConfig};
use crate::sync;
use crate::values::RoleName;
use crate::values::Scope;

/// Longest bearer token accepted; real tokens are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Signs with hsmkeyd's token key (C_Sign in the HSM). Blocks.
pub trait Signer: Send + Sync {
    /// ES256 signature (r || s) of `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
    /// The uncompressed public point (65 bytes).
    fn public_point(&self) -> Vec<u8>;
    /// The `kid` header of minted tokens.
    fn key_id(&self) -> String;
}

/// Why a token was refused (answered 401 `invalid_token`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// A token that was minted.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The compact JWT.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

struct External {
    iss: String,
    aud: String,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Every issuer hsmkeyd trusts.
pub struct TokenService {
    /// Tokens verified already, by SHA-256 of the compact form: a keep-alive client
    /// presents the same token on every request, and an ES256 verification costs far more
    /// than the request it guards. Entries die at the token's `exp` (plus leeway); a reload
    /// builds a new service, so a changed issuer or role list never meets an old entry.
    verified: Mutex<HashMap<[u8; 32], Verified>>,
    issuer: String,
    audience: String,
    max_ttl: Duration,
    leeway: Duration,
    signer: Arc<dyn Signer>,
    own_key: DecodingKey,
    jwk: Value,
    external: Vec<External>,
}

/// Most verified tokens remembered at once.
const MAX_VERIFIED: usize = 4096;

/// A verified token's principal and when it stops being valid.
struct Verified {
    principal: Principal,
    until: f64,
}

#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    sub: Option<String>,
    jti: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<Value>,
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::HS256 => Algorithm::HS256,
    }
}

impl TokenService {
    /// Loads the issuers. `secret` reads a permission-checked secret file (HS256).
    pub fn new(
        cfg: &TokensConfig,
        issuers: &[IssuerConfig],
        signer: Arc<dyn Signer>,
        secret: impl Fn(&std::path::Path) -> Result<Vec<u8>, String>,
    ) -> Result<TokenService, String> {
        let point = signer.public_point();
        if point.len() != 65 || point[0] != 4 {
            return Err("the token-signing key is not a P-256 point".into());
        }
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        let own_key = DecodingKey::from_ec_components(&x, &y)
            .map_err(|e| format!("the token-signing key is unusable: {e}"))?;
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": signer.key_id(), "alg": "ES256", "use": "sig",
        });
        let mut external = Vec::new();
        for (i, c) in issuers.iter().enumerate() {
            let algorithms: Vec<Algorithm> = c.algorithms.iter().map(|a| algorithm(*a)).collect();
            let key = match (&c.key_file, &c.secret_file) {
                (_, Some(path)) => DecodingKey::from_secret(
                    &secret(path).map_err(|e| format!("issuers[{i}].secret_file: {e}"))?,
                ),
                (Some(path), None) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("issuers[{i}].key_file {}: {e}", path.display()))?;
                    let parsed = match algorithms[0] {
                        Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                        _ => DecodingKey::from_rsa_pem(&pem),
                    };
                    parsed.map_err(|e| {
                        format!(
                            "issuers[{i}].key_file {} is not a PEM public key for {:?}: {e}",
                            path.display(),
                            algorithms[0]
                        )
                    })?
                }
                (None, None) => return Err(format!("issuers[{i}] has no key")),
            };
            if c.iss == cfg.issuer {
                return Err(format!(
                    "issuers[{i}].iss {:?} is hsmkeyd's own issuer (tokens.issuer)",
                    c.iss
                ));
            }
            external.push(External {
                iss: c.iss.clone(),
                aud: c.aud.clone(),
                algorithms,
                key,
            });
        }
        Ok(TokenService {
            verified: Mutex::new(HashMap::new()),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            max_ttl: cfg.max_ttl,
            leeway: cfg.leeway,
            signer,
            own_key,
            jwk,
            external,
        })
    }

    /// The JWK set of hsmkeyd's issuer.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// The longest lifetime a minted token may have.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Verifies a compact JWT and returns the principal it stands for (from the cache of
    /// tokens verified before, while they are valid).
    pub fn verify(&self, token: &str, defined_roles: &[RoleName]) -> Result<Principal, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut cache = sync::lock(&self.verified);
        match cache.get(&key) {
            Some(v) if v.until >= now => return Ok(v.principal.clone()),
            Some(_) => {
                let _ = cache.remove(&key);
            }
            None => {}
        }
        drop(cache);
        let (principal, exp) = self.verify_uncached(token, defined_roles)?;
        let mut cache = sync::lock(&self.verified);
        if cache.len() >= MAX_VERIFIED {
            cache.retain(|_, v| v.until >= now);
        }
        if cache.len() < MAX_VERIFIED {
            let until = exp + self.leeway.as_secs_f64();
            let _ = cache.insert(
                key,
                Verified {
                    principal: principal.clone(),
                    until,
                },
            );
        }
        Ok(principal)
    }

    fn verify_uncached(
        &self,
        token: &str,
        defined_roles: &[RoleName],
    ) -> Result<(Principal, f64), TokenError> {
        let bad = |m: &str| TokenError(m.to_string());
        if token.len() > MAX_TOKEN_LEN {
            return Err(bad("the token is too long"));
        }
        let header =
            decode_header(token).map_err(|e| TokenError(format!("malformed token: {e}")))?;
        if header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
        {
            return Err(bad("tokens with jku, x5u, x5c or jwk headers are refused"));
        }
        if names_critical_extensions(token) {
            return Err(bad(
                "the token names critical header extensions (crit), which hsmkeyd does not \
                 implement",
            ));
        }
        let iss = unverified_issuer(token)?;
        let (key, algorithms, aud) = if iss == self.issuer {
            if header
                .kid
                .as_deref()
                .is_some_and(|k| k != self.signer.key_id())
            {
                return Err(bad("the token names an unknown signing key"));
            }
            (
                &self.own_key,
                vec![Algorithm::ES256],
                self.audience.as_str(),
            )
        } else {
            match self.external.iter().find(|e| e.iss == iss) {
                Some(e) => (&e.key, e.algorithms.clone(), e.aud.as_str()),
                None => return Err(bad("the token's issuer is not trusted")),
            }
        };
        let mut v = Validation::new(algorithms[0]);
        v.algorithms = algorithms;
        v.leeway = self.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.required_spec_claims = ["exp", "iss", "aud"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.iss = Some(HashSet::from([iss.clone()]));
        v.aud = Some(HashSet::from([aud.to_string()]));
        let data = decode::<Claims>(token, key, &v)
            .map_err(|e| TokenError(format!("token refused: {e}")))?;
        let c = data.claims;
        let scopes = c
            .scope
            .unwrap_or_default()
            .split_ascii_whitespace()
            .filter_map(|s| Scope::parse(s).ok())
            .collect();
        let roles = c
            .roles
            .iter()
            .filter_map(|r| RoleName::parse(r).ok())
            .filter(|r| defined_roles.contains(r))
            .collect();
        let sub = c.sub.unwrap_or_else(|| "?".to_string());
        let principal = Principal {
            name: if iss == self.issuer {
                sub
            } else {
                format!("{iss}#{sub}")
            },
            scopes,
            roles,
            token_id: Some(c.jti.unwrap_or_default()),
        };
        // `exp` is required and was checked, so it is there.
        Ok((principal, c.exp.unwrap_or(0.0)))
    }

    /// Mints a token for `principal` carrying `scopes` (which the caller has checked the
    /// principal holds) for `ttl`. Blocks on the HSM.
    pub fn mint(
        &self,
        principal: &Principal,
        scopes: &[Scope],
        ttl: Duration,
    ) -> Result<Minted, String> {
        let now = SystemTime::now();
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let exp = iat + ttl.as_secs();
        let jti = format!("{:032x}", rand::random::<u128>());
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.signer.key_id()});
        let claims = json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": principal.name,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": jti,
            "scope": scopes.iter().map(Scope::to_string).collect::<Vec<_>>().join(" "),
            "roles": principal.roles,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.signer.sign(signing_input.as_bytes())?;
        Ok(Minted {
            token: format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)),
            jti,
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }
}

/// The `iss` claim before verification, only to pick the issuer's key and algorithms.
/// Whether the token's header lists critical extensions (`crit`). hsmkeyd implements none,
/// so RFC 7515 (4.1.11) says such a token must be refused.
fn names_critical_extensions(token: &str) -> bool {
    let Some(header) = token.split('.').next() else {
        return false;
    };
    URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, Value>>(&b).ok())
        .is_some_and(|h| h.contains_key("crit"))
}

fn unverified_issuer(token: &str) -> Result<String, TokenError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| TokenError("malformed token".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError("malformed token payload".into()))?;
    let u: Unverified =
        serde_json::from_slice(&bytes).map_err(|_| TokenError("malformed token payload".into()))?;
    match u.iss {
        Some(Value::String(s)) => Ok(s),
        _ => Err(TokenError("the token has no issuer".into())),
    }
}
