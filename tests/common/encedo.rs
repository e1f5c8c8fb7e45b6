//! Helpers of the Encedo-compatible endpoint tests (tests/encedo.rs, tests/encedo_keys.rs).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::Value;

use super::fixture::{
    access, token_with, Key, Principal, DUP_KEYS, ED_KEY, LOCKED_KEY, MINTING_SCOPES, RSA_KEY,
};
use super::{Daemon, Response, Setup, Token};

/// This file's own kids: 16-byte ids, where the shared fixture's are 2 bytes long.
pub const AES: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
pub const EC: &str = "ec01ec01ec01ec01ec01ec01ec01ec01";

pub fn token() -> Token {
    let [dup_1, dup_2] = DUP_KEYS;
    token_with(&[
        Key::aes(AES, "aes-key"),
        Key::ec(EC, "ec-key"),
        ED_KEY,
        RSA_KEY,
        LOCKED_KEY,
        dup_1,
        dup_2,
    ])
}

pub fn start(t: &Token) -> Daemon {
    let operator = Principal::me("operator")
        .scopes(&MINTING_SCOPES)
        .roles(&["ops"]);
    Daemon::start(
        t,
        &Setup::with_access(access(&["ops"], &[operator])).https(),
    )
}

/// The seed's request: POST /api/keymgmt/update with the two headers it names.
pub fn seed_update(d: &Daemon, token: &str, body: &Value) -> Response {
    d.https().send(
        "POST",
        "/api/keymgmt/update",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// Result entries of the daemon's stderr-json audit sink.
pub fn results(d: &Daemon) -> Vec<Value> {
    d.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["HSMKEYD_EVENT"].is_string())
        .collect()
}

pub fn entry_of(d: &Daemon, request_id: &str) -> Value {
    let found: Vec<Value> = results(d)
        .into_iter()
        .filter(|e| e["HSMKEYD_REQUEST_ID"] == request_id)
        .filter(|e| !e["HSMKEYD_EVENT"].as_str().unwrap().ends_with("_INTENT"))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one result entry for {request_id}: {found:?}"
    );
    found.into_iter().next().unwrap()
}

/// The X25519 public key of `seed` (a user's private key), std base64: the eJWT's `iss`
/// and `[[encedo.users]] pubkey`.
pub fn login_pubkey(seed: [u8; 32]) -> String {
    let secret = x25519_dalek::StaticSecret::from(seed);
    STANDARD.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

/// An eJWT answering `challenge` (the JSON of `GET /api/auth/token`) for `scope`, signed
/// with the key of `seed`, as the appliance's description says a client builds it. The
/// Python client (encedo_client.py) is the independent one; this serves tests that only
/// need a login to happen.
pub fn ejwt(challenge: &Value, seed: [u8; 32], scope: &str) -> String {
    let secret = x25519_dalek::StaticSecret::from(seed);
    let spk: [u8; 32] = STANDARD
        .decode(challenge["spk"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(spk));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = serde_json::json!({
        "jti": challenge["jti"], "aud": challenge["spk"], "exp": now + 600, "iat": now,
        "iss": login_pubkey(seed), "scope": scope,
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"ecdh":"x25519","alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes());
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}
