//! Usage flags, the one-way security flags and validity dates through PATCH (and dates on
//! create), against real SoftHSM tokens: usage and access read back with `pkcs11-tool`,
//! dates (which pkcs11-tool does not print) with PyKCS11, both independent of hsmkeyd.

mod common;

use common::fixture::{keys_access, token_with, Key, AES, EC, ED, LOCKED_KEY};
use common::python::public_dates as dates;
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

/// An AES key whose CKA_SENSITIVE is false and CKA_EXTRACTABLE true.
const OPEN: &str = "0be0";

fn setup() -> Setup {
    Setup::with_access(keys_access())
}

/// `(class, usage words, access words)` of each key object with this id, by pkcs11-tool.
fn flags(t: &Token, id: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut v: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.id == id && o.class != "Data")
        .map(|o| (o.class, o.usage, o.access))
        .collect();
    v.sort();
    v
}

fn usage_of(t: &Token, id: &str, class: &str) -> Vec<String> {
    flags(t, id)
        .into_iter()
        .find(|(c, _, _)| c == class)
        .unwrap_or_else(|| panic!("no {class} object with id {id}"))
        .1
}

fn access_of(t: &Token, id: &str, class: &str) -> Vec<String> {
    flags(t, id)
        .into_iter()
        .find(|(c, _, _)| c == class)
        .unwrap_or_else(|| panic!("no {class} object with id {id}"))
        .2
}

/// The dates of a pair's public key, as [`dates`] reads them.
fn pair_dates(from: &str, to: &str) -> Vec<(u64, String, String)> {
    vec![(2, from.into(), to.into())]
}

fn has(words: &[String], w: &str) -> bool {
    words.iter().any(|x| x == w)
}

#[test]
fn usage_flags_land_on_the_objects_pkcs11_defines_them_for() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    assert!(has(&usage_of(&t, EC, "Private"), "sign"));
    assert!(!has(&usage_of(&t, EC, "Private"), "derive"));

    // sign and derive live on the private key, verify on the public one.
    let body = Response::ok(&c.patch(
        EC,
        &json!({"usage": {"sign": false, "derive": true, "verify": true}}),
    ));
    assert_eq!(body["changed"], json!(["usage"]), "{body}");
    let a = &body["key"]["attributes"];
    assert_eq!(
        (&a["sign"], &a["derive"], &a["verify"]),
        (&json!(false), &json!(true), &json!(true))
    );
    let private = usage_of(&t, EC, "Private");
    assert!(
        !has(&private, "sign") && has(&private, "derive"),
        "{private:?}"
    );
    assert!(has(&usage_of(&t, EC, "Public"), "verify"));

    // A secret key carries them all (pkcs11-tool does not print CKA_SIGN of one).
    Response::ok(&c.patch(AES, &json!({"usage": {"verify": true, "wrap": false}})));
    let secret = usage_of(&t, AES, "Secret");
    assert!(
        has(&secret, "verify") && !has(&secret, "wrap"),
        "{secret:?}"
    );
    let key = Response::ok(&c.get(&format!("/v1/keys/{AES}")));
    assert_eq!(
        (&key["attributes"]["verify"], &key["attributes"]["wrap"]),
        (&json!(true), &json!(false))
    );

    // The audit trail has the flags before and after.
    let entries = d.audit_entries();
    let changes: Vec<Value> = entries
        .iter()
        .filter_map(|e| e["HSMKEYD_CHANGES"].as_str())
        .filter_map(|c| serde_json::from_str(c).ok())
        .collect();
    assert!(
        changes.iter().any(|c| c["usage"]
            == json!({"before": {"sign": true, "derive": false}, "after": {"sign": false, "derive": true}})),
        "{changes:?}"
    );
}

#[test]
fn a_flag_that_makes_no_sense_for_the_key_type_is_400_with_its_field() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::new("ed25519", ED, "ed")]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let before = t.objects_text();
    for (kid, body, field) in [
        (ED, json!({"usage": {"derive": true}}), "usage.derive"),
        (EC, json!({"usage": {"encrypt": true}}), "usage.encrypt"),
        (
            EC,
            json!({"usage": {"decrypt": true, "sign": false}}),
            "usage.decrypt",
        ),
        (EC, json!({"usage": {"sing": true}}), "usage"),
        (EC, json!({"usage": {"sign": "yes"}}), "usage.sign"),
        (EC, json!({"usage": {}}), "usage"),
    ] {
        let e = c.patch(kid, &body).assert_error(400, "invalid_usage");
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    // Switching off a flag the type has no use for is harmless and allowed.
    Response::ok(&c.patch(ED, &json!({"usage": {"derive": false}})));
    assert_eq!(
        t.objects_text(),
        before,
        "a refused update changed the token"
    );
}

