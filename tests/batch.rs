//! `POST /v1/keys/batch` against real SoftHSM tokens, read back with pkcs11-tool: each
//! selector, a batch with one bad key changing nothing, a dry run, the shared batch id in a
//! real journal, and the selection errors. Token failures and crashes: `batch_faults.rs`.

mod common;

use std::time::Duration;

use common::batch::{
    assert_unchanged, batch, kids_of, meta, quiet, snapshot, APP1, APP2, APP3, APP_KEYS,
};
use common::fixture::{
    access, keys_access, token_with, Principal, AES, AES_KEY, DUP, DUP_KEYS, EC, EC_KEY, NO_KEY,
    OTHER, OTHER_KEY,
};
use common::journal::Journal;
use common::{Daemon, Setup};
use serde_json::{json, Value};

#[test]
fn each_selector_changes_exactly_the_keys_it_names() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();

    // By kid.
    let r = batch(
        &c,
        "",
        &json!({"select": {"kids": [AES, EC]}, "patch": {"description": "by kid"},
                "if_match": {AES: "*"}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [AES, EC]);
    assert_eq!(r["keys"][0]["changed"], json!(["description"]));
    assert_eq!(r["keys"][0]["key"]["description"], "by kid");
    assert!(r["batch_id"].as_str().is_some_and(|b| b.len() == 32), "{r}");
    assert_eq!(r["audit_id"].as_str().map(str::len), Some(32), "{r}");

    // By label prefix: roles for the three app keys only.
    let r = batch(
        &c,
        "",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"roles": ["ops"]}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);

    // By role: the keys carrying "ops" are the app keys.
    let r = batch(
        &c,
        "",
        &json!({"select": {"role": "ops"}, "patch": {"description": "ops key", "roles": null}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);

    for kid in [AES, EC] {
        assert_eq!(meta(&t, kid), (json!("by kid"), json!([])), "{kid}");
    }
    for kid in [APP1, APP2, APP3] {
        assert_eq!(meta(&t, kid), (json!("ops key"), json!([])), "{kid}");
    }
    assert_eq!(meta(&t, OTHER), (Value::Null, json!([])));
    // Labels are not a batch's business: every object keeps its own.
    assert_eq!(t.labels_of(APP3), common::fixture::pair("app-3"));
    assert_eq!(
        t.labels_of(AES),
        [("Secret".to_string(), "aes-key".to_string())]
    );
}

#[test]
fn a_batch_with_one_bad_key_changes_nothing() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(DUP_KEYS);
    let t = token_with(&keys);
    let setup = Setup::with_access(keys_access());
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    // OTHER is given a role the caller does not hold (it holds "ops" only).
    c.patch(
        OTHER,
        &json!({"description": "theirs", "roles": ["payments"]}),
    )
    .ok();
    let etag = c.get(&format!("/v1/keys/{EC}")).ok()["etag"]
        .as_str()
        .unwrap()
        .to_string();
    quiet(&c);
    let before = snapshot(&t);
    let patch = json!({"description": "must not land", "roles": ["ops"]});

    let cases = [
        (
            "a role the caller does not hold",
            json!({"select": {"kids": [AES, OTHER, EC]}, "patch": patch}),
            OTHER,
            "missing_role",
            403,
        ),
        (
            "a stale etag",
            json!({"select": {"kids": [AES, EC]}, "patch": patch,
                   "if_match": {EC: "0123456789abcdef"}}),
            EC,
            "precondition_failed",
            412,
        ),
        (
            "an inconsistent key",
            json!({"select": {"kids": [AES, DUP, EC]}, "patch": patch,
                   "if_match": {EC: etag}}),
            DUP,
            "inconsistent_key_state",
            409,
        ),
        (
            "a key that does not exist",
            json!({"select": {"kids": [AES, NO_KEY]}, "patch": patch}),
            NO_KEY,
            "key_not_found",
            404,
        ),
    ];
    for (what, body, bad, code, status) in cases {
        let e = batch(&c, "", &body).assert_error_for(what, 409, "batch_refused");
        let failures = e["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1, "{what}: {e}");
        assert_eq!(failures[0]["kid"], bad, "{what}: {e}");
        assert_eq!(failures[0]["error"], code, "{what}: {e}");
        assert_eq!(failures[0]["status"], status, "{what}: {e}");
        assert!(failures[0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(e["batch_id"].is_string(), "{what}: {e}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_unchanged(&t, &before, "a refused batch");
    // No key was written, so no intent entry was either.
    let intents = d
        .audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGE_INTENT")
        .filter(|e| e.get("HSMKEYD_BATCH_ID").is_some())
        .count();
    assert_eq!(intents, 0);
    drop(d);

    // Scope per key: a caller that may update AES only.
    let narrow = access(
        &["ops", "payments"],
        &[Principal::me("narrow")
            .scopes(&["keymgmt:get", &format!("keymgmt:upd:{AES}")])
            .roles(&["ops"])],
    );
    let d = Daemon::start(&t, &Setup::with_access(narrow));
    let before = snapshot(&t);
    let e = batch(
        &d.client(),
        "",
        &json!({"select": {"kids": [AES, EC]}, "patch": {"description": "x"}}),
    )
    .assert_error(409, "batch_refused");
    assert_eq!(e["failures"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e["failures"][0]["kid"], EC, "{e}");
    assert_eq!(e["failures"][0]["error"], "missing_scope", "{e}");
    // A key it may not update is refused for its scope, whether or not it exists.
    let e = batch(
        &d.client(),
        "",
        &json!({"select": {"kids": [AES, NO_KEY]}, "patch": {"description": "x"}}),
    )
    .assert_error(409, "batch_refused");
    assert_eq!(e["failures"][0]["kid"], NO_KEY, "{e}");
    assert_eq!(e["failures"][0]["error"], "missing_scope", "{e}");
    assert_unchanged(&t, &before, "a batch refused for scope");
}

#[test]
fn a_dry_run_checks_every_key_writes_nothing_and_records_dry_run_entries() {
    let mut keys = vec![AES_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();
    let before = snapshot(&t);
    let r = batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"description": "maybe"}}),
    )
    .ok();
    assert_eq!(r["dry_run"], true);
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);
    for k in r["keys"].as_array().unwrap() {
        assert_eq!(k["key"]["description"], "maybe", "{k}");
        assert_eq!(
            k["changes"]["description"],
            json!({"before": null, "after": "maybe"}),
            "{k}"
        );
    }
    // A dry run checks too: a stale etag refuses it.
    batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"kids": [APP1]}, "patch": {"description": "maybe"},
                "if_match": {APP1: "00"}}),
    )
    .assert_error(409, "batch_refused");
    std::thread::sleep(Duration::from_millis(500));
    assert_unchanged(&t, &before, "a dry run");
    assert_eq!(
        c.get(&format!("/v1/keys/{APP1}")).ok()["description"],
        Value::Null
    );

    let id = r["batch_id"].as_str().unwrap();
    let entries: Vec<_> = d
        .audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_BATCH_ID"] == id)
        .collect();
    assert_eq!(entries.len(), 4, "three keys and the batch: {entries:#?}");
    for e in &entries {
        assert_eq!(e["HSMKEYD_DRY_RUN"], "1", "{e}");
        assert_ne!(e["HSMKEYD_EVENT"], "KEY_ATTRIBUTES_CHANGE_INTENT", "{e}");
        assert!(
            e["MESSAGE"].as_str().unwrap().starts_with("dry run: "),
            "{e}"
        );
    }
}

