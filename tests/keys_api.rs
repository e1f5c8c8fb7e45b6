//! The key API over the Unix socket against a real SoftHSM token: listing, reading,
//! updating, and every error status with its JSON body.

mod common;

use common::fixture::{
    demo_token, pair, token_with, AES, AES_KEY, DUP, DUP_KEYS, EC, EC_KEY, LOCKED, LOCKED_KEY, RSA,
    RSA_KEY,
};
use common::{Daemon, Setup, Token};
use serde_json::json;

#[test]
fn list_get_and_patch_happy_paths() {
    let t = demo_token();
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();

    let r = c.get("/v1/keys");
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(
        common::kids(&body["keys"]),
        vec!["10c4", "5a01", "a1a1", "ec01"],
        "ordered by kid"
    );
    assert_eq!(body["next_cursor"], serde_json::Value::Null);

    let r = c.get(&format!("/v1/keys/{EC}"));
    assert_eq!(r.status, 200);
    let ec = r.json();
    assert_eq!(ec["label"], "ec-key");
    assert_eq!(ec["type"], "ec");
    assert_eq!(ec["curve"], "P-256");
    assert_eq!(ec["class"], "key-pair");
    assert_eq!(ec["attributes"]["sign"], true);
    assert_eq!(ec["attributes"]["verify"], true);
    assert_eq!(ec["attributes"]["sensitive"], true);
    assert_eq!(ec["attributes"]["extractable"], false);
    assert_eq!(ec["attributes"]["modifiable"], true);
    assert_eq!(ec["state"], "ok");
    assert_eq!(ec["updated_at"], serde_json::Value::Null);
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{}\"", ec["etag"].as_str().unwrap()).as_str())
    );

    let rsa = c.get(&format!("/v1/keys/{RSA}")).json();
    assert_eq!(
        (rsa["type"].as_str(), rsa["bits"].as_u64()),
        (Some("rsa"), Some(2048))
    );
    let aes = c.get(&format!("/v1/keys/{AES}")).json();
    assert_eq!(
        (aes["type"].as_str(), aes["bits"].as_u64()),
        (Some("aes"), Some(256))
    );
    assert_eq!(aes["class"], "secret");

    let r = c.patch(AES, &json!({"label": "renamed-aes"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let body = r.json();
    assert_eq!(body["changed"], json!(["label"]));
    assert_eq!(body["key"]["label"], "renamed-aes");
    assert_ne!(body["key"]["etag"], aes["etag"]);
    assert!(body["key"]["updated_at"].is_string());
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".into(), "renamed-aes".into())]
    );
    assert_eq!(
        c.get(&format!("/v1/keys/{AES}")).json()["label"],
        "renamed-aes"
    );
}

#[test]
fn patch_label_changes_every_object_of_the_pair() {
    let t = demo_token();
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    for (kid, label) in [(EC, "ec-renamed"), (RSA, "rsa-renamed")] {
        let r = c.patch(kid, &json!({"label": label}));
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(
            t.labels_of(kid),
            pair(label),
            "pkcs11-tool must see the new label on both objects of {kid}"
        );
    }
}

#[test]
fn description_and_roles_survive_a_restart() {
    let t = demo_token();
    let d = Daemon::start(&t, &Setup::default());
    let r = d.client().patch(
        EC,
        &json!({"description": "signs invoices", "roles": ["payments", "payments"]}),
    );
    assert_eq!(r.status, 200, "{:?}", r.json());
    let mut changed: Vec<String> = serde_json::from_value(r.json()["changed"].clone()).unwrap();
    changed.sort();
    assert_eq!(changed, vec!["description", "roles"]);
    assert_eq!(r.json()["key"]["roles"], json!(["payments"]));
    assert_eq!(d.stop(), 0);

    // The metadata lives in the token: pkcs11-tool sees hsmkeyd's data object, whose
    // label carries the record.
    let objects = t.objects();
    let record = objects
        .iter()
        .filter(|o| o.class == "Data")
        .find_map(|o| o.label.strip_prefix(&format!("hsmkeyd-meta:{EC} ")))
        .unwrap_or_else(|| panic!("no metadata object in {objects:?}"));
    let record: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(record["description"], "signs invoices");
    assert_eq!(record["roles"], json!(["payments"]));

    let d = Daemon::start(&t, &Setup::default());
    let key = d.client().get(&format!("/v1/keys/{EC}")).json();
    assert_eq!(key["description"], "signs invoices");
    assert_eq!(key["roles"], json!(["payments"]));
    assert!(key["updated_at"].is_string());

    // null clears.
    let r = d
        .client()
        .patch(EC, &json!({"description": null, "roles": null}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["key"]["description"], serde_json::Value::Null);
    assert_eq!(r.json()["key"]["roles"], json!([]));
}

#[test]
fn a_patch_that_changes_nothing_writes_nothing() {
    let t = demo_token();
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let count = || common::fault_count(faults.path(), "C_SetAttributeValue");
    // Startup creates objects of its own (the audit trail's high-water mark).
    let created = || common::fault_count(faults.path(), "C_CreateObject");
    let (before, created_before) = (count(), created());
    let r = d
        .client()
        .patch(EC, &json!({"label": "ec-key", "description": null}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["changed"], json!([]));
    assert_eq!(r.json()["key"]["updated_at"], serde_json::Value::Null);
    assert_eq!(count(), before, "no attribute may be written");
    assert_eq!(created(), created_before, "no object may be created");
}

#[test]
fn listing_pages_with_an_opaque_cursor_and_filters_by_label() {
    let t = Token::new();
    t.devtoken(&[
        "bulk",
        "--count",
        "7",
        "--id-prefix",
        "b0",
        "--label-prefix",
        "batch-",
    ]);
    t.gen("aes256", "c0c0", "other", &[]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let mut seen = Vec::new();
    for body in c.pages(3, 8) {
        assert_eq!(body["total"], 8);
        assert!(body["keys"].as_array().unwrap().len() <= 3);
        seen.extend(common::kids(&body["keys"]).into_iter().map(String::from));
    }
    assert_eq!(seen.len(), 8);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are in kid order without repeats");

    let r = c.get("/v1/keys?label=other").json();
    assert_eq!(r["keys"].as_array().unwrap().len(), 1);
    assert_eq!(r["keys"][0]["kid"], "c0c0");
    let r = c.get("/v1/keys?label_prefix=batch-").json();
    assert_eq!(r["keys"].as_array().unwrap().len(), 7);
    let r = c.get("/v1/keys?label=batch-").json();
    assert_eq!(r["keys"].as_array().unwrap().len(), 0);

    // One label several keys carry: paged in kid order, with the total, the cursor and the
    // other filters as without it. Renamed keys move in and out of it.
    for kid in ["c0c0", "b000000004", "b000000001", "b000000006"] {
        assert_eq!(c.patch(kid, &json!({"label": "shared"})).status, 200);
    }
    assert_eq!(c.patch("b000000004", &json!({"label": "left"})).status, 200);
    let (mut page, mut seen) = (c.get("/v1/keys?label=shared&limit=2").ok(), Vec::new());
    loop {
        assert_eq!(page["total"], 3);
        seen.extend(common::kids(&page["keys"]).into_iter().map(String::from));
        assert!(seen.len() <= 3, "a page repeats keys: {seen:?}");
        let Some(cur) = page["next_cursor"].as_str() else {
            break;
        };
        page = c
            .get(&format!("/v1/keys?label=shared&limit=2&cursor={cur}"))
            .ok();
    }
    assert_eq!(seen, ["b000000001", "b000000006", "c0c0"]);
    let r = c.get("/v1/keys?label=shared&label_prefix=sh").ok();
    assert_eq!(r["total"], 3);
    let r = c.get("/v1/keys?label=shared&label_prefix=x").ok();
    assert_eq!(
        (r["total"].as_u64(), r["keys"].as_array().unwrap().len()),
        (Some(0), 0)
    );
    let r = c
        .get("/v1/keys?label=shared&expires_before=2100-01-01")
        .ok();
    assert_eq!(r["total"], 0);
}

#[test]
fn bad_requests_get_400_with_the_field_named_and_change_nothing() {
    let t = demo_token();
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let long = "x".repeat(65);
    let cases = [
        (json!({}), "empty_patch", None),
        (json!({"label": ""}), "invalid_label", Some("label")),
        (json!({"label": long}), "invalid_label", Some("label")),
        (
            json!({"label": "bell\u{7}"}),
            "invalid_label",
            Some("label"),
        ),
        (json!({"label": 7}), "invalid_label", Some("label")),
        (
            json!({"label": "ok", "colour": "red"}),
            "unknown_field",
            Some("colour"),
        ),
        (
            json!({"description": "d".repeat(251)}),
            "invalid_description",
            Some("description"),
        ),
        (json!({"roles": []}), "invalid_roles", Some("roles")),
        (
            json!({"roles": ["nobody-defines-me"]}),
            "unknown_role",
            Some("roles"),
        ),
        (json!({"roles": "ops"}), "invalid_roles", Some("roles")),
    ];
    for (body, code, field) in cases {
        let r = c.patch(EC, &body);
        let err = r.assert_error(400, code);
        assert_eq!(err["field"].as_str(), field, "for {body}");
    }
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{EC}"),
        &[("Content-Type", "application/json")],
        b"{\"label\": ",
    );
    r.assert_error(400, "invalid_json");
    c.patch("xyz", &json!({"label": "a"}))
        .assert_error(400, "invalid_kid");
    c.get("/v1/keys?limit=0").assert_error(400, "invalid_limit");
    c.get("/v1/keys?limit=1001")
        .assert_error(400, "invalid_limit");
    c.get("/v1/keys?cursor=bm9wZQ")
        .assert_error(400, "invalid_cursor");
    c.get("/v1/keys?sort=label")
        .assert_error(400, "invalid_query");

    let key = c.get(&format!("/v1/keys/{EC}")).json();
    assert_eq!(key["label"], "ec-key");
    assert_eq!(key["updated_at"], serde_json::Value::Null);
    assert_eq!(t.labels_of(EC), pair("ec-key"));
}

#[test]
fn every_other_error_status_has_a_json_body() {
    // Two secret keys sharing one CKA_ID: the key reads, updates answer 409.
    let t = token_with(&[
        AES_KEY,
        EC_KEY,
        RSA_KEY,
        LOCKED_KEY,
        DUP_KEYS[0],
        DUP_KEYS[1],
    ]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();

    c.get("/v1/keys/0bad").assert_error(404, "key_not_found");
    c.patch("0bad", &json!({"label": "x"}))
        .assert_error(404, "key_not_found");
    c.get("/v2/nothing").assert_error(404, "not_found");
    c.send("PUT", &format!("/v1/keys/{EC}"), &[], b"")
        .assert_error(405, "method_not_allowed");
    c.send(
        "PUT",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .assert_error(405, "method_not_allowed");
    // Creating and deleting need their own scopes, which this caller lacks.
    c.send("DELETE", &format!("/v1/keys/{EC}"), &[], b"")
        .assert_error(403, "missing_scope");
    c.send(
        "POST",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        br#"{"type": "aes", "label": "x"}"#,
    )
    .assert_error(403, "missing_scope");

    let r = c.patch(LOCKED, &json!({"label": "unlocked"}));
    r.assert_error(406, "key_not_modifiable");
    assert_eq!(
        t.labels_of(LOCKED),
        vec![("Secret".into(), "locked-key".into())]
    );

    let dup = c.get("/v1/keys/dddd");
    assert_eq!(dup.status, 200);
    assert_eq!(dup.json()["state"], "inconsistent");
    c.patch(DUP, &json!({"label": "x"}))
        .assert_error(409, "inconsistent_key_state");

    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{EC}"),
        &[
            ("Content-Type", "application/json"),
            ("If-Match", "\"0000\""),
        ],
        br#"{"label":"x"}"#,
    );
    r.assert_error(412, "precondition_failed");
    let etag = c
        .get(&format!("/v1/keys/{EC}"))
        .header("etag")
        .unwrap()
        .to_string();
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{EC}"),
        &[("Content-Type", "application/json"), ("If-Match", &etag)],
        br#"{"label":"matched"}"#,
    );
    assert_eq!(r.status, 200, "{:?}", r.json());

    let big = format!("{{\"label\":\"{}\"}}", "a".repeat(70 * 1024));
    c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[("Content-Type", "application/json")],
        big.as_bytes(),
    )
    .assert_error(413, "body_too_large");
    c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[("Content-Type", "text/plain")],
        b"{}",
    )
    .assert_error(415, "unsupported_media_type");
    c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[],
        br#"{"label":"x"}"#,
    )
    .assert_error(415, "unsupported_media_type");
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[(
            "Content-Type",
            "application/merge-patch+json; charset=utf-8",
        )],
        br#"{"label":"merge-patched"}"#,
    );
    assert_eq!(
        r.status,
        200,
        "merge-patch+json is accepted: {:?}",
        r.json()
    );
}

#[test]
fn token_failure_answers_503_and_changes_nothing() {
    let t = demo_token();
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    // The token fails the very next attribute write with CKR_DEVICE_ERROR.
    std::fs::write(faults.path().join("setattr_fail_after"), "0").unwrap();
    let r = d.client().patch(AES, &json!({"label": "never"}));
    let body = r.assert_error(503, "token_unavailable");
    assert!(
        !body.to_string().contains("test-user-pin"),
        "no secret in the body"
    );
    assert_eq!(t.labels_of(AES), vec![("Secret".into(), "aes-key".into())]);
    assert_eq!(
        d.client().get(&format!("/v1/keys/{AES}")).json()["label"],
        "aes-key"
    );
}
