//! Bearer-token verification on the TLS front door: a negative corpus of forged, broken
//! and misdirected tokens (each answered 401 with nothing changed), external issuers that
//! work, and near-miss scopes that grant nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::fixture::{access, token_with, Principal, AES, AES_KEY, MINTING_SCOPES};
use common::{Daemon, Setup, Token};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const IDP: &str = "https://idp.test";
const HMAC_IDP: &str = "https://hmac.test";
const HMAC_SECRET: &str = "a-shared-secret-of-reasonable-length-0123456789";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct World {
    t: Token,
    d: Daemon,
    /// The external ES256 issuer's signing key (PKCS#8 PEM).
    idp_key: String,
    /// Its public key as configured (SPKI PEM).
    idp_public: String,
    /// A key nobody trusts.
    attacker: String,
}

fn world() -> World {
    let t = token_with(&[AES_KEY]);
    let idp = rcgen::KeyPair::generate().unwrap();
    let attacker = rcgen::KeyPair::generate().unwrap();
    let key_file = t.path().join("idp.pem");
    std::fs::write(&key_file, idp.public_key_pem()).unwrap();
    let secret_file = t.path().join("hmac.secret");
    std::fs::write(&secret_file, format!("{HMAC_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let minter = Principal::me("minter").scopes(&MINTING_SCOPES);
    let setup = Setup {
        extra: format!(
            "[tokens]\nleeway_s = 30\n\n\
             [[issuers]]\niss = \"{IDP}\"\naud = \"hsmkeyd\"\nalgorithms = [\"ES256\"]\nkey_file = \"{}\"\n\n\
             [[issuers]]\niss = \"{HMAC_IDP}\"\naud = \"hsmkeyd\"\nalgorithms = [\"HS256\"]\nsecret_file = \"{}\"\n",
            key_file.display(),
            secret_file.display()
        ),
        ..Setup::with_access(access(&["ops"], &[minter])).https()
    };
    let d = Daemon::start(&t, &setup);
    World {
        t,
        d,
        idp_key: idp.serialize_pem(),
        idp_public: idp.public_key_pem(),
        attacker: attacker.serialize_pem(),
    }
}

fn claims(iss: &str, scope: &str) -> Value {
    json!({"iss": iss, "aud": "hsmkeyd", "sub": "app", "exp": now() + 300, "nbf": now() - 5,
           "iat": now(), "jti": "t-1", "scope": scope})
}

fn es256(pem: &str, header: Header, claims: &Value) -> String {
    encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A token with any header and payload and the given signature bytes.
fn raw(header: &Value, payload: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header),
        b64(payload),
        URL_SAFE_NO_PAD.encode(sig)
    )
}

fn es_header() -> Header {
    Header::new(Algorithm::ES256)
}

#[test]
fn forged_broken_and_misdirected_tokens_get_401_and_change_nothing() {
    let w = world();
    let h = w.d.https();
    let all = "keymgmt:list keymgmt:get keymgmt:upd";
    let good = es256(&w.idp_key, es_header(), &claims(IDP, all));
    // The control: the same construction, correctly signed, is accepted.
    assert_eq!(h.get("/v1/keys", &good).status, 200);

    let jwks = h.send("GET", "/v1/auth/jwks", &[], b"").json();
    let own_kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    let own_x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let own_y = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["y"].as_str().unwrap())
        .unwrap();
    let mut own_point = vec![4u8];
    own_point.extend(&own_x);
    own_point.extend(&own_y);
    let minted = w.d.mint(&["keymgmt:upd"], 300);

    let mut vectors: Vec<(&str, String)> = Vec::new();
    let payload = claims(IDP, all);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = raw(&json!({"alg": alg, "typ": "JWT"}), &payload, b"");
        vectors.push(("alg none", t.clone()));
        vectors.push((
            "alg none without signature part",
            t.trim_end_matches('.').to_string(),
        ));
    }
    let own = claims("hsmkeyd", all);
    vectors.push((
        "HS256 keyed with the own public point",
        hs256(&own_point, &own),
    ));
    vectors.push((
        "HS256 keyed with the JWK set",
        hs256(jwks.to_string().as_bytes(), &own),
    ));
    vectors.push((
        "HS256 keyed with the external issuer's public PEM",
        hs256(w.idp_public.as_bytes(), &payload),
    ));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(IDP, all);
        f(&mut c);
        es256(&w.idp_key, es_header(), &c)
    };
    vectors.push(("expired", with(&|c| c["exp"] = json!(now() - 120))));
    vectors.push((
        "nbf in the future",
        with(&|c| c["nbf"] = json!(now() + 300)),
    ));
    vectors.push((
        "exp as a string",
        with(&|c| c["exp"] = json!((now() + 300).to_string())),
    ));
    vectors.push((
        "exp as a far-future string",
        with(&|c| c["exp"] = json!("99999999999")),
    ));
    vectors.push((
        "missing exp",
        with(&|c| {
            let _ = c.as_object_mut().unwrap().remove("exp");
        }),
    ));
    vectors.push(("wrong aud", with(&|c| c["aud"] = json!("someone-else"))));
    vectors.push((
        "missing aud",
        with(&|c| {
            let _ = c.as_object_mut().unwrap().remove("aud");
        }),
    ));
    vectors.push((
        "missing iss",
        with(&|c| {
            let _ = c.as_object_mut().unwrap().remove("iss");
        }),
    ));
    vectors.push(("iss as a number", with(&|c| c["iss"] = json!(42))));
    vectors.push((
        "unconfigured issuer",
        es256(&w.idp_key, es_header(), &claims("https://evil.test", all)),
    ));
    vectors.push((
        "attacker key claiming the external issuer",
        es256(&w.attacker, es_header(), &payload),
    ));
    vectors.push((
        "attacker key claiming hsmkeyd",
        es256(&w.attacker, es_header(), &own),
    ));
    let mut h_kid = es_header();
    h_kid.kid = Some(own_kid.clone() + "00");
    vectors.push((
        "unknown kid for the own issuer",
        es256(&w.attacker, h_kid, &own),
    ));
    let mut h_jku = es_header();
    h_jku.jku = Some("https://evil.test/jwks.json".into());
    vectors.push(("jku header", es256(&w.attacker, h_jku.clone(), &payload)));
    vectors.push((
        "jku header, validly signed",
        es256(&w.idp_key, h_jku, &payload),
    ));
    let mut h_x5u = es_header();
    h_x5u.x5u = Some("https://evil.test/cert.pem".into());
    vectors.push(("x5u header", es256(&w.attacker, h_x5u, &payload)));
    let attacker_jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&own_x), "y": URL_SAFE_NO_PAD.encode(&own_y)
    }))
    .unwrap();
    let mut h_jwk = es_header();
    h_jwk.jwk = Some(attacker_jwk);
    vectors.push(("embedded jwk header", es256(&w.attacker, h_jwk, &own)));
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    tampered["sub"] = json!("admin");
    vectors.push((
        "tampered payload",
        format!("{}.{}.{}", parts[0], b64(&tampered), parts[2]),
    ));
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x01;
    vectors.push((
        "tampered signature",
        format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig)),
    ));
    vectors.push((
        "signature of zeros",
        format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            URL_SAFE_NO_PAD.encode([0u8; 64])
        ),
    ));
    vectors.push((
        "truncated: no signature",
        format!("{}.{}", parts[0], parts[1]),
    ));
    vectors.push(("truncated: header only", parts[0].to_string()));
    vectors.push((
        "truncated: half the signature",
        good[..good.len() - 40].to_string(),
    ));
    vectors.push((
        "64 KiB token",
        format!("{}.{}.{}", parts[0], "A".repeat(64 * 1024), parts[2]),
    ));
    vectors.push(("not base64", "!!!.@@@.###".to_string()));
    vectors.push(("garbage", "abc.def.ghi".to_string()));
    vectors.push(("header says RS256", {
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let mut h2 = header.clone();
        h2["alg"] = json!("RS256");
        format!("{}.{}.{}", b64(&h2), parts[1], parts[2])
    }));
    vectors.push(("own token with its alg changed to HS256", {
        let p: Vec<&str> = minted.split('.').collect();
        format!(
            "{}.{}.{}",
            b64(&json!({"alg": "HS256", "typ": "JWT"})),
            p[1],
            p[2]
        )
    }));
    vectors.push(("HMAC issuer with a wrong secret", {
        let c = claims(HMAC_IDP, all);
        hs256(b"not-the-secret", &c)
    }));
    vectors.push(("HMAC issuer expired", {
        let mut c = claims(HMAC_IDP, all);
        c["exp"] = json!(now() - 100);
        hs256(HMAC_SECRET.as_bytes(), &c)
    }));
    // Correctly signed, but naming a critical extension hsmkeyd does not implement
    // (RFC 7515 4.1.11). The same construction without `crit` is the control.
    let signed = |header: &Value| {
        let msg = format!("{}.{}", b64(header), b64(&claims(IDP, all)));
        let key = EncodingKey::from_ec_pem(w.idp_key.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::ES256).unwrap();
        format!("{msg}.{sig}")
    };
    let plain = signed(&json!({"alg": "ES256", "typ": "JWT"}));
    assert_eq!(h.get("/v1/keys", &plain).status, 200, "control");
    vectors.push((
        "crit header",
        signed(&json!({"alg": "ES256", "typ": "JWT", "crit": ["x-ext"], "x-ext": true})),
    ));
    assert!(vectors.len() >= 30, "{} vectors", vectors.len());

    for (i, (name, tok)) in vectors.iter().enumerate() {
        let r = h.patch(AES, tok, &json!({"label": format!("pwned-{i}")}));
        let body = r.assert_error_for(name, 401, "invalid_token");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer") && challenge.contains("error=\"invalid_token\""),
            "{name}: {challenge:?}"
        );
    }
    // Missing or non-bearer credentials: 401 with a bare challenge.
    for headers in [
        vec![],
        vec![("Authorization", "Basic YWRtaW46YWRtaW4=")],
        vec![("Authorization", "Bearer ")],
    ] {
        let r = h.send("GET", "/v1/keys", &headers, b"");
        let body = r.assert_error(401, "unauthenticated");
        assert!(body["message"].as_str().unwrap().contains("Bearer"));
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer") && !challenge.contains("error="),
            "{challenge:?}"
        );
    }

    // Nothing changed: the label in the token is the original, no metadata was written.
    assert_eq!(
        w.t.labels_of(AES),
        vec![("Secret".to_string(), "aes-key".to_string())]
    );
    assert!(!w
        .t
        .objects()
        .iter()
        .any(|o| o.class == "Data" && o.label.starts_with("hsmkeyd-meta")));
    // And the HMAC issuer works with the right secret, as does the ES256 one.
    let ok = hs256(HMAC_SECRET.as_bytes(), &claims(HMAC_IDP, "keymgmt:get"));
    assert_eq!(h.get(&format!("/v1/keys/{AES}"), &ok).status, 200);
    let r = h.patch(AES, &good, &json!({"label": "by-idp"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(w.t.labels_of(AES)[0].1, "by-idp");
}

#[test]
fn near_miss_scopes_grant_nothing() {
    let w = world();
    let h = w.d.https();
    for scope in [
        "keymgmt:updx",
        "keymgmt:up",
        "keymgmt:upd:b2b2",
        "keymgmt:upd:a1a",
        "KEYMGMT:UPD",
        "keymgmt:upd:",
        "keymgmt",
    ] {
        let tok = es256(
            &w.idp_key,
            es_header(),
            &claims(IDP, &format!("keymgmt:list {scope}")),
        );
        assert_eq!(
            h.get("/v1/keys", &tok).status,
            200,
            "{scope}: the token itself is valid"
        );
        let r = h.patch(AES, &tok, &json!({"label": "near-miss"}));
        r.assert_error(403, "missing_scope");
    }
    // Scopes in a list-valued claim or roles the config does not define add nothing.
    let mut c = claims(IDP, "keymgmt:list");
    c["roles"] = json!(["root", "admin"]);
    c["scopes"] = json!(["keymgmt:upd"]);
    let tok = es256(&w.idp_key, es_header(), &c);
    h.patch(AES, &tok, &json!({"label": "near-miss"}))
        .assert_error(403, "missing_scope");
    assert_eq!(w.t.labels_of(AES)[0].1, "aes-key");
}