#[test]
fn sensitive_and_extractable_change_one_way_only() {
    let t = token_with(&[
        Key::aes(OPEN, "open").flags(&["--not-sensitive", "--extractable"]),
        Key::aes(AES, "aes"),
        Key::ec(EC, "ec"),
    ]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let access = access_of(&t, OPEN, "Secret");
    assert!(
        !has(&access, "sensitive") && has(&access, "extractable"),
        "{access:?}"
    );

    // The reverse directions are refused before anything reaches the token, dry run or not.
    // (The key objects: the worker may still be writing the record of the changes above.)
    let key_objects = || -> Vec<_> {
        t.objects()
            .into_iter()
            .filter(|o| o.class != "Data")
            .collect()
    };
    let before = key_objects();
    for q in ["", "?dry_run=true"] {
        for (kid, body, field) in [
            (AES, json!({"sensitive": false}), "sensitive"),
            (AES, json!({"extractable": true}), "extractable"),
            (EC, json!({"sensitive": false, "label": "x"}), "sensitive"),
        ] {
            let r = c.send(
                "PATCH",
                &format!("/v1/keys/{kid}{q}"),
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            );
            let e = r.assert_error(400, "irreversible_attribute");
            assert_eq!(e["field"], field, "{body}{q}: {e}");
            let message = e["message"].as_str().unwrap_or_default();
            assert!(message.ends_with("; once set it cannot be undone"), "{e}");
        }
    }
    assert_eq!(key_objects(), before, "a refused one-way change wrote");
    // The value a key already has is no reverse direction: it changes nothing (the
    // document allows both values, schemathesis sent this one).
    let body = Response::ok(&c.patch(OPEN, &json!({"sensitive": false, "extractable": true})));
    assert_eq!(body["changed"], json!([]), "{body}");
    assert_eq!(key_objects(), before, "a no-op one-way field wrote");

    // The allowed directions reach the token.
    let body = Response::ok(&c.patch(OPEN, &json!({"sensitive": true, "extractable": false})));
    assert_eq!(
        body["changed"],
        json!(["sensitive", "extractable"]),
        "{body}"
    );
    let access = access_of(&t, OPEN, "Secret");
    assert!(
        has(&access, "sensitive") && !has(&access, "extractable"),
        "{access:?}"
    );
    // And now they are as final as PKCS#11 says.
    c.patch(OPEN, &json!({"sensitive": false}))
        .assert_error(400, "irreversible_attribute");
    // Setting a value the key already has changes nothing.
    let body = Response::ok(&c.patch(EC, &json!({"sensitive": true})));
    assert_eq!(body["changed"], json!([]), "{body}");
}

#[test]
fn validity_dates_reach_every_key_object_and_null_clears_them() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    assert_eq!(dates(&t, EC), pair_dates("-", "-"));
    let etag = Response::ok(&c.get(&format!("/v1/keys/{EC}")))["etag"].clone();

    let body = Response::ok(&c.patch(
        EC,
        &json!({"not_before": "2026-01-01", "not_after": "2027-06-30"}),
    ));
    assert_eq!(
        body["changed"],
        json!(["not_before", "not_after"]),
        "{body}"
    );
    assert_eq!(
        (&body["key"]["not_before"], &body["key"]["not_after"]),
        (&json!("2026-01-01"), &json!("2027-06-30"))
    );
    assert_ne!(
        body["key"]["etag"], etag,
        "the etag must change with the dates"
    );
    assert_eq!(dates(&t, EC), pair_dates("20260101", "20270630"));
    // The old etag no longer matches.
    c.send(
        "PATCH",
        &format!("/v1/keys/{EC}"),
        &[
            ("Content-Type", "application/json"),
            ("If-Match", &format!("{etag}")),
        ],
        br#"{"not_after": "2028-01-01"}"#,
    )
    .assert_error(412, "precondition_failed");

    // A one-sided change is checked against the other end the key has.
    let e = c
        .patch(EC, &json!({"not_before": "2028-01-01"}))
        .assert_error(400, "invalid_validity");
    assert_eq!(e["field"], "not_before", "{e}");
    let e = c
        .patch(EC, &json!({"not_after": "2025-12-31"}))
        .assert_error(400, "invalid_validity");
    assert_eq!(e["field"], "not_after", "{e}");
    let e = c
        .patch(
            AES,
            &json!({"not_before": "2030-01-02", "not_after": "2030-01-01"}),
        )
        .assert_error(400, "invalid_validity");
    assert_eq!(e["field"], "not_after", "{e}");
    for bad in [
        json!("2026-13-01"),
        json!("2026-02-30"),
        json!("01/02/2026"),
        json!(20260101),
    ] {
        let e = c
            .patch(EC, &json!({ "not_after": bad }))
            .assert_error(400, "invalid_date");
        assert_eq!(e["field"], "not_after", "{e}");
    }
    assert_eq!(dates(&t, EC), pair_dates("20260101", "20270630"));

    // Listings select by expiry.
    Response::ok(&c.patch(AES, &json!({"not_after": "2031-01-01"})));
    let kids = |q: &str| {
        common::kids(&Response::ok(&c.get(&format!("/v1/keys?expires_before={q}")))["keys"])
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(kids("2027-07-01"), vec![EC.to_string()]);
    assert_eq!(kids("2031-01-02"), vec![AES.to_string(), EC.to_string()]);
    assert!(
        kids("2027-06-30").is_empty(),
        "not_after 2027-06-30 is not before itself"
    );
    c.get("/v1/keys?expires_before=soon")
        .assert_error(400, "invalid_date");

    // null clears.
    let body = Response::ok(&c.patch(EC, &json!({"not_after": null})));
    assert_eq!(body["key"]["not_after"], Value::Null, "{body}");
    assert_eq!(dates(&t, EC), pair_dates("20260101", "-"));
}

#[test]
fn a_new_key_gets_its_dates_and_a_bad_range_is_refused() {
    let t = Token::new();
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let post = |body: Value| {
        c.send(
            "POST",
            "/v1/keys",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let r = post(json!({"type": "ec", "label": "dated", "kid": "da7e",
                        "not_before": "2026-03-01", "not_after": "2029-02-28"}));
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["key"]["not_after"], "2029-02-28");
    assert_eq!(dates(&t, "da7e"), pair_dates("20260301", "20290228"));
    let objects = t.objects().len();
    let e = post(
        json!({"type": "aes", "label": "x", "not_before": "2026-03-01",
                        "not_after": "2026-02-28"}),
    )
    .assert_error(400, "invalid_validity");
    assert_eq!(e["field"], "not_after");
    post(json!({"type": "aes", "label": "x", "not_after": "tomorrow"}))
        .assert_error(400, "invalid_date");
    assert_eq!(t.objects().len(), objects, "a refused create made objects");
}

#[test]
fn a_dry_run_of_attributes_answers_the_change_and_writes_nothing() {
    let t = token_with(&[Key::ec(EC, "ec")]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let (objects, when) = (t.objects_text(), dates(&t, EC));
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{EC}?dry_run=true"),
        &[("Content-Type", "application/json")],
        json!({"usage": {"sign": false, "verify": false}, "not_after": "2030-01-01",
               "description": "d"})
        .to_string()
        .as_bytes(),
    );
    let v = Response::ok(&r);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["key"]["not_after"], "2030-01-01", "{v}");
    assert_eq!(v["key"]["attributes"]["sign"], false, "{v}");
    assert_eq!(
        v["changes"]["usage"],
        json!({"before": {"sign": true, "verify": true}, "after": {"sign": false, "verify": false}})
    );
    assert_eq!(t.objects_text(), objects, "a dry run changed the token");
    assert_eq!(dates(&t, EC), when, "a dry run changed a date");
    let key = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (key["not_after"].clone(), key["attributes"]["sign"].clone()),
        (Value::Null, json!(true))
    );
}

