//! The key life cycle against real SoftHSM tokens, read back independently with
//! pkcs11-tool: every key type created, the public halves as PEM and JWK, deletion of
//! every object of a key, the refusals, and crashes (kill -9) during create and delete.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::fixture::{
    access, keys_access, token_with, Principal, AES, AES_KEY, EC, EC_KEY, LOCKED, LOCKED_KEY,
};
use common::{Daemon, Setup, Token};
use serde_json::{json, Value};

fn create(d: &Daemon, body: Value) -> common::Response {
    d.client().send(
        "POST",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn delete(d: &Daemon, kid: &str, headers: &[(&str, &str)]) -> common::Response {
    d.client()
        .send("DELETE", &format!("/v1/keys/{kid}"), headers, b"")
}

/// pkcs11-tool's text block of each object whose ID is `kid`.
fn blocks_of(t: &Token, kid: &str) -> Vec<String> {
    let text = t.objects_text();
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
        .into_iter()
        .filter(|b| b.lines().any(|l| l.trim() == format!("ID:         {kid}")))
        .collect()
}

#[test]
fn every_key_type_is_generated_in_the_token_sensitive_and_never_extractable() {
    let t = token_with(&[]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let cases = [
        (
            json!({"type": "aes", "bits": 128}),
            "Secret Key",
            "AES",
            "aes",
            "128",
        ),
        (
            json!({"type": "aes", "bits": 192}),
            "Secret Key",
            "AES",
            "aes",
            "192",
        ),
        (json!({"type": "aes"}), "Secret Key", "AES", "aes", "256"),
        (
            json!({"type": "generic-secret", "bits": 512}),
            "Secret Key",
            "Generic secret",
            "generic-secret",
            "512",
        ),
        (json!({"type": "ec"}), "Private Key", "EC", "ec", "P-256"),
        (
            json!({"type": "ec", "curve": "P-384"}),
            "Private Key",
            "EC",
            "ec",
            "P-384",
        ),
        (
            json!({"type": "ec", "curve": "P-521"}),
            "Private Key",
            "EC",
            "ec",
            "P-521",
        ),
        (
            json!({"type": "ed25519"}),
            "Private Key",
            "EC_EDWARDS",
            "ed25519",
            "",
        ),
        (
            json!({"type": "rsa", "bits": 2048}),
            "Private Key",
            "RSA",
            "rsa",
            "2048",
        ),
        (
            json!({"type": "rsa", "bits": 3072}),
            "Private Key",
            "RSA",
            "rsa",
            "3072",
        ),
    ];
    let mut kids = BTreeSet::new();
    for (i, (mut body, class, p11_type, api_type, size)) in cases.into_iter().enumerate() {
        let label = format!("made-{i}");
        body["label"] = json!(label);
        let r = create(&d, body.clone());
        assert_eq!(
            r.status,
            201,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let key = r.json()["key"].clone();
        let kid = key["kid"].as_str().unwrap().to_string();
        assert_eq!(kid.len(), 32, "a random kid is 16 bytes: {kid}");
        assert!(kids.insert(kid.clone()));
        assert_eq!(
            r.header("location"),
            Some(format!("/v1/keys/{kid}").as_str())
        );
        assert_eq!(key["type"], api_type, "{body}");
        assert_eq!(key["label"], label.as_str());
        assert_eq!(key["state"], "ok");
        assert_eq!(key["attributes"]["sensitive"], true);
        assert_eq!(key["attributes"]["extractable"], false);
        match (key["bits"].as_u64(), key["curve"].as_str()) {
            (Some(b), _) => assert_eq!(b.to_string(), size, "{body}"),
            (None, Some(c)) => assert_eq!(c, size, "{body}"),
            (None, None) => assert_eq!(size, "", "{body}"),
        }
        // Independently: pkcs11-tool sees the objects with the id, label, type and the
        // access flags hsmkeyd always sets.
        let blocks = blocks_of(&t, &kid);
        let key_blocks: Vec<&String> = blocks.iter().filter(|b| !b.starts_with("Data")).collect();
        let expected = if class == "Secret Key" { 1 } else { 2 };
        assert_eq!(key_blocks.len(), expected, "{kid}: {blocks:#?}");
        let main = key_blocks
            .iter()
            .find(|b| b.starts_with(class))
            .unwrap_or_else(|| panic!("no {class} object for {kid}: {blocks:#?}"));
        assert!(
            main.starts_with(&format!("{class} Object; {p11_type}")),
            "{main}"
        );
        // The usage flags hsmkeyd reports are the token's (on the private or secret key).
        let usage = main
            .lines()
            .find(|l| l.trim_start().starts_with("Usage:"))
            .unwrap_or("");
        // (pkcs11-tool does not print CKA_SIGN of secret keys.)
        let flags: &[&str] = if class == "Private Key" {
            &["sign", "decrypt"]
        } else {
            &["decrypt"]
        };
        for flag in flags {
            assert_eq!(
                key["attributes"][*flag],
                usage.contains(flag),
                "{flag} of {kid}: {main}"
            );
        }
        assert!(main.contains(&format!("label:      {label}")), "{main}");
        assert!(
            main.contains("sensitive") && main.contains("never extractable"),
            "{main}"
        );
        assert_eq!(
            d.client().get(&format!("/v1/keys/{kid}")).ok()["label"],
            label.as_str()
        );
    }
    // Listed, and still there after a restart.
    let listed = d.client().get("/v1/keys?limit=100").ok();
    assert_eq!(listed["total"], kids.len());
    drop(d);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    for kid in &kids {
        assert_eq!(
            d.client().get(&format!("/v1/keys/{kid}")).status,
            200,
            "{kid}"
        );
    }
}

#[test]
fn a_new_key_keeps_its_description_roles_usage_and_chosen_kid() {
    let t = token_with(&[]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let r = create(
        &d,
        json!({"type": "ec", "label": "signer", "kid": "c0ffee", "description": "for invoices",
               "roles": ["ops"], "usage": {"derive": true}}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["audit_id"].is_string());
    let key = d.client().get("/v1/keys/c0ffee").ok();
    assert_eq!(key["description"], "for invoices");
    assert_eq!(key["roles"], json!(["ops"]));
    assert_eq!(key["attributes"]["sign"], true);
    assert_eq!(key["attributes"]["derive"], true);
    assert_eq!(key["attributes"]["decrypt"], false);
    let private = blocks_of(&t, "c0ffee")
        .into_iter()
        .find(|b| b.starts_with("Private Key"))
        .unwrap();
    assert!(
        private.contains("sign") && private.contains("derive"),
        "{private}"
    );
    // The record is in the token: a restart reads the same description and roles.
    drop(d);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let again = d.client().get("/v1/keys/c0ffee").ok();
    assert_eq!(again["description"], "for invoices");
    assert_eq!(again["roles"], json!(["ops"]));
    // A taken kid is 409 and makes nothing.
    let before = t.objects().len();
    create(
        &d,
        json!({"type": "aes", "label": "again", "kid": "C0FFEE"}),
    )
    .assert_error(409, "kid_taken");
    assert_eq!(t.objects().len(), before);
    // `"kid": null` is a kid left out (schemathesis found it accepted, undocumented): a
    // random 16-byte kid, which the token holds.
    let r = create(&d, json!({"type": "aes", "label": "random", "kid": null}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let kid = r.json()["key"]["kid"].as_str().unwrap().to_string();
    assert_eq!(kid.len(), 32, "{kid}");
    assert_eq!(blocks_of(&t, &kid).len(), 1, "{}", t.objects_text());
    // So is `"usage": null` (schemathesis again): the type's defaults, as when left out.
    let r = create(
        &d,
        json!({"type": "ec", "label": "null-usage", "kid": "0bad", "usage": null}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let defaults = create(
        &d,
        json!({"type": "ec", "label": "no-usage", "kid": "0bae"}),
    );
    assert_eq!(
        defaults.status,
        201,
        "{}",
        String::from_utf8_lossy(&defaults.body)
    );
    let (null_usage, no_usage) = (r.json()["key"].clone(), defaults.json()["key"].clone());
    assert_eq!(
        null_usage["attributes"], no_usage["attributes"],
        "{null_usage}"
    );
    assert_eq!(null_usage["attributes"]["sign"], true, "{null_usage}");
}

#[test]
fn bad_creates_are_refused_and_make_nothing() {
    let t = token_with(&[AES_KEY]);
    let limited = access(
        &["ops", "payments"],
        &[Principal::me("limited")
            .scopes(&["keymgmt:list", "keymgmt:gen"])
            .roles(&["ops"])],
    );
    let d = Daemon::start(&t, &Setup::with_access(limited));
    let before = t.objects().len();
    create(
        &d,
        json!({"type": "aes", "label": "x", "roles": ["payments"]}),
    )
    .assert_error(400, "role_not_held");
    create(
        &d,
        json!({"type": "aes", "label": "x", "roles": ["nobody"]}),
    )
    .assert_error(400, "unknown_role");
    create(
        &d,
        json!({"type": "ec", "label": "x", "usage": {"encrypt": true}}),
    )
    .assert_error(400, "invalid_usage");
    create(&d, json!({"type": "aes", "label": "x", "kid": AES})).assert_error(409, "kid_taken");
    assert_eq!(t.objects().len(), before);
    // Deleting needs its own scope.
    delete(&d, AES, &[]).assert_error(403, "missing_scope");
    assert_eq!(t.objects().len(), before);
}

#[test]
fn delete_destroys_every_object_of_a_key_certificate_and_metadata_included() {
    let t = token_with(&[AES_KEY, EC_KEY, LOCKED_KEY]);
    // A certificate with the pair's id.
    let dir = t.path().join("cert");
    std::fs::create_dir_all(&dir).unwrap();
    let der = dir.join("cert.der");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-subj", "/CN=test", "-days", "1", "-outform", "DER", "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(&der)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    t.write_certificate(EC, "ec-key", &der);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    // Give the pair a record (description), so metadata objects exist too.
    d.client().patch(EC, &json!({"description": "doomed"})).ok();
    let view = d.client().get(&format!("/v1/keys/{EC}")).ok();
    assert!(view["has_certificate"].as_bool().unwrap());
    assert!(t.objects().iter().any(|o| o.class == "Data"));

    // A stale If-Match refuses, a current one deletes.
    delete(&d, EC, &[("If-Match", "\"stale\"")]).assert_error(412, "precondition_failed");
    let etag = format!("\"{}\"", view["etag"].as_str().unwrap());
    let r = delete(&d, EC, &[("If-Match", &etag)]);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body.is_empty());
    assert!(r.header("x-request-id").is_some());
    d.client()
        .get(&format!("/v1/keys/{EC}"))
        .assert_error(404, "key_not_found");
    let left: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.id == EC || o.label.starts_with(&format!("hsmkeyd-meta:{EC}")))
        .collect();
    assert!(
        left.is_empty(),
        "objects of the deleted key remain: {left:?}"
    );
    // The audit trail holds the whole key as it was.
    let rid = r.header("x-request-id").unwrap().to_string();
    let entries: Vec<Value> = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["HSMKEYD_REQUEST_ID"] == rid.as_str())
        .collect();
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["HSMKEYD_EVENT"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["KEY_DELETE_INTENT", "KEY_DELETED"], "{entries:#?}");
    let changes: Value =
        serde_json::from_str(entries[1]["HSMKEYD_CHANGES"].as_str().unwrap()).unwrap();
    let was = &changes["key"]["before"];
    assert_eq!(was["label"], "ec-key");
    assert_eq!(was["type"], "ec");
    assert_eq!(was["description"], "doomed");
    assert_eq!(was["attributes"]["sensitive"], true);
    assert_eq!(changes["key"]["after"], Value::Null);
    assert_eq!(entries[1]["HSMKEYD_STATUS"], "204");
    // The other keys are untouched.
    assert_eq!(d.client().get(&format!("/v1/keys/{AES}")).status, 200);
    delete(&d, EC, &[]).assert_error(404, "key_not_found");
    // The token-signing key is not a managed key: not deletable.
    let signing = t
        .objects()
        .into_iter()
        .find(|o| o.label == "hsmkeyd-jwt-signing")
        .unwrap();
    delete(&d, &signing.id, &[]).assert_error(404, "key_not_found");
    // A non-modifiable key is still destroyable (CKA_DESTROYABLE decides).
    assert_eq!(delete(&d, LOCKED, &[]).status, 204);
}

#[test]
fn a_non_destroyable_key_and_a_switched_off_endpoint_refuse_without_writing() {
    let t = token_with(&[AES_KEY]);
    t.gen("aes256", "dead", "keep-me", &["--non-destroyable"]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let before = t.objects();
    delete(&d, "dead", &[]).assert_error(406, "key_not_destroyable");
    assert_eq!(t.objects(), before);
    drop(d);
    let off = Setup {
        extra: String::new(),
        ..Setup::with_access(keys_access().replace("[keys]", "[keys]\nallow_delete = false"))
    };
    let d = Daemon::start(&t, &off);
    delete(&d, AES, &[]).assert_error(403, "delete_disabled");
    // (The audit trail's high-water mark moves at every start; the keys do not.)
    let keys = |objects: Vec<common::P11Object>| {
        objects
            .into_iter()
            .filter(|o| !o.label.starts_with("hsmkeyd-audit-mark"))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(t.objects()), keys(before));
}

#[test]
fn public_halves_come_as_pem_matching_pkcs11_tool_and_as_jwk() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    t.gen("rsa2048", "5a01", "rsa-key", &[]);
    t.gen("ed25519", "ed01", "ed-key", &[]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    use base64::Engine;
    for kid in [EC, "5a01", "ed01"] {
        let r = d.client().get(&format!("/v1/keys/{kid}/public"));
        assert_eq!(r.status, 200, "{kid}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/x-pem-file"));
        let pem = String::from_utf8(r.body.clone()).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            der,
            t.public_key_der(kid),
            "{kid}: the SPKI pkcs11-tool exports"
        );
    }
    let jwk = |kid: &str| {
        let r = d.client().send(
            "GET",
            &format!("/v1/keys/{kid}/public"),
            &[("Accept", "application/jwk+json")],
            b"",
        );
        assert_eq!(r.header("content-type"), Some("application/jwk+json"));
        r.json()
    };
    let ec = jwk(EC);
    assert_eq!(
        (ec["kty"].as_str(), ec["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    assert_eq!(ec["kid"], EC);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let spki = t.public_key_der(EC);
    let point = &spki[spki.len() - 65..];
    assert_eq!(b64.decode(ec["x"].as_str().unwrap()).unwrap(), point[1..33]);
    assert_eq!(b64.decode(ec["y"].as_str().unwrap()).unwrap(), point[33..]);
    assert_eq!(ec["use"], "sig");
    assert_eq!(ec["key_ops"], json!(["verify"]));
    let rsa = jwk("5a01");
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["e"], "AQAB");
    assert_eq!(b64.decode(rsa["n"].as_str().unwrap()).unwrap().len(), 256);
    let ed = jwk("ed01");
    assert_eq!(
        (ed["kty"].as_str(), ed["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );
    assert_eq!(b64.decode(ed["x"].as_str().unwrap()).unwrap().len(), 32);
    d.client()
        .get(&format!("/v1/keys/{AES}/public"))
        .assert_error(406, "no_public_key");

    // A JWK set of the asymmetric keys, by label prefix or role.
    let set = |q: &str| {
        let r = d.client().get(&format!("/v1/jwks{q}"));
        assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
        let kids: BTreeSet<String> = r.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect();
        kids
    };
    let all: BTreeSet<String> = [EC, "5a01", "ed01"].iter().map(|s| s.to_string()).collect();
    assert_eq!(set(""), all, "secret keys have no JWK");
    assert_eq!(set("?label_prefix=ec-"), [EC.to_string()].into());
    d.client()
        .patch("ed01", &json!({"roles": ["payments"]}))
        .ok();
    assert_eq!(set("?role=payments"), ["ed01".to_string()].into());
    assert_eq!(set("?role=ops&label_prefix=ed"), BTreeSet::new());
    d.client()
        .get("/v1/jwks?colour=red")
        .assert_error(400, "invalid_query");
    assert_eq!(set(""), all);
}
