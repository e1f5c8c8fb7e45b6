//! The Encedo HEM-compatible endpoints against real SoftHSM tokens: the seed's update
//! request verbatim over HTTPS, listing and reading with the appliance's shapes (public keys
//! checked against pkcs11-tool's export), every status code of the seed, and the audit
//! entry of each outcome.

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::fixture::{
    access, pair, token_with, Key, Principal, DUP, DUP_KEYS, ED, ED_KEY, LOCKED, LOCKED_KEY,
    MINTING_SCOPES, RSA, RSA_KEY,
};
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

/// This file's own kids: 16-byte ids, where the shared fixture's are 2 bytes long.
const AES: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const EC: &str = "ec01ec01ec01ec01ec01ec01ec01ec01";

fn token() -> Token {
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

fn start(t: &Token) -> Daemon {
    let operator = Principal::me("operator")
        .scopes(&MINTING_SCOPES)
        .roles(&["ops"]);
    Daemon::start(
        t,
        &Setup::with_access(access(&["ops"], &[operator])).https(),
    )
}

/// The seed's request: POST /api/keymgmt/update with the two headers it names.
fn seed_update(d: &Daemon, token: &str, body: &Value) -> Response {
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
fn results(d: &Daemon) -> Vec<Value> {
    d.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["HSMKEYD_EVENT"].is_string())
        .collect()
}

fn entry_of(d: &Daemon, request_id: &str) -> Value {
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

#[test]
fn the_seed_request_works_verbatim_over_https() {
    let t = token();
    let d = start(&t);
    let tok = d.mint(&["keymgmt:upd"], 600);

    let descr = "Payments signing key, rotated 2026-11";
    let r = seed_update(
        &d,
        &tok,
        &json!({"kid": EC, "label": "payments-2026", "descr": STANDARD.encode(descr)}),
    );
    let body = r.ok();
    let audit_id = body["audit_id"].as_str().expect("audit_id in the body");
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "{{}} plus audit_id: {body}"
    );
    assert_eq!(r.header("x-request-id"), Some(audit_id));

    // Read back independently: both objects carry the new label.
    assert_eq!(t.labels_of(EC), pair("payments-2026"));
    // The description is the decoded text, the same one /v1 shows.
    let key = d.client().get(&format!("/v1/keys/{EC}")).ok();
    assert_eq!(key["description"], descr);

    let e = entry_of(&d, audit_id);
    assert_eq!(e["HSMKEYD_EVENT"], "KEY_ATTRIBUTES_CHANGED");
    assert_eq!(e["HSMKEYD_RESULT"], "OK");
    assert_eq!(e["HSMKEYD_STATUS"], "200");
    assert_eq!(e["HSMKEYD_KID"], EC);
    let changes: Value = serde_json::from_str(e["HSMKEYD_CHANGES"].as_str().unwrap()).unwrap();
    assert_eq!(
        changes["label"],
        json!({"before": "ec-key", "after": "payments-2026"})
    );
    assert_eq!(
        changes["description"],
        json!({"before": null, "after": descr})
    );

    // Leaving descr out clears the description, as the appliance rewrites the record.
    let r = seed_update(&d, &tok, &json!({"kid": EC, "label": "payments-2026"}));
    r.ok();
    let key = d.client().get(&format!("/v1/keys/{EC}")).ok();
    assert_eq!(key["description"], Value::Null);
    assert_eq!(key["label"], "payments-2026");
}

#[test]
fn list_and_get_have_the_appliance_shapes() {
    let t = token();
    let d = start(&t);
    let tok = d.mint(&["keymgmt:list", "keymgmt:get", "keymgmt:upd"], 600);
    let h = d.https();
    seed_update(
        &d,
        &tok,
        &json!({"kid": AES, "label": "wrap-key", "descr": STANDARD.encode("wraps é")}),
    )
    .ok();

    let all = h.get("/api/keymgmt/list/0/100", &tok).ok();
    assert_eq!(all["total"], 6);
    assert_eq!(all["listed"], 6);
    let list = all["list"].as_array().unwrap();
    assert_eq!(
        common::kids(&all["list"]),
        vec![LOCKED, RSA, AES, DUP, EC, ED],
        "ordered by kid"
    );
    let by_kid = |kid: &str| list.iter().find(|k| k["kid"] == kid).unwrap().clone();
    let aes = by_kid(AES);
    assert_eq!(aes["label"], "wrap-key");
    assert_eq!(aes["type"], "AES256");
    assert_eq!(aes["descr"], STANDARD.encode("wraps é"));
    let updated = aes["updated"].as_i64().expect("updated: unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - 120..=now + 5).contains(&updated),
        "{updated} vs {now}"
    );
    let ec = by_kid(EC);
    assert_eq!(
        ec,
        json!({"kid": EC, "label": "ec-key", "type": "PKEY,ExDSA,SECP256R1", "updated": 0}),
        "never updated: updated 0, no descr, never null"
    );
    assert_eq!(by_kid(ED)["type"], "PKEY,ExDSA,ED25519");
    assert_eq!(by_kid(RSA)["type"], "PKEY,RSA2048");
    for k in list {
        for (name, v) in k.as_object().unwrap() {
            assert!(!v.is_null(), "{name} is null in {k}");
        }
    }

    // offset/limit page through the same order.
    let page = h.get("/api/keymgmt/list/1/2", &tok).ok();
    assert_eq!(
        (page["total"].as_u64(), page["listed"].as_u64()),
        (Some(6), Some(2))
    );
    assert_eq!(common::kids(&page["list"]), vec![RSA, AES]);
    let past = h.get("/api/keymgmt/list/6/10", &tok).ok();
    assert_eq!(
        (
            past["listed"].as_u64(),
            past["list"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
    h.get("/api/keymgmt/list/0/0", &tok)
        .assert_error(400, "invalid_limit");
    h.get("/api/keymgmt/list/0/1001", &tok)
        .assert_error(400, "invalid_limit");
    h.get("/api/keymgmt/list/-1/10", &tok)
        .assert_error(400, "invalid_offset");

    // get: type, updated, and the public key, which must be the one pkcs11-tool exports.
    let g = h.get(&format!("/api/keymgmt/get/{EC}"), &tok).ok();
    assert_eq!(g["type"], "PKEY,ExDSA,SECP256R1");
    assert_eq!(g["updated"], 0);
    let point = STANDARD.decode(g["pubkey"].as_str().unwrap()).unwrap();
    assert_eq!(
        (point.len(), point[0]),
        (65, 0x04),
        "uncompressed P-256 point"
    );
    let spki = t.public_key_der(EC);
    assert!(spki.ends_with(&point), "the point ends pkcs11-tool's SPKI");

    let g = h.get(&format!("/api/keymgmt/get/{ED}"), &tok).ok();
    assert_eq!(g["type"], "PKEY,ExDSA,ED25519");
    let raw = STANDARD.decode(g["pubkey"].as_str().unwrap()).unwrap();
    assert_eq!(raw.len(), 32);
    let ed_der = t.public_key_der(ED);
    assert!(
        ed_der.ends_with(&raw),
        "{} vs {}",
        hex::encode(&ed_der),
        hex::encode(&raw)
    );

    let g = h.get(&format!("/api/keymgmt/get/{RSA}"), &tok).ok();
    assert_eq!(g["type"], "PKEY,RSA2048");
    let pkcs1 = STANDARD.decode(g["pubkey"].as_str().unwrap()).unwrap();
    assert_eq!(pkcs1[0], 0x30, "DER SEQUENCE");
    assert!(
        t.public_key_der(RSA).ends_with(&pkcs1),
        "PKCS#1 RSAPublicKey is the BIT STRING of the SPKI"
    );

    let g = h.get(&format!("/api/keymgmt/get/{AES}"), &tok).ok();
    assert_eq!(g["type"], "AES256");
    assert_eq!(g["updated"], json!(updated));
    assert!(
        g.get("pubkey").is_none(),
        "no public key for a secret key: {g}"
    );

    h.get("/api/keymgmt/get/0bad", &tok)
        .assert_error(406, "key_not_found");
    h.get("/api/keymgmt/get/xyz", &tok)
        .assert_error(400, "invalid_kid");

    // The same endpoints answer on the Unix socket, to principals.
    let c = d.client();
    assert_eq!(c.get("/api/keymgmt/list/0/100").ok()["total"], 6);
    assert_eq!(
        c.get(&format!("/api/keymgmt/get/{ED}")).ok()["pubkey"],
        STANDARD.encode(&raw)
    );
    let r = c.send(
        "POST",
        "/api/keymgmt/update",
        &[("Content-Type", "application/json")],
        json!({"kid": ED, "label": "from-unix"})
            .to_string()
            .as_bytes(),
    );
    r.ok();
    assert_eq!(t.labels_of(ED), pair("from-unix"));
}

/// Every scope the Encedo endpoints know, for the operator of [`start_all`].
const ENCEDO_SCOPES: [&str; 7] = [
    "keymgmt:list",
    "keymgmt:search",
    "keymgmt:get",
    "keymgmt:upd",
    "keymgmt:gen",
    "keymgmt:del",
    "auth:token",
];

/// A daemon on HTTPS whose operator (the test's uid) holds [`ENCEDO_SCOPES`].
fn start_all(t: &Token) -> Daemon {
    let operator = Principal::me("operator").scopes(&ENCEDO_SCOPES);
    Daemon::start(t, &Setup::with_access(access(&[], &[operator])).https())
}

#[test]
fn list_without_a_limit_pages_by_15_and_type_flags_follow_the_token() {
    let t = Token::new();
    let _ = t.devtoken(&[
        "bulk",
        "--count",
        "20",
        "--id-prefix",
        "b0",
        "--label-prefix",
        "bulk-",
    ]);
    let d = start_all(&t);
    // An EC key that may derive, made through /v1: its private key carries CKA_DERIVE.
    let made = d.client().send(
        "POST",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        json!({"type": "ec", "label": "dh-key", "usage": {"derive": true}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
    let dh = made.json()["key"]["kid"].as_str().unwrap().to_string();
    let text = t.objects_text();
    assert!(
        text.contains("label:      dh-key") && text.contains("derive"),
        "pkcs11-tool shows the derive flag: {text}"
    );

    let tok = d.mint(&["keymgmt:list"], 600);
    let h = d.https();
    let first = h.get("/api/keymgmt/list/0", &tok).ok();
    assert_eq!(
        (first["total"].as_u64(), first["listed"].as_u64()),
        (Some(21), Some(15))
    );
    let rest = h.get("/api/keymgmt/list/15", &tok).ok();
    assert_eq!(rest["listed"], 6);
    let mut seen: Vec<Value> = first["list"].as_array().unwrap().clone();
    seen.extend(rest["list"].as_array().unwrap().iter().cloned());
    let explicit = h.get("/api/keymgmt/list/0/100", &tok).ok();
    assert_eq!(
        &Value::Array(seen.clone()),
        &explicit["list"],
        "the same keys, page by page"
    );
    let entry = seen.iter().find(|k| k["kid"] == dh.as_str()).unwrap();
    assert_eq!(entry["type"], "PKEY,ECDH,ExDSA,SECP256R1");
    let created = entry["updated"].as_i64().expect("a create sets updated");
    assert!(created > 1_700_000_000, "{entry}");
    let bulk = seen.iter().find(|k| k["label"] == "bulk-0").unwrap();
    assert_eq!(bulk["type"], "AES256");
    assert_eq!(bulk["updated"], 0);
    assert!(bulk.get("descr").is_none(), "{bulk}");
    h.get("/api/keymgmt/list/x", &tok)
        .assert_error(400, "invalid_offset");
    let none = d.mint(&["keymgmt:get"], 600);
    h.get("/api/keymgmt/list/0", &none)
        .assert_error(403, "missing_scope");
}

#[test]
fn a_use_scope_reads_that_one_key_through_get_and_nothing_else() {
    let t = token();
    let d = start(&t);
    let h = d.https();
    let get = d.mint(&["keymgmt:get"], 600);
    let want = h.get(&format!("/api/keymgmt/get/{EC}"), &get).ok();
    let one = d.mint(&[&format!("keymgmt:use:{EC}")], 600);
    assert_eq!(h.get(&format!("/api/keymgmt/get/{EC}"), &one).ok(), want);
    let refused = h
        .get(&format!("/api/keymgmt/get/{AES}"), &one)
        .assert_error(403, "missing_scope");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains(&format!("keymgmt:use:{AES}")),
        "{refused}"
    );
    h.get("/api/keymgmt/list/0", &one)
        .assert_error(403, "missing_scope");
    h.get(&format!("/v1/keys/{EC}"), &one)
        .assert_error(403, "missing_scope");
    let refusals = results(&d)
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "FAILED_SCOPE_CHECK")
        .filter(|e| e["HSMKEYD_REQUEST"] == format!("GET /api/keymgmt/get/{AES}"))
        .count();
    assert_eq!(refusals, 1);

    // A principal configured with the scope alone: the same on the Unix socket, and it
    // may mint the scope it holds, not one for another key.
    let t = token();
    let user = Principal::me("one-key").scopes(&[&format!("keymgmt:use:{EC}"), "auth:token"]);
    let d = Daemon::start(&t, &Setup::with_access(access(&[], &[user])).https());
    let c = d.client();
    assert_eq!(
        c.get(&format!("/api/keymgmt/get/{EC}")).ok()["type"],
        want["type"]
    );
    c.get(&format!("/api/keymgmt/get/{AES}"))
        .assert_error(403, "missing_scope");
    let mint = |scope: String| {
        c.send(
            "POST",
            "/v1/auth/token",
            &[("Content-Type", "application/json")],
            json!({"scopes": [scope], "ttl_s": 60})
                .to_string()
                .as_bytes(),
        )
    };
    assert_eq!(mint(format!("keymgmt:use:{EC}")).status, 200);
    mint(format!("keymgmt:use:{AES}")).assert_error(403, "missing_scope");
}

#[test]
fn version_and_status_answer_without_a_token() {
    let t = token();
    let d = start(&t);
    let h = d.https();
    let anon = |path: &str| h.send("GET", path, &[], b"");
    let v = anon("/api/system/version").ok();
    assert_eq!(
        v,
        json!({
            "hwv": "hsmkeyd-pkcs11",
            "blv": "hsmkeyd",
            "fwv": env!("CARGO_PKG_VERSION"),
            "fws": format!("hsmkeyd {}", env!("CARGO_PKG_VERSION")),
        })
    );
    let s = anon("/api/system/status").ok();
    assert_eq!(s["fls_state"], 0);
    let ts = time::OffsetDateTime::parse(
        s["ts"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|e| panic!("ts is ISO 8601: {s}: {e}"));
    let skew = (time::OffsetDateTime::now_utc() - ts).whole_seconds().abs();
    assert!(skew <= 5, "{s}");
    let up = s["uptime"].as_u64().expect("uptime in seconds");
    assert!(up < 120, "{s}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = anon("/api/system/status").ok();
    assert!(later["uptime"].as_u64().unwrap() > up, "{later} after {s}");
    assert_eq!(s.as_object().unwrap().len(), 3, "{s}");

    // Only those two: the key endpoints, a near miss and another method still need a token.
    anon("/api/keymgmt/list/0").assert_error(401, "unauthenticated");
    anon("/api/system/version/").assert_error(401, "unauthenticated");
    h.send("POST", "/api/system/status", &[], b"")
        .assert_error(401, "unauthenticated");
    // On the Unix socket too.
    assert_eq!(d.client().get("/api/system/version").ok(), v);
}

/// A request with a bearer token and a JSON body.
fn send_json(d: &Daemon, method: &str, path: &str, token: &str, body: &Value) -> Response {
    d.https().send(
        method,
        path,
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// The lines of pkcs11-tool's object whose first line is `header` and label is `label`.
fn object_block(text: &str, header: &str, label: &str) -> Option<String> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        match blocks.last_mut() {
            Some(b) if line.starts_with(' ') => b.push(line),
            _ => blocks.push(vec![line]),
        }
    }
    let want = format!("label:      {label}");
    blocks
        .into_iter()
        .find(|b| b[0].trim_end() == header && b.iter().any(|l| l.trim() == want))
        .map(|b| b.join("\n"))
}

/// pkcs11-tool's (class, label) of the objects with this id, sorted.
fn objects_of(t: &Token, kid: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = t
        .objects()
        .into_iter()
        .filter(|o| o.id == kid)
        .map(|o| (o.class, o.label))
        .collect();
    v.sort();
    v
}

#[test]
fn create_makes_every_appliance_type_and_delete_removes_it_read_back_by_pkcs11_tool() {
    let t = token();
    let d = start_all(&t);
    let gen = d.mint(&["keymgmt:gen"], 600);
    let list = d.mint(&["keymgmt:list"], 600);
    let created = |ty: &str, label: &str, extra: Value| {
        let mut body = json!({"label": label, "type": ty});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = send_json(&d, "POST", "/api/keymgmt/create", &gen, &body);
        let got = r.ok();
        let kid = got["kid"].as_str().expect("kid").to_string();
        assert_eq!(kid.len(), 32, "{got}");
        assert!(kid.bytes().all(|b| b.is_ascii_hexdigit()), "{got}");
        assert_eq!(got.as_object().unwrap().len(), 2, "kid and audit_id: {got}");
        (kid, got["audit_id"].as_str().unwrap().to_string())
    };
    let mut made = Vec::new();
    for (ty, listed, is_pair) in [
        ("AES128", "AES128", false),
        ("AES192", "AES192", false),
        ("AES256", "AES256", false),
        ("SECP256R1", "PKEY,ECDH,ExDSA,SECP256R1", true),
        ("SECP384R1", "PKEY,ECDH,ExDSA,SECP384R1", true),
        ("SECP521R1", "PKEY,ECDH,ExDSA,SECP521R1", true),
        ("ED25519", "PKEY,ExDSA,ED25519", true),
        ("SHA2-256", "SHA2-256", false),
        ("SHA2-384", "SHA2-384", false),
        ("SHA2-512", "SHA2-512", false),
    ] {
        let label = format!("new-{}", ty.to_ascii_lowercase());
        let (kid, audit_id) = created(ty, &label, json!({}));
        let want = if is_pair {
            pair(&label)
        } else {
            vec![("Secret".to_string(), label.clone())]
        };
        assert_eq!(objects_of(&t, &kid), want, "{ty}: pkcs11-tool sees the key");
        let e = entry_of(&d, &audit_id);
        assert_eq!(
            (&e["HSMKEYD_EVENT"], &e["HSMKEYD_RESULT"], &e["HSMKEYD_KID"]),
            (&json!("KEY_CREATED"), &json!("OK"), &json!(kid)),
            "{e}"
        );
        assert_eq!(e["HSMKEYD_STATUS"], "200", "the status the client got: {e}");
        made.push((kid, listed));
    }
    let all = d.https().get("/api/keymgmt/list/0/100", &list).ok();
    for (kid, listed) in &made {
        let e = all["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("{kid} listed: {all}"));
        assert_eq!(&e["type"], listed, "{e}");
        assert!(e["updated"].as_i64().unwrap() > 1_700_000_000, "{e}");
    }
    // Kinds, sizes and usage, as pkcs11-tool shows them.
    let text = t.objects_text();
    for (label, header, usage) in [
        (
            "new-aes128",
            "Secret Key Object; AES length 16",
            "encrypt, decrypt, wrap, unwrap",
        ),
        (
            "new-aes192",
            "Secret Key Object; AES length 24",
            "encrypt, decrypt, wrap, unwrap",
        ),
        (
            "new-aes256",
            "Secret Key Object; AES length 32",
            "encrypt, decrypt, wrap, unwrap",
        ),
        (
            "new-sha2-256",
            "Secret Key Object; Generic secret length 32",
            "",
        ),
        (
            "new-sha2-384",
            "Secret Key Object; Generic secret length 48",
            "",
        ),
        (
            "new-sha2-512",
            "Secret Key Object; Generic secret length 64",
            "",
        ),
        ("new-secp256r1", "Private Key Object; EC", "sign, derive"),
        ("new-secp521r1", "Private Key Object; EC", "sign, derive"),
        ("new-ed25519", "Private Key Object; EC_EDWARDS", "sign"),
    ] {
        let block = object_block(&text, header, label)
            .unwrap_or_else(|| panic!("{label}: no {header:?} object: {text}"));
        assert!(
            block.contains(&format!("Usage:      {usage}")),
            "{label}: {block}"
        );
    }

    // A description, read back through /v1 and the listing.
    let (kid, _) = created(
        "AES256",
        "described",
        json!({"descr": STANDARD.encode("für Zahlungen")}),
    );
    let v1 = d.client().get(&format!("/v1/keys/{kid}")).ok();
    assert_eq!(v1["description"], "für Zahlungen");

    // Refusals change nothing in the token.
    let before = t.objects().len();
    for (body, status, code) in [
        (
            json!({"label": "x", "type": "CURVE25519"}),
            400,
            "unsupported_type",
        ),
        (json!({"label": "x", "type": "DES3"}), 400, "invalid_type"),
        (
            json!({"label": "x", "type": "RSA2048"}),
            400,
            "invalid_type",
        ),
        (json!({"label": "x"}), 400, "missing_type"),
        (json!({"type": "AES256"}), 400, "missing_label"),
        (
            json!({"label": "a".repeat(33), "type": "AES256"}),
            400,
            "invalid_label",
        ),
        (
            json!({"label": "x", "type": "AES256", "descr": "!!"}),
            400,
            "invalid_descr",
        ),
        (
            json!({"label": "x", "type": "SECP256R1", "mode": "ECDH"}),
            400,
            "unsupported_mode",
        ),
        (
            json!({"label": "x", "type": "AES256", "kid": "0a"}),
            400,
            "unknown_field",
        ),
    ] {
        let r = send_json(&d, "POST", "/api/keymgmt/create", &gen, &body);
        let got = r.assert_error(status, code);
        let e = entry_of(&d, got["audit_id"].as_str().unwrap());
        assert_eq!(
            (&e["HSMKEYD_EVENT"], &e["HSMKEYD_RESULT"]),
            (&json!("KEY_CREATED"), &json!("ERROR")),
            "{body}: {e}"
        );
    }
    let curve = send_json(
        &d,
        "POST",
        "/api/keymgmt/create",
        &gen,
        &json!({"label": "x", "type": "CURVE25519"}),
    );
    assert!(curve.json()["message"]
        .as_str()
        .unwrap()
        .contains("cannot be generated"));
    send_json(
        &d,
        "POST",
        "/api/keymgmt/create",
        &list,
        &json!({"label": "x", "type": "AES256"}),
    )
    .assert_error(403, "missing_scope");
    assert_eq!(t.objects().len(), before, "no object made by a refusal");

    // Delete: the key and its records are gone from the token.
    let del = d.mint(&["keymgmt:del"], 600);
    let ec = made[3].0.clone();
    let path = format!("/api/keymgmt/delete/{ec}");
    send_json(&d, "DELETE", &path, &list, &json!({})).assert_error(403, "missing_scope");
    let stale = d.https().send(
        "DELETE",
        &path,
        &[
            ("Authorization", &format!("Bearer {del}")),
            ("If-Match", "\"nope\""),
        ],
        b"",
    );
    stale.assert_error(412, "precondition_failed");
    assert_eq!(
        objects_of(&t, &ec).len(),
        2,
        "a refused delete leaves the key"
    );
    let r = d.https().send(
        "DELETE",
        &path,
        &[("Authorization", &format!("Bearer {del}"))],
        b"",
    );
    let got = r.ok();
    assert_eq!(
        got.as_object().unwrap().len(),
        1,
        "{{}} plus audit_id: {got}"
    );
    let e = entry_of(&d, got["audit_id"].as_str().unwrap());
    assert_eq!(
        (&e["HSMKEYD_EVENT"], &e["HSMKEYD_RESULT"], &e["HSMKEYD_KID"]),
        (&json!("KEY_DELETED"), &json!("OK"), &json!(ec)),
    );
    assert_eq!(e["HSMKEYD_STATUS"], "200", "{e}");
    assert!(
        objects_of(&t, &ec).is_empty(),
        "pkcs11-tool finds nothing of {ec}"
    );
    assert!(
        t.objects().iter().all(|o| !o.label.contains(&ec)),
        "no metadata record of {ec} is left"
    );
    d.https()
        .send(
            "DELETE",
            &path,
            &[("Authorization", &format!("Bearer {del}"))],
            b"",
        )
        .assert_error(406, "key_not_found");
    d.https()
        .send(
            "DELETE",
            "/api/keymgmt/delete/xyz",
            &[("Authorization", &format!("Bearer {del}"))],
            b"",
        )
        .assert_error(400, "invalid_kid");
}

#[test]
fn search_finds_keys_by_description_and_answers_404_for_none() {
    let t = token();
    let d = start_all(&t);
    let gen = d.mint(&["keymgmt:gen"], 600);
    let mut kids = std::collections::BTreeMap::new();
    for (label, descr) in [
        ("pay-1", "payments 2026"),
        ("pay-2", "payments 2027"),
        ("old", "old payments"),
        ("other", "wrapping"),
    ] {
        let body = json!({"label": label, "type": "AES256", "descr": STANDARD.encode(descr)});
        let got = send_json(&d, "POST", "/api/keymgmt/create", &gen, &body).ok();
        let _ = kids.insert(label, got["kid"].as_str().unwrap().to_string());
    }
    // The descriptions are in the token, where pkcs11-tool reads them.
    let data: Vec<String> = t.objects().into_iter().map(|o| o.label).collect();
    assert!(data.iter().any(|l| l.contains("payments 2026")), "{data:?}");

    let tok = d.mint(&["keymgmt:search"], 600);
    let search = |tok: &str, body: Value| send_json(&d, "POST", "/api/keymgmt/search", tok, &body);
    let sorted = |labels: &[&str]| {
        let mut v: Vec<String> = labels.iter().map(|l| kids[l].clone()).collect();
        v.sort();
        v
    };
    let kids_of = |r: &Value| -> Vec<String> {
        common::kids(&r["list"])
            .into_iter()
            .map(String::from)
            .collect()
    };

    let starts = search(
        &tok,
        json!({"descr": format!("^{}", STANDARD.encode("payments"))}),
    )
    .ok();
    assert_eq!(kids_of(&starts), sorted(&["pay-1", "pay-2"]));
    assert_eq!(
        (&starts["total"], &starts["listed"], &starts["offset"]),
        (&json!(2), &json!(2), &json!(0))
    );
    let contains = search(&tok, json!({"descr": STANDARD.encode("payments")})).ok();
    assert_eq!(kids_of(&contains), sorted(&["pay-1", "pay-2", "old"]));
    // Entries are the listing's.
    let list = d
        .https()
        .get("/api/keymgmt/list/0/100", &d.mint(&["keymgmt:list"], 600))
        .ok();
    for e in contains["list"].as_array().unwrap() {
        assert!(list["list"].as_array().unwrap().contains(e), "{e}");
    }
    let page = search(
        &tok,
        json!({"descr": STANDARD.encode("payments"), "offset": 1, "limit": 1}),
    )
    .ok();
    assert_eq!(
        (&page["total"], &page["listed"], &page["offset"]),
        (&json!(3), &json!(1), &json!(1))
    );
    assert_eq!(
        kids_of(&page),
        vec![sorted(&["pay-1", "pay-2", "old"])[1].clone()]
    );

    search(
        &tok,
        json!({"descr": format!("^{}", STANDARD.encode("old payments!"))}),
    )
    .assert_error(404, "no_key_matches");
    search(
        &tok,
        json!({"descr": format!("^{}", STANDARD.encode("2026"))}),
    )
    .assert_error(404, "no_key_matches");
    search(&tok, json!({"descr": "not base64"})).assert_error(400, "invalid_descr");
    search(&tok, json!({"label": "pay-1"})).assert_error(400, "unknown_field");

    // As every Encedo body: a Content-Length is required (411 for a chunked body).
    for (path, body) in [
        (
            "/api/keymgmt/search",
            json!({"descr": STANDARD.encode("wrap")}),
        ),
        (
            "/api/keymgmt/create",
            json!({"label": "chunked", "type": "AES256"}),
        ),
    ] {
        let body = body.to_string();
        let tok = if path.ends_with("create") { &gen } else { &tok };
        let chunked = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Authorization: Bearer {tok}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        d.https()
            .raw(chunked.as_bytes())
            .assert_error(411, "length_required");
    }
    assert!(t.objects().iter().all(|o| o.label != "chunked"));

    // keymgmt:list may search too; keymgmt:get may not, and the refusal is audited.
    let by_list = d.mint(&["keymgmt:list"], 600);
    assert_eq!(
        search(&by_list, json!({"descr": STANDARD.encode("wrap")})).ok()["total"],
        1
    );
    let get = d.mint(&["keymgmt:get"], 600);
    let refused = search(&get, json!({"descr": STANDARD.encode("wrap")}));
    let _ = refused.assert_error(403, "missing_scope");
    let e = entry_of(&d, refused.header("x-request-id").unwrap());
    assert_eq!(e["HSMKEYD_EVENT"], "FAILED_SCOPE_CHECK");
    assert_eq!(e["HSMKEYD_REQUEST"], "POST /api/keymgmt/search");
}

#[test]
fn update_answers_every_status_of_the_seed_and_changes_nothing_on_refusal() {
    let t = token();
    let d = start(&t);
    let h = d.https();
    let upd = d.mint(&["keymgmt:upd"], 600);
    let before = t.objects();

    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"kid": AES}), 400, "missing_label"),
        (json!({"label": "x"}), 400, "missing_kid"),
        (
            json!({"kid": AES, "label": "x", "descr": "not base64!"}),
            400,
            "invalid_descr",
        ),
        (
            json!({"kid": AES, "label": "x", "descr": "//79"}),
            400,
            "invalid_descr",
        ),
        (
            json!({"kid": AES, "label": "x", "descr": STANDARD.encode("d".repeat(251))}),
            400,
            "invalid_descr",
        ),
        (
            json!({"kid": AES, "label": "a".repeat(33)}),
            400,
            "invalid_label",
        ),
        (json!({"kid": AES, "label": "naïve"}), 400, "invalid_label"),
        (json!({"kid": AES, "label": ""}), 400, "invalid_label"),
        (
            json!({"kid": AES, "label": "x", "roles": ["ops"]}),
            400,
            "unknown_field",
        ),
        (json!({"kid": "xyz", "label": "x"}), 400, "invalid_kid"),
        (json!({"kid": "0bad", "label": "x"}), 406, "key_not_found"),
        (
            json!({"kid": LOCKED, "label": "x"}),
            406,
            "key_not_modifiable",
        ),
        (
            json!({"kid": DUP, "label": "x"}),
            409,
            "inconsistent_key_state",
        ),
    ];
    let mut ids = Vec::new();
    for (body, status, code) in &cases {
        let r = seed_update(&d, &upd, body);
        let got = r.assert_error(*status, code);
        assert!(got["audit_id"].is_string(), "{body}: {got}");
        ids.push((got["audit_id"].as_str().unwrap().to_string(), *status));
    }
    // Exactly 32 printable characters is fine, the label limit of the appliance.
    let ok = seed_update(&d, &upd, &json!({"kid": AES, "label": "~".repeat(32)})).ok();
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "~".repeat(32))]
    );
    seed_update(&d, &upd, &json!({"kid": AES, "label": "aes-key"})).ok();

    // Body and header rules: 415, 411, 413, malformed JSON.
    let auth = format!("Bearer {upd}");
    let body = json!({"kid": AES, "label": "x"}).to_string();
    h.send(
        "POST",
        "/api/keymgmt/update",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        body.as_bytes(),
    )
    .assert_error(415, "unsupported_media_type");
    let chunked = format!(
        "POST /api/keymgmt/update HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: {auth}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    h.raw(chunked.as_bytes())
        .assert_error(411, "length_required");
    let pad = 7301
        - json!({"kid": AES, "label": "x", "descr": ""})
            .to_string()
            .len();
    let big = json!({"kid": AES, "label": "x", "descr": "A".repeat(pad)}).to_string();
    assert_eq!(big.len(), 7301);
    h.send(
        "POST",
        "/api/keymgmt/update",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        big.as_bytes(),
    )
    .assert_error(413, "body_too_large");
    h.send(
        "POST",
        "/api/keymgmt/update",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        b"{\"kid\":",
    )
    .assert_error(400, "invalid_json");

    // Scopes: none, another verb, another key's upd scope; and no token at all.
    for scopes in [
        &["keymgmt:list", "keymgmt:get"][..],
        &["keymgmt:upd:ec01ec01ec01ec01ec01ec01ec01ec01"],
    ] {
        let tok = d.mint(scopes, 600);
        let r = seed_update(&d, &tok, &json!({"kid": AES, "label": "x"}));
        r.assert_error(403, "missing_scope");
    }
    let one = d.mint(&[&format!("keymgmt:upd:{AES}")], 600);
    seed_update(&d, &one, &json!({"kid": AES, "label": "aes-key"})).ok();
    let r = h.send(
        "POST",
        "/api/keymgmt/update",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    r.assert_error(401, "unauthenticated");
    assert!(r.header("www-authenticate").is_some());
    seed_update(&d, "not.a.token", &json!({"kid": AES, "label": "x"}))
        .assert_error(401, "invalid_token");

    // Nothing any refusal touched changed in the token (labels read by pkcs11-tool; the two
    // successful renames above put the AES label back).
    let after = t.objects();
    let labels = |v: &[common::P11Object]| {
        let mut l: Vec<(String, String, String)> = v
            .iter()
            .filter(|o| o.class != "Data")
            .map(|o| (o.class.clone(), o.id.clone(), o.label.clone()))
            .collect();
        l.sort();
        l
    };
    assert_eq!(labels(&before), labels(&after));

    // Each refusal has its result entry, named as the appliance names it.
    for (id, status) in ids {
        let e = entry_of(&d, &id);
        assert_eq!(e["HSMKEYD_EVENT"], "KEY_ATTRIBUTES_CHANGED");
        assert_eq!(e["HSMKEYD_STATUS"], status.to_string());
        let want = if status == 400 { "ERROR" } else { "FAILED" };
        assert_eq!(e["HSMKEYD_RESULT"], want, "{e}");
    }
    let ok_entry = entry_of(&d, ok["audit_id"].as_str().unwrap());
    assert_eq!(ok_entry["HSMKEYD_RESULT"], "OK");
    let scope_refusals = results(&d)
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "FAILED_SCOPE_CHECK")
        .filter(|e| e["HSMKEYD_REQUEST"] == "POST /api/keymgmt/update")
        .count();
    assert_eq!(scope_refusals, 2);
}

#[test]
fn clear_text_to_the_encedo_endpoint_gets_418() {
    use std::io::{Read, Write};
    let t = token();
    let d = start(&t);
    let body = json!({"kid": AES, "label": "x"}).to_string();
    let req = format!(
        "POST /api/keymgmt/update HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer x\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(d.https().addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 418"), "{text}");
    assert!(text.contains("\"error\":\"tls_required\""), "{text}");
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "aes-key".to_string())]
    );
}
