//! The Encedo HEM login: challenges (`GET /api/auth/token`) and the verification of the
//! eJWT a client answers one with (`POST /api/auth/token`).
//!
//! The device has a static X25519 key (its private half comes from the HSM, see
//! `hsm::device`); a user's key is `PBKDF2-HMAC-SHA256(passphrase, eid, 600000)` used as an
//! X25519 private key, and the server knows its public half (configured, or derived at start
//! from a passphrase file). The eJWT is HS256 with the X25519 shared secret as HMAC key.
//! Each challenge is answered at most once (its `jti` is taken out of the table by the
//! first answer that names it), before its deadline; the table of open challenges is
//! bounded, so a flood of GETs cannot grow memory. No HSM call here: the shared secrets
//! are computed once at start.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::hmac;
use serde::Deserialize;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::Principal;
use crate::sync;
use crate::values::{RoleName, Scope};

/// PBKDF2 iterations of the appliance's passphrase derivation.
pub const PBKDF2_ITERATIONS: u32 = 600_000;

/// Most challenges open at once. A client needs one for a few seconds; this many cover
/// hundreds of logins per second, and bound what a flood of GETs can make the daemon keep.
pub const MAX_OPEN_CHALLENGES: usize = 1024;

/// How long after its deadline an unanswered challenge is still known (to answer "expired"
/// rather than "unknown"), unless the table needs the room.
const EXPIRED_KEPT: Duration = Duration::from_secs(60);

/// The eJWT header, as the appliance's clients send it.
const HEADER: &[u8] = br#"{"ecdh":"x25519","alg":"HS256","typ":"JWT"}"#;

/// Longest eJWT accepted; real ones are about 400 bytes.
const MAX_EJWT_LEN: usize = 4096;

/// The seed of a passphrase: PBKDF2-HMAC-SHA256 with the eid as salt, 32 bytes, which the
/// client uses directly as its X25519 private key.
pub fn passphrase_seed(passphrase: &[u8], eid: &str) -> Zeroizing<[u8; 32]> {
    let mut seed = Zeroizing::new([0u8; 32]);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(PBKDF2_ITERATIONS).unwrap_or(std::num::NonZeroU32::MIN),
        eid.as_bytes(),
        passphrase,
        &mut seed[..],
    );
    seed
}

/// The public key (the eJWT's `iss` bytes) of a passphrase.
pub fn passphrase_public_key(passphrase: &[u8], eid: &str) -> [u8; 32] {
    let secret = StaticSecret::from(*passphrase_seed(passphrase, eid));
    PublicKey::from(&secret).to_bytes()
}

/// The default EncedoID of a token: stable per token (its serial), shaped like the
/// appliance's (std base64 of 32 bytes).
pub fn default_eid(token_serial: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"hsmkeyd encedo eid v1\0");
    h.update(token_serial.as_bytes());
    STANDARD.encode(h.finalize())
}

/// One user who may log in.
pub struct LoginUser {
    /// Name (`sub` of its tokens).
    pub name: String,
    /// Scopes it may ask for.
    pub scopes: Vec<Scope>,
    /// Roles its tokens carry.
    pub roles: Vec<RoleName>,
    /// Its X25519 public key.
    pub public: [u8; 32],
}

struct User {
    principal: Principal,
    iss: String,
    /// HMAC key: X25519(device, user).
    key: hmac::Key,
}

/// A challenge as `GET /api/auth/token` answers it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Challenge {
    /// EncedoID.
    pub eid: String,
    /// The device's public key, std base64.
    pub spk: String,
    /// The nonce.
    pub jti: String,
    /// Unix deadline.
    pub exp: u64,
    /// Label.
    pub lbl: String,
}

/// A login that passed every check.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The user, holding the one scope granted.
    pub principal: Principal,
    /// The scope.
    pub scope: Scope,
    /// The eJWT's `exp` (the token's life ends there at the latest).
    pub until: u64,
}

/// Why a login was refused. The text never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Not an eJWT of the appliance's form (400).
    #[error("{0}")]
    Malformed(String),
    /// `aud` is not this device's key (401).
    #[error("the eJWT's aud is not this device's spk")]
    WrongAudience,
    /// `iss` is no configured user: an unknown user or a wrong passphrase (401).
    #[error("the eJWT's iss is no configured user (unknown user or wrong passphrase)")]
    UnknownUser,
    /// The HMAC does not verify (401).
    #[error("the eJWT's signature does not verify")]
    BadSignature,
    /// The `jti` names no open challenge: never issued, or answered already (401).
    #[error("the eJWT answers no open challenge (unknown or already used jti)")]
    UnknownChallenge,
    /// The challenge's deadline passed (401).
    #[error("the challenge expired before it was answered")]
    ChallengeExpired,
    /// The eJWT's own `exp` passed (401).
    #[error("the eJWT expired")]
    Expired,
    /// The user does not hold the scope asked for (403).
    #[error("user {user} does not hold scope {scope}")]
    ScopeNotHeld {
        /// The user.
        user: String,
        /// The scope asked for.
        scope: String,
    },
    /// Too many challenges are open (503).
    #[error("too many login challenges are open; retry in a few seconds")]
    TooManyChallenges,
}

