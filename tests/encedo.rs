//! The Encedo HEM-compatible endpoints against real SoftHSM tokens: the seed's update
//! request verbatim over HTTPS, listing and reading with the appliance's shapes (public keys
//! checked against pkcs11-tool's export), every status code of the seed, and the audit
//! entry of each outcome.

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::encedo::*;
use common::fixture::{pair, DUP, ED, LOCKED, RSA};
use serde_json::{json, Value};

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
