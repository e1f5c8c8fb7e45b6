//! The HTTPS front door: every endpoint over TLS with bearer tokens minted on the Unix
//! socket, 418 for clear text, closing what is neither, minting rules, the JWK set checked
//! with an independent JWT library, and the scope x endpoint matrix on both listeners.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::fixture::{
    access, pair, token_with, Principal, AES, AES_KEY, EC, EC_KEY, MINTING_SCOPES,
};
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

fn token() -> Token {
    token_with(&[AES_KEY, EC_KEY])
}

/// The test's uid holds every scope, including minting.
fn minter() -> String {
    access(
        &["ops"],
        &[Principal::me("minter")
            .scopes(&MINTING_SCOPES)
            .roles(&["ops"])],
    )
}

/// One principal, the test's uid, holding `scopes`.
fn holding(name: &str, scopes: &[&str]) -> String {
    access(&[], &[Principal::me(name).scopes(scopes)])
}

fn tls_setup(access: String) -> Setup {
    Setup::with_access(access).https()
}

#[test]
fn every_endpoint_answers_over_https_with_a_minted_token() {
    let t = token();
    let d = Daemon::start(&t, &tls_setup(minter()));
    let h = d.https();
    let tok = d.mint(&["keymgmt:list", "keymgmt:get", "keymgmt:upd"], 600);

    let r = h.get("/v1/keys", &tok);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["total"], 2);
    let r = h.get(&format!("/v1/keys/{EC}"), &tok);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["curve"], "P-256");
    let r = h.patch(EC, &tok, &json!({"label": "over-tls"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(t.labels_of(EC), pair("over-tls"));
    let r = h.send("GET", "/v1/auth/jwks", &[], b"");
    assert_eq!(r.status, 200, "the JWK set needs no token");
    assert_eq!(r.json()["keys"][0]["alg"], "ES256");

    // The audit entry of a TLS update names the token, never holds it.
    let entry = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .expect("a result entry");
    let jti = claims(&tok)["jti"].as_str().unwrap().to_string();
    assert_eq!(entry["HSMKEYD_TOKEN_ID"], jti.as_str());
    assert!(entry["HSMKEYD_PEER"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(!d.log().contains(&tok), "a bearer token reached the log");
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn cleartext(addr: std::net::SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    // read_to_end returned: the server closed. A second read confirms EOF, not a timeout.
    let closed = matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_));
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

#[test]
fn clear_text_http_on_the_tls_port_gets_418_and_is_closed() {
    let t = token();
    let d = Daemon::start(&t, &tls_setup(minter()));
    let addr = d.https().addr;
    for (name, req, version) in [
        (
            "HTTP/1.0",
            &b"GET /v1/keys HTTP/1.0\r\n\r\n"[..],
            "HTTP/1.0 418",
        ),
        (
            "HTTP/1.1",
            &b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
            "HTTP/1.1 418",
        ),
        (
            "HTTP/2 preface",
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            "HTTP/1.1 418",
        ),
    ] {
        let (text, closed) = cleartext(addr, req);
        assert!(text.starts_with(version), "{name}: {text:?}");
        let body: Value =
            serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap();
        assert_eq!(body["error"], "tls_required", "{name}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(closed, "{name}: connection left open");
    }
    // The daemon still serves TLS afterwards.
    let tok = d.mint(&["keymgmt:list"], 60);
    assert_eq!(d.https().get("/v1/keys", &tok).status, 200);
}

#[test]
fn bytes_that_are_neither_tls_nor_http_are_closed_within_the_handshake_timeout() {
    let t = token();
    let d = Daemon::start(&t, &tls_setup(minter()));
    let addr = d.https().addr;

    let start = Instant::now();
    let (text, closed) = cleartext(addr, &[0x00, 0xff, 0x13, 0x37, 0x42, 0x99, 0x01]);
    assert!(text.is_empty() && closed);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // A client that says nothing is dropped when the 2 s handshake timeout runs out.
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let n = s.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );

    // A TLS ClientHello that stalls half-way is dropped the same way.
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    let _ = s.read(&mut [0u8; 16]);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn minting_gives_only_held_scopes_capped_in_time_and_only_on_the_unix_socket() {
    let t = token();
    let limited = holding(
        "limited",
        &["keymgmt:list", "keymgmt:upd:a1a1", "auth:token"],
    );
    let d = Daemon::start(&t, &tls_setup(limited));
    let mint = |body: Value| {
        d.client().send(
            "POST",
            "/v1/auth/token",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let r = mint(json!({"scopes": ["keymgmt:list", "keymgmt:upd:a1a1"], "ttl_s": 120}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let body = r.json();
    assert_eq!(body["scopes"], json!(["keymgmt:list", "keymgmt:upd:a1a1"]));
    assert!(body["audit_id"].is_string());
    let c = claims(body["token"].as_str().unwrap());
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 120);
    assert_eq!(c["scope"], "keymgmt:list keymgmt:upd:a1a1");
    assert_eq!(c["sub"], "limited");
    assert_eq!(c["jti"].as_str().unwrap().len(), 32);
    let expires = time::OffsetDateTime::parse(
        body["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(expires.unix_timestamp() as u64, c["exp"].as_u64().unwrap());

    mint(json!({"scopes": ["keymgmt:upd"]})).assert_error(403, "missing_scope");
    mint(json!({"scopes": ["keymgmt:get"]})).assert_error(403, "missing_scope");
    mint(json!({"scopes": ["keymgmt:upd:b2b2"]})).assert_error(403, "missing_scope");
    mint(json!({"scopes": ["keymgmt:list"], "ttl_s": 3601})).assert_error(400, "invalid_ttl");
    mint(json!({"scopes": ["keymgmt:list"], "ttl_s": 0})).assert_error(400, "invalid_ttl");
    mint(json!({"scopes": []})).assert_error(400, "invalid_scopes");
    mint(json!({"scopes": ["keymgmt:everything"]})).assert_error(400, "invalid_scopes");
    mint(json!({"scopes": ["keymgmt:list"], "admin": true}))
        .assert_error(400, "invalid_token_request");

    // Over TLS, even with a valid token: refused.
    let tok = body["token"].as_str().unwrap();
    let r = d.https().send(
        "POST",
        "/v1/auth/token",
        &[
            ("Authorization", &format!("Bearer {tok}")),
            ("Content-Type", "application/json"),
        ],
        json!({"scopes": ["keymgmt:list"]}).to_string().as_bytes(),
    );
    r.assert_error(403, "unix_socket_only");

    // A principal without auth:token cannot mint at all.
    let d2 = {
        drop(d);
        Daemon::start(&t, &tls_setup(holding("no-minting", &["keymgmt:list"])))
    };
    let r = d2.client().send(
        "POST",
        "/v1/auth/token",
        &[("Content-Type", "application/json")],
        json!({"scopes": ["keymgmt:list"]}).to_string().as_bytes(),
    );
    r.assert_error(403, "missing_scope");
}

#[test]
fn the_jwks_verifies_minted_tokens_with_an_independent_library() {
    use base64::Engine;
    use jwt_simple::prelude::*;

    let t = token();
    let d = Daemon::start(&t, &tls_setup(minter()));
    let tok = d.mint(&["keymgmt:get"], 300);
    let jwks = d.https().send("GET", "/v1/auth/jwks", &[], b"").json();
    let k = &jwks["keys"][0];
    assert_eq!(
        (k["kty"].as_str(), k["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut point = vec![4u8];
    point.extend(b64.decode(k["x"].as_str().unwrap()).unwrap());
    point.extend(b64.decode(k["y"].as_str().unwrap()).unwrap());
    let key = ES256PublicKey::from_bytes(&point).expect("a P-256 point");
    let opts = VerificationOptions {
        allowed_issuers: Some(HashSet::from_strings(&["hsmkeyd"])),
        allowed_audiences: Some(HashSet::from_strings(&["hsmkeyd"])),
        ..Default::default()
    };
    let verified = key
        .verify_token::<serde_json::Map<String, Value>>(&tok, Some(opts))
        .expect("jwt-simple accepts the minted token with the published key");
    assert_eq!(verified.custom["scope"], "keymgmt:get");

    // The header names the same key; a token signed otherwise does not verify.
    let header: Value =
        serde_json::from_slice(&b64.decode(tok.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["kid"], k["kid"]);
    let mut forged = tok.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert!(key
        .verify_token::<serde_json::Map<String, Value>>(&forged, None)
        .is_err());

    // The signing key lives in the token, private and not extractable, under its label.
    let signing: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.label == "hsmkeyd-jwt-signing")
        .collect();
    assert_eq!(signing.len(), 2, "{signing:?}");
    assert!(signing.iter().all(|o| o.id == k["kid"].as_str().unwrap()));
    // It is not a managed key.
    let keys = d.client().get("/v1/keys").json();
    assert_eq!(keys["total"], 2);
    // And no key may take its label, nor that of hsmkeyd's other own keys: a second key
    // under one would leave the daemon unable to tell its own at the next start.
    for reserved in [
        "hsmkeyd-jwt-signing",
        "hsmkeyd-audit-signing",
        "hsmkeyd-encedo-device",
    ] {
        d.client()
            .patch(AES, &json!({"label": reserved}))
            .assert_error(400, "invalid_label");
    }
}

/// Expected status of each endpoint for a caller holding `scopes`.
fn expected(scopes: &[&str], endpoint: &str) -> u16 {
    let has = |s: &str| scopes.contains(&s);
    match endpoint {
        "list" | "enc-list" => {
            if has("keymgmt:list") {
                200
            } else {
                403
            }
        }
        "get" | "enc-get" => {
            if has("keymgmt:get") {
                200
            } else {
                403
            }
        }
        "patch-aes" | "enc-upd-aes" => {
            if has("keymgmt:upd") || has("keymgmt:upd:a1a1") {
                200
            } else {
                403
            }
        }
        "patch-ec" | "enc-upd-ec" => {
            if has("keymgmt:upd") {
                200
            } else {
                403
            }
        }
        _ => unreachable!(),
    }
}

fn call(
    endpoint: &str,
    i: usize,
    send: &dyn Fn(&str, &str, Option<Value>) -> Response,
) -> Response {
    match endpoint {
        "list" => send("GET", "/v1/keys", None),
        "get" => send("GET", &format!("/v1/keys/{EC}"), None),
        "patch-aes" => send(
            "PATCH",
            &format!("/v1/keys/{AES}"),
            Some(json!({"label": format!("m{i}")})),
        ),
        "patch-ec" => send(
            "PATCH",
            &format!("/v1/keys/{EC}"),
            Some(json!({"label": format!("m{i}")})),
        ),
        "enc-list" => send("GET", "/api/keymgmt/list/0/10", None),
        "enc-get" => send("GET", &format!("/api/keymgmt/get/{EC}"), None),
        "enc-upd-aes" => send(
            "POST",
            "/api/keymgmt/update",
            Some(json!({"kid": AES, "label": format!("e{i}")})),
        ),
        "enc-upd-ec" => send(
            "POST",
            "/api/keymgmt/update",
            Some(json!({"kid": EC, "label": format!("e{i}")})),
        ),
        _ => unreachable!(),
    }
}

#[test]
fn scope_by_endpoint_matrix_over_both_front_doors() {
    let rows: [&[&str]; 6] = [
        &["keymgmt:list"],
        &["keymgmt:get"],
        &["keymgmt:upd"],
        &["keymgmt:upd:a1a1"],
        &["keymgmt:list", "keymgmt:get", "keymgmt:upd"],
        // Near misses grant nothing.
        &[
            "keymgmt:updx",
            "keymgmt:up",
            "keymgmt:upd:ec0",
            "keymgmt:listing",
        ],
    ];
    let endpoints = [
        "list",
        "get",
        "patch-aes",
        "patch-ec",
        "enc-list",
        "enc-get",
        "enc-upd-aes",
        "enc-upd-ec",
    ];
    let t = token();
    let mut cells = 0;

    // TLS: one minter daemon, a token per row. The near-miss row cannot be minted
    // (minting refuses unknown scopes); tests/jwt.rs sends such tokens from an external
    // issuer.
    let d = Daemon::start(&t, &tls_setup(minter()));
    let h = d.https();
    for (r, scopes) in rows.iter().enumerate() {
        let real: Vec<&str> = scopes
            .iter()
            .copied()
            .filter(|s| {
                [
                    "keymgmt:list",
                    "keymgmt:get",
                    "keymgmt:upd",
                    "keymgmt:upd:a1a1",
                ]
                .contains(s)
            })
            .collect();
        if real.is_empty() {
            continue;
        }
        let tok = d.mint(&real, 300);
        for (c, e) in endpoints.iter().enumerate() {
            let send = |m: &str, p: &str, b: Option<Value>| {
                let auth = format!("Bearer {tok}");
                let mut headers = vec![("Authorization", auth.as_str())];
                if b.is_some() {
                    headers.push(("Content-Type", "application/json"));
                }
                h.send(
                    m,
                    p,
                    &headers,
                    b.map(|v| v.to_string()).unwrap_or_default().as_bytes(),
                )
            };
            let got = call(e, r * 10 + c, &send).status;
            assert_eq!(got, expected(scopes, e), "TLS {scopes:?} {e}");
            cells += 1;
        }
    }
    drop(d);

    // Unix socket: the principal's scopes are the row (one daemon start per row).
    for (r, scopes) in rows.iter().enumerate() {
        let access = holding(&format!("row{r}"), scopes);
        // Near misses are not valid scopes in a config: they are refused at startup.
        let d = match Daemon::try_start(&t, &Setup::with_access(access)) {
            Ok(d) => d,
            Err(e) => {
                assert!(r == 5 && e.contains("keymgmt:updx"), "row {r}: {e}");
                continue;
            }
        };
        for (c, e) in endpoints.iter().enumerate() {
            let client = d.client();
            let send = |m: &str, p: &str, b: Option<Value>| {
                let mut headers = vec![];
                if b.is_some() {
                    headers.push(("Content-Type", "application/json"));
                }
                client.send(
                    m,
                    p,
                    &headers,
                    b.map(|v| v.to_string()).unwrap_or_default().as_bytes(),
                )
            };
            let got = call(e, 100 + r * 10 + c, &send).status;
            assert_eq!(got, expected(scopes, e), "unix {scopes:?} {e}");
            cells += 1;
        }
    }
    assert_eq!(cells, 5 * 8 * 2);
}

#[test]
fn a_token_verified_before_is_refused_once_it_expires() {
    let t = token();
    let setup = Setup {
        extra: "[tokens]\nleeway_s = 0\n".to_string(),
        ..tls_setup(minter())
    };
    let d = Daemon::start(&t, &setup);
    let h = d.https();
    let tok = d.mint(&["keymgmt:list"], 2);
    // Verified once, then answered from the cache of verified tokens.
    for _ in 0..3 {
        assert_eq!(h.get("/v1/keys", &tok).status, 200);
    }
    std::thread::sleep(std::time::Duration::from_millis(3100));
    h.get("/v1/keys", &tok).assert_error(401, "invalid_token");
}

#[test]
fn a_client_that_closes_its_sending_half_after_a_patch_still_gets_its_answer() {
    let t = token();
    let d = Daemon::start(&t, &tls_setup(minter()));
    let tok = d.mint(&["keymgmt:upd"], 600);
    let mut tls = d.https().connect().unwrap();
    let auth = format!("Bearer {tok}");
    let body = json!({"label": "half-closed"}).to_string();
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let request = common::request(
        "PATCH",
        &format!("/v1/keys/{EC}"),
        &headers,
        body.as_bytes(),
    );
    tls.write_all(&request).unwrap();
    // TLS's half close: close_notify, then the TCP sending half.
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let r = common::parse_response(&answer);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["key"]["label"], "half-closed");
    assert_eq!(t.labels_of(EC), pair("half-closed"));
}
