//! The appliance's key life cycle and lookups on the Encedo-compatible endpoints: default
//! paging and type flags, `keymgmt:use:<kid>`, the unauthenticated system endpoints, create
//! and delete read back with pkcs11-tool, and search.

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::encedo::*;
use common::fixture::{access, pair, Principal};

use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

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