#[test]
fn every_entry_of_a_batch_carries_its_batch_id_in_the_journal() {
    let j = Journal::start();
    let mut keys = vec![AES_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let setup = Setup {
        audit: "sink = \"journald\"\n".to_string(),
        namespace: Some(j.pid()),
        ..Setup::with_access(keys_access())
    };
    let d = Daemon::start(&t, &setup);
    let r = batch(
        &d.client(),
        "",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"description": "journaled"}}),
    )
    .ok();
    let id = r["batch_id"].as_str().unwrap().to_string();
    let rid = r["audit_id"].as_str().unwrap().to_string();
    let entries = j.wait_for("the batch's entries", |es| {
        es.iter()
            .any(|e| e["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED" && e["HSMKEYD_BATCH_ID"] == id)
    });
    let ours: Vec<&Value> = entries
        .iter()
        .filter(|e| e["HSMKEYD_BATCH_ID"] == id.as_str())
        .collect();
    let count = |event: &str| ours.iter().filter(|e| e["HSMKEYD_EVENT"] == event).count();
    assert_eq!(count("KEY_ATTRIBUTES_CHANGE_INTENT"), 3, "{ours:#?}");
    assert_eq!(count("KEY_ATTRIBUTES_CHANGED"), 3, "{ours:#?}");
    assert_eq!(count("KEYS_BATCH_CHANGED"), 1, "{ours:#?}");
    assert_eq!(ours.len(), 7, "{ours:#?}");
    for e in &ours {
        assert_eq!(e["HSMKEYD_REQUEST_ID"], rid.as_str(), "{e:#}");
        assert_eq!(e["HSMKEYD_PRINCIPAL"], "tester", "{e:#}");
    }
    let mut kids: Vec<_> = ours
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .map(|e| e["HSMKEYD_KID"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    assert_eq!(kids, [APP1, APP2, APP3]);
    let summary = ours
        .iter()
        .find(|e| e["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED")
        .unwrap();
    assert_eq!(summary["HSMKEYD_RESULT"], "OK");
    assert_eq!(summary["HSMKEYD_STATUS"], "200");
    // No entry of another request carries the id.
    assert!(entries
        .iter()
        .filter(|e| e["HSMKEYD_REQUEST_ID"] != rid.as_str())
        .all(|e| e.get("HSMKEYD_BATCH_ID").is_none()));
}

#[test]
fn selection_errors_are_400_and_name_the_field() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    t.devtoken(&[
        "bulk",
        "--count",
        "1001",
        "--id-prefix",
        "b1",
        "--label-prefix",
        "bulk-",
    ]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();
    let before = snapshot(&t);
    let p = json!({"description": "x"});
    let many: Vec<String> = (0..1001).map(|i| format!("b1{i:08x}")).collect();
    let cases = [
        (json!({"select": {}, "patch": p}), "empty_select", "select"),
        (
            json!({"select": {"kids": [AES], "role": "ops"}, "patch": p}),
            "ambiguous_select",
            "select",
        ),
        (
            json!({"select": {"kids": []}, "patch": p}),
            "empty_select",
            "select.kids",
        ),
        (
            json!({"select": {"kids": many}, "patch": p}),
            "too_many_keys",
            "select.kids",
        ),
        (
            json!({"select": {"label_prefix": "bulk-"}, "patch": p}),
            "too_many_keys",
            "select",
        ),
        (
            json!({"select": {"label_prefix": "nobody-"}, "patch": p}),
            "no_keys_selected",
            "select",
        ),
        (
            json!({"select": {"role": "nobody"}, "patch": p}),
            "no_keys_selected",
            "select",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"label": "same-for-all"}}),
            "label_not_batchable",
            "patch.label",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"colour": "red"}}),
            "unknown_field",
            "patch.colour",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {}}),
            "empty_patch",
            "patch",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"description": 7}}),
            "invalid_description",
            "patch.description",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "extra": 1}),
            "unknown_field",
            "extra",
        ),
        (
            json!({"select": {"kin": [AES]}, "patch": p}),
            "unknown_field",
            "select.kin",
        ),
        (json!({"patch": p}), "missing_select", "select"),
        (
            json!({"select": {"kids": ["xyz"]}, "patch": p}),
            "invalid_kid",
            "select.kids",
        ),
        (
            json!({"select": {"kids": [AES, AES]}, "patch": p}),
            "duplicate_kid",
            "select.kids",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "if_match": {EC: "00"}}),
            "if_match_outside_selection",
            "if_match",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"roles": ["undefined-role"]}}),
            "unknown_role",
            "patch.roles",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "if_match": {AES: null}}),
            "invalid_if_match",
            "if_match",
        ),
    ];
    for (body, code, field) in cases {
        let e = batch(&c, "", &body).assert_error_for(&body.to_string(), 400, code);
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    // The largest batch passes its checks (a dry run, to keep the test quick).
    let most: Vec<String> = many[..1000].to_vec();
    let r = batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"kids": most}, "patch": p}),
    )
    .ok();
    assert_eq!(r["keys"].as_array().unwrap().len(), 1000);
    assert_unchanged(&t, &before, "refused and dry-run batches");
}