#[derive(Deserialize)]
struct Claims {
    jti: String,
    aud: String,
    exp: u64,
    /// Required, as the appliance requires it; its value decides nothing here.
    #[serde(rename = "iat")]
    _iat: u64,
    iss: String,
    scope: String,
}

/// The login side of the Encedo API: the device key, the users, the open challenges.
pub struct EncedoLogin {
    eid: String,
    spk: String,
    label: String,
    ttl: Duration,
    users: Vec<User>,
    /// jti -> deadline (unix seconds).
    open: Mutex<HashMap<String, u64>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl EncedoLogin {
    /// The login of a device whose private key is `device`, for `users`.
    pub fn new(
        device: &Zeroizing<[u8; 32]>,
        eid: String,
        label: String,
        ttl: Duration,
        users: Vec<LoginUser>,
    ) -> EncedoLogin {
        let secret = StaticSecret::from(**device);
        let spk = STANDARD.encode(PublicKey::from(&secret).as_bytes());
        let users = users
            .into_iter()
            .map(|u| {
                let shared = secret.diffie_hellman(&PublicKey::from(u.public));
                User {
                    principal: Principal {
                        name: u.name,
                        scopes: u.scopes,
                        roles: u.roles,
                        token_id: None,
                    },
                    iss: STANDARD.encode(u.public),
                    key: hmac::Key::new(hmac::HMAC_SHA256, shared.as_bytes()),
                }
            })
            .collect();
        EncedoLogin {
            eid,
            spk,
            label,
            ttl,
            users,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The device's public key, std base64 (`spk`, the eJWT's `aud`).
    pub fn spk(&self) -> &str {
        &self.spk
    }

    /// A new challenge, or [`LoginError::TooManyChallenges`] when the table is full of
    /// challenges still open.
    pub fn challenge(&self) -> Result<Challenge, LoginError> {
        self.challenge_at(now())
    }

    fn challenge_at(&self, now: u64) -> Result<Challenge, LoginError> {
        let jti = STANDARD.encode(rand::random::<[u8; 32]>());
        let exp = now + self.ttl.as_secs();
        let mut open = sync::lock(&self.open);
        if open.len() >= MAX_OPEN_CHALLENGES {
            open.retain(|_, deadline| *deadline + EXPIRED_KEPT.as_secs() >= now);
        }
        if open.len() >= MAX_OPEN_CHALLENGES {
            open.retain(|_, deadline| *deadline >= now);
        }
        if open.len() >= MAX_OPEN_CHALLENGES {
            return Err(LoginError::TooManyChallenges);
        }
        let _ = open.insert(jti.clone(), exp);
        Ok(Challenge {
            eid: self.eid.clone(),
            spk: self.spk.clone(),
            jti,
            exp,
            lbl: self.label.clone(),
        })
    }

    /// Checks an eJWT. The challenge it names is used up by this call whatever the
    /// verdict, so each challenge gets one answer. On refusal, the user's name when the
    /// `iss` was known (for the audit trail).
    pub fn verify(&self, ejwt: &str) -> Result<Granted, (LoginError, Option<String>)> {
        self.verify_at(ejwt, now())
    }

    fn verify_at(&self, ejwt: &str, now: u64) -> Result<Granted, (LoginError, Option<String>)> {
        let malformed = |m: &str| (LoginError::Malformed(m.to_string()), None);
        if ejwt.len() > MAX_EJWT_LEN {
            return Err(malformed("the eJWT is too long"));
        }
        let parts: Vec<&str> = ejwt.split('.').collect();
        let [header, payload, signature] = parts.as_slice() else {
            return Err(malformed("an eJWT is three base64url parts joined by dots"));
        };
        let header_bytes = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| malformed("the eJWT header is not base64url"))?;
        let header_json: serde_json::Value = serde_json::from_slice(&header_bytes)
            .map_err(|_| malformed("the eJWT header is not JSON"))?;
        let expected: serde_json::Value = serde_json::from_slice(HEADER).unwrap_or_default();
        if header_json != expected {
            return Err(malformed(
                "the eJWT header must be {\"ecdh\":\"x25519\",\"alg\":\"HS256\",\"typ\":\"JWT\"}",
            ));
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                malformed(
                    "the eJWT payload must be JSON with jti, aud, exp, iat (numbers as \
                     integers), iss and scope",
                )
            })?;
        let mac = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| malformed("the eJWT signature is not base64url"))?;
        // One answer per challenge, whatever follows.
        let deadline = sync::lock(&self.open).remove(&claims.jti);
        if claims.aud != self.spk {
            return Err((LoginError::WrongAudience, None));
        }
        let Some(user) = self.users.iter().find(|u| u.iss == claims.iss) else {
            return Err((LoginError::UnknownUser, None));
        };
        let name = Some(user.principal.name.clone());
        let signed = &ejwt[..header.len() + 1 + payload.len()];
        if hmac::verify(&user.key, signed.as_bytes(), &mac).is_err() {
            return Err((LoginError::BadSignature, name));
        }
        match deadline {
            None => return Err((LoginError::UnknownChallenge, name)),
            Some(d) if d < now => return Err((LoginError::ChallengeExpired, name)),
            Some(_) => {}
        }
        if claims.exp <= now {
            return Err((LoginError::Expired, name));
        }
        let scope = Scope::parse(&claims.scope).map_err(|e| {
            (
                LoginError::Malformed(format!("the eJWT's scope: {e}")),
                name.clone(),
            )
        })?;
        let p = &user.principal;
        let held = p.has(&scope)
            || match &scope {
                Scope::KeysUseOne(k) => p.may_use(k),
                Scope::KeysUpdateOne(k) => p.may_update(k),
                _ => false,
            };
        if !held {
            return Err((
                LoginError::ScopeNotHeld {
                    user: p.name.clone(),
                    scope: scope.to_string(),
                },
                name,
            ));
        }
        Ok(Granted {
            principal: Principal {
                scopes: vec![scope.clone()],
                ..p.clone()
            },
            scope,
            until: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: [u8; 32] = [7; 32];
    const USER: [u8; 32] = [9; 32];

    fn login() -> EncedoLogin {
        let user = StaticSecret::from(USER);
        EncedoLogin::new(
            &Zeroizing::new(DEVICE),
            "eid".into(),
            "lbl".into(),
            Duration::from_secs(5),
            vec![LoginUser {
                name: "dev".into(),
                scopes: vec![Scope::KeysList, Scope::KeysGet],
                roles: vec![],
                public: PublicKey::from(&user).to_bytes(),
            }],
        )
    }

    /// The client's side, written from the protocol description.
    fn ejwt(c: &Challenge, seed: [u8; 32], scope: &str, exp: u64, now: u64) -> String {
        let secret = StaticSecret::from(seed);
        let spk: [u8; 32] = STANDARD.decode(&c.spk).unwrap().try_into().unwrap();
        let shared = secret.diffie_hellman(&PublicKey::from(spk));
        let payload = serde_json::json!({
            "jti": c.jti, "aud": c.spk, "exp": exp, "iat": now,
            "iss": STANDARD.encode(PublicKey::from(&secret).as_bytes()), "scope": scope,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, shared.as_bytes());
        let tag = hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    #[test]
    fn a_good_answer_is_granted_once() {
        let l = login();
        let c = l.challenge_at(1000).unwrap();
        let e = ejwt(&c, USER, "keymgmt:use:0a", 2000, 1000);
        let g = l.verify_at(&e, 1001).unwrap();
        assert_eq!(g.principal.name, "dev");
        assert_eq!(g.principal.scopes, vec![g.scope.clone()]);
        assert_eq!(g.until, 2000);
        assert_eq!(
            l.verify_at(&e, 1001).unwrap_err().0,
            LoginError::UnknownChallenge
        );
    }

    #[test]
    fn every_check_refuses() {
        let l = login();
        let c = l.challenge_at(1000).unwrap();
        let wrong = ejwt(&c, [3; 32], "keymgmt:list", 2000, 1000);
        assert_eq!(
            l.verify_at(&wrong, 1001).unwrap_err().0,
            LoginError::UnknownUser
        );
        let c = l.challenge_at(1000).unwrap();
        let late = ejwt(&c, USER, "keymgmt:list", 2000, 1000);
        assert_eq!(
            l.verify_at(&late, 1006).unwrap_err().0,
            LoginError::ChallengeExpired
        );
        let c = l.challenge_at(1000).unwrap();
        let good = ejwt(&c, USER, "keymgmt:list", 2000, 1000);
        let (signed, mac) = good.rsplit_once('.').unwrap();
        let mut mac = URL_SAFE_NO_PAD.decode(mac).unwrap();
        mac[0] ^= 1;
        let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac));
        assert_eq!(
            l.verify_at(&tampered, 1001).unwrap_err().0,
            LoginError::BadSignature
        );
        let c = l.challenge_at(1000).unwrap();
        let del = ejwt(&c, USER, "keymgmt:del", 2000, 1000);
        assert!(matches!(
            l.verify_at(&del, 1001).unwrap_err().0,
            LoginError::ScopeNotHeld { .. }
        ));
        let c = l.challenge_at(1000).unwrap();
        let stale = ejwt(&c, USER, "keymgmt:list", 1001, 1000);
        assert_eq!(
            l.verify_at(&stale, 1001).unwrap_err().0,
            LoginError::Expired
        );
    }

    #[test]
    fn the_challenge_table_is_bounded() {
        let l = login();
        for _ in 0..MAX_OPEN_CHALLENGES {
            let _ = l.challenge_at(1000).unwrap();
        }
        assert_eq!(
            l.challenge_at(1001).unwrap_err(),
            LoginError::TooManyChallenges
        );
        // Once they are past their deadline, the room is taken back.
        assert!(l.challenge_at(1000 + 6).is_ok());
        assert!(sync::lock(&l.open).len() <= MAX_OPEN_CHALLENGES);
    }
}
