//! Helpers of the Encedo-compatible endpoint tests (tests/encedo.rs, tests/encedo_keys.rs).

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