#[test]
fn a_write_that_fails_part_way_through_a_pair_is_undone_at_once() {
    let t = token_with(&[Key::ec(EC, "ec")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &setup().with_faults(faults.path()));
    let c = d.client();
    Response::ok(&c.patch(EC, &json!({"description": "first"})));
    // The worker makes the record's spare once the key is quiet: then the next record write
    // is one C_SetAttributeValue (before, it would be a C_CreateObject, and the count below
    // would fall on the wrong write).
    let meta = format!("hsmkeyd-meta:{EC} ");
    assert!(
        common::wait_until(
            "the record's spare",
            std::time::Duration::from_secs(10),
            || {
                t.objects()
                    .iter()
                    .filter(|o| o.label.starts_with(&meta))
                    .count()
                    == 2
            }
        ),
        "{}",
        t.objects_text()
    );
    let (objects, when) = (flags(&t, EC), dates(&t, EC));
    let key = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    // The record, then the private key, then the public key fails.
    std::fs::write(faults.path().join("setattr_fail_after"), "2").unwrap();
    let r = c.patch(
        EC,
        &json!({"usage": {"sign": false, "verify": false}, "not_after": "2030-01-01"}),
    );
    assert!(
        r.status >= 500,
        "{} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        !faults.path().join("setattr_fail_after").exists(),
        "the fault never fired"
    );
    assert_eq!(flags(&t, EC), objects, "the private key kept a change");
    assert_eq!(dates(&t, EC), when, "an object kept its new date");
    let now = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(now["state"], "ok", "{now}");
    assert_eq!(
        (&now["attributes"], &now["not_after"], &now["description"]),
        (&key["attributes"], &key["not_after"], &key["description"])
    );
    // And the key takes the change when the token does.
    Response::ok(&c.patch(EC, &json!({"usage": {"sign": false, "verify": false}})));
    assert!(!has(&usage_of(&t, EC, "Private"), "sign"));
    assert!(!has(&usage_of(&t, EC, "Public"), "verify"));
}

#[test]
fn a_key_the_token_keeps_unmodifiable_refuses_attribute_changes_without_a_write() {
    let t = token_with(&[LOCKED_KEY]);
    let d = Daemon::start(&t, &setup());
    let before = t.objects_text();
    for body in [
        json!({"usage": {"encrypt": false}}),
        json!({"not_after": "2030-01-01"}),
        json!({"sensitive": true}),
    ] {
        d.client()
            .patch(LOCKED_KEY.kid, &body)
            .assert_error(406, "key_not_modifiable");
    }
    assert_eq!(t.objects_text(), before);
}

/// The scan reads a key object's dates with its other attributes, and where the module
/// cannot answer that call (SoftHSM 2.6 fails to read back the dates of private objects
/// after a restart) it reads the rest without them: the key stays readable and ok, with
/// every other attribute, and a pair keeps the dates of its public object.
#[test]
fn dates_survive_a_restart_and_unreadable_ones_leave_the_key_whole() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let dates_body = json!({"not_before": "2026-01-01", "not_after": "2027-06-30"});
    for kid in [EC, AES] {
        let body = Response::ok(&c.patch(kid, &dates_body));
        assert_eq!(body["key"]["not_after"], "2027-06-30", "{body}");
    }
    let before: Vec<Value> = [EC, AES]
        .iter()
        .map(|k| Response::ok(&c.get(&format!("/v1/keys/{k}"))))
        .collect();
    drop(c);
    assert_eq!(d.stop(), 0);

    let d = Daemon::start(&t, &setup());
    let c = d.client();
    let ec = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(ec["state"], "ok", "{ec}");
    assert_eq!(
        (&ec["not_before"], &ec["not_after"]),
        (&json!("2026-01-01"), &json!("2027-06-30")),
        "a pair shows its public object's dates: {ec}"
    );
    assert_eq!(ec["attributes"], before[0]["attributes"], "{ec}");
    assert_eq!(ec["label"], "ec");
    let aes = Response::ok(&c.get(&format!("/v1/keys/{AES}")));
    assert_eq!(aes["state"], "ok", "the key stays readable: {aes}");
    assert_eq!(aes["label"], "aes");
    assert_eq!(aes["attributes"], before[1]["attributes"], "{aes}");
    assert_eq!(aes["bits"], before[1]["bits"], "{aes}");
    assert!(
        aes["not_after"].is_null() || aes["not_after"] == "2027-06-30",
        "the secret key's end date is either read back or unknown: {aes}"
    );
    assert!(d.log().contains("key index built"), "{}", d.log());
}
